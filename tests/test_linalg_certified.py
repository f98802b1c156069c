"""Certified eigenvalues, passes, precision floor, adaptive trace and density resolution,
against exact answers (dense matrices with known spectra)."""

import json

import numpy as np
import pytest
import torch

from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg import density, diagonal, eigenvalues, frobenius_norm, trace
from hesse.linalg.checks import prepare_operator
from hesse.linalg.lanczos import error_bounds
from hesse.operators import DenseOperator
from tests.helpers import sym_matrix

P = 400
_rng = np.random.default_rng(7)
SEPARATED = np.concatenate([[10.0, 8, 6, 5, 4.5], _rng.uniform(-1, 3, P - 5)])
# NN-like: outliers over a bulk near zero, a few negatives (Sagun et al. 2017)
NN_LIKE = np.concatenate([[120.0, 60, 35, 22, 15, 10, 7, 5], 0.5 * _rng.beta(0.5, 3, 972),
                          -np.abs(_rng.normal(0, 0.08, 20))])
FLAT = _rng.uniform(1, 2, 1000)


class Counting(DenseOperator):
    """Counts operator calls (passes) and columns (products)."""

    def __init__(self, matrix, by_construction=False):
        super().__init__(matrix)
        self.symmetric_by_construction = by_construction
        self.calls, self.columns = 0, 0

    def _matmat(self, V):
        self.calls, self.columns = self.calls + 1, self.columns + V.shape[1]
        return super()._matmat(V)


# ---- 1. no symmetry check on operators that are symmetric by construction -------------------

def test_symmetric_by_construction_skips_the_check():
    A = sym_matrix(SEPARATED)
    assert prepare_operator(Counting(A, by_construction=True), True, 0)[1] == 0
    assert prepare_operator(Counting(A), True, 0)[1] == 2  # user operators are still checked
    assert prepare_operator(Counting(A), False, 0)[1] == 0
    op = Counting(A, by_construction=True)
    res = trace(op, budget=60, progress=False)
    assert op.columns == res.matvecs == 60 and op.calls == res.passes


def test_hessian_is_symmetric_by_construction(mlp_problem):
    import hesse

    model, crit, X, y, batches = mlp_problem
    H = hesse.Hessian(model, crit, batches)
    assert H.symmetric_by_construction and H.block_diagonal().symmetric_by_construction
    assert prepare_operator(H, True, 0)[1] == 0


# ---- 2. passes beside products --------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda op: eigenvalues(op, k=3, progress=False),
    lambda op: eigenvalues(op, k=3, block_size=1, progress=False),
    lambda op: eigenvalues(op, k=2, method="power", progress=False),
    lambda op: trace(op, progress=False),
    lambda op: trace(op, "xtrace", progress=False),
    lambda op: trace(op, "hutchinson", budget=70, progress=False),
    lambda op: diagonal(op, budget=60, progress=False),
    lambda op: frobenius_norm(op, budget=40, progress=False),
    lambda op: density(op, progress=False),
], ids=["lanczos", "lanczos-b1", "power", "hutch++", "xtrace", "hutchinson", "xdiag", "frobenius", "density"])
def test_passes_and_products_are_counted(call):
    op = Counting(sym_matrix(SEPARATED))
    with np.errstate(all="ignore"):
        res = call(op)
    assert res.passes == op.calls and res.matvecs == op.columns
    assert f"passes={res.passes}" in repr(res) and json.loads(json.dumps(res.to_dict()))["passes"] == res.passes


def test_dense_path_counts_passes():
    op = Counting(sym_matrix(np.arange(1.0, 13.0)))
    res = eigenvalues(op, k=3, progress=False)
    assert res.method == "dense" and res.passes == op.calls == 2 and res.matvecs == 14


def test_block_default_saves_passes():
    A = sym_matrix(SEPARATED)
    block = eigenvalues(A, k=5, progress=False)
    single = eigenvalues(A, k=5, block_size=1, progress=False)
    assert block.passes < single.passes and single.passes == single.matvecs - 1  # the check: 2 columns, 1 pass
    np.testing.assert_allclose(block.values.numpy(), SEPARATED[:5], rtol=1e-3)


# ---- 3. certified error bounds ---------------------------------------------------------------

