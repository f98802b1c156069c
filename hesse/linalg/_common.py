"""Shared plumbing of the estimators: input checks, probes, orthogonalisation, progress."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from hesse.errors import HesseError
from hesse.operators import LinearOperator, as_operator

DEFAULT_CHUNK = 32


def prepare_operator(obj, check_symmetric: bool, seed: int) -> tuple[LinearOperator, int]:
    """``as_operator(obj)``, checked to be square and (optionally) symmetric.

    Returns the operator and the number of single-vector products the check used (0 or 2).
    """
    op = as_operator(obj)
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise HesseError(
            f"the operator must be square, got shape {list(op.shape)}; pass a P x P curvature "
            "operator or matrix."
        )
    if op.shape[0] < 1:
        raise HesseError("the operator is empty (P = 0); select at least one parameter.")
    if not check_symmetric:
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
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise HesseError(f"{name} must be {kind}, got {value!r}; pass e.g. {name}={'100' if integer else '1e-3'}.")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise HesseError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")


def probes(
    P: int, m: int, distribution: str, gen: torch.Generator, op: LinearOperator
) -> torch.Tensor:
    """``m`` isotropic probe vectors (``E[z z^T] = I``) as a ``[P, m]`` tensor on the operator's device."""
    if distribution == "rademacher":
        Z = torch.randint(0, 2, (P, m), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    else:
        Z = torch.randn(P, m, generator=gen, dtype=torch.float64)
    return Z.to(op.dtype).to(op.device)


def make_progress(total: int | None, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="matvec")


def orthonormalize_against(
    X: torch.Tensor, basis: torch.Tensor | None, passes: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt of ``X`` against ``basis`` twice ("twice is enough"), then QR.

    Returns ``(Q, norms)`` where ``norms`` are the column norms of ``X`` left after
    projecting out ``basis`` (before the QR), to detect breakdown.
    """
    for _ in range(passes):
        if basis is not None and basis.shape[1] > 0:
            X = X - basis @ (basis.T @ X)
    norms = X.norm(dim=0)
    Q, _ = torch.linalg.qr(X)
    if basis is not None and basis.shape[1] > 0:  # QR may reintroduce tiny components
        Q = Q - basis @ (basis.T @ Q)
        Q, _ = torch.linalg.qr(Q)
    return Q, norms
