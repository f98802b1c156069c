"""Per-layer traces of the GGN and Fisher from sampled square roots (``E[w wᵀ] = C``), checked
against dense matrices: unbiased for every block, the right scale for every likelihood and
reduction, and the estimator ``per_layer`` picks for them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.analysis.spectrum import per_layer
from hesse.apply.quantize import sensitivities
from hesse.errors import HesseError
from hesse.linalg.block_estimators import AutoBlockTraces, BlockTraces, SampledBlockTraces
from hesse.operators import BlockDiagonalOperator, LinearOperator
from tests.helpers import uneven_batches

COLUMNS = 4000


def _mlp(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, outputs)).double()


def _classification(n=37):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _dense(op) -> torch.Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=op.dtype))


def _assert_unbiased_block_traces(op, columns=COLUMNS):
    """Every block's mean of ``‖w_b‖²`` within 4 stderr of the dense block trace, and the
    stderr small enough (3%) that a factor-of-√2 slip in any scale would fail."""
    C = _dense(op)
    W = op.sample_square_root(columns, seed=3).to(torch.float64)
    assert W.shape == (op.shape[0], columns)
    for name, s in op.blocks.items():
        squares = (W[s] ** 2).sum(0)
        mean, stderr = float(squares.mean()), float(squares.std() / columns**0.5)
        exact = float(torch.trace(C[s, s]))
        assert abs(mean - exact) <= 4 * stderr + 1e-12, (name, mean, exact, stderr)
        assert stderr <= 0.03 * exact, (name, stderr, exact)


@pytest.mark.parametrize("kind", ["ggn", "true", "empirical", "mc"])
def test_cross_entropy_square_roots_are_unbiased_per_block_with_uneven_batches(kind):
    X, y = _classification()
    data = uneven_batches(X, y, [16, 16, 5])
    model = _mlp(3)
    op = hesse.GGN(model, nn.CrossEntropyLoss(), data) if kind == "ggn" else \
        hesse.Fisher(model, nn.CrossEntropyLoss(), data, kind=kind, mc_samples=2)
    _assert_unbiased_block_traces(op)


def test_square_root_matches_the_whole_matrix_not_only_its_diagonal():
    """``W Wᵀ / m`` converges to ``C`` entrywise (relative Frobenius error ~ 1/√m)."""
    X, y = _classification()
    op = hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), uneven_batches(X, y, [20, 17]))
    C = _dense(op)
    errors = []
    for m in (500, 8000):
        W = op.sample_square_root(m, seed=5)
        errors.append(float((W @ W.T / m - C).norm() / C.norm()))
    assert errors[1] < 0.1 and errors[1] < errors[0] / 2.5, errors


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_and_bce_square_roots_have_the_loss_scale(reduction):
    X, _ = _classification()
    targets = X[:, :2].sum(1, keepdim=True).repeat(1, 2)
    _assert_unbiased_block_traces(hesse.GGN(_mlp(2), nn.MSELoss(reduction=reduction), [(X, targets)]))
    labels = (targets > 0).to(torch.float64)
    _assert_unbiased_block_traces(hesse.GGN(_mlp(2), nn.BCEWithLogitsLoss(reduction=reduction), [(X, labels)]))


def test_cross_entropy_with_probability_targets():
    X, y = _classification()
    soft = torch.softmax(torch.randn(len(y), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 1)
    soft[:5] *= 1.5  # unnormalised rows scale the loss Hessian by their sum
    _assert_unbiased_block_traces(hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), uneven_batches(X, soft, [20, 17])))


def test_spatial_cross_entropy_with_ignored_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1)).double()
    X = torch.randn(6, 2, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (6, 5))
    y[0, :2] = -100
    _assert_unbiased_block_traces(hesse.GGN(model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])]))


def test_per_layer_samples_the_ggn_and_meets_rtol_against_dense_block_traces():
    X, y = _classification(200)
    op = hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), uneven_batches(X, y, [64, 64, 64, 8]))
    C = _dense(op)
    res = per_layer(op, rtol=0.05, trace_probes=10000, max_steps=30, progress=False, trace_method="sampled")
    for name, s in op.module_blocks().items():
        exact = float(torch.trace(C[s, s]))
        assert res.trace_method[name] == "sampled square root"
        assert res.rtol_met[name], name
        assert abs(res.trace[name] - exact) <= 4 * res.trace_stderr[name], (name, res.trace[name], exact)
    assert res.trace_matvecs <= 20000 and res.matvecs >= res.trace_matvecs
    forced = per_layer(op, rtol=0.05, trace_probes=200, max_steps=30, progress=False, trace_method="hutch++")
    assert all(m != "sampled square root" for m in forced.trace_method.values())


def test_sampled_traces_stop_at_rtol_in_few_passes_and_are_reproducible():
    X, y = _classification(200)
    op = hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), [(X, y)])
    D = op.block_diagonal()
    runs = []
    for _ in range(2):
        traces = SampledBlockTraces(D.square_root_sampler(), D.blocks, 0.05, 100_000, seed=4)
        traces.run()
        runs.append(traces)
    first = runs[0].results()
    assert runs[0].finished() and runs[0].passes <= 4, runs[0].passes
    assert {n: r.estimate for n, r in first.items()} == {n: r.estimate for n, r in runs[1].results().items()}
    assert all(2 * r.stderr <= 0.05 * r.estimate for r in first.values())


def test_a_budget_too_small_is_reported_not_hidden():
    X, y = _classification(200)
    op = hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), [(X, y)])
    with pytest.warns(hesse.NotConvergedWarning, match="80 square-root columns shared by all blocks"):
        res = per_layer(op, rtol=1e-4, trace_probes=40, max_steps=5, progress=False, trace_method="sampled")
    assert res.trace_matvecs == 40 * 2 and not any(res.rtol_met.values())  # the cap: columns per block


def test_sampled_is_refused_where_there_is_no_square_root():
    X, y = _classification()
    hessian = hesse.Hessian(_mlp(3), nn.CrossEntropyLoss(), [(X, y)])
    with pytest.raises(HesseError, match="hutch"):
        per_layer(hessian, trace_method="sampled", progress=False)
    with pytest.raises(HesseError, match="trace_method must be one of"):
        per_layer(hessian, trace_method="exact", progress=False)
    custom = hesse.GGN(_mlp(3), lambda out, t: nn.functional.cross_entropy(out, t), [(X, y)])
    assert custom.square_root_sampler() is None  # any criterion: Hutch++ per block
    res = per_layer(custom, rtol=0.5, trace_probes=30, max_steps=3, progress=False)
    assert all(m.startswith(("hutch", "exact")) for m in res.trace_method.values())


def test_interrupted_sampling_keeps_the_finished_columns():
    X, y = _classification(200)
    op = hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), [(X, y)])
    calls = []
    real = op.sample_square_root

    def stop_on_second_pass(columns, seed):
        calls.append(columns)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(columns, seed)

    op.sample_square_root = stop_on_second_pass
    op.square_root_sampler = lambda: stop_on_second_pass
    res = per_layer(op, rtol=1e-3, progress=False, on_interrupt="return", trace_method="sampled")
    assert res.interrupted and res.trace_matvecs == calls[0]
    assert all(r > 0 for r in res.trace.values())


def test_quantization_sensitivities_of_the_ggn_sample_by_default():
    X, y = _classification(200)
    model = _mlp(3)
    sens = sensitivities(model, nn.CrossEntropyLoss(), [(X, y)], curvature="ggn", rtol=0.1, trace_probes=5000,
                         top_eigenvalues=False, progress=False, trace_method="sampled")
    assert (sens.trace > 0).all() and not sens.negative.any()
    assert set(sens.result.trace_method.values()) == {"sampled square root"}


class FactoredOperator(LinearOperator):
    """``A = B Bᵀ`` with the square root ``w = B ξ`` (Gaussian ``ξ``): the linalg layer's view of a GGN."""

    symmetric_by_construction = True

    def __init__(self, B: torch.Tensor):
        self.B, self.shape, self.dtype, self.device = B, (B.shape[0], B.shape[0]), B.dtype, B.device

    def _matmat(self, V):
        return self.B @ (self.B.T @ V)

    def square_root_sampler(self):
        def sample(columns, seed):
            g = torch.Generator().manual_seed(seed)
            return self.B @ torch.randn(self.B.shape[1], columns, generator=g, dtype=self.B.dtype)
        return sample


