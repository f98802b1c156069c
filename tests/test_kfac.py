"""K-FAC and EK-FAC against exact curvature blocks and analytic formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.errors import HesseError
from hesse.operators.kfac import _Capture, _discover
from tests.helpers import TinyTransformer, dense_ggn, uneven_batches


def _dense(op):
    return op @ torch.eye(op.shape[0], dtype=op.dtype)


@pytest.fixture
def one_sample_linear():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    return layer, nn.CrossEntropyLoss(), torch.randn(1, 5, dtype=torch.float64), torch.tensor([1])


def test_single_linear_sample_true_equals_exact_ggn(one_sample_linear):
    layer, crit, X, y = one_sample_linear
    K = hesse.KFAC(layer, crit, [(X, y)], kind="true")
    assert torch.allclose(_dense(K), dense_ggn(layer, crit, X, y), atol=1e-14)


def test_single_linear_sample_empirical_equals_gradient_outer_product(one_sample_linear):
    layer, crit, X, y = one_sample_linear
    grads = torch.func.grad(lambda p: crit(torch.func.functional_call(layer, p, (X,)), y))(
        {n: p.detach() for n, p in layer.named_parameters()})
    g = torch.cat([grads["weight"].reshape(-1), grads["bias"]])
    K = hesse.KFAC(layer, crit, [(X, y)], kind="empirical")
    assert torch.allclose(_dense(K), torch.outer(g, g), atol=1e-14)


def test_ekfac_is_never_farther_from_the_ggn_than_kfac(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    G = dense_ggn(model, crit, X, y)
    errors = {}
    for cls in (hesse.KFAC, hesse.EKFAC):
        op = cls(model, crit, batches, kind="true")
        errors[cls.__name__] = float((_dense(op) - G).norm())
        for block in op.factors.values():  # per block too: EK-FAC is the Frobenius-optimal diagonal in the basis
            assert block.scales.min() >= -1e-12
    assert errors["EKFAC"] <= errors["KFAC"] + 1e-12


def test_ekfac_block_error_below_kfac_per_layer(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    G = dense_ggn(model, crit, X, y)
    kfac, ekfac = hesse.KFAC(model, crit, batches, kind="true"), hesse.EKFAC(model, crit, batches, kind="true")
    Dk, De = _dense(kfac), _dense(ekfac)
    mods = kfac.module_blocks()
    for name, s in mods.items():
        assert (De[s, s] - G[s, s]).norm() <= (Dk[s, s] - G[s, s]).norm() + 1e-12, name


def test_uneven_batches_give_the_factors_of_one_batch(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    for kind in ("true", "empirical"):
        split, whole = (hesse.EKFAC(model, crit, d, kind=kind).factors for d in (batches, [(X, y)]))
        for name, block in whole.items():
            assert torch.allclose(block.A, split[name].A, atol=1e-13)
            assert torch.allclose(block.S, split[name].S, atol=1e-13)
            assert torch.allclose(block.scales, split[name].scales, atol=1e-13)


def test_kronecker_factors_are_the_blocks_factors_without_eigendecompositions(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    op = hesse.KFAC(model, crit, batches, kind="empirical")
    raw = op.kronecker_factors()
    assert op._blocks is None  # nothing eigendecomposed
    for name, block in op.factors.items():
        key = block.layer.key
        assert torch.allclose(raw[key][0], block.A, atol=1e-13) and torch.allclose(raw[key][1], block.S, atol=1e-13)


def test_sum_reduction_scales_by_the_number_of_samples(mlp_problem):
    model, _, X, y, batches = mlp_problem
    mean = hesse.KFAC(model, nn.CrossEntropyLoss(), batches, kind="empirical")
    total = hesse.KFAC(model, nn.CrossEntropyLoss(reduction="sum"), batches, kind="empirical")
    assert total.trace() == pytest.approx(len(y) * mean.trace(), rel=1e-10)


def test_damped_inverse_matches_dense_inverse_of_the_kronecker_product(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    K = hesse.KFAC(model, crit, batches, kind="mc", mc_samples=2)
    fc1 = K.factors["fc1"]
    assert torch.allclose(_dense(K)[:84, :84], torch.kron(fc1.S, fc1.A)[_flat_order(12, 6)][:, _flat_order(12, 6)])
    lam = 1e-2
    dense = _dense(K) + lam * torch.eye(K.shape[0], dtype=K.dtype)
    assert torch.allclose(_dense(K.inverse(lam)), torch.linalg.inv(dense), atol=1e-9)
    assert K.logdet(lam) == pytest.approx(float(torch.logdet(dense)), rel=1e-10)
    assert K.trace() == pytest.approx(float(dense.trace()) - lam * K.shape[0], rel=1e-10)
    assert torch.allclose(K.diagonal(), _dense(K).diagonal())
    pi = _dense(K.inverse(lam, heuristic="pi"))
    assert torch.allclose(pi, pi.T) and torch.linalg.eigvalsh(pi).min() > 0


def _flat_order(m: int, d: int) -> torch.Tensor:
    """Indices taking the augmented ``[m, d+1]`` row-major layout to ``[W.flatten(), b]``."""
    grid = torch.arange(m * (d + 1)).view(m, d + 1)
    return torch.cat([grid[:, :d].reshape(-1), grid[:, d]])


def test_conv2d_matches_the_analytic_formula():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2, bias=True).double()
    model = nn.Sequential(conv, nn.Flatten())
    X, y = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    crit = nn.MSELoss(reduction="sum")
    out = model(X)
    g = 2 * (out - y).detach().view(4, 3, 4)  # ∂ℓ/∂s per sample, [N, m, L]
    patches = torch.nn.functional.unfold(X, 2)  # [N, d, L]
    patches = torch.cat([patches, torch.ones(4, 1, 4, dtype=torch.float64)], 1)
    for sharing, (a, gg) in {"expand": (patches.transpose(1, 2).reshape(-1, 9), g.transpose(1, 2).reshape(-1, 3)),
                             "reduce": (patches.mean(2), g.sum(2))}.items():
        K = hesse.KFAC(model, crit, [(X, y)], kind="empirical", weight_sharing=sharing).factors["0"]
        assert torch.allclose(K.A, a.T @ a / len(a)) and torch.allclose(K.S, gg.T @ gg), sharing


def test_conv2d_true_kind_unfolds_the_inputs_once_for_all_classes(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2, bias=True).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(12, 3).double())
    X, y = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    s = conv(X).detach().requires_grad_(True)
    out = model[2](model[1](s))
    p = torch.softmax(out, 1).detach()
    rows = []
    for c in range(3):  # r = √(p_c / N) (e_c - p): the columns of the mean cross-entropy's Hessian root
        r = (p[:, c:c + 1] / 4).sqrt() * (torch.eye(3, dtype=torch.float64)[c] - p)
        rows.append(torch.autograd.grad(out, s, r, retain_graph=True)[0].flatten(2).transpose(1, 2).reshape(-1, 3))
    S = sum(g.T @ g for g in rows)
    calls = []
    unfold = torch.nn.functional.unfold
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: calls.append(1) or unfold(*a, **k))
    K = hesse.KFAC(model, nn.CrossEntropyLoss(), [(X, y)], kind="true").factors["0"]
    assert torch.allclose(K.S, S) and len(calls) == 1  # once per call of the layer, not once per class


def test_transformer_layers_are_factorised_and_attention_is_recomputed_exactly():
    torch.manual_seed(0)
    model = TinyTransformer().double().eval()
    ids, mask = torch.randint(0, 20, (6, 5)), torch.ones(6, 5, dtype=torch.long)
    mask[0, 3:] = 0
    reference = model(ids, mask)
    with _Capture(_discover(model, {n for n, _ in model.named_parameters()})) as capture:
        recomputed = model(ids, mask)
    assert torch.allclose(reference, recomputed, atol=1e-12) and len(capture.records["attn.q"]) == 1
    y = torch.randint(0, 3, (6,))
    op = hesse.EKFAC(model, nn.CrossEntropyLoss(), [(ids, mask, y)], forward=lambda m, b: (m(b[0], b[1]), b[2]),
                     kind="true")
    assert set(op.factors) == {"embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.0", "mlp.2", "head", "norm"}
    assert isinstance(op.factors["norm"], hesse.operators.ExactBlock)
    D = _dense(op)
    assert torch.allclose(D, D.T, atol=1e-12) and torch.linalg.eigvalsh(D).min() > -1e-10


def test_exact_true_kind_equals_mc_in_expectation(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    true = hesse.KFAC(model, crit, batches, kind="true").factors["fc2"].S
    mc = hesse.KFAC(model, crit, batches, kind="mc", mc_samples=200).factors["fc2"].S
    assert float((mc - true).norm() / true.norm()) < 0.2


def test_bad_arguments_are_refused(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    with pytest.raises(HesseError, match="kind"):
        hesse.KFAC(model, crit, batches, kind="exact")
    with pytest.raises(HesseError, match="damping"):
        hesse.KFAC(model, crit, batches).inverse(0.0)
    ekfac = hesse.EKFAC(model, crit, batches)
    with pytest.raises(HesseError, match="pi-damping"):
        ekfac.inverse(0.1, heuristic="pi") @ torch.ones(ekfac.shape[0], dtype=torch.float64)
