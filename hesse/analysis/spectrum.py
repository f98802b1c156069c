"""Bulk/outlier split and per-layer spectra of a curvature operator.

* :func:`bulk_outlier_split`: how many eigenvalues stand out of the bulk (Sagun et al. 2017,
  "Empirical Analysis of the Hessian of Over-Parametrized Neural Networks": a bulk near
  zero plus roughly one outlier per class).
* :func:`per_layer`: top eigenvalue and trace of every diagonal block, all blocks at once.

The spectral density itself (stochastic Lanczos quadrature) is :func:`hesse.linalg.density`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from hesse._progress import progress_bar
from hesse.errors import HesseError, NotConvergedWarning, check_on_interrupt, interrupted
from hesse.linalg import DensityResult, EigenResult, density
from hesse.linalg.checks import check_positive, prepare_operator
from hesse.linalg.lanczos import Lanczos, krylov_steps
from hesse.linalg.probes import DEFAULT_CHUNK, gaussian_block, isotropic_probes
from hesse.operators import BlockDiagonalOperator, LinearOperator, as_operator
from hesse.results import OutlierSplit, PerLayerResult


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
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> PerLayerResult:
    """Top eigenvalue and trace of every diagonal block ``A_bb``.

    ``op``: a :class:`BlockDiagonalOperator`, a curvature operator (its
    ``block_diagonal(by)`` is used) or any operator with ``.blocks``. The traces are
    Hutchinson (1989) estimates from ``trace_probes`` shared probes: one product of the
    block-diagonal view ``D`` gives every block's ``z_b^T A_bb z_b`` (so the block traces sum
    to the Hutchinson trace of the view). The top eigenvalues come from Lanczos
    (:mod:`hesse.linalg.lanczos`) run on all blocks simultaneously: one recurrence per block
    in that block's rows, so each step is one product of ``D`` (one parent pass); block ``b``
    stops when its Lanczos residual estimate ``beta_j |e_j^T s|`` is below ``tol |theta|``.
    ``density_kwargs`` (e.g. ``{}``) also computes each block's SLQ density.
    ``matvecs`` counts products of the block-diagonal view. Ctrl-C: traces not yet computed
    are NaN, top eigenvalues are the Ritz values so far (unconverged); the partial result is
    attached to the ``KeyboardInterrupt`` as ``.partial`` or returned (``on_interrupt="return"``).
    """
    check_positive("tol", tol)
    check_positive("max_steps", max_steps, integer=True)
    check_positive("trace_probes", trace_probes, integer=True)
    if trace_probes < 2:
        raise HesseError("trace_probes must be at least 2 to report a stderr.")
    check_on_interrupt(on_interrupt)
    D, used = prepare_operator(_block_diagonal_view(op, by), check_symmetric, seed)
    names = list(D.blocks)
    slices = [D.blocks[n] for n in names]
    gen = torch.Generator().manual_seed(seed)
    nan, sizes = {n: float("nan") for n in names}, {n: s.stop - s.start for n, s in zip(names, slices)}
    res = PerLayerResult(names, sizes, dict(nan), dict.fromkeys(names, False), dict(nan),
                         dict.fromkeys(names, math.inf), used)
    lz = Lanczos(D.matmat, D.size, D.dtype, D.device, segments=slices, on_breakdown="stop")
    with progress_bar(total=trace_probes + max_steps, desc="per-layer", enabled=progress, unit="matvec") as bar:
        eigen_done = False
        try:
            _block_traces(D, res, trace_probes, gen, bar)
            _block_top_eigenvalues(lz, res, tol, max_steps, gen, bar)
            eigen_done = True
            for n in names if density_kwargs is not None else ():
                res.densities[n] = density(D.block(n), seed=seed, progress=progress, **density_kwargs)
                res.matvecs += res.densities[n].matvecs
        except KeyboardInterrupt as error:
            if not eigen_done:  # the Ritz values so far, unconverged
                _record_top_eigenvalues(lz, res, [False] * len(names))
            return interrupted(error, res, on_interrupt, "per_layer")
    bad = [n for n in names if not res.eigen_converged[n]]
    if bad:
        warnings.warn(f"per_layer: top eigenvalue of blocks {bad} did not converge to tol={tol:g} in "
                      f"{max_steps} steps; raise max_steps.", NotConvergedWarning, stacklevel=2)
    return res


def _block_traces(D: LinearOperator, res: PerLayerResult, m: int, gen: torch.Generator, bar) -> None:
    """Hutchinson trace of every block from ``m`` shared probes (same probes as
    ``trace(D, "hutchinson", budget=m, seed=seed)``), in chunks of 32."""
    ZDZ = torch.empty(D.size, m, dtype=D.dtype, device=D.device)
    for start in range(0, m, DEFAULT_CHUNK):
        stop = min(start + DEFAULT_CHUNK, m)
        Z = isotropic_probes(D, stop - start, "rademacher", generator=gen)
        ZDZ[:, start:stop] = Z * D.matmat(Z)
        bar.update(stop - start)
    res.matvecs += m
    for n in res.names:
        samples = ZDZ[D.blocks[n]].sum(0).to(torch.float64)
        res.trace[n], res.trace_stderr[n] = float(samples.mean()), float(samples.std() / math.sqrt(m))


def _block_top_eigenvalues(lz: Lanczos, res: PerLayerResult, tol: float, max_steps: int,
                           gen: torch.Generator, bar) -> None:
    """Lanczos on every block at once, each block stopping when its top Ritz pair converges."""
    sizes = np.array([s.stop - s.start for s in lz.segments])
    eps = torch.finfo(lz.dtype).eps

    def finish(beta: np.ndarray) -> np.ndarray:
        done = lz.lengths >= sizes
        for k in np.flatnonzero(lz.active):
            theta, S = lz.ritz("largest", k)
            small = beta[k] <= 1e3 * eps * max(np.abs(theta).max(), 1e-300)  # breakdown
            done[k] |= beta[k] * abs(S[-1, 0]) <= tol * abs(theta[0]) or small
        return done

    start = gaussian_block(lz.V.shape[0], 1, gen, lz.dtype, lz.device)
    krylov_steps(lz, start, min(max_steps, int(sizes.max())), finish=finish, on_step=lambda n: bar.update(1))
    _record_top_eigenvalues(lz, res, (~lz.active | (lz.lengths >= sizes)).tolist())


def _record_top_eigenvalues(lz: Lanczos, res: PerLayerResult, converged: list[bool]) -> None:
    """Store every block's largest Ritz value (NaN before its first step) and its products."""
    tops = [float(lz.ritz("largest", k)[0][0]) if lz.lengths[k] else float("nan") for k in range(len(lz.segments))]
    res.top_eigenvalue = dict(zip(res.names, tops))
    res.eigen_converged = dict(zip(res.names, converged))
    res.matvecs += lz.products
