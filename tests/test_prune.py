"""Pruning against exact answers: OBS updates are masked least squares, M-FAC products are a
dense inverse, OBD removes the cheapest weights of a diagonal quadratic, masks hit targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hesse.apply import (
    DampingWarning, EmpiricalFisherInverse, PruneResult, apply_masks, prune_layerwise_obs, prune_magnitude,
    prune_obd, prune_woodfisher,
)
from hesse.apply.pruning.fisher_inverse import block_fisher_inverse, block_obs_update
from hesse.apply.pruning.layerwise import collect_hessians, inverse_cholesky, layer_groups, prune_layer, sparsegpt
from hesse.apply.pruning.masks import nm_mask, schedule
from hesse.errors import HesseError
from hesse.operators import Objective

from .conftest import TanhMLP, uneven_batches


def _masked_least_squares(F: torch.Tensor, w: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """argmin_{w'} (w' − w)ᵀ F (w' − w) with w'_Q = 0, solved densely on the kept set K."""
    keep = ~prune
    out = torch.zeros_like(w)
    out[keep] = torch.linalg.solve(F[keep][:, keep], F[keep] @ w)
    return out


@pytest.fixture
def fisher():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(9, 24, generator=g, dtype=torch.float64)
    w = torch.randn(24, generator=g, dtype=torch.float64)
    prune = torch.rand(24, generator=g) < 0.5
    return G, w, prune, 0.3


def test_mfac_inverse_products_equal_a_dense_inverse(fisher):
    G, _, _, lam = fisher
    F = lam * torch.eye(24, dtype=torch.float64) + G.T @ G / G.shape[0]
    inverse = EmpiricalFisherInverse(G, lam)
    X = torch.randn(24, 3, dtype=torch.float64)
    torch.testing.assert_close(inverse.matvec(X), torch.linalg.solve(F, X))
    torch.testing.assert_close(inverse.diagonal(), torch.linalg.inv(F).diagonal())


def test_global_obs_update_is_the_masked_least_squares_solution(fisher):
    G, w, prune, lam = fisher
    F = lam * torch.eye(24, dtype=torch.float64) + G.T @ G / G.shape[0]
    new = w + EmpiricalFisherInverse(G, lam).obs_update(w, prune)
    torch.testing.assert_close(new, _masked_least_squares(F, w, prune))


def test_block_obs_update_is_the_masked_least_squares_solution_of_the_block_diagonal_fisher(fisher):
    G, w, prune, lam = fisher
    F = lam * torch.eye(24, dtype=torch.float64) + G.T @ G / G.shape[0]
    blocks = torch.block_diag(*[F[s:s + 8, s:s + 8] for s in range(0, 24, 8)])
    Finv = block_fisher_inverse(G, 8, lam)
    torch.testing.assert_close(torch.block_diag(*Finv), torch.linalg.inv(blocks))
    torch.testing.assert_close(w + block_obs_update(Finv, w, prune), _masked_least_squares(blocks, w, prune))


def test_sparsegpt_refits_a_given_mask_as_least_squares_when_pruned_columns_lead():
    """With every row's pruned weights in its leading columns, column-by-column OBS with lazy
    block updates is exactly the optimal re-fit of the rest: min ‖WX − ŴX‖²."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 13, generator=g, dtype=torch.float64)
    X = torch.randn(13, 50, generator=g, dtype=torch.float64)
    H = 2 * X @ X.T / 50
    U, note = inverse_cholesky(H, 1e-10, torch.float64, "layer")
    mask = torch.ones_like(W, dtype=torch.bool)
    for row, count in enumerate([1, 3, 5, 7, 4, 9]):
        mask[row, :count] = False
    new, _ = sparsegpt(W, U, mask=mask, block_size=4)
    Hd = H + 1e-10 * H.diagonal().mean() * torch.eye(13, dtype=torch.float64)
    expected = torch.stack([_masked_least_squares(Hd, W[r], ~mask[r]) for r in range(6)])
    assert note is None
    torch.testing.assert_close(new, expected)


def test_obd_with_the_exact_diagonal_removes_the_cheapest_weights_of_a_diagonal_quadratic():
    """L(w) = ½ Σ h_q (w_q − 0)² ... as a linear model with orthogonal inputs: H = diag(h)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double()
    h = torch.tensor([4.0, 0.5, 2.0, 1.0, 8.0, 0.25], dtype=torch.float64)
    X = torch.diag(h.sqrt()) * 6 ** 0.5  # mean over 6 samples of ½(xᵀw − y)²·2 → H = XᵀX/6 = diag(h)
    y = (X @ model.weight.detach().T).squeeze(1)
    data = [(X, y.unsqueeze(1))]
    result = prune_obd(model, nn.MSELoss(), data, sparsity=0.5)
    w = model.weight.detach()[0]
    raises = []
    for q in range(6):
        at = w.clone()
        at[q] = 0
        raises.append(float(nn.MSELoss()(X @ at.unsqueeze(1), y.unsqueeze(1))))
    assert set(torch.nonzero(~result.masks["weight"][0]).flatten().tolist()) == set(torch.tensor(raises).argsort()[:3].tolist())


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("fraction", [0.3, 0.77])
def test_masks_hit_the_requested_sparsity_exactly(mlp_problem, scope, fraction):
    model = mlp_problem[0]
    result = prune_magnitude(model, sparsity=fraction, scope=scope)
    sizes = {n: m.numel() for n, m in result.masks.items()}
    pruned = {n: int((~m).sum()) for n, m in result.masks.items()}
    if scope == "layer":
        assert pruned == {n: round(fraction * s) for n, s in sizes.items()}
    else:
        assert sum(pruned.values()) == round(fraction * sum(sizes.values()))
    assert list(result.masks) == ["fc1.weight", "fc2.weight", "out.weight"]


def test_per_tensor_targets_and_nm_patterns(mlp_problem):
    model = mlp_problem[0]
    result = prune_magnitude(model, sparsity={"fc2.weight": 0.5})
    assert result.layer_sparsity == {"fc1.weight": 0.0, "fc2.weight": 0.5, "out.weight": 0.0}
    nm = prune_magnitude(model, nm="2:4", params=["fc2.*", "out.weight"])
    assert list(nm.masks) == ["fc2.weight", "fc2.bias", "out.weight"]
    assert all((m.reshape(-1, 4).sum(-1) == 2).all() for m in nm.masks.values())
    assert prune_magnitude(model, nm="2:4").warnings == ["fc1.weight left dense: its inputs per output are not a multiple of 4"]
    with pytest.raises(HesseError, match="not a multiple of 4"):
        prune_magnitude(model, nm="2:4", params=["fc1.weight"])


def test_nm_mask_keeps_n_of_every_m_along_the_inputs():
    scores = torch.randn(5, 3, 2, 4)
    mask = nm_mask(scores, 2, 4)
    assert (mask.reshape(5, -1, 4).sum(-1) == 2).all()
    with pytest.raises(HesseError, match="multiple of 3"):
        nm_mask(torch.randn(2, 4), 1, 3)


@pytest.mark.parametrize("vectorize", [True, False])
def test_obd_with_the_empirical_fisher_diagonal_scores_by_mean_squared_per_sample_gradients(vectorize):
    model, criterion, data = _classifier(2)
    objective = Objective(model, criterion, data)
    result = prune_obd(objective, sparsity=0.6, curvature="empirical-fisher", fisher_samples=30, vectorize=vectorize)
    rows = torch.cat([objective.per_sample_gradients(b) for b in data])[:30]
    diag = objective.unflatten((rows ** 2).mean(0))
    for name, mask in result.masks.items():
        saliency = 0.5 * diag[name] * model.get_parameter(name).detach() ** 2
        assert mask.sum() == saliency.numel() - round(0.6 * saliency.numel())
        assert saliency[~mask].max() <= saliency[mask].min(), name
    with pytest.raises(HesseError, match="empirical-fisher"):
        prune_obd(objective, sparsity=0.5, curvature="fisher")


def _classifier(seed: int = 0):
    torch.manual_seed(seed)
    model = TanhMLP().double()
    X = torch.randn(48, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (48,))
    return model, nn.CrossEntropyLoss(), uneven_batches(X, y, [20, 20, 8])


@pytest.mark.parametrize("method", ["obd", "woodfisher", "woodfisher-global", "layerwise"])
def test_methods_leave_the_model_untouched_unless_apply(method):
    model, criterion, data = _classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    call = {"obd": lambda **k: prune_obd(model, criterion, data, method="exact", **k),
            "woodfisher": lambda **k: prune_woodfisher(model, criterion, data, block_size=16, **k),
            "woodfisher-global": lambda **k: prune_woodfisher(model, criterion, data, block_size=None, **k),
            "layerwise": lambda **k: prune_layerwise_obs(model, criterion, data, block_size=8, **k)}[method]
    result = call(sparsity=0.5)
    assert isinstance(result, PruneResult) and abs(result.sparsity - 0.5) < 0.01
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    expected = result.pruned_values(model)
    call(sparsity=0.5, apply=True)
    for name, value in expected.items():
        torch.testing.assert_close(model.get_parameter(name).detach(), value)
        assert (value[~result.masks[name]] == 0).all()


def test_obs_methods_reconstruct_better_than_magnitude_on_a_linear_layer():
    """On one linear layer, the layer-wise objective is exactly what SparseGPT minimises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).double()
    X = torch.randn(200, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)  # correlated inputs
    data = [(X, torch.zeros(200, 8, dtype=torch.float64))]
    objective = Objective(model, nn.MSELoss(), data)
    errors = {}
    for name, result in (("magnitude", prune_magnitude(model, sparsity=0.6)),
                         ("obs", prune_layerwise_obs(objective, sparsity=0.6, block_size=4))):
        W = result.pruned_values(model)["0.weight"]
        errors[name] = float(((X @ (W - model[0].weight.detach()).T) ** 2).mean())
    assert errors["obs"] < 0.7 * errors["magnitude"]


