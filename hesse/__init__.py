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
    adaptive_sharpness,
    average_sharpness,
    batch_size_sharpness,
    bulk_outlier_split,
    density,
    eigenvalue_sharpness,
    interpolate,
    loss_landscape,
    per_layer,
    sam_sharpness,
    stability,
    stability_threshold,
    trace_sharpness,
    worst_case_sharpness,
)
from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg import diagonal, eigenvalues, frobenius_norm, trace
from hesse.operators import (
    GGN,
    BlockDiagonalOperator,
    DenseOperator,
    Fisher,
    Hessian,
    LinearOperator,
    Objective,
    as_operator,
)

__version__ = "0.1.0"

__all__ = [
    "GGN", "BlockDiagonalOperator", "DenseOperator", "Fisher", "Hessian", "HesseError", "Landscape",
    "LinearOperator", "NotConvergedWarning", "Objective", "SharpnessMonitor", "__version__", "as_operator",
    "adaptive_sharpness", "average_sharpness", "batch_size_sharpness", "bulk_outlier_split", "density",
    "diagonal", "eigenvalue_sharpness", "eigenvalues", "frobenius_norm", "interpolate", "loss_landscape",
    "per_layer", "sam_sharpness", "stability", "stability_threshold", "trace", "trace_sharpness",
    "worst_case_sharpness",
]
