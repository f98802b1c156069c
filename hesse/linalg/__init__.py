"""Matrix-free spectral estimators (layer 2): eigenvalues, trace, diagonal, norms.

Everything here sees only :class:`hesse.operators.LinearOperator` (or anything
:func:`hesse.as_operator` accepts), so it works the same on a dense test matrix and
on a full-dataset Hessian.
"""

from hesse.linalg.eigen import eigenvalues
from hesse.linalg.trace import diagonal, frobenius_norm, trace
from hesse.results import DiagonalResult, EigenResult, NormResult, TraceResult

__all__ = [
    "DiagonalResult", "EigenResult", "NormResult", "TraceResult",
    "diagonal", "eigenvalues", "frobenius_norm", "trace",
]
