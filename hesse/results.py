"""Result containers shared by :mod:`hesse.linalg` and :mod:`hesse.analysis`.

Every result is a dataclass with a short ``__repr__`` and a JSON-ready ``to_dict()``
(tensors and arrays become lists of floats).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, numpy scalars and nested containers into plain Python."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return value


def _fmt(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)


class _ResultMixin:
    """``to_dict`` over the dataclass fields, skipping those named in ``_skip_in_dict``."""

    _skip_in_dict: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            f.name: to_jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self._skip_in_dict
        }


@dataclass(repr=False)
class EigenResult(_ResultMixin):
    """Eigenpairs from :func:`hesse.linalg.eigenvalues`.

    ``values`` are sorted descending for ``which="largest"``, ascending for
    ``"smallest"`` and by descending ``|value|`` for ``"magnitude"``; ``vectors[:, i]``
    belongs to ``values[i]``; ``residuals[i] = ||A v_i - values[i] v_i||``;
    ``error_bounds[i]``: a bound on ``|values[i] - lambda|`` for the eigenvalue ``lambda`` it
    approximates (the smaller of the residual and the gap bound ``residual^2 / gap``, never
    below the precision floor); ``converged[i]``: ``error_bounds[i] <= tol |values[i]|``.
    ``matvecs``: single-vector products; ``passes``: operator calls (data passes of a
    curvature operator); ``notes``: why the solver stopped short (precision floor, cap).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    matvecs: int
    which: str
    method: str
    interrupted: bool = False
    error_bounds: torch.Tensor | None = None
    passes: int = 0
    notes: list[str] = field(default_factory=list)
    _skip_in_dict = ("vectors",)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all()) and len(self.converged) > 0

    def __repr__(self) -> str:
        vals = ", ".join(_fmt(v) for v in self.values.tolist())
        flag = " INTERRUPTED" if self.interrupted else ""
        bounds = self.error_bounds if self.error_bounds is not None else torch.empty(0)
        return (
            f"EigenResult({self.which}, values=[{vals}], converged={self.converged.tolist()}, "
            f"max_residual={_fmt(float(self.residuals.max())) if len(self.residuals) else 'n/a'}, "
            f"max_error_bound={_fmt(float(bounds.max())) if len(bounds) else 'n/a'}, "
            f"matvecs={self.matvecs}, passes={self.passes}, method={self.method}{flag})"
        )


@dataclass(repr=False)
class TraceResult(_ResultMixin):
    """A stochastic estimate of ``tr(A)`` with its standard error and cost.

    ``matvecs``: single-vector products; ``passes``: operator calls (data passes);
    ``rtol``: the relative accuracy asked for (``None``: a fixed budget); ``converged``:
    whether ``stderr <= rtol |estimate|`` was reached (``None`` without a target).
    """

    estimate: float
    stderr: float
    matvecs: int
    method: str
    interrupted: bool = False
    passes: int = 0
    rtol: float | None = None
    converged: bool | None = None

    def __repr__(self) -> str:
        flag = " INTERRUPTED" if self.interrupted else ""
        target = "" if self.rtol is None else f", rtol={self.rtol:g} {'met' if self.converged else 'NOT met'}"
        return (
            f"{type(self).__name__}({_fmt(self.estimate)} +- {_fmt(self.stderr)}{target}, "
            f"method={self.method}, matvecs={self.matvecs}, passes={self.passes}{flag})"
        )


@dataclass(repr=False)
class NormResult(TraceResult):
    """A stochastic estimate of the Frobenius norm ``||A||_F``."""


@dataclass(repr=False)
class DiagonalResult(_ResultMixin):
    """An estimate of ``diag(A)`` (``[P]``), its per-entry standard error (or ``None``);
    ``matvecs`` single-vector products in ``passes`` operator calls."""

    estimate: torch.Tensor
    stderr: torch.Tensor | None
    matvecs: int
    method: str
    interrupted: bool = False
    passes: int = 0

    def __repr__(self) -> str:
        err = "exact" if self.stderr is None else f"mean stderr={_fmt(float(self.stderr.mean()))}"
        flag = " INTERRUPTED" if self.interrupted else ""
        return (
            f"DiagonalResult(P={self.estimate.numel()}, sum={_fmt(float(self.estimate.sum()))}, "
            f"{err}, method={self.method}, matvecs={self.matvecs}, passes={self.passes}{flag})"
        )
