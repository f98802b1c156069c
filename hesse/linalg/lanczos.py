"""The one Lanczos implementation of hesse: K independent (block) recurrences at once.

Lanczos (1950) builds an orthonormal basis ``V`` of the Krylov space
``span{q, A q, A^2 q, ...}``; the projected matrix ``H = V^T A V`` is tridiagonal and its
eigenvalues (Ritz values) approximate the extreme eigenvalues of ``A``. Here every new
direction is orthogonalised against the *whole* basis by classical Gram-Schmidt twice
("twice is enough", Giraud et al. 2005), so ``V`` stays orthonormal in floating point and
there are no ghost (spurious duplicate) Ritz values; ``H`` is computed as ``V^T (A Q)``
for each new block ``Q``, which makes it exact (the Rayleigh-Ritz form of Lanczos). With
``window=2`` only the last two vectors are kept: the plain three-term recurrence.

One :class:`Lanczos` holds ``K`` independent recurrences in one tall basis ``[N, m]``:
recurrence ``k`` owns the rows ``segments[k]``, so column ``j`` of ``V`` holds step ``j`` of
every recurrence and each step costs ONE call of ``matmat`` on ``[N, c]``. It serves

* :func:`hesse.linalg.eigenvalues`: ``K = 1``, blocks of ``c = block_size`` directions and
  thick restart (Wu & Simon 2000; Stathopoulos, Saad & Wu 1998), driven by
  :class:`ThickRestart`, which stops on certified :func:`error_bounds`;
* :func:`hesse.linalg.density` (stochastic Lanczos quadrature): ``K`` probes, each in its
  own copy of ``R^P`` (``N = K P``), driven by :func:`krylov_steps` and read by
  :func:`gauss_quadrature`;
* :func:`hesse.analysis.per_layer`: one recurrence per diagonal block of a block-diagonal
  operator (``N = P``, segments = the blocks' slices), driven by :func:`krylov_steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hesse.linalg.probes import gaussian_block

BREAKDOWN = 1e-6  # a direction keeping less than this fraction of its norm is in the span
WHICH = ("largest", "smallest", "magnitude")


def orthonormalize_against(X: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt of ``X`` against ``basis`` twice, then QR.

    Returns ``(Q, norms)``: ``norms`` are the column norms of ``X`` left after projecting
    out ``basis`` (before the QR), to detect breakdown.
    """
    for _ in range(2):
        if basis.shape[1] > 0:
            X = X - basis @ (basis.T @ X)
    norms = X.norm(dim=0)
    Q, _ = torch.linalg.qr(X)
    if basis.shape[1] > 0:  # QR may reintroduce tiny components
        Q = Q - basis @ (basis.T @ Q)
        Q, _ = torch.linalg.qr(Q)
    return Q, norms


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy()