def test_layerwise_obs_on_convolutions_and_nm(cnn_problem):
    model, criterion, _, _, data = cnn_problem
    result = prune_layerwise_obs(model, criterion, data, nm=(2, 4))
    assert result.target == "2:4" and list(result.masks) == ["fc.weight"]
    assert result.warnings == ["conv.weight left dense: its inputs per output are not a multiple of 4"]
    assert prune_layerwise_obs(model, criterion, data, sparsity=0.5).layer_sparsity["conv.weight"] == 0.5
    for name, mask in result.masks.items():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
    H = collect_hessians(Objective(model, criterion, data), {"conv": model.conv}, dict(model.named_parameters()), data)
    assert H["conv"].shape == (9, 9)


def test_gradual_rounds_keep_earlier_removals_and_reach_the_target():
    model, criterion, data = _classifier(1)
    assert schedule(3)[-1] == 1.0 and schedule(3)[0] < schedule(3)[1]
    result = prune_woodfisher(model, criterion, data, sparsity=0.8, block_size=None, rounds=3, scope="global")
    total = sum(m.numel() for m in result.masks.values())
    assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.8 * total)
    obd = prune_obd(model, criterion, data, sparsity=0.6, rounds=2)
    assert abs(obd.sparsity - 0.6) < 0.01 and obd.updates is None


