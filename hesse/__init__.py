"""hesse: see and use the curvature of a neural network's loss.

Layers, each depending only on those before it:
``operators`` (matrix-free Hessian/GGN/Fisher products) -> ``linalg`` (Lanczos,
Hutchinson, Hutch++, XTrace, ...) -> ``analysis`` (spectrum, stability, sharpness,
landscape, training monitor) -> interfaces (``hesse`` CLI, ``report``).

    H = hesse.Hessian(model, criterion, loader)
    hesse.eigenvalues(H, k=5).values
    hesse.trace(H).estimate
"""

from hesse.analysis import (
    Landscape,
    SharpnessMonitor,
    batch_size_sharpness,
    bulk_outlier_split,
    interpolate,
    loss_landscape,
    per_layer,
    sharpness,
    stability,
)
from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg import cg, density, diagonal, eigenvalues, frobenius_norm, lissa, lowrank_inverse, minres, neumann, trace
from hesse.operators import (
    EKFAC,
    GGN,
    KFAC,
    BlockDiagonalOperator,
    FunctionOperator,
    Identity,
    DenseOperator,
    Fisher,
    Hessian,
    LinearOperator,
    Objective,
    as_operator,
)

__version__ = "0.1.0"

__all__ = [
    "EKFAC", "KFAC", "FunctionOperator", "Identity", "cg", "lissa", "lowrank_inverse", "minres", "neumann",
    "GGN", "BlockDiagonalOperator", "DenseOperator", "Fisher", "Hessian", "HesseError", "Landscape",
    "LinearOperator", "NotConvergedWarning", "Objective", "SharpnessMonitor", "__version__", "as_operator",
    "batch_size_sharpness", "bulk_outlier_split", "density", "diagonal", "eigenvalues",
    "frobenius_norm", "interpolate", "loss_landscape", "per_layer", "sharpness", "stability", "trace",
]