def small_eigh(H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a small symmetric matrix, on one thread.

    For a projected matrix of a few dozen to a few hundred rows a multi-threaded LAPACK
    call costs thread wake-ups and barriers, not arithmetic: on a busy 2-core machine
    ``numpy.linalg.eigh`` (OpenBLAS threads) or torch with 2 threads took 10-300x longer
    than torch on one thread (n = 36-200).
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        theta, S = torch.linalg.eigh(torch.from_numpy(np.array(H, dtype=np.float64)))
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
    return theta.numpy(), S.numpy()


class Lanczos:
    """``K`` Lanczos recurrences (basis ``V``, optional products ``W = A V``, ``H = V^T A V``).

    ``matmat`` multiplies ``[N, c]``; ``segments[k]`` are the rows of recurrence ``k``
    (default: one recurrence on all rows). ``on_breakdown``: when a new direction lies in
    the span (an invariant subspace was found) replace it by a random one (``"random"``,
    for eigenvalues) or end that recurrence (``"stop"``). ``window``: keep only the last
    ``window`` basis vectors (no full reorthogonalisation). ``capacity``: the most basis
    columns expected (storage is reserved for them; without it, it doubles when full), so
    each step writes its new columns instead of copying the whole basis. State is replaced
    atomically, so it is consistent whenever Ctrl-C arrives.
    """

    def __init__(
        self, matmat: Callable[[torch.Tensor], torch.Tensor], size: int, dtype: torch.dtype,
        device: torch.device | str, *, segments: list[slice] | None = None, keep_products: bool = False,
        window: int | None = None, on_breakdown: str = "stop", generator: torch.Generator | None = None,
        capacity: int = 8,
    ):
        self.matmat, self.dtype, self.device = matmat, dtype, device
        self.segments = segments if segments is not None else [slice(0, size)]
        self.window, self.on_breakdown = window, on_breakdown
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        K = len(self.segments)
        self._stores = [torch.empty(size, capacity, dtype=dtype, device=device)
                        for _ in range(2 if keep_products else 1)]  # V and W live in their first columns
        self.V = self._stores[0][:, :0]
        self.W = self._stores[1][:, :0] if keep_products else None
        self.AQ: torch.Tensor | None = None  # products of the newest block: the next Krylov direction
        self.H = np.zeros((K, 0, 0))
        self.lengths = np.zeros(K, dtype=int)  # columns in each recurrence's basis
        self.active = np.ones(K, dtype=bool)
        self.products = 0  # columns passed to matmat
        self.calls = 0  # calls of matmat (data passes)

    @property
    def dim(self) -> int:
        """Columns of the projected matrix (steps x block size, or the kept size after a restart)."""
        return self.H.shape[1]

    def extend(self, X: torch.Tensor, finish: Callable[[np.ndarray], np.ndarray] | None = None,
               multiply: bool = True) -> int:
        """Add the directions ``X`` (``[N, c]``) to every active recurrence; returns columns multiplied.

        ``finish(beta)`` (``beta[k]``: norm of recurrence ``k``'s first new direction after
        orthogonalisation, the Lanczos ``beta_j``) may end recurrences before the product;
        ``multiply=False`` only runs that check (and the breakdown test).
        """
        Q, before, after = self._orthonormalize(X)
        dead = after <= BREAKDOWN * np.maximum(before, np.finfo(float).tiny)
        if dead.any() and self.on_breakdown == "random":
            Q = self._replace_dead(X, Q, dead)
        else:
            self.active &= ~dead.any(1)
        if finish is not None and self.dim > 0:
            self.active &= ~finish(after[:, 0])
        if not multiply or not self.active.any():
            return 0
        for k in np.flatnonzero(~self.active):
            Q[self.segments[k]] = 0
        return self._append(Q)

    def _orthonormalize(self, X: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        Q = torch.zeros_like(X)
        before, after = np.zeros((len(self.segments), X.shape[1])), np.zeros((len(self.segments), X.shape[1]))
        for k in np.flatnonzero(self.active):
            s = self.segments[k]
            before[k] = _numpy(X[s].norm(dim=0))
            Q[s], norms = orthonormalize_against(X[s], self.V[s])
            after[k] = _numpy(norms)
        return Q, before, after

    def _replace_dead(self, X: torch.Tensor, Q: torch.Tensor, dead: np.ndarray) -> torch.Tensor:
        """Random directions instead of those in the span (keeps the basis growing)."""
        X = X.clone()
        for k in np.flatnonzero(dead.any(1)):
            s, cols = self.segments[k], torch.from_numpy(np.flatnonzero(dead[k]))
            X[s, cols] = gaussian_block(s.stop - s.start, len(cols), self.gen, self.dtype, self.device)
            Q[s], _ = orthonormalize_against(X[s], self.V[s])
        return Q

    def _append(self, Q: torch.Tensor) -> int:
        """Multiply ``Q`` (one call), extend ``H`` by ``V^T A Q`` and ``Q^T A Q``, append ``Q``."""
        AQ = self.matmat(Q)
        m, c, kept = self.dim, Q.shape[1], self.V.shape[1]
        H = np.zeros((len(self.segments), m + c, m + c))
        H[:, :m, :m] = self.H
        for k in np.flatnonzero(self.active):
            s = self.segments[k]
            cross, diag = _numpy(self.V[s].T @ AQ[s]), _numpy(Q[s].T @ AQ[s])
            H[k, m - kept:m, m:], H[k, m:, m - kept:m] = cross, cross.T
            H[k, m:, m:] = (diag + diag.T) / 2
        if self.window is not None:
            V, W = torch.cat([self.V, Q], 1)[:, -self.window:], None if self.W is None else torch.cat([self.W, AQ], 1)
        else:
            self._stores = [_write_after(store, kept, X) for store, X in zip(self._stores, (Q, AQ))]
            V, W = (store[:, :kept + c] for store in self._stores) if self.W is not None \
                else (self._stores[0][:, :kept + c], None)
        lengths = self.lengths + c * self.active
        # assign together so an interrupt never leaves V, W, H inconsistent
        self.V, self.W, self.H, self.AQ, self.lengths = V, W, H, AQ, lengths
        self.products += c
        self.calls += 1
        return c

    def ritz(self, which: str, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values of recurrence ``k``, most wanted first, and their vectors in the basis."""
        L = self.lengths[k]
        theta, S = small_eigh(self.H[k, :L, :L])
        idx = order(theta, which)
        return theta[idx], S[:, idx]

    def ritz_pairs(self, theta: np.ndarray, S: np.ndarray, cols: np.ndarray):
        """The Ritz vectors ``Y = V S[:, cols]``, residuals ``R = A Y - Y theta`` and their
        exact norms (single recurrence with ``keep_products``)."""
        Sn = torch.from_numpy(np.ascontiguousarray(S[:, cols])).to(self.dtype).to(self.device)
        Y, AY = self.V @ Sn, self.W @ Sn
        R = AY - Y * torch.as_tensor(theta[cols], dtype=Y.dtype, device=Y.device)
        return Y, R, _numpy(R.norm(dim=0))

    def compress(self, S_keep: np.ndarray, theta_keep: np.ndarray) -> None:
        """Thick restart of a single recurrence: keep only the Ritz vectors ``V S_keep``."""
        S = torch.from_numpy(np.ascontiguousarray(S_keep)).to(self.dtype).to(self.device)
        H = np.diag(theta_keep)[None]
        self.V, self.W, self.H, self.lengths = self.V @ S, self.W @ S, H, np.array([len(theta_keep)])
        self._stores = [t for t in (self.V, self.W) if t is not None]


def _write_after(store: torch.Tensor, used: int, X: torch.Tensor) -> torch.Tensor:
    """``store`` with ``X`` written into the columns after its first ``used`` (which stay as
    they are); a store twice as large when it is full."""
    need = used + X.shape[1]
    if need > store.shape[1]:
        grown = store.new_empty(store.shape[0], max(need, 2 * store.shape[1]))
        grown[:, :used] = store[:, :used]
        store = grown
    store[:, used:need] = X
    return store


def order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` from most to least wanted (``which`` as in :func:`eigenvalues`)."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


FLOOR_FACTOR = 10  # the precision floor is FLOOR_FACTOR * eps * ||A||
PATIENCE = 4  # restarts without a better error bound before giving up


def precision_floor(anorm: float, dtype: torch.dtype) -> float:
    """The smallest eigenvalue error a ``dtype`` operator can certify: ``10 eps ||A||``.

    Products ``A v`` carry rounding errors of about ``eps ||A||``, so Ritz values and
    residuals cannot be trusted below that, whatever the basis precision.
    """
    return FLOOR_FACTOR * torch.finfo(dtype).eps * anorm


def error_bounds(theta: np.ndarray, res: np.ndarray, n: int, floor: float) -> np.ndarray:
    """Certified bounds on ``|theta_i - lambda|`` for the first ``n`` Ritz pairs.

    For a symmetric ``A`` and a unit Ritz vector with residual ``r = ||A y - theta y||``:
    ``|theta - lambda| <= r`` (Bauer-Fike/Kahan), and the gap bound ``|theta - lambda| <=
    r^2 / gap`` when no other eigenvalue lies within ``gap`` of ``theta`` (Kato 1949,
    Temple 1928; Parlett, *The Symmetric Eigenvalue Problem*, Sec. 11.7). The gap is
    estimated conservatively from the algebraic neighbours ``theta_j`` of ``theta_i`` among
    all Ritz values: ``min_j (|theta_i - theta_j| - r_j)`` (each ``theta_j`` is within ``r_j``
    of an eigenvalue), used only when positive. ``res``: residual norms of all Ritz pairs
    (``inf`` where not computed). Bounds never go below ``floor`` (:func:`precision_floor`).
    """
    out = np.empty(n)
    for i, neighbours in enumerate(_neighbours(theta, n)):
        gap = min((abs(theta[i] - theta[j]) - res[j] for j in neighbours), default=-1.0)
        bound = min(res[i], res[i] ** 2 / gap) if 0 < gap < np.inf else res[i]
        out[i] = max(bound, floor)
    return out


def _neighbours(theta: np.ndarray, n: int) -> list[list[int]]:
    """For each of the first ``n`` Ritz values, the indices of its algebraic neighbours
    (the next smaller and next larger Ritz value, where they exist)."""
    alg = np.argsort(theta, kind="stable")
    pos = np.empty(len(theta), dtype=int)
    pos[alg] = np.arange(len(theta))
    return [[int(alg[p]) for p in (pos[i] - 1, pos[i] + 1) if 0 <= p < len(theta)] for i in range(n)]


def _with_neighbours(theta: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` Ritz values and of their algebraic neighbours."""
    near = {j for js in _neighbours(theta, n) for j in js}
    return np.array(sorted(near | set(range(n))))


@dataclass
class Snapshot:
    """The ``k`` wanted Ritz pairs at one iterate, with their certified error bounds.

    ``targets[i] = max(tol |theta_i|, floor)``: what pair ``i`` must reach to stop.
    """

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    bounds: np.ndarray
    targets: np.ndarray
    floor: float

    @property
    def score(self) -> float:
        """Mean ``log bound``: lower is better (absolute bounds, as the values themselves move)."""
        return float(np.mean(np.log(self.bounds))) if len(self.bounds) else np.inf


class ThickRestart:
    """Thick-restart (block) Lanczos for the ``k`` wanted eigenpairs of one recurrence.

    The basis grows by the residuals of the wanted uncertified Ritz pairs (for a Krylov
    space they all point along the next Lanczos vector, so one column per step *is*
    Lanczos); when it would exceed ``ncv`` columns only the best ``keep`` Ritz vectors stay
    (Wu & Simon 2000; Stathopoulos, Saad & Wu 1998). After every step the wanted pairs get
    :func:`error_bounds`; it stops (``reason``) when every pair's bound is within
    ``max(tol |theta|, floor)`` (``"converged"``, or ``"floor"`` if some only reached the
    precision floor), after ``max_matvecs`` products (``"max_matvecs"``), or when the bounds
    have not improved (:attr:`Snapshot.score`) for ``PATIENCE`` restarts (``"stagnated"``).
    ``best`` is the iterate with the smallest bounds, ``latest`` the last one: a run that
    stops short returns ``best``, so more products never make the answer worse.
    """

    def __init__(self, lz: Lanczos, k: int, which: str, tol: float, max_matvecs: int, b: int, ncv: int,
                 floor_dtype: torch.dtype):
        self.lz, self.k, self.which, self.tol, self.max_matvecs = lz, k, which, tol, max_matvecs
        self.b, self.ncv, self.floor_dtype = b, ncv, floor_dtype
        self.best: Snapshot | None = None
        self.latest: Snapshot | None = None
        self.reason = "running"
        self.restarts_since_best = 0

    def run(self, start: torch.Tensor, on_step: Callable[[int], None] = lambda n: None) -> None:
        """Iterate from ``start`` (at least ``b`` columns); the answer is in ``best``/``latest``."""
        lz, k, b, ncv = self.lz, self.k, self.b, self.ncv
        min_dim = min(ncv, max(2 * k, k + b + 1))
        keep = min(ncv - b, max(k + b, (ncv + k) // 2))
        on_step(lz.extend(start[:, : ncv - b]))
        while True:
            theta, S = lz.ritz(self.which)
            R, done = self._assess(theta, S)
            if lz.dim >= min_dim and done[:k].all() and len(done) >= k:
                certified = self.latest.bounds <= self.tol * np.abs(self.latest.values)
                self.reason = "converged" if certified.all() else "floor"
                return
            if lz.products >= self.max_matvecs or self.restarts_since_best > PATIENCE:
                self.reason = "max_matvecs" if lz.products >= self.max_matvecs else "stagnated"
                return
            if lz.dim + b > ncv:
                lz.compress(S[:, :keep], theta[:keep])
                self.restarts_since_best += 1
            pending = [i for i in range(len(done)) if not done[i]] + [i for i in range(len(done)) if done[i]]
            on_step(lz.extend(R[:, pending[:b]]))

    def _assess(self, theta: np.ndarray, S: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Residuals and bounds of the first ``k + b`` Ritz pairs; updates ``latest``/``best``.

        Returns the residual vectors of those pairs and which of them are done."""
        lz, n = self.lz, min(self.lz.dim, self.k + self.b)
        cols = _with_neighbours(theta, n)
        Y, R, norms = lz.ritz_pairs(theta, S, cols)
        res = np.full(len(theta), np.inf)
        res[cols] = norms
        floor = precision_floor(float(np.abs(theta).max()), self.floor_dtype)
        bounds = error_bounds(theta, res, n, floor)
        targets = np.maximum(self.tol * np.abs(theta[:n]), floor)
        m = min(n, self.k)
        self.latest = Snapshot(theta[:m].copy(), Y[:, :m], res[:m].copy(), bounds[:m], targets[:m], floor)
        if m == self.k and (self.best is None or self.latest.score < self.best.score):
            self.best, self.restarts_since_best = self.latest, 0
        return R[:, :n], bounds <= targets


def krylov_steps(
    lz: Lanczos, start: torch.Tensor, steps: int, *, finish: Callable[[np.ndarray], np.ndarray] | None = None,
    on_step: Callable[[int], None] = lambda n: None,
) -> None:
    """Run every recurrence of ``lz`` for up to ``steps`` single-vector Lanczos steps from
    ``start`` (``[N, 1]``): step ``j + 1`` adds ``A q_j`` orthogonalised against the basis.

    A recurrence ends at breakdown (its Krylov space is invariant) or when ``finish(beta)``
    says so, also after the last step (without another product); ``on_step`` gets the
    number of recurrences that advanced.
    """
    X = start
    for _ in range(steps):
        if not lz.extend(X, finish):
            return
        on_step(int(lz.active.sum()))
        X = lz.AQ
    if finish is not None:
        lz.extend(X, finish, multiply=False)


def gauss_quadrature(lz: Lanczos, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of every recurrence: ``q^T f(A) q ~ sum_j tau_j f(theta_j)``.

    Nodes ``theta_j`` are the Ritz values of recurrence ``k``, weights ``tau_j`` the
    squared first components of its Ritz vectors (Golub & Welsch 1969); exact for
    polynomials of degree ``< 2 L``. Returns ``[K, width]`` arrays, NaN/0 past ``L``.
    """
    K = len(lz.segments)
    nodes, weights = np.full((K, width), np.nan), np.zeros((K, width))
    for k in range(K):
        L = lz.lengths[k]
        if L:
            theta, U = small_eigh(lz.H[k, :L, :L])
            nodes[k, :L], weights[k, :L] = theta, U[0] ** 2
    return nodes, weights
