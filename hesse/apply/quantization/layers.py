"""The quantizable layers of a model and what each costs: weights, MACs, size, BOPs.

A quantizable layer is the weight of an ``nn.Linear``, ``nn.Conv1d/2d/3d`` or
``nn.Embedding``, and each projection of an ``nn.MultiheadAttention``: its packed
``in_proj_weight`` ``[3E, E]`` is split into the row blocks ``q``, ``k``, ``v`` (or its
separate ``q/k/v_proj_weight``), and ``out_proj`` is an ``nn.Linear``. Hugging Face
attention projections (``query``, ``key``, ``value``, ``dense``) are plain ``nn.Linear``.
Rows of a weight are its output channels (transposed convolutions are not quantized).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hesse.errors import HesseError
from hesse.operators import Objective

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
FLOAT_BITS = 32


@dataclass
class QuantLayer:
    """One quantizable weight (or row block ``rows`` of one, for packed attention projections).

    ``module``: the name of the module that uses it; ``macs``: multiply-accumulates per
    sample (0 for an embedding lookup), measured on the first batch."""

    name: str
    param: str
    rows: slice
    kind: str
    module: str
    numel: int
    macs: float = 0.0


def find_layers(model: nn.Module, among: Sequence[str] | None = None,
                only: Iterable[str] | None = None) -> list[QuantLayer]:
    """The quantizable layers whose weight is among the parameter names ``among`` (default: all)
    and matches one of the globs ``only`` (on the layer or the parameter name), in model order."""
    allowed = set(among) if among is not None else None
    found: dict[str, QuantLayer] = {}
    for path, module in model.named_modules():
        for layer in _module_layers(path, module):
            if (allowed is None or layer.param in allowed) and layer.name not in found:
                found[layer.name] = layer
    layers = list(found.values())
    if only is not None:
        globs = list(only)
        layers = [q for q in layers if any(fnmatch.fnmatchcase(q.name, g) or fnmatch.fnmatchcase(q.param, g)
                                           for g in globs)]
    if not layers:
        raise HesseError("no quantizable layer (Linear, Conv, Embedding, MultiheadAttention) among the selected "
                         "parameters; select their weights in params= (or fix the layer globs).")
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return sorted(layers, key=lambda q: (order.get(q.param, -1), q.rows.start))


def _module_layers(path: str, module: nn.Module) -> list[QuantLayer]:
    """The quantizable weights a module owns directly."""
    prefix = f"{path}." if path else ""
    if isinstance(module, QUANTIZABLE):
        w = module.weight
        return [QuantLayer(path or type(module).__name__, f"{prefix}weight", slice(0, w.shape[0]),
                           type(module).__name__, path, w.numel())]
    if not isinstance(module, nn.MultiheadAttention):
        return []
    if module.in_proj_weight is not None:
        E = module.embed_dim
        return [QuantLayer(f"{prefix}{p}_proj", f"{prefix}in_proj_weight", slice(i * E, (i + 1) * E),
                           "MultiheadAttention", path, E * module.in_proj_weight.shape[1])
                for i, p in enumerate("qkv")]
    return [QuantLayer(f"{prefix}{p}_proj", f"{prefix}{p}_proj_weight", slice(0, getattr(module, f"{p}_proj_weight").shape[0]),
                       "MultiheadAttention", path, getattr(module, f"{p}_proj_weight").numel()) for p in "qkv"]


def measure_macs(objective: Objective, layers: list[QuantLayer]) -> None:
    """Set every layer's MACs per sample from one forward pass over the first batch (hooks on
    the model, removed afterwards): ``numel(W)/groups``-style products per output position."""
    model = objective.model
    per_module: dict[str, float] = {}

    def hook(path: str):
        def record(module: nn.Module, args: tuple, output) -> None:
            per_module[path] = per_module.get(path, 0.0) + _module_macs(module, args, output)
        return record

    paths = {q.module for q in layers} | {q.module.rsplit(".", 1)[0] for q in layers if q.module.endswith("out_proj")}
    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths if p]
    try:
        batch = next(iter(objective.data))
        with torch.no_grad():
            objective.call_model(objective.values(), batch)
        samples = max(int(objective.count_samples(batch)), 1)
    finally:
        for handle in handles:
            handle.remove()
    for q in layers:
        parent = q.module.rsplit(".", 1)[0]
        if q.kind == "MultiheadAttention":
            q.macs = per_module.get(q.module, 0.0) * q.numel / samples
        elif q.module.endswith("out_proj") and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            q.macs = per_module.get(parent, 0.0) * q.numel / samples
        elif q.kind != "Embedding":
            q.macs = per_module.get(q.module, 0.0) / samples


def _module_macs(module: nn.Module, args: tuple, output) -> float:
    """Multiply-accumulates of one call: ``numel(W) · output positions`` for Linear and Conv
    (a Conv weight already holds ``C_in / groups`` inputs per output channel); for a
    MultiheadAttention, the number of query tokens (each projection costs ``E²`` per token)."""
    if isinstance(module, nn.MultiheadAttention):
        return float(args[0].numel() // module.embed_dim)
    if isinstance(module, nn.Linear):
        return float(module.weight.numel() * (output.numel() // module.out_features))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        positions = output.numel() // output.shape[1] if output.ndim > 1 else 1
        return float(module.weight.numel() * positions)
    return 0.0


def layer_costs(layers: list[QuantLayer], bits: Sequence[int], act_bits: int | None = None) -> dict[str, np.ndarray]:
    """``{"size": numel · b (bits), "bops": MACs · b · b_a}``, each ``[L, len(bits)]``; ``b_a``
    is ``act_bits`` (32, float, when activations stay unquantized). BOPs: van Baalen et al. 2020,
    as used by HAWQ-V3."""
    widths = np.asarray(bits, dtype=float)[None, :]
    numel = np.array([q.numel for q in layers], dtype=float)[:, None]
    macs = np.array([q.macs for q in layers], dtype=float)[:, None]
    return {"size": numel * widths, "bops": macs * widths * float(act_bits or FLOAT_BITS)}
