"""Matrix-free spectral estimators (layer 2): eigenvalues, trace, diagonal, norms, density.

Everything here sees only :class:`hesse.operators.LinearOperator` (or anything
:func:`hesse.as_operator` accepts), so it works the same on a dense test matrix and
on a full-dataset Hessian.

Modules: :mod:`~hesse.linalg.lanczos` (the one Lanczos implementation),
:mod:`~hesse.linalg.eigen` (:func:`eigenvalues`), :mod:`~hesse.linalg.estimators`
(:func:`trace`, :func:`diagonal`, :func:`frobenius_norm`), :mod:`~hesse.linalg.quadrature`
(:func:`density`, stochastic Lanczos quadrature), :mod:`~hesse.linalg.probes` (isotropic
probe vectors) and :mod:`~hesse.linalg.checks` (input checks).
"""

from hesse.linalg.eigen import eigenvalues
from hesse.linalg.estimators import diagonal, frobenius_norm, trace
from hesse.linalg.probes import isotropic_probes
from hesse.linalg.quadrature import DensityResult, density
from hesse.linalg.solvers import LowRankInverse, SolveResult, cg, damped, lissa, lowrank_inverse, lowrank_solve, minres, neumann
from hesse.results import DiagonalResult, EigenResult, NormResult, TraceResult

__all__ = [
    "LowRankInverse", "SolveResult", "cg", "damped", "lissa", "lowrank_inverse", "lowrank_solve", "minres", "neumann",
    "DensityResult", "DiagonalResult", "EigenResult", "NormResult", "TraceResult",
    "density", "diagonal", "eigenvalues", "frobenius_norm", "isotropic_probes", "trace",
]
