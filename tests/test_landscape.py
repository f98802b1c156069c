"""Loss landscapes and interpolation: closed forms on a quadratic, filter normalisation, and
exact restoration of the model (also after an exception or Ctrl-C)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from hesse.analysis.landscape import (
    BATCHNORM,
    Landscape,
    interpolate,
    loss_landscape,
    normalize_direction,
    random_direction,
)
from hesse.errors import HesseError, NotConvergedWarning
from tests.helpers import SmallCNN, TanhMLP, uneven_batches
from tests.landscape_helpers import assert_identical, quad_loss, quadratic_problem, snapshot, sum_problem


def test_given_directions_give_the_closed_form_paraboloid():
    model, crit, batches, A, w_min, c = quadratic_problem()
    w = model.weight.detach()[0].clone()
    gen = torch.Generator().manual_seed(1)
    d1, d2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    land = loss_landscape(model, crit, batches, directions=[d1, {"weight": d2[None]}], steps=5,
                          span=(-2.0, 2.0), progress=False)
    assert land.kind == "given" and land.dims == 2 and land.loss.shape == (5, 5) and land.accuracy is None
    expected = np.array([[quad_loss(w + a * d1 + b * d2, A, w_min, c) for b in land.betas] for a in land.alphas])
    np.testing.assert_allclose(land.loss, expected, rtol=1e-10)
    assert land.base_loss == pytest.approx(quad_loss(w, A, w_min, c), rel=1e-12)
    line = loss_landscape(model, crit, batches, directions=[d1], steps=7, progress=False)
    np.testing.assert_allclose(line.loss, [quad_loss(w + a * d1, A, w_min, c) for a in line.alphas], rtol=1e-10)


def test_hessian_directions_follow_the_top_eigenvalues():
    model, crit, batches, A, w_min, c = quadratic_problem(exact=True)
    land = loss_landscape(model, crit, batches, directions="hessian", dims=2, steps=5, tol=1e-8, progress=False)
    top = torch.linalg.eigvalsh(A).flip(0)[:2]
    np.testing.assert_allclose(land.info["eigenvalues"], top, rtol=1e-8)
    # along unit eigenvectors: L = c + (lam1 a^2 + lam2 b^2) / 2
    a, b = np.meshgrid(land.alphas, land.betas, indexing="ij")
    np.testing.assert_allclose(land.loss, c + 0.5 * (top[0].item() * a ** 2 + top[1].item() * b ** 2),
                               rtol=1e-7, atol=1e-12)


def test_sample_weighted_loss_and_accuracy(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    land = loss_landscape(model, crit, batches, steps=3, progress=False)
    with torch.no_grad():
        out = model(X)
    assert land.base_loss == pytest.approx(float(crit(out, y)), rel=1e-12)
    assert land.base_accuracy == pytest.approx(float((out.argmax(1) == y).double().mean()), rel=1e-12)
    assert land.accuracy.shape == (3,) and land.loss[1] == pytest.approx(land.base_loss, rel=1e-12)


def test_dict_batches_with_a_forward_hook_match_one_full_batch(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    dict_batches = [{"x": xb, "labels": yb} for xb, yb in batches]
    d = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    a = loss_landscape(model, crit, dict_batches, directions=d, forward=lambda m, b: (m(b["x"]), b["labels"]),
                       steps=3, progress=False)
    b = loss_landscape(model, crit, (X, y), directions=[d], steps=3, progress=False)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    np.testing.assert_allclose(a.accuracy, b.accuracy, rtol=1e-12)


@pytest.mark.parametrize("normalization", ["filter", "layer"])
def test_normalized_directions_match_the_weight_norms(normalization):
    model = SmallCNN(batchnorm=True).double()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    d = random_direction(weights, torch.Generator().manual_seed(0), normalization)
    for name, w in weights.items():
        if w.ndim <= 1:
            assert torch.count_nonzero(d[name]) == 0  # biases and BatchNorm scales zeroed
        elif normalization == "filter":  # each conv output channel / linear row
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
        else:
            torch.testing.assert_close(d[name].norm(), w.norm())
    kept = random_direction(weights, torch.Generator().manual_seed(0), normalization, ignore_1d=False)
    torch.testing.assert_close(kept["conv.bias"].norm(), weights["conv.bias"].norm())
    raw = {"fc.weight": torch.ones(3, 64, dtype=torch.float64)}
    assert torch.equal(normalize_direction(raw, weights, None)["fc.weight"], raw["fc.weight"])


def test_random_landscape_is_seeded_and_restores_weights(cnn_problem):
    model, crit, X, y, batches = cnn_problem
    snap = snapshot(model)
    a = loss_landscape(model, crit, batches, dims=2, steps=3, seed=5, progress=False)
    b = loss_landscape(model, crit, batches, dims=2, steps=3, seed=5, progress=False)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.loss[1, 1] == pytest.approx(a.base_loss, rel=1e-12)
    assert_identical(model, snap)


class RaisingCriterion(nn.Module):
    """Cross-entropy that raises ``error`` on its ``n``-th call."""

    reduction = "mean"

    def __init__(self, n: int, error: type[BaseException]):
        super().__init__()
        self.n, self.error, self.calls = n, error, 0

    def forward(self, output, target):
        self.calls += 1
        if self.calls == self.n:
            raise self.error("stop")
        return nn.functional.cross_entropy(output, target)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_weights_buffers_and_modes_restored_after_an_interruption(error):
    torch.manual_seed(0)
    model = SmallCNN(batchnorm=True).double()
    X, y = torch.randn(19, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (19,))
    with torch.no_grad():
        model(X)  # move the BatchNorm statistics away from their defaults
    model.train()
    snap = snapshot(model)
    with pytest.raises(error):
        loss_landscape(model, RaisingCriterion(7, error), uneven_batches(X, y, [8, 8, 3]), dims=2, steps=3,
                       progress=False)
    assert_identical(model, snap)
    assert model.training and model.bn.training


def test_interpolation_between_two_linear_models():
    model_a, crit, batches, A, w_min, c = quadratic_problem(seed=0)
    model_b = nn.Linear(6, 1, bias=False).double()
    snap_a, snap_b = snapshot(model_a), snapshot(model_b)
    wa, wb = model_a.weight.detach()[0].clone(), model_b.weight.detach()[0].clone()
    line = interpolate(model_a, model_b, crit, batches, steps=5, span=(-0.5, 1.5), progress=False)
    expected = [quad_loss((1 - t) * wa + t * wb, A, w_min, c) for t in line.alphas]
    np.testing.assert_allclose(line.loss, expected, rtol=1e-10)
    # a convex loss has no barrier
    assert line.info["barrier"] <= 1e-12 and line.kind == "interpolation"
    assert_identical(model_a, snap_a)
    assert_identical(model_b, snap_b)


def _bn_model(seed: int, X: torch.Tensor) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN(batchnorm=True).double()
    with torch.no_grad():
        model(X * (1 + seed))  # different running statistics per model
    return model.eval()


def test_interpolation_batchnorm_options(cnn_problem):
    _, crit, X, y, batches = cnn_problem
    model_a, model_b = _bn_model(0, X), _bn_model(1, X)
    snap_a = snapshot(model_a)
    with torch.no_grad():
        loss_b = float(crit(model_b(X), y))
    inter = interpolate(model_a, model_b, crit, batches, steps=3, batchnorm="interpolate", progress=False)
    keep = interpolate(model_a, model_b, crit, batches, steps=3, batchnorm="keep", progress=False)
    recompute = interpolate(model_a, model_b, crit, batches, steps=3, batchnorm="recompute", progress=False)
    assert inter.loss[-1] == pytest.approx(loss_b, rel=1e-12)  # t = 1 is model B, statistics included
    assert keep.loss[0] == pytest.approx(inter.loss[0], rel=1e-12) and keep.loss[-1] != pytest.approx(loss_b)
    # recompute: the statistics at t = 1 are B's weights' exact statistics on all the data
    # (one train-mode pass over the whole dataset, however the data is batched)
    ref = _bn_model(1, X)
    ref.bn.reset_running_stats()
    ref.bn.momentum = None
    ref.train()
    with torch.no_grad():
        ref(X)
        ref.eval()
        expected = float(crit(ref(X), y))
    assert recompute.loss[-1] == pytest.approx(expected, rel=1e-10)
    assert_identical(model_a, snap_a)
    with pytest.raises(HesseError, match="batchnorm"):
        interpolate(model_a, model_b, crit, batches, batchnorm="average")
    with pytest.raises(HesseError, match="architecture"):
        interpolate(model_a, TanhMLP().double(), crit, batches)


def test_save_load_and_plots(tmp_path, mlp_problem):
    model, crit, X, y, batches = mlp_problem
    line = loss_landscape(model, crit, batches, steps=4, progress=False)
    plane = loss_landscape(model, crit, batches, dims=2, steps=4, progress=False)
    npz, js = plane.save(tmp_path / "plane")
    assert set(np.load(npz).files) == {"alphas", "betas", "loss", "accuracy"}
    assert json.loads(js.read_text())["kind"] == "random"
    again = Landscape.load(js)
    np.testing.assert_array_equal(again.loss, plane.loss)
    for land, kinds in ((line, ["line"]), (plane, ["contour", "surface"])):
        for kind in kinds:
            fig = land.plot(kind)
            fig.savefig(tmp_path / f"{kind}.png")
            assert (tmp_path / f"{kind}.png").stat().st_size > 0
    with pytest.raises(HesseError):
        line.plot("contour")
    with pytest.raises(HesseError, match="dims"):
        loss_landscape(model, crit, batches, directions=[torch.zeros(1)], dims=2)


def _bn_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_recomputed_batchnorm_statistics_do_not_depend_on_the_batch_split():
    torch.manual_seed(0)
    X, y = torch.randn(10, 4, dtype=torch.float64) * 2 + 1, torch.randint(0, 3, (10,))
    model_a, model_b = _bn_mlp(1), _bn_mlp(2)
    crit = nn.CrossEntropyLoss()
    run = lambda sizes: interpolate(model_a, model_b, crit, uneven_batches(X, y, sizes), steps=3,  # noqa: E731
                                    batchnorm="recompute", progress=False).loss
    one, a, b, single = run([10]), run([8, 2]), run([5, 5]), run([9, 1])  # a batch of one sample too
    np.testing.assert_allclose(a, one, rtol=1e-12)
    np.testing.assert_allclose(b, one, rtol=1e-12)
    np.testing.assert_allclose(single, one, rtol=1e-12)
    # reference at t = 1: B with the full-data mean and unbiased variance of the BatchNorm input
    ref = _bn_mlp(2)
    with torch.no_grad():
        h = ref[0](X)
        ref[1].running_mean.copy_(h.mean(0))
        ref[1].running_var.copy_(h.var(0, unbiased=True))
        expected = float(crit(ref(X), y))
    assert one[-1] == pytest.approx(expected, rel=1e-12)


def test_reduction_sum_for_a_plain_function_criterion():
    import hesse

    model, crit, X, y, batches = sum_problem()
    with torch.no_grad():
        true = float(crit(model(X), y))
    assert hesse.Hessian(model, crit, batches, reduction="sum").loss() == pytest.approx(true, rel=1e-12)
    land = loss_landscape(model, crit, batches, steps=3, reduction="sum", progress=False)
    assert land.base_loss == pytest.approx(true, rel=1e-12)
    path = interpolate(model, model, crit, batches, steps=2, reduction="sum", progress=False)
    np.testing.assert_allclose(path.loss, [true, true], rtol=1e-12)
    # the eigenvectors come from the summed Hessian: along them L = L0 + lam a^2 / 2 + O(a^3)
    hess = loss_landscape(model, crit, batches, directions="hessian", steps=3, span=(-1e-3, 1e-3),
                          reduction="sum", tol=1e-8, progress=False)
    top = hesse.eigenvalues(hesse.Hessian(model, crit, batches, reduction="sum"), k=1, tol=1e-8,
                            progress=False).values[0]
    assert hess.info["eigenvalues"][0] == pytest.approx(float(top), rel=1e-6)
    with pytest.raises(HesseError, match="reduction"):
        loss_landscape(model, crit, batches, reduction="none")
    with pytest.raises(HesseError, match="reduction"):
        interpolate(model, model, nn.CrossEntropyLoss(reduction="none"), batches)


def test_ignored_targets_are_not_counted():
    torch.manual_seed(0)
    model = TanhMLP().double()
    X, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 4, (11,))
    y[2] = y[9] = -100
    crit = nn.CrossEntropyLoss()
    with torch.no_grad():
        out = model(X)
    keep = y != -100
    land = loss_landscape(model, crit, uneven_batches(X, y, [8, 3]), steps=2, progress=False)
    assert land.base_loss == pytest.approx(float(crit(out, y)), rel=1e-12)
    assert land.base_accuracy == pytest.approx(float((out.argmax(1) == y)[keep].double().mean()), rel=1e-12)


def _versions(model: nn.Module) -> list[int]:
    """In-place writes bump a tensor's version counter: equal versions mean nothing was written."""
    return [t._version for t in list(model.parameters()) + list(model.buffers())]


