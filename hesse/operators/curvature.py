"""The common machinery of curvature operators over a whole dataset.

A curvature operator ``C`` of the full-data loss ``L(θ)`` is assembled from per-batch
curvatures ``C_b`` of the batch losses ``L_b``. With the criterion's reduction:

* ``"mean"``: ``L = Σ_b (n_b / N) L_b``, so ``C = Σ_b (n_b / N) C_b``;
* ``"sum"``:  ``L = Σ_b L_b``,           so ``C = Σ_b C_b``;

where ``n_b`` is the number of samples in batch ``b`` and ``N = Σ_b n_b`` (over all
processes when ``torch.distributed`` is initialised). Uneven batches therefore give
exactly the curvature of the full-data loss. A subclass implements only
:meth:`_batch_products`, the ``K`` products of one batch's curvature.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from hesse.errors import HesseError
from hesse.operators.base import BlockDiagonalOperator, LinearOperator
from hesse.operators.data import (
    Batch,
    DataSource,
    ForwardFn,
    all_reduce_sum,
    batch_checksum,
    default_forward,
    sample_counter,
    to_device,
)

ParamSpec = None | str | nn.Module | nn.Parameter | Iterable[str | nn.Module | nn.Parameter]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class _ModelCall(nn.Module):
    """Binds the user's forward hook to the model so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, forward: ForwardFn):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, batch: Batch):
        return self._forward(self.model, batch)


def select_parameters(model: nn.Module, params: ParamSpec) -> dict[str, nn.Parameter]:
    """Pick the parameters to differentiate: all trainable ones, or by names/globs/modules.

    Names follow ``model.named_parameters()``; a glob (``"layers.*.weight"``) selects every
    match; a module selects its parameters; the order is always the model's own order.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise HesseError(
                "the model has no trainable parameters (all requires_grad=False); unfreeze some "
                "or select them explicitly with params=['layer.weight', ...]."
            )
    else:
        specs = [params] if isinstance(params, (str, nn.Module, nn.Parameter)) else list(params)
        ids = {id(p): n for n, p in named.items()}
        chosen = set()
        for spec in specs:
            if isinstance(spec, nn.Parameter):
                if id(spec) not in ids:
                    raise HesseError("a selected parameter does not belong to the model.")
                chosen.add(ids[id(spec)])
            elif isinstance(spec, nn.Module):
                found = [ids[id(p)] for p in spec.parameters() if id(p) in ids]
                if not found:
                    raise HesseError(f"selected module {type(spec).__name__} has no parameters in the model.")
                chosen.update(found)
            elif isinstance(spec, str):
                found = [n for n in named if fnmatch.fnmatchcase(n, spec)]
                if not found:
                    raise HesseError(
                        f"no parameter matches {spec!r}; names look like {list(named)[:4]}."
                    )
                chosen.update(found)
            else:
                raise HesseError(f"cannot select parameters with a {type(spec).__name__}; use names, globs or modules.")
    if not chosen:
        raise HesseError("no parameters selected; pass names, globs or modules in params=.")
    selected = {n: p for n, p in named.items() if n in chosen}
    dtypes = {p.dtype for p in selected.values()}
    devices = {p.device for p in selected.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise HesseError(
            f"selected parameters mix dtypes {dtypes} or devices {devices}; cast the model with "
            "model.to(dtype, device) first."
        )
    return selected


def check_model_mode(model: nn.Module, stochastic: bool) -> None:
    """Refuse BatchNorm in train mode and active dropout, which make products noisy."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise HesseError(
                f"BatchNorm layer '{name}' is in train mode: its output depends on the batch and "
                "each pass would update its running statistics. Call model.eval() first (the "
                "curvature then uses the running statistics)."
            )
        if isinstance(module, _DROPOUT) and module.training and module.p > 0 and not stochastic:
            raise HesseError(
                f"dropout layer '{name}' is active (train mode, p={module.p}): products would be "
                "random. Call model.eval(), or pass stochastic=True to accept a random operator."
            )


