"""Learning-rate stability diagnostics from the curvature spectrum.

* GD (linear stability, edge of stability; Cohen et al. 2021, "Gradient Descent on Neural
  Networks Typically Occurs at the Edge of Stability"): along the top eigenvector, (momentum)
  gradient descent with step ``lr`` is stable on the quadratic model of the loss at this
  point iff ``lambda_max`` is below :func:`stability_threshold` (``2 / lr`` without
  momentum, ``(2 + 2 beta) / lr`` with heavy-ball momentum ``beta``). This is a statement
  about the quadratic model, not a prediction of divergence: beyond the threshold,
  training often oscillates and self-stabilises at the edge of stability, and diverges
  only well beyond it (``stability(..., simulate=steps)`` checks empirically).
* SGD (Wu & Su 2023, "The Implicit Regularization of Dynamical Stability in SGD"): a global
  minimum that is linearly stable for SGD with single-sample batches must have
  ``tr(H) <= 2 / lr`` (a necessary condition, derived for a mean-reduced loss at an
  interpolating minimum). For training batch size ``B`` :func:`stability` uses the
  mini-batch form ``tr(H)/B + (1 - 1/B) lambda_max <= 2 / lr``, which is exactly Wu & Su's
  condition at ``B = 1`` and tends to the GD condition ``lambda_max <= 2 / lr`` as ``B``
  grows (derivation and assumptions in :func:`stability`).
* Batch size (Granziol et al. 2022, "Learning Rates as a Function of Batch Size: A Random
  Matrix Theory Approach"): the top eigenvalue of a mini-batch Hessian exceeds the
  full-batch one, by a fluctuation term shrinking with the batch size ``B``; the largest
  stable step ``2 / lambda_max(B)`` therefore grows with ``B``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hesse.errors import HesseError, check_on_interrupt, interrupted
from hesse.linalg import eigenvalues, trace
from hesse.linalg.checks import check_positive
from hesse.results import _fmt, _ResultMixin

__all__ = ["BatchSharpnessResult", "StabilityResult", "batch_size_sharpness", "stability", "stability_threshold"]

EDGE_BAND = 0.9
SGD_FIELDS = ("sgd_threshold", "trace", "trace_stderr", "sgd_quantity", "sgd_ratio", "sgd_verdict")


def stability_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                        batch_size: int | None = None) -> float:
    """The largest curvature ``λ`` at which SGD (``torch.optim.SGD`` conventions) is stable on ``½ λ x²``.

    The update is ``b ← μ b + (1 - d) g``, ``x ← x - lr (g + μ b)`` (Nesterov) or ``x ← x - lr b``
    (heavy ball), ``g = λ x``, ``μ = momentum``, ``d = dampening`` (with ``μ = 0`` PyTorch keeps
    no buffer: plain GD, ``d`` unused). With ``a = lr λ``, ``c = 1 - d`` the state ``(x, b)``
    evolves by the companion matrix

    * heavy ball: ``[[1 - c a, -lr μ], [c λ, μ]]``, trace ``T = 1 + μ - c a``, det ``D = μ``;
    * Nesterov: ``[[1 - a (1 + μ c), -lr μ²], [c λ, μ]]``, ``T = 1 + μ - a (1 + μ c)``, ``D = μ (1 - a)``.

    Its eigenvalues solve ``z² - T z + D = 0``; they lie inside the unit circle iff
    ``|D| < 1`` and ``|T| < 1 + D`` (Jury). ``1 - T + D = c a > 0`` always holds, and the edge is
    ``1 + T + D = 0`` (an eigenvalue crosses ``-1``, the iterate flips sign and grows), so

    * GD: ``λ < 2 / lr``;
    * heavy ball: ``λ < (2 + 2μ) / (lr (1 - d))`` (Polyak 1964; ``∞`` at ``d = 1``: no step);
    * Nesterov: ``λ < (2 + 2μ) / (lr (1 + μ + μ (1 - d)))``, ``(2 + 2μ) / ((1 + 2μ) lr)`` at ``d = 0``.

    PyTorch's first step (``b = g``, undamped) is a transient that does not change stability.
    ``batch_size=B`` gives instead the threshold of the mini-batch SGD check of :func:`stability`,
    on ``tr(H)/B + (1 - 1/B) λ_max`` (Wu & Su 2023 at ``B = 1``): ``2 / lr``, derived for plain
    SGD, so momentum is refused there.
    """
    check_positive("lr", lr)
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise HesseError(f"momentum must be in [0, 1), got {momentum!r}.")
    if not (isinstance(dampening, (int, float)) and 0 <= dampening <= 1):
        raise HesseError(f"dampening must be in [0, 1], got {dampening!r}.")
    if batch_size is not None:
        check_positive("batch_size", batch_size, integer=True)
        if momentum:
            raise HesseError("the mini-batch SGD condition (batch_size=) is derived for plain SGD; "
                             "pass momentum=0, or leave batch_size out for the full-batch threshold.")
        return 2.0 / lr
    if momentum == 0:
        return 2.0 / lr
    c = 1.0 - dampening
    if nesterov:
        return (2.0 + 2.0 * momentum) / ((1.0 + momentum + momentum * c) * lr)
    return math.inf if c == 0 else (2.0 + 2.0 * momentum) / (c * lr)


MEANING = ("beyond the threshold (lr above 2/lambda_max for plain GD), gradient descent is locally unstable along "
           "the top eigenvector of the quadratic model at this point; in practice training often oscillates and "
           "self-stabilises at the edge of stability (Cohen et al. 2021), and diverges only well beyond it")


@dataclass(repr=False)
class StabilityResult(_ResultMixin):
    """Top eigenvalue (and, for mini-batch SGD, the trace) against the stability thresholds.

    ``full_batch``: the check is for full-batch gradient descent on the ``num_samples``
    samples; the SGD condition then reduces to the GD one and the ``sgd_*``/``trace`` fields
    are ``None``. ``simulated_*``: the optional empirical check (``simulate=steps``), the
    full-data loss before and after each gradient-descent step from this point.
    """

    lr: float
    momentum: float
    batch_size: int | None
    gd_threshold: float
    top_eigenvalue: float
    top_converged: bool
    gd_ratio: float
    gd_verdict: str
    sgd_threshold: float | None
    trace: float | None
    trace_stderr: float | None
    sgd_quantity: float | None
    sgd_ratio: float | None
    sgd_verdict: str | None
    matvecs: int
    dampening: float = 0.0
    nesterov: bool = False
    full_batch: bool = False
    num_samples: int | None = None
    simulated_losses: list[float] | None = None
    simulated_loss_ratio: float | None = None
    simulated_diverged: bool | None = None

    def __repr__(self) -> str:
        lines = [f"StabilityResult(lr={_fmt(self.lr)}, "
                 + (f"full batch, N={self.num_samples}" if self.full_batch else f"batch size B={self.batch_size}") + ":",
                 f"  GD : lambda_max={_fmt(self.top_eigenvalue)} vs {_fmt(self.gd_threshold)} "
                 f"(ratio {self.gd_ratio:.3f}) -> {self.gd_verdict}"]
        if not self.full_batch:
            lines.append(f"  SGD (B={self.batch_size}): tr/B + (1-1/B) lambda_max={_fmt(self.sgd_quantity)} "
                         f"(trace={_fmt(self.trace)} +- {_fmt(self.trace_stderr)}) vs {_fmt(self.sgd_threshold)} "
                         f"(ratio {self.sgd_ratio:.3f}) -> {self.sgd_verdict}")
        if self.simulated_losses is not None:
            lines.append(f"  simulated GD, {len(self.simulated_losses) - 1} steps: loss {_fmt(self.simulated_losses[0])}"
                         f" -> {_fmt(self.simulated_losses[-1])} (ratio {_fmt(self.simulated_loss_ratio)}, "
                         f"{'grew' if self.simulated_diverged else 'did not grow'})")
        return "\n".join(lines) + f"\n  matvecs={self.matvecs})"


def _gd_verdict(ratio: float) -> str:
    """Stable, at the edge (within 10%) or (locally) unstable, from ``lambda_max / threshold``."""
    if ratio > 1:
        return f"unstable: lambda_max above the threshold; {MEANING}"
    if ratio >= EDGE_BAND:
        return ("edge of stability: lambda_max within 10% of the threshold, where gradient descent on the "
                "quadratic model is barely stable along the top eigenvector and training typically hovers "
                "(Cohen et al. 2021)")
    return "stable"


def _sgd_verdict(estimate: float, stderr: float, threshold: float, batch_size: int) -> str:
    """Satisfied, violated or uncertain (two standard errors) for the SGD condition."""
    quantity = "trace" if batch_size == 1 else "tr/B + (1-1/B) lambda_max"
    if estimate - 2 * stderr > threshold:
        return (f"violated: {quantity} above 2/lr at batch size {batch_size}, so by the linearised (mean-square) "
                "condition SGD is locally unstable at this point; this is not a prediction of divergence"
                + (" (larger batches relax it)" if batch_size == 1 else ""))
    if estimate + 2 * stderr <= threshold:
        return (f"satisfied: {quantity} below 2/lr at batch size {batch_size} "
                "(necessary, not sufficient, for SGD stability)")
    return f"uncertain: 2/lr lies within two standard errors of {quantity} at batch size {batch_size}"


def _check_stability_arguments(op: Any, batch_size: int | None, simulate: int | None) -> Any:
    """The operator's objective (``None`` for a plain operator), after checking the arguments need none or have one."""
    objective = getattr(op, "objective", None)
    if batch_size is not None:
        check_positive("batch_size", batch_size, integer=True)
    elif objective is None:
        raise HesseError(
            f"stability(op, lr) with batch_size=None checks full-batch gradient descent, which needs the data's "
            f"size: pass a curvature operator with data (hesse.Hessian/GGN/Fisher), or, for a "
            f"{type(op).__name__}, the training batch size as batch_size=B."
        )
    if simulate is not None:
        check_positive("simulate", simulate, integer=True)
        if objective is None:
            raise HesseError(f"simulate= runs gradient descent on the loss, which a {type(op).__name__} does not "
                             "have; pass a curvature operator with data (hesse.Hessian/GGN/Fisher).")
    return objective


