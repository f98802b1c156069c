"""Spectral density, bulk/outlier split and per-layer spectra of a curvature operator.

* :func:`density`: stochastic Lanczos quadrature (SLQ; Lin, Saad & Yang 2016; Ghorbani,
  Krishnan & Xiao 2019, "An Investigation into Neural Net Optimization via Hessian
  Eigenvalue Density"). For a unit probe ``q``, ``m`` Lanczos steps give the Gauss
  quadrature ``q^T f(A) q ~ sum_j tau_j f(theta_j)`` (Ritz values ``theta_j``, weights
  ``tau_j`` = squared first components of the Ritz vectors of the tridiagonal ``T``), exact
  for polynomials of degree ``< 2m``. Averaging over probes and smoothing each node with a
  Gaussian gives the spectral density ``(1/P) sum_i delta(t - lambda_i)``. All probes run
  their recurrences together: each step is ONE product with ``num_probes`` columns.
* :func:`bulk_outlier_split`: how many eigenvalues stand out of the bulk (Sagun et al. 2017,
  "Empirical Analysis of the Hessian of Over-Parametrized Neural Networks": a bulk near
  zero plus roughly one outlier per class).
* :func:`per_layer`: top eigenvalue and trace of every diagonal block, all blocks at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg._common import (
    DEFAULT_CHUNK,
    check_positive,
    make_progress,
    prepare_operator,
    probes,
)
from hesse.operators import BlockDiagonalOperator, LinearOperator, as_operator
from hesse.results import EigenResult, OutlierSplit, PerLayerResult, _fmt, _ResultMixin

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


@dataclass(repr=False)
class DensityResult(_ResultMixin):
    """A smoothed spectral density from SLQ.

    ``grid``/``density``: the curve (integrates to one); ``ritz_values``/``weights``:
    ``[num_probes, steps]`` quadrature nodes and weights (NaN/0 past a probe's breakdown);
    ``sigma``: the absolute Gaussian kernel width; ``matvecs``: single-vector products.
    """

    grid: np.ndarray
    density: np.ndarray
    ritz_values: np.ndarray
    weights: np.ndarray
    sigma: float
    matvecs: int
    log_scale: bool = False
    interrupted: bool = False

    def moment(self, order: int) -> float:
        """Quadrature estimate of ``tr(A^order) / P`` (exact per probe for ``order < 2 steps``)."""
        nodes = np.nan_to_num(self.ritz_values)
        return float(np.mean(np.sum(self.weights * nodes**order, axis=1)))

    @property
    def split(self) -> OutlierSplit:
        return bulk_outlier_split(self)

    @property
    def outliers(self) -> list[float]:
        """Eigenvalues standing out above the bulk (see :func:`bulk_outlier_split`)."""
        return self.split.outliers

    @property
    def bulk_edge(self) -> float:
        return self.split.bulk_edge

    def plot(self, ax=None, log: bool | None = None):
        """Plot the density (log y-axis if ``log``, default ``log_scale``); returns ``(fig, ax)``."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.5))
        else:
            fig = ax.figure
        log = self.log_scale if log is None else log
        ax.plot(self.grid, self.density, lw=1.2)
        if log:
            ax.set_yscale("log")
            floor = max(float(self.density.max()) * 1e-12, 1e-300)
            ax.set_ylim(bottom=max(floor, float(self.density[self.density > 0].min())))
        for value in self.outliers:
            ax.axvline(value, color="C3", lw=0.6, ls="--")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        probes, steps = self.ritz_values.shape
        ax.set_title(f"spectral density (SLQ, {probes} probes x {steps} steps)")
        return fig, ax

    def __repr__(self) -> str:
        lo, hi = float(np.nanmin(self.ritz_values)), float(np.nanmax(self.ritz_values))
        flag = " INTERRUPTED" if self.interrupted else ""
        return (
            f"DensityResult(range=[{_fmt(lo)}, {_fmt(hi)}], probes={self.ritz_values.shape[0]}, "
            f"steps={self.ritz_values.shape[1]}, sigma={_fmt(self.sigma)}, matvecs={self.matvecs}{flag})"
        )


def _lanczos_batch(
    op: LinearOperator, Q0: torch.Tensor, steps: int, reorthogonalize: bool, bar
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Lanczos on every column of ``Q0`` at once (one ``[P, n]`` product per step).

    Returns ``alpha [n, steps]``, ``beta [n, steps]`` (``beta[:, j]`` couples steps j, j+1),
    the length of each probe's recurrence (shorter on breakdown) and whether Ctrl-C stopped it.
    """
    P, n = Q0.shape
    alpha, beta = np.zeros((n, steps)), np.zeros((n, steps))
    lengths = np.zeros(n, dtype=int)
    active = torch.ones(n, dtype=torch.bool, device=Q0.device)
    basis = torch.empty(n, P, steps, dtype=Q0.dtype, device=Q0.device) if reorthogonalize else None
    q, q_prev = Q0, torch.zeros_like(Q0)
    b_prev = torch.zeros(n, dtype=Q0.dtype, device=Q0.device)
    try:
        for j in range(steps):
            w = op.matmat(q)
            bar.update(int(active.sum()))
            a = (q * w).sum(0)
            w = w - a * q - b_prev * q_prev
            if basis is not None:
                basis[:, :, j] = q.T
                B = basis[:, :, : j + 1]
                wt = w.T.unsqueeze(2)
                for _ in range(2):  # full reorthogonalisation, twice is enough
                    wt = wt - torch.bmm(B, torch.bmm(B.transpose(1, 2), wt))
                w = wt.squeeze(2).T
            b = w.norm(dim=0)
            act = active.cpu().numpy()
            alpha[act, j] = a[active].to(torch.float64).cpu().numpy()
            beta[act, j] = b[active].to(torch.float64).cpu().numpy()
            lengths[act] = j + 1
            scale = torch.maximum(a.abs(), b_prev).clamp_min(torch.finfo(w.dtype).tiny)
            active = active & (b > 1e3 * torch.finfo(w.dtype).eps * scale)
            q_prev, b_prev = q, b
            q = torch.where(active, w / b.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))
            if not bool(active.any()):
                break
    except KeyboardInterrupt:
        warnings.warn("density interrupted: using the Lanczos steps finished so far.",
                      NotConvergedWarning, stacklevel=3)
        return alpha, beta, lengths, True
    return alpha, beta, lengths, False


def _gauss_quadrature(alpha: np.ndarray, beta: np.ndarray, lengths: np.ndarray):
    """Ritz values and weights of each probe's tridiagonal matrix, NaN/0-padded to ``steps``."""
    n, steps = alpha.shape
    nodes, weights = np.full((n, steps), np.nan), np.zeros((n, steps))
    for i in range(n):
        L = lengths[i]
        if L == 0:
            continue
        theta, U = scipy.linalg.eigh_tridiagonal(alpha[i, :L], beta[i, : L - 1])
        nodes[i, :L], weights[i, :L] = theta, U[0] ** 2
    return nodes, weights


def density(
    op,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 90,
    grid_size: int = 2000,
    sigma: float = 0.005,
    log_scale: bool = False,
    reorthogonalize: bool = True,
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool = True,
) -> DensityResult:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``num_probes`` Rademacher probes run ``lanczos_steps`` steps together (cost: that many
    data passes, ``num_probes * lanczos_steps`` single-vector products). ``sigma`` is the
    Gaussian kernel width relative to the spectrum's range. With ``reorthogonalize`` the
    Lanczos bases (``steps x P x probes`` numbers) are kept for full reorthogonalisation;
    turn it off for huge models (the quadrature stays accurate, Ritz values may repeat).
    ``log_scale`` makes :meth:`DensityResult.plot` use a log y-axis (Ghorbani et al.'s view).
    """
    check_positive("num_probes", num_probes, integer=True)
    check_positive("lanczos_steps", lanczos_steps, integer=True)
    check_positive("sigma", sigma)
    check_positive("grid_size", grid_size, integer=True)
    if grid_size < 10:
        raise HesseError(f"grid_size={grid_size} is too coarse; use at least 10 points (default 2000).")
    op, used = prepare_operator(op, check_symmetric, seed)
    steps = min(lanczos_steps, op.size)
    gen = torch.Generator().manual_seed(seed)
    Z = probes(op.size, num_probes, "rademacher", gen, op)
    Q0 = Z / Z.norm(dim=0)
    with make_progress(num_probes * steps, "density (SLQ)", progress) as bar:
        alpha, beta, lengths, interrupted = _lanczos_batch(op, Q0, steps, reorthogonalize, bar)
    if lengths.max() == 0:
        raise HesseError("density was interrupted before the first Lanczos step; nothing to return.")
    keep = lengths > 0
    nodes, weights = _gauss_quadrature(alpha[keep], beta[keep], lengths[keep])
    grid, dens, sigma_abs = _smooth(nodes, weights, grid_size, sigma)
    return DensityResult(grid, dens, nodes, weights, sigma_abs, int(lengths.sum()) + used, log_scale, interrupted)


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


def bulk_outlier_split(
    result_or_values, *, min_gap_ratio: float = 1.0, max_outliers: int | None = None
) -> OutlierSplit:
    """How many of the top eigenvalues stand out of the bulk.

    Rule (largest relative gap): with values sorted descending ``x_1 >= ... >= x_n``, the
    candidate split after ``i`` outliers has ratio ``(x_i - x_{i+1}) / (x_{i+1} - x_n)``:
    the gap to the next value over the width of what remains. The split with the largest
    ratio wins if that ratio is at least ``min_gap_ratio``; otherwise there are no
    outliers. ``bulk_edge = x_{i+1}``. Accepts an :class:`EigenResult` (ask for
    ``k`` well above the expected count, e.g. 2-3x the number of classes), a
    :class:`DensityResult` (applied to each probe's Ritz values, median count) or values.
    """
    check_positive("min_gap_ratio", min_gap_ratio)
    if isinstance(result_or_values, DensityResult):
        splits = [
            _gap_split(row[np.isfinite(row)], min_gap_ratio, max_outliers)
            for row in result_or_values.ritz_values
            if np.isfinite(row).sum() >= 3
        ]
        count = int(np.median([s.num_outliers for s in splits]))
        chosen = [s for s in splits if s.num_outliers == count] or splits
        outliers = np.median(np.array([s.outliers for s in chosen]), axis=0) if count else np.array([])
        return OutlierSplit(
            count, [float(v) for v in outliers], float(np.median([s.bulk_edge for s in chosen])),
            float(np.median([s.gap_ratio for s in chosen])), "largest relative gap, median over SLQ probes",
        )
    values = result_or_values.values if isinstance(result_or_values, EigenResult) else result_or_values
    values = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu().reshape(-1))
    if values.size < 3:
        raise HesseError(
            f"bulk_outlier_split needs at least 3 eigenvalues, got {values.size}; ask for more (k >= 3)."
        )
    return _gap_split(values, min_gap_ratio, max_outliers)


def _gap_split(values: np.ndarray, min_gap_ratio: float, max_outliers: int | None) -> OutlierSplit:
    x = np.sort(values)[::-1]
    n = x.size
    limit = min(n - 2, max_outliers if max_outliers is not None else n // 2)
    best_i, best_ratio = 0, 0.0
    for i in range(1, limit + 1):
        gap, rest = x[i - 1] - x[i], x[i] - x[-1]
        ratio = gap / rest if rest > 0 else (math.inf if gap > 0 else 0.0)
        if ratio > best_ratio:
            best_i, best_ratio = i, ratio
    if best_ratio < min_gap_ratio:
        best_i = 0
    outliers = [float(v) for v in x[:best_i]]
    return OutlierSplit(best_i, outliers, float(x[best_i]), float(best_ratio), "largest relative gap")


def _block_diagonal_view(op, by) -> BlockDiagonalOperator:
    if isinstance(op, BlockDiagonalOperator):
        return op
    if hasattr(op, "block_diagonal"):
        return op.block_diagonal(by)
    op = as_operator(op)
    return BlockDiagonalOperator(op, op.blocks)


def per_layer(
    op,
    *,
    by="module",
    tol: float = 1e-4,
    max_steps: int = 200,
    trace_probes: int = 64,
    density_kwargs: dict | None = None,
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool = True,
) -> PerLayerResult:
    """Top eigenvalue and trace of every diagonal block ``A_bb``.

    ``op``: a :class:`BlockDiagonalOperator`, a curvature operator (its
    ``block_diagonal(by)`` is used) or any operator with ``.blocks``. The traces are
    Hutchinson estimates from ``trace_probes`` shared probes: one product of the
    block-diagonal view gives every block's ``z_b^T A_bb z_b`` (so the block traces sum
    to the Hutchinson trace of the view). The top eigenvalues come from Lanczos run on
    all blocks simultaneously: each step is one product of the view, whose block ``b``
    advances block ``b``'s recurrence (full reorthogonalisation within each block).
    ``density_kwargs`` (e.g. ``{}``) also computes each block's SLQ density.
    ``matvecs`` counts products of the block-diagonal view.
    """
    check_positive("tol", tol)
    check_positive("max_steps", max_steps, integer=True)
    check_positive("trace_probes", trace_probes, integer=True)
    if trace_probes < 2:
        raise HesseError("trace_probes must be at least 2 to report a stderr.")
    D = _block_diagonal_view(op, by)
    D, used = prepare_operator(D, check_symmetric, seed)
    names = list(D.blocks)
    slices = [D.blocks[n] for n in names]
    gen = torch.Generator().manual_seed(seed)
    total = trace_probes + max_steps
    interrupted = False
    traces, errs = {n: float("nan") for n in names}, {n: float("inf") for n in names}
    tops, conv = {n: float("nan") for n in names}, {n: False for n in names}
    matvecs = used
    with make_progress(total, "per-layer", progress) as bar:
        try:
            ZDZ = torch.empty(D.size, trace_probes, dtype=D.dtype, device=D.device)
            for start in range(0, trace_probes, DEFAULT_CHUNK):  # same probes as trace(..., "hutchinson")
                stop = min(start + DEFAULT_CHUNK, trace_probes)
                Z = probes(D.size, stop - start, "rademacher", gen, D)
                ZDZ[:, start:stop] = Z * D.matmat(Z)
                bar.update(stop - start)
            matvecs += trace_probes
            for n, s in zip(names, slices):
                samples = ZDZ[s].sum(0).to(torch.float64)
                traces[n], errs[n] = float(samples.mean()), float(samples.std() / math.sqrt(trace_probes))
            vals, ok, steps, interrupted = _simultaneous_top_eigenvalues(D, slices, tol, max_steps, gen, bar)
            matvecs += steps
            tops = dict(zip(names, vals))
            conv = dict(zip(names, ok))
        except KeyboardInterrupt:
            interrupted = True
            warnings.warn("per_layer interrupted: unfinished entries are NaN.", NotConvergedWarning, stacklevel=2)
    if not interrupted and not all(conv.values()):
        bad = [n for n in names if not conv[n]]
        warnings.warn(f"per_layer: top eigenvalue of blocks {bad} did not converge to tol={tol:g} in "
                      f"{max_steps} steps; raise max_steps.", NotConvergedWarning, stacklevel=2)
    densities = {}
    if density_kwargs is not None and not interrupted:
        for n in names:
            densities[n] = density(D.block(n), seed=seed, progress=progress, **density_kwargs)
            matvecs += densities[n].matvecs
    sizes = {n: s.stop - s.start for n, s in zip(names, slices)}
    return PerLayerResult(names, sizes, tops, conv, traces, errs, matvecs, densities, interrupted)


def _simultaneous_top_eigenvalues(
    D: LinearOperator, slices: list[slice], tol: float, max_steps: int, gen: torch.Generator, bar
) -> tuple[list[float], list[bool], int, bool]:
    """Lanczos on every block at once; returns top values, convergence, steps, interrupted."""
    P, B = D.size, len(slices)
    seg = torch.empty(P, dtype=torch.long, device=D.device)
    for b, s in enumerate(slices):
        seg[s] = b
    sizes = np.array([s.stop - s.start for s in slices])

    def seg_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(B, dtype=x.dtype, device=x.device).index_add_(0, seg, x)

    steps_cap = min(max_steps, int(sizes.max()))
    basis = torch.zeros(P, steps_cap, dtype=D.dtype, device=D.device)
    alphas, betas = np.zeros((B, steps_cap)), np.zeros((B, steps_cap))
    lengths = np.zeros(B, dtype=int)
    active = np.ones(B, dtype=bool)
    tops, ok = [float("nan")] * B, [False] * B
    q = torch.randn(P, generator=gen, dtype=torch.float64).to(D.dtype).to(D.device)
    q = q / seg_sum(q * q).sqrt()[seg]
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(B, dtype=D.dtype, device=D.device)
    steps = 0
    try:
        for j in range(steps_cap):
            w = D.matvec(q)
            steps += 1
            bar.update(1)
            a = seg_sum(q * w)
            w = w - a[seg] * q - b_prev[seg] * q_prev
            basis[:, j] = q
            Bj = basis[:, : j + 1]
            for _ in range(2):  # reorthogonalise within each block
                coeff = torch.zeros(B, j + 1, dtype=w.dtype, device=w.device).index_add_(0, seg, Bj * w[:, None])
                w = w - (Bj * coeff[seg]).sum(1)
            b = seg_sum(w * w).sqrt()
            a_np, b_np = a.to(torch.float64).cpu().numpy(), b.to(torch.float64).cpu().numpy()
            for i in np.flatnonzero(active):
                alphas[i, j], betas[i, j] = a_np[i], b_np[i]
                lengths[i] = j + 1
                L = j + 1
                theta, U = scipy.linalg.eigh_tridiagonal(alphas[i, :L], betas[i, : L - 1])
                tops[i] = float(theta[-1])
                residual = b_np[i] * abs(U[-1, -1])
                breakdown = b_np[i] <= 1e3 * torch.finfo(D.dtype).eps * max(abs(theta).max(), 1e-300)
                if residual <= tol * abs(theta[-1]) or breakdown or L >= sizes[i]:
                    ok[i], active[i] = True, False
            if not active.any():
                break
            act = torch.as_tensor(active, device=D.device)[seg]
            q_prev, b_prev = q, b
            q = torch.where(act, w / b.clamp_min(torch.finfo(w.dtype).tiny)[seg], torch.zeros_like(w))
    except KeyboardInterrupt:
        warnings.warn("per_layer interrupted: top eigenvalues are the Ritz values so far, unconverged.",
                      NotConvergedWarning, stacklevel=3)
        return tops, [False] * B, steps, True
    return tops, ok, steps, False
