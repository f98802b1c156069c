"""Applications of curvature (layer 4): what the operators and estimators are used for.

:mod:`hesse.apply.influence`: influence functions (identity, exact, CG, LiSSA, Arnoldi, K-FAC, EK-FAC).
:mod:`hesse.apply.quantize`: Hessian-aware mixed-precision quantization (HAWQ-V2/V3, Q-BERT).
:mod:`hesse.apply.optim`: curvature-aware optimizers (AdaHessian, Sophia-H/G, SAM/ASAM, K-FAC).
:mod:`hesse.apply.prune`: curvature-based pruning (magnitude, OBD, WoodFisher/M-FAC OBS and
layer-wise OBS/SparseGPT), each returning masks and weight updates without touching the model.
"""

from hesse.apply.influence import pairwise, self_influence
from hesse.apply.optim import SAM, AdaHessian, KFACOptimizer, SophiaG, SophiaH
from hesse.apply.quantize import allocate_bits, sensitivities
from hesse.apply.prune import (
    PruneResult,
    apply_masks,
    prune_layerwise_obs,
    prune_magnitude,
    prune_obd,
    prune_woodfisher,
)
from hesse.apply.pruning.fisher_inverse import EmpiricalFisherInverse
from hesse.apply.pruning.layerwise import DampingWarning

__all__ = [
    "allocate_bits", "pairwise", "self_influence", "sensitivities", "SAM", "AdaHessian", "KFACOptimizer", "SophiaG", "SophiaH", "DampingWarning", "EmpiricalFisherInverse", "PruneResult", "apply_masks", "prune_layerwise_obs",
    "prune_magnitude", "prune_obd", "prune_woodfisher",
]
