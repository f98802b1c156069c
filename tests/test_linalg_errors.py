"""Every bad input of the spectral estimators raises a HesseError that names the fix."""

import numpy as np
import pytest
import torch

from hesse.analysis import batch_size_sharpness, bulk_outlier_split, per_layer, stability
from hesse.linalg import density
from hesse.errors import HesseError
from hesse.linalg import diagonal, eigenvalues, frobenius_norm, trace
from hesse.operators import LinearOperator

P = 50


A = torch.diag(torch.linspace(1, 2, P, dtype=torch.float64))


class DiagonalOp(LinearOperator):
    """A cheap large operator: multiplication by a diagonal."""

    def __init__(self, d):
        self.d = d
        self.shape, self.dtype, self.device = (len(d), len(d)), d.dtype, d.device

    def _matmat(self, V):
        return self.d[:, None] * V


class Rectangular(LinearOperator):
    shape, dtype, device = (3, 4), torch.float64, torch.device("cpu")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: eigenvalues(A, k=P + 1), "at most 50"),
        (lambda: eigenvalues(A, k=0), "positive integer"),
        (lambda: eigenvalues(A, k=2.5), "positive integer"),
        (lambda: eigenvalues(A, tol=0), "tol must be a positive number"),
        (lambda: eigenvalues(A, tol=-1e-3), "tol must be a positive number"),
        (lambda: eigenvalues(A, which="top"), "choose one of 'largest'"),
        (lambda: eigenvalues(A, method="arnoldi"), "choose one of 'lanczos'"),
        (lambda: eigenvalues(A, max_matvecs=0), "max_matvecs"),
        (lambda: eigenvalues(A, v0=torch.ones(P + 1)), r"v0 must have shape \[50\]"),
        (lambda: eigenvalues(A, v0=torch.zeros(P)), "nonzero start vector"),
        (lambda: eigenvalues(DiagonalOp(torch.ones(5000, dtype=torch.float64)), k=2500), "ask for fewer"),
        (lambda: trace(A, budget=0), "budget must be a positive integer"),
        (lambda: trace(A, budget=-5), "budget must be a positive integer"),
        (lambda: trace(A, method="hutch+"), "choose one of 'hutch\\+\\+'"),
        (lambda: trace(A, distribution="normal"), "choose one of 'rademacher'"),
        (lambda: trace(A, "hutch++", budget=2), "needs budget >= 3"),
        (lambda: trace(A, "xtrace", budget=3), "needs budget >= 4"),
        (lambda: trace(A, rtol=0), "rtol must be a positive number"),
        (lambda: trace(A, "hutch++", rtol=0.01, max_matvecs=0), "max_matvecs must be a positive integer"),
        (lambda: eigenvalues(A, block_size=0), "block_size must be a positive integer"),
        (lambda: trace(torch.diag(torch.tensor([1.0, 2.0] + [0.0] * 48, dtype=torch.float64)), "xtrace", budget=20),
         "rank deficient"),
        (lambda: diagonal(A, method="bekas"), "choose one of 'hutchinson'"),
        (lambda: diagonal(A, budget=0), "budget must be a positive integer"),
        (lambda: frobenius_norm(A, budget=1), "budget >= 2"),
        (lambda: trace(Rectangular()), "must be square"),
        (lambda: eigenvalues(torch.ones(3, 4)), "must be square"),
        (lambda: trace("not a matrix"), "cannot use a str"),
        (lambda: density(A, num_probes=0), "num_probes must be a positive integer"),
        (lambda: density(A, sigma=0), "sigma must be a positive number"),
        (lambda: density(A, grid_size=5), "at least 10 points"),
        (lambda: per_layer(A, trace_probes=1), "at least 2"),
        (lambda: stability(A, lr=0), "lr must be a positive number"),
        (lambda: stability(A, lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda: batch_size_sharpness(A, [8]), "make_op must be a callable"),
        (lambda: batch_size_sharpness(lambda b: A, []), "non-empty list of positive integers"),
        (lambda: batch_size_sharpness(lambda b: A, [0, 8]), "non-empty list of positive integers"),
        (lambda: bulk_outlier_split([1.0, 2.0]), "at least 3 eigenvalues"),
    ],
)
def test_bad_input_raises_hesse_error(call, match):
    with pytest.raises(HesseError, match=match):
        call()


NONSYM = A + 0.1 * torch.triu(torch.ones(P, P, dtype=torch.float64), 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda **kw: eigenvalues(NONSYM, progress=False, max_matvecs=30, **kw),
        lambda **kw: trace(NONSYM, progress=False, **kw),
        lambda **kw: diagonal(NONSYM, progress=False, **kw),
        lambda **kw: frobenius_norm(NONSYM, progress=False, **kw),
        lambda **kw: density(NONSYM, progress=False, lanczos_steps=5, **kw),
    ],
)
@pytest.mark.filterwarnings("ignore::hesse.errors.NotConvergedWarning")
def test_non_symmetric_operator_is_rejected_unless_allowed(call):
    with pytest.raises(HesseError, match="not symmetric.*check_symmetric=False"):
        call()
    call(check_symmetric=False)  # the user may accept the asymmetry


def test_symmetry_check_tolerates_float32_round_off():
    B = torch.randn(P, P)
    S = (B + B.T) / 2
    S = S + 1e-7 * torch.randn(P, P)  # round-off-sized asymmetry
    res = eigenvalues(S, progress=False)
    assert np.isfinite(float(res.values[0]))
