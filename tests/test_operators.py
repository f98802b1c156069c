"""Curvature operators against dense matrices from torch.func on small models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesse
from hesse.operators import BlockDiagonalOperator, DenseOperator
from tests.helpers import (
    SmallCNN,
    TanhMLP,
    TinyTransformer,
    dense_ggn,
    dense_hessian,
    flat_functional,
    uneven_batches,
)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["forward-over-reverse", "double-backward"])
@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_hessian_matches_dense_float64(problem, method, request):
    model, crit, X, y, batches = request.getfixturevalue(problem)
    H_dense = dense_hessian(model, crit, X, y)
    H = hesse.Hessian(model, crit, batches, method=method)
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    assert H.shape == H_dense.shape
    assert rel_err(H @ V, H_dense @ V) < 1e-8
    assert H.num_samples == len(y)


@pytest.mark.parametrize("method", ["forward-over-reverse", "double-backward"])
def test_hessian_float32_against_float64_reference(method):
    torch.manual_seed(3)
    model = TanhMLP()
    X, y = torch.randn(41, 6), torch.randint(0, 4, (41,))
    crit = nn.CrossEntropyLoss()
    H = hesse.Hessian(model, crit, uneven_batches(X, y, [20, 20, 1]), method=method)
    V = torch.randn(H.shape[0], 3)
    reference = dense_hessian(model.double(), crit, X.double(), y) @ V.double()
    assert H.dtype == torch.float32  # the operator was built before .double(); products use fp32 values
    model.float()
    assert rel_err((H @ V).double(), reference) < 1e-4


def test_uneven_batches_equal_one_full_batch(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    full = hesse.Hessian(model, crit, (X, y)) @ v
    assert rel_err(hesse.Hessian(model, crit, batches) @ v, full) < 1e-10
    # an unweighted mean over batches (what a naive loop does) is measurably different
    naive = sum(hesse.Hessian(model, crit, b) @ v for b in batches) / len(batches)
    assert rel_err(naive, full) > 1e-3


def test_sum_reduction_is_the_sum_of_batches(mlp_problem):
    model, _, X, y, batches = mlp_problem
    crit = nn.CrossEntropyLoss(reduction="sum")
    H_dense = dense_hessian(model, crit, X, y)
    v = torch.randn(H_dense.shape[0], dtype=torch.float64)
    assert rel_err(hesse.Hessian(model, crit, batches) @ v, H_dense @ v) < 1e-10


def test_functional_criterion_and_generic_iterable(mlp_problem):
    model, _, X, y, batches = mlp_problem
    crit = nn.functional.cross_entropy
    H = hesse.Hessian(model, crit, tuple(batches))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert rel_err(H @ v, dense_hessian(model, crit, X, y) @ v) < 1e-10


def test_dataloader_with_smaller_last_batch(mlp_problem):
    model, crit, X, y, _ = mlp_problem
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)
    H = hesse.Hessian(model, crit, loader)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert rel_err(H @ v, dense_hessian(model, crit, X, y) @ v) < 1e-10


def test_batchnorm_in_eval_mode_matches_dense():
    torch.manual_seed(4)
    model = SmallCNN(batchnorm=True).double()
    X, y = torch.randn(21, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (21,))
    model.train()
    model(X)  # give the running statistics non-trivial values
    model.eval()
    crit = nn.CrossEntropyLoss()
    H = hesse.Hessian(model, crit, uneven_batches(X, y, [10, 10, 1]))
    V = torch.randn(H.shape[0], 4, dtype=torch.float64)
    assert rel_err(H @ V, dense_hessian(model, crit, X, y) @ V) < 1e-8
    G = hesse.GGN(model, crit, uneven_batches(X, y, [10, 10, 1]))
    assert rel_err(G @ V, dense_ggn(model, crit, X, y) @ V) < 1e-8


def _token_batches(n=13, seq=5, vocab=20):
    torch.manual_seed(5)
    ids = torch.randint(0, vocab, (n, seq))
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, -2:] = 0  # padding on some rows
    labels = torch.randint(0, 3, (n,))
    cuts = [(0, 6), (6, 12), (12, n)]
    batches = [{"input_ids": ids[a:b], "attention_mask": mask[a:b], "labels": labels[a:b]} for a, b in cuts]
    return ids, mask, labels, batches


def test_tiny_transformer_with_dict_batches():
    model = TinyTransformer().double()
    ids, mask, labels, batches = _token_batches()
    crit = nn.CrossEntropyLoss()
    theta, call = flat_functional(model)

    def loss(t):
        return crit(call(t, input_ids=ids, attention_mask=mask), labels)

    V = torch.randn(theta.numel(), 3, dtype=torch.float64)
    # Reference: torch.autograd.functional.hvp column by column, confirmed by finite
    # differences. (torch.func.hessian is wrong for nn.MultiheadAttention in torch 2.13:
    # its dense Hessian is not even symmetric, so it cannot serve as the reference here.)
    with sdpa_kernel(SDPBackend.MATH):  # fused attention has no second derivatives
        reference = torch.stack(
            [torch.autograd.functional.hvp(loss, theta, V[:, k])[1] for k in range(3)], dim=1
        )
        eps = 1e-6
        grad = torch.func.grad(loss)
        finite_diff = (grad(theta + eps * V[:, 0]) - grad(theta - eps * V[:, 0])) / (2 * eps)
    assert rel_err(reference[:, 0], finite_diff) < 1e-7
    H = hesse.Hessian(model, crit, batches)  # dict batches with "labels" work without a hook
    assert rel_err(H @ V, reference) < 1e-8
    # the forward= hook for custom objectives gives the same operator
    hook = lambda m, b: (m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b["labels"])
    assert rel_err(hesse.Hessian(model, crit, batches, forward=hook, method="double-backward") @ V, reference) < 1e-8


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_ggn_matches_dense(problem, request):
    model, crit, X, y, batches = request.getfixturevalue(problem)
    G = hesse.GGN(model, crit, batches)
    V = torch.randn(G.shape[0], 4, dtype=torch.float64)
    assert rel_err(G @ V, dense_ggn(model, crit, X, y) @ V) < 1e-8


def _per_sample_gradients(model, X, loss_of_output):
    """[N, P] gradients of loss_of_output(f_n, n) per sample, densely."""
    theta, call = flat_functional(model)
    rows = [torch.func.grad(lambda t: loss_of_output(call(t, X[n:n + 1]), n))(theta) for n in range(len(X))]
    return torch.stack(rows)


def test_true_fisher_is_the_expected_outer_product(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    N = len(y)
    probs = torch.softmax(model(X), dim=1).detach()
    F_dense = torch.zeros(sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for c in range(4):
        G = _per_sample_gradients(model, X, lambda f, n: nn.functional.cross_entropy(f, torch.tensor([c])))
        F_dense += (G * probs[:, c:c + 1]).T @ G / N
    F = hesse.Fisher(model, crit, batches, kind="true")
    V = torch.randn(F.shape[0], 3, dtype=torch.float64)
    assert rel_err(F @ V, F_dense @ V) < 1e-8


def test_empirical_fisher_is_the_sum_of_outer_products(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    G = _per_sample_gradients(model, X, lambda f, n: nn.functional.cross_entropy(f, y[n:n + 1]))
    EF = G.T @ G / len(y)
    E = hesse.Fisher(model, crit, batches, kind="empirical")
    V = torch.randn(E.shape[0], 3, dtype=torch.float64)
    assert rel_err(E @ V, EF @ V) < 1e-8


def test_mc_fisher_converges_to_true_fisher_and_is_seeded(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    exact = hesse.Fisher(model, crit, batches, kind="true") @ V
    errors = [rel_err(hesse.Fisher(model, crit, batches, kind="mc", mc_samples=m, seed=7) @ V, exact)
              for m in (1, 16, 256, 2048)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 0.03
    a = hesse.Fisher(model, crit, batches, kind="mc", seed=3)
    assert torch.equal(a @ V, a @ V)
    assert torch.equal(a @ V, hesse.Fisher(model, crit, batches, kind="mc", seed=3) @ V)
    assert not torch.equal(a @ V, hesse.Fisher(model, crit, batches, kind="mc", seed=4) @ V)


@pytest.mark.parametrize("crit", [nn.MSELoss(), nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss()])
def test_true_fisher_equals_ggn_for_regression_and_binary(crit):
    torch.manual_seed(6)
    model = TanhMLP(d_out=2).double()
    X = torch.randn(15, 6, dtype=torch.float64)
    y = torch.rand(15, 2, dtype=torch.float64)
    if isinstance(crit, nn.BCEWithLogitsLoss):
        y = (y > 0.5).double()
    batches = uneven_batches(X, y, [7, 7, 1])
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    ggn = dense_ggn(model, crit, X, y) @ V
    assert rel_err(hesse.Fisher(model, crit, batches, kind="true") @ V, ggn) < 1e-8
    mc = hesse.Fisher(model, crit, batches, kind="mc", mc_samples=4000, seed=0) @ V
    assert rel_err(mc, ggn) < 0.05


def test_fisher_cross_entropy_honours_ignore_index():
    torch.manual_seed(8)
    model = TanhMLP().double()
    X, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    y[[1, 5]] = -100
    crit = nn.CrossEntropyLoss()
    keep = y != -100
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    ref = dense_ggn(model, crit, X[keep], y[keep]) @ V
    assert rel_err(hesse.Fisher(model, crit, (X, y), kind="true") @ V, ref) < 1e-8


def test_matmat_equals_columns(cnn_problem):
    model, crit, X, y, batches = cnn_problem
    for op in (hesse.Hessian(model, crit, batches), hesse.GGN(model, crit, batches),
               hesse.Fisher(model, crit, batches, kind="empirical")):
        V = torch.randn(op.shape[0], 4, dtype=torch.float64)
        columns = torch.stack([op @ V[:, k] for k in range(4)], dim=1)
        assert rel_err(op @ V, columns) < 1e-12


def test_wide_products_are_chunked_by_measurement_and_equal_the_columns(mlp_problem):
    """A product of 40 columns: the first batch runs 4 columns untimed, then times chunks of 4, 8
    and 16, and keeps the fastest per column as ``max_columns``; the stitched result equals the columns."""
    model, crit, X, y, batches = mlp_problem
    H = hesse.Hessian(model, crit, batches)
    V = torch.randn(H.shape[0], 40, dtype=torch.float64)
    HV = H @ V
    assert set(H.chunk_calibration) == {4, 8, 16} and H.max_columns in (4, 8, 16)
    fixed = hesse.Hessian(model, crit, batches)
    fixed.max_columns = 3  # a user's fixed chunk: no measurement
    assert rel_err(fixed @ V, HV) < 1e-12 and fixed.chunk_calibration is None
    columns = torch.stack([H @ V[:, k] for k in (0, 13, 39)], dim=1)
    assert rel_err(HV[:, [0, 13, 39]], columns) < 1e-12
    narrow = hesse.GGN(model, crit, batches)
    narrow @ V[:, :15]  # fewer than 4 + 4 + 8 columns: nothing to compare, no measurement
    assert narrow.chunk_calibration is None and narrow.max_columns is None


def test_loop_fallback_equals_vmap(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    a = hesse.Hessian(model, crit, batches) @ V
    b = hesse.Hessian(model, crit, batches, vectorize=False) @ V
    assert rel_err(a, b) < 1e-12


def test_parameter_selection_and_block_views(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    H_dense = dense_hessian(model, crit, X, y)
    H = hesse.Hessian(model, crit, batches)
    assert list(H.module_blocks()) == ["fc1", "fc2", "out"]
    D = H.block_diagonal()
    D_dense = torch.zeros_like(H_dense)
    for s in D.blocks.values():
        D_dense[s, s] = H_dense[s, s]
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert rel_err(D @ V, D_dense @ V) < 1e-10
    # restricted to one layer (by glob, by module): the dense sub-block
    s = H.module_blocks()["fc2"]
    for spec in ("fc2.*", model.fc2, ["fc2.weight", "fc2.bias"]):
        sub = H.restrict(spec)
        v = torch.randn(sub.shape[0], dtype=torch.float64)
        assert rel_err(sub @ v, H_dense[s, s] @ v) < 1e-10
    # custom groups
    groups = H.block_diagonal({"hidden": ["fc1.*", "fc2.*"], "head": ["out.*"]})
    assert list(groups.blocks) == ["hidden", "head"]
    v = torch.randn(H.shape[0], dtype=torch.float64)
    hidden = groups.blocks["hidden"]
    assert rel_err((groups @ v)[hidden], H_dense[hidden, hidden] @ v[hidden]) < 1e-10


def test_flatten_unflatten_roundtrip(mlp_problem):
    model, crit, _, _, batches = mlp_problem
    H = hesse.Hessian(model, crit, batches)
    v = torch.arange(H.shape[0], dtype=torch.float64)
    parts = H.unflatten(v)
    assert list(parts) == H.param_names
    assert parts["fc1.weight"].shape == model.fc1.weight.shape
    assert torch.equal(H.flatten(parts), v)
    assert torch.equal(H.parameters_vector(), torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_to_scipy_and_dense_operator(mlp_problem):
    import numpy as np
    model, crit, X, y, batches = mlp_problem
    H = hesse.Hessian(model, crit, batches)
    H_dense = dense_hessian(model, crit, X, y)
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    assert np.allclose(H.to_scipy() @ x, H_dense.numpy() @ x, rtol=1e-10, atol=1e-12)
    assert hesse.as_operator(H_dense).shape == H.shape
    B = BlockDiagonalOperator(DenseOperator(H_dense), H.blocks)
    assert list(B.blocks) == H.param_names


def test_loss_and_gradient_are_full_data(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    H = hesse.Hessian(model, crit, batches)
    theta, call = flat_functional(model)
    assert abs(H.loss() - float(crit(model(X), y).detach())) < 1e-12
    assert rel_err(H.gradient(), torch.func.grad(lambda t: crit(call(t, X), y))(theta)) < 1e-10


def test_model_is_left_exactly_as_it_was(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    model.train()
    model.fc1.bias.requires_grad_(False)
    model.out.weight.grad = torch.full_like(model.out.weight, 3.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for op in (hesse.Hessian(model, crit, batches, method="double-backward"), hesse.Hessian(model, crit, batches),
               hesse.GGN(model, crit, batches), hesse.Fisher(model, crit, batches)):
        op @ torch.randn(op.shape[0], 2, dtype=torch.float64)
        op.gradient()
    assert model.training
    assert not model.fc1.bias.requires_grad and model.fc2.weight.requires_grad
    assert torch.equal(model.out.weight.grad, torch.full_like(model.out.weight, 3.0))
    assert model.fc1.weight.grad is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    # frozen parameters are left out by default
    assert "fc1.bias" not in hesse.Hessian(model, crit, batches).param_names


def test_products_follow_the_current_weights(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    H = hesse.Hessian(model, crit, batches)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    with torch.no_grad():
        model.fc1.weight.mul_(1.5)
    assert rel_err(H @ v, dense_hessian(model, crit, X, y) @ v) < 1e-8


@pytest.mark.parametrize("crit", [nn.MSELoss(), nn.SmoothL1Loss(beta=2.0), nn.HuberLoss()])
def test_regression_losses_with_automatic_method(crit):
    """mse_loss has no working forward-mode second derivative in torch 2.13; the default works."""
    torch.manual_seed(9)
    model = TanhMLP(d_out=2).double()
    X, Y = torch.randn(17, 6, dtype=torch.float64), torch.randn(17, 2, dtype=torch.float64)
    batches = uneven_batches(X, Y, [8, 8, 1])
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    assert rel_err(hesse.Hessian(model, crit, batches) @ V, dense_hessian(model, crit, X, Y) @ V) < 1e-8
    assert rel_err(hesse.GGN(model, crit, batches) @ V, dense_ggn(model, crit, X, Y) @ V) < 1e-8


def test_ignored_targets_do_not_bias_the_weighting():
    """CrossEntropyLoss averages over kept targets only; batches are weighted the same way."""
    torch.manual_seed(10)
    model = TanhMLP().double()
    X, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 4, (11,))
    y[[2, 9, 10]] = -100
    crit = nn.CrossEntropyLoss()
    batches = uneven_batches(X, y, [8, 3])
    H = hesse.Hessian(model, crit, batches)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert rel_err(H @ V, dense_hessian(model, crit, X, y) @ V) < 1e-10
    assert abs(H.loss() - float(crit(model(X), y).detach())) < 1e-12
    assert H.num_samples == 8


def test_tuple_output_needs_a_forward_hook(mlp_problem):
    model, crit, X, y, batches = mlp_problem

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(hesse.HesseError, match="returned a tuple.*forward="):
        hesse.Hessian(TwoOutputs(), crit, batches).loss()
    hook = lambda m, b: (m(b[0])[0], b[1])
    assert abs(hesse.Hessian(TwoOutputs(), crit, batches, forward=hook).loss() - float(crit(model(X), y).detach())) < 1e-12


def _transformer_problem():
    torch.manual_seed(0)
    model = TinyTransformer().double().eval()
    ids = torch.randint(0, 20, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[0, 3:] = 0
    batch = ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (6,)))
    return model, batch


def test_batched_second_backward_equals_the_per_vector_loop_on_attention():
    model, batch = _transformer_problem()
    batched = hesse.Hessian(model, nn.CrossEntropyLoss(), batch, method="double-backward")
    loop = hesse.Hessian(model, nn.CrossEntropyLoss(), batch, method="double-backward", vectorize=False)
    forward = hesse.Hessian(model, nn.CrossEntropyLoss(), batch, method="forward-over-reverse")
    V = torch.randn(batched.shape[0], 5, dtype=torch.float64)
    reference = loop @ V
    assert torch.allclose(batched @ V, reference, atol=1e-10)
    assert torch.allclose(forward @ V, reference, atol=1e-10)


def test_auto_method_is_chosen_by_measurement_per_number_of_vectors(mlp_problem, monkeypatch):
    from hesse.operators import hessian

    monkeypatch.setattr(hessian, "CALIBRATE_AFTER_S", 0.0)  # time at the first product with K vectors
    model, criterion, X, y, batches = mlp_problem
    H = hesse.Hessian(model, criterion, batches)
    reference = dense_hessian(model, criterion, X, y)
    V = torch.randn(H.shape[0], 1, dtype=torch.float64)
    assert torch.allclose(H @ V, reference @ V, atol=1e-10)
    assert H.method_for(1) == "double-backward" and 1 not in H.calibration  # one vector: never timed
    for K in (2, 4):
        V = torch.randn(H.shape[0], K, dtype=torch.float64)
        assert torch.allclose(H @ V, reference @ V, atol=1e-10)
        assert set(H.calibration[K]) == {"double-backward", "forward-over-reverse"}
        assert H.method_for(K) == min(H.calibration[K], key=H.calibration[K].get)
    passes = H.passes
    H @ torch.randn(H.shape[0], 4, dtype=torch.float64)  # measured once: no new calibration
    assert H.passes == passes + 1 and len(H.calibration) == 2


def test_auto_times_forward_mode_only_once_products_have_cost_its_start_up(mlp_problem, monkeypatch):
    from hesse.operators import hessian

    monkeypatch.setattr(hessian, "_forward_mode_warm", False)
    monkeypatch.setattr(hessian, "CALIBRATE_AFTER_S", 3600.0)
    model, criterion, X, y, batches = mlp_problem
    H = hesse.Hessian(model, criterion, batches)
    reference = dense_hessian(model, criterion, X, y)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for _ in range(2):
        assert torch.allclose(H @ V, reference @ V, atol=1e-10)
    assert H.calibration == {} and H.method_for(3) == "double-backward"
    assert 0 < H._spent[3]  # the double-backward time that counts towards the start-up
    monkeypatch.setattr(hessian, "CALIBRATE_AFTER_S", H._spent[3])
    assert torch.allclose(H @ V, reference @ V, atol=1e-10)
    assert set(H.calibration[3]) == {"double-backward", "forward-over-reverse"}


def test_auto_falls_back_to_double_backward_without_forward_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    H = hesse.Hessian(model, nn.MSELoss(), (X, y))
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    theta, call = flat_functional(model)
    dense = torch.func.hessian(lambda t: ((call(t, X) - y) ** 2).mean())(theta)
    assert torch.allclose(H @ V, dense @ V, atol=1e-10)
    assert H.method_for(2) in ("double-backward", "forward-over-reverse")


def test_block_diagonal_view_sends_only_nonzero_block_columns_to_the_parent():
    from hesse.operators import BlockDiagonalOperator, DenseOperator

    A = torch.randn(6, 6, dtype=torch.float64)
    A = A + A.T
    seen = []

    class Counting(DenseOperator):
        def _matmat(self, V):
            seen.append(V.shape[1])
            return super()._matmat(V)

    D = BlockDiagonalOperator(Counting(A), {"a": slice(0, 2), "b": slice(2, 6)})
    V = torch.randn(6, 3, dtype=torch.float64)
    V[2:, 1] = 0  # column 1 lives on block "a" only
    dense = torch.block_diag(A[:2, :2], A[2:, 2:])
    assert torch.allclose(D @ V, dense @ V)
    assert seen == [5]  # 3 columns on "a" + 2 on "b", not 2 x 3