def _blocks(sizes):
    out, start = {}, 0
    for i, n in enumerate(sizes):
        out[f"b{i}"], start = slice(start, start + n), start + n
    return out


@pytest.mark.parametrize("spectrum, sizes, expect", [
    ("flat", [100] * 20, SampledBlockTraces),  # rank 400, many blocks: a few sampled columns serve all
    ("one outlier", [400, 400], BlockTraces),   # rank 3, one dominant direction, two blocks: Hutch++'s sketch
])
def test_auto_picks_the_cheaper_estimator_and_both_agree_with_the_exact_traces(spectrum, sizes, expect):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(sum(sizes), 400 if spectrum == "flat" else 3, generator=g, dtype=torch.float64)
    if spectrum == "one outlier":
        B[:, 1:] *= 0.05
    D = BlockDiagonalOperator(FactoredOperator(B), _blocks(sizes))
    res = per_layer(D, rtol=0.05, trace_probes=2000, max_steps=3, progress=False)
    A = B @ B.T
    chosen = "sampled square root" if expect is SampledBlockTraces else "hutch++"
    for name, s in D.blocks.items():
        exact = float(torch.trace(A[s, s]))
        assert res.trace_method[name].startswith(chosen), res.trace_method[name]
        assert abs(res.trace[name] - exact) <= max(4 * res.trace_stderr[name], 1e-9 * exact), (name, res.trace[name], exact)
    auto = AutoBlockTraces(SampledBlockTraces(D.square_root_sampler(), D.blocks, 0.05, 100_000, seed=0),
                           lambda only: BlockTraces(D, 0.05, 2000, torch.Generator().manual_seed(0), only), sizes)
    auto.run()
    assert (auto.hutch is None) == (expect is SampledBlockTraces)
    assert auto.matvecs >= auto.square_root_columns >= 32 and auto.finished()