def simulate_gd(objective: Any, lr: float, steps: int, momentum: float = 0.0, dampening: float = 0.0,
                nesterov: bool = False) -> list[float]:
    """The full-data losses at the start and after each of ``steps`` full-batch gradient-descent steps.

    The steps follow ``torch.optim.SGD`` (``momentum``, ``dampening``, ``nesterov``; the first
    step's buffer is the gradient) and run on a copy of the parameter vector through
    ``objective.evaluate(at=theta, gradient=True)``: the model itself is never modified. The
    run stops early once the loss is no longer finite.
    """
    theta = objective.parameters_vector().clone()
    buffer = None
    losses: list[float] = []
    for _ in range(steps):
        evaluation = objective.evaluate(at=theta, gradient=True)
        losses.append(evaluation.loss)
        if not (math.isfinite(evaluation.loss) and bool(evaluation.gradient.isfinite().all())):
            return losses
        step = evaluation.gradient
        if momentum:
            buffer = step.clone() if buffer is None else momentum * buffer + (1 - dampening) * step
            step = step + momentum * buffer if nesterov else buffer
        theta = theta - lr * step
    losses.append(objective.evaluate(at=theta).loss)
    return losses


def _simulation_fields(losses: list[float] | None) -> dict[str, Any]:
    """``simulated_losses``, ``simulated_loss_ratio`` (last over first) and ``simulated_diverged`` (the loss grew)."""
    if losses is None:
        return {}
    ratio = losses[-1] / losses[0] if losses[0] > 0 else math.inf if losses[-1] > losses[0] else 1.0
    grew = not math.isfinite(losses[-1]) or not math.isfinite(ratio) or losses[-1] > losses[0]
    return dict(simulated_losses=losses, simulated_loss_ratio=ratio, simulated_diverged=grew)


