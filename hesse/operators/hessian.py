"""The Hessian of the full-data loss, ``H = ∇²_θ L(θ)``, as a matrix-free operator."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from hesse.errors import HesseError
from hesse.operators.curvature import CurvatureOperator, vmap_or_loop
from hesse.operators.data import Batch

METHODS = ("forward-over-reverse", "double-backward")
CALIBRATE_AFTER_S = 10.0
"""Seconds (CPU seconds on a CPU) of double-backward products with K vectors after which
``"auto"`` times forward-over-reverse, while forward mode has not yet run in this process:
its start-up (about 1 s) divided by the largest gain forward-over-reverse has shown over
double-backward (about 10%, ``bench/bench_operators.py``), so the timing costs at most about
10% of a run and is done only where it can pay off."""
_forward_mode_warm = False  # a forward-over-reverse product has run in this process


class Hessian(CurvatureOperator):
    """Hessian of the full-data loss ``L`` w.r.t. the selected parameters.

    ``L`` is the sample-weighted mean of the batch losses for a ``reduction="mean"``
    criterion and their sum for ``"sum"`` (see :class:`CurvatureOperator`).

    ``method``:
      * ``"double-backward"``: ``H v = ∇(∇L · v)`` by reverse-over-reverse autograd: one
        forward and graph-building backward per batch, then one more backward for all K
        vectors at once (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap``
        over the backward; a loop when ``vectorize=False`` or where ``vmap`` cannot batch);
      * ``"forward-over-reverse"``: ``H v = ∂/∂ε ∇L(θ + ε v)`` with ``torch.func.jvp`` of
        ``torch.func.grad``, ``vmap``-ed over the K vectors (Pearlmutter 1994);
      * ``"auto"`` (default): double-backward, unless measurement shows forward-over-reverse
        is faster for that K. One vector is always double-backward: forward-over-reverse
        does the same forward and backward plus tangents through both (1.7-2.4x slower at
        K=1 on the MLP, CNN and transformer of ``bench/bench_operators.py``). For K > 1 both
        methods are timed on one batch (``.calibration[K]``: CPU seconds of this process on
        a CPU, wall seconds on a GPU), the faster is kept for that K, and the two must agree
        (a disagreement beyond round-off warns and keeps double-backward, which needs no
        forward-mode derivatives). The first forward-mode product of a process loads torch's
        JVP machinery (about 1 s), so until that has happened the timing waits until the
        products with K vectors have cost :data:`CALIBRATE_AFTER_S` seconds (ski rental: a
        short job never pays the start-up, a long one at most about 10% more).
    """

    def __init__(self, model, criterion=None, data=None, *, method: str = "auto", vectorize: bool = True,
                 **kwargs: Any):
        super().__init__(model, criterion, data, **kwargs)
        if method != "auto" and method not in METHODS:
            raise HesseError(f"unknown Hessian method {method!r}; choose 'auto' or one of {METHODS}.")
        self.method = method
        self.vectorize = vectorize
        self.calibration: dict[int, dict[str, float]] = {}
        self._chosen: dict[int, str] = {1: "double-backward"}
        self._spent: dict[int, float] = {}  # seconds of double-backward products per K before timing

    def _extra_kwargs(self) -> dict:
        return {"method": self.method, "vectorize": self.vectorize}

    def method_for(self, K: int) -> str:
        """The product method used for K vectors (``"auto"``: double-backward until measured)."""
        return self.method if self.method != "auto" else self._chosen.get(K, "double-backward")

    def _batch_products(self, params, batch: Batch, V, batch_index: int):
        K = next(iter(V.values())).shape[0]
        if self.method != "auto" or K in self._chosen:
            return self._products(self.method_for(K), params, batch, V)
        if _forward_mode_warm or self._spent.get(K, 0.0) >= CALIBRATE_AFTER_S:
            return self._calibrate(params, batch, V, K)
        products, seconds = _timed(lambda: self._double_backward(params, batch, V), self.device)
        self._spent[K] = self._spent.get(K, 0.0) + seconds
        return products

    def _products(self, method: str, params, batch: Batch, V):
        if method == "double-backward":
            return self._double_backward(params, batch, V)
        try:
            return self._forward_over_reverse(params, batch, V)
        except (NotImplementedError, RuntimeError) as error:
            if isinstance(error, HesseError):
                raise
            raise HesseError(
                f"forward-over-reverse differentiation failed in this model or loss "
                f"({str(error)[:100]}); use method='double-backward'."
            ) from error

    def _calibrate(self, params, batch: Batch, V, K: int):
        """Time both methods on this batch, keep the faster for K vectors, return the products."""
        first, seconds = _timed(lambda: self._double_backward(params, batch, V), self.device)
        times = {"double-backward": seconds}
        try:
            if not _forward_mode_warm:  # the first call loads torch's forward-mode machinery
                self._forward_over_reverse(params, batch, V)
            second, times["forward-over-reverse"] = _timed(
                lambda: self._forward_over_reverse(params, batch, V), self.device)
        except (NotImplementedError, RuntimeError):  # no forward-mode derivative somewhere
            second = None
        if second is not None and times["forward-over-reverse"] < times["double-backward"]:
            times["double-backward"] = _timed(lambda: self._double_backward(params, batch, V), self.device)[1]
        if second is not None and not _agree(first, second):
            warnings.warn("forward-over-reverse and double-backward Hessian products disagree on this model; "
                          "using double-backward.", RuntimeWarning, stacklevel=2)
            times.pop("forward-over-reverse")
        self.calibration[K] = times
        self._chosen[K] = min(times, key=times.get)
        return first

    def _forward_over_reverse(self, params, batch: Batch, V):
        global _forward_mode_warm
        gradient = torch.func.grad(self.objective.batch_loss)

        def hvp(v):
            return torch.func.jvp(lambda p: gradient(p, batch), (params,), (v,))[1]

        products = vmap_or_loop(hvp, V, self.vectorize)
        _forward_mode_warm = True
        return products

    def _double_backward(self, params, batch: Batch, V):
        """One forward and one graph-building backward, then one batched second backward."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        inputs = list(leaves.values())
        loss = self.objective.batch_loss(leaves, batch)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True, materialize_grads=True)
        varying = [i for i, g in enumerate(grads) if g.requires_grad]
        names = list(leaves)
        if not varying:  # the loss is linear in every parameter
            return {n: torch.zeros_like(V[n]) for n in names}
        outputs, directions = [grads[i] for i in varying], [V[names[i]] for i in varying]
        K = directions[0].shape[0]
        if K > 1 and self.vectorize and self._batched_backward:
            try:
                columns = torch.autograd.grad(outputs, inputs, grad_outputs=directions, is_grads_batched=True,
                                              allow_unused=True, materialize_grads=True)
                return {n: c.expand_as(V[n]) for n, c in zip(names, columns)}
            except RuntimeError:  # an operation vmap cannot batch: loop from now on
                self._batched_backward = False
        return _per_vector(outputs, inputs, directions, names, V)

    _batched_backward = True


