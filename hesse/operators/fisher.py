"""Fisher information matrices of the full-data loss: true, Monte Carlo and empirical.

The criterion is read as a negative log-likelihood ``ℓ(f, y) = -log p(y | f)`` summed
over a sample's outputs, and the loss as ``L_b = s_b Σ_n ℓ(f_n, y_n)`` (``s_b`` = 1 for
``reduction="sum"``; 1/number of terms for ``"mean"``). Batches are then combined with
the same sample weights as :class:`hesse.Hessian`. With ``g = ∇_f ℓ``:

* ``"true"``: ``F = s Σ_n J_nᵀ E_{y~p(y|f_n)}[g gᵀ] J_n``, in closed form: equals the GGN
  for these likelihoods (Martens 2020, "New insights and perspectives on the natural
  gradient method");
* ``"mc"``: the same expectation from ``mc_samples`` labels drawn with a seeded generator
  (same seed, same operator), unbiased for ``"true"``;
* ``"empirical"``: ``s Σ_n ∇_θ ℓ(f_n, y_n) ∇_θ ℓ(f_n, y_n)ᵀ`` with the observed labels,
  computed as ``J_nᵀ g_n (g_nᵀ J_n v)`` without forming per-sample gradients.

Supported criteria (modules, so their settings can be read): ``nn.CrossEntropyLoss``
(class-index targets, class dimension 1, ``ignore_index`` honoured), ``nn.MSELoss``
(Gaussian with variance 1/2, so ``ℓ = ‖f - y‖²``) and ``nn.BCEWithLogitsLoss`` (Bernoulli).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hesse.errors import HesseError
from hesse.operators.ggn import OutputSpaceCurvature

KINDS = ("true", "mc", "empirical")


class Fisher(OutputSpaceCurvature):
    """Fisher information of the full-data loss; ``kind`` is ``"mc"``, ``"true"`` or ``"empirical"``."""

    def __init__(
        self, model, criterion=None, data=None, *, kind: str = "mc", mc_samples: int = 1, seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(model, criterion, data, **kwargs)
        if kind not in KINDS:
            raise HesseError(f"unknown Fisher kind {kind!r}; choose one of {KINDS}.")
        if mc_samples < 1:
            raise HesseError(f"mc_samples must be at least 1, got {mc_samples}.")
        _check_supported(self.criterion)
        self.kind, self.mc_samples, self.seed = kind, mc_samples, seed

    def _extra_kwargs(self) -> dict:
        return {"kind": self.kind, "mc_samples": self.mc_samples, "seed": self.seed}

    def _output_products(self, output, target, U, batch_index):
        scale, mask = _scale_and_mask(self.criterion, self.objective.reduction, output, target)
        if self.kind == "true":
            MU = _true_fisher_product(self.criterion, output, U)
        elif self.kind == "empirical":
            g = _observed_gradient(self.criterion, output, target)
            g = (g * mask).unsqueeze(0)
            per_sample = tuple(range(2, U.ndim))  # U is [K, N, ...]: an inner product per sample
            MU = g * (g * U).sum(dim=per_sample, keepdim=True)
        else:
            generator = torch.Generator(device=output.device)
            generator.manual_seed(_batch_seed(self.seed, batch_index))
            MU = torch.zeros_like(U)
            for _ in range(self.mc_samples):
                g = _sampled_gradient(self.criterion, output, generator) * mask
                MU = MU + g * _event_inner(self.criterion, g.unsqueeze(0), U)
            MU = MU / self.mc_samples
        return scale * mask * MU


def _check_supported(criterion) -> None:
    if isinstance(criterion, nn.CrossEntropyLoss):
        if criterion.weight is not None or criterion.label_smoothing != 0:
            raise HesseError(
                "Fisher needs an unweighted CrossEntropyLoss without label smoothing (it is not a "
                "likelihood otherwise); use hesse.GGN for this criterion."
            )
    elif isinstance(criterion, nn.BCEWithLogitsLoss):
        if criterion.weight is not None or criterion.pos_weight is not None:
            raise HesseError("Fisher needs an unweighted BCEWithLogitsLoss; use hesse.GGN for weighted losses.")
    elif not isinstance(criterion, nn.MSELoss):
        raise HesseError(
            f"Fisher does not know the likelihood of {type(criterion).__name__}; use "
            "nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss, or hesse.GGN for other losses."
        )


def _scale_and_mask(criterion, reduction: str, output: torch.Tensor, target) -> tuple[float | torch.Tensor, torch.Tensor]:
    """``s_b`` and a mask broadcastable to the output (0 where a target is ignored)."""
    mask = torch.ones((), dtype=output.dtype, device=output.device)
    if isinstance(criterion, nn.CrossEntropyLoss):
        if target.dtype.is_floating_point:
            raise HesseError("Fisher with CrossEntropyLoss needs class-index targets, not probabilities.")
        keep = target != criterion.ignore_index
        mask = keep.unsqueeze(1).to(output.dtype)
        terms = keep.sum().to(output.dtype)
    else:
        terms = output.numel()
    if reduction == "sum":
        return 1.0, mask
    return 1.0 / terms, mask


def _event_inner(criterion, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``gᵀu`` over one independent output (the class dimension for cross-entropy)."""
    if isinstance(criterion, nn.CrossEntropyLoss):
        return (g * u).sum(dim=2, keepdim=True)  # dim 0 is the K (or sample) axis
    return g * u


def _true_fisher_product(criterion, output: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    if isinstance(criterion, nn.CrossEntropyLoss):
        p = torch.softmax(output, dim=1).unsqueeze(0)
        return p * U - p * (p * U).sum(dim=2, keepdim=True)
    if isinstance(criterion, nn.MSELoss):
        return 2.0 * U
    sigma = torch.sigmoid(output)
    return (sigma * (1 - sigma)).unsqueeze(0) * U


def _observed_gradient(criterion, output: torch.Tensor, target) -> torch.Tensor:
    """``∇_f ℓ(f, y)`` for the observed targets."""
    if isinstance(criterion, nn.CrossEntropyLoss):
        p = torch.softmax(output, dim=1)
        safe = torch.where(target == criterion.ignore_index, 0, target)
        return p - nn.functional.one_hot(safe, output.shape[1]).movedim(-1, 1).to(p.dtype)
    if isinstance(criterion, nn.MSELoss):
        return 2.0 * (output - target)
    return torch.sigmoid(output) - target


def _sampled_gradient(criterion, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``∇_f ℓ(f, ŷ)`` for a label ``ŷ ~ p(y | f)``."""
    if isinstance(criterion, nn.CrossEntropyLoss):
        p = torch.softmax(output, dim=1)
        flat = p.movedim(1, -1).reshape(-1, p.shape[1])
        labels = torch.multinomial(flat, 1, generator=generator).view(flat.shape[0])
        onehot = nn.functional.one_hot(labels, p.shape[1]).to(p.dtype)
        return p - onehot.view(*p.movedim(1, -1).shape).movedim(-1, 1)
    if isinstance(criterion, nn.MSELoss):
        noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)
        return -(2.0 ** 0.5) * noise  # ŷ = f + ε/√2, g = 2(f - ŷ)
    sigma = torch.sigmoid(output)
    draws = torch.rand(output.shape, generator=generator, device=output.device, dtype=output.dtype)
    return sigma - (draws < sigma).to(output.dtype)


def _batch_seed(seed: int, batch_index: int) -> int:
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    return (seed * 1_000_003 + batch_index * 7919 + rank * 104_729) % (2**63 - 1)
