"""Every torch.nn module with buffers or randomness: the model is never changed, and a random
or buffer-writing forward pass is refused with the module's name (issue 17)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse


class Wrap(nn.Module):
    """``features -> layer -> linear head`` for a layer of any input/output convention."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...], kind: str = "plain"):
        super().__init__()
        self.layer, self.kind, self.shape = layer, kind, shape
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x.view(x.shape[0], *self.shape)
        if self.kind == "rnn":
            h = self.layer(h)[0]
        elif self.kind == "attention":
            h = self.layer(h, h, h, need_weights=False)[0]
        else:
            h = self.layer(h)
        return self.head(h.reshape(h.shape[0], -1)[:, :8])


def _layers():
    return {
        "BatchNorm1d": (nn.BatchNorm1d(8), (8,), "plain"),
        "BatchNorm2d": (nn.BatchNorm2d(2), (2, 2, 2), "plain"),
        "BatchNorm3d": (nn.BatchNorm3d(1), (1, 2, 2, 2), "plain"),
        "InstanceNorm1d-tracking": (nn.InstanceNorm1d(2, track_running_stats=True), (2, 4), "plain"),
        "InstanceNorm2d-tracking": (nn.InstanceNorm2d(2, track_running_stats=True), (2, 2, 2), "plain"),
        "InstanceNorm3d-tracking": (nn.InstanceNorm3d(1, track_running_stats=True), (1, 2, 2, 2), "plain"),
        "Dropout": (nn.Dropout(0.5), (8,), "plain"),
        "Dropout1d": (nn.Dropout1d(0.5), (2, 4), "plain"),
        "Dropout2d": (nn.Dropout2d(0.5), (2, 2, 2), "plain"),
        "Dropout3d": (nn.Dropout3d(0.5), (1, 2, 2, 2), "plain"),
        "AlphaDropout": (nn.AlphaDropout(0.5), (8,), "plain"),
        "FeatureAlphaDropout": (nn.FeatureAlphaDropout(0.5), (2, 2, 2), "plain"),
        "RReLU": (nn.RReLU(), (8,), "plain"),
        "LSTM-dropout": (nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True), (2, 4), "rnn"),
        "GRU-dropout": (nn.GRU(4, 4, num_layers=2, dropout=0.5, batch_first=True), (2, 4), "rnn"),
        "RNN-dropout": (nn.RNN(4, 4, num_layers=2, dropout=0.5, batch_first=True), (2, 4), "rnn"),
        "MultiheadAttention-dropout": (nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True), (2, 4), "attention"),
        "TransformerEncoderLayer": (nn.TransformerEncoderLayer(4, 2, 8, dropout=0.5, batch_first=True), (2, 4), "plain"),
    }


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _state(model)
    for n, t in before["tensors"].items():
        assert torch.equal(t, after["tensors"][n]), f"{n} changed"
    assert before["modes"] == after["modes"] and before["flags"] == after["flags"]
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(_layers()))
def test_model_is_unchanged_and_random_or_writing_layers_are_refused(name, train):
    torch.manual_seed(0)
    layer, shape, kind = _layers()[name]
    model = Wrap(layer, shape, kind).train(train)
    X, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    before = _state(model)
    calls = [
        lambda: hesse.Hessian(model, nn.CrossEntropyLoss(), [(X[:6], y[:6]), (X[6:], y[6:])]) @ torch.randn(
            sum(p.numel() for p in model.parameters())),
        lambda: hesse.Objective(model, nn.CrossEntropyLoss(), (X, y)).gradient(),
        lambda: hesse.GGN(model, nn.CrossEntropyLoss(), (X, y)) @ torch.randn(sum(p.numel() for p in model.parameters())),
    ]
    for call in calls:
        try:
            result = call()
        except hesse.HesseError as error:
            assert train, f"eval mode was refused: {error}"
            assert "layer" in str(error) or "module" in str(error)
        else:
            assert torch.isfinite(result).all()
            if train and name not in ("BatchNorm1d",):
                # a random layer or one that writes buffers must have been refused in train mode
                stateless = isinstance(layer, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)) is False \
                    and not any(True for _ in layer.buffers())
                assert not stateless or name.startswith("TransformerEncoderLayer") is False, name
        _assert_same(model, before)