class CurvatureOperator(LinearOperator):
    """Base class: a curvature matrix of ``criterion(forward(model, batch))`` over ``data``.

    Products use the model's current parameter values (read at call time), never modify
    the model, its mode, its ``requires_grad`` flags or its ``.grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[torch.Tensor, Any], torch.Tensor],
        data: Any,
        *,
        params: ParamSpec = None,
        forward: ForwardFn | None = None,
        num_samples: Callable[[Batch], int] | None = None,
        reduction: str | None = None,
        stochastic: bool = False,
        progress: bool = False,
        check_data: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise HesseError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(criterion):
            raise HesseError("criterion must be a loss callable criterion(output, target), e.g. nn.CrossEntropyLoss().")
        self.model = model
        self.criterion = criterion
        self.data = DataSource(data)
        self.forward = forward or default_forward
        self.num_samples_fn = sample_counter(criterion, num_samples)
        self.reduction = reduction or getattr(criterion, "reduction", "mean")
        if self.reduction not in ("mean", "sum"):
            raise HesseError(
                f"criterion reduction is {self.reduction!r}, but curvature needs a scalar loss; "
                "use reduction='mean' or 'sum' (say which with reduction= for a plain function)."
            )
        self.stochastic = stochastic
        self.progress = progress
        self.check_data = check_data
        self._params = select_parameters(model, params)
        self._call = _ModelCall(model, self.forward)
        check_model_mode(model, stochastic)
        first = next(iter(self._params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.param_names = list(self._params)
        self.param_shapes = [p.shape for p in self._params.values()]
        self._numels = [p.numel() for p in self._params.values()]
        P = sum(self._numels)
        self.shape = (P, P)
        self._init_kwargs = dict(
            params=None, forward=forward, num_samples=num_samples, reduction=reduction,
            stochastic=stochastic, progress=progress, check_data=check_data,
        )
        self._data_signature: tuple[int, float] | None = None
        self.num_samples: int | None = None
        self.passes = 0

    # ---- flat vectors <-> parameter tensors -------------------------------------------
    @property
    def blocks(self) -> dict[str, slice]:
        """One slice of the flat vector per parameter tensor."""
        out, start = {}, 0
        for name, n in zip(self.param_names, self._numels):
            out[name] = slice(start, start + n)
            start += n
        return out

    def module_blocks(self) -> dict[str, slice]:
        """One slice per module (e.g. ``conv1`` holds ``conv1.weight`` and ``conv1.bias``)."""
        out: dict[str, slice] = {}
        for name, s in self.blocks.items():
            module = name.rsplit(".", 1)[0] if "." in name else name
            if module in out and out[module].stop == s.start:
                out[module] = slice(out[module].start, s.stop)
            else:
                key = module if module not in out else name
                out[key] = s
        return out

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``[P]`` (or ``[P, K]`` -> ``[K, *shape]``) vector into named tensors."""
        if vector.shape[0] != self.shape[0]:
            raise HesseError(f"vector has {vector.shape[0]} entries, the operator has {self.shape[0]}.")
        parts = torch.split(vector, self._numels, dim=0)
        if vector.ndim == 1:
            return {n: t.view(s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}
        K = vector.shape[1]
        return {n: t.T.reshape(K, *s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (a dict by name, or a list in order) into ``[P]``."""
        if isinstance(tensors, dict):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise HesseError(f"missing tensors for parameters {missing}.")
            tensors = [tensors[n] for n in self.param_names]
        if len(tensors) != len(self.param_names):
            raise HesseError(f"expected {len(self.param_names)} tensors, got {len(tensors)}.")
        return torch.cat([t.reshape(-1) for t in tensors])

    def parameters_vector(self) -> torch.Tensor:
        """The current values of the selected parameters as one flat vector."""
        return self.flatten([p.detach() for p in self._params.values()])

    # ---- views -----------------------------------------------------------------------
    def restrict(self, params: ParamSpec) -> "CurvatureOperator":
        """The same curvature for a subset of the parameters (a diagonal block, computed directly)."""
        names = set(select_parameters(self.model, params))
        unknown = names - set(self.param_names)
        if unknown:
            raise HesseError(f"parameters {sorted(unknown)} are not part of this operator.")
        return self._clone(params=[n for n in self.param_names if n in names])

    def _clone(self, **overrides) -> "CurvatureOperator":
        kwargs = {**self._init_kwargs, **self._extra_kwargs(), **overrides}
        return type(self)(self.model, self.criterion, self.data._batches, **kwargs)

    def _extra_kwargs(self) -> dict:
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
            groups = {g: list(select_parameters(self.model, spec)) for g, spec in by.items()}
            order = [n for names in groups.values() for n in names]
            if len(set(order)) != len(order):
                raise HesseError("a parameter appears in two groups; groups must not overlap.")
            op = self._clone(params=order) if order != self.param_names else self
            # the clone follows the model's order; build slices from its layout
            slices, layout = {}, op.blocks
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
        raise HesseError(f"by must be 'module', 'parameter' or a dict of groups, got {by!r}.")

    # ---- the data pass -------------------------------------------------------------------
    def _batch_products(
        self, params: dict[str, torch.Tensor], batch: Batch, V: dict[str, torch.Tensor], batch_index: int
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Products of one batch's curvature with K vectors, ``V[name]`` of shape ``[K, *shape]``.

        ``batch_index`` numbers the batches of a pass (for seeded sampling)."""
        raise NotImplementedError

    def _call_model(self, params: dict[str, torch.Tensor], batch: Batch):
        """``(output, target)`` of the model with the given parameters substituted."""
        return torch.func.functional_call(
            self._call, {f"model.{n}": p for n, p in params.items()}, (batch,), strict=False
        )

    def _batch_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        output, target = self._call_model(params, batch)
        loss = self.criterion(output, target)
        self._check_loss(loss)
        return loss

    @staticmethod
    def _check_loss(loss: torch.Tensor) -> None:
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise HesseError(
                f"the criterion returned {shape}, not a scalar; use reduction='mean' or 'sum' "
                "(not 'none') so the loss is one number."
            )

    def _batches(self, desc: str):
        batches = iter(self.data)
        if self.progress:
            total = len(self.data._batches) if hasattr(self.data._batches, "__len__") else None
            batches = tqdm(batches, desc=desc, total=total, leave=False)
        return batches

    def _params_detached(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._params.items()}

    def _weighted_pass(self, per_batch: Callable[[Batch, int], torch.Tensor], desc: str) -> torch.Tensor:
        """``Σ_b w_b f(batch_b)`` with sample weights, summed over processes, and the check
        that the data (count and content) are the same on every pass."""
        check_model_mode(self.model, self.stochastic)
        total: torch.Tensor | None = None
        count = 0
        checksum = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(self._batches(desc)):
            batch = to_device(batch, self.device)
            n = int(self.num_samples_fn(batch))
            if n <= 0:
                raise HesseError("a batch has no samples (or all its targets are ignore_index); drop such batches from the data.")
            weight = float(n) if self.reduction == "mean" else 1.0
            # fused attention kernels have no forward-mode or second derivatives
            with sdpa_kernel(SDPBackend.MATH):
                value = per_batch(batch, index) * weight
            total = value if total is None else total + value
            count += n
            if self.check_data:
                checksum += batch_checksum(batch, self.device)
        assert total is not None
        stats = torch.stack([checksum.new_tensor(float(count)), checksum])
        all_reduce_sum(total)
        all_reduce_sum(stats)
        count, checksum_value = int(stats[0].item()), float(stats[1].item())
        self._check_same_data(count, checksum_value)
        self.num_samples = count
        self.passes += 1
        return total / count if self.reduction == "mean" else total

    def _check_same_data(self, count: int, checksum: float) -> None:
        if self._data_signature is None:
            self._data_signature = (count, checksum)
            return
        count0, checksum0 = self._data_signature
        if count != count0:
            raise HesseError(
                f"the data changed between passes ({count0} samples, now {count}); curvature needs "
                "the same data on every pass: avoid drop_last with shuffle and random sampling."
            )
        if self.check_data and abs(checksum - checksum0) > 1e-6 * max(1.0, abs(checksum0)):
            raise HesseError(
                "the data changed between passes (different values, e.g. random augmentation); "
                "curvature needs the same data on every pass: turn augmentation off, or pass "
                "check_data=False to accept it."
            )

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        K = V.shape[1]
        vectors = self.unflatten(V)

        def per_batch(batch: Batch, index: int) -> torch.Tensor:
            params = self._params_detached()
            with torch.enable_grad():
                products = self._batch_products(params, batch, vectors, index)
            return torch.cat([products[n].reshape(K, -1) for n in self.param_names], dim=1).T

        return self._weighted_pass(per_batch, desc=f"{type(self).__name__} @ {K} vectors").detach()

    # ---- first-order quantities -------------------------------------------------------------
    def loss(self) -> float:
        """The full-data loss (sample-weighted, as the operator defines it)."""
        with torch.no_grad():
            value = self._weighted_pass(
                lambda batch, _: self._batch_loss(self._params_detached(), batch).detach().reshape(1),
                desc="loss",
            )
        return float(value[0])

    def gradient(self) -> torch.Tensor:
        """The full-data gradient of the loss w.r.t. the selected parameters, flat ``[P]``."""
        def per_batch(batch: Batch, _: int) -> torch.Tensor:
            grads = torch.func.grad(self._batch_loss)(self._params_detached(), batch)
            return self.flatten(grads)

        return self._weighted_pass(per_batch, desc="gradient").detach()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(params={len(self.param_names)} tensors, P={self.shape[0]}, "
            f"dtype={self.dtype}, device={self.device}, reduction={self.reduction!r})"
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

