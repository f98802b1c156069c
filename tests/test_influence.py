"""Influence functions against dense formulas and leave-one-out retraining (float64, digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hesse.apply.influence import chunk_length, dense_matrix, negative_margin, pairwise, preconditioner, self_influence
from hesse.errors import HesseError
from hesse.examples import load_dataset
from hesse.operators import GGN, Objective
from tests.helpers import dense_ggn, dense_hessian

N_TRAIN, N_QUERY = 200, 6


def _digits(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return data.inputs[offset:offset + n].reshape(n, -1).double(), data.targets[offset:offset + n]


def _fit(model: nn.Module, X: torch.Tensor, y: torch.Tensor, l2: float = 0.0, steps: int = 100) -> nn.Module:
    """Minimise mean cross-entropy + (l2/2)||θ||² with L-BFGS (float64)."""
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss = loss + 0.5 * l2 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model.eval()


@pytest.fixture(scope="module")
def logistic():
    torch.manual_seed(0)
    X, y = _digits(N_TRAIN)
    Xq, yq = _digits(N_QUERY, offset=1000)
    model = _fit(nn.Linear(64, 10).double(), X, y, l2=1e-2, steps=50)
    return model, (X, y), (Xq, yq)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    X, y = _digits(N_TRAIN)
    Xq, yq = _digits(N_QUERY, offset=1000)
    model = _fit(nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double(), X, y, l2=1e-3, steps=60)
    return model, (X, y), (Xq, yq)


def _per_sample(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for x, t in zip(X, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), t[None]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.reshape(-1).numpy(), b.reshape(-1).numpy())[0, 1])


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_exact_equals_dense_formula(mlp, curvature):
    model, (X, y), (Xq, yq) = mlp
    criterion = nn.CrossEntropyLoss()
    C = (dense_ggn if curvature == "ggn" else dense_hessian)(model, criterion, X, y)
    lam = 0.01 * float(C.trace()) / C.shape[0]
    expected = _per_sample(model, Xq, yq) @ torch.linalg.solve(C + lam * torch.eye(C.shape[0]), _per_sample(model, X, y).T)
    scores = pairwise(model, criterion, [(X[:120], y[:120]), (X[120:], y[120:])], (Xq, yq), method="exact",
                      curvature=curvature, chunk_size=64)
    assert scores.shape == (N_QUERY, N_TRAIN)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_identity_is_gradient_dot_products_and_self_influence_is_diagonal(logistic):
    model, (X, y), (Xq, yq) = logistic
    G = _per_sample(model, X, y)
    scores = pairwise(model, nn.CrossEntropyLoss(), (X, y), (X[:5], y[:5]), method="identity")
    torch.testing.assert_close(scores, G[:5] @ G.T)
    selfs = self_influence(model, nn.CrossEntropyLoss(), (X, y), method="exact", chunk_size=50)
    full = pairwise(model, nn.CrossEntropyLoss(), (X, y), (X, y), method="exact")
    torch.testing.assert_close(selfs, full.diagonal())


@pytest.mark.parametrize("method,damping,options", [
    ("cg", 0.01, {}),
    pytest.param("arnoldi", 1.0, {"rank": 100}, marks=pytest.mark.slow),
    ("lissa", 1.0, {"depth": 500}),
])
def test_iterative_methods_agree_with_exact(mlp, method, damping, options):
    """Documented settings (damping relative to the mean eigenvalue tr(C)/P): cg tol 1e-6 at 0.01;
    arnoldi rank 100 and lissa depth 500 need damping 1.0 on this MLP (P = 610): at 0.01 the
    spectrum below the top 100 eigenvalues is not small against λ (correlation 0.62), and
    LiSSA needs about κ = λ_max/λ ≈ 10⁴ steps."""
    model, (X, y), (Xq, yq) = mlp
    exact = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="exact", damping=damping)
    approx = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method=method, damping=damping, **options)
    assert _corr(approx, exact) > 0.99


def test_iterative_preconditioner_reports_residual(mlp):
    """cg records the largest relative residual of its last solve; a capped run says it did not converge."""
    model, (X, y), (Xq, yq) = mlp
    objective = Objective(model, nn.CrossEntropyLoss(), (X, y))
    G = _per_sample(model, Xq, yq).T
    inverse = preconditioner(objective, "cg", 0.01)
    X_cg = inverse.apply(G)
    C = dense_matrix(GGN(objective))
    true = ((G - C @ X_cg - inverse.damping * X_cg).norm(dim=0) / G.norm(dim=0)).max()
    assert inverse.info["converged"] and inverse.info["max_residual"] <= 1e-6
    assert float(true) < 1e-5 and inverse.info["matvecs"] > 0
    capped = preconditioner(objective, "cg", 0.01, maxiter=3)
    with pytest.warns(UserWarning, match="did not reach"):
        capped.apply(G)
    assert not capped.info["converged"] and capped.info["max_residual"] > 1e-3


def test_measurement_margin_equals_dense_formula(mlp):
    """``measurement=negative_margin``: the query gradients are those of ``log Σ_{k≠y} e^{o_k} − o_y``."""
    model, (X, y), (Xq, yq) = mlp
    rows = []
    for x, t in zip(Xq, yq):
        model.zero_grad()
        out = model(x[None])[0]
        others = torch.cat([out[:t], out[t + 1:]])
        (others.logsumexp(0) - out[t]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    exact = preconditioner(Objective(model, nn.CrossEntropyLoss(), (X, y)), "exact", 0.01)
    expected = torch.stack(rows) @ exact.apply(_per_sample(model, X, y).T)
    scores = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), inverse=exact, measurement=negative_margin)
    torch.testing.assert_close(scores, expected)
    same = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), inverse=exact, measurement=nn.CrossEntropyLoss())
    torch.testing.assert_close(same, pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), inverse=exact))


def test_ekfac_exact_for_one_linear_layer_and_one_sample():
    torch.manual_seed(1)
    model = nn.Linear(5, 3).double()
    X, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([2])
    Xq, yq = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    exact = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="exact")
    ekfac = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="ekfac")
    torch.testing.assert_close(ekfac, exact, rtol=1e-8, atol=1e-10)


def test_relative_damping_and_refusals(logistic):
    model, (X, y), _ = logistic
    objective = Objective(model, nn.CrossEntropyLoss(), (X, y))
    C = dense_matrix(GGN(objective))
    inverse = preconditioner(objective, "exact", 0.1)
    assert inverse.damping == pytest.approx(0.1 * float(C.trace()) / C.shape[0])
    assert preconditioner(objective, "exact", 0.1, relative_damping=False).damping == 0.1
    with pytest.raises(HesseError, match="P <= 10"):
        dense_matrix(GGN(objective), limit=10)
    with pytest.raises(HesseError, match="not the Hessian"):
        preconditioner(objective, "kfac", curvature="hessian")
    with pytest.raises(HesseError, match="unknown influence method"):
        preconditioner(objective, "magic")
    with pytest.raises(HesseError, match=r"\['rank'\] do not apply to method='exact'"):
        preconditioner(objective, "exact", rank=50)  # was silently ignored
    with pytest.raises(HesseError, match="do not apply to method='cg'"):
        pairwise(model, nn.CrossEntropyLoss(), (X, y), (X[:2], y[:2]), method="cg", depth=10)
    assert chunk_length(1000, None, memory=240_000) == 10


def test_dict_batches_and_forward_hook(logistic):
    model, (X, y), (Xq, yq) = logistic

    def forward(m, batch):
        return m(batch["x"]), batch["y"]

    plain = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="identity")
    dicts = pairwise(model, nn.CrossEntropyLoss(), [{"x": X, "y": y}], [{"x": Xq, "y": yq}], method="identity",
                     forward=forward)
    torch.testing.assert_close(dicts, plain)


def test_memmap_resume_after_interrupt(logistic, tmp_path, monkeypatch):
    model, (X, y), (Xq, yq) = logistic
    full = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="exact")
    out = tmp_path / "scores.npy"
    import hesse.apply.influence as influence

    calls = {"n": 0}
    original = influence.Objective.per_sample_gradients

    def flaky(self, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # 1 query chunk, then train chunks 1-2 succeed, chunk 3 is interrupted
            raise KeyboardInterrupt
        return original(self, batch, **kwargs)

    monkeypatch.setattr(influence.Objective, "per_sample_gradients", flaky)
    with pytest.raises(KeyboardInterrupt) as info:
        pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="exact", chunk_size=50, out=out)
    partial = info.value.partial
    torch.testing.assert_close(partial[:, :100], full[:, :100])
    assert bool(partial[:, 100:].isnan().all())
    monkeypatch.setattr(influence.Objective, "per_sample_gradients", original)
    with pytest.raises(HesseError, match="resume=True"):
        pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="exact", out=out)
    resumed = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="exact", chunk_size=50, out=out,
                       resume=True)
    torch.testing.assert_close(resumed, full)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), full)


def test_resume_checks_the_settings_of_a_given_inverse(logistic, tmp_path):
    """With ``inverse=``, the store records that inverse's method and damping (not the unused defaults),
    so resuming with another inverse is refused instead of mixing scores of two inverses."""
    model, (X, y), (Xq, yq) = logistic
    objective = Objective(model, nn.CrossEntropyLoss(), (X, y))
    out = tmp_path / "scores.npy"
    pairwise(objective, query_data=(Xq, yq), inverse=preconditioner(objective, "exact", 0.1), out=out)
    with pytest.raises(HesseError, match="settings differ"):
        pairwise(objective, query_data=(Xq, yq), inverse=preconditioner(objective, "kfac", 0.1), out=out, resume=True)
    with pytest.raises(HesseError, match="measurement"):
        pairwise(objective, query_data=(Xq, yq), inverse=preconditioner(objective, "exact", 0.1), out=out, resume=True,
                 measurement=negative_margin)


@pytest.mark.slow
def test_leave_one_out_retraining_matches_prediction():
    """L2-regularised logistic regression: predicted vs actual test-loss change without each of 60 examples.

    Training loss ``Σ_i ℓ_i + (nα/2)||θ||²`` (mean CE + (α/2)||θ||², the regulariser kept when z
    leaves, i.e. l2 = nα/(n-1) on the mean over n-1): its Hessian is ``n (C + αI)``, so the
    predicted change of the test loss when z is removed is ``score(q, z) / n`` with λ = α."""
    alpha, n = 1e-2, N_TRAIN
    X, y = _digits(n)
    Xq, yq = _digits(1, offset=1500)
    torch.manual_seed(0)
    model = _fit(nn.Linear(64, 10).double(), X, y, l2=alpha, steps=500)
    base = nn.functional.cross_entropy(model(Xq), yq).item()
    scores = pairwise(model, nn.CrossEntropyLoss(), (X, y), (Xq, yq), method="exact", damping=alpha,
                      relative_damping=False)[0]
    chosen = torch.argsort(scores.abs(), descending=True)[:30].tolist() + list(range(30))
    actual = []
    for i in chosen:
        keep = torch.arange(n) != i
        retrained = _fit(_copy(model), X[keep], y[keep], l2=alpha * n / (n - 1), steps=200)
        actual.append(nn.functional.cross_entropy(retrained(Xq), yq).item() - base)
    predicted = scores[chosen] / n
    corr = _corr(predicted, torch.tensor(actual))
    print(f"leave-one-out Pearson correlation over {len(chosen)} examples: {corr:.4f}")
    assert corr > 0.9


def _copy(model: nn.Module) -> nn.Module:
    clone = nn.Linear(64, 10).double()
    clone.load_state_dict(model.state_dict())
    return clone