def test_instance_norm_buffer_writes_are_refused_and_restored():
    model = Wrap(nn.InstanceNorm1d(2, track_running_stats=True), (2, 4)).train()
    before = model.layer.running_mean.clone()
    X, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    with pytest.raises(hesse.HesseError, match="module 'layer' \\(InstanceNorm1d\\) writes its buffer"):
        hesse.Objective(model, nn.CrossEntropyLoss(), (X, y)).loss()
    assert torch.equal(model.layer.running_mean, before)


@pytest.mark.parametrize("make", [
    lambda: Wrap(nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True), (2, 4), "rnn").train(),
    lambda: Functional().train(),
], ids=["lstm-dropout", "functional-dropout"])
def test_randomness_hidden_from_class_checks_is_refused(make):
    torch.manual_seed(0)
    model = make()
    X, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    H = hesse.Hessian(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(hesse.HesseError, match="the model is random: module"):
        H @ torch.randn(H.shape[0])
    accepted = hesse.Hessian(model, nn.CrossEntropyLoss(), (X, y), stochastic=True)
    assert torch.isfinite(accepted @ torch.randn(H.shape[0])).all()


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.5, training=True))


def test_broadcasting_targets_are_refused_with_the_fix():
    model = nn.Linear(3, 1)
    X, y = torch.randn(8, 3), torch.randn(8)
    with pytest.raises(hesse.HesseError, match=r"MSELoss got an output of shape \[8, 1\] and a target of shape \[8\]"):
        hesse.Objective(model, nn.MSELoss(), (X, y)).loss()
    fixed = hesse.Objective(model, nn.MSELoss(), (X, y), forward=lambda m, b: (m(b[0]).squeeze(-1), b[1]))
    assert fixed.loss() == pytest.approx(float(nn.MSELoss()(model(X).squeeze(-1), y)))


def test_nan_loss_and_gradient_are_refused():
    model = nn.Linear(3, 2)
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    bad = X.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(hesse.HesseError, match="loss is NaN or inf: check the data"):
        hesse.Objective(model, nn.CrossEntropyLoss(), (bad, y)).loss()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(hesse.HesseError, match=r"gradient is NaN or inf: the parameters \['weight'\]"):
        hesse.Objective(model, nn.CrossEntropyLoss(), (X, y)).gradient()


def test_a_criterion_class_instead_of_an_instance_is_refused():
    with pytest.raises(hesse.HesseError, match=r"criterion is the class CrossEntropyLoss, not a loss: create one, "
                                               r"e.g. CrossEntropyLoss\(\)"):
        hesse.Objective(nn.Linear(2, 2), nn.CrossEntropyLoss, (torch.randn(3, 2), torch.tensor([0, 1, 0])))


def test_busy_machine_with_several_threads_is_warned_once(monkeypatch):
    import os

    from hesse.operators import _guards

    monkeypatch.setattr(_guards, "_warned_threads", False)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with pytest.warns(RuntimeWarning, match="torch.set_num_threads\\(1\\)"):
        hesse.Objective(nn.Linear(3, 2), nn.CrossEntropyLoss(), (X, y)).loss()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hesse.Objective(nn.Linear(3, 2), nn.CrossEntropyLoss(), (X, y)).loss()


@pytest.mark.parametrize("stochastic, extra", [(False, 2), (True, 0)], ids=["deterministic", "stochastic"])
def test_first_batch_guard_costs_at_most_two_plain_forwards(stochastic, extra):
    """No buffers: two hook-free forwards of the first batch (none with ``stochastic=True``),
    once per objective; a double-backward product itself runs one forward per batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    X, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 3, (10,))
    H = hesse.Hessian(model, nn.CrossEntropyLoss(), [(X[:6], y[:6]), (X[6:], y[6:])], stochastic=stochastic,
                      method="double-backward")
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v
    assert len(calls) == 2 + extra
    H @ v
    assert len(calls) == 4 + extra
