"""The objective: a model, a criterion and a dataset, as one function of the parameters.

``Objective`` is the single place where hesse evaluates a user's model. Everything else
(curvature operators, landscapes, sharpness, the training monitor, the report, and the
applications) goes through it, so the options that define the loss (which parameters, how
the model is called, how samples are counted, the reduction) are defined once.

The full-data loss of a criterion with reduction

* ``"mean"`` is ``L(θ) = Σ_b (n_b / N) L_b(θ)``,
* ``"sum"``  is ``L(θ) = Σ_b L_b(θ)``,

where ``L_b`` is the criterion on batch ``b``, ``n_b`` its number of samples and ``N = Σ_b n_b``
(over all processes under ``torch.distributed``). Uneven batches are therefore exact.
Every evaluation runs ``torch.func.functional_call`` with parameter values substituted
(the current ones, or any ``at=`` point): the model's tensors, mode, ``requires_grad``
flags and ``.grad`` are never touched, and no copy of the model is made.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hesse._progress import progress_bar
from hesse.errors import HesseError
from hesse.operators._guards import (
    check_criterion_shapes,
    check_first_batch,
    check_model_mode,
    mode_signature,
    warn_if_threads_contend,
)
from hesse.operators.data import (
    Batch,
    BatchCache,
    DataSource,
    ForwardFn,
    all_reduce_sum,
    batch_checksum,
    default_forward,
    default_num_samples,
    sample_counter,
    to_device,
)

ParamSpec = None | str | nn.Module | nn.Parameter | Iterable[str | nn.Module | nn.Parameter]
CACHE_LIMIT_BYTES = 512 * 2**20
Point = torch.Tensor | Mapping[str, torch.Tensor] | None
"""Parameter values to evaluate at: ``None`` (the model's current values), a flat ``[P]``
vector over the selected parameters, or a dict ``{name: tensor}`` (missing names keep
their current values)."""

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
        chosen = set()
        for spec in specs:
            chosen.update(_match_parameters(model, named, spec))
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


def _match_parameters(model: nn.Module, named: dict[str, nn.Parameter], spec: Any) -> list[str]:
    """The parameter names one entry of ``params=`` selects."""
    ids = {id(p): n for n, p in named.items()}
    if isinstance(spec, nn.Parameter):
        if id(spec) not in ids:
            raise HesseError("a selected parameter does not belong to the model.")
        return [ids[id(spec)]]
    if isinstance(spec, nn.Module):
        found = [ids[id(p)] for p in spec.parameters() if id(p) in ids]
        if not found:
            raise HesseError(f"selected module {type(spec).__name__} has no parameters in the model.")
        return found
    if isinstance(spec, str):
        found = [n for n in named if fnmatch.fnmatchcase(n, spec)]
        if not found:
            raise HesseError(f"no parameter matches {spec!r}; names look like {list(named)[:4]}.")
        return found
    raise HesseError(f"cannot select parameters with a {type(spec).__name__}; use names, globs or modules.")


def resolve_reduction(criterion: Any, reduction: str | None) -> str:
    """``reduction`` or the criterion's own (``"mean"`` for a plain function); ``"mean"`` or ``"sum"``."""
    resolved = reduction if reduction is not None else getattr(criterion, "reduction", "mean")
    if resolved not in ("mean", "sum"):
        raise HesseError(
            f"criterion reduction is {resolved!r}, but curvature needs a scalar loss; use "
            "reduction='mean' or 'sum' (say which with reduction= for a plain function)."
        )
    return resolved


class _ModelCall(nn.Module):
    """Binds the user's forward hook to the model so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, forward: ForwardFn):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, batch: Batch):
        return self._forward(self.model, batch)


@dataclass
class Evaluation:
    """One pass of :meth:`Objective.evaluate`: the full-data loss, the accuracy (``None``
    unless every batch is a classification), the flat gradient (if asked) and ``N``."""

    loss: float
    accuracy: float | None
    gradient: torch.Tensor | None
    num_samples: int


class Objective:
    """The full-data loss ``L(θ)`` of ``criterion(forward(model, batch))`` over ``data``.

    ``params`` selects the parameters ``θ`` (default: all trainable ones), ``forward(model,
    batch) -> (output, target)`` says how to call the model, ``num_samples(batch)`` how to
    count a batch's samples (default: the targets' leading dimension, or the targets that
    are not ``ignore_index``), ``reduction`` overrides ``criterion.reduction``.
    ``stochastic=True`` accepts active dropout; ``check_data=False`` accepts data that
    changes between passes. ``progress`` shows a bar per data pass (``None``: automatic).
    ``cache_data``: once two passes saw the same data, keep its batches on the device (up to
    :data:`CACHE_LIMIT_BYTES`) so later passes skip the loader; ``False`` re-reads the
    source every pass (data you change in place between calls).
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
        check_data: bool = True,
        progress: bool | None = False,
        cache_data: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise HesseError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(criterion, type):
            raise HesseError(f"criterion is the class {criterion.__name__}, not a loss: create one, e.g. "
                             f"{criterion.__name__}().")
        if not callable(criterion):
            raise HesseError("criterion must be a loss callable criterion(output, target), e.g. nn.CrossEntropyLoss().")
        self.model, self.criterion = model, criterion
        self.data = DataSource(data)
        self.forward = forward or default_forward
        self.count_samples = sample_counter(criterion, num_samples)
        self.reduction = resolve_reduction(criterion, reduction)
        self.stochastic, self.check_data, self.progress = stochastic, check_data, progress
        self.params = select_parameters(model, params)
        check_model_mode(model, stochastic)
        self._call = _ModelCall(model, self.forward)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.param_names = list(self.params)
        self.param_shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        self.size = sum(self.numels)
        self._settings = dict(forward=forward, num_samples=num_samples, reduction=reduction,
                              stochastic=stochastic, check_data=check_data, progress=progress, cache_data=cache_data)
        self._cache = BatchCache(CACHE_LIMIT_BYTES if cache_data and check_data else 0)
        self._data_signature: tuple[int, float] | None = None
        self._checked_modes: tuple[bool, ...] | None = None
        self.num_samples: int | None = None
        self.passes = 0

    def restrict(self, params: ParamSpec) -> "Objective":
        """The same objective as a function of a subset of the parameters (in model order)."""
        names = set(select_parameters(self.model, params))
        unknown = names - set(self.param_names)
        if unknown:
            raise HesseError(f"parameters {sorted(unknown)} are not part of this objective.")
        return Objective(self.model, self.criterion, self.data.source,
                         params=[n for n in self.param_names if n in names], **self._settings)

    # ---- flat vectors <-> parameter tensors ---------------------------------------------
    @property
    def blocks(self) -> dict[str, slice]:
        """One slice of the flat vector per parameter tensor."""
        out, start = {}, 0
        for name, n in zip(self.param_names, self.numels):
            out[name] = slice(start, start + n)
            start += n
        return out

    def module_blocks(self) -> dict[str, slice]:
        """One slice per module (e.g. ``conv1`` holds ``conv1.weight`` and ``conv1.bias``).

        A module known only by its position (``1`` in an ``nn.Sequential``) is named with its
        type, ``"1 (Linear)"``, so tables and plots stay readable.
        """
        out: dict[str, slice] = {}
        for name, s in self.blocks.items():
            module = self._module_label(name.rsplit(".", 1)[0]) if "." in name else name
            if module in out and out[module].stop == s.start:
                out[module] = slice(out[module].start, s.stop)
            else:
                out[module if module not in out else name] = s
        return out

    def _module_label(self, path: str) -> str:
        if not path.rsplit(".", 1)[-1].isdigit():
            return path
        return f"{path} ({type(self.model.get_submodule(path)).__name__})"

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``[P]`` (or ``[P, K]`` -> ``[K, *shape]``) vector into named tensors."""
        if vector.shape[0] != self.size:
            raise HesseError(f"vector has {vector.shape[0]} entries, the parameters have {self.size}.")
        parts = torch.split(vector, self.numels, dim=0)
        if vector.ndim == 1:
            return {n: t.view(s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}
        K = vector.shape[1]
        return {n: t.T.reshape(K, *s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}

    def flatten(self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (a dict by name, or a list in order) into ``[P]``."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise HesseError(f"missing tensors for parameters {missing}.")
            tensors = [tensors[n] for n in self.param_names]
        if len(tensors) != len(self.param_names):
            raise HesseError(f"expected {len(self.param_names)} tensors, got {len(tensors)}.")
        return torch.cat([t.reshape(-1) for t in tensors])

    def parameters_vector(self) -> torch.Tensor:
        """The current values of the selected parameters as one flat vector."""
        return self.flatten([p.detach() for p in self.params.values()])

    def values(self, at: Point = None) -> dict[str, torch.Tensor]:
        """Detached parameter values by name: the current ones, or those of the point ``at``."""
        current = {n: p.detach() for n, p in self.params.items()}
        if at is None:
            return current
        if isinstance(at, torch.Tensor):
            if at.shape != (self.size,):
                raise HesseError(f"a point must be a flat [{self.size}] vector, got shape {list(at.shape)}.")
            return self.unflatten(at.detach().to(self.dtype).to(self.device))
        unknown = set(at) - set(current)
        if unknown:
            raise HesseError(f"{sorted(unknown)} are not selected parameters; names look like {self.param_names[:4]}.")
        for n, t in at.items():
            if tuple(t.shape) != tuple(current[n].shape):
                raise HesseError(f"value for {n!r} has shape {list(t.shape)}, the parameter {list(current[n].shape)}.")
        return {**current, **{n: t.detach().to(self.dtype).to(self.device) for n, t in at.items()}}

    # ---- one batch ------------------------------------------------------------------------
    def call_model(self, values: Mapping[str, torch.Tensor], batch: Batch,
                   buffers: Mapping[str, torch.Tensor] | None = None):
        """``(output, target)`` of the model on ``batch`` with parameter (and buffer) values substituted."""
        swapped = {f"model.{n}": t for n, t in values.items()}
        if buffers:
            swapped.update({f"model.{n}": t for n, t in buffers.items()})
        return torch.func.functional_call(self._call, swapped, (batch,), strict=False)

    def batch_loss(self, values: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The criterion on one batch at the given parameter values (a scalar tensor)."""
        output, target = self.call_model(values, batch)
        return self.criterion_loss(output, target)

    def criterion_loss(self, output: Any, target: Any) -> torch.Tensor:
        """``criterion(output, target)``, refused if shapes would broadcast or the loss is not a scalar."""
        check_criterion_shapes(self.criterion, output, target)
        return self.check_loss(self.criterion(output, target))

    @staticmethod
    def check_loss(loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise HesseError(
                f"the criterion returned {shape}, not a scalar; use reduction='mean' or 'sum' "
                "(not 'none') so the loss is one number."
            )
        return loss

    # ---- passes over the data ---------------------------------------------------------------
    def sum_over_data(self, per_batch: Callable[[Batch, int, float], torch.Tensor], desc: str) -> tuple[torch.Tensor, int]:
        """``(Σ_b per_batch(batch_b, b, w_b), N)`` over all batches and processes.

        ``w_b`` is the batch's weight in the loss (``n_b`` for a mean, 1 for a sum; divide by
        ``N`` for a mean). Checks that every pass sees the same data (count and values).
        """
        check_model_mode(self.model, self.stochastic)
        total: torch.Tensor | None = None
        count = 0
        checksum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._cache.start_pass()
        with sdpa_kernel(SDPBackend.MATH):  # fused attention has no forward-mode or second derivatives
            for index, batch in enumerate(self._batches(desc)):
                batch = to_device(batch, self.device)
                self._cache.add(batch)
                n = int(self.count_samples(batch))
                if n <= 0:
                    raise HesseError("a batch has no samples (or all its targets are ignore_index); drop such "
                                     "batches from the data.")
                if index == 0 and self._checked_modes != mode_signature(self.model):
                    warn_if_threads_contend()
                    check_first_batch(self.model, lambda: self.call_model(self.values(), batch), self.stochastic)
                    self._checked_modes = mode_signature(self.model)
                value = per_batch(batch, index, float(n) if self.reduction == "mean" else 1.0)
                total = value if total is None else total + value
                count += n
                if self.check_data:
                    checksum += batch_checksum(batch, self.device)
        assert total is not None  # DataSource refuses empty data
        stats = torch.stack([checksum.new_tensor(float(count)), checksum])
        all_reduce_sum(total)
        all_reduce_sum(stats)
        count = int(stats[0].item())
        seen_before = self._data_signature is not None
        self._check_same_data(count, float(stats[1].item()))
        self._cache.end_pass(same_data_as_before=seen_before and self.check_data)
        self.num_samples = count
        self.passes += 1
        return total, count

    def weighted_pass(self, per_batch: Callable[[Batch, int], torch.Tensor], desc: str) -> torch.Tensor:
        """The full-data combination ``Σ_b (n_b/N) f(batch_b)`` (mean) or ``Σ_b f(batch_b)`` (sum)."""
        total, count = self.sum_over_data(lambda batch, index, w: per_batch(batch, index) * w, desc)
        return total / count if self.reduction == "mean" else total

    def _batches(self, desc: str):
        source = self._cache.batches if self._cache.batches is not None else self.data
        total = len(self.data.source) if hasattr(self.data.source, "__len__") else None
        return progress_bar(iter(source), total=total, desc=desc, enabled=self.progress, unit="batch")

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

    # ---- first-order quantities ---------------------------------------------------------------
    def loss(self, at: Point = None) -> float:
        """The full-data loss at the current parameters (or at ``at``)."""
        values = self.values(at)
        with torch.no_grad():
            value = self.weighted_pass(lambda batch, _: self.batch_loss(values, batch).detach().reshape(1), "loss")
        self._check_finite(value, "loss", values)
        return float(value[0])

    def gradient(self, at: Point = None) -> torch.Tensor:
        """The full-data gradient ``∇L`` w.r.t. the selected parameters, flat ``[P]``."""
        values = self.values(at)
        grad_fn = torch.func.grad(self.batch_loss)
        gradient = self.weighted_pass(lambda batch, _: self.flatten(grad_fn(values, batch)), "gradient").detach()
        self._check_finite(gradient, "gradient", values)
        return gradient

    def _check_finite(self, value: torch.Tensor, what: str, values: Mapping[str, torch.Tensor]) -> None:
        if bool(torch.isfinite(value).all()):
            return
        bad = [n for n, t in values.items() if not bool(torch.isfinite(t).all())]
        cause = f"the parameters {bad[:3]} hold NaN or inf" if bad else "check the data for NaN/inf values"
        raise HesseError(f"the full-data {what} is NaN or inf: {cause}; or use float64 if the model overflows.")

    def evaluate(self, at: Point = None, *, gradient: bool = False,
                 buffers: Mapping[str, torch.Tensor] | None = None) -> Evaluation:
        """Loss, accuracy and (optionally) gradient in ONE pass, at ``at`` with ``buffers`` substituted.

        Accuracy compares ``argmax`` over the class dimension with integer targets
        (skipping the criterion's ``ignore_index``) or with one-hot/probability targets;
        it is ``None`` when the task is not a classification.
        """
        values = self.values(at)

        def per_batch(batch: Batch, _: int, weight: float) -> torch.Tensor:
            def loss_and_output(v):
                output, target = self.call_model(v, batch, buffers)
                loss = self.criterion_loss(output, target)
                return loss, (loss.detach(), output.detach() if isinstance(output, torch.Tensor) else output, target)

            if gradient:
                grads, (loss, output, target) = torch.func.grad(loss_and_output, has_aux=True)(values)
                grad = [self.flatten(grads) * weight]
            else:
                with torch.no_grad():
                    loss, (_, output, target) = loss_and_output(values)
                grad = []
            counts = accuracy_counts(output, target, getattr(self.criterion, "ignore_index", None))
            stats = [weight * loss.double(), *(counts or (0.0, 0.0)), float(counts is None)]
            return torch.cat([torch.stack([torch.as_tensor(s, dtype=torch.float64, device=self.device)
                                           for s in stats]), *[g.double() for g in grad]])

        total, count = self.sum_over_data(per_batch, "evaluate")
        norm = count if self.reduction == "mean" else 1
        loss, correct, seen, not_classification = total[:4].tolist()
        accuracy = correct / seen if not_classification == 0 and seen > 0 else None
        grad = (total[4:] / norm).to(self.dtype).detach() if gradient else None
        return Evaluation(loss / norm, accuracy, grad, count)

    def accuracy(self, at: Point = None) -> float | None:
        """The fraction of correctly classified targets (``None`` for a task that is not a classification)."""
        return self.evaluate(at).accuracy

    def per_sample_gradients(self, batch: Batch, at: Point = None, *, vectorize: bool = True) -> torch.Tensor:
        """``[n, P]``: row ``i`` is ``∇_θ criterion(forward(model, sample_i))``, each sample alone.

        Samples are the slices along the leading dimension of every tensor in ``batch``. For
        a ``"mean"`` criterion with one target per sample, the batch gradient is the mean
        of the rows (the sum for ``"sum"``). ``vectorize=False`` loops over samples instead of
        ``torch.func.vmap`` (for models that ``vmap`` cannot batch).
        """
        values = self.values(at)
        batch = to_device(batch, self.device)
        n = default_num_samples(batch)
        grad_fn = torch.func.grad(self.batch_loss)

        def one(sample: Batch) -> torch.Tensor:
            return self.flatten(grad_fn(values, _map_tensors(sample, lambda t: t.unsqueeze(0))))

        with sdpa_kernel(SDPBackend.MATH):
            if not vectorize:
                return torch.stack([one(_map_tensors(batch, lambda t, i=i: t[i])) for i in range(n)])
            try:
                return torch.func.vmap(one)(batch)
            except (RuntimeError, ValueError) as error:
                raise HesseError(
                    f"per-sample gradients could not be vectorised ({str(error)[:120]}); pass vectorize=False."
                ) from error

    def __repr__(self) -> str:
        return (f"Objective({type(self.model).__name__}, {len(self.param_names)} parameter tensors, "
                f"P={self.size}, reduction={self.reduction!r}, dtype={self.dtype}, device={self.device})")


def _map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """Apply ``fn`` to every tensor of a nested batch."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def accuracy_counts(output: Any, target: Any, ignore_index: int | None = None) -> tuple[float, float] | None:
    """``(correct, counted)`` for a classification output, ``None`` when the task is not one.

    Integer targets ``[N, ...]`` with outputs ``[N, C, ...]`` compare ``argmax`` over ``C``
    (targets equal to ``ignore_index`` are skipped); one-hot/probability targets of the
    output's shape compare ``argmax`` of both.
    """
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor) or output.ndim < 2:
        return None
    if not target.is_floating_point() and target.ndim == output.ndim - 1 and output.shape[1] > 1:
        keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        correct = (output.argmax(1) == target) & keep
        return float(correct.sum()), float(keep.sum())
    if target.is_floating_point() and target.shape == output.shape and output.shape[1] > 1:
        is_distribution = bool((target >= 0).all()) and bool(torch.allclose(target.sum(1), torch.ones(()).to(target)))
        if is_distribution:
            return float((output.argmax(1) == target.argmax(1)).sum()), float(target[:, 0].numel())
    return None


def as_objective(model_or_objective: nn.Module | Objective, criterion: Any = None, data: Any = None,
                 **settings: Any) -> Objective:
    """An :class:`Objective` given as one, or built from ``(model, criterion, data, **settings)``."""
    if isinstance(model_or_objective, Objective):
        given = [k for k, v in settings.items() if v is not None] + (["criterion"] if criterion is not None else []) \
            + (["data"] if data is not None else [])
        if given:
            raise HesseError(
                f"pass either an Objective or (model, criterion, data, ...), not both: {given} would be "
                "ignored; build the Objective with those settings instead."
            )
        return model_or_objective
    return Objective(model_or_objective, criterion, data, **{k: v for k, v in settings.items() if v is not None})