def _full_batch_size(objective: Any) -> int | None:
    """The number of samples of the objective's data (one loss pass if no pass has counted them yet)."""
    if objective is None:
        return None
    if objective.num_samples is None:
        objective.loss()
    return objective.num_samples


# over 60 lines only through its docstring, which derives the SGD condition
def stability(
    op: Any,
    lr: float,
    *,
    batch_size: int | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    simulate: int | None = None,
    tol: float = 1e-4,
    trace_budget: int = 99,
    trace_method: str = "hutch++",
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool | None = None,
) -> StabilityResult:
    """Compare ``lambda_max`` with :func:`stability_threshold` (GD), ``tr(H)/B + (1-1/B) lambda_max`` with ``2/lr`` (SGD).

    What it means: the check is about the quadratic model of the loss at this point, not a
    prediction of divergence. Beyond the threshold (``lr > 2/lambda_max`` for plain GD),
    gradient descent is locally unstable along the top eigenvector of the quadratic model;
    in practice training often oscillates and self-stabilises at the edge of stability
    (Cohen et al. 2021: the sharpness falls back to the threshold), and diverges only well
    beyond it. ``simulate=steps`` checks empirically: it runs ``steps`` full-batch
    gradient-descent steps (with these momentum settings) from this point, through
    ``op.objective`` and without modifying the model (:func:`simulate_gd`), and reports the
    losses (``simulated_losses``), the last over the first (``simulated_loss_ratio``) and
    whether the loss grew (``simulated_diverged``).

    ``batch_size`` is the batch size ``B`` the model was (or will be) trained with; ``None``
    (the default) means full batch: the data's size, for a curvature operator with data (a
    plain operator then needs ``batch_size``). With full batch (or ``B`` at least the data's
    size) the SGD condition reduces to the GD one, so only the GD verdict is given and no
    trace is estimated. ``momentum``, ``dampening``, ``nesterov`` are those of
    ``torch.optim.SGD``; they only enter the GD check (and the simulation). Ratios above 1
    mean the threshold is exceeded. The SGD verdict accounts for the trace estimate's
    standard error (two-sigma rule, on ``stderr / B``; the error of ``lambda_max`` is
    ignored, it is far smaller).

    SGD condition. Near an interpolating minimum ``theta*`` (every per-sample gradient
    vanishes) an SGD step on the linearised dynamics is ``d <- (I - lr H_B) d`` with the
    mini-batch Hessian ``H_B = (1/B) sum_{i in batch} H_i`` (``H = E[H_i]``, samples drawn
    with replacement). Mean-square stability asks that ``E[(I - lr H_B)^2]`` does not
    expand, and::

        E[(I - lr H_B)^2] = I - 2 lr H + lr^2 [(1 - 1/B) H^2 + (1/B) E(H_i^2)].

    With ``H_i = g_i g_i^T`` (interpolation with MSE, or the Gauss-Newton part of the
    Hessian) and per-sample gradient norms all close to their mean,
    ``||g_i||^2 ~ E||g_i||^2 = tr(H)``, one gets ``E[H_i^2] = E[||g_i||^2 g_i g_i^T] ~ tr(H) H``.
    The matrix is then diagonal in the eigenbasis of ``H``, with value
    ``1 - lr lambda (2 - lr (tr(H)/B + (1 - 1/B) lambda))`` for eigenvalue ``lambda``;
    the top eigenvector is the most restrictive, so stability needs::

        tr(H)/B + (1 - 1/B) lambda_max <= 2 / lr.

    At ``B = 1`` this is exactly Wu & Su's (2023) condition ``tr(H) <= 2/lr``; as
    ``B -> infinity`` it becomes the GD condition ``lambda_max <= 2/lr``. For ``B > 1`` it
    is an approximation resting on the equal-norm assumption ``E[H_i^2] ~ tr(H) H``: if
    the samples with large gradients also dominate the top direction, ``E[H_i^2]`` is
    larger and the true condition stricter. Momentum is not taken into account here.
    Read it, like Wu & Su's, as a necessary condition for a minimum that SGD can stay at,
    not a sufficient one.

    Result: ``sgd_threshold = stability_threshold(lr, batch_size=B) = 2/lr``,
    ``sgd_quantity = tr/B + (1 - 1/B) lambda_max``, ``sgd_ratio = sgd_quantity / sgd_threshold``.
    """
    gd_threshold = stability_threshold(lr, momentum, dampening, nesterov)
    objective = _check_stability_arguments(op, batch_size, simulate)
    top = eigenvalues(op, k=1, which="largest", tol=tol, seed=seed, check_symmetric=check_symmetric,
                      progress=progress)
    lam = float(top.values[0])
    num_samples = _full_batch_size(objective)
    full_batch = batch_size is None or (num_samples is not None and batch_size >= num_samples)
    sgd = {} if full_batch else _sgd_fields(op, lr, int(batch_size), lam, trace_method, trace_budget, seed, progress)
    trace_matvecs = sgd.pop("matvecs", 0)
    losses = None if simulate is None else simulate_gd(objective, lr, simulate, momentum, dampening, nesterov)
    gd_ratio = lam / gd_threshold
    return StabilityResult(
        lr=float(lr), momentum=float(momentum), batch_size=None if batch_size is None else int(batch_size),
        gd_threshold=gd_threshold, top_eigenvalue=lam, top_converged=bool(top.converged[0]), gd_ratio=gd_ratio,
        gd_verdict=_gd_verdict(gd_ratio), **{**dict.fromkeys(SGD_FIELDS), **sgd},
        matvecs=top.matvecs + trace_matvecs, dampening=float(dampening),
        nesterov=bool(nesterov), full_batch=full_batch, num_samples=num_samples, **_simulation_fields(losses),
    )


