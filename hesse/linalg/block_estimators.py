"""Traces of every diagonal block of a block-diagonal operator, all blocks sharing passes.

For a block-diagonal view ``D = diag(A_11, ..., A_BB)`` (:class:`hesse.operators.BlockDiagonalOperator`)
one product multiplies every block's own vectors at once: stacking block ``b``'s vectors
``X_b`` in its rows gives ``D [X_1; ...; X_B] = [A_11 X_1; ...; A_BB X_B]``. One column of
such a product (one data pass for a curvature operator, whatever the number of blocks) is
the unit of cost here, so a block that needs fewer columns than another rides along for free.

Per block, the trace is one of

* **exact**: ``tr(A_bb) = sum_j e_j^T A_bb e_j`` from ``n_b`` identity columns (stderr 0),
  taken in a random order so that an interrupted run extrapolates without bias
  (``n_b * mean`` of the finished entries, finite-population-corrected stderr);
* **Hutch++ in rounds** (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic
  Trace Estimation"; adaptive use as in Persson, Cortinovis & Kressner 2022): each round adds
  ``c`` sketch columns ``A_bb Omega`` (their orthonormalised products extend the basis ``Q_b``,
  whose part ``tr(Q_b^T A_bb Q_b)`` is exact) and ``c`` test probes ``g`` for the rest,
  ``tr((I - Q Q^T) A (I - Q Q^T)) ~ mean g'^T A g'`` with ``g' = (I - Q Q^T) g``. Products of
  old probes are re-deflated against the grown basis from stored products
  (``A g' = A g - (A Q)(Q^T g)``), so after ``r`` rounds the estimate is Hutch++ with budget
  ``3 c r``; its stderr is the sample stderr of the (unbiased) rest. Rounds go on until every
  block's error is below ``rtol |trace|`` with about 95% confidence (``t_{m-1} stderr <= rtol
  |trace|``, Student's ``t`` for ``m`` test probes) or the budget is spent. A block that is
  done gets no more columns (they would cost products of the parent and buy nothing).

A block is exact from the start when ``n_b <= EXACT_BELOW`` (60: about two short estimator
runs), and becomes exact later when, after a round, the columns the estimators still need to
reach ``rtol`` (extrapolated at the Hutchinson rate ``stderr ~ 1/sqrt(m)``, a pessimistic
bound for Hutch++) are at least ``n_b``.

**Sampled square roots** (:class:`SampledBlockTraces`), for operators with a random factor
(``A = E[w wᵀ]``: the GGN and Fisher, ``w = Jᵀ z`` with output-space ``z``, see
:meth:`hesse.GGN.sample_square_root`): ``tr(A_bb) = E‖w_b‖²``, so one column ``w`` (one
backward pass) gives a non-negative, unbiased estimate for every block at once, with no
cross-block terms. Its variance is Hutchinson's on each block (``2‖A_bb‖_F²`` per column for
Gaussian ``z``), so it needs more columns than Hutch++ on a low-rank block, but a column
costs one backward for all blocks instead of one product per block.

Tried and dropped: probes of the whole operator, each serving every block (``g_b^T (A g)_b``,
unbiased for ``tr(A_bb)``, deflated by a shared Hutch++ sketch). Cross-block terms
``A_bc`` dominate their variance on networks: on a 9.8k-parameter BatchNorm ResNet the
convolution blocks would need 600-37,000 shared probes for 2% (BatchNorm blocks 10^4-10^6),
against 30-60 columns each alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hesse.linalg.estimators import SAMPLED_PASS_BYTES, _mean_stderr
from hesse.linalg.lanczos import orthonormalize_against
from hesse.linalg.probes import DEFAULT_CHUNK, isotropic_probes
from hesse.operators import LinearOperator
from hesse.results import TraceResult

ROUND_COLUMNS = 10  # sketch and test columns per block and round (a round is 3x this)
MIN_ROUNDS = 1  # rounds before a block may stop (its stderr from ROUND_COLUMNS tests, Student's t)
SWITCH_ROUNDS = 2  # rounds before the extrapolated cost may make a block exact
EXACT_BELOW = 60  # blocks this small are exact from the start (about two short estimator runs)
CONFIDENCE = 2.0  # the reading "error below rtol with ~95% confidence": CONFIDENCE * stderr <= rtol |trace|


def confidence_factor(samples: int) -> float:
    """Student's ``t`` 97.5% quantile with ``samples - 1`` degrees of freedom: the stopping
    factor for a stderr estimated from few samples (2.26 at 10, 2.09 at 20, towards 1.96)."""
    from scipy.stats import t  # lazy: scipy.stats takes ~0.1 s to import

    return float(t.ppf(0.975, max(samples - 1, 1)))


class _Block:
    """One diagonal block's state: its exact diagonal so far, or its Hutch++ sketch and tests."""

    def __init__(self, n: int, device: torch.device):
        self.n = n
        empty = torch.zeros(n, 0, dtype=torch.float64, device=device)
        self.Q, self.AQ, self.G, self.AG = empty, empty, empty, empty
        self.Y = empty  # sketch products waiting to be orthonormalised and multiplied
        self.order: torch.Tensor | None = None  # exact: identity columns in this random order
        self.diag = torch.zeros(0, dtype=torch.float64)  # exact: diagonal entries found so far
        self.skipped = False  # another estimator's block: never multiplied, always done

    @property
    def exact(self) -> bool:
        return self.order is not None

    def start_exact(self, gen: torch.Generator) -> None:
        self.order, self.diag = torch.randperm(self.n, generator=gen), torch.zeros(0, dtype=torch.float64)

    def sketch_room(self) -> int:
        return 0 if self.exact or self.skipped else self.n - self.Q.shape[1]

    def identity_columns(self, width: int) -> torch.Tensor:
        """The next ``<= width`` identity columns of an exact block, ``[n, w]``."""
        rows = self.order[len(self.diag): len(self.diag) + width]
        E = torch.zeros(self.n, len(rows), dtype=torch.float64)
        E[rows, torch.arange(len(rows))] = 1
        return E

    def record_identity(self, AE: torch.Tensor) -> None:
        """Store the diagonal entries from the products ``AE`` of :meth:`identity_columns`."""
        rows = self.order[len(self.diag): len(self.diag) + AE.shape[1]]
        entries = AE.to(torch.float64).cpu()[rows, torch.arange(len(rows))]
        self.diag = torch.cat([self.diag, entries])

    def estimate(self) -> tuple[float, float, str]:
        """``(trace, stderr, method)`` from the state so far (NaN, inf before any data)."""
        if self.exact:
            j = len(self.diag)
            if j == self.n:
                return float(self.diag.sum()), 0.0, "exact"
            mean, err = _mean_stderr(self.diag)
            label = f"exact (partial: extrapolated from {j} of {self.n} diagonal entries)"
            return self.n * mean, self.n * err * math.sqrt(1 - j / self.n), label
        top = float((self.Q * self.AQ).sum())
        if self.Q.shape[1] >= self.n:
            return top, 0.0, "hutch++ (exact: the sketch spans the block)"
        W = self.Q.T @ self.G
        mean, err = _mean_stderr(((self.G - self.Q @ W) * (self.AG - self.AQ @ W)).sum(0).cpu())
        return top + mean, err, "hutch++" if self.Q.shape[1] else "hutchinson"

    def done(self, rtol: float) -> bool:
        """Exact and finished, or ``MIN_ROUNDS`` rounds of tests and ``t_{m-1} stderr <= rtol |trace|``
        (:func:`confidence_factor`; ``t`` is at least 2 for the sample sizes used here)."""
        if self.skipped:
            return True
        est, err, _ = self.estimate()
        if self.exact or self.sketch_room() == 0:
            return err == 0
        m = self.G.shape[1]
        return m >= MIN_ROUNDS * ROUND_COLUMNS and confidence_factor(m) * err <= rtol * abs(est)


