"""The Hessian of the full-data loss, ``H = ∇²_θ L(θ)``, as a matrix-free operator."""

from __future__ import annotations

from typing import Any

import torch

from hesse.errors import HesseError
from hesse.operators.curvature import CurvatureOperator, vmap_or_loop
from hesse.operators.data import Batch

METHODS = ("forward-over-reverse", "double-backward")


class Hessian(CurvatureOperator):
    """Hessian of the full-data loss ``L`` w.r.t. the selected parameters.

    ``L`` is the sample-weighted mean of the batch losses for a ``reduction="mean"``
    criterion and their sum for ``"sum"`` (see :class:`CurvatureOperator`).

    ``method``:
      * ``"forward-over-reverse"``: ``H v = ∂/∂ε ∇L(θ + ε v)`` with ``torch.func.jvp`` of
        ``torch.func.grad``, ``vmap``-ed over the K vectors (Pearlmutter 1994);
      * ``"double-backward"``: ``H v = ∇(∇L · v)`` by reverse-over-reverse autograd: one
        forward and graph-building backward per batch, then one more backward per vector;
        the graph is freed after the batch.
      * ``"auto"`` (default): double-backward, measured as fast or faster on CPU in
        ``bench/bench_operators.py``, and it needs no forward-mode derivatives (which
        ``mse_loss`` lacks in torch 2.13).
    ``vectorize=False`` makes forward-over-reverse loop over the K vectors instead of
    ``vmap`` (for models with operations that ``vmap`` cannot batch).
    """

    def __init__(self, model, criterion=None, data=None, *, method: str = "auto", vectorize: bool = True,
                 **kwargs: Any):
        super().__init__(model, criterion, data, **kwargs)
        if method != "auto" and method not in METHODS:
            raise HesseError(f"unknown Hessian method {method!r}; choose 'auto' or one of {METHODS}.")
        self.method = "double-backward" if method == "auto" else method
        self.vectorize = vectorize

    def _extra_kwargs(self) -> dict:
        return {"method": self.method, "vectorize": self.vectorize}

    def _batch_products(self, params, batch: Batch, V, batch_index: int):
        if self.method == "double-backward":
            return self._double_backward(params, batch, V)
        try:
            return self._forward_over_reverse(params, batch, V)
        except (NotImplementedError, RuntimeError) as error:
            if isinstance(error, HesseError):
                raise
            raise HesseError(
                f"forward-over-reverse differentiation failed in this model or loss "
                f"({str(error)[:100]}); use method='double-backward' (the default)."
            ) from error

    def _forward_over_reverse(self, params, batch: Batch, V):
        gradient = torch.func.grad(self.objective.batch_loss)

        def hvp(v):
            return torch.func.jvp(lambda p: gradient(p, batch), (params,), (v,))[1]

        return vmap_or_loop(hvp, V, self.vectorize)

    def _double_backward(self, params, batch: Batch, V):
        """One forward and one graph-building backward, then a second backward per vector."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        inputs = list(leaves.values())
        loss = self.objective.batch_loss(leaves, batch)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True, materialize_grads=True)
        varying = [i for i, g in enumerate(grads) if g.requires_grad]
        K = next(iter(V.values())).shape[0]
        names = list(leaves)
        products = {n: torch.zeros_like(V[n]) for n in names}
        if not varying:  # the loss is linear in every parameter
            return products
        for k in range(K):
            columns = torch.autograd.grad(
                [grads[i] for i in varying], inputs,
                grad_outputs=[V[names[i]][k] for i in varying],
                retain_graph=k < K - 1, allow_unused=True, materialize_grads=True,
            )
            for n, column in zip(names, columns):
                products[n][k] = column
        return products
