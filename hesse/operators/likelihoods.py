"""Closed forms of the likelihoods behind ``nn.CrossEntropyLoss``, ``nn.MSELoss`` and
``nn.BCEWithLogitsLoss``, shared by :class:`~hesse.Fisher`, :class:`~hesse.GGN` and K-FAC.

A criterion is read as a negative log-likelihood ``ℓ(f, y) = -log p(y | f)`` and the batch
loss as ``s_b Σ_n ℓ(f_n, y_n)`` (:func:`scale_and_mask`). For these likelihoods the
Hessian of ``ℓ`` in the output, ``∇²_f ℓ``, is the Fisher ``E_y[g gᵀ]`` of ``g = ∇_f ℓ``:
``diag(p) - p pᵀ`` per sample (softmax ``p``), ``2 I`` and ``σ(1 - σ)`` elementwise.
"""

from __future__ import annotations

import torch
from torch import nn

from hesse.errors import HesseError


def supported(criterion) -> bool:
    """Whether :func:`check_likelihood` accepts ``criterion``."""
    try:
        check_likelihood(criterion)
    except HesseError:
        return False
    return True


def check_likelihood(criterion) -> None:
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


def scale_and_mask(criterion, reduction: str, output: torch.Tensor, target) -> tuple[float | torch.Tensor, torch.Tensor]:
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


def event_inner(criterion, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``gᵀu`` over one independent output (the class dimension for cross-entropy)."""
    if isinstance(criterion, nn.CrossEntropyLoss):
        return (g * u).sum(dim=2, keepdim=True)  # dim 0 is the K (or sample) axis
    return g * u


def random_root(criterion, reduction: str, kind: str, output: torch.Tensor, target, columns: int,
                generator: torch.Generator, labels: torch.Generator | None = None,
                mc_samples: int = 1) -> torch.Tensor:
    """``columns`` independent output-space vectors ``z`` (``[columns, *output.shape]``) with
    ``E[z zᵀ] = M_b``, the batch's output curvature of Fisher ``kind`` (``"true"``: also the GGN):

    * ``"true"``: ``z = √s R ξ`` with Rademacher ``ξ`` and a square root ``R Rᵀ = ∇²_f ℓ``
      (cross-entropy: ``R ξ = √p ⊙ ξ - p ⟨√p, ξ⟩``, as ``√p ⊙ √p = p`` sums to 1);
    * ``"empirical"``: ``z = √s ε g`` with one Rademacher sign ``ε`` per sample (``E[ε ε'] = 0``
      across samples, so ``E[z zᵀ] = s Σ_n g_n g_nᵀ``, the operator's terms);
    * ``"mc"``: ``z = √(s/m) Σ_j ε_j ĝ_j`` over the operator's own ``m`` sampled gradients
      (drawn from ``labels``, seeded as the operator's products are).
    """
    cross_entropy = isinstance(criterion, nn.CrossEntropyLoss)
    if cross_entropy and kind == "true" and target.dtype.is_floating_point:
        # probability targets (the GGN's case; the Fisher refuses them): ∇²_f ℓ = (Σ_c t_c)(diag p - p pᵀ)
        scale = 1.0 if reduction == "sum" else output.shape[1] / output.numel()
        mask = target.sum(dim=1, keepdim=True).clamp(min=0).sqrt()
    else:
        scale, mask = scale_and_mask(criterion, reduction, output, target)
    root = torch.sqrt(torch.as_tensor(scale, dtype=output.dtype, device=output.device)) * mask

    def signs(shape) -> torch.Tensor:
        draws = torch.randint(0, 2, (columns, *shape), generator=generator, device=output.device)
        return (2 * draws - 1).to(output.dtype)

    if kind == "empirical":  # the empirical Fisher's terms are whole samples
        sample = (output.shape[0], *[1] * (output.ndim - 1))
        return root * signs(sample) * observed_gradient(criterion, output, target)
    event = (output.shape[0], 1, *output.shape[2:]) if cross_entropy else output.shape
    if kind == "mc":
        gradients = [sampled_gradient(criterion, output, labels) for _ in range(mc_samples)]
        return root * sum(signs(event) * g for g in gradients) / mc_samples ** 0.5
    xi = signs(output.shape)
    if cross_entropy:
        p = torch.softmax(output, dim=1)
        return root * (p.sqrt() * xi - p * (p.sqrt() * xi).sum(dim=2, keepdim=True))
    if isinstance(criterion, nn.MSELoss):
        return root * 2.0 ** 0.5 * xi
    sigma = torch.sigmoid(output)
    return root * (sigma * (1 - sigma)).sqrt() * xi


def true_fisher_product(criterion, output: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    if isinstance(criterion, nn.CrossEntropyLoss):
        p = torch.softmax(output, dim=1).unsqueeze(0)
        return p * U - p * (p * U).sum(dim=2, keepdim=True)
    if isinstance(criterion, nn.MSELoss):
        return 2.0 * U
    sigma = torch.sigmoid(output)
    return (sigma * (1 - sigma)).unsqueeze(0) * U


def observed_gradient(criterion, output: torch.Tensor, target) -> torch.Tensor:
    """``∇_f ℓ(f, y)`` for the observed targets."""
    if isinstance(criterion, nn.CrossEntropyLoss):
        p = torch.softmax(output, dim=1)
        safe = torch.where(target == criterion.ignore_index, 0, target)
        return p - nn.functional.one_hot(safe, output.shape[1]).movedim(-1, 1).to(p.dtype)
    if isinstance(criterion, nn.MSELoss):
        return 2.0 * (output - target)
    return torch.sigmoid(output) - target


def sampled_gradient(criterion, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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


def batch_seed(seed: int, batch_index: int) -> int:
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    return (seed * 1_000_003 + batch_index * 7919 + rank * 104_729) % (2**63 - 1)
