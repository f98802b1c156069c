"""hesse: see and use the curvature of a neural network's loss.

Layers, each depending only on those before it:
``operators`` (the objective and matrix-free Hessian/GGN/Fisher products) -> ``linalg``
(Lanczos, Hutchinson, Hutch++, XTrace, SLQ, ...) -> ``analysis`` (spectrum, stability,
sharpness, landscape, training monitor) -> interfaces (``hesse`` CLI, ``report``).

    H = hesse.Hessian(model, criterion, loader)
    hesse.eigenvalues(H, k=5).values
    hesse.trace(H).estimate

The public names below are imported on first use (PEP 562), so ``import hesse`` is instant
and a Ctrl-C while the command line starts never lands in the middle of importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "hesse.errors": ["HesseError", "NotConvergedWarning"],
    "hesse.operators": [
        "EKFAC", "GGN", "KFAC", "BlockDiagonalOperator", "DenseOperator", "Fisher", "FunctionOperator", "Hessian",
        "Identity", "LinearOperator", "Objective", "as_operator",
    ],
    "hesse.linalg": [
        "cg", "density", "diagonal", "eigenvalues", "frobenius_norm", "lissa", "lowrank_inverse", "minres",
        "neumann", "trace",
    ],
    "hesse.analysis": [
        "Landscape", "SharpnessMonitor", "adaptive_sharpness", "average_sharpness", "batch_size_sharpness",
        "bulk_outlier_split", "eigenvalue_sharpness", "interpolate", "loss_landscape", "per_layer",
        "sam_sharpness", "stability", "stability_threshold", "trace_sharpness", "worst_case_sharpness",
    ],
    "hesse.apply": ["allocate_bits", "pairwise", "self_influence", "sensitivities", "SAM", "AdaHessian", "KFACOptimizer", "SophiaG", "SophiaH", "apply_masks", "prune_layerwise_obs", "prune_magnitude", "prune_obd", "prune_woodfisher"],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name from its layer on first use."""
    if name not in _HOME:
        raise AttributeError(f"module 'hesse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static type checkers and IDEs see the names directly
    from hesse.analysis import (  # noqa: F401
        Landscape, SharpnessMonitor, adaptive_sharpness, average_sharpness, batch_size_sharpness,
        bulk_outlier_split, eigenvalue_sharpness, interpolate, loss_landscape, per_layer, sam_sharpness,
        stability, stability_threshold, trace_sharpness, worst_case_sharpness,
    )
    from hesse.apply import (  # noqa: F401
        SAM, AdaHessian, KFACOptimizer, SophiaG, SophiaH, allocate_bits, apply_masks, pairwise,
        self_influence, sensitivities, prune_layerwise_obs, prune_magnitude, prune_obd, prune_woodfisher,
    )
    from hesse.errors import HesseError, NotConvergedWarning  # noqa: F401
    from hesse.linalg import (  # noqa: F401
        cg, density, diagonal, eigenvalues, frobenius_norm, lissa, lowrank_inverse, minres, neumann, trace,
    )
    from hesse.operators import (  # noqa: F401
        EKFAC, GGN, KFAC, BlockDiagonalOperator, DenseOperator, Fisher, FunctionOperator, Hessian, Identity,
        LinearOperator, Objective, as_operator,
    )
