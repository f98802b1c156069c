"""Sharpness of a minimum: how much the full-data loss ``L`` rises near the weights ``w``.

One function per measure, each returning a :class:`SharpnessResult`:

* :func:`eigenvalue_sharpness`: ``λ_max(∇²L(w))``, the top Hessian eigenvalue (Keskar et al.
  2017; Cohen et al. 2021 call it *the* sharpness); via :func:`hesse.linalg.eigenvalues`.
* :func:`trace_sharpness`: ``tr ∇²L(w)`` (Hutchinson 1989; Meyer et al. 2021, Hutch++); via
  :func:`hesse.linalg.trace`.
* :func:`worst_case_sharpness`: ``max_{||ε|| <= ρ} L(w + ε) - L(w)`` in an L2 or L∞ ball, by
  projected gradient ascent with restarts (Keskar, Mudigere, Nocedal, Smelyanskiy & Tang 2017,
  "On Large-Batch Training for Deep Learning"; Foret, Kleiner, Mobahi & Neyshabur 2021,
  "Sharpness-Aware Minimization"). A lower bound of the true maximum (ascent finds a local one).
* :func:`adaptive_sharpness`: ``max_{||ε / (|w| + η)|| <= ρ} L(w + ε) - L(w)``, invariant under
  rescaling of layers (Kwon, Kim, Park & Choi 2021, "ASAM: Adaptive Sharpness-Aware Minimization").
* :func:`average_sharpness`: ``E_{ε ~ N(0, σ² I)} L(w + ε) - L(w)`` by Monte Carlo with antithetic
  pairs ``±ε`` (odd Taylor terms cancel; Jiang et al. 2020, "Fantastic Generalization Measures").
  For a quadratic it equals ``σ² tr(H) / 2``.
* :func:`sam_sharpness`: ``L(w + ρ g / ||g||) - L(w)`` with ``g = ∇L(w)``, SAM's one-step
  (first-order) estimate of the worst case (Foret et al. 2021).

Each takes an :class:`hesse.Objective`, or ``(model, criterion, data, **settings)`` with the
Objective's settings (``params``, ``forward``, ``num_samples``, ``reduction``, ...). Perturbed
points are evaluated with :meth:`hesse.Objective.evaluate` in eval mode: the model's weights,
buffers and ``.grad`` are never written, and every module's mode is restored.
Ctrl-C: see :mod:`hesse.errors` (partial results carry ``interrupted=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hesse._progress import progress_bar
from hesse.analysis.landscape import eval_mode, objective_in_eval_mode
from hesse.errors import HesseError, check_on_interrupt, interrupted
from hesse.linalg import eigenvalues, trace
from hesse.linalg.checks import check_positive
from hesse.operators.objective import Objective
from hesse.results import _ResultMixin

__all__ = ["SharpnessResult", "adaptive_sharpness", "average_sharpness", "eigenvalue_sharpness",
           "sam_sharpness", "trace_sharpness", "worst_case_sharpness"]

NORMS = ("l2", "linf")
Model = nn.Module | Objective


@dataclass(repr=False)
class SharpnessResult(_ResultMixin):
    """A sharpness value with how it was measured.

    ``measure`` is ``"worst"``, ``"adaptive"``, ``"average"``, ``"sam"``, ``"eigenvalue"`` or
    ``"trace"``; ``value`` the measure (a loss increase, an eigenvalue or a trace); ``base_loss``
    is ``L(w)``; ``stderr`` the Monte Carlo / stochastic standard error (``None`` when the
    measure is deterministic); ``cost`` counts data passes (loss/gradient evaluations) or
    Hessian-vector products (``details["unit"] == "matvecs"``); ``details`` holds the settings
    and extras. ``perturbation`` (not in ``to_dict``) is the maximising ``ε`` (worst/adaptive/sam).
    """

    measure: str
    value: float
    base_loss: float
    stderr: float | None = None
    cost: int = 0
    details: dict = field(default_factory=dict)
    perturbation: torch.Tensor | None = None
    interrupted: bool = False
    _skip_in_dict = ("perturbation",)

    def __repr__(self) -> str:
        err = f" +- {self.stderr:.3g}" if self.stderr is not None else ""
        flag = " INTERRUPTED" if self.interrupted else ""
        return (f"SharpnessResult({self.measure}={self.value:.6g}{err}, base_loss={self.base_loss:.6g}, "
                f"cost={self.cost}{flag})")


# ---- checks -------------------------------------------------------------------------------------
def _check_ball(rho: float, norm: str, steps: int, restarts: int, step_size: float) -> None:
    """Refuse an unknown norm and non-positive radius, step size, steps or restarts."""
    if norm not in NORMS:
        raise HesseError(f"unknown norm {norm!r}; choose 'l2' or 'linf'.")
    for name, value in (("rho", rho), ("step_size", step_size)):
        check_positive(name, value)
    for name, value in (("steps", steps), ("restarts", restarts)):
        check_positive(name, value, integer=True)


# ---- worst case in a ball (plain or adaptive) ---------------------------------------------------
def _project(delta: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    """Euclidean projection onto ``{||δ||_2 <= ρ}`` or ``{||δ||_∞ <= ρ}``."""
    if norm == "linf":
        return delta.clamp(-rho, rho)
    n = float(delta.norm())
    return delta * (rho / n) if n > rho else delta


def _ascent_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step for the norm: ``g / ||g||_2`` (L2) or ``sign(g)`` (L∞)."""
    if norm == "linf":
        return torch.sign(g)
    return g / g.norm().clamp_min(torch.finfo(g.dtype).tiny)


