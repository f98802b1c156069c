"""Trace, diagonal and Frobenius-norm estimators against exact values."""

import numpy as np
import pytest
import torch

from hesse.errors import NotConvergedWarning
from hesse.linalg import diagonal, frobenius_norm, trace
from hesse.operators import DenseOperator, LinearOperator
from tests.helpers import sym_matrix

P = 300


_rng = np.random.default_rng(1)
# low rank plus noise: a few large outliers over a small bulk (NN-Hessian-like)
LOW_RANK = np.concatenate([[40, 25, 15, 10, 6, 4, 3, 2], _rng.normal(0, 0.05, P - 8)])
A_LOW = sym_matrix(LOW_RANK)
TRUE_TRACE = float(LOW_RANK.sum())


# a flat spectrum with a few mild outliers: Hutchinson's home ground
BROAD = np.concatenate([[10, 6, 4], np.random.default_rng(2).uniform(-0.5, 2, P - 3)])
A_BROAD = sym_matrix(BROAD, seed=1)


@pytest.mark.parametrize(
    "method, matrix, exact, budget",
    [
        ("hutchinson", A_BROAD, float(BROAD.sum()), 120),
        ("hutch++", A_LOW, TRUE_TRACE, 60),
        ("xtrace", A_LOW, TRUE_TRACE, 60),
    ],
    ids=["hutchinson", "hutch++", "xtrace"],
)
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_trace_within_reported_error(method, matrix, exact, budget, distribution):
    inside = 0
    for seed in range(50):
        res = trace(matrix, method, budget=budget, seed=seed, distribution=distribution, progress=False)
        inside += abs(res.estimate - exact) <= 2 * res.stderr
        assert res.matvecs <= budget + 2
    assert inside >= 45, (method, inside)


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    def rms(method, budget):
        errs = [trace(A_LOW, method, budget=budget, seed=s, progress=False).estimate - TRUE_TRACE for s in range(20)]
        return float(np.sqrt(np.mean(np.square(errs))))

    h_small, h_big = rms("hutchinson", 30), rms("hutchinson", 240)
    p_small, p_big = rms("hutch++", 30), rms("hutch++", 240)
    assert p_small < h_small / 5 and p_big < h_big / 20
    # error shrinks faster with budget: ~1/m for Hutch++ against 1/sqrt(m) for Hutchinson
    assert h_small / p_small < h_big / p_big
    assert rms("xtrace", 60) < rms("hutchinson", 60) / 5


def test_exact_for_rank_below_sketch():
    lams = np.zeros(P)
    lams[:5] = [5, 4, 3, -2, 1]
    res = trace(sym_matrix(lams), "hutch++", budget=30, progress=False)
    assert res.estimate == pytest.approx(11.0, abs=1e-8)


def test_adaptive_hutchinson_reaches_rtol():
    A = sym_matrix(np.linspace(1, 2, P))
    res = trace(A, "hutchinson", rtol=0.002, progress=False, chunk_size=16)
    assert res.stderr <= 0.002 * abs(res.estimate)
    assert abs(res.estimate - 1.5 * P) <= 4 * res.stderr
    assert res.matvecs < 10_000


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_estimates(method):
    exact = torch.diagonal(A_LOW)
    res = diagonal(A_LOW, method, budget=120, progress=False)
    assert res.estimate.shape == (P,)
    z = (res.estimate - exact).abs() / res.stderr
    assert float((z <= 3).double().mean()) > 0.9
    if method == "xdiag":  # the deflated part is exact: much better than Hutchinson
        hutch = diagonal(A_LOW, "hutchinson", budget=120, progress=False)
        assert (res.estimate - exact).norm() < 0.2 * (hutch.estimate - exact).norm()


def test_exact_diagonal():
    res = diagonal(A_LOW, "exact", progress=False, chunk_size=64)
    torch.testing.assert_close(res.estimate, torch.diagonal(A_LOW))
    assert res.stderr is None and res.matvecs == P + 2


def test_frobenius_norm():
    A = sym_matrix(np.linspace(-1, 3, P))
    exact = float(torch.linalg.matrix_norm(A))
    res = frobenius_norm(A, budget=200, progress=False)
    assert abs(res.estimate - exact) <= 3 * res.stderr
    assert res.stderr < 0.05 * exact


class InterruptingOperator(LinearOperator):
    def __init__(self, matrix, n):
        self.inner, self.n, self.calls = DenseOperator(matrix), n, 0
        self.shape, self.dtype, self.device = self.inner.shape, self.inner.dtype, self.inner.device

    def _matmat(self, V):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner._matmat(V)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_keyboard_interrupt_keeps_finished_probes(method):
    A = sym_matrix(np.linspace(1, 2, P))
    op = InterruptingOperator(A, n=3)  # the symmetry check is call 1, then chunks of 8
    with pytest.warns(NotConvergedWarning, match="trace interrupted"):
        res = trace(op, method, budget=60, chunk_size=8, progress=False, on_interrupt="return")
    assert res.interrupted and res.matvecs > 0
    assert abs(res.estimate - 1.5 * P) <= 5 * res.stderr
    with pytest.raises(KeyboardInterrupt) as info:  # the default re-raises, carrying the same partial
        trace(InterruptingOperator(A, n=3), method, budget=60, chunk_size=8, progress=False)
    assert info.value.partial.interrupted and info.value.partial.estimate == res.estimate


