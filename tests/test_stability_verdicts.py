"""Issue 16: stability verdicts say what linear stability means, full batch by default, and an empirical check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.analysis import stability
from hesse.errors import HesseError


@pytest.fixture(scope="module")
def trained_mlp():
    """A small tanh MLP trained a little by full-batch GD on a synthetic 4-class task (64 samples)."""
    torch.manual_seed(0)
    X = torch.randn(64, 8, dtype=torch.float64)
    y = (X[:, :2] > 0).long() @ torch.tensor([1, 2])
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, (X, y)


def _hessian(trained_mlp) -> hesse.Hessian:
    model, batch = trained_mlp
    return hesse.Hessian(model, nn.CrossEntropyLoss(), batch)


def test_full_batch_is_the_default_and_gives_the_gd_verdict_only(trained_mlp):
    H = _hessian(trained_mlp)
    lam = float(hesse.eigenvalues(H, k=1, tol=1e-6, progress=False).values[0])
    result = stability(H, 3 * 2 / lam, tol=1e-6, progress=False)  # lr three times 2/λ
    assert result.full_batch and result.batch_size is None and result.num_samples == 64
    assert result.gd_ratio == pytest.approx(3.0, rel=1e-4)
    assert result.sgd_verdict is None and result.trace is None and result.sgd_ratio is None
    assert result.gd_verdict.startswith("unstable: lambda_max above the threshold")
    for text in (result.gd_verdict, repr(result)):
        assert "quadratic model at this point" in text and "edge of stability (Cohen et al. 2021)" in text
        assert "diverges only well beyond it" in text and "would make training diverge" not in text
        assert "SGD" not in text
    assert result.to_dict()["full_batch"] is True


def test_a_batch_covering_the_data_is_full_batch_and_smaller_ones_get_the_sgd_check(trained_mlp):
    H = _hessian(trained_mlp)
    assert stability(H, 0.1, batch_size=64, tol=1e-3, progress=False).full_batch
    sgd = stability(H, 0.1, batch_size=8, tol=1e-3, trace_budget=9, progress=False)
    assert not sgd.full_batch and sgd.batch_size == 8 and sgd.num_samples == 64
    assert sgd.sgd_quantity == pytest.approx(sgd.trace / 8 + (7 / 8) * sgd.top_eigenvalue)
    assert "SGD (B=8)" in repr(sgd)


def test_plain_operator_needs_a_batch_size():
    op = hesse.DenseOperator(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
    with pytest.raises(HesseError, match="batch_size=B"):
        stability(op, 0.1)
    with pytest.raises(HesseError, match="simulate="):
        stability(op, 0.1, batch_size=4, simulate=3)
    result = stability(op, 0.1, batch_size=4, trace_budget=6, progress=False)
    assert not result.full_batch and result.sgd_verdict.startswith("satisfied")


@pytest.mark.parametrize("factor, grows", [(0.5, False), (4.0, True)])
def test_simulated_gradient_descent_against_the_threshold(trained_mlp, factor, grows):
    """Full-batch GD from this point: at half the threshold lr the loss falls, at four times it grows."""
    model, (X, y) = trained_mlp
    H = _hessian(trained_mlp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lam = float(hesse.eigenvalues(H, k=1, tol=1e-6, progress=False).values[0])
    lr = factor * 2 / lam
    result = stability(H, lr, simulate=12, tol=1e-6, progress=False)
    assert len(result.simulated_losses) == 13 and result.simulated_diverged is grows
    assert result.simulated_losses[0] == pytest.approx(H.loss())
    assert (result.simulated_loss_ratio > 1) is grows
    # the same steps by torch.optim.SGD on a copy of the model give the same trajectory
    copy = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    copy.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(copy.parameters(), lr=lr)
    for expected in result.simulated_losses[:4]:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(copy(X), y)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        loss.backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    assert all(p.grad is None for p in model.parameters())


def test_simulation_uses_the_momentum_settings(trained_mlp):
    model, (X, y) = trained_mlp
    H = _hessian(trained_mlp)
    result = stability(H, 0.05, momentum=0.9, nesterov=True, simulate=3, tol=1e-3, progress=False)
    copy = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    copy.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(copy.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for expected in result.simulated_losses:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(copy(X), y)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        loss.backward()
        optimizer.step()
