"""Matrix-free symmetric linear operators on flat parameter vectors.

Everything in :mod:`hesse.linalg` sees only this interface, in the spirit of
``scipy.sparse.linalg.LinearOperator``: a square ``shape``, a ``dtype``, a
``device`` and a product ``op @ V`` for ``V`` of shape ``[P]`` or ``[P, K]``.
A dense matrix (``DenseOperator``) and a full-dataset Hessian are used the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import scipy.sparse.linalg as spla
import torch

from hesse.errors import HesseError


class LinearOperator:
    """A symmetric ``P x P`` operator acting on torch tensors.

    Subclasses implement :meth:`_matmat` for a ``[P, K]`` tensor; validation,
    the 1-D case and conversions live here. ``blocks`` maps a block name to the
    slice of the flat vector it owns (one block ``"all"`` unless a subclass says more).
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    symmetric_by_construction: bool = False
    """True when the product is symmetric by construction (curvature operators and their
    block views): estimators then skip their symmetry check."""

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def square_root_sampler(self) -> Callable[[int, int], torch.Tensor] | None:
        """``(columns, seed) -> W`` (``[P, columns]``, independent columns with ``E[w wᵀ] = A``)
        when the operator has such a factor (GGN and Fisher for the supported likelihoods), else None."""
        return None

    @property
    def size(self) -> int:
        """The dimension P."""
        return self.shape[0]

    @property
    def blocks(self) -> dict[str, slice]:
        return {"all": slice(0, self.shape[0])}

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A @ V`` for ``V`` of shape ``[P, K]`` (all K products at once)."""
        self._check_vector(V, ndim=2)
        if V.shape[1] == 0:
            return V.clone()
        out = self._matmat(V)
        if not torch.isfinite(out).all():
            raise HesseError(
                f"{type(self).__name__} product is NaN or inf. Check the loss and the "
                "data for non-finite values, or use float64 if the model overflows."
            )
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A @ v`` for ``v`` of shape ``[P]``."""
        self._check_vector(v, ndim=1)
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, x):
        """``A @ v`` (a tensor ``[P]`` or ``[P, K]``: the product) or ``A @ B`` (an operator: the composition)."""
        if isinstance(x, LinearOperator):
            from hesse.operators.algebra import ComposedOperator

            return ComposedOperator(self, x)
        if isinstance(x, torch.Tensor) and x.ndim == 1:
            return self.matvec(x)
        return self.matmat(x)

    # ---- algebra (see hesse.operators.algebra) ------------------------------------------------
    def __add__(self, other):
        """``A + B`` for an operator ``B`` (e.g. ``C + lam * hesse.Identity(P)``)."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        from hesse.operators.algebra import SumOperator

        return SumOperator([self, other])

    def __sub__(self, other):
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, alpha):
        """``alpha * A`` (or ``A * alpha``) for a real number ``alpha``."""
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return NotImplemented
        from hesse.operators.algebra import ScaledOperator

        return ScaledOperator(self, alpha)

    __rmul__ = __mul__

    def __neg__(self):
        return (-1.0) * self

    def __truediv__(self, alpha):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return NotImplemented
        return (1.0 / alpha) * self

    def _check_vector(self, x: torch.Tensor, ndim: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise HesseError(
                f"{type(self).__name__} multiplies torch tensors, got {type(x).__name__}; "
                "convert with torch.as_tensor(x, dtype=op.dtype, device=op.device) "
                "or use op.to_scipy() for NumPy arrays."
            )
        if x.ndim != ndim or x.shape[0] != self.shape[0]:
            want = f"[{self.shape[0]}]" if ndim == 1 else f"[{self.shape[0]}, K]"
            raise HesseError(
                f"vector of shape {list(x.shape)} does not fit {type(self).__name__} of "
                f"shape {list(self.shape)}: expected {want}."
            )
        if x.dtype != self.dtype:
            raise HesseError(
                f"vector has dtype {x.dtype} but the operator is {self.dtype}; "
                f"convert it with v.to({self.dtype})."
            )
        if x.device != self.device:
            raise HesseError(
                f"vector is on {x.device} but the operator is on {self.device}; "
                f"move it with v.to('{self.device}')."
            )

    def to_scipy(self) -> spla.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        op = self

        def matmat(X: np.ndarray) -> np.ndarray:
            X2 = np.asarray(X).reshape(op.shape[0], -1)
            V = torch.as_tensor(X2, dtype=op.dtype).to(op.device)
            return op.matmat(V).detach().cpu().to(torch.float64).numpy()

        def matvec(x: np.ndarray) -> np.ndarray:
            return matmat(x).reshape(-1)

        return spla.LinearOperator(
            shape=self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat,
            rmatmat=matmat, dtype=np.float64,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class DenseOperator(LinearOperator):
    """An explicit symmetric matrix, mostly for tests and small problems."""

    def __init__(self, matrix: torch.Tensor | np.ndarray, blocks: Mapping[str, slice] | None = None):
        A = torch.as_tensor(matrix)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise HesseError(f"a curvature operator must be square, got shape {list(A.shape)}.")
        if not A.is_floating_point():
            A = A.to(torch.get_default_dtype())
        self.matrix = A
        self.shape = (A.shape[0], A.shape[1])
        self.dtype = A.dtype
        self.device = A.device
        self._blocks = dict(blocks) if blocks is not None else None

    @property
    def blocks(self) -> dict[str, slice]:
        return self._blocks if self._blocks is not None else super().blocks

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class ScipyOperator(LinearOperator):
    """Wraps a ``scipy.sparse.linalg.LinearOperator`` (or anything ``aslinearoperator`` takes)."""

    def __init__(self, op, dtype: torch.dtype = torch.float64):
        self.op = spla.aslinearoperator(op)
        if self.op.shape[0] != self.op.shape[1]:
            raise HesseError(f"a curvature operator must be square, got shape {list(self.op.shape)}.")
        self.shape = self.op.shape
        self.dtype = dtype
        self.device = torch.device("cpu")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op.matmat(V.detach().cpu().double().numpy())
        return torch.as_tensor(np.asarray(out), dtype=self.dtype)


class BlockView(LinearOperator):
    """The diagonal block ``A[s, s]`` of an operator, for a slice ``s`` of the flat vector."""

    def __init__(self, parent: LinearOperator, block: slice, name: str = "block"):
        self.parent, self.block, self.name = parent, block, name
        self.symmetric_by_construction = parent.symmetric_by_construction
        n = block.stop - block.start
        self.shape = (n, n)
        self.dtype, self.device = parent.dtype, parent.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = V.new_zeros(self.parent.shape[0], V.shape[1])
        full[self.block] = V
        return self.parent.matmat(full)[self.block]


STACK_BYTES = 2**30  # the most one call of a block-diagonal view hands its parent


class BlockDiagonalOperator(LinearOperator):
    """The block-diagonal part of an operator: ``diag(A_11, ..., A_BB)``.

    One product ``D @ V`` costs a single call of the parent on ``B*K`` columns (each
    column nonzero on one block only), i.e. one data pass for a curvature operator.
    ``blocks`` gives each block's slice so per-block estimates can reuse the same probes.
    """

    def __init__(self, parent: LinearOperator, blocks: Mapping[str, slice]):
        self.parent = parent
        self.symmetric_by_construction = parent.symmetric_by_construction
        self._blocks = dict(blocks)
        self.shape, self.dtype, self.device = parent.shape, parent.dtype, parent.device
        self.parent_products = 0  # columns the parent has multiplied: the real cost
        covered = sorted((s.start, s.stop) for s in self._blocks.values())
        pos = 0
        for start, stop in covered:
            if start != pos or stop <= start:
                raise HesseError(
                    "blocks must be non-empty, non-overlapping slices covering the whole "
                    f"vector in order; got {self._blocks}."
                )
            pos = stop
        if pos != self.shape[0]:
            raise HesseError(f"blocks cover {pos} of {self.shape[0]} entries; they must cover all.")

    @property
    def blocks(self) -> dict[str, slice]:
        return dict(self._blocks)

    def square_root_sampler(self) -> Callable[[int, int], torch.Tensor] | None:
        """The parent's: ``‖w_b‖²`` of its columns estimates ``tr(A_bb)`` for every block."""
        return self.parent.square_root_sampler()

    def block(self, name: str) -> LinearOperator:
        """The operator of one diagonal block."""
        if name not in self._blocks:
            raise HesseError(f"no block named {name!r}; blocks are {list(self._blocks)}.")
        return BlockView(self.parent, self._blocks[name], name)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Each block's nonzero columns, side by side in one call of the parent; columns that
        are zero on a block (finished or idle blocks of a per-block estimator) cost nothing.
        The side-by-side matrix is ``P x (blocks x columns)``: above :data:`STACK_BYTES` it
        goes to the parent in several calls (for MiniLM's 36 layers and 20 columns each, one
        call would need 30 GB)."""
        pieces = [(s, torch.nonzero(V[s].abs().sum(0)).flatten()) for s in self._blocks.values()]
        out = torch.zeros_like(V)
        width = max(1, STACK_BYTES // (self.shape[0] * V.element_size()))
        for group in _column_groups(pieces, width):
            stacked = V.new_zeros(self.shape[0], sum(len(cols) for _, cols in group))
            start = 0
            for s, cols in group:
                stacked[s, start:start + len(cols)] = V[s][:, cols]
                start += len(cols)
            products = self.parent.matmat(stacked)
            self.parent_products += stacked.shape[1]
            start = 0
            for s, cols in group:
                out[s, cols] = products[s, start:start + len(cols)]
                start += len(cols)
        return out


def _column_groups(pieces: list[tuple[slice, torch.Tensor]], width: int) -> list[list[tuple[slice, torch.Tensor]]]:
    """``(block, columns)`` pieces regrouped so that each group has at most ``width`` columns."""
    groups, current, room = [], [], width
    for s, cols in pieces:
        while len(cols):
            take, cols = cols[:room], cols[room:]
            current.append((s, take))
            room -= len(take)
            if room == 0:
                groups.append(current)
                current, room = [], width
    return groups + ([current] if current else [])


def as_operator(obj) -> LinearOperator:
    """Turn a tensor, NumPy array, SciPy operator, hesse operator or ``(matmat, P)`` into a ``LinearOperator``.

    A pair ``(fn, P)`` or ``(fn, (P, P))`` is a callable on ``[P, K]`` float64 CPU tensors; for other
    dtypes, devices or a one-vector callable use :class:`hesse.operators.FunctionOperator`.
    """
    if isinstance(obj, LinearOperator):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):
        from hesse.operators.algebra import FunctionOperator

        return FunctionOperator(obj[0], obj[1])
    if isinstance(obj, torch.Tensor):
        return DenseOperator(obj)
    if isinstance(obj, np.ndarray):
        return DenseOperator(torch.from_numpy(obj))
    if isinstance(obj, spla.LinearOperator) or hasattr(obj, "shape") and hasattr(obj, "dot"):
        return ScipyOperator(obj)
    raise HesseError(
        f"cannot use a {type(obj).__name__} as a curvature operator; pass a hesse operator "
        "(hesse.Hessian, hesse.GGN, hesse.Fisher), a square torch tensor, a SciPy LinearOperator, or "
        "(matmat_callable, P)."
    )
