"""Checks of behaviour, not of class names, that keep the objective honest.

* :func:`check_model_mode`: BatchNorm in train mode and active ``nn.Dropout`` layers are
  refused up front, with the fix (the common cases, named clearly).
* :func:`check_first_batch`: once per objective and per train/eval configuration of the
  model, the first batch runs twice without gradients (once when ``stochastic=True``, not
  at all then for a model without buffers). A buffer that a forward pass writes (running
  statistics of any normalisation layer in train mode, counters) is put back and refused;
  outputs that differ between the two runs (dropout inside ``nn.LSTM``, functional
  ``F.dropout``, any sampling) are refused unless ``stochastic=True``. Only the model's
  output is compared (exactly, no copies); when it differs, two more runs with a hook on
  every module find the first module whose output changed, for the message.
* :func:`check_criterion_shapes`: element-wise criteria whose output and target shapes
  differ (and would silently broadcast, e.g. ``[N, 1]`` against ``[N]`` to ``[N, N]``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hesse.errors import HesseError

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                nn.SoftMarginLoss, nn.PoissonNLLLoss)


def check_model_mode(model: nn.Module, stochastic: bool) -> None:
    """Refuse BatchNorm in train mode and active dropout layers, which make every pass different."""
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


def mode_signature(model: nn.Module) -> tuple[bool, ...]:
    """Every module's ``training`` flag: a re-check is due when this changes."""
    return tuple(m.training for m in model.modules())


def _fingerprint(value: Any) -> float:
    """A float summary of a module's output (tensors anywhere in it)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().double().sum()) + float(value.detach().double().abs().sum()) \
            if value.is_floating_point() else float(value.double().sum())
    if isinstance(value, (tuple, list)):
        return sum(_fingerprint(v) for v in value)
    if isinstance(value, dict):
        return sum(_fingerprint(v) for v in value.values())
    return 0.0


def _recorded_forward(model: nn.Module, run: Callable[[], Any]) -> list[tuple[str, float]]:
    """Run ``run()`` with a hook on every module recording ``(name, fingerprint of output)``."""
    trace: list[tuple[str, float]] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: trace.append((name, _fingerprint(o))))
        for name, module in model.named_modules()
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return trace


def check_first_batch(model: nn.Module, run: Callable[[], Any], stochastic: bool) -> None:
    """Run the first batch (up to) twice; refuse buffer writes and (unless ``stochastic``) randomness."""
    buffers = dict(model.named_buffers())
    if stochastic and not buffers:
        return
    versions = {n: b._version for n, b in buffers.items()}
    saved = {n: b.detach().clone() for n, b in buffers.items()}
    with torch.no_grad():
        first = run()
    written = [n for n, b in buffers.items() if b._version != versions[n]]
    if written:
        with torch.no_grad():
            for n in written:
                buffers[n].copy_(saved[n])
        module = written[0].rsplit(".", 1)[0] if "." in written[0] else "(the model)"
        kind = type(model.get_submodule(module)).__name__ if "." in written[0] else type(model).__name__
        raise HesseError(
            f"module '{module}' ({kind}) writes its buffer '{written[0]}' in a forward pass (train mode "
            "running statistics?); every product would change the model. It has been restored. Call "
            "model.eval() first, or put that module in eval mode."
        )
    if stochastic:
        return
    with torch.no_grad():
        second = run()
    if not _same(first, second):
        _refuse_randomness(model, run)


def _same(a: Any, b: Any) -> bool:
    """Exactly equal outputs (tensors anywhere in them; NaN equals NaN here)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()) \
            if a.is_floating_point() or a.is_complex() else torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b)


def _refuse_randomness(model: nn.Module, run: Callable[[], Any]) -> None:
    """Name the first module whose output differs between two runs, and refuse the model."""
    first, second = _recorded_forward(model, run), _recorded_forward(model, run)
    if len(first) != len(second):
        raise HesseError("the model ran different modules on the same batch twice; it is random or stateful.")
    changed = [name for (name, a), (_, b) in zip(first, second) if a != b and not (a != a and b != b)]
    name = changed[0] if changed else ""
    module = model.get_submodule(name) if name else model
    raise HesseError(
        f"the model is random: module '{name or '(the model)'}' ({type(module).__name__}) gave "
        "different outputs for the same batch (dropout in train mode, e.g. nn.LSTM(dropout=...) "
        "or F.dropout(training=True), or sampling). Call model.eval(), or pass stochastic=True "
        "to accept a random operator."
    )


def warn_if_threads_contend() -> None:
    """Warn once when torch's threads compete with other work for the cores.

    On a machine whose load average exceeds its core count, torch's OpenMP threads wait on
    each other: a small model's product measured 60x slower with 2 threads than with 1.
    """
    global _warned_threads
    if _warned_threads or torch.get_num_threads() <= 1 or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        _warned_threads = True
        warnings.warn(
            f"the machine is busy (load average {load:.1f} on {cores} cores) and torch uses "
            f"{torch.get_num_threads()} threads, which then wait on each other: products can be many "
            "times slower. Call torch.set_num_threads(1) (or the number of idle cores).",
            RuntimeWarning, stacklevel=4,
        )


_warned_threads = False


def check_criterion_shapes(criterion: Any, output: Any, target: Any) -> None:
    """Refuse element-wise criteria whose output and target would broadcast to another shape."""
    if not isinstance(criterion, _ELEMENTWISE):
        return
    if isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor) and output.shape != target.shape:
        raise HesseError(
            f"{type(criterion).__name__} got an output of shape {list(output.shape)} and a target of shape "
            f"{list(target.shape)}; they would broadcast to "
            f"{list(torch.broadcast_shapes(output.shape, target.shape)) if _broadcastable(output, target) else '(nothing)'}"
            " and compare the wrong pairs. Make them match, e.g. pass forward=lambda model, batch: "
            "(model(batch[0]).squeeze(-1), batch[1])."
        )


def _broadcastable(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
        return True
    except RuntimeError:
        return False
