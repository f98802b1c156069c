"""The common machinery of curvature operators over a whole dataset.

A curvature operator ``C`` of the full-data loss ``L(θ)`` of an :class:`Objective` is
assembled from per-batch curvatures ``C_b`` of the batch losses ``L_b`` with the same
sample weights as the loss:

* ``"mean"``: ``L = Σ_b (n_b / N) L_b``, so ``C = Σ_b (n_b / N) C_b``;
* ``"sum"``:  ``L = Σ_b L_b``,           so ``C = Σ_b C_b``;

Uneven batches therefore give exactly the curvature of the full-data loss. A subclass
implements only :meth:`CurvatureOperator._batch_products`, the ``K`` products of one
batch's curvature; the data pass, weighting and checks are the objective's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hesse.errors import HesseError
from hesse.operators.data import Batch, ForwardFn
from hesse.operators.linear import BlockDiagonalOperator, LinearOperator
from hesse.operators.objective import Objective, ParamSpec, as_objective, select_parameters

CHUNK_TRIALS = (4, 8, 16, 32)  # columns per batched backward timed on the first wide pass
UNTIMED_COLUMNS = 16  # the chunk before (or without) a measurement


class CurvatureOperator(LinearOperator):
    """Base class: a curvature matrix of an :class:`Objective`'s full-data loss.

    Build it from an objective, ``Hessian(objective)``, or from the objective's arguments,
    ``Hessian(model, criterion, data, params=..., forward=..., ...)`` (see :class:`Objective`).
    Products use the current parameter values (read at call time) and never modify the
    model, its mode, its ``requires_grad`` flags or its ``.grad``. ``max_columns``: the most
    columns one batch multiplies at once (a product of more columns is still one data pass);
    ``None`` (default) measures it (:meth:`_time_chunks`, ``.chunk_calibration``).
    """

    symmetric_by_construction = True
    max_columns: int | None = None
    chunk_calibration: dict[int, float] | None = None

    def __init__(
        self,
        model: nn.Module | Objective,
        criterion: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        data: Any = None,
        *,
        params: ParamSpec = None,
        forward: ForwardFn | None = None,
        num_samples: Callable[[Batch], int] | None = None,
        reduction: str | None = None,
        stochastic: bool | None = None,
        check_data: bool | None = None,
        progress: bool | None = None,
        cache_data: bool | None = None,
    ):
        self.objective = as_objective(
            model, criterion, data, params=params, forward=forward, num_samples=num_samples,
            reduction=reduction, stochastic=stochastic, check_data=check_data, progress=progress,
            cache_data=cache_data,
        )
        P = self.objective.size
        self.shape = (P, P)
        self.dtype, self.device = self.objective.dtype, self.objective.device

    # ---- what the objective defines ---------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.objective.model

    @property
    def criterion(self) -> Callable:
        return self.objective.criterion

    @property
    def param_names(self) -> list[str]:
        return self.objective.param_names

    @property
    def blocks(self) -> dict[str, slice]:
        """One slice of the flat vector per parameter tensor."""
        return self.objective.blocks

    @property
    def num_samples(self) -> int | None:
        """``N``, the number of samples of the data (known after the first pass)."""
        return self.objective.num_samples

    @property
    def passes(self) -> int:
        """Passes over the data so far (shared by all operators of the same objective)."""
        return self.objective.passes

    def module_blocks(self) -> dict[str, slice]:
        """One slice per module (e.g. ``conv1`` holds ``conv1.weight`` and ``conv1.bias``)."""
        return self.objective.module_blocks()

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.objective.unflatten(vector)

    def flatten(self, tensors) -> torch.Tensor:
        return self.objective.flatten(tensors)

    def parameters_vector(self) -> torch.Tensor:
        return self.objective.parameters_vector()

    def loss(self) -> float:
        """The full-data loss (see :meth:`Objective.loss`)."""
        return self.objective.loss()

    def gradient(self) -> torch.Tensor:
        """The full-data gradient, flat ``[P]`` (see :meth:`Objective.gradient`)."""
        return self.objective.gradient()

    # ---- views -----------------------------------------------------------------------
    def restrict(self, params: ParamSpec) -> "CurvatureOperator":
        """The same curvature for a subset of the parameters (a diagonal block, computed directly)."""
        return self._with_objective(self.objective.restrict(params))

    def _with_objective(self, objective: Objective) -> "CurvatureOperator":
        return type(self)(objective, **self._extra_kwargs())

    def _extra_kwargs(self) -> dict:
        """The subclass's own constructor arguments (method, kind, ...)."""
        return {}

    def block_diagonal(self, by: str | dict[str, Sequence[str]] = "module") -> BlockDiagonalOperator:
        """The block-diagonal view: one block per module, per parameter, or per given group.

        ``by`` is ``"module"``, ``"parameter"`` or a dict ``{block: [names or globs]}``.
        """
        if by == "module":
            return BlockDiagonalOperator(self, self.module_blocks())
        if by == "parameter":
            return BlockDiagonalOperator(self, self.blocks)
        if isinstance(by, dict):
            return self._grouped_blocks(by)
        raise HesseError(f"by must be 'module', 'parameter' or a dict of groups, got {by!r}.")

    def _grouped_blocks(self, by: dict[str, Sequence[str]]) -> BlockDiagonalOperator:
        groups = {g: list(select_parameters(self.model, spec)) for g, spec in by.items()}
        order = [n for names in groups.values() for n in names]
        if len(set(order)) != len(order):
            raise HesseError("a parameter appears in two groups; groups must not overlap.")
        op = self.restrict(order) if order != self.param_names else self
        slices, layout = {}, op.blocks  # the restricted operator follows the model's order
        for g, names in groups.items():
            idx = sorted(names, key=op.param_names.index)
            starts = [layout[n].start for n in idx]
            stops = [layout[n].stop for n in idx]
            if any(stops[i] != starts[i + 1] for i in range(len(idx) - 1)):
                raise HesseError(
                    f"group {g!r} is not contiguous in the model's parameter order; "
                    "group parameters that are adjacent in model.named_parameters()."
                )
            slices[g] = slice(starts[0], stops[-1])
        return BlockDiagonalOperator(op, slices)

    # ---- products ------------------------------------------------------------------------
    def _batch_products(
        self, params: dict[str, torch.Tensor], batch: Batch, V: dict[str, torch.Tensor], batch_index: int
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Products of one batch's curvature with K vectors, ``V[name]`` of shape ``[K, *shape]``.

        ``batch_index`` numbers the batches of a pass (for seeded sampling)."""
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """One data pass for all K columns; each batch multiplies them in chunks of at most
        ``max_columns``: the batched backward's memory grows with the chunk, and its cost per
        column depends on the model (digits CNN, 2 CPU threads: 2.1 gradients per column in
        chunks of 4, 3.7 in chunks of 32; digits MLP: 2.1 and 1.0)."""
        K = V.shape[1]
        vectors = self.objective.unflatten(V)
        names = self.objective.param_names

        def multiply(batch: Batch, index: int, params: dict, c: slice) -> torch.Tensor:
            with torch.enable_grad():
                products = self._batch_products(params, batch, {n: v[c] for n, v in vectors.items()}, index)
            return torch.cat([products[n].reshape(c.stop - c.start, -1) for n in names], dim=1)

        def per_batch(batch: Batch, index: int) -> torch.Tensor:
            params = self.objective.values()
            rows, start = [], 0
            if self.max_columns is None and K >= 2 * CHUNK_TRIALS[0] + CHUNK_TRIALS[1]:
                rows, start = self._time_chunks(lambda c: multiply(batch, index, params, c), K)
            width = self.max_columns or UNTIMED_COLUMNS
            rows += [multiply(batch, index, params, slice(lo, min(lo + width, K))) for lo in range(start, K, width)]
            return torch.cat(rows).T

        return self.objective.weighted_pass(per_batch, desc=f"{type(self).__name__} @ {K} vectors").detach()

    def _time_chunks(self, multiply: Callable[[slice], torch.Tensor], K: int) -> tuple[list[torch.Tensor], int]:
        """Multiply the first columns in chunks of ``CHUNK_TRIALS`` sizes (real work, nothing
        wasted; an untimed first chunk takes torch's one-time start-up of the batched backward),
        time each, and keep the size with the least time per column as ``max_columns``.
        Returns the rows done and the next column."""
        rows, start, cost = [multiply(slice(0, CHUNK_TRIALS[0]))], CHUNK_TRIALS[0], {}  # untimed: one-time start-up
        for width in CHUNK_TRIALS:
            if start + width > K:
                break
            self._synchronize()
            begin = time.perf_counter()
            rows.append(multiply(slice(start, start + width)))
            self._synchronize()
            cost[width] = (time.perf_counter() - begin) / width
            start += width
        self.chunk_calibration = cost
        self.max_columns = min(cost, key=cost.get)
        return rows, start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        o = self.objective
        return (
            f"{type(self).__name__}(params={len(o.param_names)} tensors, P={o.size}, "
            f"dtype={self.dtype}, device={self.device}, reduction={o.reduction!r})"
        )


def vmap_or_loop(fn: Callable, vectors: dict[str, torch.Tensor], vectorize: bool) -> dict[str, torch.Tensor]:
    """Apply ``fn`` to each of the K vectors (``[K, *shape]`` per name): vmapped, or in a loop."""
    K = next(iter(vectors.values())).shape[0]
    if K == 1:
        return {n: t.unsqueeze(0) for n, t in fn({n: v[0] for n, v in vectors.items()}).items()}
    if vectorize:
        return torch.func.vmap(fn)(vectors)
    outs = [fn({n: v[k] for n, v in vectors.items()}) for k in range(K)]
    return {n: torch.stack([o[n] for o in outs]) for n in outs[0]}