def test_auto_splits_blocks_between_sampling_and_hutch_plus_plus():
    """Many flat blocks (sampling serves them all) and one block with a dominant direction
    (sampling would need thousands of columns; Hutch++ one round): each gets its own estimator,
    and every trace agrees with the exact one."""
    g = torch.Generator().manual_seed(1)
    sizes = [100] * 12 + [300]
    B = torch.randn(sum(sizes), 400, generator=g, dtype=torch.float64)
    last = slice(1200, 1500)
    B[last] = 0
    B[last, 0] = torch.randn(300, generator=g, dtype=torch.float64)  # rank one on the last block
    B[last, 1:4] = 0.02 * torch.randn(300, 3, generator=g, dtype=torch.float64)
    D = BlockDiagonalOperator(FactoredOperator(B), _blocks(sizes))
    res = per_layer(D, rtol=0.05, trace_probes=2000, max_steps=3, progress=False)
    A = B @ B.T
    assert res.trace_method["b12"].startswith("hutch++")
    assert all(res.trace_method[f"b{i}"] == "sampled square root" for i in range(12))
    for name, s in D.blocks.items():
        exact = float(torch.trace(A[s, s]))
        assert abs(res.trace[name] - exact) <= max(4 * res.trace_stderr[name], 1e-9 * exact), (name, res.trace[name], exact)
    assert res.trace_matvecs < 300  # measured: 110; all sampled 3,743, all Hutch++ 530