def test_damping_retries_with_more_damping_instead_of_failing():
    H = torch.zeros(4, 4, dtype=torch.float64)
    H[0, 0] = 1.0
    H[1, 2] = H[2, 1] = 0.2  # indefinite: λ must exceed 0.2, i.e. damp > 0.8 of the mean diagonal 0.25
    U, note = inverse_cholesky(H, 1e-3, torch.float32, "fc9")
    assert note is not None and "fc9" in note and "float64 with damp=1" in note
    damped = H + 0.25 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U @ damped, torch.eye(4, dtype=torch.float64))


def test_a_singular_float32_hessian_is_factorised_in_float64_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2))
    X = torch.randn(10, 1) * torch.randn(1, 8)  # rank one: singular in float32 with tiny damping
    data = [(X, torch.zeros(10, 2))]
    with pytest.warns(DampingWarning, match="layer 0.weight.*float64"):
        result = prune_layerwise_obs(model, nn.MSELoss(), data, sparsity=0.5, damp=1e-12)
    assert len(result.warnings) == 1 and result.sparsity == 0.5


def test_bad_targets_are_one_line_errors(mlp_problem):
    model, criterion, _, _, data = mlp_problem
    with pytest.raises(HesseError, match="exactly one of"):
        prune_magnitude(model)
    with pytest.raises(HesseError, match="fraction"):
        prune_magnitude(model, sparsity=1.0)
    with pytest.raises(HesseError, match="0 < N < M"):
        prune_magnitude(model, nm="4:2")
    with pytest.raises(HesseError, match="scope"):
        prune_magnitude(model, sparsity=0.5, scope="world")
    with pytest.raises(HesseError, match="not pruned tensors"):
        prune_magnitude(model, sparsity={"nope.weight": 0.5})
    with pytest.raises(HesseError, match="one-shot"):
        prune_obd(model, criterion, data, nm=(2, 4), rounds=2)
    with pytest.raises(HesseError, match="nn.Linear and nn.Conv2d"):
        prune_layerwise_obs(model, criterion, data, sparsity=0.5, params=["fc1.bias"])


