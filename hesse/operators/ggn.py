"""The generalised Gauss-Newton matrix ``G = Σ_b w_b J_bᵀ ∇²_f L_b J_b`` (Schraudolph 2002).

``J_b`` is the Jacobian of the model output on batch ``b`` w.r.t. the parameters and
``∇²_f L_b`` the Hessian of the criterion w.r.t. that output. ``G`` drops the second
derivatives of the network from the Hessian; it is positive semi-definite whenever the
criterion is convex in the output (cross-entropy, MSE).
"""

from __future__ import annotations

from typing import Any

import torch

from hesse.errors import HesseError
from hesse.operators.curvature import UNTIMED_COLUMNS, CurvatureOperator
from hesse.operators.data import Batch
from hesse.operators.likelihoods import batch_seed, random_root, supported


class OutputSpaceCurvature(CurvatureOperator):
    """``C = Jᵀ M J``: a curvature defined by a matrix ``M`` in the model's output space.

    One batch costs one forward with a VJP, K forward-mode JVPs (``vmap``-ed) for ``J v``
    (or reverse-mode products where forward mode is missing) and K VJPs for ``Jᵀ w``. Subclasses implement :meth:`_output_products`.
    """

    def _output_products(
        self, output: torch.Tensor, target: Any, U: torch.Tensor, batch_index: int
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """``M @ u`` for each of the K output-space directions ``U`` (``[K, *output.shape]``)."""
        raise NotImplementedError

    def _output_roots(
        self, output: torch.Tensor, target: Any, columns: int, generator: torch.Generator, batch_index: int
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """``columns`` random output-space vectors ``z`` with ``E[z zᵀ] = M`` (``[columns, *output.shape]``)."""
        raise NotImplementedError

    def has_square_root(self) -> bool:
        """Whether :meth:`sample_square_root` works for this criterion (see :mod:`hesse.operators.likelihoods`)."""
        return supported(self.criterion)

    def square_root_sampler(self):
        return self.sample_square_root if self.has_square_root() else None

    def sample_square_root(self, columns: int, seed: int = 0) -> torch.Tensor:
        """``W`` (``[P, columns]``) of independent columns with ``E[w wᵀ] = C``, in one data pass.

        ``w = Σ_b √(ω_b) J_bᵀ z_b`` with ``ω_b`` the batch's weight in the loss and output-space
        vectors ``z_b`` with ``E[z_b z_bᵀ] = M_b`` drawn independently per batch (so cross-batch
        terms vanish in expectation). Each column costs one VJP, a backward pass, for all
        parameters at once: ``‖w_S‖²`` is an unbiased, non-negative estimate of the trace of
        the diagonal block ``C_SS`` for every set ``S`` of parameters simultaneously (used by
        :class:`hesse.linalg.block_estimators.SampledBlockTraces`).
        """
        if not self.has_square_root():
            raise HesseError(f"{type(self).__name__} has no sampled square root for {type(self.criterion).__name__}; "
                             "use nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss, or Hutch++ traces.")
        names = self.objective.param_names
        width = self.max_columns or UNTIMED_COLUMNS

        def per_batch(batch: Batch, index: int, weight: float) -> torch.Tensor:
            generator = torch.Generator(device=self.device).manual_seed(batch_seed(seed + 1_000_033, index))
            W = torch.empty(self.shape[0], columns, dtype=self.dtype, device=self.device)
            with torch.enable_grad():
                output, vjp_fn, target = torch.func.vjp(
                    lambda p: self._model_output(p, batch), self.objective.values(), has_aux=True)
                Z = self._output_roots(output.detach(), target, columns, generator, index) * weight ** 0.5
                for lo in range(0, columns, width):
                    chunk = _batched(lambda u: vjp_fn(u)[0], Z[lo:lo + width])
                    W[:, lo:lo + width] = torch.cat([chunk[n].reshape(chunk[n].shape[0], -1) for n in names], 1).T
            return W

        total, count = self.objective.sum_over_data(per_batch, desc=f"{type(self).__name__} square root @ {columns}")
        return (total / count ** 0.5 if self.objective.reduction == "mean" else total).detach()

    def _model_output(self, params, batch: Batch):
        output, target = self.objective.call_model(params, batch)
        if not isinstance(output, torch.Tensor):
            raise HesseError(
                f"the model output is a {type(output).__name__}, not a tensor; pass forward= "
                "returning (output_tensor, target)."
            )
        return output, target

    def _batch_products(self, params, batch: Batch, V, batch_index: int):
        def model_output(p):
            return self._model_output(p, batch)

        output, vjp_fn, target = torch.func.vjp(model_output, params, has_aux=True)
        output = output.detach()
        JV = self._jacobian_products(model_output, params, output, vjp_fn, V)
        MJV = self._output_products(output, target, JV, batch_index)
        return _batched(lambda u: vjp_fn(u)[0], MJV)

    def _jacobian_products(self, model_output, params, output: torch.Tensor, vjp_fn, V) -> torch.Tensor:
        """``J v`` for the K vectors: forward mode (one JVP each), or, for layers without
        forward-mode derivatives (e.g. ``nn.LSTM``), the transpose of the VJP (reverse mode
        twice: ``J v = ∂/∂u ⟨Jᵀu, v⟩``), chosen once on the first failure."""
        if self._jvp_route == "forward":
            try:
                return _batched(lambda v: torch.func.jvp(model_output, (params,), (v,), has_aux=True)[1], V)
            except (NotImplementedError, RuntimeError) as error:
                if isinstance(error, HesseError) or "forward" not in str(error).lower():
                    raise
                self._jvp_route = "reverse"
        _, transpose_fn = torch.func.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(output))
        return _batched(lambda v: transpose_fn(v)[0], V)

    _jvp_route = "forward"


def _batched(fn, X):
    """``fn`` on each of the K leading slices of ``X`` (a tensor or a dict of tensors), stacked."""
    first = X if isinstance(X, torch.Tensor) else next(iter(X.values()))
    if first.shape[0] == 1:
        one = fn(X[0] if isinstance(X, torch.Tensor) else {n: x[0] for n, x in X.items()})
        return one.unsqueeze(0) if isinstance(one, torch.Tensor) else {n: t.unsqueeze(0) for n, t in one.items()}
    return torch.func.vmap(fn)(X)


class GGN(OutputSpaceCurvature):
    """Generalised Gauss-Newton matrix of the full-data loss (same weighting as :class:`Hessian`).

    ``M = ∇²_f criterion(f, y)`` is computed by reverse-over-reverse autograd in the (small)
    output space, so any twice-differentiable criterion works.
    For cross-entropy and MSE, ``G`` equals the true Fisher (``hesse.Fisher(kind="true")``).
    """

    def _output_roots(self, output, target, columns, generator, batch_index):
        """For the supported likelihoods the GGN is the true Fisher: its square root."""
        return random_root(self.criterion, self.objective.reduction, "true", output, target, columns, generator)

    def _output_products(self, output, target, U, batch_index):
        def criterion_of_output(f):
            return self.objective.criterion_loss(f, target)

        # M is symmetric, so the VJP of the gradient is the product M u
        _, hvp = torch.func.vjp(torch.func.grad(criterion_of_output), output)
        return torch.func.vmap(hvp)(U)[0] if U.shape[0] > 1 else hvp(U[0])[0].unsqueeze(0)
