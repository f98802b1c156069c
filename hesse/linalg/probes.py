"""Isotropic random probe vectors (``E[z z^T] = I``) for the stochastic estimators.

Hutchinson (1989) and everything built on it (Hutch++, XTrace, XDiag, stochastic Lanczos
quadrature, per-layer traces) need probes with identity second moment: Rademacher
(``+-1``, the lowest-variance choice for the trace; Hutchinson 1989) or standard Gaussian.
Probes are drawn in float64 on the CPU from a seeded generator (so a seed gives the same
probes on every device and dtype), then moved to the operator's dtype and device.
"""

from __future__ import annotations

import torch

from hesse.linalg.checks import check_choice
from hesse.operators import LinearOperator

DISTRIBUTIONS = ("rademacher", "gaussian")
DEFAULT_CHUNK = 32  # probes per operator call (one data pass) in the chunked estimators


def isotropic_probes(
    op: LinearOperator, m: int, distribution: str = "rademacher", *,
    generator: torch.Generator | int = 0,
) -> torch.Tensor:
    """``m`` isotropic probes as a ``[P, m]`` tensor on ``op``'s dtype and device.

    ``distribution``: ``"rademacher"`` (entries ``+-1``) or ``"gaussian"`` (``N(0, 1)``).
    ``generator``: a ``torch.Generator`` (advanced by the draw) or an integer seed.
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    gen = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(generator)
    P = op.shape[0]
    if distribution == "rademacher":
        Z = torch.randint(0, 2, (P, m), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    else:
        Z = torch.randn(P, m, generator=gen, dtype=torch.float64)
    return Z.to(op.dtype).to(op.device)


def gaussian_block(
    rows: int, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """``m`` standard Gaussian vectors ``[rows, m]`` (Lanczos start and restart directions)."""
    return torch.randn(rows, m, generator=generator, dtype=torch.float64).to(dtype).to(device)
