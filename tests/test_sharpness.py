"""Every sharpness measure against its closed form on a quadratic loss, and the model untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hesse
from hesse.analysis.sharpness import (
    adaptive_sharpness,
    average_sharpness,
    eigenvalue_sharpness,
    sam_sharpness,
    trace_sharpness,
    worst_case_sharpness,
)
from hesse.errors import HesseError, NotConvergedWarning
from tests.helpers import dense_hessian
from tests.landscape_helpers import assert_identical, quad_loss, quadratic_problem, snapshot, sum_problem

MEASURES = {
    "worst": lambda *a, **kw: worst_case_sharpness(*a, steps=2, **kw),
    "adaptive": lambda *a, **kw: adaptive_sharpness(*a, steps=2, **kw),
    "average": lambda *a, **kw: average_sharpness(*a, samples=2, **kw),
    "sam": sam_sharpness,
    "eigenvalue": eigenvalue_sharpness,
    "trace": trace_sharpness,
}


def test_worst_case_l2_at_a_minimum_is_rho_squared_lambda_max_over_two():
    model, crit, batches, A, _, _ = quadratic_problem(exact=True)
    snap = snapshot(model)
    rho = 0.1
    res = worst_case_sharpness(model, crit, batches, rho=rho, norm="l2", steps=40, restarts=2, progress=False)
    lam = float(torch.linalg.eigvalsh(A)[-1])
    assert res.value == pytest.approx(rho ** 2 * lam / 2, rel=1e-4)
    assert res.value <= rho ** 2 * lam / 2 * (1 + 1e-12)  # never above the true maximum
    assert float(res.perturbation.norm()) == pytest.approx(rho, rel=1e-9)
    assert res.to_dict()["measure"] == "worst" and "perturbation" not in res.to_dict()
    assert_identical(model, snap)


def test_worst_case_linf_matches_the_box_maximum_of_a_diagonal_quadratic():
    model, crit, batches, A, w_min, c = quadratic_problem(diagonal=True)
    assert torch.allclose(A, torch.diag(torch.diagonal(A)), atol=1e-12)
    w = model.weight.detach()[0].clone()
    g = A @ (w - w_min)
    rho = 0.05
    # max over the box of g'e + e'Ae/2 with A diagonal >= 0: each e_i = rho * sign(g_i)
    expected = float((rho * g.abs() + 0.5 * torch.diagonal(A) * rho ** 2).sum())
    res = worst_case_sharpness(model, crit, batches, rho=rho, norm="linf", steps=5, progress=False)
    assert res.value == pytest.approx(expected, rel=1e-9)
    assert float(res.perturbation.abs().max()) == pytest.approx(rho)
    assert quad_loss(w, A, w_min, c) == pytest.approx(res.base_loss, rel=1e-12)


def test_adaptive_worst_case_is_scale_invariant_closed_form():
    model, crit, batches, A, w_min, _ = quadratic_problem(exact=True)
    rho = 0.1
    D = torch.diag(w_min.abs())
    expected = rho ** 2 * float(torch.linalg.eigvalsh(D @ A @ D)[-1]) / 2
    res = adaptive_sharpness(model, crit, batches, rho=rho, steps=60, restarts=2, progress=False)
    assert res.value == pytest.approx(expected, rel=1e-3)
    assert float((res.perturbation / w_min.abs()).norm()) == pytest.approx(rho, rel=1e-6)


def test_average_case_is_sigma_squared_trace_over_two():
    model, crit, batches, A, _, _ = quadratic_problem()
    sigma = 0.05
    res = average_sharpness(model, crit, batches, sigma=sigma, samples=200, seed=3, progress=False)
    expected = sigma ** 2 * float(torch.trace(A)) / 2
    assert abs(res.value - expected) < 4 * res.stderr
    assert res.stderr < 0.1 * expected
    again = average_sharpness(model, crit, batches, sigma=sigma, samples=200, seed=3, progress=False)
    assert again.value == res.value  # seeded


def test_sam_first_order_sharpness_closed_form():
    model, crit, batches, A, w_min, c = quadratic_problem()
    w = model.weight.detach()[0].clone()
    g = A @ (w - w_min)
    rho = 0.05
    u = g / g.norm()
    expected = rho * float(g.norm()) + 0.5 * rho ** 2 * float(u @ A @ u)
    res = sam_sharpness(model, crit, batches, rho=rho)
    assert res.value == pytest.approx(expected, rel=1e-9)
    assert res.details["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-9)


def test_eigenvalue_measure_is_the_top_hessian_eigenvalue():
    model, crit, batches, A, _, _ = quadratic_problem()
    eig = eigenvalue_sharpness(model, crit, batches, k=2, tol=1e-8, progress=False)
    top = torch.linalg.eigvalsh(A).flip(0)
    assert eig.value == pytest.approx(float(top[0]), rel=1e-8)
    assert eig.details["eigenvalues"] == pytest.approx(top[:2].tolist(), rel=1e-8)


def test_trace_measure_is_the_dense_hessian_trace(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    P = sum(p.numel() for p in model.parameters())
    exact = trace_sharpness(model, crit, batches, budget=P, progress=False)  # P products: exact
    assert exact.value == pytest.approx(float(torch.trace(dense_hessian(model, crit, X, y))), rel=1e-9)
    tr = trace_sharpness(model, crit, batches, budget=60, seed=4, progress=False)
    ref = hesse.linalg.trace(hesse.Hessian(model, crit, batches), budget=60, seed=4, progress=False)
    assert tr.value == pytest.approx(ref.estimate, rel=1e-10) and tr.stderr == pytest.approx(ref.stderr, rel=1e-10)
    assert tr.cost == ref.matvecs and tr.details["unit"] == "matvecs"


@pytest.mark.parametrize("measure", list(MEASURES))
def test_every_measure_leaves_the_model_untouched(measure, cnn_problem):
    model, crit, X, y, batches = cnn_problem
    model.train()
    snap = snapshot(model)
    versions = [t._version for t in list(model.parameters()) + list(model.buffers())]
    res = MEASURES[measure](model, crit, batches)
    assert math.isfinite(res.value) and res.measure == measure and not res.interrupted
    assert_identical(model, snap)
    assert [t._version for t in list(model.parameters()) + list(model.buffers())] == versions  # never written


@pytest.mark.parametrize("measure", list(MEASURES))
def test_every_measure_takes_an_objective(measure, mlp_problem):
    model, crit, X, y, batches = mlp_problem
    objective = hesse.Objective(model, crit, batches, params=["out.weight", "out.bias"])
    seed = {} if measure == "sam" else {"seed": 1}
    a = MEASURES[measure](objective, **seed)
    b = MEASURES[measure](model, crit, batches, params=["out.weight", "out.bias"], **seed)
    assert a.value == pytest.approx(b.value, rel=1e-12) and a.base_loss == pytest.approx(b.base_loss, rel=1e-12)
    with pytest.raises(HesseError, match="either an Objective"):
        MEASURES[measure](objective, reduction="sum")


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


def test_ctrl_c_gives_partial_results(mlp_problem):
    model, _, X, y, _ = mlp_problem
    with pytest.raises(KeyboardInterrupt) as caught:
        worst_case_sharpness(model, StopAfter(4), (X, y), steps=5, progress=False)
    partial = caught.value.partial
    assert partial.interrupted and partial.cost == 3 and partial.value >= 0 and partial.perturbation is not None
    with pytest.warns(NotConvergedWarning, match="interrupted"):
        partial = average_sharpness(model, StopAfter(6), (X, y), samples=5, on_interrupt="return", progress=False)
    assert partial.interrupted and partial.cost == 5 and math.isfinite(partial.value)  # base + two pairs
    with pytest.raises(HesseError, match="on_interrupt"):
        sam_sharpness(model, nn.CrossEntropyLoss(), (X, y), on_interrupt="ignore")


def test_bad_arguments():
    model, crit, batches, *_ = quadratic_problem()
    with pytest.raises(HesseError, match="norm"):
        worst_case_sharpness(model, crit, batches, norm="l1")
    with pytest.raises(HesseError, match="rho"):
        worst_case_sharpness(model, crit, batches, rho=-1.0)
    with pytest.raises(HesseError, match="sigma"):
        average_sharpness(model, crit, batches, sigma=0)
    with pytest.raises(HesseError, match="steps"):
        adaptive_sharpness(model, crit, batches, steps=0)


def test_reduction_sum_for_a_plain_function_criterion():
    model, crit, X, y, batches = sum_problem()
    with torch.no_grad():
        true = float(crit(model(X), y))
    for measure in ("sam", "average", "worst"):
        res = MEASURES[measure](model, crit, batches, reduction="sum", progress=None) if measure != "sam" \
            else sam_sharpness(model, crit, batches, reduction="sum")
        assert res.base_loss == pytest.approx(true, rel=1e-12)
    eig = eigenvalue_sharpness(model, crit, batches, reduction="sum", tol=1e-8, progress=False)
    assert eig.base_loss == pytest.approx(true, rel=1e-12)
    H = dense_hessian(model, crit, X, y)  # the summed loss's Hessian, an independent reference
    assert eig.value == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    # SAM's gradient is the summed loss's
    g = torch.func.grad(lambda p: crit(torch.func.functional_call(model, p, (X,)), y))(
        {n: p.detach() for n, p in model.named_parameters()})
    sam = sam_sharpness(model, crit, batches, rho=1e-6, reduction="sum")
    assert sam.details["gradient_norm"] == pytest.approx(float(torch.cat([t.reshape(-1) for t in g.values()]).norm()),
                                                         rel=1e-10)
    with pytest.raises(HesseError, match="reduction"):
        worst_case_sharpness(model, nn.CrossEntropyLoss(reduction="none"), batches, progress=False)
    with pytest.raises(HesseError, match="reduction"):
        eigenvalue_sharpness(model, crit, batches, reduction="none", progress=False)


@pytest.mark.parametrize("measure", ["sam", "worst", "adaptive"])
def test_explicitly_selected_frozen_parameters_are_perturbed(measure):
    model, crit, batches, A, w_min, c = quadratic_problem()
    model.weight.requires_grad_(False)
    snap = snapshot(model)
    res = MEASURES[measure](model, crit, batches, params=["weight"])
    assert math.isfinite(res.value) and res.value > 0
    if measure == "sam":  # same as with the parameter trainable
        w = model.weight.detach()[0].clone()
        g = A @ (w - w_min)
        assert res.details["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-9)
    assert not model.weight.requires_grad and model.weight.grad is None
    assert_identical(model, snap)
