"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos and power iteration.

Lanczos here is the Rayleigh-Ritz form of (block) Lanczos with full reorthogonalisation
(classical Gram-Schmidt twice, "twice is enough", Giraud et al. 2005): the basis ``V`` and
its products ``W = A V`` are kept, the projected matrix ``H = V^T A V`` is exact, and the
space grows by the Ritz residuals ``A y - theta y`` (which for a Krylov space all point
along the next Lanczos vector, so with ``block_size=1`` this *is* Lanczos). When the
basis reaches ``ncv`` columns it is thick-restarted (Wu & Simon 2000; Stathopoulos, Saad &
Wu 1998): only the wanted Ritz vectors are kept. Because ``V`` stays orthonormal there are
no ghost (spurious duplicate) eigenvalues, and every returned residual is computed
exactly from ``W``, so ``.converged`` is honest: ``|theta - lambda| <= residual`` for some
eigenvalue ``lambda`` (Bauer-Fike / Kahan bound for symmetric matrices).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg._common import (
    check_choice,
    check_positive,
    make_progress,
    orthonormalize_against,
    prepare_operator,
)
from hesse.operators import LinearOperator
from hesse.results import EigenResult

WHICH = ("largest", "smallest", "magnitude")
METHODS = ("lanczos", "power")
DENSE_LIMIT = 4096