def test_block_diagonal_products_split_a_wide_stack_into_several_parent_calls(monkeypatch):
    """Above STACK_BYTES the side-by-side block columns go to the parent in groups: same result."""
    import hesse.operators.linear as linear

    g = torch.Generator().manual_seed(3)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = A + A.T
    calls = []

    class Counting(LinearOperator):
        symmetric_by_construction = True
        shape, dtype, device = (30, 30), torch.float64, torch.device("cpu")

        def _matmat(self, V):
            calls.append(V.shape[1])
            return A @ V

    D = BlockDiagonalOperator(Counting(), _blocks([10, 5, 15]))
    V = torch.randn(30, 7, generator=g, dtype=torch.float64)
    V[10:15, 3] = 0  # a column idle on one block costs nothing
    whole = D.matmat(V)
    monkeypatch.setattr(linear, "STACK_BYTES", 4 * 30 * 8)  # four columns per call
    split = D.matmat(V)
    assert torch.allclose(whole, split) and calls[0] == 20 and calls[1:] == [4, 4, 4, 4, 4]
    dense = torch.zeros_like(A)
    for s in D.blocks.values():
        dense[s, s] = A[s, s]
    expected = dense @ V
    expected[10:15, 3] = 0
    assert torch.allclose(split, expected) and D.parent_products == 40


def test_sampled_diagonal_is_the_unbiased_monte_carlo_ggn_diagonal():
    X, y = _classification(120)
    op = hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), uneven_batches(X, y, [50, 50, 20]))
    exact = torch.diagonal(_dense(op))
    res = hesse.diagonal(op, "sampled", budget=3000, seed=1, progress=False)
    assert res.method == "sampled square root" and res.matvecs == 3000 and (res.estimate >= 0).all()
    z = (res.estimate - exact) / res.stderr.clamp(min=1e-12)
    assert float((z.abs() <= 4).double().mean()) >= 0.99 and abs(float(z.mean())) < 0.3, z
    assert float((res.estimate - exact).norm() / exact.norm()) < 0.1
    with pytest.raises(HesseError, match="xdiag"):
        hesse.diagonal(hesse.Hessian(_mlp(3), nn.CrossEntropyLoss(), [(X, y)]), "sampled")
    with pytest.raises(HesseError, match="budget >= 2"):
        hesse.diagonal(op, "sampled", budget=1)


def test_sampled_diagonal_keeps_finished_passes_on_interrupt(monkeypatch):
    import hesse.linalg.estimators as estimators

    X, y = _classification(120)
    op = hesse.GGN(_mlp(3), nn.CrossEntropyLoss(), [(X, y)])
    monkeypatch.setattr(estimators, "SAMPLED_PASS_BYTES", 100 * op.shape[0] * 8)  # 100 columns a pass
    real, calls = op.sample_square_root, []

    def stop_on_third(columns, seed):
        calls.append(columns)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(columns, seed)

    op.square_root_sampler = lambda: stop_on_third
    res = hesse.diagonal(op, "sampled", budget=1000, on_interrupt="return", progress=False)
    assert res.interrupted and res.matvecs == 200 and res.passes == 2 and torch.isfinite(res.estimate).all()


def test_obd_with_the_sampled_ggn_diagonal_keeps_nearly_the_exact_diagonal_masks():
    from hesse.apply import prune_obd

    X, y = _classification(120)
    model = _mlp(3)
    exact = prune_obd(model, nn.CrossEntropyLoss(), [(X, y)], sparsity=0.5, method="exact")
    sampled = prune_obd(model, nn.CrossEntropyLoss(), [(X, y)], sparsity=0.5, method="sampled", budget=4000)
    for name, mask in exact.masks.items():
        assert float((mask == sampled.masks[name]).double().mean()) >= 0.9, name