def _per_vector(outputs: list[torch.Tensor], inputs: list[torch.Tensor], directions: list[torch.Tensor],
                names: list[str], V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The second backward one vector at a time: ``∇_θ ⟨∇L, v⟩`` for each ``v``.

    Differentiating the scalar ``⟨∇L, v⟩`` gives the same products as passing ``v`` as
    ``grad_outputs``, without the shape checks that make torch import its symbolic-shape
    machinery (sympy, about 0.3 s) on the first call of a process."""
    products = {n: torch.empty_like(V[n]) for n in names}
    K = directions[0].shape[0]
    for k in range(K):
        dot = sum((g * d[k]).sum() for g, d in zip(outputs, directions))
        columns = torch.autograd.grad(dot, inputs, retain_graph=k < K - 1, allow_unused=True, materialize_grads=True)
        for n, column in zip(names, columns):
            products[n][k] = column
    return products


def _timed(fn, device: torch.device):
    """``(fn(), seconds)``: the process's CPU time on a CPU (other processes' load does not
    count), else wall time after waiting for the device's queued work."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    start = clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, clock() - start


def _agree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Products equal up to round-off of their dtype."""
    x = torch.cat([t.reshape(-1) for t in a.values()])
    y = torch.cat([b[n].reshape(-1) for n in a])
    tol = 1e-8 if x.dtype == torch.float64 else 1e-3
    return bool((x - y).norm() <= tol * max(float(x.norm()), float(y.norm()), 1e-30))
