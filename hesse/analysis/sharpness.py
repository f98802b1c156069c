"""Sharpness of a minimum: how much the full-data loss ``L`` rises near the weights ``w``.

One entry point, :func:`sharpness`, with ``measure=``:

* ``"eigenvalue"``: ``λ_max(∇²L(w))``, the top Hessian eigenvalue (Keskar et al. 2017;
  Cohen et al. 2021 call it *the* sharpness); via :func:`hesse.linalg.eigenvalues`.
* ``"trace"``: ``tr ∇²L(w)`` (Hutchinson 1989; Meyer et al. 2021, Hutch++); via
  :func:`hesse.linalg.trace`.
* ``"worst"``: ``max_{||ε|| <= ρ} L(w + ε) - L(w)`` in an L2 or L∞ ball, by projected gradient
  ascent with restarts (Keskar, Mudigere, Nocedal, Smelyanskiy & Tang 2017, "On Large-Batch
  Training for Deep Learning"; Foret, Kleiner, Mobahi & Neyshabur 2021, "Sharpness-Aware
  Minimization"). A lower bound of the true maximum (ascent finds a local one).
* ``"adaptive"``: ``max_{||ε / (|w| + η)|| <= ρ} L(w + ε) - L(w)``, scale-invariant under
  rescaling of layers (Kwon, Kim, Park & Choi 2021, "ASAM: Adaptive Sharpness-Aware Minimization").
* ``"average"``: ``E_{ε ~ N(0, σ² I)} L(w + ε) - L(w)`` by Monte Carlo with antithetic pairs
  ``±ε`` (odd Taylor terms cancel; Jiang et al. 2020, "Fantastic Generalization Measures").
  For a quadratic it equals ``σ² tr(H) / 2``.
* ``"sam"``: ``L(w + ρ g / ||g||) - L(w)`` with ``g = ∇L(w)``, SAM's one-step (first-order)
  estimate of the worst case (Foret et al. 2021).

Every measure evaluates the model in eval mode and restores its weights, buffers and modes
bit-for-bit afterwards (also on error or Ctrl-C).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hesse.errors import HesseError
from hesse.analysis.landscape import Evaluator, preserved
from hesse.operators.objective import ParamSpec
from hesse.operators.data import Batch, ForwardFn
from hesse.results import _ResultMixin

__all__ = ["MEASURES", "SharpnessResult", "sharpness"]

MEASURES = ("worst", "adaptive", "average", "sam", "eigenvalue", "trace")
NORMS = ("l2", "linf")


@dataclass(repr=False)
class SharpnessResult(_ResultMixin):
    """A sharpness value with how it was measured.

    ``value`` is the measure (a loss increase, an eigenvalue or a trace); ``base_loss`` is
    ``L(w)``; ``stderr`` is the Monte Carlo / stochastic standard error (``None`` when the
    measure is deterministic); ``cost`` counts data passes (loss/gradient evaluations) or
    Hessian-vector products; ``details`` holds the measure's settings and extras.
    ``perturbation`` (not in ``to_dict``) is the maximising ``ε`` for worst/adaptive/sam.
    """

    measure: str
    value: float
    base_loss: float
    stderr: float | None = None
    cost: int = 0
    details: dict = field(default_factory=dict)
    perturbation: torch.Tensor | None = None
    _skip_in_dict = ("perturbation",)

    def __repr__(self) -> str:
        err = f" +- {self.stderr:.3g}" if self.stderr is not None else ""
        return (f"SharpnessResult({self.measure}={self.value:.6g}{err}, base_loss={self.base_loss:.6g}, "
                f"cost={self.cost})")


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


def _worst_case(
    ev: Evaluator, w0: torch.Tensor, scale: torch.Tensor, base: float, g0: torch.Tensor,
    rho: float, norm: str, steps: int, restarts: int, step_size: float, gen: torch.Generator, progress: bool,
) -> tuple[float, torch.Tensor]:
    """Projected gradient ascent on ``δ ↦ L(w0 + scale ⊙ δ)`` over the ``ρ``-ball of ``δ``.

    Step ``δ ← Π(δ + step_size · ρ · u)`` with ``u`` the steepest-ascent unit step of the norm
    for the gradient ``scale ⊙ ∇L``. Restart 0 starts at ``δ = 0`` (first step = SAM's, or
    random if ``∇L(w0) = 0``), the others at random points. Returns the best loss seen and
    its ``ε = scale ⊙ δ``.
    """
    best, best_eps = base, torch.zeros_like(w0)
    P = w0.numel()
    with tqdm(total=restarts * steps, desc="worst-case sharpness", disable=not progress, leave=False) as bar:
        for r in range(restarts):
            if r == 0 and float((scale * g0).abs().max()) > 0:
                delta, g = torch.zeros_like(w0), g0
            else:
                delta = _random_start(P, rho, norm, gen, w0)
                ev.flat.set(w0 + scale * delta)
                loss, _, g = ev(grad=True)
                if loss > best:
                    best, best_eps = loss, scale * delta
            for _ in range(steps):
                delta = _project(delta + step_size * rho * _ascent_direction(scale * g, norm), rho, norm)
                ev.flat.set(w0 + scale * delta)
                loss, _, g = ev(grad=True)
                bar.update(1)
                if not math.isfinite(loss):
                    raise HesseError(f"the loss is {loss} at a perturbation of radius {rho}; use a smaller rho.")
                if loss > best:
                    best, best_eps = loss, scale * delta
    return best, best_eps


def sharpness(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, Any], torch.Tensor],
    data: Any,
    measure: str = "worst",
    *,
    rho: float = 0.05,
    norm: str = "l2",
    steps: int = 10,
    restarts: int = 1,
    step_size: float = 1.0,
    eta: float = 0.0,
    sigma: float = 0.01,
    samples: int = 20,
    k: int = 1,
    tol: float = 1e-3,
    budget: int | None = None,
    params: ParamSpec = None,
    forward: ForwardFn | None = None,
    num_samples: Callable[[Batch], int] | None = None,
    reduction: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SharpnessResult:
    """Measure the sharpness of ``model`` at its current weights (see the module docstring).

    ``measure``: ``"worst"``, ``"adaptive"``, ``"average"``, ``"sam"``, ``"eigenvalue"``, ``"trace"``.
    ``rho``: radius of the ball (worst, adaptive, sam); ``norm``: ``"l2"`` or ``"linf"`` (worst,
    adaptive); ``steps`` ascent steps per restart, ``restarts`` starts (the first from ``w``,
    the others random), ``step_size`` in units of ``rho``; ``eta``: ASAM's offset in the scale
    ``|w| + η``; ``sigma``, ``samples``: noise level and number of antithetic pairs (average);
    ``k``, ``tol``: eigenvalues to compute and their tolerance (eigenvalue: ``value`` is the top
    one, all ``k`` in ``details``); ``budget``: products for the trace estimator; ``params``
    selects the parameters perturbed (default all trainable; frozen ones named explicitly are
    perturbed too, their ``requires_grad`` left as it was); ``reduction``: ``"mean"`` or ``"sum"``,
    how ``criterion`` reduces over a batch (default ``criterion.reduction``, ``"mean"`` for a
    plain function), so ``L`` is the full-data mean or sum; ``seed`` makes restarts, noise and
    probes reproducible.
    """
    if measure not in MEASURES:
        raise HesseError(f"unknown sharpness measure {measure!r}; choose one of {MEASURES}.")
    if norm not in NORMS:
        raise HesseError(f"unknown norm {norm!r}; choose 'l2' or 'linf'.")
    for name, value in (("rho", rho), ("sigma", sigma), ("step_size", step_size)):
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise HesseError(f"{name} must be a positive number, got {value!r}.")
    for name, value in (("steps", steps), ("restarts", restarts), ("samples", samples), ("k", k)):
        if not (isinstance(value, int) and value >= 1):
            raise HesseError(f"{name} must be a positive integer, got {value!r}.")
    ev = Evaluator(model, criterion, data, params=params, forward=forward, num_samples=num_samples,
                   reduction=reduction)
    gen = torch.Generator().manual_seed(seed)
    with preserved(model):
        model.eval()
        if measure in ("eigenvalue", "trace"):
            return _curvature_measure(model, criterion, data, measure, k=k, tol=tol, budget=budget,
                                      params=params, forward=forward, num_samples=num_samples,
                                      reduction=ev.reduction, seed=seed, progress=progress)
        w0 = ev.flat.get()
        if measure == "average":
            base, _, _ = ev()
            diffs = []
            for _ in tqdm(range(samples), desc="average sharpness", disable=not progress, leave=False):
                eps = (torch.randn(w0.numel(), generator=gen, dtype=torch.float64) * sigma).to(w0)
                ev.flat.set(w0 + eps)
                plus, _, _ = ev()
                ev.flat.set(w0 - eps)
                minus, _, _ = ev()
                diffs.append((plus + minus) / 2 - base)
            d = np.asarray(diffs)
            stderr = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
            return SharpnessResult("average", float(d.mean()), base, stderr, ev.passes,
                                   {"sigma": sigma, "samples": samples, "antithetic": True, "seed": seed})
        base, _, g0 = ev(grad=True)
        assert g0 is not None
        if measure == "sam":
            gnorm = float(g0.norm())
            if gnorm == 0:
                raise HesseError("the gradient is exactly zero, so SAM's ascent direction is undefined; "
                                 "use measure='worst' (random restarts) instead.")
            eps = g0 * (rho / gnorm)
            ev.flat.set(w0 + eps)
            loss, _, _ = ev()
            return SharpnessResult("sam", loss - base, base, None, ev.passes,
                                   {"rho": rho, "gradient_norm": gnorm}, eps)
        scale = torch.ones_like(w0) if measure == "worst" else w0.abs() + eta
        best, eps = _worst_case(ev, w0, scale, base, g0, rho, norm, steps, restarts, step_size, gen, progress)
        details = {"rho": rho, "norm": norm, "steps": steps, "restarts": restarts, "step_size": step_size,
                   "perturbation_norm": float(eps.norm() if norm == "l2" else eps.abs().max())}
        if measure == "adaptive":
            details["eta"] = eta
        return SharpnessResult(measure, best - base, base, None, ev.passes, details, eps)


def _curvature_measure(
    model: nn.Module, criterion, data, measure: str, *, k: int, tol: float,
    budget: int | None, params: ParamSpec, forward, num_samples, reduction: str, seed: int, progress: bool,
) -> SharpnessResult:
    """Top Hessian eigenvalue(s) or the Hessian trace, via :mod:`hesse.linalg`."""
    from hesse.linalg import eigenvalues, trace
    from hesse.operators import Hessian

    H = Hessian(model, criterion, data, params=params, forward=forward, num_samples=num_samples,
                reduction=reduction)
    base = H.loss()
    if measure == "eigenvalue":
        res = eigenvalues(H, k=k, which="largest", tol=tol, seed=seed, progress=progress)
        return SharpnessResult("eigenvalue", float(res.values[0]), base, None, res.matvecs,
                               {"eigenvalues": res.values.tolist(), "residuals": res.residuals.tolist(),
                                "converged": res.converged.tolist(), "tol": tol, "unit": "matvecs"})
    res = trace(H, budget=budget, seed=seed, progress=progress)
    return SharpnessResult("trace", float(res.estimate), base, float(res.stderr), res.matvecs,
                           {"method": res.method, "budget": budget, "unit": "matvecs"})
