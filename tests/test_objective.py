"""The Objective: full-data loss, gradient, accuracy and per-sample gradients at any point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.operators import Objective
from tests.helpers import TanhMLP, uneven_batches


def _reference(model, criterion, X, y):
    """Loss and gradient of the whole data as one batch (the definition)."""
    params = dict(model.named_parameters())
    loss = criterion(model(X), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


def test_loss_gradient_and_accuracy_match_one_big_batch(mlp_problem):
    model, criterion, X, y, batches = mlp_problem
    objective = Objective(model, criterion, batches)
    loss, grad = _reference(model, criterion, X, y)
    evaluation = objective.evaluate(gradient=True)
    assert evaluation.loss == pytest.approx(loss, rel=1e-12)
    assert torch.allclose(evaluation.gradient, grad, atol=1e-12)
    assert objective.loss() == pytest.approx(loss, rel=1e-12)
    assert torch.allclose(objective.gradient(), grad, atol=1e-12)
    correct = float((model(X).argmax(1) == y).double().mean())
    assert evaluation.accuracy == pytest.approx(correct)
    assert evaluation.num_samples == len(y)


def test_evaluation_at_another_point_leaves_the_model_alone(mlp_problem):
    model, criterion, X, y, batches = mlp_problem
    objective = Objective(model, criterion, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta = objective.parameters_vector() + 0.1
    shifted = TanhMLP().double()
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(0.1)
    loss, grad = _reference(shifted, criterion, X, y)
    assert objective.loss(at=theta) == pytest.approx(loss, rel=1e-12)
    assert torch.allclose(objective.gradient(at=theta), grad, atol=1e-12)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    partial = objective.values({"fc1.bias": torch.zeros(12, dtype=torch.float64)})
    assert torch.equal(partial["fc1.bias"], torch.zeros(12, dtype=torch.float64))
    assert torch.equal(partial["out.weight"], model.out.weight)


def test_sum_reduction_and_ignore_index_weighting():
    torch.manual_seed(3)
    model = TanhMLP().double()
    X = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    y[2:9] = -100
    criterion = nn.CrossEntropyLoss()
    objective = Objective(model, criterion, uneven_batches(X, y, [6, 9, 5]))
    assert objective.loss() == pytest.approx(float(criterion(model(X), y)), rel=1e-12)
    summed = Objective(model, nn.CrossEntropyLoss(reduction="sum"), uneven_batches(X, y, [6, 9, 5]))
    assert summed.loss() == pytest.approx(float(nn.CrossEntropyLoss(reduction="sum")(model(X), y)), rel=1e-12)
    keep = y != -100
    correct = float((model(X).argmax(1)[keep] == y[keep]).double().mean())
    assert objective.accuracy() == pytest.approx(correct)


def test_per_sample_gradients_match_a_loop_and_average_to_the_gradient(mlp_problem):
    model, criterion, X, y, batches = mlp_problem
    objective = Objective(model, criterion, batches)
    G = objective.per_sample_gradients((X, y))
    assert G.shape == (len(y), objective.size)
    loop = torch.stack([_reference(model, criterion, X[i:i + 1], y[i:i + 1])[1] for i in range(len(y))])
    assert torch.allclose(G, loop, atol=1e-12)
    assert torch.allclose(objective.per_sample_gradients((X, y), vectorize=False), loop, atol=1e-12)
    assert torch.allclose(G.mean(0), objective.gradient(), atol=1e-12)


def test_operators_share_one_objective(mlp_problem):
    model, criterion, X, y, batches = mlp_problem
    objective = Objective(model, criterion, batches, params="fc1.*")
    H, G = hesse.Hessian(objective), hesse.GGN(objective)
    assert H.shape == G.shape == (objective.size, objective.size)
    v = torch.randn(objective.size, dtype=torch.float64)
    H @ v
    G @ v
    assert objective.passes == 2 and H.passes == 2
    reference = hesse.Hessian(model, criterion, batches, params="fc1.*")
    assert torch.allclose(H @ v, reference @ v, atol=1e-12)
    assert H.restrict("fc1.bias").objective.param_names == ["fc1.bias"]


def test_objective_and_arguments_together_are_refused(mlp_problem):
    model, criterion, X, y, batches = mlp_problem
    objective = Objective(model, criterion, batches)
    with pytest.raises(hesse.HesseError, match="either an Objective"):
        hesse.Hessian(objective, params="fc1.*")
    with pytest.raises(hesse.HesseError, match="flat"):
        objective.loss(at=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(hesse.HesseError, match="not selected"):
        objective.values({"nope": torch.zeros(1)})


def test_positional_modules_are_named_with_their_type():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 2)))
    objective = Objective(model, nn.CrossEntropyLoss(), (torch.randn(5, 3), torch.randint(0, 2, (5,))))
    assert list(objective.module_blocks()) == ["0 (Linear)", "2.0 (Linear)"]
    assert hesse.Hessian(objective).block_diagonal().blocks.keys() == objective.module_blocks().keys()


def test_batches_are_cached_after_two_identical_passes_and_not_before():
    torch.manual_seed(0)
    X, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            reads.append(i)
            return X[i], y[i]

    loader = torch.utils.data.DataLoader(Counting(), batch_size=8)
    model = TanhMLP().double()
    objective = Objective(model, nn.CrossEntropyLoss(), loader)
    first = objective.loss()
    objective.loss()
    assert len(reads) == 60  # two passes read the loader (the second confirms the data did not change)
    assert objective.loss() == first and len(reads) == 60  # the third reads the kept batches
    uncached = Objective(model, nn.CrossEntropyLoss(), loader, cache_data=False)
    for _ in range(3):
        uncached.loss()
    assert len(reads) == 150


def test_changing_data_is_still_detected_with_caching():
    torch.manual_seed(0)
    calls = []

    class Augmented:
        def __iter__(self):
            calls.append(1)
            yield torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))

    objective = Objective(TanhMLP().double(), nn.CrossEntropyLoss(), Augmented())
    objective.loss()
    with pytest.raises(hesse.HesseError, match="data changed between passes"):
        objective.loss()