def eigenvalues(
    op,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    method: str = "lanczos",
    v0: torch.Tensor | None = None,
    block_size: int = 1,
    ncv: int | None = None,
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool = True,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator.

    ``which``: ``"largest"`` (algebraic, values descending), ``"smallest"`` (algebraic,
    ascending; negative eigenvalues at saddle points) or ``"magnitude"`` (largest
    ``|lambda|``, descending in ``|lambda|``).

    A pair counts as converged when ``||A v - theta v|| <= max(tol * |theta|, 10 eps ||A||)``,
    so each converged value is within relative error ``tol`` of an eigenvalue (usually far
    better: the error is about ``residual^2 / gap``). Unconverged pairs raise a
    :class:`NotConvergedWarning` and are marked in ``.converged``.

    ``method="lanczos"`` (default): thick-restart (block) Lanczos, basis at most ``ncv``
    columns (default ``max(2k + 10, 30, k + 8 block_size)``; the basis and its products take
    ``2 ncv P`` numbers). ``block_size`` vectors go into
    each product (one data pass): single-vector Lanczos (default 1) uses the fewest
    products; a block of ``m`` is guaranteed to find every copy of an eigenvalue of
    multiplicity up to ``m`` and needs fewer passes, at more products in total. (A single
    start vector sees one direction per eigenspace; the other copies enter through the
    fresh directions added once pairs converge, which found them in all our tests.)
    ``method="power"``: power iteration with deflation, stopping on the same residual rule.
    ``v0`` (``[P]`` or ``[P, m]``) warm-starts either method, e.g. with last step's eigenvectors.
    ``max_matvecs`` caps the single-vector products (default 2000 + 100 k). If ``P`` is
    at most ``ncv``, the matrix is formed from ``P`` products and solved densely.
    Ctrl-C returns the Ritz pairs found so far, marked unconverged and ``interrupted``.
    """
    check_choice("which", which, WHICH)
    check_choice("method", method, METHODS)
    check_positive("k", k, integer=True)
    check_positive("tol", tol)
    if max_matvecs is not None:
        check_positive("max_matvecs", max_matvecs, integer=True)
    check_positive("block_size", block_size, integer=True)
    if ncv is not None:
        check_positive("ncv", ncv, integer=True)
    op, used = prepare_operator(op, check_symmetric, seed)
    P = op.size
    if k > P:
        raise HesseError(f"k={k} exceeds the dimension P={P}; ask for at most {P} eigenvalues.")
    b = block_size
    ncv = min(P, ncv if ncv is not None else max(2 * k + 10, 30, k + 8 * b))
    if ncv < k + 2 * b and ncv < P:
        raise HesseError(f"ncv={ncv} is too small for k={k}, block_size={b}; use ncv >= {k + 2 * b}.")
    max_matvecs = max_matvecs if max_matvecs is not None else 2000 + 100 * k
    gen = torch.Generator().manual_seed(seed)
    V0 = _check_v0(v0, op)
    if V0 is not None:
        V0 = _perturb_start(V0, gen, op)

    with make_progress(None, f"eigenvalues ({method})", progress) as bar:
        if ncv >= P or k + 2 * b > P:
            if P > DENSE_LIMIT:
                raise HesseError(
                    f"k={k} is too close to P={P} for a matrix-free solver and P is too large to "
                    f"form the matrix (> {DENSE_LIMIT}); ask for fewer eigenvalues (k <= {(P - 10) // 2})."
                )
            result = _dense(op, k, which, bar)
        elif method == "lanczos":
            result = _lanczos(op, k, which, tol, max_matvecs, V0, b, ncv, gen, bar)
        else:
            result = _power(op, k, which, tol, max_matvecs, V0, gen, bar)
    result.matvecs += used
    if not result.interrupted and not result.all_converged:
        warnings.warn(
            f"eigenvalues: {int((~result.converged).sum())} of {len(result.converged)} eigenpairs "
            f"({k} requested) did "
            f"not reach tol={tol:g} within max_matvecs={max_matvecs} (largest residual "
            f"{float(result.residuals.max()):.2e}); raise max_matvecs or tol"
            + (", or use method='lanczos' (faster)." if method == "power" else ", or raise ncv."),
            NotConvergedWarning,
            stacklevel=2,
        )
    return result


def _check_v0(v0, op: LinearOperator) -> torch.Tensor | None:
    if v0 is None:
        return None
    V0 = torch.as_tensor(v0)
    if V0.ndim == 1:
        V0 = V0[:, None]
    if V0.ndim != 2 or V0.shape[0] != op.size or V0.shape[1] == 0:
        raise HesseError(
            f"v0 must have shape [{op.size}] or [{op.size}, m], got {list(torch.as_tensor(v0).shape)}; "
            "pass e.g. the previous result's .vectors."
        )
    if not torch.isfinite(V0).all() or float(V0.norm()) == 0:
        raise HesseError("v0 is zero or not finite; pass a nonzero start vector or v0=None.")
    return V0.detach().to(op.dtype).to(op.device)


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` from most to least wanted."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _threshold(theta: np.ndarray, anorm: float, tol: float, dtype: torch.dtype) -> np.ndarray:
    eps = torch.finfo(dtype).eps
    return np.maximum(tol * np.abs(theta), 10 * eps * anorm)


def _random_block(P: int, m: int, gen: torch.Generator, op: LinearOperator) -> torch.Tensor:
    return torch.randn(P, m, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)


WARM_START_NOISE = 1e-2


def _perturb_start(V0: torch.Tensor, gen: torch.Generator, op: LinearOperator) -> torch.Tensor:
    """Mix a little randomness (relative weight 1e-2) into a warm start.

    A start vector inside an invariant subspace that misses the wanted eigenvectors (an
    exact eigenvector of the wrong eigenvalue, a vector living on one block) would give a
    converged but wrong answer. The noise makes every eigenvector reachable, and keeps the
    first residual large enough that a wrong start is never accepted; a good start still
    converges in a few products.
    """
    V = V0 / V0.norm(dim=0, keepdim=True).clamp_min(torch.finfo(V0.dtype).tiny)
    R = _random_block(op.size, V.shape[1], gen, op)
    return V + WARM_START_NOISE * R / R.norm(dim=0, keepdim=True)


def _dense(op: LinearOperator, k: int, which: str, bar) -> EigenResult:
    """Form the matrix from ``P`` identity columns (in chunks) and call ``eigh``."""
    P = op.size
    A = torch.empty(P, P, dtype=torch.float64)
    for start in range(0, P, 64):
        stop = min(start + 64, P)
        E = torch.zeros(P, stop - start, dtype=op.dtype, device=op.device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1
        A[:, start:stop] = op.matmat(E).to(torch.float64).cpu()
        bar.update(stop - start)
    A = (A + A.T) / 2
    theta, S = (t.numpy() for t in torch.linalg.eigh(A))
    idx = _order(theta, which)[:k]
    vecs = torch.from_numpy(S[:, idx].copy())
    res = (A @ vecs - vecs * torch.from_numpy(theta[idx])).norm(dim=0)
    return EigenResult(
        values=torch.from_numpy(theta[idx].copy()),
        vectors=vecs.to(op.dtype).to(op.device),
        residuals=res,
        converged=torch.ones(len(idx), dtype=torch.bool),  # eigh is exact up to rounding
        matvecs=P,
        which=which,
        method="dense",
    )


class _Subspace:
    """An orthonormal basis ``V``, its products ``W = A V`` and ``H = V^T A V`` (float64)."""

    def __init__(self, op: LinearOperator, gen: torch.Generator, bar):
        self.op, self.gen, self.bar = op, gen, bar
        self.V = torch.empty(op.size, 0, dtype=op.dtype, device=op.device)
        self.W = torch.empty_like(self.V)
        self.H = np.zeros((0, 0))
        self.matvecs = 0

    @property
    def dim(self) -> int:
        return self.V.shape[1]

    def expand(self, X: torch.Tensor) -> None:
        """Append the directions of ``X`` (orthonormalised; random if ``X`` is in the span)."""
        before = X.norm(dim=0).clamp_min(torch.finfo(X.dtype).tiny)
        Q, after = orthonormalize_against(X, self.V)
        dead = after <= 1e-6 * before  # breakdown: invariant subspace, add fresh directions
        if dead.any():
            X = X.clone()
            X[:, dead] = _random_block(self.op.size, int(dead.sum()), self.gen, self.op)
            Q, _ = orthonormalize_against(X, self.V)
        AQ = self.op.matmat(Q)
        cross = (self.V.T @ AQ).to(torch.float64).cpu().numpy()
        diag = (Q.T @ AQ).to(torch.float64).cpu().numpy()
        m, c = self.dim, Q.shape[1]
        H = np.zeros((m + c, m + c))
        H[:m, :m], H[:m, m:], H[m:, :m] = self.H, cross, cross.T
        H[m:, m:] = (diag + diag.T) / 2
        # assign together so an interrupt never leaves V, W, H inconsistent
        self.V, self.W, self.H = torch.cat([self.V, Q], 1), torch.cat([self.W, AQ], 1), H
        self.matvecs += c
        self.bar.update(c)

    def ritz(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        theta, S = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(self.H)))
        idx = _order(theta, which)
        return theta[idx], S[:, idx]

    def compress(self, S_keep: np.ndarray, theta_keep: np.ndarray) -> None:
        """Thick restart: keep only the Ritz vectors ``V S_keep``."""
        S = torch.from_numpy(S_keep).to(self.op.dtype).to(self.op.device)
        self.V, self.W, self.H = self.V @ S, self.W @ S, np.diag(theta_keep)


def _ritz_pairs(sub: _Subspace, theta: np.ndarray, S: np.ndarray, n: int):
    """The first ``n`` Ritz vectors, their products and exact residual norms."""
    Sn = torch.from_numpy(np.ascontiguousarray(S[:, :n])).to(sub.op.dtype).to(sub.op.device)
    Y, AY = sub.V @ Sn, sub.W @ Sn
    R = AY - Y * torch.as_tensor(theta[:n], dtype=Y.dtype, device=Y.device)
    return Y, R, R.norm(dim=0).to(torch.float64).cpu().numpy()


def _lanczos(
    op: LinearOperator, k: int, which: str, tol: float, max_matvecs: int,
    V0: torch.Tensor | None, b: int, ncv: int, gen: torch.Generator, bar,
) -> EigenResult:
    P = op.size
    sub = _Subspace(op, gen, bar)
    min_dim = min(ncv, max(2 * k, k + b + 1))
    keep = min(ncv - b, max(k + b, (ncv + k) // 2))
    interrupted = False
    try:
        start = V0 if V0 is not None else _random_block(P, b, gen, op)
        if start.shape[1] < b:
            start = torch.cat([start, _random_block(P, b - start.shape[1], gen, op)], 1)
        sub.expand(start[:, : ncv - b])
        while True:
            theta, S = sub.ritz(which)
            n = min(sub.dim, k + b)
            Y, R, res = _ritz_pairs(sub, theta, S, n)
            conv = res <= _threshold(theta[:n], np.abs(theta).max(), tol, op.dtype)
            if sub.dim >= min_dim and n >= k and conv[:k].all():
                break
            if sub.matvecs >= max_matvecs:
                break
            if sub.dim + b > ncv:
                sub.compress(S[:, :keep], theta[:keep])
            pending = [i for i in range(n) if not conv[i]]
            pending += [i for i in range(n) if conv[i]]  # only if too few unconverged
            sub.expand(R[:, pending[:b]])
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(
            "eigenvalues interrupted: returning the Ritz pairs of the current subspace, marked "
            "unconverged.", NotConvergedWarning, stacklevel=3,
        )
    if sub.dim == 0:
        empty = torch.empty(0, dtype=torch.float64)
        return EigenResult(empty, sub.V, empty, torch.zeros(0, dtype=torch.bool), 0, which, "lanczos", True)
    theta, S = sub.ritz(which)
    n = min(sub.dim, k)
    Y, R, res = _ritz_pairs(sub, theta, S, n)
    conv = res <= _threshold(theta[:n], np.abs(theta).max(), tol, op.dtype)
    if interrupted:
        conv[:] = False
    return EigenResult(
        values=torch.from_numpy(theta[:n].copy()),
        vectors=Y,
        residuals=torch.from_numpy(res),
        converged=torch.from_numpy(conv),
        matvecs=sub.matvecs,
        which=which,
        method="lanczos",
        interrupted=interrupted,
    )


def _power(
    op: LinearOperator, k: int, which: str, tol: float, max_matvecs: int,
    V0: torch.Tensor | None, gen: torch.Generator, bar,
) -> EigenResult:
    """Power iteration with deflation, on ``sign * A + shift * I``.

    ``sign = -1`` turns "smallest" into "largest". For "largest" the shift starts at 0
    and becomes ``|theta|`` when the dominant remaining eigenvalue ``theta`` turns out
    negative, which makes the largest remaining eigenvalue dominant (the remaining
    spectrum then lies in ``[-|theta|, |theta|]``). Vector ``j`` iterates orthogonally to
    the ``j`` found ones and stops when its deflated residual ``||(I - UU^T) A v - theta v||``
    meets the tolerance; a final Rayleigh-Ritz step on the found vectors (using the stored
    products, no extra ones) removes the errors they left in each other.
    """
    P = op.size
    sign = -1.0 if which == "smallest" else 1.0
    shift = 0.0
    U = torch.empty(P, 0, dtype=op.dtype, device=op.device)
    AU = torch.empty_like(U)
    matvecs, interrupted, anorm = 0, False, 0.0
    current = None  # the (vector, product) being iterated, kept on Ctrl-C
    try:
        while U.shape[1] < k and matvecs < max_matvecs:
            j = U.shape[1]
            v = V0[:, j].clone() if V0 is not None and j < V0.shape[1] else _random_block(P, 1, gen, op)[:, 0]
            v = v - U @ (U.T @ v)
            v = v / v.norm()
            ok, theta, current = False, 0.0, None
            while matvecs < max_matvecs:
                Av = op.matvec(v)
                matvecs += 1
                bar.update(1)
                current = (v, Av)
                w = sign * Av
                theta = float(v @ w)
                anorm = max(anorm, abs(theta))
                deflated = w - U @ (U.T @ w)
                res = float((deflated - theta * v).norm())
                if res <= _threshold(np.array([theta]), anorm, tol, op.dtype)[0]:
                    ok = True
                    break
                v = deflated + shift * v
                v = v - U @ (U.T @ v)
                v = v / v.norm()
            if ok and which != "magnitude" and theta < 0 and shift < -theta:
                shift = -theta  # a dominant eigenvalue of the wrong sign: shift and retry
                continue
            if current is not None:  # the last multiplied vector and its product (v moved on)
                v, Av = current
                U, AU = torch.cat([U, v[:, None]], 1), torch.cat([AU, Av[:, None]], 1)
            current = None
    except KeyboardInterrupt:
        interrupted = True
        if current is not None:  # keep the vector being iterated
            v, Av = current
            U, AU = torch.cat([U, v[:, None]], 1), torch.cat([AU, Av[:, None]], 1)
        warnings.warn("eigenvalues interrupted: returning the eigenpairs found so far, marked "
                      "unconverged.", NotConvergedWarning, stacklevel=3)
    # Rayleigh-Ritz on span(U) with the stored products: honest values and residuals
    H = (U.T @ AU).to(torch.float64).cpu()
    theta, S = (t.numpy() for t in torch.linalg.eigh((H + H.T) / 2))
    idx = _order(theta, which)
    theta, S = theta[idx], torch.from_numpy(np.ascontiguousarray(S[:, idx])).to(op.dtype).to(op.device)
    vectors, products = U @ S, AU @ S
    res = (products - vectors * torch.as_tensor(theta, dtype=op.dtype, device=op.device)).norm(dim=0)
    res = res.to(torch.float64).cpu()
    conv = res.numpy() <= _threshold(theta, max(anorm, float(np.abs(theta).max(initial=0))), tol, op.dtype)
    if interrupted:
        conv[:] = False
    return EigenResult(
        values=torch.from_numpy(theta.copy()),
        vectors=vectors,
        residuals=res,
        converged=torch.from_numpy(conv),
        matvecs=matvecs,
        which=which,
        method="power",
        interrupted=interrupted,
    )
