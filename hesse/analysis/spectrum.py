"""Bulk/outlier split and per-layer curvature of a curvature operator.

* :func:`bulk_outlier_split`: how many eigenvalues stand out of the bulk. Neural-network
  Hessians, GGNs and Fishers have a bulk near zero plus about one outlier per class
  (``C`` or ``C - 1`` of them): Sagun, Bottou & LeCun 2017 / Sagun et al. 2018 ("Empirical
  Analysis of the Hessian of Over-Parametrized Neural Networks"); Papyan 2019 ("Measurements
  of Three-Level Hierarchical Structure in the Outliers in the Spectrum of Deepnet
  Hessians") and 2020 ("Traces of Class/Cross-Class Structure Pervade Deep Learning
  Spectra"); Ghorbani, Krishnan & Xiao 2019 (the outliers seen in SLQ densities).
* :func:`per_layer`: trace (to a target relative accuracy), trace per parameter and top
  eigenvalue of every diagonal block, all blocks sharing each product, with a ranking that
  says which layers cannot be told apart.

The spectral density itself (stochastic Lanczos quadrature) is :func:`hesse.linalg.density`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hesse._progress import progress_bar
from hesse.errors import HesseError, NotConvergedWarning, check_on_interrupt, interrupted
from hesse.linalg import DensityResult, EigenResult, TraceResult, density
from hesse.linalg.block_estimators import CONFIDENCE, AutoBlockTraces, BlockTraces, SampledBlockTraces
from hesse.linalg.checks import check_positive, prepare_operator
from hesse.linalg.lanczos import Lanczos, krylov_steps
from hesse.linalg.probes import gaussian_block
from hesse.operators import BlockDiagonalOperator, as_operator
from hesse.results import _fmt, _ResultMixin

GAP_SPACINGS = 2.0  # an outlier gap is at least this many median spacings of the values seen
TIE_STDERRS = 2.0  # neighbours in the ranking closer than this many combined stderrs are tied


@dataclass(repr=False)
class OutlierSplit(_ResultMixin):
    """How many eigenvalues stand out of the bulk (see :func:`bulk_outlier_split`).

    ``outliers``: their values, descending; ``bulk_edge``: the largest bulk eigenvalue
    (``None`` when there are no outliers, or when it is unknown); ``gap_ratio``: the ratio
    ``lambda_k / lambda_(k+1)`` at the best candidate split (also when it was rejected; NaN
    when there was none); ``trace_share``: the outliers' share of the trace (``None`` when no
    trace is known); ``values_used``: how many reliable eigenvalues the rule saw; ``reason``:
    why this count, in words.
    """

    num_outliers: int
    outliers: list[float]
    bulk_edge: float | None
    gap_ratio: float
    trace_share: float | None
    values_used: int
    reason: str
    rule: str

    def __repr__(self) -> str:
        edge = "None" if self.bulk_edge is None else _fmt(self.bulk_edge)
        share = "" if self.trace_share is None else f", trace_share={self.trace_share:.3g}"
        return (
            f"OutlierSplit(num_outliers={self.num_outliers}, outliers={[_fmt(v) for v in self.outliers]}, "
            f"bulk_edge={edge}, gap_ratio={_fmt(self.gap_ratio)}{share}; {self.reason})"
        )


def bulk_outlier_split(
    result_or_values, *, min_ratio: float = 1.5, max_outliers: int | None = None, zero_level: float = 1e-3,
    ritz_rtol: float = 1e-3, trace: float | TraceResult | None = None,
) -> OutlierSplit:
    """How many of the top eigenvalues stand out of the bulk: the largest ratio test.

    Rule: with the reliable eigenvalues sorted descending, ``x_1 >= x_2 >= ...``, a split
    after ``k`` outliers has ratio ``r_k = x_k / x_(k+1)``, i.e. the gap ``x_k - x_(k+1)``
    over the bulk edge measured from zero (``r_k - 1``): the spread of a neural-network bulk
    is its positive part, piled up at zero (Sagun et al. 2017; Papyan 2019, 2020; Ghorbani
    et al. 2019), so negative eigenvalues do not widen it. The split with the largest
    ``r_k`` wins if ``r_k >= min_ratio``; otherwise the answer is "no clear separation"
    (``num_outliers=0``, ``bulk_edge=None``, ``reason`` says why). Values below
    ``zero_level * x_1`` count as the zero bulk (``x_(k+1)`` is clamped to that level, and no
    outlier lies there), so ratios of tiny values deep in the bulk never win and a low-rank
    matrix has its nonzero eigenvalues as outliers. A split's gap must also exceed
    ``GAP_SPACINGS`` (2) times the median spacing of the values seen, so evenly spaced values
    (a bulk reaching down to zero) show none. Splits leave at least one value as bulk edge
    and at most ``max_outliers`` outliers.

    Reliable values, the same for every input: an array (all values), an
    :class:`EigenResult` (its converged values; ``which="largest"`` or ``"magnitude"``, and
    ask for ``k`` well above the expected count, e.g. 2-3x the number of classes), or a
    :class:`DensityResult`. SLQ Ritz values of outliers and of the bulk edge converge within
    a few dozen Lanczos steps and are then the same in every probe, while interior (bulk)
    Ritz values are quadrature nodes that differ from probe to probe. So from a density
    the rule uses, from the top down, the Ritz values that all probes agree on (spread within
    ``ritz_rtol`` relative; repeated copies within a probe count once), and stops at the first
    one they do not. Both paths thus see the same top eigenvalues and give the same count.

    ``trace_share = sum(outliers) / trace`` with ``trace`` (a number or a
    :class:`TraceResult`); for a density without ``trace``, the quadrature estimate
    ``sum_{theta_j > split} tau_j theta_j / sum_j tau_j theta_j`` over all probes.
    """
    check_positive("min_ratio", min_ratio)
    check_positive("zero_level", zero_level)
    check_positive("ritz_rtol", ritz_rtol)
    if max_outliers is not None:
        check_positive("max_outliers", max_outliers, integer=True)
    values, source = _reliable_values(result_or_values, ritz_rtol)
    k, ratio, reason = _ratio_split(values, min_ratio, max_outliers, zero_level)
    if isinstance(result_or_values, DensityResult) and k == 0:
        reason += (f"; only the top {values.size} Ritz values converged in every probe: for more, run density "
                   "with more lanczos_steps or pass eigenvalues(op, k=...)")
    outliers = [float(v) for v in values[:k]]
    share = _trace_share(result_or_values, values, k, trace)
    rule = f"largest ratio x_k/x_(k+1) of {source}, at least min_ratio={min_ratio:g}"
    return OutlierSplit(k, outliers, float(values[k]) if k else None, ratio, share, int(values.size), reason, rule)


def _reliable_values(obj, ritz_rtol: float) -> tuple[np.ndarray, str]:
    """The eigenvalues the rule may trust, descending, and a description of their source."""
    if isinstance(obj, DensityResult):
        return _agreed_ritz_values(obj, ritz_rtol), "the Ritz values all SLQ probes agree on"
    if isinstance(obj, EigenResult):
        if obj.which == "smallest":
            raise HesseError("bulk_outlier_split needs the largest eigenvalues; call eigenvalues(op, k, 'largest').")
        given, values, source = len(obj.values), obj.values[obj.converged], "the converged eigenvalues"
    else:
        values, source = torch.as_tensor(obj, dtype=torch.float64).reshape(-1), "the eigenvalues"
        given = values.numel()
    if given < 3:
        raise HesseError(f"bulk_outlier_split needs at least 3 eigenvalues, got {given}; ask for more "
                         "(k >= 3, well above the expected number of outliers).")
    values = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu())
    return np.sort(values[np.isfinite(values)])[::-1], source


def _agreed_ritz_values(dens: DensityResult, rtol: float) -> np.ndarray:
    """The top Ritz values on which every probe agrees (to ``rtol``), descending.

    Each probe's nodes are sorted descending with copies within ``rtol`` merged (ghosts of
    Lanczos without reorthogonalisation); level ``j`` is reliable when the ``j``-th values of
    all probes lie within ``rtol * max(|median|, 1e-8 max |theta|)``. Needs two probes or more.
    """
    rows = []
    for row in dens.ritz_values:
        x = np.sort(row[np.isfinite(row)])[::-1]
        keep = np.ones(x.size, dtype=bool)
        keep[1:] = x[:-1] - x[1:] > rtol * np.maximum(np.abs(x[1:]), 1e-300)
        rows.append(x[keep])
    if len(rows) < 2 or min(r.size for r in rows) == 0:
        return np.zeros(0)
    depth = min(r.size for r in rows)
    levels = np.array([r[:depth] for r in rows])
    median = np.median(levels, axis=0)
    scale = max(float(np.abs(levels).max()), 1e-300)
    agree = levels.max(0) - levels.min(0) <= rtol * np.maximum(np.abs(median), 1e-8 * scale)
    count = depth if agree.all() else int(np.argmin(agree))
    return median[:count]


def _ratio_split(x: np.ndarray, min_ratio: float, max_outliers: int | None, zero_level: float):
    """``(num_outliers, ratio at the best split, reason)`` for descending values ``x``."""
    if x.size < 2:
        return 0, math.nan, f"no clear separation: only {x.size} reliable eigenvalue(s), need 2 or more"
    if x[0] <= 0:
        return 0, math.nan, "no clear separation: no positive eigenvalue stands above a bulk"
    floor = zero_level * x[0]
    y = np.maximum(x, floor)
    last = min(x.size - 1, max_outliers if max_outliers is not None else x.size - 1, int((x > floor).sum()))
    gaps = y[:last] - y[1:last + 1]
    ratios = np.where(gaps > GAP_SPACINGS * np.median(y[:-1] - y[1:]), y[:last] / y[1:last + 1], 0.0)
    k = int(np.argmax(ratios)) + 1
    ratio = float(ratios[k - 1])
    where = f"x_{k}/x_{k + 1} = {_fmt(x[k - 1])}/{_fmt(x[k])} = {ratio:.3g}"
    if ratio == 0:
        return 0, math.nan, (f"no clear separation: no gap between the top {last + 1} values exceeds "
                             f"{GAP_SPACINGS:g}x their median spacing")
    if ratio < min_ratio:
        return 0, ratio, f"no clear separation: the largest ratio {where} is below min_ratio={min_ratio:g}"
    return k, ratio, f"{k} outlier(s): the largest ratio {where} >= min_ratio={min_ratio:g}"


def _trace_share(obj, values: np.ndarray, k: int, trace) -> float | None:
    """The outliers' share of the trace: ``sum(outliers) / trace``, or the SLQ quadrature share."""
    if k == 0:
        return 0.0 if trace is not None or isinstance(obj, DensityResult) else None
    if trace is not None:
        total = trace.estimate if isinstance(trace, TraceResult) else float(trace)
        return float(values[:k].sum() / total)
    if not isinstance(obj, DensityResult):
        return None
    split = (values[k - 1] + values[k]) / 2
    nodes, weights = np.nan_to_num(obj.ritz_values), obj.weights
    return float((weights * nodes * (nodes > split)).sum() / (weights * nodes).sum())


