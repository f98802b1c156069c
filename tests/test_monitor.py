"""SharpnessMonitor: warm starts save products, logs are written, the model is untouched."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hesse
from hesse.analysis.monitor import SharpnessMonitor
from hesse.errors import HesseError
from tests.helpers import TanhMLP, dense_hessian


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = TanhMLP(d_in=6, hidden=16, d_out=4).double()
    X = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    return model, nn.CrossEntropyLoss(), X, y


def test_warm_start_uses_fewer_products_for_the_same_accuracy():
    model, crit, X, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    warm = SharpnessMonitor(model, crit, (X, y), every=3, optimizer=opt, tol=1e-4)
    cold = SharpnessMonitor(model, crit, (X, y), every=3, optimizer=opt, tol=1e-4, warm_start=False)
    for _ in range(15):
        opt.zero_grad()
        crit(model(X), y).backward()
        opt.step()
        warm.step()
        cold.step()
    assert [r["step"] for r in warm.history] == [3, 6, 9, 12, 15]
    np.testing.assert_allclose(warm.sharpness, cold.sharpness, rtol=1e-3)
    assert all(r["converged"] for r in warm.history + cold.history)
    warm_mv = np.mean([r["matvecs"] for r in warm.history[1:]])  # the first record is a cold start
    cold_mv = np.mean([r["matvecs"] for r in cold.history[1:]])
    assert warm_mv < cold_mv
    # and the value is right: the top eigenvalue of the dense Hessian (torch.func.hessian) at the final weights
    top = torch.linalg.eigvalsh(dense_hessian(model, crit, X, y))[-1]
    assert warm.sharpness[-1] == pytest.approx(float(top), rel=1e-3)


def test_lr_logs_and_plot(tmp_path):
    model, crit, X, y = _problem(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    monitor = SharpnessMonitor(model, crit, (X, y), every=2, optimizer=opt, trace=True, trace_budget=12,
                               log_dir=tmp_path / "logs", k=2)
    for _ in range(8):
        opt.zero_grad()
        loss = crit(model(X), y)
        loss.backward()
        opt.step()
        sched.step()
        monitor.step(loss.item())
    lrs = [r["lr"] for r in monitor.history]
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])
    assert [r["two_over_lr"] for r in monitor.history] == pytest.approx([2 / lr for lr in lrs])
    assert [r["threshold"] for r in monitor.history] == pytest.approx([2 / lr for lr in lrs])  # no momentum
    rows = list(csv.DictReader(open(tmp_path / "logs" / "sharpness.csv")))
    assert len(rows) == 4 and float(rows[-1]["eigenvalue"]) == pytest.approx(monitor.sharpness[-1])
    assert {"eigenvalue_2", "trace", "trace_stderr", "loss", "matvecs", "threshold", "momentum"} <= set(rows[0])
    logged = json.loads((tmp_path / "logs" / "sharpness.json").read_text())
    first = logged["history"][0]["eigenvalues"]
    assert len(logged["history"]) == 4 and len(first) == 2 and first[0] >= first[1]
    assert not list((tmp_path / "logs").glob("*.tmp"))  # atomic writes leave no temporaries
    fig = monitor.plot()
    fig.savefig(tmp_path / "monitor.png")
    assert (tmp_path / "monitor.png").stat().st_size > 0


def test_monitor_leaves_mode_grads_and_weights_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4)).double()
    crit = nn.CrossEntropyLoss()
    X, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    model.train()
    crit(model(X), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    monitor = SharpnessMonitor(model, crit, (X, y), every=1, lr=0.1)
    record = monitor.step()
    assert record is not None and record["two_over_lr"] == pytest.approx(20.0)
    assert model.training and model[2].training  # dropout measured off, mode restored
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))
    with pytest.raises(HesseError, match="every"):
        SharpnessMonitor(model, crit, (X, y), every=0)


@pytest.mark.slow
def test_edge_of_stability_example_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "examples" / "edge_of_stability.py"), "--steps", "20", "--every", "10",
         "--n", "100", "--width", "8", "--lrs", "0.4", "--out", str(tmp_path)],
        check=True, capture_output=True, timeout=120,
    )
    report = json.loads((tmp_path / "edge_of_stability.json").read_text())
    assert [r["lr"] for r in report["runs"]] == [0.4] and report["runs"][0]["two_over_lr"] == 5.0
    assert (tmp_path / "edge_of_stability.png").stat().st_size > 0


def test_threshold_accounts_for_momentum(tmp_path):
    model, crit, X, y = _problem(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = SharpnessMonitor(model, crit, (X, y), every=1, optimizer=opt, log_dir=tmp_path)
    rec = monitor.record()
    assert rec["momentum"] == pytest.approx(0.9)
    assert rec["threshold"] == pytest.approx(38.0) and rec["two_over_lr"] == pytest.approx(20.0)
    row = next(csv.DictReader(open(tmp_path / "sharpness.csv")))
    assert float(row["threshold"]) == pytest.approx(38.0) and float(row["momentum"]) == pytest.approx(0.9)
    assert json.loads((tmp_path / "sharpness.json").read_text())["history"][0]["threshold"] == pytest.approx(38.0)
    ax = monitor.plot().axes[0]
    assert any(line.get_label() == "stability threshold" and np.allclose(line.get_ydata(), 38.0)
               for line in ax.get_lines())
    # fixed lr and momentum; Nesterov and dampening
    assert SharpnessMonitor(model, crit, (X, y), lr=0.1, momentum=0.9).record()["threshold"] == pytest.approx(38.0)
    nesterov = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    assert SharpnessMonitor(model, crit, (X, y), optimizer=nesterov).threshold == pytest.approx(3.8 / 0.28)
    damped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    assert SharpnessMonitor(model, crit, (X, y), optimizer=damped).threshold == pytest.approx(76.0)
    with pytest.raises(HesseError, match="momentum"):
        SharpnessMonitor(model, crit, (X, y), optimizer=opt, momentum=0.9)


@pytest.mark.parametrize("lr, beta", [(0.1, 0.9), (0.05, 0.5)])
def test_threshold_is_the_stability_edge_of_sgd_with_momentum(lr, beta):
    """Heavy-ball SGD on L = lam w^2 / 2 is stable just below the recorded threshold, unstable above."""
    model, crit, X, y = _problem(3)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    edge = SharpnessMonitor(model, crit, (X, y), optimizer=opt).threshold
    for factor, stable in ((0.99, True), (1.01, False)):
        w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        sgd = torch.optim.SGD([w], lr=lr, momentum=beta)
        for _ in range(3000):
            sgd.zero_grad()
            (0.5 * factor * edge * w ** 2).sum().backward()
            sgd.step()
        assert (abs(float(w.detach())) < 1) == stable


def test_reduction_sum_for_a_plain_function_criterion():
    model, _, X, y = _problem(4)
    crit = lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum")  # noqa: E731
    batches = [(X[:40], y[:40]), (X[40:], y[40:])]
    monitor = SharpnessMonitor(model, crit, batches, reduction="sum", tol=1e-8)
    top = torch.linalg.eigvalsh(dense_hessian(model, crit, X, y))[-1]  # the summed loss's dense Hessian
    assert monitor.record()["eigenvalue"] == pytest.approx(float(top), rel=1e-6)
    mean = SharpnessMonitor(model, nn.CrossEntropyLoss(), batches, tol=1e-8).record()["eigenvalue"]
    assert float(top) == pytest.approx(64 * mean, rel=1e-6)
    with pytest.raises(HesseError, match="reduction"):
        SharpnessMonitor(model, nn.CrossEntropyLoss(reduction="none"), batches)
    with pytest.raises(HesseError, match="reduction"):
        SharpnessMonitor(model, crit, batches, reduction="none")


def test_an_objective_is_accepted_and_no_progress_bar_is_shown(capsys):
    model, crit, X, y = _problem(5)
    objective = hesse.Objective(model, crit, (X, y), params=["out.weight", "out.bias"])
    record = SharpnessMonitor(objective, lr=0.1, tol=1e-8).record()
    names = ["out.weight", "out.bias"]
    top = torch.linalg.eigvalsh(dense_hessian(model, crit, X, y, names=names).detach())[-1]
    assert record["eigenvalue"] == pytest.approx(float(top), rel=1e-6)
    assert capsys.readouterr().err == ""
    with pytest.raises(HesseError, match="either an Objective"):
        SharpnessMonitor(objective, params=names)


class StopAfter(nn.Module):
    """Cross-entropy that raises KeyboardInterrupt on its ``n``-th call."""

    reduction = "mean"

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, output, target):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(output, target)


@pytest.mark.filterwarnings("ignore::hesse.errors.NotConvergedWarning")
def test_ctrl_c_during_a_measurement_stops_training():
    model, _, X, y = _problem(6)
    monitor = SharpnessMonitor(model, StopAfter(5), (X, y), every=1, lr=0.1)
    model.train()
    with pytest.raises(KeyboardInterrupt) as caught:
        monitor.step()
    assert caught.value.partial.interrupted  # the eigensolver's partial result
    assert monitor.history == [] and model.training