def _random_start(P: int, rho: float, norm: str, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A random point: on the L2 sphere of radius ``ρ``, or uniform in the L∞ box."""
    if norm == "linf":
        z = (torch.rand(P, generator=gen, dtype=torch.float64) * 2 - 1) * rho
    else:
        z = torch.randn(P, generator=gen, dtype=torch.float64)
        z = z * (rho / z.norm())
    return z.to(like.dtype).to(like.device)


def _try_point(objective: Objective, w0: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor, rho: float,
               best: dict[str, Any]) -> torch.Tensor:
    """Evaluate ``L(w0 + scale ⊙ δ)`` with its gradient; keep it in ``best`` if higher; return ``scale ⊙ ∇L``."""
    evaluation = objective.evaluate(at=w0 + scale * delta, gradient=True)
    if not math.isfinite(evaluation.loss):
        raise HesseError(f"the loss is {evaluation.loss} at a perturbation of radius {rho}; use a smaller rho.")
    if evaluation.loss > best["loss"]:
        best.update(loss=evaluation.loss, eps=scale * delta)
    return scale * evaluation.gradient.detach()  # with unselected trainable parameters it carries their graph


def _ascent(objective: Objective, w0: torch.Tensor, scale: torch.Tensor, g0: torch.Tensor, rho: float, norm: str,
            steps: int, restarts: int, step_size: float, seed: int, progress: bool | None,
            best: dict[str, Any]) -> None:
    """Projected gradient ascent on ``δ ↦ L(w0 + scale ⊙ δ)`` over the ``ρ``-ball of ``δ``.

    Step ``δ ← Π(δ + step_size · ρ · u)`` with ``u`` the steepest-ascent unit step of the norm
    for the gradient ``scale ⊙ ∇L``. Restart 0 starts at ``δ = 0`` (first step = SAM's, or
    random if ``∇L(w0) = 0``), the others at random points. ``best`` keeps the highest loss
    seen and its ``ε = scale ⊙ δ``.
    """
    gen = torch.Generator().manual_seed(seed)
    with progress_bar(total=restarts * steps, desc="worst-case sharpness", enabled=progress, unit="step") as bar:
        for r in range(restarts):
            if r == 0 and float((scale * g0).abs().max()) > 0:
                delta, g = torch.zeros_like(w0), scale * g0
            else:
                delta = _random_start(w0.numel(), rho, norm, gen, w0)
                g = _try_point(objective, w0, scale, delta, rho, best)
            for _ in range(steps):
                delta = _project(delta + step_size * rho * _ascent_direction(g, norm), rho, norm)
                g = _try_point(objective, w0, scale, delta, rho, best)
                bar.update(1)


def _ball_sharpness(measure: str, objective: Objective, eta: float | None, rho: float, norm: str, steps: int,
                    restarts: int, step_size: float, seed: int, progress: bool | None,
                    on_interrupt: str) -> SharpnessResult:
    """Worst case in the ball ``||ε||`` (``eta=None``) or ``||ε / (|w| + η)||`` (adaptive) ``<= ρ``."""
    _check_ball(rho, norm, steps, restarts, step_size)
    check_on_interrupt(on_interrupt)
    details: dict[str, Any] = {"rho": rho, "norm": norm, "steps": steps, "restarts": restarts,
                               "step_size": step_size}
    if eta is not None:
        details["eta"] = eta
    passes = objective.passes
    best: dict[str, Any] = {"base": math.nan, "loss": math.nan, "eps": None}

    def result() -> SharpnessResult:
        """The best loss rise found so far."""
        eps = best["eps"]
        if eps is not None:
            details["perturbation_norm"] = float(eps.norm() if norm == "l2" else eps.abs().max())
        return SharpnessResult(measure, best["loss"] - best["base"], best["base"], None, objective.passes - passes,
                               details, eps)

    try:
        with eval_mode(objective.model):
            w0 = objective.parameters_vector()
            first = objective.evaluate(gradient=True)
            best.update(base=first.loss, loss=first.loss, eps=torch.zeros_like(w0))
            scale = torch.ones_like(w0) if eta is None else w0.abs() + eta
            _ascent(objective, w0, scale, first.gradient.detach(), rho, norm, steps, restarts, step_size, seed,
                    progress, best)
    except KeyboardInterrupt as error:
        return interrupted(error, result(), on_interrupt, f"{measure} sharpness")
    return result()


def worst_case_sharpness(
    model: Model, criterion: Callable | None = None, data: Any = None, *, rho: float = 0.05, norm: str = "l2",
    steps: int = 10, restarts: int = 1, step_size: float = 1.0, seed: int = 0, progress: bool | None = None,
    on_interrupt: str = "raise", **settings: Any,
) -> SharpnessResult:
    """``max_{||ε|| <= ρ} L(w + ε) - L(w)`` (Keskar et al. 2017; Foret et al. 2021), a lower bound.

    ``norm``: ``"l2"`` or ``"linf"``; ``steps`` ascent steps per start, ``restarts`` starts (the
    first from ``w``, the others random points of the ball, drawn with ``seed``), ``step_size``
    in units of ``ρ``. ``perturbation`` is the maximising ``ε``; ``cost`` counts data passes.
    For a quadratic ``L = ½ εᵀAε`` at its minimum the L2 value is ``ρ² λ_max(A) / 2``.
    """
    objective = objective_in_eval_mode(model, criterion, data, **settings)
    return _ball_sharpness("worst", objective, None, rho, norm, steps, restarts, step_size, seed, progress,
                           on_interrupt)


def adaptive_sharpness(
    model: Model, criterion: Callable | None = None, data: Any = None, *, rho: float = 0.05, eta: float = 0.0,
    norm: str = "l2", steps: int = 10, restarts: int = 1, step_size: float = 1.0, seed: int = 0,
    progress: bool | None = None, on_interrupt: str = "raise", **settings: Any,
) -> SharpnessResult:
    """``max_{||ε / (|w| + η)|| <= ρ} L(w + ε) - L(w)`` (Kwon et al. 2021, ASAM): unchanged when a
    layer's weights are rescaled. Other arguments as in :func:`worst_case_sharpness`."""
    objective = objective_in_eval_mode(model, criterion, data, **settings)
    return _ball_sharpness("adaptive", objective, float(eta), rho, norm, steps, restarts, step_size, seed,
                           progress, on_interrupt)


# ---- average and SAM ----------------------------------------------------------------------------
def average_sharpness(
    model: Model, criterion: Callable | None = None, data: Any = None, *, sigma: float = 0.01, samples: int = 20,
    seed: int = 0, progress: bool | None = None, on_interrupt: str = "raise", **settings: Any,
) -> SharpnessResult:
    """``E_{ε ~ N(0, σ² I)} L(w + ε) - L(w)`` (Jiang et al. 2020) from ``samples`` antithetic pairs.

    Each pair gives ``(L(w + ε) + L(w - ε)) / 2 - L(w)`` (odd Taylor terms cancel); ``value``
    is their mean, ``stderr`` its standard error; noise is drawn in float64 from ``seed``.
    For a quadratic the expectation is ``σ² tr(∇²L) / 2``.
    """
    check_positive("sigma", sigma)
    check_positive("samples", samples, integer=True)
    check_on_interrupt(on_interrupt)
    objective = objective_in_eval_mode(model, criterion, data, **settings)
    passes, gen, diffs = objective.passes, torch.Generator().manual_seed(seed), []
    base = math.nan

    def result() -> SharpnessResult:
        """Mean and standard error of the pairs drawn so far."""
        d = np.asarray(diffs)
        stderr = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
        return SharpnessResult("average", float(d.mean()) if len(d) else math.nan, base, stderr,
                               objective.passes - passes,
                               {"sigma": sigma, "samples": samples, "antithetic": True, "seed": seed})

    try:
        with eval_mode(objective.model):
            w0 = objective.parameters_vector()
            base = objective.evaluate().loss
            for _ in progress_bar(range(samples), total=samples, desc="average sharpness", enabled=progress):
                eps = (torch.randn(w0.numel(), generator=gen, dtype=torch.float64) * sigma).to(w0)
                plus, minus = objective.evaluate(at=w0 + eps).loss, objective.evaluate(at=w0 - eps).loss
                diffs.append((plus + minus) / 2 - base)
    except KeyboardInterrupt as error:
        return interrupted(error, result(), on_interrupt, "average sharpness")
    return result()


def sam_sharpness(
    model: Model, criterion: Callable | None = None, data: Any = None, *, rho: float = 0.05,
    on_interrupt: str = "raise", **settings: Any,
) -> SharpnessResult:
    """``L(w + ρ g / ||g||) - L(w)`` with ``g = ∇L(w)``: SAM's first-order worst case (Foret et al. 2021).

    Two data passes. ``details["gradient_norm"]`` is ``||g||``; ``perturbation`` is ``ε = ρ g / ||g||``.
    """
    check_positive("rho", rho)
    check_on_interrupt(on_interrupt)
    objective = objective_in_eval_mode(model, criterion, data, **settings)
    passes = objective.passes
    partial = SharpnessResult("sam", math.nan, math.nan, None, 0, {"rho": rho})
    try:
        with eval_mode(objective.model):
            first = objective.evaluate(gradient=True)
            partial.base_loss = first.loss
            gradient = first.gradient.detach()  # with unselected trainable parameters it is attached to their graph
            gnorm = float(gradient.norm())
            if gnorm == 0:
                raise HesseError("the gradient is exactly zero, so SAM's ascent direction is undefined; "
                                 "use worst_case_sharpness (random restarts) instead.")
            eps = gradient * (rho / gnorm)
            loss = objective.evaluate(at=objective.parameters_vector() + eps).loss
    except KeyboardInterrupt as error:
        partial.cost = objective.passes - passes
        return interrupted(error, partial, on_interrupt, "SAM sharpness")
    return SharpnessResult("sam", loss - first.loss, first.loss, None, objective.passes - passes,
                           {"rho": rho, "gradient_norm": gnorm}, eps)


# ---- curvature --------------------------------------------------------------------------------
def _spectral(objective: Objective, measure: str, solve: Callable[[Any], Any],
              to_result: Callable[[Any, float], SharpnessResult], on_interrupt: str) -> SharpnessResult:
    """Run ``solve(Hessian)`` in eval mode and convert with ``to_result(solver result, L(w))``.

    A solver that catches Ctrl-C returns a result marked ``interrupted`` (or re-raises with
    ``error.partial``); either way the interrupt goes on through :func:`hesse.errors.interrupted`.
    """
    from hesse.operators import Hessian

    check_on_interrupt(on_interrupt)
    base = math.nan
    try:
        with eval_mode(objective.model):
            base = objective.loss()
            res = solve(Hessian(objective))
    except KeyboardInterrupt as error:
        partial = getattr(error, "partial", None)
        empty = SharpnessResult(measure, math.nan, base, None, 0, {"unit": "matvecs"})
        return interrupted(error, to_result(partial, base) if partial is not None else empty, on_interrupt,
                           f"{measure} sharpness")
    if getattr(res, "interrupted", False):
        return interrupted(KeyboardInterrupt(), to_result(res, base), on_interrupt, f"{measure} sharpness")
    return to_result(res, base)


def eigenvalue_sharpness(
    model: Model, criterion: Callable | None = None, data: Any = None, *, k: int = 1, tol: float = 1e-3,
    seed: int = 0, progress: bool | None = None, on_interrupt: str = "raise", **settings: Any,
) -> SharpnessResult:
    """``λ_max(∇²L(w))`` (Keskar et al. 2017; Cohen et al. 2021) by :func:`hesse.linalg.eigenvalues`.

    ``value`` is the top eigenvalue; the top ``k`` (to relative tolerance ``tol``), their
    residuals and convergence flags are in ``details``; ``cost`` counts Hessian-vector products.
    """
    check_positive("k", k, integer=True)
    objective = objective_in_eval_mode(model, criterion, data, **settings)

    def to_result(res: Any, base: float) -> SharpnessResult:
        """The top eigenvalue of an :class:`~hesse.linalg.EigenResult`."""
        return SharpnessResult("eigenvalue", float(res.values[0]), base, None, res.matvecs,
                               {"eigenvalues": res.values.tolist(), "residuals": res.residuals.tolist(),
                                "converged": res.converged.tolist(), "tol": tol, "unit": "matvecs"})

    return _spectral(objective, "eigenvalue",
                     lambda H: eigenvalues(H, k=k, which="largest", tol=tol, seed=seed, progress=progress),
                     to_result, on_interrupt)


def trace_sharpness(
    model: Model, criterion: Callable | None = None, data: Any = None, *, budget: int | None = None,
    seed: int = 0, progress: bool | None = None, on_interrupt: str = "raise", **settings: Any,
) -> SharpnessResult:
    """``tr ∇²L(w)`` (Hutchinson 1989; Meyer et al. 2021) by :func:`hesse.linalg.trace` (Hutch++).

    ``budget`` Hessian-vector products (the trace's default when ``None``); ``stderr`` is the
    estimator's standard error; ``cost`` counts products.
    """
    objective = objective_in_eval_mode(model, criterion, data, **settings)

    def to_result(res: Any, base: float) -> SharpnessResult:
        """The estimate of a :class:`~hesse.linalg.TraceResult`."""
        return SharpnessResult("trace", float(res.estimate), base, float(res.stderr), res.matvecs,
                               {"method": res.method, "budget": budget, "unit": "matvecs"})

    return _spectral(objective, "trace", lambda H: trace(H, budget=budget, seed=seed, progress=progress),
                     to_result, on_interrupt)
