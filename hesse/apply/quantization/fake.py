"""Fake (simulated) quantization of a copy of the model.

Weights: symmetric, per output channel (row ``r`` of the weight), straight rounding
(HAWQ-V3, Yao et al. 2021, without its dyadic rescaling):

.. math::

    s_r = \\frac{\\max_c |W_{rc}|}{2^{b-1} - 1}, \\qquad
    Q_b(W)_{rc} = s_r \\, \\mathrm{clamp}\\big(\\mathrm{round}(W_{rc} / s_r), -(2^{b-1}-1), 2^{b-1}-1\\big).

Activations (optional): the floating inputs of every quantized module (its first three
positional arguments or ``input/query/key/value``; never masks) are quantized
asymmetrically per tensor with a range ``[min, max]`` calibrated on data,
``s = (max − min)/(2^{b_a} − 1)``, ``Q(x) = s · round((clamp(x, min, max) − min)/s) + min``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from hesse.apply.quantization.layers import QuantLayer
from hesse.errors import HesseError
from hesse.operators import Objective
from hesse.operators.data import to_device


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(W)``: symmetric per-output-channel (dim 0) rounding to ``bits`` bits (``bits ≥ 2``);
    an all-zero channel stays zero."""
    if not isinstance(bits, int) or bits < 2:
        raise HesseError(f"symmetric quantization needs at least 2 bits, got {bits!r}.")
    levels = 2 ** (bits - 1) - 1
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(flat / scale), -levels, levels) * scale).reshape(weight.shape)


def quantized_weights(model: nn.Module, layers: Sequence[QuantLayer], bits: Sequence[int]) -> dict[str, torch.Tensor]:
    """``{parameter name: quantized tensor}`` with layer ``i`` at ``bits[i]`` (row blocks of a
    packed weight quantized separately); the model is only read."""
    if len(bits) != len(layers):
        raise HesseError(f"got {len(bits)} bit widths for {len(layers)} layers.")
    values: dict[str, torch.Tensor] = {}
    for layer, width in zip(layers, bits):
        if layer.param not in values:
            values[layer.param] = model.get_parameter(layer.param).detach().clone()
        values[layer.param][layer.rows] = quantize_weight(values[layer.param][layer.rows], int(width))
    return values


def perturbation(weight: torch.Tensor, bits: int) -> float:
    """``‖Q_b(W) − W‖²``, the squared quantization error of HAWQ-V2's ``Ω``."""
    return float(((quantize_weight(weight, bits) - weight.detach()) ** 2).sum())


def quantized_copy(objective: Objective, layers: Sequence[QuantLayer], bits: Sequence[int],
                   act_bits: int | None = None, calibration: Iterable | None = None) -> nn.Module:
    """A deep copy of the objective's model with quantized weights and, with ``act_bits``,
    activation quantizers on the inputs of the quantized modules, their ranges calibrated on
    ``calibration`` batches (default: the objective's data). The original model is untouched."""
    model = copy.deepcopy(objective.model)
    with torch.no_grad():
        for name, value in quantized_weights(objective.model, layers, bits).items():
            model.get_parameter(name).copy_(value)
    if act_bits is None:
        return model
    if act_bits < 2:
        raise HesseError(f"activation quantization needs at least 2 bits, got {act_bits}.")
    modules = [model.get_submodule(p) for p in dict.fromkeys(q.module for q in layers if q.kind != "Embedding")]
    ranges = _calibrate(objective, model, modules, calibration)
    for module in modules:
        if id(module) in ranges:
            module.register_forward_pre_hook(_quantizer(*ranges[id(module)], act_bits), with_kwargs=True)
    return model


ACTIVATION_KWARGS = ("input", "query", "key", "value")  # never masks or other float arguments


def _activation(value, position: int | str) -> bool:
    """Whether an argument is an activation to quantize: a floating tensor among the first three
    positional arguments (``query, key, value`` of attention) or passed by one of those names."""
    named = position in ACTIVATION_KWARGS if isinstance(position, str) else position < 3
    return named and isinstance(value, torch.Tensor) and value.is_floating_point()


def _float_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for i, t in (*enumerate(args), *kwargs.items()) if _activation(t, i)]


def _calibrate(objective: Objective, model: nn.Module, modules: list[nn.Module],
               calibration: Iterable | None) -> dict[int, tuple[float, float]]:
    """``{id(module): (min, max)}`` of every module's floating inputs over the calibration batches."""
    ranges: dict[int, tuple[float, float]] = {}

    def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for t in _float_inputs(args, kwargs):
            lo, hi = ranges.get(id(module), (float("inf"), float("-inf")))
            ranges[id(module)] = (min(lo, float(t.min())), max(hi, float(t.max())))

    handles = [m.register_forward_pre_hook(observe, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            for batch in calibration if calibration is not None else objective.data:
                objective.forward(model, to_device(batch, objective.device))
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def _quantizer(lo: float, hi: float, bits: int):
    """A forward pre-hook that fake-quantizes every floating input to ``bits`` bits on ``[lo, hi]``."""
    scale = max(hi - lo, 1e-12) / (2 ** bits - 1)

    def quantize(t, position: int | str):
        if not _activation(t, position):
            return t
        return torch.round((t.clamp(lo, hi) - lo) / scale) * scale + lo

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        return tuple(quantize(a, i) for i, a in enumerate(args)), {k: quantize(v, k) for k, v in kwargs.items()}

    return hook
