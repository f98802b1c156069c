"""Input checks shared by the estimators and the analyses built on them.

Every check raises a :class:`hesse.HesseError` whose message names the fix.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hesse.errors import HesseError
from hesse.operators import LinearOperator, as_operator


def prepare_operator(obj, check_symmetric: bool, seed: int) -> tuple[LinearOperator, int]:
    """``as_operator(obj)``, checked to be square and (optionally) symmetric.

    The symmetry test compares ``y^T A x`` with ``x^T A y`` for two Gaussian vectors (one
    operator call with 2 columns). It is skipped for operators that are symmetric by
    construction (``op.symmetric_by_construction``: ``hesse.Hessian``, ``GGN``, ``Fisher``
    and their block views), where it would only cost a data pass. Returns the operator and
    the number of single-vector products the check used (0 or 2; one pass when 2).
    """
    op = as_operator(obj)
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise HesseError(
            f"the operator must be square, got shape {list(op.shape)}; pass a P x P curvature "
            "operator or matrix."
        )
    if op.shape[0] < 1:
        raise HesseError("the operator is empty (P = 0); select at least one parameter.")
    if not check_symmetric or op.symmetric_by_construction:
        return op, 0
    gen = torch.Generator().manual_seed(seed + 7919)
    XY = torch.randn(op.shape[0], 2, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    AXY = op.matmat(XY).to(torch.float64)
    XY = XY.to(torch.float64)
    x, y, ax, ay = XY[:, 0], XY[:, 1], AXY[:, 0], AXY[:, 1]
    scale = float(ax.norm() * y.norm() + ay.norm() * x.norm())
    asym = abs(float(y @ ax - x @ ay))
    tol = 1e-4 if op.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    if scale > 0 and asym > tol * scale:
        raise HesseError(
            f"the operator is not symmetric: |y'Ax - x'Ay| / (|Ax||y| + |Ay||x|) = "
            f"{asym / scale:.2e} > {tol:g}. These estimators need a symmetric matrix; "
            "symmetrise it as (A + A^T)/2, or pass check_symmetric=False if the asymmetry is "
            "round-off you accept."
        )
    return op, 2


def check_positive(name: str, value, integer: bool = False) -> None:
    """Raise a HesseError unless ``value`` is a positive (integer) number."""
    if integer:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    else:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
            and math.isfinite(value) and value > 0
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise HesseError(f"{name} must be {kind}, got {value!r}; pass e.g. {name}={'100' if integer else '1e-3'}.")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a HesseError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise HesseError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
