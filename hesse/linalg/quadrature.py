"""Spectral density by stochastic Lanczos quadrature (SLQ).

Lin, Saad & Yang 2016 ("Approximating Spectral Densities of Large Matrices"); Ghorbani,
Krishnan & Xiao 2019 ("An Investigation into Neural Net Optimization via Hessian
Eigenvalue Density"). For a unit probe ``q``, ``m`` Lanczos steps give the Gauss quadrature
``q^T f(A) q ~ sum_j tau_j f(theta_j)`` (Ritz values ``theta_j``, weights ``tau_j`` = squared
first components of the Ritz vectors), exact for polynomials of degree ``< 2m``. With
isotropic probes ``E[q^T f(A) q] = tr f(A) / P``, so averaging over probes and smoothing each
node with a Gaussian gives the spectral density ``(1/P) sum_i delta(t - lambda_i)``. All probes
run their recurrences together (:mod:`hesse.linalg.lanczos`): each step is ONE operator call
with ``num_probes`` columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hesse._progress import progress_bar
from hesse.errors import HesseError, check_on_interrupt, interrupted
from hesse.linalg.checks import check_positive, prepare_operator
from hesse.linalg.lanczos import Lanczos, gauss_quadrature, krylov_steps
from hesse.linalg.probes import isotropic_probes
from hesse.operators import LinearOperator
from hesse.results import _fmt, _ResultMixin

DEFAULT_PROBES = 4
DEFAULT_STEPS = 50
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


@dataclass(repr=False)
class DensityResult(_ResultMixin):
    """A smoothed spectral density from SLQ.

    ``grid``/``density``: the curve (integrates to one); ``ritz_values``/``weights``:
    ``[num_probes, steps]`` quadrature nodes and weights (NaN/0 past a probe's breakdown).
    Resolution: ``sigma`` is the Gaussian kernel width in eigenvalue units (features closer
    than about ``2 sigma`` merge), from ``num_probes`` probes of ``lanczos_steps`` steps (the
    quadrature is exact for moments below ``2 lanczos_steps``; the probe average has a
    Monte Carlo error ``~ 1/sqrt(num_probes)`` on the bulk). ``matvecs``: single-vector
    products; ``passes``: operator calls (all probes share each pass).
    """

    grid: np.ndarray
    density: np.ndarray
    ritz_values: np.ndarray
    weights: np.ndarray
    sigma: float
    matvecs: int
    log_scale: bool = False
    interrupted: bool = False
    passes: int = 0
    num_probes: int = 0
    lanczos_steps: int = 0

    def moment(self, order: int) -> float:
        """Quadrature estimate of ``tr(A^order) / P`` (exact per probe for ``order < 2 steps``)."""
        nodes = np.nan_to_num(self.ritz_values)
        return float(np.mean(np.sum(self.weights * nodes**order, axis=1)))

    def plot(self, ax=None, log: bool | None = None, marks: Sequence[float] = ()):
        """Plot the density (log y-axis if ``log``, default ``log_scale``), with dashed lines at
        ``marks`` (e.g. ``bulk_outlier_split(result).outliers``); returns ``(fig, ax)``."""
        from hesse.plotting import draw_density, new_figure, require_matplotlib

        require_matplotlib("DensityResult.plot")
        if ax is None:
            fig = new_figure((6, 3.5))
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        probes, steps = self.ritz_values.shape
        draw_density(ax, self.grid, self.density, outliers=marks, log=self.log_scale if log is None else log,
                     title=f"spectral density (SLQ, {probes} probes x {steps} steps)")
        fig.tight_layout()
        return fig, ax

    def __repr__(self) -> str:
        lo, hi = float(np.nanmin(self.ritz_values)), float(np.nanmax(self.ritz_values))
        flag = " INTERRUPTED" if self.interrupted else ""
        return (
            f"DensityResult(range=[{_fmt(lo)}, {_fmt(hi)}], probes={self.ritz_values.shape[0]}, "
            f"steps={self.ritz_values.shape[1]}, sigma={_fmt(self.sigma)}, matvecs={self.matvecs}, "
            f"passes={self.passes}{flag})"
        )


def density(
    op,
    *,
    num_probes: int = DEFAULT_PROBES,
    lanczos_steps: int = DEFAULT_STEPS,
    grid_size: int = 2000,
    sigma: float = 0.005,
    log_scale: bool = False,
    reorthogonalize: bool = True,
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> DensityResult:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``num_probes`` Rademacher probes run ``lanczos_steps`` steps together (cost: that many
    data passes, ``num_probes * lanczos_steps`` single-vector products). The defaults (4
    probes, 50 steps) are chosen for time: 50 passes resolve the outliers and the bulk's
    shape (moments up to order 99 exact per probe); raise ``num_probes`` for a smoother bulk
    and ``lanczos_steps`` for finer detail (Ghorbani et al. use 10 x 90). ``sigma`` is the
    Gaussian kernel width relative to the spectrum's range; the result reports it in
    eigenvalue units (``.sigma``) with ``.num_probes`` and ``.lanczos_steps``. With ``reorthogonalize`` the
    Lanczos bases (``steps x P x probes`` numbers) are kept for full reorthogonalisation;
    turn it off for huge models (the quadrature stays accurate, Ritz values may repeat).
    ``log_scale`` makes :meth:`DensityResult.plot` use a log y-axis (Ghorbani et al.'s view).
    Ctrl-C: the density from the finished Lanczos steps (``interrupted=True``) is attached to
    the ``KeyboardInterrupt`` as ``.partial`` or returned (``on_interrupt="return"``); an
    interrupt before the first step is re-raised as it is.
    """
    check_positive("num_probes", num_probes, integer=True)
    check_positive("lanczos_steps", lanczos_steps, integer=True)
    check_positive("sigma", sigma)
    check_positive("grid_size", grid_size, integer=True)
    if grid_size < 10:
        raise HesseError(f"grid_size={grid_size} is too coarse; use at least 10 points (default 2000).")
    check_on_interrupt(on_interrupt)
    op, used = prepare_operator(op, check_symmetric, seed)
    steps = min(lanczos_steps, op.size)
    Z = isotropic_probes(op, num_probes, "rademacher", generator=seed)
    P, K = op.size, num_probes
    lz = Lanczos(_stacked(op, K), K * P, op.dtype, op.device, segments=[slice(k * P, (k + 1) * P) for k in range(K)],
                 window=None if reorthogonalize else 2, on_breakdown="stop")

    def result(stopped: bool) -> DensityResult:
        nodes, weights = gauss_quadrature(lz, steps)
        keep = lz.lengths > 0
        grid, dens, sigma_abs = _smooth(nodes[keep], weights[keep], grid_size, sigma)
        return DensityResult(grid, dens, nodes[keep], weights[keep], sigma_abs, int(lz.lengths.sum()) + used,
                             log_scale, stopped, passes=lz.calls + (used > 0), num_probes=K, lanczos_steps=steps)

    with progress_bar(total=K * steps, desc="density (SLQ)", enabled=progress, unit="matvec") as bar:
        try:
            krylov_steps(lz, Z.T.reshape(K * P, 1), steps, on_step=bar.update)
        except KeyboardInterrupt as error:
            if lz.lengths.max() == 0:
                raise
            return interrupted(error, result(True), on_interrupt, "density")
    return result(False)


def _stacked(op: LinearOperator, K: int):
    """``matmat`` of ``K`` copies of ``op`` on one stacked vector ``[K P, 1]`` (copy ``k`` in
    rows ``k P .. (k+1) P``): one operator call with ``K`` columns; all-zero copies (finished
    probes) are not multiplied."""
    P = op.size

    def matmat(X: torch.Tensor) -> torch.Tensor:
        Z = X.reshape(K, P).T
        live = (Z != 0).any(0)
        out = torch.zeros_like(Z)
        out[:, live] = op.matmat(Z[:, live])
        return out.T.reshape(K * P, 1)

    return matmat


def _smooth(nodes: np.ndarray, weights: np.ndarray, grid_size: int, sigma: float):
    """Sum of Gaussians ``N(theta_j, sigma^2)`` weighted by ``tau_j / num_probes`` on a grid."""
    finite = np.isfinite(nodes)
    lo, hi = float(nodes[finite].min()), float(nodes[finite].max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    sigma_abs = sigma * width
    grid = np.linspace(lo - 5 * sigma_abs, hi + 5 * sigma_abs, grid_size)
    theta, tau = nodes[finite], weights[finite] / nodes.shape[0]
    dens = np.zeros(grid_size)
    for start in range(0, theta.size, 256):  # bounded memory: grid x 256 nodes at a time
        t, w = theta[start : start + 256], tau[start : start + 256]
        dens += (w * np.exp(-0.5 * ((grid[:, None] - t) / sigma_abs) ** 2)).sum(1)
    dens /= sigma_abs * math.sqrt(2 * math.pi)
    dens /= _trapezoid(dens, grid)
    return grid, dens, sigma_abs
