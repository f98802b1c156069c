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
from hesse.operators.curvature import CurvatureOperator
from hesse.operators.data import Batch


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

    def _batch_products(self, params, batch: Batch, V, batch_index: int):
        def model_output(p):
            output, target = self.objective.call_model(p, batch)
            if not isinstance(output, torch.Tensor):
                raise HesseError(
                    f"the model output is a {type(output).__name__}, not a tensor; pass forward= "
                    "returning (output_tensor, target)."
                )
            return output, target

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

    def _output_products(self, output, target, U, batch_index):
        def criterion_of_output(f):
            return self.objective.criterion_loss(f, target)

        # M is symmetric, so the VJP of the gradient is the product M u
        _, hvp = torch.func.vjp(torch.func.grad(criterion_of_output), output)
        return torch.func.vmap(hvp)(U)[0] if U.shape[0] > 1 else hvp(U[0])[0].unsqueeze(0)
