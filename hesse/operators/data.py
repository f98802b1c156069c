"""Data sources, the default forward call and sample-weighted passes over a dataset.

A data source is a ``DataLoader``, any re-iterable of batches, or a single batch.
A batch is ``(inputs, targets)`` (inputs may be a tensor, a tuple or a dict of tensors)
or a Hugging Face style dict with a ``"labels"`` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from hesse.errors import HesseError

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]]
"""``forward(model, batch) -> (output, target)``; the loss is ``criterion(output, target)``."""


def _is_tensor_tree(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, Mapping):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x)
    return False


def is_single_batch(data: Any) -> bool:
    """True for one batch (a tuple/list of tensors or a dict of tensors), False for a loader."""
    if isinstance(data, Mapping):
        return _is_tensor_tree(data)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _is_tensor_tree(data[0]) and (isinstance(data[1], torch.Tensor) or data[1] is None)
    return False


class DataSource:
    """Re-iterable view of the user's data (``source``) that refuses empty and one-shot sources."""

    def __init__(self, data: Any):
        if data is None:
            raise HesseError("no data given; pass a DataLoader, a list of (inputs, targets) batches or one batch.")
        if is_single_batch(data):
            self.source: Iterable = [data]
        elif isinstance(data, Iterator):
            raise HesseError(
                "data is a one-shot iterator (e.g. a generator or iter(loader)); curvature "
                "products need several passes, so pass the DataLoader itself or list(batches)."
            )
        elif isinstance(data, Iterable):
            self.source = data
        else:
            raise HesseError(
                f"cannot iterate over data of type {type(data).__name__}; pass a DataLoader, "
                "a list of (inputs, targets) batches or one batch."
            )

    def __iter__(self) -> Iterator[Batch]:
        empty = True
        for batch in self.source:
            empty = False
            yield batch
        if empty:
            raise HesseError("the data source is empty (no batches); check the DataLoader and its dataset.")


def default_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
    """Call the model on a batch and return ``(output, target)``.

    ``(inputs, targets)`` calls ``model(inputs)`` (``model(**inputs)`` for a dict);
    a dict batch calls ``model(**batch_without_labels)`` and takes ``batch["labels"]``.
    Outputs with a ``.logits`` attribute (Hugging Face) are reduced to the logits.
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise HesseError(
                "dict batch has no 'labels' entry; add one or pass forward=lambda model, batch: "
                "(output, target) to say how to call the model."
            )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        output, target = model(**inputs), batch["labels"]
    else:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise HesseError(
                "a batch must be (inputs, targets) or a dict with 'labels'; for anything else pass "
                "forward=lambda model, batch: (output, target)."
            )
        inputs, target = batch
        output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    output = getattr(output, "logits", output)
    if isinstance(output, Mapping) and "logits" in output:
        output = output["logits"]
    if isinstance(output, (tuple, list)):
        raise HesseError(
            f"the model returned a {type(output).__name__} of {len(output)} items, not a tensor; pass "
            "forward=lambda model, batch: (model(batch[0])[0], batch[1]) to pick the output to use."
        )
    return output, target


def default_num_samples(batch: Batch) -> int:
    """Number of samples in a batch: the leading dimension of its targets (or first tensor)."""
    if isinstance(batch, Mapping):
        first = batch.get("labels")
        if first is None:
            first = next(iter(batch.values()))
    else:
        first = batch[1] if isinstance(batch[1], torch.Tensor) else batch[0]
    while not isinstance(first, torch.Tensor):
        first = next(iter(first.values())) if isinstance(first, Mapping) else first[0]
    return int(first.shape[0]) if first.ndim > 0 else 1


def sample_counter(criterion: Any, num_samples: Callable[[Batch], int] | None = None) -> Callable[[Batch], int]:
    """How to count a batch's samples for sample weighting.

    ``num_samples`` if given; for a criterion with an ``ignore_index`` (cross-entropy, NLL)
    the targets that are not ignored, since the mean runs over those only; otherwise
    :func:`default_num_samples`.
    """
    if num_samples is not None:
        return num_samples
    ignore_index = getattr(criterion, "ignore_index", None)
    if ignore_index is None:
        return default_num_samples

    def count_kept_targets(batch: Batch) -> int:
        target = batch.get("labels") if isinstance(batch, Mapping) else batch[1]
        if isinstance(target, torch.Tensor) and not target.dtype.is_floating_point:
            return int((target != ignore_index).sum())
        return default_num_samples(batch)

    return count_kept_targets


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()}) if isinstance(batch, dict) \
            else {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_checksum(batch: Batch, device: torch.device) -> torch.Tensor:
    """An order-independent fingerprint of a batch's numbers, to detect data that changes
    between passes. Stays on ``device`` so it costs no synchronisation."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    stack: list[Any] = [batch]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.numel():
                total = total + x.detach().sum(dtype=torch.float64).to(device)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (tuple, list)):
            stack.extend(x)
    return total


def distributed_world() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (no-op without ``torch.distributed``)."""
    if distributed_world():
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x


def tensor_bytes(batch: Batch) -> int:
    """Bytes held by the tensors of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(tensor_bytes(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(tensor_bytes(v) for v in batch)
    return 0


class BatchCache:
    """The batches of a data source, kept (on the model's device) once two passes saw the same data.

    Curvature work passes over the same data hundreds of times; a ``DataLoader`` re-indexes
    and re-collates every sample each time, which for small models costs more than the
    products. After a pass whose data matched the previous pass (count and checksum), its
    batches are kept if they take at most ``limit_bytes``; later passes read them directly.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.batches: list[Batch] | None = None
        self._collecting: list[Batch] | None = None
        self._bytes = 0

    def start_pass(self) -> None:
        self._collecting = [] if self.batches is None and self.limit_bytes > 0 else None
        self._bytes = 0

    def add(self, batch: Batch) -> None:
        if self._collecting is None:
            return
        self._bytes += tensor_bytes(batch)
        if self._bytes > self.limit_bytes:
            self._collecting = None
        else:
            self._collecting.append(batch)

    def end_pass(self, same_data_as_before: bool) -> None:
        if self._collecting is not None and same_data_as_before:
            self.batches = self._collecting
        self._collecting = None
