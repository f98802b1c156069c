"""SLQ density, bulk/outlier split, per-layer spectra and stability diagnostics."""

import json

import numpy as np
import pytest
import torch

from hesse.analysis import (
    batch_size_sharpness,
    bulk_outlier_split,
    per_layer,
    stability,
)
from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg import density, eigenvalues, trace
from hesse.operators import BlockDiagonalOperator, DenseOperator
from tests.helpers import sym_matrix

P = 400


_rng = np.random.default_rng(0)
# NN-like: ten outliers (one per "class") over a bulk near zero with some negatives
NN_SPECTRUM = np.concatenate([[30, 20, 15, 12, 10, 8, 7, 6, 5, 4], _rng.normal(0.05, 0.1, P - 10)])
A_NN = sym_matrix(NN_SPECTRUM)


class CountingOperator(DenseOperator):
    """Counts operator calls (data passes) and columns."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls, self.columns = 0, 0

    def _matmat(self, V):
        self.calls += 1
        self.columns += V.shape[1]
        return super()._matmat(V)


def test_density_integrates_to_one_and_matches_moments():
    lams = np.concatenate([[6.0, 5.0], _rng.uniform(0.5, 2.0, P - 2)])
    A = CountingOperator(sym_matrix(lams, seed=1))
    res = density(A, num_probes=40, lanczos_steps=60, progress=False)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-9)
    m1, m2 = lams.mean(), (lams**2).mean()
    assert res.moment(1) == pytest.approx(m1, rel=0.05)
    assert res.moment(2) == pytest.approx(m2, rel=0.05)
    # the smoothed curve has the same moments (up to the kernel's sigma^2)
    assert np.trapezoid(res.grid * res.density, res.grid) == pytest.approx(m1, rel=0.05)
    assert np.trapezoid(res.grid**2 * res.density, res.grid) == pytest.approx(m2 + res.sigma**2, rel=0.05)
    # all probes advance together: one operator call per Lanczos step (+1 symmetry check)
    assert A.calls == 60 + 1
    assert res.ritz_values.shape == (40, 60) and res.weights.sum(1) == pytest.approx(np.ones(40))


def test_density_finds_extreme_eigenvalues_without_ghosts():
    res = density(A_NN, num_probes=4, lanczos_steps=80, progress=False)
    top = np.sort(res.ritz_values[0])[::-1][:10]
    np.testing.assert_allclose(top, NN_SPECTRUM[:10], rtol=1e-6)  # no repeated Ritz copies
    assert np.nanmax(res.ritz_values) == pytest.approx(30, rel=1e-8)


def test_bulk_outlier_split_counts_outliers():
    split = bulk_outlier_split(eigenvalues(A_NN, k=25, progress=False))
    assert split.num_outliers == 10
    np.testing.assert_allclose(split.outliers, NN_SPECTRUM[:10], rtol=1e-4)
    assert split.bulk_edge == pytest.approx(NN_SPECTRUM[10:].max(), rel=1e-3)
    dens = density(A_NN, num_probes=5, lanczos_steps=80, progress=False)
    dens_split = bulk_outlier_split(dens)
    assert dens_split.num_outliers == 10 and len(dens_split.outliers) == 10
    assert not hasattr(dens, "split") and not hasattr(dens, "outliers")  # results know no analyses
    assert bulk_outlier_split(np.linspace(0, 1, 30)).num_outliers == 0  # no gap, no outliers
    json.dumps(split.to_dict())


def test_density_plot_and_dict():
    import matplotlib

    matplotlib.use("Agg")
    res = density(A_NN, num_probes=3, lanczos_steps=30, progress=False, log_scale=True)
    fig, ax = res.plot()
    assert ax.get_yscale() == "log"
    fig2, ax2 = res.plot(log=False)
    assert ax2.get_yscale() == "linear"
    d = res.to_dict()
    json.dumps(d)
    assert len(d["grid"]) == len(d["density"]) and "DensityResult(" in repr(res)


def test_density_interrupt_keeps_finished_steps():
    class Interrupting(DenseOperator):
        calls = 0

        def _matmat(self, V):
            self.calls += 1
            if self.calls == 12:
                raise KeyboardInterrupt
            return super()._matmat(V)

    with pytest.warns(NotConvergedWarning, match="density interrupted"):
        res = density(Interrupting(A_NN), num_probes=3, lanczos_steps=50, progress=False, on_interrupt="return")
    assert res.interrupted and np.isfinite(res.ritz_values).sum(1).max() == 10
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0)
    with pytest.raises(KeyboardInterrupt) as info:
        density(Interrupting(A_NN), num_probes=3, lanczos_steps=50, progress=False)
    assert info.value.partial.interrupted and info.value.partial.matvecs == 2 + 3 * 10


BLOCKS = {"layer1.weight": slice(0, 120), "layer1.bias": slice(120, 130), "layer2.weight": slice(130, P)}


def test_per_layer_traces_and_top_eigenvalues_exact():
    D = BlockDiagonalOperator(DenseOperator(A_NN), BLOCKS)
    res = per_layer(D, rtol=0.02, progress=False, seed=3)
    for name, s in BLOCKS.items():
        block = A_NN[s, s]
        assert res.top_eigenvalue[name] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-3)
        assert abs(res.trace[name] - float(torch.trace(block))) <= 4 * res.trace_stderr[name] + 1e-9
        assert res.eigen_converged[name] and res.rtol_met[name]
    rows = res.rows()
    assert sorted(r["block"] for r in rows) == sorted(BLOCKS) and "layer1.bias" in res.table()
    json.dumps(res.to_dict())


def test_per_layer_advances_all_blocks_in_one_pass_per_step():
    parent = CountingOperator(A_NN)
    D = BlockDiagonalOperator(parent, BLOCKS)
    res = per_layer(D, trace_probes=30, progress=False)
    # 1 symmetry check + trace passes + one call per Lanczos step, every call carrying the
    # columns of all unfinished blocks; matvecs counts the columns of A
    assert res.trace_matvecs <= 3 * 30 and parent.columns == res.matvecs
    lanczos_columns = res.matvecs - 6 - res.trace_matvecs
    steps = parent.calls - 1 - 3  # one Hutch++ round (sketch and tests, then the basis) and one more pass
    assert steps <= lanczos_columns <= len(BLOCKS) * steps <= 3 * 200


def test_per_layer_uses_blocks_of_a_plain_operator_and_block_diagonal_method():
    plain = DenseOperator(A_NN, blocks=BLOCKS)
    res = per_layer(plain, trace_probes=8, progress=False)
    assert res.names == list(BLOCKS)

    class WithBlockDiagonal(DenseOperator):
        def block_diagonal(self, by="module"):
            return BlockDiagonalOperator(self, {"first": slice(0, 200), "second": slice(200, P)})

    res2 = per_layer(WithBlockDiagonal(A_NN), trace_probes=8, progress=False, density_kwargs={"lanczos_steps": 20})
    assert res2.names == ["first", "second"] and set(res2.densities) == {"first", "second"}


def test_stability_verdicts():
    top, tr = 30.0, float(NN_SPECTRUM.sum())
    unstable = stability(A_NN, lr=0.1, batch_size=1, progress=False)  # 2/lr = 20 < 30
    assert unstable.top_eigenvalue == pytest.approx(top, rel=1e-4)
    assert unstable.gd_ratio == pytest.approx(top * 0.1 / 2, rel=1e-4) and unstable.gd_verdict.startswith("unstable")
    assert unstable.sgd_verdict.startswith("violated")
    edge = stability(A_NN, lr=0.065, batch_size=1, progress=False)  # 2/lr = 30.8
    assert edge.gd_verdict.startswith("edge")
    calm = stability(A_NN, lr=2 / (3 * tr), momentum=0.5, batch_size=1, progress=False)
    assert calm.gd_verdict == "stable" and calm.sgd_verdict.startswith("satisfied")
    assert calm.gd_threshold == pytest.approx(3 / calm.lr)
    json.dumps(calm.to_dict())
    assert "GD :" in repr(calm)
    assert calm.batch_size == 1 and calm.sgd_quantity == pytest.approx(calm.trace)  # B=1: Wu & Su's tr(H)


def test_stability_batch_size_closed_form():
    # diagonal spectrum: lambda_max = 10, tr = 10 + 20*2 = 50; Hutch++ with 3*20 > P probes is exact
    lam, tr = 10.0, 50.0
    op = DenseOperator(torch.diag(torch.tensor([lam] + [2.0] * 20, dtype=torch.float64)))
    common = dict(trace_budget=99, progress=False)
    one = stability(op, lr=0.1, batch_size=1, **common)  # threshold 2/lr = 20
    assert one.sgd_threshold == pytest.approx(20.0) and one.trace == pytest.approx(tr, rel=1e-8)
    assert one.sgd_quantity == pytest.approx(tr, rel=1e-8) and one.sgd_ratio == pytest.approx(2.5, rel=1e-8)
    assert one.sgd_verdict.startswith("violated") and "batch size 1" in one.sgd_verdict
    eight = stability(op, lr=0.1, batch_size=8, **common)  # 50/8 + (7/8) 10 = 15
    assert eight.batch_size == 8 and eight.sgd_quantity == pytest.approx(15.0, rel=1e-8)
    assert eight.sgd_ratio == pytest.approx(0.75, rel=1e-8) and eight.sgd_threshold == pytest.approx(20.0)
    assert eight.sgd_verdict.startswith("satisfied") and "batch size 8" in eight.sgd_verdict
    assert eight.top_eigenvalue == one.top_eigenvalue and eight.gd_ratio == one.gd_ratio  # GD part unchanged
    huge = stability(op, lr=0.1, batch_size=10**9, **common)  # B -> infinity: the GD condition lambda_max <= 2/lr
    assert huge.sgd_quantity == pytest.approx(lam, rel=1e-6) and huge.sgd_ratio == pytest.approx(huge.gd_ratio, rel=1e-6)
    d = eight.to_dict()
    assert d["batch_size"] == 8 and d["sgd_quantity"] == pytest.approx(15.0)
    json.dumps(d)
    assert "SGD (B=8)" in repr(eight)
    with pytest.raises(HesseError):
        stability(op, lr=0.1, batch_size=0, progress=False)
    with pytest.raises(HesseError):
        stability(op, lr=0.1, batch_size=2.5, progress=False)


@pytest.mark.parametrize("B", [1, 4, 32])
def test_stability_batch_size_matches_mean_square_dynamics(B):
    """With equal per-sample gradient norms the formula is exact: E[(I - lr H_B)^2] has spectral
    radius <= 1 exactly when tr/B + (1-1/B) lambda_max <= 2/lr."""
    rng = np.random.default_rng(B)
    n, d = 40, 12
    G = rng.normal(size=(n, d)) * np.linspace(3, 0.3, d)  # anisotropic per-sample gradients g_i
    G *= 1.5 / np.linalg.norm(G, axis=1, keepdims=True)  # equal norms ||g_i||^2 = 2.25 = tr(H)
    H = G.T @ G / n
    Hi2 = sum(np.outer(g, g) @ np.outer(g, g) for g in G) / n  # E[H_i^2]
    EHB2 = (1 - 1 / B) * H @ H + Hi2 / B  # mini-batch of B samples drawn with replacement
    res = stability(DenseOperator(torch.tensor(H)), lr=1.0, batch_size=B, trace_budget=99, progress=False)
    critical = 2 / res.sgd_quantity  # the lr at which sgd_ratio == 1
    for lr, stable in ((0.97 * critical, True), (1.03 * critical, False)):
        M = np.eye(d) - 2 * lr * H + lr**2 * EHB2
        assert (np.linalg.eigvalsh(M).max() <= 1 + 1e-12) == stable


def test_batch_size_sharpness_decreases_with_batch_size():
    d = 30

    def make_op(batch_size, seed):
        X = np.random.default_rng(seed).normal(size=(batch_size, d))
        return torch.tensor(X.T @ X / batch_size)  # sample covariance: its top eigenvalue -> 1

    res = batch_size_sharpness(make_op, [8, 64, 512], repeats=3, progress=False)
    assert res.mean[0] > res.mean[1] > res.mean[2] > 1.0
    # Marchenko-Pastur edge (1 + sqrt(d/B))^2 for the largest batch
    assert res.mean[2] == pytest.approx((1 + np.sqrt(d / 512)) ** 2, rel=0.1)
    assert res.max_stable_lr[2] > res.max_stable_lr[0]
    assert res.fit["c"] > 0
    json.dumps(res.to_dict())


def test_exact_hessian_density_and_trace():
    torch.manual_seed(0)
    X, y = torch.randn(48, 6, dtype=torch.float64), torch.randint(0, 3, (48,))
    shapes = [(24, 6), (24,), (3, 24), (3,)]
    sizes = [int(np.prod(s)) for s in shapes]
    theta0 = torch.cat([0.5 * torch.randn(n, dtype=torch.float64) for n in sizes])

    def loss(theta):
        W1, b1, W2, b2 = [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]
        return torch.nn.functional.cross_entropy(torch.tanh(X @ W1.T + b1) @ W2.T + b2, y)

    H = torch.func.hessian(loss)(theta0)
    op = DenseOperator(H)
    exact_trace = float(torch.trace(H))
    tr = trace(op, "hutch++", budget=90, progress=False)
    assert abs(tr.estimate - exact_trace) <= 3 * tr.stderr
    dens = density(op, num_probes=20, lanczos_steps=60, progress=False)
    assert dens.moment(2) == pytest.approx(float((H * H).sum()) / H.shape[0], rel=0.25)
    assert np.nanmax(dens.ritz_values) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_per_layer_interrupt_keeps_traces():
    class Interrupting(DenseOperator):
        calls = 0

        def _matmat(self, V):
            self.calls += 1
            if self.calls == 8:  # symmetry check, 3 trace passes, then Lanczos steps
                raise KeyboardInterrupt
            return super()._matmat(V)

    D = BlockDiagonalOperator(Interrupting(A_NN), BLOCKS)
    with pytest.warns(NotConvergedWarning, match="per_layer interrupted"):
        res = per_layer(D, trace_probes=16, progress=False, on_interrupt="return")
    assert res.interrupted and not any(res.eigen_converged.values())
    assert all(np.isfinite(v) for v in res.trace.values())
    assert all(np.isfinite(v) for v in res.top_eigenvalue.values())  # Ritz values after 3 steps
    with pytest.raises(KeyboardInterrupt) as info:
        per_layer(BlockDiagonalOperator(Interrupting(A_NN), BLOCKS), trace_probes=16, progress=False)
    partial = info.value.partial
    # products of A: the symmetry check (2 columns x 3 blocks), traces (<= 16), 3 Lanczos steps x 3 blocks
    assert partial.interrupted and partial.matvecs == 6 + partial.trace_matvecs + 9
    assert partial.trace_matvecs <= 3 * 16 and partial.top_eigenvalue == res.top_eigenvalue


def test_per_layer_interrupted_during_traces_has_nan_entries():
    class Interrupting(DenseOperator):
        calls = 0

        def _matmat(self, V):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return super()._matmat(V)

    with pytest.raises(KeyboardInterrupt) as info:
        per_layer(BlockDiagonalOperator(Interrupting(A_NN), BLOCKS), trace_probes=16, progress=False)
    res = info.value.partial
    assert res.interrupted and all(np.isnan(v) for v in res.trace.values())
    assert all(np.isnan(v) for v in res.top_eigenvalue.values())


# one Lanczos serves eigenvalues, SLQ and per_layer ------------------------------------------

def test_slq_with_p_steps_has_the_eigenvalues_as_nodes():
    lams = np.array([-3.0, -1.0, 0.5, 1.0, 2.0, 2.5, 4.0, 5.5, 7.0, 8.0, 9.5, 12.0])
    res = density(sym_matrix(lams, seed=7), num_probes=3, lanczos_steps=len(lams), progress=False)
    for nodes in res.ritz_values:
        np.testing.assert_allclose(np.sort(nodes), lams, atol=1e-8)
    assert res.weights.sum(1) == pytest.approx(np.ones(3))


def test_slq_without_reorthogonalization_keeps_the_moments():
    lams = np.concatenate([[6.0, 5.0], _rng.uniform(0.5, 2.0, P - 2)])
    A = sym_matrix(lams, seed=1)
    full = density(A, num_probes=10, lanczos_steps=30, progress=False)
    plain = density(A, num_probes=10, lanczos_steps=30, progress=False, reorthogonalize=False)
    for order in (1, 2, 3):
        assert plain.moment(order) == pytest.approx(full.moment(order), rel=1e-6)


def test_per_layer_top_eigenvalues_equal_dense_block_eigenvalues():
    D = BlockDiagonalOperator(DenseOperator(A_NN), BLOCKS)
    res = per_layer(D, tol=1e-10, trace_probes=8, progress=False)
    for name, s in BLOCKS.items():
        exact = float(torch.linalg.eigvalsh(A_NN[s, s])[-1])
        assert res.top_eigenvalue[name] == pytest.approx(exact, rel=1e-8)
        assert res.eigen_converged[name]


def test_eigenvalues_slq_and_per_layer_share_the_lanczos_module(monkeypatch):
    from hesse.linalg.lanczos import Lanczos

    used = []
    original = Lanczos._append

    def spy(self, Q):
        used.append(len(self.segments))
        return original(self, Q)

    monkeypatch.setattr(Lanczos, "_append", spy)
    eigenvalues(A_NN, k=2, progress=False)
    assert used and set(used) == {1}  # one recurrence
    used.clear()
    density(A_NN, num_probes=4, lanczos_steps=10, progress=False)
    assert used == [4] * 10  # four probes, one call per step
    used.clear()
    per_layer(BlockDiagonalOperator(DenseOperator(A_NN), BLOCKS), trace_probes=4, progress=False)
    assert used and set(used) == {len(BLOCKS)}  # one recurrence per block


@pytest.mark.parametrize("package", ["hesse.linalg", "hesse.analysis"])
def test_no_module_is_hidden_behind_a_same_named_export(package):
    import importlib

    pkg = importlib.import_module(package)
    known = {"hesse.analysis": {"sharpness", "stability"}}  # analysis modules owned elsewhere, rename pending
    for name in pkg.__all__:
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError:
            continue
        assert inspect_is_module(module)
        if name in known.get(package, ()):
            continue
        assert inspect_is_module(getattr(pkg, name)), f"{package}.{name} is shadowed by a function/class"


def inspect_is_module(obj) -> bool:
    import types

    return isinstance(obj, types.ModuleType)