def _sgd_fields(op: Any, lr: float, batch_size: int, lam: float, method: str, budget: int, seed: int,
                progress: bool | None) -> dict[str, Any]:
    """The trace estimate and the mini-batch SGD condition at batch size ``batch_size`` (and the trace's products)."""
    threshold = stability_threshold(lr, batch_size=batch_size)
    tr = trace(op, method, budget=budget, seed=seed, check_symmetric=False, progress=progress)
    quantity = tr.estimate / batch_size + (1 - 1 / batch_size) * lam
    return dict(sgd_threshold=threshold, trace=tr.estimate, trace_stderr=tr.stderr, sgd_quantity=quantity,
                sgd_ratio=quantity / threshold, sgd_verdict=_sgd_verdict(quantity, tr.stderr / batch_size, threshold,
                                                                        batch_size), matvecs=tr.matvecs)


@dataclass(repr=False)
class BatchSharpnessResult(_ResultMixin):
    """Top eigenvalue of mini-batch operators per batch size.

    ``values[i]``: the ``repeats`` top eigenvalues for ``batch_sizes[i]``; ``max_stable_lr``:
    ``2 / mean``; ``fit``: least-squares ``lambda(B) ~ a + c / B`` (``a``: the large-batch limit).
    ``interrupted``: Ctrl-C stopped the sweep; only the sizes measured so far are listed.
    """

    batch_sizes: list[int]
    values: list[list[float]]
    mean: list[float]
    std: list[float]
    max_stable_lr: list[float]
    fit: dict[str, float]
    matvecs: int
    interrupted: bool = False

    def __repr__(self) -> str:
        rows = "\n".join(
            f"  B={b:>6d}: lambda_max={_fmt(m)} +- {_fmt(s)}  (2/lambda={_fmt(lr)})"
            for b, m, s, lr in zip(self.batch_sizes, self.mean, self.std, self.max_stable_lr)
        )
        flag = " INTERRUPTED" if self.interrupted else ""
        return (f"BatchSharpnessResult(fit lambda(B) ~ {_fmt(self.fit['a'])} + {_fmt(self.fit['c'])}/B,"
                f" matvecs={self.matvecs}{flag}\n{rows})")