# budget 60 in chunks of 8: hutch++ sketches 20 probes (3 calls), xtrace 30 (4 calls)
@pytest.mark.parametrize("method, n, done", [("hutch++", 3, 8), ("hutch++", 6, 28), ("xtrace", 3, 8), ("xtrace", 7, 38)])
def test_keyboard_interrupt_in_each_phase(method, n, done):
    A = sym_matrix(np.linspace(1, 2, P))
    with pytest.raises(KeyboardInterrupt) as info:
        trace(InterruptingOperator(A, n=n), method, budget=60, chunk_size=8, progress=False)
    res = info.value.partial
    assert res.interrupted and res.matvecs == 2 + done
    assert abs(res.estimate - 1.5 * P) <= 5 * res.stderr


def test_keyboard_interrupt_of_the_exact_trace_and_diagonal():
    d = np.linspace(1, 2, 40)
    A = torch.diag(torch.tensor(d))
    with pytest.warns(NotConvergedWarning, match="^trace interrupted"):
        res = trace(InterruptingOperator(A, n=4), budget=99, chunk_size=8, progress=False, on_interrupt="return")
    assert res.interrupted and res.method.startswith("exact (interrupted")
    assert np.isfinite(res.estimate) and abs(res.estimate - d.sum()) <= 5 * res.stderr + 1e-9
    with pytest.raises(KeyboardInterrupt) as info:
        diagonal(InterruptingOperator(A, n=4), budget=99, chunk_size=8, progress=False)
    diag = info.value.partial
    assert diag.interrupted and diag.matvecs == 2 + 16
    torch.testing.assert_close(diag.estimate[:16], torch.tensor(d[:16]))
    assert bool(diag.estimate[16:].isnan().all())


@pytest.mark.parametrize("call", [
    lambda op, **kw: diagonal(op, "hutchinson", budget=60, chunk_size=8, **kw),
    lambda op, **kw: diagonal(op, "xdiag", budget=60, chunk_size=8, **kw),
    lambda op, **kw: frobenius_norm(op, budget=60, chunk_size=8, **kw),
], ids=["hutchinson", "xdiag", "frobenius"])
def test_keyboard_interrupt_of_diagonal_and_norm(call):
    A = sym_matrix(np.linspace(1, 2, P))
    with pytest.warns(NotConvergedWarning, match="interrupted"):
        res = call(InterruptingOperator(A, n=4), progress=False, on_interrupt="return")
    assert res.interrupted and res.matvecs == 2 + 16
    with pytest.raises(KeyboardInterrupt) as info:
        call(InterruptingOperator(A, n=4), progress=False)
    assert info.value.partial.interrupted


def test_results_are_json_ready():
    import json

    for res in [trace(A_LOW, budget=9, progress=False), diagonal(A_LOW, budget=8, progress=False),
                frobenius_norm(A_LOW, budget=8, progress=False)]:
        json.dumps(res.to_dict())
        assert "matvecs=" in repr(res)


class CountingOperator(DenseOperator):
    def __init__(self, matrix):
        super().__init__(matrix)
        self.columns = []

    def _matmat(self, V):
        self.columns.append(V.shape[1])
        return super()._matmat(V)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("chunk_size", [32, 7])
def test_products_respect_the_chunk_size_and_are_counted_honestly(method, chunk_size):
    """What the caller is promised, not the order of calls: no operator call exceeds
    ``chunk_size`` columns (bounded memory), ``.matvecs`` counts every column and ``.passes``
    every call, and the passes stay close to ``budget / chunk_size``."""
    op = CountingOperator(A_LOW)
    res = trace(op, method, budget=99, chunk_size=chunk_size, progress=False)
    assert max(op.columns) <= chunk_size
    assert res.matvecs == sum(op.columns) and res.passes == len(op.columns)
    assert len(op.columns) <= -(-99 // chunk_size) + 3  # + symmetry check and the phases' remainders


def test_progress_bar_shown_when_asked_and_silent_when_off(capsys):
    trace(A_LOW, budget=9, progress=True)
    diagonal(A_LOW, budget=8, progress=True)
    frobenius_norm(A_LOW, budget=8, progress=True)
    err = capsys.readouterr().err
    assert "trace (hutch++)" in err and "diagonal (xdiag)" in err and "frobenius_norm" in err
    trace(A_LOW, budget=9, progress=False)
    diagonal(A_LOW, budget=8, progress=False)
    frobenius_norm(A_LOW, budget=8, progress=False)
    assert capsys.readouterr() == ("", "")
    trace(A_LOW, budget=9)  # the default (None) shows bars only on a terminal; captured stderr is not one
    assert capsys.readouterr().err == ""


def test_small_operators_get_the_exact_trace_and_diagonal():
    """With P <= budget, P identity columns cost no more than the probes: the answer is exact."""
    A = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    for method in ("hutch++", "xtrace", "hutchinson"):
        result = trace(A, method=method, progress=False)
        assert result.estimate == 21.0 and result.stderr == 0.0 and result.method == "exact"
    assert torch.equal(diagonal(A, progress=False).estimate, torch.arange(1.0, 7.0, dtype=torch.float64))
