"""stability_threshold against the simulated torch.optim.SGD recursion on the quadratic ½ λ x²."""

from __future__ import annotations

import itertools
import math

import pytest

from hesse.analysis import stability_threshold
from hesse.errors import HesseError


def simulate(lam: float, lr: float, momentum: float, dampening: float, nesterov: bool, steps: int = 6000) -> float:
    """|x| after ``steps`` SGD steps from x = 1, as ``torch.optim.SGD`` updates (first step b = g)."""
    x, buf = 1.0, None
    for _ in range(steps):
        g = lam * x
        if momentum:
            buf = g if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        x -= lr * g
        if abs(x) > 1e8 or abs(x) < 1e-12:
            break
    return abs(x)


GRID = list(itertools.product([0.01, 0.5], [0.0, 0.5, 0.9, 0.99], [0.0, 0.3, 0.9], [False, True]))


@pytest.mark.parametrize("lr, momentum, dampening, nesterov", GRID)
def test_threshold_is_the_edge_of_the_simulated_dynamics(lr, momentum, dampening, nesterov):
    edge = stability_threshold(lr, momentum, dampening, nesterov)
    assert math.isfinite(edge) and edge > 0
    assert simulate(0.98 * edge, lr, momentum, dampening, nesterov) < 1e-6  # decays
    assert simulate(1.02 * edge, lr, momentum, dampening, nesterov) > 1e6  # grows


def test_closed_forms_and_arguments():
    assert stability_threshold(0.1) == pytest.approx(20.0)
    assert stability_threshold(0.1, 0.9) == pytest.approx(38.0)  # (2 + 2μ) / lr
    assert stability_threshold(0.1, 0.9, dampening=0.5) == pytest.approx(76.0)  # / (1 - d)
    assert stability_threshold(0.1, 0.9, nesterov=True) == pytest.approx(3.8 / 0.28)  # (2 + 2μ) / ((1 + 2μ) lr)
    assert stability_threshold(0.1, 0.0, dampening=0.5) == pytest.approx(20.0)  # no buffer without momentum
    assert stability_threshold(0.1, 0.5, dampening=1.0) == math.inf  # a damped-out buffer never moves
    assert stability_threshold(0.1, batch_size=32) == pytest.approx(20.0)  # threshold on tr/B + (1-1/B) λ_max
    with pytest.raises(HesseError, match="plain SGD"):
        stability_threshold(0.1, 0.9, batch_size=32)
    for bad in (dict(lr=0), dict(lr=0.1, momentum=1.0), dict(lr=0.1, dampening=-0.1), dict(lr=0.1, batch_size=0)):
        with pytest.raises(HesseError):
            stability_threshold(**bad)
