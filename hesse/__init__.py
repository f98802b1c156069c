"""hesse: see and use the curvature of a neural network's loss.

Layers, each depending only on those before it:
operators (matrix-free products) -> linalg (Lanczos, Hutchinson, ...) -> analysis
(spectrum, sharpness, landscape) -> interfaces (CLI, report).
"""

from hesse.errors import HesseError, NotConvergedWarning
from hesse.operators import (
    GGN,
    BlockDiagonalOperator,
    DenseOperator,
    Fisher,
    Hessian,
    LinearOperator,
    as_operator,
)

__version__ = "0.1.0"

__all__ = [
    "GGN", "BlockDiagonalOperator", "DenseOperator", "Fisher", "Hessian", "HesseError",
    "LinearOperator", "NotConvergedWarning", "as_operator", "__version__",
]
