"""per_layer: per-block traces to a target accuracy (shared passes), per-parameter ranking, ties."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hesse import Hessian
from hesse.analysis import per_layer
from hesse.analysis.spectrum import PerLayerResult
from hesse.errors import NotConvergedWarning
from hesse.linalg.block_estimators import BlockTraces
from hesse.operators import BlockDiagonalOperator, DenseOperator
from tests.helpers import dense_hessian, sym_matrix

P = 400
_rng = np.random.default_rng(0)
NN_SPECTRUM = np.concatenate([[30, 20, 15, 12, 10, 8, 7, 6, 5, 4], _rng.normal(0.05, 0.1, P - 10)])
A_NN = sym_matrix(NN_SPECTRUM)
BLOCKS = {"layer1.weight": slice(0, 120), "layer1.bias": slice(120, 130), "layer2.weight": slice(130, P)}


class CountingOperator(DenseOperator):
    """Counts operator calls (data passes) and columns."""

    def __init__(self, matrix, blocks=None):
        super().__init__(matrix, blocks)
        self.calls, self.columns = 0, 0

    def _matmat(self, V):
        self.calls += 1
        self.columns += V.shape[1]
        return super()._matmat(V)


def _exact_block_traces(A, blocks):
    return {n: float(torch.trace(A[s, s])) for n, s in blocks.items()}


def _quiet(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        return call()


def test_cnn_block_traces_within_two_percent_of_the_dense_hessian(cnn_problem):
    model, criterion, X, y, batches = cnn_problem
    H = dense_hessian(model, criterion, X, y)
    op = Hessian(model, criterion, batches)
    exact = _exact_block_traces(H, op.blocks)
    res = per_layer(op, by="parameter", rtol=0.02, seed=0, progress=False)
    for name, value in exact.items():
        assert res.trace[name] == pytest.approx(value, rel=0.02)
        assert abs(res.trace[name] - value) <= 4 * res.trace_stderr[name] + 1e-10
        assert res.rtol_met[name]
        assert res.trace_per_parameter[name] == pytest.approx(res.trace[name] / res.sizes[name])
    small = [n for n, s in op.blocks.items() if s.stop - s.start <= 60]
    assert small and all(res.trace_method[n] == "exact" and res.trace_stderr[n] == 0 for n in small)
    assert all(res.trace[n] == pytest.approx(exact[n], rel=1e-10) for n in small)
    assert res.trace_method["fc.weight"] == "hutch++" and res.trace_matvecs <= 1000


def test_traces_reach_rtol_with_honest_errors_and_share_passes():
    parent = CountingOperator(A_NN)
    res = _quiet(lambda: per_layer(BlockDiagonalOperator(parent, BLOCKS), rtol=0.02, max_steps=1, seed=1,
                                   progress=False))
    exact = _exact_block_traces(A_NN, BLOCKS)
    for name, value in exact.items():
        assert 2 * res.trace_stderr[name] <= 0.02 * abs(res.trace[name])
        assert abs(res.trace[name] - value) <= 4 * res.trace_stderr[name] + 1e-10
    assert res.trace_method["layer1.bias"] == "exact"
    # every pass serves all unfinished blocks; matvecs counts the columns of A
    assert parent.columns == res.matvecs
    trace_calls = parent.calls - 1 - 1  # the symmetry check and one Lanczos step
    assert 5 * trace_calls <= res.trace_matvecs


def test_a_block_that_estimators_cannot_resolve_cheaply_becomes_exact():
    """A flat, mixed-sign spectrum with a small trace: Hutch++ gains little from its sketch,
    and 400 identity columns cost less than the ~10^3 probes 2% needs: the block becomes exact."""
    lams = _rng.uniform(-1.0, 1.2, P)
    A = sym_matrix(lams, seed=5)
    blocks = {"flat": slice(0, P)}
    D = BlockDiagonalOperator(DenseOperator(A, blocks), blocks)
    res = _quiet(lambda: per_layer(D, rtol=0.02, max_steps=1, progress=False))
    assert res.trace_method["flat"] == "exact" and res.trace_stderr["flat"] == 0
    assert res.trace["flat"] == pytest.approx(lams.sum(), rel=1e-10)
    assert res.trace_matvecs <= 3 * 20 + P  # two rounds, then the identity columns


def test_all_small_blocks_are_exact_at_the_cost_of_the_largest():
    blocks = {"a": slice(0, 20), "b": slice(20, 50), "c": slice(50, 60)}
    A = A_NN[:60, :60]
    parent = CountingOperator(A)
    res = _quiet(lambda: per_layer(BlockDiagonalOperator(parent, blocks), max_steps=1, progress=False))
    assert res.trace_matvecs == 60  # every block's identity columns, all in the same pass
    assert parent.calls == 1 + 1 + 1  # the symmetry check, the identity columns, one Lanczos step
    for name, value in _exact_block_traces(A, blocks).items():
        assert res.trace[name] == pytest.approx(value, rel=1e-12) and res.trace_stderr[name] == 0


def test_budget_caps_products_and_warns():
    D = BlockDiagonalOperator(DenseOperator(A_NN), BLOCKS)
    with pytest.warns(NotConvergedWarning, match="did not reach rtol"):
        res = per_layer(D, rtol=1e-6, trace_probes=50, progress=False)
    assert res.trace_matvecs <= 3 * 50 and not res.rtol_met["layer2.weight"]
    two = _quiet(lambda: per_layer(D, trace_probes=2, progress=False))  # Hutchinson on two probes per block
    assert two.trace_matvecs == 3 * 2 and two.trace_method["layer2.weight"] == "hutchinson"
    assert "*" in two.table()


def test_ranking_by_trace_per_parameter_and_ties():
    names = ["a", "b", "c", "d"]
    res = PerLayerResult(
        names, {"a": 10, "b": 100, "c": 1000, "d": 5},
        top_eigenvalue=dict.fromkeys(names, 1.0), eigen_converged=dict.fromkeys(names, True),
        trace={"a": 5.0, "b": 52.0, "c": 100.0, "d": float("nan")},
        trace_stderr={"a": 0.1, "b": 1.0, "c": 0.0, "d": math.inf},
        trace_method=dict.fromkeys(names, "hutch++"), rtol=0.02, trace_matvecs=60, matvecs=70,
    )
    assert res.ranking == ["b", "a", "c", "d"]  # 0.52 and 0.5 per parameter, then 0.1, NaN last
    assert res.indistinguishable == [("b", "a")]  # |0.52 - 0.5| <= 2 sqrt(0.01^2 + 0.01^2)
    rows = res.rows()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and rows[0]["tied_with_next"]
    assert "1=" in res.table() and "trace/param" in res.table()
    d = res.to_dict()
    assert d["ranking"] == res.ranking and d["indistinguishable"] == [["b", "a"]]
    assert d["trace_per_parameter"]["b"] == pytest.approx(0.52)
    json.dumps(d)


def test_block_traces_partial_results_after_interrupt():
    class Interrupting(DenseOperator):
        calls = 0

        def _matmat(self, V):
            self.calls += 1
            if self.calls == 4:  # two rounds of two passes each were planned
                raise KeyboardInterrupt
            return super()._matmat(V)

    D = BlockDiagonalOperator(Interrupting(A_NN), BLOCKS)
    bt = BlockTraces(D, 0.02, 1000, torch.Generator().manual_seed(0))
    with pytest.raises(KeyboardInterrupt):
        bt.run()
    partial = bt.results(interrupted=True)
    # products of A: round 1 (10 sketch + 10 tests per weight block and the bias's 10 identity
    # columns; then 10 basis columns per weight block) and the first pass of round 2
    assert bt.matvecs == (40 + 10) + 20 + 40
    assert all(r.interrupted and math.isfinite(r.estimate) for r in partial.values())
    bias = partial["layer1.bias"]  # 10 identity columns in the first pass: complete
    assert bias.method == "exact" and bias.estimate == pytest.approx(float(torch.trace(A_NN[120:130, 120:130])))


@pytest.mark.slow
def test_trained_digits_cnn_two_percent():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:64] / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target[:64])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    H = dense_hessian(model, nn.CrossEntropyLoss(), X, y)  # 690 x 690
    op = Hessian(model, nn.CrossEntropyLoss(), (X, y))
    res = per_layer(op, by="parameter", seed=0, progress=False)
    for name, value in _exact_block_traces(H, op.blocks).items():
        assert res.trace[name] == pytest.approx(value, rel=0.02)
