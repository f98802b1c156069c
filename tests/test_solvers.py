"""Damped inverse products against dense ``torch.linalg.solve``."""

from __future__ import annotations

import pytest
import torch

import hesse
from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg import cg, damped, lissa, lowrank_inverse, lowrank_solve, minres, neumann
from hesse.operators import DenseOperator
from tests.helpers import sym_matrix

LAMS = torch.logspace(0, -3, 40, dtype=torch.float64).tolist()


@pytest.fixture
def spd():
    return sym_matrix(LAMS, seed=3)


def _exact(C, b, lam):
    return torch.linalg.solve(C + lam * torch.eye(C.shape[0], dtype=C.dtype), b)


def _rel(x, y):
    return float((x - y).norm() / y.norm())


def test_cg_multiple_right_hand_sides(spd):
    B = torch.randn(40, 3, dtype=torch.float64)
    result = cg(DenseOperator(spd), B, damping=1e-2, tol=1e-10)
    assert result.all_converged and result.solution.shape == (40, 3)
    assert _rel(result.solution, _exact(spd, B, 1e-2)) < 1e-8
    assert result.history[-1] <= 1e-10 and result.passes == result.iterations
    assert result.matvecs >= result.passes  # columns that converge early stop costing products


def test_cg_preconditioned_needs_fewer_steps(spd):
    b = torch.randn(40, dtype=torch.float64)
    plain = cg(spd, b, damping=1e-3, tol=1e-8)
    M = torch.linalg.inv(spd + 1e-3 * torch.eye(40, dtype=torch.float64))
    pre = cg(spd, b, damping=1e-3, tol=1e-8, preconditioner=M)
    assert pre.iterations <= 2 < plain.iterations
    assert _rel(pre.solution, _exact(spd, b, 1e-3)) < 1e-7


def test_cg_reports_non_convergence(spd):
    with pytest.warns(NotConvergedWarning, match="did not reach"):
        result = cg(spd, torch.randn(40, dtype=torch.float64), damping=1e-4, tol=1e-12, maxiter=3)
    assert not result.all_converged and result.iterations == 3


def test_cg_refuses_indefinite_and_minres_solves_it():
    C = sym_matrix([3.0, 1.0, -0.5, -2.0] + [0.5] * 8, seed=1)
    b = torch.randn(12, dtype=torch.float64)
    with pytest.warns(NotConvergedWarning, match="minres"):
        bad = cg(C, b, damping=0.1, tol=1e-10)
    result = minres(C, b, damping=0.1, tol=1e-10)
    assert result.all_converged and _rel(result.solution, _exact(C, b, 0.1)) < 1e-8
    assert not bad.all_converged


def test_minres_multiple_columns(spd):
    B = torch.randn(40, 2, dtype=torch.float64)
    result = minres(spd, B, damping=1e-2, tol=1e-10)
    assert _rel(result.solution, _exact(spd, B, 1e-2)) < 1e-8
    assert all(a >= b - 1e-14 for a, b in zip(result.history, result.history[1:]))  # monotone residual


def test_neumann_and_lissa_match_dense(spd):
    b = torch.randn(40, dtype=torch.float64)
    lam = 0.1
    exact = _exact(spd, b, lam)
    result = neumann(spd, b, damping=lam, tol=1e-9)
    assert result.all_converged and _rel(result.solution, exact) < 1e-7
    residual = (b - (spd @ result.solution + lam * result.solution)).norm() / b.norm()
    assert abs(float(residual) - float(result.residuals[0])) < 1e-10  # the free residual is the true one
    lis = lissa(spd, b, damping=lam, scale=1.5, depth=300)
    assert _rel(lis.solution, exact) < 1e-8 and lis.matvecs == 300 + 20 + 1


def test_lissa_scale_is_checked(spd):
    b = torch.randn(40, dtype=torch.float64)
    with pytest.raises(HesseError, match="diverges"):
        lissa(spd, b, damping=0.1, scale=0.3)
    with pytest.warns(NotConvergedWarning, match="below"):
        lissa(spd, b, damping=0.1, scale=0.9, depth=5, tol=1.0)


@pytest.mark.filterwarnings("ignore::hesse.errors.NotConvergedWarning")
def test_lissa_with_batch_operators_is_unbiased_on_average(spd):
    halves = [DenseOperator(spd * 0.5), DenseOperator(spd * 1.5)]
    b = torch.randn(40, dtype=torch.float64)
    result = lissa(spd, b, damping=0.5, scale=3.0, depth=60, repeats=20, batch_operators=halves)
    assert _rel(result.solution, _exact(spd, b, 0.5)) < 0.1


def test_lowrank_inverse_exact_when_rank_covers_the_spectrum():
    C = sym_matrix([5.0, 3.0, 2.0] + [0.0] * 17, seed=2)
    b = torch.randn(20, dtype=torch.float64)
    inverse = lowrank_inverse(C, 0.1, rank=3)
    assert _rel(inverse @ b, _exact(C, b, 0.1)) < 1e-6
    result = lowrank_solve(C, b, damping=0.1, inverse=inverse)
    assert result.residuals[0] < 1e-5 and result.method == "lowrank"


def test_lowrank_error_shrinks_with_rank(spd):
    b = torch.randn(40, dtype=torch.float64)
    errs = [_rel(lowrank_solve(spd, b, damping=0.05, rank=k).solution, _exact(spd, b, 0.05)) for k in (2, 10, 30)]
    assert errs[0] > errs[1] > errs[2]


def test_solvers_accept_damped_operators_and_interrupts(spd, monkeypatch):
    b = torch.randn(40, dtype=torch.float64)
    op = damped(DenseOperator(spd), 0.1)
    assert _rel(cg(op, b, tol=1e-10).solution, _exact(spd, b, 0.1)) < 1e-8
    calls = {"n": 0}

    def fn(V):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return spd @ V

    with pytest.warns(NotConvergedWarning, match="interrupted"):
        partial = cg(hesse.as_operator((fn, 40)), b, damping=0.1, on_interrupt="return")
    assert partial.interrupted and partial.iterations == 3
