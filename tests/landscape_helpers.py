"""Shared helpers of the landscape and sharpness tests (not a test module): a quadratic problem
with a closed-form loss, a summed-loss problem, and bit-exact snapshots of a model."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers import TanhMLP, uneven_batches


class SquaredError(nn.Module):
    """``mean_n (f(x_n) - y_n)^2`` for a 1-output model (nn.MSELoss-like, usable by the Hessian)."""

    reduction = "mean"

    def forward(self, output, target):
        return ((output - target) ** 2).mean()


def quadratic_problem(d: int = 6, n: int = 40, diagonal: bool = False, exact: bool = False, seed: int = 0):
    """A linear model with squared error: ``L(w) = (w - w*)' A (w - w*) / 2 + c`` in closed form.

    Returns ``(model, criterion, batches, A, w_star, c)``; ``A = 2 X'X / n``. ``diagonal`` makes
    ``X = Q diag(s)`` with orthonormal ``Q`` so ``A`` is diagonal; ``exact`` makes ``y = X w*``
    (``c = 0``) and sets the weights to ``w*``, a pure quadratic at its minimum.
    """
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor([3.0, 2.0, 1.4, 1.0, 0.7, 0.5, 0.3, 0.2][:d], dtype=torch.float64) * n ** 0.5 / 2 ** 0.5
    if diagonal:
        Q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
        X = Q * s
    else:
        X = torch.randn(n, d, generator=gen, dtype=torch.float64) * s / n ** 0.5
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    noise = torch.zeros(n, dtype=torch.float64) if exact else 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    y = (X @ w_star + noise)[:, None]
    A = 2 * X.T @ X / n
    w_min = torch.linalg.lstsq(X, y[:, 0]).solution
    c = float(((y[:, 0] - X @ w_min) ** 2).mean())
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_min if exact else torch.randn(d, generator=gen, dtype=torch.float64))[None])
    sizes = [n // 3, n // 3, n - 2 * (n // 3)]
    return model, SquaredError(), uneven_batches(X, y, sizes), A, w_min, c


def quad_loss(w, A, w_min, c):
    e = w - w_min
    return float(0.5 * e @ A @ e + c)


def snapshot(model: nn.Module):
    tensors = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    return tensors, [m.training for m in model.modules()]


def assert_identical(model: nn.Module, snap) -> None:
    tensors, modes = snap
    now = list(model.parameters()) + list(model.buffers())
    assert len(now) == len(tensors)
    for a, b in zip(now, tensors):
        assert a.dtype == b.dtype and torch.equal(a.detach(), b)  # bit-identical
    assert [m.training for m in model.modules()] == modes


def sum_problem():
    """A tanh MLP with a summed cross-entropy given as a plain function (needs reduction="sum")."""
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, y = torch.randn(13, 6, dtype=torch.float64), torch.randint(0, 4, (13,))
    crit = lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum")  # noqa: E731
    return model, crit, X, y, uneven_batches(X, y, [8, 5])
