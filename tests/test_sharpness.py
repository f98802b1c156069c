"""Every sharpness measure against its closed form on a quadratic loss, and exact restoration."""

from __future__ import annotations

import math

import pytest
import torch

import hesse
import hesse.linalg
from hesse.analysis.sharpness import MEASURES, sharpness
from hesse.errors import HesseError
from tests.test_landscape import assert_identical, quad_loss, quadratic_problem, snapshot


def test_worst_case_l2_at_a_minimum_is_rho_squared_lambda_max_over_two():
    model, crit, batches, A, _, _ = quadratic_problem(exact=True)
    snap = snapshot(model)
    rho = 0.1
    res = sharpness(model, crit, batches, "worst", rho=rho, norm="l2", steps=40, restarts=2, progress=False)
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
    res = sharpness(model, crit, batches, "worst", rho=rho, norm="linf", steps=5, progress=False)
    assert res.value == pytest.approx(expected, rel=1e-9)
    assert float(res.perturbation.abs().max()) == pytest.approx(rho)
    assert quad_loss(w, A, w_min, c) == pytest.approx(res.base_loss, rel=1e-12)


def test_adaptive_worst_case_is_scale_invariant_closed_form():
    model, crit, batches, A, w_min, _ = quadratic_problem(exact=True)
    rho = 0.1
    D = torch.diag(w_min.abs())
    expected = rho ** 2 * float(torch.linalg.eigvalsh(D @ A @ D)[-1]) / 2
    res = sharpness(model, crit, batches, "adaptive", rho=rho, steps=60, restarts=2, progress=False)
    assert res.value == pytest.approx(expected, rel=1e-3)
    assert float((res.perturbation / w_min.abs()).norm()) == pytest.approx(rho, rel=1e-6)


def test_average_case_is_sigma_squared_trace_over_two():
    model, crit, batches, A, _, _ = quadratic_problem()
    sigma = 0.05
    res = sharpness(model, crit, batches, "average", sigma=sigma, samples=200, seed=3, progress=False)
    expected = sigma ** 2 * float(torch.trace(A)) / 2
    assert abs(res.value - expected) < 4 * res.stderr
    assert res.stderr < 0.1 * expected
    again = sharpness(model, crit, batches, "average", sigma=sigma, samples=200, seed=3, progress=False)
    assert again.value == res.value  # seeded


def test_sam_first_order_sharpness_closed_form():
    model, crit, batches, A, w_min, c = quadratic_problem()
    w = model.weight.detach()[0].clone()
    g = A @ (w - w_min)
    rho = 0.05
    u = g / g.norm()
    expected = rho * float(g.norm()) + 0.5 * rho ** 2 * float(u @ A @ u)
    res = sharpness(model, crit, batches, "sam", rho=rho, progress=False)
    assert res.value == pytest.approx(expected, rel=1e-9)
    assert res.details["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-9)


def test_eigenvalue_measure_is_the_top_hessian_eigenvalue():
    model, crit, batches, A, _, _ = quadratic_problem()
    eig = sharpness(model, crit, batches, "eigenvalue", k=2, tol=1e-8, progress=False)
    top = torch.linalg.eigvalsh(A).flip(0)
    assert eig.value == pytest.approx(float(top[0]), rel=1e-8)
    assert eig.details["eigenvalues"] == pytest.approx(top[:2].tolist(), rel=1e-8)


def test_trace_measure_is_hesse_linalg_trace_of_the_hessian(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    tr = sharpness(model, crit, batches, "trace", budget=60, seed=4, progress=False)
    ref = hesse.linalg.trace(hesse.Hessian(model, crit, batches), budget=60, seed=4, progress=False)
    assert tr.value == pytest.approx(ref.estimate, rel=1e-10) and tr.stderr == pytest.approx(ref.stderr, rel=1e-10)
    assert tr.cost == ref.matvecs


@pytest.mark.parametrize("measure", MEASURES)
def test_every_measure_restores_the_model_exactly(measure, cnn_problem):
    model, crit, X, y, batches = cnn_problem
    model.train()
    snap = snapshot(model)
    res = sharpness(model, crit, batches, measure, steps=2, samples=2, progress=False)
    assert math.isfinite(res.value) and res.measure == measure
    assert_identical(model, snap)


def test_bad_arguments():
    model, crit, batches, *_ = quadratic_problem()
    with pytest.raises(HesseError, match="measure"):
        sharpness(model, crit, batches, "flatness")
    with pytest.raises(HesseError, match="norm"):
        sharpness(model, crit, batches, norm="l1")
    with pytest.raises(HesseError, match="rho"):
        sharpness(model, crit, batches, rho=-1.0)


def test_reduction_sum_for_a_plain_function_criterion():
    from torch import nn

    from tests.test_landscape import _sum_problem

    model, crit, X, y, batches = _sum_problem()
    with torch.no_grad():
        true = float(crit(model(X), y))
    H = hesse.Hessian(model, crit, batches, reduction="sum")
    assert H.loss() == pytest.approx(true, rel=1e-12)
    for measure in ("sam", "average", "worst"):
        res = sharpness(model, crit, batches, measure, reduction="sum", steps=2, samples=2, progress=False)
        assert res.base_loss == pytest.approx(true, rel=1e-12)
    eig = sharpness(model, crit, batches, "eigenvalue", reduction="sum", tol=1e-8, progress=False)
    assert eig.base_loss == pytest.approx(H.loss(), rel=1e-12)
    top = hesse.linalg.eigenvalues(H, k=1, tol=1e-8, progress=False).values[0]
    assert eig.value == pytest.approx(float(top), rel=1e-6)
    # SAM's gradient is the summed loss's: rho * |g| to first order
    g = H.gradient()
    sam = sharpness(model, crit, batches, "sam", rho=1e-6, reduction="sum", progress=False)
    assert sam.details["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    with pytest.raises(HesseError, match="reduction"):
        sharpness(model, nn.CrossEntropyLoss(reduction="none"), batches, progress=False)
    with pytest.raises(HesseError, match="reduction"):
        sharpness(model, crit, batches, "eigenvalue", reduction="none", progress=False)


@pytest.mark.parametrize("measure", ["sam", "worst", "adaptive"])
def test_explicitly_selected_frozen_parameters_are_perturbed(measure):
    model, crit, batches, A, w_min, c = quadratic_problem()
    model.weight.requires_grad_(False)
    snap = snapshot(model)
    res = sharpness(model, crit, batches, measure, params=["weight"], steps=3, progress=False)
    assert math.isfinite(res.value) and res.value > 0
    if measure == "sam":  # same as with the parameter trainable
        w = model.weight.detach()[0].clone()
        g = A @ (w - w_min)
        assert res.details["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-9)
    assert not model.weight.requires_grad and model.weight.grad is None
    assert_identical(model, snap)
