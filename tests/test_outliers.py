"""bulk_outlier_split: one ratio rule on eigenvalues and on SLQ densities, and an honest "none"."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from hesse.analysis import bulk_outlier_split
from hesse.analysis.spectrum import OutlierSplit
from hesse.errors import HesseError
from hesse.linalg import density, eigenvalues, trace
from hesse.operators import DenseOperator
from tests.helpers import dense_hessian, sym_matrix

P = 300
_rng = np.random.default_rng(1)
# C - 1 = 9 outliers 2.6 ... 1.1 over a bulk below 0.5 with negative eigenvalues down to -0.6
CLASS_SPECTRUM = np.concatenate([np.linspace(2.6, 1.1, 9), np.clip(_rng.normal(0.0, 0.15, P - 9), -0.6, 0.48)])
A_CLASS = sym_matrix(CLASS_SPECTRUM, seed=2)
BULK_ONLY = sym_matrix(_rng.normal(0.1, 0.2, P), seed=3)


def test_nine_outliers_from_eigenvalues_density_and_exact_values_agree():
    exact = bulk_outlier_split(CLASS_SPECTRUM)
    eig = bulk_outlier_split(eigenvalues(A_CLASS, k=25, progress=False))
    dens = bulk_outlier_split(density(A_CLASS, num_probes=4, lanczos_steps=40, progress=False))
    for split in (exact, eig, dens):
        assert split.num_outliers == 9
        np.testing.assert_allclose(split.outliers, CLASS_SPECTRUM[:9], rtol=1e-6)
        assert split.bulk_edge == pytest.approx(CLASS_SPECTRUM[9:].max(), rel=1e-6)
        assert split.gap_ratio == pytest.approx(1.1 / CLASS_SPECTRUM[9:].max(), rel=1e-5)
        assert "9 outlier(s)" in split.reason
    json.dumps(eig.to_dict())


def test_negative_eigenvalues_do_not_hide_the_outliers():
    """The former rule (gap over the spread down to the most negative value) found none here."""
    lams = CLASS_SPECTRUM.copy()
    lams[-20:] = np.linspace(-3.0, -1.0, 20)  # a saddle: large negative curvature
    gap_over_full_spread = (lams[8] - lams[9]) / (lams[9] - lams.min())
    assert gap_over_full_spread < 1  # what the former rule compared with 1
    assert bulk_outlier_split(lams).num_outliers == 9
    dens = density(sym_matrix(lams, seed=4), num_probes=4, lanczos_steps=50, progress=False)
    assert bulk_outlier_split(dens).num_outliers == 9


def test_trace_share_of_the_outliers():
    total = float(CLASS_SPECTRUM.sum())
    split = bulk_outlier_split(eigenvalues(A_CLASS, k=25, progress=False), trace=total)
    assert split.trace_share == pytest.approx(CLASS_SPECTRUM[:9].sum() / total, rel=1e-6)
    with_result = bulk_outlier_split(CLASS_SPECTRUM, trace=trace(A_CLASS, budget=P, progress=False))
    assert with_result.trace_share == pytest.approx(split.trace_share, rel=1e-8)  # P <= budget: exact trace
    dens = bulk_outlier_split(density(A_CLASS, num_probes=20, lanczos_steps=40, progress=False))
    assert dens.trace_share == pytest.approx(split.trace_share, rel=0.25)  # quadrature estimate
    assert bulk_outlier_split(CLASS_SPECTRUM).trace_share is None  # no trace known


def test_a_bulk_without_outliers_says_so():
    for split in (bulk_outlier_split(eigenvalues(BULK_ONLY, k=12, progress=False)),
                  bulk_outlier_split(density(BULK_ONLY, num_probes=4, lanczos_steps=60, progress=False))):
        assert split.num_outliers == 0 and split.outliers == [] and split.bulk_edge is None
        assert split.reason.startswith("no clear separation") and split.gap_ratio < 1.5
    even = bulk_outlier_split(np.linspace(0, 1, 30))  # evenly down to zero: no gap stands out
    assert even.num_outliers == 0 and math.isnan(even.gap_ratio) and "median spacing" in even.reason
    assert bulk_outlier_split([-1.0, -2.0, -3.0]).reason.endswith("no positive eigenvalue stands above a bulk")
    json.dumps(even.to_dict())
    assert "bulk_edge=None" in repr(even)


def test_low_rank_nonzero_eigenvalues_are_the_outliers():
    split = bulk_outlier_split([5.0, 4.0, 3.0] + [1e-15] * 20 + [-1e-15] * 5)
    assert split.num_outliers == 3 and split.bulk_edge == pytest.approx(0, abs=1e-14)


def test_unconverged_ritz_values_are_not_used_and_the_reason_says_what_to_do():
    split = bulk_outlier_split(density(A_CLASS, num_probes=4, lanczos_steps=20, progress=False))
    assert split.num_outliers == 0 and split.values_used <= 9
    assert "lanczos_steps" in split.reason and "eigenvalues(op, k=" in split.reason
    one_probe = bulk_outlier_split(density(A_CLASS, num_probes=1, lanczos_steps=40, progress=False))
    assert one_probe.num_outliers == 0 and one_probe.values_used == 0  # nothing to agree with


def test_eigen_result_uses_converged_values_only_and_refuses_smallest():
    eig = eigenvalues(A_CLASS, k=25, progress=False)
    eig.converged[9:] = False  # pretend the bulk edge did not converge
    assert bulk_outlier_split(eig).values_used == 9
    with pytest.raises(HesseError, match="largest"):
        bulk_outlier_split(eigenvalues(A_CLASS, k=3, which="smallest", progress=False))
    with pytest.raises(HesseError, match="at least 3 eigenvalues"):
        bulk_outlier_split(torch.tensor([2.0, 1.0]))
    assert isinstance(bulk_outlier_split(eig), OutlierSplit)


def test_max_outliers_and_min_ratio():
    assert bulk_outlier_split(CLASS_SPECTRUM, max_outliers=5).num_outliers == 0  # the gap lies beyond
    assert bulk_outlier_split(CLASS_SPECTRUM, min_ratio=3.0).num_outliers == 0
    with pytest.raises(HesseError, match="min_ratio"):
        bulk_outlier_split(CLASS_SPECTRUM, min_ratio=0)


def _trained_digits_mlp():
    """A ReLU 64-16-10 MLP trained full-batch on 600 digits (float64): loss about 0.2."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:600] / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target[:600])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
    return model, X, y, float(loss)


def test_trained_mlp_count_matches_its_exact_hessian():
    model, X, y, loss = _trained_digits_mlp()
    assert loss < 0.5
    H = dense_hessian(model, nn.CrossEntropyLoss(), X, y)  # 1210 x 1210
    exact = torch.linalg.eigvalsh(H).flip(0)
    truth = bulk_outlier_split(exact[:30], trace=float(exact.sum()))
    assert truth.num_outliers == 9  # C - 1 class outliers (Papyan 2019)
    assert truth.trace_share > 0.7
    op = DenseOperator(H)
    eig = bulk_outlier_split(eigenvalues(op, k=30, progress=False))
    dens = bulk_outlier_split(density(op, num_probes=4, lanczos_steps=60, progress=False))
    assert eig.num_outliers == dens.num_outliers == truth.num_outliers
    np.testing.assert_allclose(dens.outliers, truth.outliers, rtol=1e-6)
    assert dens.trace_share == pytest.approx(truth.trace_share, rel=0.3)