@dataclass(repr=False)
class PerLayerResult(_ResultMixin):
    """Per-block trace, trace per parameter and top eigenvalue of a block-diagonal view.

    ``trace[b] +- trace_stderr[b]`` estimates ``tr(A_bb)`` (stderr 0 when
    ``trace_method[b]`` is exact), aiming at an error below ``rtol |trace|`` with about 95%
    confidence, ``2 trace_stderr <= rtol |trace|`` (:attr:`rtol_met`). ``trace_per_parameter = tr(A_bb) / n_b`` is the layer sensitivity of
    HAWQ-V2 (Dong et al. 2020, "HAWQ-V2: Hessian Aware trace-Weighted Quantization"): a
    layer's average curvature, comparable across layers of different size. :attr:`ranking`
    orders blocks by it; :attr:`indistinguishable` lists neighbouring pairs of the ranking
    whose difference is within ``TIE_STDERRS`` combined standard errors (their order is
    noise). ``trace_matvecs``: products of the whole operator the traces used; ``matvecs``: all.
    """

    names: list[str]
    sizes: dict[str, int]
    top_eigenvalue: dict[str, float]
    eigen_converged: dict[str, bool]
    trace: dict[str, float]
    trace_stderr: dict[str, float]
    trace_method: dict[str, str]
    rtol: float
    trace_matvecs: int
    matvecs: int
    densities: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def trace_per_parameter(self) -> dict[str, float]:
        return {n: self.trace[n] / self.sizes[n] for n in self.names}

    @property
    def trace_per_parameter_stderr(self) -> dict[str, float]:
        return {n: self.trace_stderr[n] / self.sizes[n] for n in self.names}

    @property
    def rtol_met(self) -> dict[str, bool]:
        """Whether each block's trace reached ``2 stderr <= rtol |trace|``."""
        return {n: bool(CONFIDENCE * self.trace_stderr[n] <= self.rtol * abs(self.trace[n])) for n in self.names}

    @property
    def ranking(self) -> list[str]:
        """Blocks by trace per parameter, largest first (NaN last)."""
        tpp = self.trace_per_parameter
        return sorted(self.names, key=lambda n: -tpp[n] if math.isfinite(tpp[n]) else math.inf)

    @property
    def indistinguishable(self) -> list[tuple[str, str]]:
        """Neighbours ``(a, b)`` in :attr:`ranking` with ``|t_a - t_b| <= 2 sqrt(se_a^2 + se_b^2)``
        (trace per parameter and its stderr): their order is not resolved. (A NaN trace, from an
        interrupted run, is ranked last and tied with nothing.)"""
        tpp, se = self.trace_per_parameter, self.trace_per_parameter_stderr
        order = self.ranking
        return [(a, b) for a, b in zip(order, order[1:])
                if abs(tpp[a] - tpp[b]) <= TIE_STDERRS * math.hypot(se[a], se[b])]

    def rows(self) -> list[dict]:
        """One dict per block, in :attr:`ranking` order (``tied_with_next``: indistinguishable)."""
        tpp, se, met = self.trace_per_parameter, self.trace_per_parameter_stderr, self.rtol_met
        ties = {a for a, _ in self.indistinguishable}
        return [
            {"rank": i + 1, "block": n, "size": self.sizes[n], "trace": self.trace[n],
             "trace_stderr": self.trace_stderr[n], "trace_method": self.trace_method[n], "rtol_met": met[n],
             "trace_per_parameter": tpp[n], "trace_per_parameter_stderr": se[n], "tied_with_next": n in ties,
             "top_eigenvalue": self.top_eigenvalue[n], "converged": self.eigen_converged[n]}
            for i, n in enumerate(self.ranking)
        ]

    def table(self) -> str:
        """A printable table of :meth:`rows`; ``=`` marks ranks not resolved from the next."""
        width = max([5] + [len(n) for n in self.names])
        lines = [f"{'rank':<5} {'block':<{width}} {'size':>9} {'trace':>11} {'+-':>9} {'method':<8} "
                 f"{'trace/param':>11} {'+-':>9} {'top eig':>11}"]
        for r in self.rows():
            rank = f"{r['rank']}{'=' if r['tied_with_next'] else ''}"
            method = r["trace_method"].split(" ")[0] + ("" if r["rtol_met"] else "*")
            lines.append(
                f"{rank:<5} {r['block']:<{width}} {r['size']:>9d} {r['trace']:>11.5g} {r['trace_stderr']:>9.2g} "
                f"{method:<8} {r['trace_per_parameter']:>11.4g} {r['trace_per_parameter_stderr']:>9.2g} "
                f"{r['top_eigenvalue']:>11.5g}{'' if r['converged'] else ' (unconverged)'}")
        lines.append(f"= : not distinguishable from the next block within {TIE_STDERRS:g} stderrs; "
                     f"* : 2 stderr above rtol={self.rtol:g} of the trace")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The fields plus the derived per-parameter traces, ranking and ties (JSON-ready)."""
        out = super().to_dict()
        out.update(trace_per_parameter=self.trace_per_parameter, rtol_met=self.rtol_met,
                   trace_per_parameter_stderr=self.trace_per_parameter_stderr, ranking=self.ranking,
                   indistinguishable=[list(p) for p in self.indistinguishable])
        return out

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"PerLayerResult(blocks={self.names}, matvecs={self.matvecs})\n{self.table()}"


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
    rtol: float = 0.02,
    trace_probes: int = 1000,
    tol: float = 1e-4,
    max_steps: int = 200,
    density_kwargs: dict | None = None,
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool | None = None,
    on_interrupt: str = "raise",
    trace_method: str = "auto",
) -> PerLayerResult:
    """Trace (to relative accuracy ``rtol``), trace per parameter and top eigenvalue of every
    diagonal block ``A_bb``.

    ``op``: a :class:`BlockDiagonalOperator`, a curvature operator (its
    ``block_diagonal(by)`` is used) or any operator with ``.blocks``.

    Traces (:class:`hesse.linalg.block_estimators.BlockTraces`): every block runs Hutch++
    (Meyer et al. 2021) in rounds on its own sketch and probes, and all blocks share each
    product of the block-diagonal view ``D`` (one product multiplies every block's columns
    stacked in its rows, ``D [X_1; ...; X_B] = [A_11 X_1; ...; A_BB X_B]``: one data pass for
    all blocks, one column of ``A`` per block column), until each block's error is below
    ``rtol |trace|`` with about 95% confidence or ``trace_probes`` columns of the view (per
    block) are used; a finished block takes no more columns. A block of at most 60 entries, or one
    whose ``n_b`` identity columns cost no more than the estimators still need, is computed
    exactly from its diagonal (stderr 0). Blocks that miss ``rtol`` raise a
    :class:`NotConvergedWarning`. ``trace_method``: ``"hutch++"`` (the above), ``"sampled"``
    (:class:`~hesse.linalg.block_estimators.SampledBlockTraces`: ``tr(A_bb) = E‖w_b‖²`` from
    columns of a random square root ``A = E[w wᵀ]``, one backward per column for all blocks
    at once, at most ``trace_probes`` columns per block, i.e. ``trace_probes * blocks`` in all,
    the same cost cap; GGN and Fisher only) or ``"auto"``
    (:class:`~hesse.linalg.block_estimators.AutoBlockTraces`: where the operator has a square
    root, one sampled pass predicts the columns each block needs; sampling goes on for the
    blocks where that is cheaper than Hutch++'s fewest products, Hutch++ takes the rest).

    Top eigenvalues: Lanczos (:mod:`hesse.linalg.lanczos`) on all blocks simultaneously, one
    recurrence per block in that block's rows, so each step is one product of ``D`` (one
    column of ``A`` per unfinished block); block ``b`` stops when its residual estimate
    ``beta_j |e_j^T s|`` is below ``tol |theta|`` or after ``max_steps``.
    ``density_kwargs`` (e.g. ``{}``) also computes each block's SLQ density.

    ``matvecs`` counts products of the whole operator ``A`` (columns of data passes, the
    symmetry check's included), ``trace_matvecs`` those of the traces. Ctrl-C: traces
    from the finished products (unfinished exact ones extrapolated, none yet: NaN), top
    eigenvalues as the Ritz values so far (unconverged); the partial result is attached to
    the ``KeyboardInterrupt`` as ``.partial`` or returned (``on_interrupt="return"``).
    """
    check_positive("rtol", rtol)
    check_positive("tol", tol)
    check_positive("max_steps", max_steps, integer=True)
    check_positive("trace_probes", trace_probes, integer=True)
    if trace_probes < 2:
        raise HesseError("trace_probes must be at least 2 to report a stderr.")
    check_on_interrupt(on_interrupt)
    view = _block_diagonal_view(op, by)
    view_products = view.parent_products
    D, used = prepare_operator(view, check_symmetric, seed)
    names = list(D.blocks)
    gen = torch.Generator().manual_seed(seed)
    nan = {n: float("nan") for n in names}
    res = PerLayerResult(names, {n: s.stop - s.start for n, s in D.blocks.items()}, dict(nan),
                         dict.fromkeys(names, False), dict(nan), dict.fromkeys(names, math.inf),
                         dict.fromkeys(names, "none"), rtol, 0, used)
    traces = block_traces(D, trace_method, rtol, trace_probes, seed, gen)
    lz = Lanczos(D.matmat, D.size, D.dtype, D.device, segments=list(D.blocks.values()), on_breakdown="stop")

    def count_products() -> None:  # every column of A: products of the view and of single blocks
        sampled = getattr(traces, "square_root_columns", 0)  # columns outside the view's products
        res.matvecs = D.parent_products - view_products + sampled + sum(d.matvecs for d in res.densities.values())

    with progress_bar(total=trace_probes + max_steps, desc="per-layer", enabled=progress, unit="pass") as bar:
        stage = "traces"
        try:
            traces.run(bar.update)
            _record_traces(traces.results(), res, traces.matvecs)
            stage = "eigenvalues"
            _block_top_eigenvalues(lz, res, tol, max_steps, gen, bar)
            stage = "densities"
            for n in names if density_kwargs is not None else ():
                res.densities[n] = density(D.block(n), seed=seed, progress=progress, **density_kwargs)
        except KeyboardInterrupt as error:
            if stage == "traces":
                _record_traces(traces.results(interrupted=True), res, traces.matvecs)
            if stage != "densities":  # the Ritz values so far, unconverged
                _record_top_eigenvalues(lz, res, [False] * len(names))
            count_products()
            return interrupted(error, res, on_interrupt, "per_layer")
    count_products()
    _warn_unconverged(res, tol, max_steps, trace_probes)
    return res


TRACE_METHODS = ("auto", "hutch++", "sampled")


def block_traces(D: BlockDiagonalOperator, method: str, rtol: float, budget: int, seed: int,
                 gen: torch.Generator) -> BlockTraces | SampledBlockTraces | AutoBlockTraces:
    """The per-block trace estimator ``method`` asks for (see :func:`per_layer`), not yet run."""
    if method not in TRACE_METHODS:
        raise HesseError(f"trace_method must be one of {TRACE_METHODS}, got {method!r}.")
    sampler = None if method == "hutch++" else D.square_root_sampler()
    if method == "sampled" and sampler is None:
        raise HesseError("trace_method='sampled' needs a GGN or Fisher operator with nn.CrossEntropyLoss, "
                         "nn.MSELoss or nn.BCEWithLogitsLoss; use 'hutch++' for this operator.")
    if sampler is None:
        return BlockTraces(D, rtol, budget, gen)
    # the same cost cap: a square-root column costs at most what one product of one block does
    sampled = SampledBlockTraces(sampler, D.blocks, rtol, budget * len(D.blocks), seed, D.dtype.itemsize)
    if method == "sampled":
        return sampled
    return AutoBlockTraces(sampled, lambda only: BlockTraces(D, rtol, budget, gen, only),
                           [s.stop - s.start for s in D.blocks.values()])


def _record_traces(traces: dict[str, TraceResult], res: PerLayerResult, products: int) -> None:
    """Store every block's trace, stderr and method, and the products of ``A`` they used."""
    for name, t in traces.items():
        res.trace[name], res.trace_stderr[name], res.trace_method[name] = t.estimate, t.stderr, t.method
    res.trace_matvecs = products


def _warn_unconverged(res: PerLayerResult, tol: float, max_steps: int, trace_probes: int) -> None:
    bad = [n for n in res.names if not res.eigen_converged[n]]
    if bad:
        warnings.warn(f"per_layer: top eigenvalue of blocks {bad} did not converge to tol={tol:g} in "
                      f"{max_steps} steps; raise max_steps.", NotConvergedWarning, stacklevel=3)
    loose = [n for n, ok in res.rtol_met.items() if not ok]
    if loose:
        warnings.warn(f"per_layer: traces of blocks {loose} did not reach rtol={res.rtol:g} within "
                      f"trace_probes={trace_probes} columns {budget_unit(res)}; raise trace_probes.", NotConvergedWarning,
                      stacklevel=3)


def budget_unit(res: PerLayerResult) -> str:
    """How the ``trace_probes`` budget counts: per block (Hutch++) or shared (sampled)."""
    sampled = any(m.startswith("sampled") for m in res.trace_method.values())
    return f"per block ({res.trace_matvecs} square-root columns shared by all blocks)" if sampled else "per block"

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
    """Store every block's largest Ritz value (NaN before its first step)."""
    tops = [float(lz.ritz("largest", k)[0][0]) if lz.lengths[k] else float("nan") for k in range(len(lz.segments))]
    res.top_eigenvalue = dict(zip(res.names, tops))
    res.eigen_converged = dict(zip(res.names, converged))
