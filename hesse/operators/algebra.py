"""Operator algebra: identities, scaling, sums, compositions, block-diagonal assembly, callables.

Every result is a :class:`~hesse.operators.LinearOperator`, so every :mod:`hesse.linalg`
algorithm and solver accepts it. Built by the arithmetic of :class:`LinearOperator`:

* ``C + lam * hesse.Identity(P)`` (damping), ``alpha * C``, ``A + B``, ``A - B``, ``-A``;
* ``A @ B`` with ``B`` an operator: the composition ``x -> A (B x)`` (``A @ tensor`` stays
  the product);
* :func:`block_diagonal` ``(A_1, ..., A_m)``: ``diag(A_1, ..., A_m)`` on the concatenated vector;
* :class:`FunctionOperator` ``(fn, shape)``: a bare ``matvec``/``matmat`` callable.

``symmetric_by_construction`` is propagated: scaling by a real number, sums and
block-diagonal assemblies of symmetric operators are symmetric; a composition is
symmetric only as ``A @ A`` of one symmetric operator; a callable is trusted only if
the caller says ``symmetric=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hesse.errors import HesseError
from hesse.operators.linear import LinearOperator


def _same_space(ops: Sequence[LinearOperator], what: str) -> None:
    """Refuse operators of different shapes, dtypes or devices."""
    first = ops[0]
    for op in ops[1:]:
        if op.shape != first.shape or op.dtype != first.dtype or op.device != first.device:
            raise HesseError(
                f"cannot {what} a {first.shape} {first.dtype} operator on {first.device} with a "
                f"{op.shape} {op.dtype} operator on {op.device}; they must match (cast with the model's dtype)."
            )


class Identity(LinearOperator):
    """The identity ``I`` of size ``P`` (use ``lam * Identity(P)`` for damping)."""

    symmetric_by_construction = True

    def __init__(self, size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        if size < 1:
            raise HesseError(f"Identity needs a positive size, got {size}.")
        self.shape, self.dtype, self.device = (size, size), dtype, torch.device(device)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return V.clone()


class ScaledOperator(LinearOperator):
    """``alpha * A`` for a real number ``alpha``."""

    def __init__(self, op: LinearOperator, alpha: float):
        self.op, self.alpha = op, float(alpha)
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.symmetric_by_construction = op.symmetric_by_construction

    @property
    def blocks(self) -> dict[str, slice]:
        return self.op.blocks

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.op.matmat(V)


class SumOperator(LinearOperator):
    """``A_1 + ... + A_m``: one product of each term per product (``C + lam I`` costs one of ``C``)."""

    def __init__(self, terms: Sequence[LinearOperator]):
        flat: list[LinearOperator] = []
        for term in terms:
            flat.extend(term.terms if isinstance(term, SumOperator) else [term])
        _same_space(flat, "add")
        self.terms = flat
        self.shape, self.dtype, self.device = flat[0].shape, flat[0].dtype, flat[0].device
        self.symmetric_by_construction = all(t.symmetric_by_construction for t in flat)

    @property
    def blocks(self) -> dict[str, slice]:
        for term in self.terms:  # the layout of the first structured term (e.g. C in C + lam I)
            if len(term.blocks) > 1:
                return term.blocks
        return super().blocks

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.terms[0].matmat(V)
        for term in self.terms[1:]:
            out = out + term.matmat(V)
        return out


class ComposedOperator(LinearOperator):
    """The composition ``A B`` (``x -> A (B x)``): symmetric by construction only for ``A A``."""

    def __init__(self, left: LinearOperator, right: LinearOperator):
        _same_space([left, right], "compose")
        self.left, self.right = left, right
        self.shape, self.dtype, self.device = left.shape, left.dtype, left.device
        self.symmetric_by_construction = left is right and left.symmetric_by_construction

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.left.matmat(self.right.matmat(V))


class BlockDiagonalAssembly(LinearOperator):
    """``diag(A_1, ..., A_m)`` on the concatenation of their vectors; block ``i`` is named ``names[i]``."""

    def __init__(self, ops: Sequence[LinearOperator], names: Sequence[str] | None = None):
        if not ops:
            raise HesseError("block_diagonal needs at least one operator.")
        names = list(names) if names is not None else [f"block{i}" for i in range(len(ops))]
        if len(names) != len(ops) or len(set(names)) != len(names):
            raise HesseError(f"give one distinct name per operator; got {names} for {len(ops)} operators.")
        dtypes, devices = {op.dtype for op in ops}, {op.device for op in ops}
        if len(dtypes) > 1 or len(devices) > 1:
            raise HesseError(f"block_diagonal needs one dtype and device, got {dtypes} and {devices}.")
        self.ops, self._blocks, start = list(ops), {}, 0
        for name, op in zip(names, ops):
            self._blocks[name] = slice(start, start + op.shape[0])
            start += op.shape[0]
        self.shape, self.dtype, self.device = (start, start), ops[0].dtype, ops[0].device
        self.symmetric_by_construction = all(op.symmetric_by_construction for op in ops)

    @property
    def blocks(self) -> dict[str, slice]:
        return dict(self._blocks)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.cat([op.matmat(V[s]) for op, s in zip(self.ops, self._blocks.values())])


def block_diagonal(*ops: LinearOperator, names: Sequence[str] | None = None) -> BlockDiagonalAssembly:
    """``diag(A_1, ..., A_m)``: apply each operator to its own slice of the concatenated vector."""
    return BlockDiagonalAssembly(ops, names)


class FunctionOperator(LinearOperator):
    """A ``P x P`` operator given by a callable: ``fn(V)`` on ``[P, K]`` (``mode="matmat"``) or on
    ``[P]`` (``mode="matvec"``, applied column by column).

    ``symmetric=True`` declares it symmetric by construction (estimators then skip their check).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int] | int, *,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 mode: str = "matmat", symmetric: bool = False):
        size = (shape, shape) if isinstance(shape, int) else tuple(shape)
        if len(size) != 2 or size[0] != size[1] or size[0] < 1:
            raise HesseError(f"a FunctionOperator must be square, got shape {shape}.")
        if mode not in ("matmat", "matvec") or not callable(fn):
            raise HesseError(f"pass a callable and mode='matmat' or 'matvec', got mode={mode!r}.")
        self.fn, self.mode = fn, mode
        self.shape, self.dtype, self.device = (size[0], size[1]), dtype, torch.device(device)
        self.symmetric_by_construction = symmetric

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.mode == "matvec":
            out = torch.stack([torch.as_tensor(self.fn(V[:, k])) for k in range(V.shape[1])], dim=1)
        else:
            out = torch.as_tensor(self.fn(V))
        if out.shape != V.shape:
            raise HesseError(f"the callable returned shape {list(out.shape)} for input {list(V.shape)}; "
                             f"use mode='matvec' for a function of one [P] vector.")
        return out.to(V.dtype)