def _batch_sharpness_result(sizes: list[int], values: list[list[float]], matvecs: int) -> BatchSharpnessResult:
    """Means, spreads, ``2 / mean`` and the fit ``lambda(B) ~ a + c / B`` of the measured sizes."""
    sizes = sizes[:len(values)]
    mean = [float(np.mean(v)) for v in values]
    std = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    if len(set(sizes)) >= 2:
        X = np.stack([np.ones(len(sizes)), 1 / np.array(sizes, dtype=float)], 1)
        (a, c), *_ = np.linalg.lstsq(X, np.array(mean), rcond=None)
    else:
        a, c = (mean[0] if mean else math.nan), math.nan
    lrs = [2 / m if m > 0 else math.inf for m in mean]
    return BatchSharpnessResult(sizes, values, mean, std, lrs, {"a": float(a), "c": float(c)}, matvecs)


def batch_size_sharpness(
    make_op: Callable[..., Any],
    batch_sizes: Iterable[int],
    *,
    repeats: int = 3,
    tol: float = 1e-3,
    seed: int = 0,
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> BatchSharpnessResult:
    """Top eigenvalue of mini-batch curvature as a function of the batch size (Granziol et al. 2022).

    ``make_op(batch_size)`` or ``make_op(batch_size, seed)`` must return an operator for a
    freshly drawn mini-batch of that size (e.g. ``hesse.Hessian`` on one batch); it is
    called ``repeats`` times per size (seeds ``seed, seed+1, ...``), so the model code stays
    outside this function. Ctrl-C: see :mod:`hesse.errors` (the partial result holds the
    sizes completed so far).
    """
    if not callable(make_op):
        raise HesseError("make_op must be a callable batch_size -> operator, e.g. "
                         "lambda b: hesse.Hessian(model, loss, sample_batch(b)).")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b <= 0 for b in sizes):
        raise HesseError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}.")
    check_positive("repeats", repeats, integer=True)
    check_on_interrupt(on_interrupt)
    takes_seed = len(inspect.signature(make_op).parameters) >= 2
    values: list[list[float]] = []
    matvecs = 0
    try:
        for b in sizes:
            row = []
            for r in range(repeats):
                op = make_op(b, seed + r) if takes_seed else make_op(b)
                res = eigenvalues(op, k=1, tol=tol, seed=seed + r, progress=progress)
                if getattr(res, "interrupted", False):  # the solver stopped on Ctrl-C and returned
                    raise KeyboardInterrupt
                row.append(float(res.values[0]))
                matvecs += res.matvecs
            values.append(row)
    except KeyboardInterrupt as error:
        return interrupted(error, _batch_sharpness_result(sizes, values, matvecs), on_interrupt,
                           "batch_size_sharpness")
    return _batch_sharpness_result(sizes, values, matvecs)
