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

from hesse.errors import HesseError
from hesse.operators.ggn import OutputSpaceCurvature
from hesse.operators.likelihoods import (
    batch_seed, check_likelihood, event_inner, observed_gradient, random_root, sampled_gradient, scale_and_mask,
    true_fisher_product,
)

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
        check_likelihood(self.criterion)
        self.kind, self.mc_samples, self.seed = kind, mc_samples, seed

    def _extra_kwargs(self) -> dict:
        return {"kind": self.kind, "mc_samples": self.mc_samples, "seed": self.seed}

    def has_square_root(self) -> bool:
        return True  # the constructor accepted the likelihood

    def _output_roots(self, output, target, columns, generator, batch_index):
        labels = torch.Generator(device=output.device).manual_seed(batch_seed(self.seed, batch_index))
        return random_root(self.criterion, self.objective.reduction, self.kind, output, target, columns, generator,
                           labels, self.mc_samples)

    def _output_products(self, output, target, U, batch_index):
        scale, mask = scale_and_mask(self.criterion, self.objective.reduction, output, target)
        if self.kind == "true":
            MU = true_fisher_product(self.criterion, output, U)
        elif self.kind == "empirical":
            g = observed_gradient(self.criterion, output, target)
            g = (g * mask).unsqueeze(0)
            per_sample = tuple(range(2, U.ndim))  # U is [K, N, ...]: an inner product per sample
            MU = g * (g * U).sum(dim=per_sample, keepdim=True)
        else:
            generator = torch.Generator(device=output.device)
            generator.manual_seed(batch_seed(self.seed, batch_index))
            MU = torch.zeros_like(U)
            for _ in range(self.mc_samples):
                g = sampled_gradient(self.criterion, output, generator) * mask
                MU = MU + g * event_inner(self.criterion, g.unsqueeze(0), U)
            MU = MU / self.mc_samples
        return scale * mask * MU
