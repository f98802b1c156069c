"""Curvature-aware optimizers: updates against hand-computed formulas, convergence, memory,
state_dict round trips, BatchNorm statistics, conv/attention models."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hesse
from hesse.apply.optim import SAM, AdaHessian, KFACOptimizer, SophiaG, SophiaH, spatial_average
from hesse.errors import HesseError
from tests.helpers import SmallCNN, TanhMLP, TinyTransformer

H = torch.tensor([4.0, 0.5, 2.0, 1.0], dtype=torch.float64)
W0 = torch.tensor([1.0, -2.0, 0.3, 0.05], dtype=torch.float64)


def quadratic(w: torch.Tensor, h: torch.Tensor = H) -> torch.Tensor:
    """``½ Σ h_i w_i²``: gradient ``h ⊙ w``, Hessian ``diag(h)``."""
    return 0.5 * (h * w * w).sum()


def sam_closure(model, criterion, X, y):
    def closure():
        loss = criterion(model(X), y)
        loss.backward()
        return loss
    return closure


def run_steps(name: str, model: nn.Module, opt, X, y, n: int, criterion=nn.CrossEntropyLoss()):
    """``n`` steps of optimizer ``name`` on one batch with the closure convention it needs."""
    loss = None
    for _ in range(n):
        if name == "sophia_g":
            loss = opt.step(lambda: (criterion(out := model(X), y), out))
        elif name in ("sam", "asam"):
            loss = opt.step(sam_closure(model, criterion, X, y))
        elif name == "kfac":
            opt.zero_grad()
            loss = opt.step(sam_closure(model, criterion, X, y), batch=(X, y))
        else:
            loss = opt.step(lambda: criterion(model(X), y))
    return float(loss)


def make(name: str, model: nn.Module, lr: float | None = None):
    """Each optimizer with settings suited to the small test problems."""
    p = model.parameters()
    return {
        "adahessian": lambda: AdaHessian(p, lr=lr or 0.1),
        "sophia_h": lambda: SophiaH(p, lr=lr or 0.02, weight_decay=0.0, update_interval=2),
        "sophia_g": lambda: SophiaG(p, lr=lr or 0.02, weight_decay=0.0, update_interval=2),
        "sam": lambda: SAM(p, torch.optim.SGD, lr=lr or 0.1, momentum=0.9),
        "asam": lambda: SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, lr=lr or 0.1, momentum=0.9),
        "kfac": lambda: KFACOptimizer(model, nn.CrossEntropyLoss(), lr=lr or 0.05, damping=0.01, factor_interval=2,
                                      inverse_interval=2),
    }[name]()


NAMES = ["adahessian", "sophia_h", "sophia_g", "sam", "asam", "kfac"]


def data(n=32, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---- updates equal their formulas ---------------------------------------------------------------
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_adahessian_first_step_on_diagonal_quadratic(power):
    w = nn.Parameter(W0.clone())
    opt = AdaHessian([w], lr=0.1, eps=1e-4, hessian_power=power)
    opt.step(lambda: quadratic(w))
    # |z ⊙ Hz| = h exactly; after bias correction m̂ = g, √v̂ = h
    g = H * W0
    assert torch.allclose(w.detach(), W0 - 0.1 * g / (H ** power + 1e-4), atol=1e-14)
    assert torch.allclose(w.grad, g) and w.grad.grad_fn is None


def test_adahessian_second_step_and_weight_decay():
    w = nn.Parameter(W0.clone())
    opt = AdaHessian([w], lr=0.1, betas=(0.9, 0.999), weight_decay=0.01)
    w_prev = W0.clone()
    m, v = torch.zeros_like(W0), torch.zeros_like(W0)
    for t in (1, 2):
        opt.step(lambda: quadratic(w))
        g = H * w_prev
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * H * H
        denom = (v.sqrt() / math.sqrt(1 - 0.999 ** t)) + 1e-4
        w_prev = w_prev - 0.1 * (m / (1 - 0.9 ** t) / denom + 0.01 * w_prev)
        assert torch.allclose(w.detach(), w_prev, atol=1e-13)


@pytest.mark.parametrize("shape", [(3, 2, 5), (3, 2, 3, 3), (2, 2, 3, 3, 3)])
def test_spatial_average_any_conv_dimensionality(shape):
    d = torch.rand(shape)
    out = spatial_average(d)
    assert out.shape == d.shape
    assert torch.allclose(out, d.mean(dim=tuple(range(2, d.ndim)), keepdim=True).expand_as(d))
    assert torch.equal(spatial_average(d.flatten(1)), d.flatten(1))  # linear weights, biases: unchanged


def test_sophia_h_clipping_and_negative_curvature():
    h = torch.tensor([100.0, 1.0, -3.0, 0.0], dtype=torch.float64)
    w0 = torch.tensor([1.0, -3.0, 0.3, 0.05], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = SophiaH([w], lr=0.1, betas=(0.9, 0.5), rho=0.5, weight_decay=0.0, eps=1e-12)
    opt.step(lambda: quadratic(w, h))
    m, hs = 0.1 * h * w0, 0.5 * h  # z ⊙ Hz = h exactly
    expected = w0 - 0.1 * (m / torch.clamp(0.5 * hs, min=1e-12)).clamp(-1, 1)
    assert torch.allclose(w.detach(), expected, atol=1e-14)
    # coordinate 0: ratio 0.4 (not clipped); 1: -1.2 clipped to -1; 2, 3 (h <= 0): lr · sign(m)
    step = (w0 - w.detach()) / 0.1
    assert torch.allclose(step, torch.tensor([0.4, -1.0, -1.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_sophia_h_refreshes_curvature_every_k_steps_and_decays_weights():
    w = nn.Parameter(W0.clone())
    opt = SophiaH([w], lr=0.01, rho=0.04, weight_decay=0.1, update_interval=3)
    for _ in range(4):
        opt.step(lambda: quadratic(w))
    beta2 = 0.99
    # estimates at steps 1 and 4: h = β2 (1-β2) H + (1-β2) H
    assert torch.allclose(opt.state[w]["hessian"], (beta2 * (1 - beta2) + (1 - beta2)) * H, atol=1e-14)


def test_sophia_g_is_b_times_squared_sampled_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    opt = SophiaG(model.parameters(), lr=0.1, rho=0.04, weight_decay=0.0, seed=7)
    ref = copy.deepcopy(model)
    opt.step(lambda: (F.cross_entropy(out := model(X), y), out))
    logits = ref(X)
    sampled = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1,
                                generator=torch.Generator().manual_seed(7)).squeeze(1)
    g_hat = torch.autograd.grad(F.cross_entropy(logits, sampled), list(ref.parameters()))
    for p, gh in zip(model.parameters(), g_hat):
        assert torch.allclose(opt.state[p]["hessian"], 0.01 * 5 * gh * gh, atol=1e-15)


def test_sam_perturbation_and_step():
    w = nn.Parameter(W0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1)
    w.grad = None
    quadratic(w).backward()
    g = H * W0
    assert torch.allclose(opt.perturbation()[w], 0.05 * g / g.norm(), atol=1e-15)

    def closure():
        loss = quadratic(w)
        loss.backward()
        return loss
    opt.step(closure)
    w_adv = W0 + 0.05 * g / g.norm()
    assert torch.allclose(w.detach(), W0 - 0.1 * H * w_adv, atol=1e-15)


def test_asam_scales_weights_not_biases():
    weight, bias = nn.Parameter(torch.tensor([[1.0, -3.0]])), nn.Parameter(torch.tensor([2.0]))
    opt = SAM([weight, bias], torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, lr=0.1)
    weight.grad, bias.grad = torch.tensor([[0.5, 1.0]]), torch.tensor([2.0])
    T = weight.detach().abs() + 0.01
    norm = torch.sqrt(((T * weight.grad) ** 2).sum() + bias.grad.pow(2).sum())
    eps = opt.perturbation()
    assert torch.allclose(eps[weight], 0.5 * T * T * weight.grad / norm)
    assert torch.allclose(eps[bias], 0.5 * bias.grad / norm)


def test_sam_updates_batchnorm_statistics_once():
    torch.manual_seed(0)
    model = SmallCNN(batchnorm=True)
    plain = copy.deepcopy(model)
    X, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(sam_closure(model, nn.CrossEntropyLoss(), X, y))
    with torch.no_grad():
        plain(X)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(plain.bn, name)), name
    assert model.bn.track_running_stats


def test_kfac_step_equals_damped_kfac_inverse_times_gradient():
    torch.manual_seed(0)
    model, crit = nn.Linear(4, 3).double(), nn.CrossEntropyLoss()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    op = hesse.KFAC(model, crit, (X, y), kind="mc", seed=5)
    op.refresh()  # factors at w0 (they are otherwise computed on first use)
    inverse = op.inverse(0.1)
    grads = torch.autograd.grad(crit(model(X), y), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in grads])
    opt = KFACOptimizer(model, crit, lr=0.5, momentum=0.0, damping=0.1, seed=5)
    opt.step(sam_closure(model, crit, X, y), batch=(X, y))
    w1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(w1, w0 - 0.5 * (inverse @ g), atol=1e-12)


def test_kfac_attention_rows_are_preconditioned_by_their_own_blocks():
    torch.manual_seed(0)
    model, crit = TinyTransformer().double(), nn.CrossEntropyLoss()
    batch = {"input_ids": torch.randint(0, 20, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,))}
    names = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    op = hesse.KFAC(model, crit, batch, params=names, kind="mc", seed=3)
    op.refresh()
    crit(model(batch["input_ids"], batch["attention_mask"]), batch["labels"]).backward()
    named = dict(model.named_parameters())
    g = torch.cat([named[n].grad.reshape(-1) for n in names])
    w0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    KFACOptimizer(model, crit, lr=0.5, momentum=0.0, damping=0.1, seed=3).step(batch=batch)
    w1 = torch.cat([named[n].detach().reshape(-1) for n in names])
    assert torch.allclose(w1, w0 - 0.5 * (op.inverse(0.1) @ g), atol=1e-10)


def test_kfac_plain_sgd_for_parameters_without_a_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = KFACOptimizer(model, nn.CrossEntropyLoss(), lr=0.1, momentum=0.0)
    assert set(opt._layers) == {"0", "2"}
    before = model[1].weight.detach().clone()
    opt.step(sam_closure(model, nn.CrossEntropyLoss(), X, y), batch=(X, y))
    assert torch.allclose(model[1].weight.detach(), before - 0.1 * model[1].weight.grad)


# ---- behaviour --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_converges_on_logistic_regression(name):
    torch.manual_seed(0)
    X = torch.randn(64, 5)
    y = (X @ torch.randn(5, 3)).argmax(1)  # separable by a linear teacher: convex, loss → 0
    model = nn.Linear(5, 3)
    with torch.no_grad():
        start = float(nn.CrossEntropyLoss()(model(X), y))
    final = run_steps(name, model, make(name, model), X, y, 60)
    assert final < 0.4 * start


@pytest.mark.parametrize("opt_cls", [AdaHessian, SophiaH])
def test_no_graph_survives_a_step_and_memory_is_flat(opt_cls):
    """5,000 steps on a 3-parameter quadratic: the double-backward graph (which holds the
    intermediate ``h ⊙ w``) dies inside each step, and the number of live objects is flat."""
    w = nn.Parameter(torch.ones(3))
    opt = opt_cls([w], lr=0.01, **({"weight_decay": 0.0, "update_interval": 1} if opt_cls is SophiaH else {}))
    h = torch.tensor([1.0, 2.0, 3.0])
    last: list[weakref.ref] = []

    def closure():
        hw = h * w  # saved by the graph: alive exactly as long as the graph
        last[:] = [weakref.ref(hw)]
        return 0.5 * (hw * w).sum()
    counts = []
    for step in range(5000):
        opt.step(closure)
        assert last[0]() is None
        if step in (100, 4999):
            gc.collect()
            counts.append(len(gc.get_objects()))
    assert w.grad.grad_fn is None and not w.grad.requires_grad
    assert abs(counts[1] - counts[0]) < 20


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_bit_identically(name):
    torch.manual_seed(0)
    X, y = data()
    model = TanhMLP()
    opt = make(name, model)
    run_steps(name, model, opt, X, y, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run_steps(name, model, opt, X, y, 3)
    resumed = TanhMLP()
    resumed.load_state_dict(saved_model)
    opt2 = make(name, resumed)
    opt2.load_state_dict(saved_opt)
    run_steps(name, resumed, opt2, X, y, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.conv1d = nn.Conv1d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = torch.tanh(self.conv1d(h.flatten(2))).view_as(h)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("name", NAMES)
def test_conv_models_run(name):
    torch.manual_seed(0)
    for model, X in ((Conv3dNet(), torch.randn(6, 1, 4, 4, 4)), (SmallCNN(), torch.randn(6, 1, 8, 8))):
        y = torch.randint(0, 3, (6,))
        loss = run_steps(name, model, make(name, model, lr=0.01), X, y, 3)
        assert math.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_attention_model_runs(name):
    torch.manual_seed(0)
    model = TinyTransformer()
    ids, mask = torch.randint(0, 20, (4, 5)), torch.ones(4, 5, dtype=torch.long)
    y = torch.randint(0, 3, (4,))
    crit = nn.CrossEntropyLoss()
    opt = make(name, model, lr=0.01)
    for _ in range(2):
        if name == "sophia_g":
            loss = opt.step(lambda: (crit(out := model(ids, mask), y), out))
        elif name in ("sam", "asam"):
            loss = opt.step(lambda: (crit(model(ids, mask), y).backward(), crit(model(ids, mask), y))[1])
        elif name == "kfac":
            opt.zero_grad()
            crit(model(ids, mask), y).backward()
            loss = opt.step(batch={"input_ids": ids, "attention_mask": mask, "labels": y})
            loss = crit(model(ids, mask), y)
        else:
            loss = opt.step(lambda: crit(model(ids, mask), y))
        assert math.isfinite(float(loss))


def test_closure_errors_are_explained():
    w = nn.Parameter(W0.clone())
    with pytest.raises(HesseError, match="closure"):
        AdaHessian([w]).step()
    with pytest.raises(HesseError, match="loss, logits"):
        SophiaG([w]).step(lambda: quadratic(w))
    with pytest.raises(HesseError, match="scalar loss"):
        SophiaH([w]).step(lambda: float(quadratic(w)))
    model = nn.Linear(2, 2)
    opt = KFACOptimizer(model, nn.CrossEntropyLoss())
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(HesseError, match="batch"):
        opt.step()


def test_param_groups_and_zero_grad():
    a, b = nn.Parameter(W0[:2].clone()), nn.Parameter(W0[2:].clone())
    opt = AdaHessian([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}])
    opt.step(lambda: quadratic(torch.cat([a, b])))
    assert not torch.equal(a.detach(), W0[:2]) and torch.equal(b.detach(), W0[2:])
    opt.zero_grad()
    assert a.grad is None and b.grad is None
