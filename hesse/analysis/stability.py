"""Learning-rate stability diagnostics from the curvature spectrum.

* GD (linear stability, edge of stability; Cohen et al. 2021, "Gradient Descent on Neural
  Networks Typically Occurs at the Edge of Stability"): along the top eigenvector, GD with
  step ``lr`` (heavy-ball momentum ``beta``) is stable iff ``lambda_max <= (2 + 2 beta) / lr``.
* SGD (Wu & Su 2023, "The Implicit Regularization of Dynamical Stability in SGD"): a global
  minimum that is linearly stable for SGD must have ``tr(H) <= 2 / lr`` (a necessary
  condition, derived for a mean-reduced loss at an interpolating minimum with single-sample
  batches; larger batches reduce the gradient noise and relax it, so read it as a bound for
  small-batch SGD).
* Batch size (Granziol et al. 2022, "Learning Rates as a Function of Batch Size: A Random
  Matrix Theory Approach"): the top eigenvalue of a mini-batch Hessian exceeds the
  full-batch one, by a fluctuation term shrinking with the batch size ``B``; the largest
  stable step ``2 / lambda_max(B)`` therefore grows with ``B``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hesse.errors import HesseError
from hesse.linalg._common import check_positive
from hesse.linalg.eigen import eigenvalues
from hesse.linalg.trace import trace
from hesse.results import _fmt, _ResultMixin

EDGE_BAND = 0.9


@dataclass(repr=False)
class StabilityResult(_ResultMixin):
    """Top eigenvalue and trace against the stability thresholds of GD and SGD."""

    lr: float
    momentum: float
    gd_threshold: float
    top_eigenvalue: float
    top_converged: bool
    gd_ratio: float
    gd_verdict: str
    sgd_threshold: float
    trace: float
    trace_stderr: float
    sgd_ratio: float
    sgd_verdict: str
    matvecs: int

    def __repr__(self) -> str:
        return (
            f"StabilityResult(lr={_fmt(self.lr)}:\n"
            f"  GD : lambda_max={_fmt(self.top_eigenvalue)} vs {_fmt(self.gd_threshold)} "
            f"(ratio {self.gd_ratio:.3f}) -> {self.gd_verdict}\n"
            f"  SGD: trace={_fmt(self.trace)} +- {_fmt(self.trace_stderr)} vs {_fmt(self.sgd_threshold)} "
            f"(ratio {self.sgd_ratio:.3f}) -> {self.sgd_verdict}\n  matvecs={self.matvecs})"
        )


def _gd_verdict(ratio: float) -> str:
    if ratio > 1:
        return "unstable: sharpness above (2+2 momentum)/lr, GD oscillates along the top eigenvector"
    if ratio >= EDGE_BAND:
        return "edge of stability: sharpness within 10% of (2+2 momentum)/lr"
    return "stable"


def _sgd_verdict(estimate: float, stderr: float, threshold: float) -> str:
    if estimate - 2 * stderr > threshold:
        return "violated: trace above 2/lr, not a linearly stable minimum for small-batch SGD (larger batches relax this)"
    if estimate + 2 * stderr <= threshold:
        return "satisfied: trace below 2/lr (necessary, not sufficient, for SGD stability)"
    return "uncertain: 2/lr lies within two standard errors of the trace estimate"


def stability(
    op,
    lr: float,
    *,
    momentum: float = 0.0,
    tol: float = 1e-4,
    trace_budget: int = 99,
    trace_method: str = "hutch++",
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool = True,
) -> StabilityResult:
    """Compare ``lambda_max`` with ``(2 + 2 momentum)/lr`` (GD) and ``tr(H)`` with ``2/lr`` (SGD).

    Ratios above 1 mean the threshold is exceeded. The SGD verdict accounts for the
    trace estimate's standard error (two-sigma rule).
    """
    check_positive("lr", lr)
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise HesseError(f"momentum must be in [0, 1), got {momentum!r}.")
    top = eigenvalues(op, k=1, which="largest", tol=tol, seed=seed,
                      check_symmetric=check_symmetric, progress=progress)
    tr = trace(op, trace_method, budget=trace_budget, seed=seed, check_symmetric=False, progress=progress)
    gd_threshold, sgd_threshold = (2 + 2 * momentum) / lr, 2 / lr
    lam = float(top.values[0])
    gd_ratio, sgd_ratio = lam / gd_threshold, tr.estimate / sgd_threshold
    return StabilityResult(
        lr=float(lr), momentum=float(momentum), gd_threshold=gd_threshold, top_eigenvalue=lam,
        top_converged=bool(top.converged[0]), gd_ratio=gd_ratio, gd_verdict=_gd_verdict(gd_ratio),
        sgd_threshold=sgd_threshold, trace=tr.estimate, trace_stderr=tr.stderr, sgd_ratio=sgd_ratio,
        sgd_verdict=_sgd_verdict(tr.estimate, tr.stderr, sgd_threshold), matvecs=top.matvecs + tr.matvecs,
    )


@dataclass(repr=False)
class BatchSharpnessResult(_ResultMixin):
    """Top eigenvalue of mini-batch operators per batch size.

    ``values[i]``: the ``repeats`` top eigenvalues for ``batch_sizes[i]``; ``max_stable_lr``:
    ``2 / mean``; ``fit``: least-squares ``lambda(B) ~ a + c / B`` (``a``: the large-batch limit).
    """

    batch_sizes: list[int]
    values: list[list[float]]
    mean: list[float]
    std: list[float]
    max_stable_lr: list[float]
    fit: dict[str, float]
    matvecs: int

    def __repr__(self) -> str:
        rows = "\n".join(
            f"  B={b:>6d}: lambda_max={_fmt(m)} +- {_fmt(s)}  (2/lambda={_fmt(lr)})"
            for b, m, s, lr in zip(self.batch_sizes, self.mean, self.std, self.max_stable_lr)
        )
        return (f"BatchSharpnessResult(fit lambda(B) ~ {_fmt(self.fit['a'])} + {_fmt(self.fit['c'])}/B,"
                f" matvecs={self.matvecs}\n{rows})")


def batch_size_sharpness(
    make_op: Callable,
    batch_sizes,
    *,
    repeats: int = 3,
    tol: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> BatchSharpnessResult:
    """Top eigenvalue of mini-batch curvature as a function of the batch size.

    ``make_op(batch_size)`` or ``make_op(batch_size, seed)`` must return an operator for a
    freshly drawn mini-batch of that size (e.g. ``hesse.Hessian`` on one batch); it is
    called ``repeats`` times per size (seeds ``seed, seed+1, ...``), so the model code stays
    outside this function.
    """
    if not callable(make_op):
        raise HesseError("make_op must be a callable batch_size -> operator, e.g. "
                         "lambda b: hesse.Hessian(model, loss, sample_batch(b)).")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b <= 0 for b in sizes):
        raise HesseError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}.")
    check_positive("repeats", repeats, integer=True)
    takes_seed = len(inspect.signature(make_op).parameters) >= 2
    values, matvecs = [], 0
    for b in sizes:
        row = []
        for r in range(repeats):
            op = make_op(b, seed + r) if takes_seed else make_op(b)
            res = eigenvalues(op, k=1, tol=tol, seed=seed + r, progress=progress)
            row.append(float(res.values[0]))
            matvecs += res.matvecs
        values.append(row)
    mean = [float(np.mean(v)) for v in values]
    std = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    if len(set(sizes)) >= 2:
        X = np.stack([np.ones(len(sizes)), 1 / np.array(sizes, dtype=float)], 1)
        (a, c), *_ = np.linalg.lstsq(X, np.array(mean), rcond=None)
    else:
        a, c = mean[0], math.nan
    lrs = [2 / m if m > 0 else math.inf for m in mean]
    return BatchSharpnessResult(sizes, values, mean, std, lrs, {"a": float(a), "c": float(c)}, matvecs)