class BlockTraces:
    """``tr(A_bb)`` of every diagonal block of ``op`` (any operator with ``.blocks``, usually
    a :class:`~hesse.operators.BlockDiagonalOperator`), all blocks sharing each product.

    ``rtol``: stop when every block has ``t stderr <= rtol |trace|``; ``budget``: at most
    this many columns of the view (``columns``) for any block; ``only``: estimate these
    blocks alone (the others are never multiplied). ``matvecs`` counts products
    of the parent operator: a column of the view costs one per block it is nonzero on. :meth:`run` does the work; :meth:`results` reads
    the estimates at any time (also after Ctrl-C). See the module docstring for the method.
    """

    def __init__(self, op: LinearOperator, rtol: float, budget: int, generator: torch.Generator,
                 only: set[str] | None = None):
        self.op, self.rtol, self.budget, self.gen = op, rtol, budget, generator
        self.names = list(op.blocks)
        self.slices = [op.blocks[n] for n in self.names]
        self.blocks = [_Block(s.stop - s.start, op.device) for s in self.slices]
        self.columns, self.matvecs = 0, 0
        shortest = min(budget, EXACT_BELOW)
        for name, block in zip(self.names, self.blocks):
            block.skipped = only is not None and name not in only
            if block.n <= shortest and not block.skipped:
                block.start_exact(generator)

    def finished(self) -> bool:
        return all(b.done(self.rtol) for b in self.blocks)

    def run(self, on_columns: Callable[[int], None] = lambda n: None) -> None:
        """Rounds (or identity-only passes) until every block is done or the budget is spent;
        ``on_columns`` gets the view columns of each pass."""
        while not self.finished() and self._per_block_room() > 0:
            if any(b.sketch_room() and not b.done(self.rtol) for b in self.blocks):
                self._round(on_columns)
            else:
                left = max(b.n - len(b.diag) for b in self.blocks if b.exact)
                self._multiply(lambda i: None, min(DEFAULT_CHUNK, self._per_block_room(), left), on_columns)
            self._switch_to_exact()

    def _per_block_room(self) -> int:
        """Columns each unfinished block can still get within the budget."""
        return self.budget - self.columns

    def results(self, interrupted: bool = False) -> dict[str, TraceResult]:
        """Every block's :class:`~hesse.results.TraceResult` (``matvecs``: all parent products)."""
        out = {}
        for name, block in zip(self.names, self.blocks):
            est, err, method = block.estimate()
            out[name] = TraceResult(est, err, self.matvecs, method, interrupted)
        return out

    def _multiply(self, columns: Callable[[int], torch.Tensor | None], width: int,
                  on_columns: Callable[[int], None]) -> list[torch.Tensor | None]:
        """One product of ``op`` on ``width`` columns: estimated block ``i`` puts ``columns(i)``
        (``[n_i, <= width]`` or ``None``) in its rows, exact blocks their next identity columns
        (and record the entries). Returns each block's products of ``columns(i)`` (or ``None``)."""
        X = torch.zeros(self.op.size, width, dtype=torch.float64)
        own = [None if b.exact else columns(i) for i, b in enumerate(self.blocks)]
        for s, b, cols in zip(self.slices, self.blocks, own):
            cols = b.identity_columns(width) if b.exact else cols
            if cols is not None:
                X[s, : cols.shape[1]] = cols.cpu()
        filled = sum(int((X[s].abs().sum(0) > 0).sum()) for s in self.slices)
        AX = self.op.matmat(X.to(self.op.dtype).to(self.op.device)).to(torch.float64)
        self.columns += width
        self.matvecs += filled
        on_columns(width)
        for s, b in zip(self.slices, self.blocks):
            if b.exact:
                b.record_identity(AX[s, : min(width, b.n - len(b.diag))])
        return [None if cols is None else AX[s, : cols.shape[1]] for s, cols in zip(self.slices, own)]

    def _round(self, on_columns: Callable[[int], None]) -> None:
        """Pass 1: ``[Omega_b, G_b]`` (sketch and test probes); pass 2: the new basis columns."""
        left = self._per_block_room()
        c_s, c_r = (min(ROUND_COLUMNS, left // 3),) * 2 if left >= 3 else (0, left)
        Omega = isotropic_probes(self.op, c_s, generator=self.gen).to(torch.float64).cpu()
        G = isotropic_probes(self.op, c_r, generator=self.gen).to(torch.float64).cpu()
        sketch = [min(c_s, b.sketch_room()) for b in self.blocks]
        products = self._multiply(
            lambda i: torch.cat([Omega[self.slices[i], : sketch[i]], G[self.slices[i]]], 1)
            if self.blocks[i].sketch_room() and not self.blocks[i].done(self.rtol) else None, c_s + c_r, on_columns)
        for s, b, k, AX in zip(self.slices, self.blocks, sketch, products):
            if AX is not None:
                b.Y, b.G, b.AG = AX[:, :k], torch.cat([b.G, G[s].to(AX.device)], 1), torch.cat([b.AG, AX[:, k:]], 1)
        for b in self.blocks:  # a block done on its new tests needs no basis products
            if b.done(self.rtol):
                b.Y = b.Y[:, :0]
        width = max((b.Y.shape[1] for b in self.blocks if not b.exact), default=0)
        if width and width <= self._per_block_room():
            new = [None if b.exact or not b.Y.shape[1] else orthonormalize_against(b.Y, b.Q)[0] for b in self.blocks]
            products = self._multiply(lambda i: new[i], width, on_columns)
            for b, Q, AQ in zip(self.blocks, new, products):
                if AQ is not None:
                    b.Q, b.AQ, b.Y = torch.cat([b.Q, Q], 1), torch.cat([b.AQ, AQ], 1), b.Y[:, :0]

    def _switch_to_exact(self) -> None:
        """Make a block exact when its ``n_b`` identity columns cost no more than the columns
        the unfinished estimators are still expected to need (and fit in the budget)."""
        need = 0.0
        for b in self.blocks:
            if b.exact or b.done(self.rtol) or b.G.shape[1] < SWITCH_ROUNDS * ROUND_COLUMNS:
                continue
            est, err, _ = b.estimate()
            ratio = confidence_factor(b.G.shape[1]) * err / (self.rtol * abs(est)) if est else math.inf
            need = max(need, 3 * b.G.shape[1] * (ratio**2 - 1))
        room = min(need, self.budget - self.columns)
        for b in self.blocks:
            if not b.exact and not b.done(self.rtol) and b.n <= room:
                b.start_exact(self.gen)


SAMPLED_FIRST_ROUND = 32  # columns of the first data pass of SampledBlockTraces
SAMPLED_GROWTH = 4  # a later pass draws at most this many times the columns so far
SAMPLED_COLUMN_COST = 0.5  # a square-root column against a curvature product (bench: 0.36-0.6)


class SampledBlockTraces:
    """``tr(A_bb)`` of every block from columns ``w`` of a random square root (``E[w wᵀ] = A``):
    the mean of ``‖w_b‖²`` with its sample stderr, stopping when every block has
    ``t_{m-1} stderr <= rtol · trace`` (:func:`confidence_factor`) or ``budget`` columns are drawn.

    ``sample(columns, seed)`` returns ``[P, columns]`` (one data pass). A pass draws
    :data:`SAMPLED_FIRST_ROUND` columns, then the number the slowest block is predicted to
    need (stderr ``~ 1/sqrt(m)``, 20% margin), at most :data:`SAMPLED_GROWTH` times the
    columns so far and at most :data:`SAMPLED_PASS_BYTES` of ``W`` (``itemsize`` bytes per
    entry: 10.6M MiniLM weights in float32 take 25 columns a pass). Same interface as
    :class:`BlockTraces` (``columns`` = ``matvecs`` = columns drawn).
    """

    def __init__(self, sample: Callable[[int, int], torch.Tensor], blocks: dict[str, slice], rtol: float,
                 budget: int, seed: int, itemsize: int = 8):
        self.sample, self.rtol, self.budget, self.seed = sample, rtol, budget, seed
        self.names, self.slices = list(blocks), list(blocks.values())
        self.pass_width = max(2, SAMPLED_PASS_BYTES // (max(s.stop for s in self.slices) * itemsize))
        self.squares = torch.zeros(len(self.names), 0, dtype=torch.float64)  # ‖w_b‖² per block and column
        self.columns = self.matvecs = self.passes = 0
        self.active = torch.ones(len(self.names), dtype=torch.bool)  # the blocks whose rtol stops it

    @property
    def square_root_columns(self) -> int:
        return self.columns

    def _estimates(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.squares.shape[1]
        mean = self.squares.mean(1) if m else torch.full((len(self.names),), math.nan, dtype=torch.float64)
        err = self.squares.std(1) / math.sqrt(m) if m > 1 else torch.full_like(mean, math.inf)
        return mean, err

    def block_needs(self) -> torch.Tensor:
        """Columns in total each block is predicted to need (0 when done): ``m (t stderr / (rtol
        trace))²`` with a 20% margin, stderr ``~ 1/sqrt(m)``."""
        m = self.squares.shape[1]
        if m < 2:
            return torch.full((len(self.names),), SAMPLED_FIRST_ROUND)
        mean, err = self._estimates()
        ratio = confidence_factor(m) * err / (self.rtol * mean.abs())
        ratio = torch.where(err == 0, torch.zeros_like(ratio), ratio)  # zero blocks (and exact zeros) are done
        return torch.where(ratio <= 1, 0, torch.ceil(1.2 * m * ratio**2)).long()

    def needed_columns(self) -> int:
        """Columns in total the slowest active block is predicted to need (0 when all are done)."""
        return int(self.block_needs()[self.active].max()) if bool(self.active.any()) else 0

    def finished(self) -> bool:
        return self.needed_columns() == 0

    def run(self, on_columns: Callable[[int], None] = lambda n: None) -> None:
        """Passes until every block is within ``rtol`` or the budget is spent."""
        while self.step(on_columns):
            pass

    def step(self, on_columns: Callable[[int], None] = lambda n: None) -> bool:
        """One data pass of the columns predicted to be needed; False when there is nothing to do."""
        need = self.needed_columns()
        if need == 0 or self.columns >= self.budget:
            return False
        width = min(max(need - self.columns, 2), self.budget - self.columns, self.pass_width,
                    max(SAMPLED_GROWTH * self.columns, SAMPLED_FIRST_ROUND))
        W = self.sample(width, self.seed + 7919 * self.passes)
        squares = torch.stack([(W[s].to(torch.float64) ** 2).sum(0) for s in self.slices]).cpu()
        del W
        self.squares = torch.cat([self.squares, squares], 1)
        self.columns += width
        self.matvecs, self.passes = self.columns, self.passes + 1
        on_columns(width)
        return True

    def results(self, interrupted: bool = False) -> dict[str, TraceResult]:
        """Every block's :class:`~hesse.results.TraceResult` (``matvecs``: square-root columns)."""
        mean, err = self._estimates()
        return {n: TraceResult(float(mean[i]), float(err[i]), self.columns, "sampled square root", interrupted)
                for i, n in enumerate(self.names)}


class AutoBlockTraces:
    """Sampled square roots for the blocks where they are predicted to be cheaper, per-block
    Hutch++ for the rest.

    Runs the first pass of :class:`SampledBlockTraces` (as it would alone), which predicts for
    each block ``b`` the columns ``k_b`` it needs for ``rtol``. Sampling on to ``K`` columns
    finishes the blocks with ``k_b <= K``; Hutch++ (:class:`BlockTraces`, ``only`` the others)
    costs each of the others at least ``f_b`` products: one round, ``3 ROUND_COLUMNS``, or ``n_b``
    for a block it computes exactly (at most :data:`EXACT_BELOW` entries). ``K`` minimises
    ``c K + Σ_{k_b > K} f_b`` with ``c`` = :data:`SAMPLED_COLUMN_COST` (one backward against a
    product's forward-mode and backward work; measured 0.36-0.6 on the bench's GGNs). Sampling
    covers many blocks with one backward; Hutch++ wins on a block whose spectrum decays (its
    sketch takes the top) and on small blocks. ``matvecs`` counts both estimators' columns.
    """

    def __init__(self, sampled: SampledBlockTraces, hutch: Callable[[set[str]], BlockTraces], sizes: list[int]):
        self.sampled, self.make_hutch, self.hutch = sampled, hutch, None
        self.floors = torch.tensor([n if n <= EXACT_BELOW else min(n, 3 * ROUND_COLUMNS) for n in sizes])
        self.decided = False

    @property
    def matvecs(self) -> int:
        return self.sampled.matvecs + (self.hutch.matvecs if self.hutch is not None else 0)

    @property
    def square_root_columns(self) -> int:
        return self.sampled.columns

    def finished(self) -> bool:
        return self.decided and self.sampled.needed_columns() == 0 and (self.hutch is None or self.hutch.finished())

    def run(self, on_columns: Callable[[int], None] = lambda n: None) -> None:
        if not self.decided:
            self.sampled.step(on_columns)
            self._split()
        if self.hutch is not None:
            self.hutch.run(on_columns)
        self.sampled.run(on_columns)

    def _split(self) -> None:
        """Choose ``K`` (see the class docstring) and hand the blocks with ``k_b > K`` to Hutch++."""
        needs = self.sampled.block_needs()
        cost = {int(K): SAMPLED_COLUMN_COST * int(K) + int(self.floors[needs > K].sum())
                for K in [self.sampled.columns, *needs.tolist()]}
        K = min(cost, key=lambda k: (cost[k], -k))
        handed = needs > K
        self.sampled.active = ~handed
        if bool(handed.any()):
            self.hutch = self.make_hutch({n for n, h in zip(self.sampled.names, handed.tolist()) if h})
        self.decided = True

    def results(self, interrupted: bool = False) -> dict[str, TraceResult]:
        """Each block's estimate from the estimator that owns it (``matvecs``: both estimators' columns)."""
        found = self.sampled.results(interrupted)
        if self.hutch is not None:
            hutch = self.hutch.results(interrupted)
            found.update({n: hutch[n] for n, mine in zip(self.sampled.names, self.sampled.active.tolist()) if not mine})
        return {n: TraceResult(r.estimate, r.stderr, self.matvecs, r.method, r.interrupted) for n, r in found.items()}
