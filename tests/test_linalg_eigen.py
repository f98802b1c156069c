"""Extreme eigenpairs (hesse.linalg.eigenvalues) against exact spectra."""

import numpy as np
import pytest
import torch

from hesse.errors import NotConvergedWarning
from hesse.linalg import EigenResult, eigenvalues
from hesse.operators import DenseOperator, LinearOperator
from tests.helpers import sym_matrix

P = 400


_rng = np.random.default_rng(0)
SPECTRA = {
    "clustered": np.concatenate([1 + 0.02 * np.arange(6), _rng.uniform(0, 0.8, P - 6)]),
    "negative": np.concatenate([[-20, -15, -10, -9, -8], _rng.uniform(-2, 5, P - 5)]),
    "big_gap": np.concatenate([[100, 90, 80, 70, 60], _rng.uniform(-1, 1, P - 5)]),
    "no_gap": np.linspace(-1, 1, P),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_top5_bottom5_default_settings(name, which):
    lams = SPECTRA[name]
    A = sym_matrix(lams)
    res = eigenvalues(A, k=5, which=which, progress=False)
    exact = np.sort(lams)[::-1][:5] if which == "largest" else np.sort(lams)[:5]
    rel = np.abs(res.values.numpy() - exact) / np.abs(exact)
    assert rel.max() < 1e-3, (name, which, res.values, exact)
    assert bool(res.converged.all())
    # sorted as documented, residuals honest, error bounds honest and within tol, vectors orthonormal
    vals = res.values.numpy()
    assert np.all(np.diff(vals) <= 0) if which == "largest" else np.all(np.diff(vals) >= 0)
    true_res = (A @ res.vectors - res.vectors * res.values).norm(dim=0)
    assert torch.allclose(true_res, res.residuals, atol=1e-8)
    bounds = res.error_bounds.numpy()
    assert np.all(np.abs(vals - exact) <= bounds) and np.all(bounds <= 1e-3 * np.abs(vals))
    assert np.all(bounds <= res.residuals.numpy() + 1e-300)
    assert torch.allclose(res.vectors.T @ res.vectors, torch.eye(5, dtype=torch.float64), atol=1e-8)


def test_magnitude_sorted_by_absolute_value():
    lams = SPECTRA["negative"]
    res = eigenvalues(sym_matrix(lams), k=3, which="magnitude", tol=1e-6, progress=False)
    exact = lams[np.argsort(-np.abs(lams))][:3]
    np.testing.assert_allclose(res.values.numpy(), exact, rtol=1e-6)


def test_no_ghosts_distinct_values_stay_distinct():
    # well separated top values: every returned value is a different eigenvalue
    lams = np.concatenate([[10, 9, 8, 7, 6, 5, 4, 3], _rng.uniform(0, 1, P - 8)])
    res = eigenvalues(sym_matrix(lams, seed=3), k=8, tol=1e-6, progress=False, ncv=16)  # forces restarts
    np.testing.assert_allclose(res.values.numpy(), [10, 9, 8, 7, 6, 5, 4, 3], rtol=1e-6)


@pytest.mark.parametrize("block_size, mult", [(1, 2), (1, 3), (2, 2), (3, 3)])
def test_multiplicity_reported_honestly(block_size, mult):
    lams = np.concatenate([[5.0] * mult + [4.0], _rng.uniform(0, 2, P - mult - 1)])
    res = eigenvalues(sym_matrix(lams, seed=1), k=mult + 1, block_size=block_size, tol=1e-6, progress=False)
    np.testing.assert_allclose(res.values.numpy(), [5.0] * mult + [4.0], rtol=1e-6)
    # the copies come with orthonormal eigenvectors, not one vector twice
    gram = res.vectors.T @ res.vectors
    torch.testing.assert_close(gram, torch.eye(mult + 1, dtype=torch.float64), atol=1e-6, rtol=0)


def test_power_iteration_agrees_with_lanczos():
    lams = np.concatenate([[-12.0, 10, 7], _rng.uniform(-1, 5, P - 3)])
    A = sym_matrix(lams, seed=2)
    for which in ["largest", "smallest", "magnitude"]:
        lan = eigenvalues(A, k=2, which=which, progress=False)
        pw = eigenvalues(A, k=2, which=which, method="power", progress=False, max_matvecs=5000)
        np.testing.assert_allclose(pw.values.numpy(), lan.values.numpy(), rtol=1e-3)
        assert pw.method == "power" and bool(pw.converged.all())


def test_warm_start_uses_fewer_products():
    lams = np.concatenate([[3.0, 2.5, 2.2], _rng.uniform(0, 2, P - 3)])
    A = sym_matrix(lams, seed=4)
    cold = eigenvalues(A, k=1, tol=1e-7, progress=False)
    # a training monitor: the matrix moved slightly since the last call
    A2 = A + 1e-3 * sym_matrix(_rng.normal(size=P), seed=5)
    cold2 = eigenvalues(A2, k=1, tol=1e-7, progress=False, seed=1)
    warm2 = eigenvalues(A2, k=1, tol=1e-7, v0=cold.vectors[:, 0], progress=False)
    assert warm2.matvecs < cold2.matvecs
    assert abs(float(warm2.values[0] - cold2.values[0])) < 1e-6
    warm_power = eigenvalues(A2, k=1, method="power", v0=cold.vectors, progress=False)
    cold_power = eigenvalues(A2, k=1, method="power", progress=False)
    assert warm_power.matvecs < cold_power.matvecs


def test_small_operator_uses_dense_path_k_up_to_p():
    lams = np.arange(1.0, 13.0)
    res = eigenvalues(sym_matrix(lams), k=12, which="smallest", progress=False)
    np.testing.assert_allclose(res.values.numpy(), lams, rtol=1e-10)
    assert res.method == "dense" and res.matvecs == 12 + 2


def test_float32_operator():
    lams = SPECTRA["big_gap"]
    res = eigenvalues(sym_matrix(lams).float(), k=3, progress=False)
    np.testing.assert_allclose(res.values.numpy(), [100, 90, 80], rtol=1e-4)
    assert res.vectors.dtype == torch.float32


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_unconverged_warns_and_marks(method):
    A = sym_matrix(SPECTRA["no_gap"])
    with pytest.warns(NotConvergedWarning, match="did not reach tol"):
        res = eigenvalues(A, k=3, max_matvecs=10, method=method, progress=False)
    assert not bool(res.converged.any())
    # the reported residuals are the true ones, even when stopped early
    true_res = (A @ res.vectors - res.vectors * res.values).norm(dim=0)
    torch.testing.assert_close(true_res, res.residuals, atol=1e-10, rtol=1e-6)


class InterruptingOperator(LinearOperator):
    """Raises KeyboardInterrupt on the n-th product, as Ctrl-C would."""

    def __init__(self, matrix, n):
        self.inner, self.n, self.calls = DenseOperator(matrix), n, 0
        self.shape, self.dtype, self.device = self.inner.shape, self.inner.dtype, self.inner.device

    def _matmat(self, V):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner._matmat(V)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_keyboard_interrupt_returns_partial_result(method):
    op = InterruptingOperator(sym_matrix(SPECTRA["no_gap"]), n=15)
    with pytest.warns(NotConvergedWarning, match="interrupted"):
        res = eigenvalues(op, k=2, method=method, progress=False, on_interrupt="return")
    assert res.interrupted and not bool(res.converged.any())
    assert len(res.values) >= 1 and float(res.values[0]) <= 1.0 + 1e-9


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_keyboard_interrupt_reraises_with_partial_result(method):
    op = InterruptingOperator(sym_matrix(SPECTRA["no_gap"]), n=15)
    with pytest.raises(KeyboardInterrupt) as info:
        eigenvalues(op, k=2, method=method, progress=False)
    res = info.value.partial
    assert res.interrupted and not bool(res.converged.any()) and res.method == method
    assert len(res.values) >= 1 and float(res.values[0]) <= 1.0 + 1e-9


def test_keyboard_interrupt_of_the_dense_path():
    op = InterruptingOperator(sym_matrix(np.arange(1.0, 13.0)), n=2)  # symmetry check, then the matrix
    with pytest.raises(KeyboardInterrupt) as info:
        eigenvalues(op, k=3, progress=False)
    assert info.value.partial.interrupted and len(info.value.partial.values) == 0


def test_result_to_dict_and_repr():
    res = eigenvalues(sym_matrix(SPECTRA["big_gap"]), k=2, progress=False)
    d = res.to_dict()
    assert d["values"] == pytest.approx([100, 90]) and "vectors" not in d
    assert "EigenResult(largest" in repr(res)
    assert isinstance(res, EigenResult)


def test_exact_hessian_of_small_tanh_mlp():
    torch.manual_seed(0)
    X, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    shapes = [(32, 8), (32,), (32, 32), (32,), (3, 32), (3,)]  # 1443 parameters
    sizes = [int(np.prod(s)) for s in shapes]
    theta0 = torch.cat([0.5 * torch.randn(n, dtype=torch.float64) for n in sizes])

    def loss(theta):
        W1, b1, W2, b2, W3, b3 = [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]
        h = torch.tanh(torch.tanh(X @ W1.T + b1) @ W2.T + b2)
        return torch.nn.functional.cross_entropy(h @ W3.T + b3, y)

    H = torch.func.hessian(loss)(theta0)
    exact = torch.linalg.eigvalsh(H).numpy()
    op = DenseOperator(H)
    top = eigenvalues(op, k=3, progress=False)
    bottom = eigenvalues(op, k=2, which="smallest", progress=False)
    np.testing.assert_allclose(top.values.numpy(), exact[::-1][:3], rtol=1e-3)
    np.testing.assert_allclose(bottom.values.numpy(), exact[:2], rtol=1e-3)
    assert exact[0] < 0  # a saddle: negative curvature is found


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_warm_start_in_a_wrong_invariant_subspace_still_finds_the_top(method):
    """A start spanned by eigenvectors that miss the top one must not return a wrong 'top'."""
    A = torch.diag(torch.tensor([10.0, 5, 4, 3] + [1.0] * 96, dtype=torch.float64))
    v0 = torch.zeros(100, dtype=torch.float64)
    v0[1:4] = 1.0
    res = eigenvalues(A, k=1, v0=v0, method=method, progress=False)
    assert abs(float(res.values[0]) - 10.0) < 1e-3 and bool(res.converged[0])
