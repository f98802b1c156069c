"""The Hessian of the full-data loss, ``H = ∇²_θ L(θ)``, as a matrix-free operator."""

from __future__ import annotations

import warnings
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
      * ``"double-backward"``: ``H v = ∇(∇L · v)`` by reverse-over-reverse autograd, K
        vectors at once with ``is_grads_batched``; every graph is freed after the batch.
      * ``"auto"`` (default): forward-over-reverse, measured faster in ``bench/bench_operators.py``;
        falls back to double-backward (with a warning) when an operation has no working
        forward-mode derivative (fused attention kernels; ``mse_loss`` in torch 2.13).
    ``vectorize=False`` loops over the K vectors instead of ``vmap`` (for models with
    operations that ``vmap`` cannot batch).
    """

    def __init__(self, model, criterion, data, *, method: str = "auto", vectorize: bool = True, **kwargs: Any):
        super().__init__(model, criterion, data, **kwargs)
        if method != "auto" and method not in METHODS:
            raise HesseError(f"unknown Hessian method {method!r}; choose 'auto' or one of {METHODS}.")
        self._auto = method == "auto"
        self.method = "forward-over-reverse" if self._auto else method
        self.vectorize = vectorize

    def _extra_kwargs(self) -> dict:
        return {"method": "auto" if self._auto else self.method, "vectorize": self.vectorize}

    def _batch_products(self, params, batch: Batch, V, batch_index: int):
        if self.method == "double-backward":
            return self._double_backward(params, batch, V)
        try:
            return self._forward_over_reverse(params, batch, V)
        except (NotImplementedError, RuntimeError) as error:
            if isinstance(error, HesseError):
                raise
            if not self._auto:
                raise HesseError(
                    f"forward-over-reverse differentiation failed ({str(error)[:100]}); "
                    "use method='double-backward' (or 'auto', which falls back by itself)."
                ) from error
            warnings.warn(
                f"forward-mode differentiation failed in this model or loss ({str(error)[:100]}); "
                "this Hessian now uses method='double-backward' (same result).",
                stacklevel=4,
            )
            self.method = "double-backward"
            return self._double_backward(params, batch, V)

    def _forward_over_reverse(self, params, batch: Batch, V):
        gradient = torch.func.grad(self._batch_loss)

        def hvp(v):
            return torch.func.jvp(lambda p: gradient(p, batch), (params,), (v,))[1]

        return vmap_or_loop(hvp, V, self.vectorize)

    def _double_backward(self, params, batch: Batch, V):
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        names = list(leaves)
        loss = self._batch_loss(leaves, batch)
        grads = torch.autograd.grad(
            loss, [leaves[n] for n in names], create_graph=True, allow_unused=True, materialize_grads=True
        )
        K = next(iter(V.values())).shape[0]
        differentiable = [g.requires_grad for g in grads]
        if not any(differentiable):  # the loss is linear in every parameter
            return {n: torch.zeros_like(V[n]) for n in names}
        outs = torch.autograd.grad(
            [g for g, d in zip(grads, differentiable) if d],
            [leaves[n] for n in names],
            grad_outputs=[V[n] if K > 1 else V[n][0] for n, d in zip(names, differentiable) if d],
            is_grads_batched=K > 1,
            allow_unused=True,
            materialize_grads=True,
        )
        return {n: (o if K > 1 else o.unsqueeze(0)).detach() for n, o in zip(names, outs)}
