"""Which weights to prune: targets, sparsity specifications and mask selection.

A mask is a boolean tensor of a weight's shape, ``True`` where the weight is kept. Scores
are "importance" values (higher = keep); the pruned weights are the ``k`` lowest scores,
selected by sorting (not by a threshold), so the requested count is hit exactly even
with ties:

* per layer: ``k_l = round(s_l · n_l)`` in every weight tensor ``l``;
* global: ``k = round(s · Σ_l n_l)`` over all tensors at once (scores must be comparable);
* N:M (Zhou et al. 2021; NVIDIA 2:4): in every group of ``M`` consecutive weights along
  the input dimension (``weight.reshape(out, -1)``), the ``M − N`` lowest are pruned.

Gradual pruning follows the cubic schedule of Zhu & Gupta (2017),
``s_t = s · (1 − (1 − t/T)³)``, ``t = 1..T``, so the last round reaches ``s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hesse.errors import HesseError
from hesse.operators import Objective, select_parameters

PRUNABLE = (nn.Linear, nn.Conv2d)
SCOPES = ("layer", "global")


@dataclass
class Sparsity:
    """A sparsity target: a fraction per tensor (``per_layer``), one global fraction, or N:M."""

    fraction: float | None = None
    per_layer: dict[str, float] | None = None
    scope: str = "layer"
    nm: tuple[int, int] | None = None

    def label(self) -> str:
        """``"2:4"``, ``"50% global"``, ``"70% per layer"`` or ``"per-layer targets"``."""
        if self.nm is not None:
            return f"{self.nm[0]}:{self.nm[1]}"
        if self.per_layer is not None:
            return "per-layer targets"
        return f"{100 * self.fraction:g}% {'global' if self.scope == 'global' else 'per layer'}"


def parse_sparsity(sparsity: float | Mapping[str, float] | None, nm: tuple[int, int] | str | None,
                   scope: str) -> Sparsity:
    """Check and combine ``sparsity=``, ``nm=`` and ``scope=`` into one :class:`Sparsity`."""
    if scope not in SCOPES:
        raise HesseError(f"scope must be 'layer' or 'global', got {scope!r}.")
    if (sparsity is None) == (nm is None):
        raise HesseError("give exactly one of sparsity=0.5 (a fraction) and nm=(2, 4) (N:M).")
    if nm is not None:
        n, m = _parse_nm(nm)
        return Sparsity(nm=(n, m), scope="layer")
    if isinstance(sparsity, Mapping):
        for name, s in sparsity.items():
            _check_fraction(s, f"sparsity[{name!r}]")
        return Sparsity(per_layer=dict(sparsity), scope="layer")
    _check_fraction(sparsity, "sparsity")
    return Sparsity(fraction=float(sparsity), scope=scope)


def _parse_nm(nm: tuple[int, int] | str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in (nm.split(":") if isinstance(nm, str) else nm))
    except (TypeError, ValueError):
        raise HesseError(f"nm must look like (2, 4) or '2:4' (keep N of every M), got {nm!r}.") from None
    if not 0 < n < m:
        raise HesseError(f"N:M sparsity needs 0 < N < M (keep N of every M weights), got {n}:{m}.")
    return n, m


def _check_fraction(value: Any, what: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise HesseError(f"{what} must be a fraction in [0, 1) of weights to remove, got {value!r}.")


def prunable_targets(model: nn.Module, params: Any = None, among: list[str] | None = None) -> list[str]:
    """The weight tensors to prune: ``params`` (names/globs/modules), default every
    ``nn.Linear`` and ``nn.Conv2d`` weight with ``requires_grad`` (and in ``among``, the
    objective's parameters, when given), in model order."""
    if params is not None:
        return list(select_parameters(model, params))
    names = {f"{path}.weight" if path else "weight" for path, module in model.named_modules()
             if isinstance(module, PRUNABLE) and module.weight.requires_grad}
    names &= set(among) if among is not None else names
    if not names:
        raise HesseError("the model has no nn.Linear or nn.Conv2d weights to prune; name them with params=[...].")
    return [n for n in dict(model.named_parameters()) if n in names]


def nm_compatible(model: nn.Module, names: list[str], spec: Sparsity, explicit: bool) -> tuple[list[str], list[str]]:
    """The tensors N:M can prune and a note for each left dense: with default targets, a weight
    whose inputs per output are not a multiple of ``M`` (e.g. a 3x3 convolution on one channel)
    is skipped; named explicitly, it is refused by :func:`nm_mask`."""
    if spec.nm is None or explicit:
        return names, []
    m = spec.nm[1]
    fits = [n for n in names if (model.get_parameter(n).numel() // model.get_parameter(n).shape[0]) % m == 0]
    notes = [f"{n} left dense: its inputs per output are not a multiple of {m}" for n in names if n not in fits]
    if not fits:
        raise HesseError(f"no weight has a multiple of {m} inputs per output; N:M pruning has nothing to prune.")
    return fits, notes


def layer_fractions(spec: Sparsity, names: list[str]) -> dict[str, float]:
    """The fraction of each tensor to prune under a per-layer target."""
    if spec.per_layer is None:
        return {n: float(spec.fraction) for n in names}
    unknown = sorted(set(spec.per_layer) - set(names))
    if unknown:
        raise HesseError(f"sparsity names {unknown} are not pruned tensors; they look like {names[:3]}.")
    return {n: float(spec.per_layer.get(n, 0.0)) for n in names}


def select_masks(scores: Mapping[str, torch.Tensor], spec: Sparsity, factor: float = 1.0
                 ) -> dict[str, torch.Tensor]:
    """Masks (True = kept) that remove the lowest scores to meet ``spec`` exactly.

    ``factor`` scales the target fractions (a round of gradual pruning, see :func:`schedule`);
    ``-inf`` scores (weights pruned in an earlier round) are always among the removed.
    """
    if spec.nm is not None:
        return {n: nm_mask(s, *spec.nm) for n, s in scores.items()}
    if spec.scope == "global":
        flat = torch.cat([t.reshape(-1) for t in scores.values()])
        keep = torch.split(keep_highest(flat, round(spec.fraction * factor * flat.numel())),
                           [t.numel() for t in scores.values()])
        return {n: k.view(t.shape) for (n, t), k in zip(scores.items(), keep)}
    fractions = layer_fractions(spec, list(scores))
    return {n: keep_highest(t.reshape(-1), round(fractions[n] * factor * t.numel())).view(t.shape)
            for n, t in scores.items()}


def keep_highest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of ``scores``' shape removing exactly its ``k`` lowest entries."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices] = False
    return keep.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in each group of ``m`` consecutive entries of ``scores.reshape(out, -1)``
    along the input dimension (of ``scores`` itself if 1-D), keep the ``n`` highest."""
    rows = scores.reshape(scores.shape[0], -1) if scores.ndim > 1 else scores.reshape(1, -1)
    if rows.shape[1] % m:
        raise HesseError(f"a weight of shape {list(scores.shape)} has {rows.shape[1]} inputs per output, "
                         f"not a multiple of {m}; N:M needs input sizes divisible by M (leave it out with params=).")
    groups = rows.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return keep.view(scores.shape)


def schedule(rounds: int) -> list[float]:
    """Fractions of the target reached after each round, cubic as in Zhu & Gupta (2017):
    ``1 − (1 − t/T)³`` for ``t = 1..T`` (the last is 1)."""
    if not isinstance(rounds, int) or rounds < 1:
        raise HesseError(f"rounds must be a positive integer, got {rounds!r}.")
    return [1 - (1 - t / rounds) ** 3 for t in range(1, rounds + 1)]


@dataclass
class PruneResult:
    """Masks (``True`` = kept) per weight tensor and, for OBS-type methods, the weight update.

    The pruned weights are ``(w + updates[name]) * masks[name]`` (:meth:`pruned_values`);
    ``updates`` is ``None`` for methods that only remove weights (magnitude, OBD).
    """

    method: str
    target: str
    masks: dict[str, torch.Tensor]
    updates: dict[str, torch.Tensor] | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_sparsity(self) -> dict[str, float]:
        """The fraction of removed weights in each tensor."""
        return {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items()}

    @property
    def sparsity(self) -> float:
        """The fraction of removed weights over all pruned tensors."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def pruned_values(self, weights: Mapping[str, torch.Tensor] | nn.Module | Objective) -> dict[str, torch.Tensor]:
        """The pruned tensors ``(w + δw) ⊙ mask`` from the original ``weights`` (a dict, model or objective)."""
        if isinstance(weights, Objective):
            weights = weights.values()
        elif isinstance(weights, nn.Module):
            weights = {n: p.detach() for n, p in weights.named_parameters()}
        out = {}
        for name, mask in self.masks.items():
            w = weights[name].detach()
            if self.updates is not None and name in self.updates:
                w = w + self.updates[name].to(w)
            out[name] = w * mask.to(w.device)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors): method, target, sparsity per tensor, timing, warnings."""
        return {"method": self.method, "target": self.target, "sparsity": self.sparsity,
                "layer_sparsity": self.layer_sparsity, "seconds": self.seconds,
                "warnings": list(self.warnings), "settings": dict(self.settings)}

    def __repr__(self) -> str:
        return (f"PruneResult(method={self.method!r}, target={self.target!r}, tensors={len(self.masks)}, "
                f"sparsity={self.sparsity:.4f}, updates={'yes' if self.updates else 'no'}, "
                f"seconds={self.seconds:.2f})")


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | PruneResult,
                updates: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Write the pruned weights into ``model`` in place: ``w ← (w + δw) ⊙ mask``; returns ``model``.

    ``masks`` may be a :class:`PruneResult` (its updates are used unless ``updates`` is given).
    """
    if isinstance(masks, PruneResult):
        updates = masks.updates if updates is None else updates
        masks = masks.masks
    named = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(named))
    if unknown:
        raise HesseError(f"masks name {unknown} that are not parameters of the model; names look like {list(named)[:3]}.")
    with torch.no_grad():
        for name, mask in masks.items():
            p = named[name]
            if updates is not None and name in updates:
                p.add_(updates[name].to(p))
            p.mul_(mask.to(p.device, p.dtype))
    return model