def test_error_bounds_gap_formula():
    theta = np.array([10.0, 8.0, 1.0])
    res = np.array([1e-2, 0.5, np.inf])
    b = error_bounds(theta, res, 2, floor=0.0)
    assert b[0] == pytest.approx(1e-4 / (2.0 - 0.5))  # r^2 / (gap - r_neighbour)
    assert b[1] == 0.5  # the neighbour below has unknown residual: no gap, the residual
    assert error_bounds(theta, res, 1, floor=1.0)[0] == 1.0  # never below the floor
    close = error_bounds(np.array([1.0, 0.99]), np.array([0.02, 0.02]), 1, floor=0.0)
    assert close[0] == 0.02  # gap minus the neighbour's residual is negative: the residual


@pytest.mark.parametrize("lams", [SEPARATED, NN_LIKE, np.linspace(-1, 1, P)], ids=["separated", "nn", "no_gap"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_error_bounds_are_honest_and_certify_tol(lams, which, tol):
    A = sym_matrix(lams, seed=2)
    res = eigenvalues(A, k=4, which=which, tol=tol, progress=False)
    exact = (np.sort(lams)[::-1] if which == "largest" else np.sort(lams))[:4]
    vals, bounds = res.values.numpy(), res.error_bounds.numpy()
    assert np.all(np.abs(vals - exact) <= bounds)
    assert bool(res.converged.all()) and np.all(bounds <= tol * np.abs(vals))
    np.testing.assert_array_equal(res.converged.numpy(), bounds <= tol * np.abs(vals))
    assert np.all(bounds <= res.residuals.numpy())


def test_default_tol_stops_at_three_digits_not_far_beyond():
    A = sym_matrix(NN_LIKE)
    loose = eigenvalues(A, k=5, progress=False)
    tight = eigenvalues(A, k=5, tol=1e-8, progress=False)
    assert loose.matvecs < tight.matvecs
    assert np.all(np.abs(loose.values.numpy() - NN_LIKE[:5]) <= 1e-3 * NN_LIKE[:5])


def test_gap_bound_certifies_beyond_the_residual():
    res = eigenvalues(sym_matrix(SEPARATED), k=2, tol=1e-8, progress=False)
    assert np.all(res.error_bounds.numpy() < 0.1 * res.residuals.numpy())
    np.testing.assert_allclose(res.values.numpy(), [10, 8], rtol=1e-8)


# ---- precision floor, best iterate, accumulate -----------------------------------------------

CLUSTER = np.concatenate([[100.0, 10, 9.9995, 9.999, 9.998], np.random.default_rng(3).uniform(0, 9.99, 995)])


@pytest.mark.filterwarnings("ignore::hesse.errors.NotConvergedWarning")
def test_precision_floor_float32_stops_and_never_degrades():
    A = DenseOperator(sym_matrix(CLUSTER).float())
    exact = CLUSTER[:5]
    ok = eigenvalues(A, k=5, tol=1e-4, progress=False)
    assert bool(ok.converged.all())
    with pytest.warns(NotConvergedWarning, match="precision floor"):
        low = eigenvalues(A, k=5, tol=1e-7, progress=False)
    floor = 10 * torch.finfo(torch.float32).eps * 100
    assert low.matvecs <= (300 + 30 * 5) * 4 and low.matvecs <= 2 * ok.matvecs
    assert not bool(low.converged.any()) and any("precision floor" in n for n in low.notes)
    err_low, err_ok = np.abs(low.values.numpy() - exact), np.abs(ok.values.numpy() - exact)
    assert np.all(err_low <= np.maximum(err_ok, floor))  # as accurate as tol=1e-4, up to the floor
    assert np.all(err_low <= low.error_bounds.numpy()) and np.all(low.error_bounds.numpy() >= floor * (1 - 1e-6))


def test_accumulate_float64_keeps_float32_vectors():
    A = DenseOperator(sym_matrix(CLUSTER).float())
    res = eigenvalues(A, k=3, tol=1e-5, accumulate=torch.float64, progress=False)
    assert res.vectors.dtype == torch.float32
    assert np.all(np.abs(res.values.numpy() - CLUSTER[:3]) <= res.error_bounds.numpy())


@pytest.mark.filterwarnings("ignore::hesse.errors.NotConvergedWarning")
def test_more_products_never_give_worse_bounds():
    A = sym_matrix(np.linspace(-1, 1, P), seed=4)
    scores = []
    for cap in (30, 60, 120, 240):
        res = eigenvalues(A, k=3, tol=1e-12, max_matvecs=cap, progress=False)
        assert res.matvecs <= cap + 2 + 4 and not bool(res.converged.all())
        assert any("max_matvecs" in n or "stopped improving" in n for n in res.notes)
        scores.append(float(np.mean(np.log(res.error_bounds.numpy()))))
    assert all(b <= a + 1e-12 for a, b in zip(scores, scores[1:])), scores


# ---- 4. trace to a target accuracy ----------------------------------------------------------

@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
@pytest.mark.parametrize("lams", [FLAT, NN_LIKE], ids=["flat", "nn"])
def test_default_trace_reaches_one_percent_honestly(method, lams):
    A, exact = sym_matrix(lams, seed=5), float(lams.sum())
    inside = 0
    for seed in range(12):
        res = trace(A, method, seed=seed, progress=False)
        assert res.rtol == 0.01 and res.converged and res.stderr <= 0.01 * abs(res.estimate)
        assert res.matvecs <= 300 + 2
        inside += abs(res.estimate - exact) <= 3 * res.stderr
    assert inside >= 10, inside


def test_adaptive_trace_reuses_products_and_respects_the_cap():
    A = sym_matrix(NN_LIKE, seed=5)
    loose = trace(A, rtol=0.05, progress=False)
    tight = trace(A, rtol=0.002, max_matvecs=600, progress=False)
    assert loose.matvecs < tight.matvecs <= 602 and tight.stderr < loose.stderr
    capped = trace(A, "xtrace", rtol=1e-9, max_matvecs=60, progress=False)
    assert capped.matvecs <= 62 and capped.converged is False and "NOT met" in repr(capped)
    assert trace(A, budget=99, progress=False).converged is None  # a fixed budget has no target


def test_adaptive_xtrace_is_exact_for_low_rank():
    lams = np.zeros(1000)
    lams[:4] = [5, 4, 3, -2]
    res = trace(sym_matrix(lams), "xtrace", progress=False)
    assert res.estimate == pytest.approx(10.0, abs=1e-8) and res.converged


def test_rtol_needs_a_positive_cap():
    with pytest.raises(HesseError, match="max_matvecs"):
        trace(sym_matrix(FLAT[:50]), rtol=0.01, max_matvecs=-1)


# ---- 5. density resolution ------------------------------------------------------------------

def test_density_defaults_and_resolution():
    op = Counting(sym_matrix(NN_LIKE))
    res = density(op, progress=False)
    assert (res.num_probes, res.lanczos_steps) == (4, 50) and res.ritz_values.shape == (4, 50)
    assert res.passes == op.calls == 51 and res.matvecs == 4 * 50 + 2
    width = np.nanmax(res.ritz_values) - np.nanmin(res.ritz_values)
    assert res.sigma == pytest.approx(0.005 * width)
    explicit = density(sym_matrix(NN_LIKE), num_probes=6, lanczos_steps=30, sigma=0.01, progress=False)
    assert (explicit.num_probes, explicit.lanczos_steps) == (6, 30) and explicit.ritz_values.shape == (6, 30)
    # 4 probes: the Monte Carlo error of tr(A)/P is about sqrt(2/4) ||A||_F / P
    assert abs(res.moment(1) - NN_LIKE.mean()) <= 3 * np.sqrt(2 / 4) * np.linalg.norm(NN_LIKE) / len(NN_LIKE)


class Interrupting(DenseOperator):
    """Raises KeyboardInterrupt on the n-th operator call, as Ctrl-C would."""

    def __init__(self, matrix, n):
        super().__init__(matrix)
        self.n, self.calls = n, 0

    def _matmat(self, V):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super()._matmat(V)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_adaptive_trace_interrupted_keeps_the_last_estimate(method):
    A, exact = sym_matrix(FLAT, seed=5), float(FLAT.sum())
    with pytest.warns(NotConvergedWarning, match="trace interrupted"):
        res = trace(Interrupting(A, n=6), method, rtol=1e-6, max_matvecs=600, progress=False, on_interrupt="return")
    assert res.interrupted and res.converged is False and res.passes == 5
    assert abs(res.estimate - exact) <= 5 * res.stderr