def test_an_objective_is_accepted_and_nothing_is_written(cnn_problem):
    import hesse

    model, crit, X, y, batches = cnn_problem
    before = _versions(model)
    objective = hesse.Objective(model, crit, batches, params=["fc.weight"])
    a = loss_landscape(objective, steps=3, seed=2, progress=False)
    b = loss_landscape(model, crit, batches, params=["fc.weight"], steps=3, seed=2, progress=False)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert _versions(model) == before
    with pytest.raises(HesseError, match="either an Objective"):
        loss_landscape(objective, params=["fc.bias"])
    model_a, model_b = _bn_model(0, X), _bn_model(1, X)
    before_a, before_b = _versions(model_a), _versions(model_b)
    for batchnorm in BATCHNORM:
        interpolate(model_a, model_b, crit, batches, steps=2, batchnorm=batchnorm, progress=False)
    assert _versions(model_a) == before_a and _versions(model_b) == before_b


@pytest.mark.parametrize("on_interrupt", ["raise", "return"])
def test_ctrl_c_gives_the_partial_landscape(on_interrupt, mlp_problem):
    model, _, X, y, batches = mlp_problem
    crit = RaisingCriterion(6, KeyboardInterrupt)  # base + 4 points of a 3x3 plane
    if on_interrupt == "raise":
        with pytest.raises(KeyboardInterrupt) as caught:
            loss_landscape(model, crit, (X, y), dims=2, steps=3, progress=False)
        land = caught.value.partial
    else:
        with pytest.warns(NotConvergedWarning, match="interrupted"):
            land = loss_landscape(model, crit, (X, y), dims=2, steps=3, progress=False, on_interrupt="return")
    assert land.interrupted and land.loss.shape == (3, 3)
    assert np.isfinite(land.loss.reshape(-1)[:4]).all() and np.isnan(land.loss.reshape(-1)[4:]).all()
    assert np.isfinite(land.base_loss)
    with pytest.raises(KeyboardInterrupt) as caught:
        interpolate(model, model, RaisingCriterion(3, KeyboardInterrupt), (X, y), steps=4, progress=False)
    path = caught.value.partial
    assert path.interrupted and np.isfinite(path.loss[:2]).all() and np.isnan(path.loss[2:]).all()