def test_apply_masks_takes_a_result_or_masks_and_updates(mlp_problem):
    model = mlp_problem[0]
    result = prune_magnitude(model, sparsity=0.5)
    expected = result.pruned_values(model)
    apply_masks(model, result.masks)
    assert all(torch.equal(model.get_parameter(n).detach(), v) for n, v in expected.items())
    with pytest.raises(HesseError, match="not parameters"):
        apply_masks(model, {"nope": torch.ones(1, dtype=torch.bool)})
    assert result.to_dict()["method"] == "magnitude"


class _TwoAttentionBlocks(nn.Module):
    """Query/key/value projections reading one input, then an output projection, twice."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({k: nn.Linear(width, width) for k in ("q", "k", "v", "o")})
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            weights = torch.softmax(b["q"](x) @ b["k"](x).transpose(-1, -2), -1)
            x = x + b["o"](torch.tanh(weights @ b["v"](x)))
        return x


def test_sequential_layerwise_obs_groups_layers_with_one_input_and_stops_forwards_early():
    """Same result as collecting each layer's Hessian by a full forward with the earlier layers
    pruned; the model is called twice per batch (as a two-tower forward does)."""
    torch.manual_seed(0)
    model = _TwoAttentionBlocks().double()
    data = [(torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)) for _ in range(2)]
    objective = Objective(model, nn.MSELoss(), data, forward=lambda m, b: (m(b[0]) + m(2 * b[0]), b[1]))
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    modules = {n: model.get_submodule(n.rpartition(".")[0]) for n in names}
    groups, calls = layer_groups(objective, modules, dict(model.named_parameters()), data[0])
    assert [len(g) for g in groups] == [3, 1, 3, 1] and set(calls.values()) == {2}
    values = {n: p.detach() for n, p in model.named_parameters()}
    for name in names:  # the reference: one full forward per layer
        H = collect_hessians(objective, {name: modules[name]}, values, data)[name]
        values[name] = prune_layer(values[name], H, name, damp=1e-2, block_size=4, fraction=0.5, nm=None)[0]
    result = prune_layerwise_obs(objective, sparsity=0.5, block_size=4)
    for name, pruned in result.pruned_values(model).items():
        torch.testing.assert_close(pruned, values[name], msg=name)
