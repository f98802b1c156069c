"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos, power iteration, dense.

Lanczos is :mod:`hesse.linalg.lanczos` (Rayleigh-Ritz form with full reorthogonalisation
and thick restart; Wu & Simon 2000, Stathopoulos, Saad & Wu 1998). Because the basis stays
orthonormal there are no ghost eigenvalues, and every returned residual is computed exactly
from the stored products. Each value carries a certified error bound: ``|theta - lambda| <=
residual`` for some eigenvalue ``lambda`` (Bauer-Fike / Kahan for symmetric matrices), and
``<= residual^2 / gap`` when the rest of the spectrum is ``gap`` away (Kato 1949; Temple
1928; Parlett, *The Symmetric Eigenvalue Problem*, 11.7), the gap estimated conservatively
from the other Ritz values; ``.converged`` means the bound is within ``tol |theta|``. No
``dtype`` certifies below ``10 eps ||A||`` (the precision floor): the solver stops there.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from hesse._progress import progress_bar
from hesse.errors import HesseError, NotConvergedWarning, check_on_interrupt, interrupted
from hesse.linalg.checks import check_choice, check_positive, prepare_operator
from hesse.linalg.lanczos import (PATIENCE, WHICH, Lanczos, Snapshot, ThickRestart, order, precision_floor,
                                  small_eigh)
from hesse.linalg.probes import gaussian_block
from hesse.operators import LinearOperator
from hesse.results import EigenResult

METHODS = ("lanczos", "power")
DENSE_LIMIT = 4096
WARM_START_NOISE = 1e-2


def eigenvalues(
    op,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    method: str = "lanczos",
    v0: torch.Tensor | None = None,
    block_size: int | None = None,
    ncv: int | None = None,
    accumulate: torch.dtype | None = None,
    seed: int = 0,
    check_symmetric: bool = True,
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator.

    ``which``: ``"largest"`` (algebraic, values descending), ``"smallest"`` (algebraic,
    ascending; negative eigenvalues at saddle points) or ``"magnitude"`` (largest
    ``|lambda|``, descending in ``|lambda|``).

    Accuracy: every pair gets a certified bound ``error_bounds[i] >= |theta_i - lambda|``
    (:func:`hesse.linalg.lanczos.error_bounds`): the smaller of the residual
    ``r = ||A v - theta v||`` and the gap bound ``r^2 / gap`` (Kato-Temple), the gap being the
    distance to the nearest other Ritz value minus that one's residual. A pair is converged
    when ``error_bounds[i] <= tol |theta_i|`` (default ``tol=1e-3``: three digits, certified)
    and the solver stops as soon as all ``k`` are. A ``dtype`` cannot certify below its
    precision floor ``10 eps ||A||`` (``||A||`` estimated by the largest ``|theta|``): a ``tol``
    under it stops at the floor, the pairs there are marked unconverged, ``.notes`` names the
    floor and a :class:`NotConvergedWarning` is raised. A run stopped short (cap, floor, no
    progress for a few restarts) returns its *best* iterate, never a later, worse one.

    ``method="lanczos"`` (default): thick-restart (block) Lanczos, basis at most ``ncv``
    columns (default ``max(2k + 10, 30, k + 8 block_size)``; the basis and its products take
    ``2 ncv P`` numbers). ``block_size`` vectors go into each operator call (one data pass;
    default ``min(k, 4)``, measured in ``bench/bench_estimators.py``): fewer passes for
    ``k > 1`` at somewhat more products, and every copy of an eigenvalue of multiplicity up
    to ``block_size`` is found. ``accumulate`` (e.g. ``torch.float64``) keeps the basis and
    its products in that dtype for a lower-precision operator.
    ``method="power"``: power iteration with deflation, stopping on the residual rule.
    ``v0`` (``[P]`` or ``[P, m]``) warm-starts either method, e.g. with last step's eigenvectors.
    ``max_matvecs`` caps the single-vector products (default ``300 + 30 k`` times
    ``block_size``, which bounds the time; power iteration ``2000 + 100 k``). If ``P`` is at
    most ``ncv``, the matrix is formed from ``P`` products and solved densely.
    Ctrl-C: the Ritz pairs found so far, marked unconverged and ``interrupted``, are
    attached to the ``KeyboardInterrupt`` as ``.partial`` or returned (``on_interrupt="return"``).
    """
    _check_arguments(k, which, tol, max_matvecs, method, block_size, ncv, on_interrupt)
    op, used = prepare_operator(op, check_symmetric, seed)
    block_size = block_size if block_size is not None else default_block_size(k)
    ncv = min(op.size, ncv if ncv is not None else max(2 * k + 10, 30, k + 8 * block_size))
    max_matvecs = max_matvecs if max_matvecs is not None else default_max_matvecs(k, block_size, method)
    solver = _make_solver(op, k, which, tol, max_matvecs, method, v0, block_size, ncv, seed, accumulate)
    with progress_bar(desc=f"eigenvalues ({method})", enabled=progress, unit="matvec") as bar:
        try:
            solver.run(bar)
        except KeyboardInterrupt as error:
            partial = solver.result(interrupted=True)
            partial.matvecs, partial.passes = partial.matvecs + used, partial.passes + (used > 0)
            return interrupted(error, partial, on_interrupt, "eigenvalues")
    result = solver.result(interrupted=False)
    result.matvecs, result.passes = result.matvecs + used, result.passes + (used > 0)
    if not result.all_converged:
        _warn_unconverged(result, k, tol, max_matvecs, method)
    return result


def default_block_size(k: int) -> int:
    """Vectors per operator call: ``min(k, 4)`` (see ``bench/bench_estimators.py``)."""
    return min(k, 4)


def default_max_matvecs(k: int, block_size: int, method: str) -> int:
    """The default product cap: ``(300 + 30 k) * block_size`` for Lanczos (so at most
    ``300 + 30 k`` passes), ``2000 + 100 k`` for power iteration."""
    return 2000 + 100 * k if method == "power" else (300 + 30 * k) * block_size


def _warn_unconverged(result: EigenResult, k: int, tol: float, max_matvecs: int, method: str) -> None:
    why = "; ".join(result.notes) or (
        f"did not reach tol={tol:g} within max_matvecs={max_matvecs}; raise max_matvecs or tol"
        + (", or use method='lanczos' (faster)." if method == "power" else ", or raise ncv."))
    bound = float(result.error_bounds.max()) if result.error_bounds is not None and len(result.error_bounds) else np.inf
    warnings.warn(
        f"eigenvalues: {int((~result.converged).sum())} of {len(result.converged)} eigenpairs "
        f"({k} requested) not certified to tol={tol:g} (largest error bound {bound:.2e}, largest "
        f"residual {float(result.residuals.max()) if len(result.residuals) else np.inf:.2e}): {why}",
        NotConvergedWarning,
        stacklevel=3,
    )


def _check_arguments(k, which, tol, max_matvecs, method, block_size, ncv, on_interrupt) -> None:
    check_choice("which", which, WHICH)
    check_choice("method", method, METHODS)
    check_positive("k", k, integer=True)
    check_positive("tol", tol)
    if max_matvecs is not None:
        check_positive("max_matvecs", max_matvecs, integer=True)
    if block_size is not None:
        check_positive("block_size", block_size, integer=True)
    if ncv is not None:
        check_positive("ncv", ncv, integer=True)
    check_on_interrupt(on_interrupt)


def _make_solver(op: LinearOperator, k: int, which: str, tol: float, max_matvecs: int, method: str,
                 v0, b: int, ncv: int, seed: int, accumulate: torch.dtype | None):
    """The dense, Lanczos or power solver for these settings (checks ``k``, ``ncv``, ``v0``)."""
    P = op.size
    if k > P:
        raise HesseError(f"k={k} exceeds the dimension P={P}; ask for at most {P} eigenvalues.")
    if ncv < k + 2 * b and ncv < P:
        raise HesseError(f"ncv={ncv} is too small for k={k}, block_size={b}; use ncv >= {k + 2 * b}.")
    gen = torch.Generator().manual_seed(seed)
    V0 = _check_v0(v0, op)
    if V0 is not None:
        V0 = _perturb_start(V0, gen, op)
    if ncv >= P or k + 2 * b > P:
        if P > DENSE_LIMIT:
            raise HesseError(
                f"k={k} is too close to P={P} for a matrix-free solver and P is too large to "
                f"form the matrix (> {DENSE_LIMIT}); ask for fewer eigenvalues (k <= {(P - 10) // 2})."
            )
        return _Dense(op, k, which)
    if method == "lanczos":
        return _ThickRestart(op, k, which, tol, max_matvecs, V0, b, ncv, gen, accumulate or op.dtype)
    return _Power(op, k, which, tol, max_matvecs, V0, gen)


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


def _perturb_start(V0: torch.Tensor, gen: torch.Generator, op: LinearOperator) -> torch.Tensor:
    """Mix a little randomness (relative weight 1e-2) into a warm start.

    A start vector inside an invariant subspace that misses the wanted eigenvectors (an
    exact eigenvector of the wrong eigenvalue, a vector living on one block) would give a
    converged but wrong answer. The noise makes every eigenvector reachable, and keeps the
    first residual large enough that a wrong start is never accepted; a good start still
    converges in a few products.
    """
    V = V0 / V0.norm(dim=0, keepdim=True).clamp_min(torch.finfo(V0.dtype).tiny)
    R = gaussian_block(op.size, V.shape[1], gen, op.dtype, op.device)
    return V + WARM_START_NOISE * R / R.norm(dim=0, keepdim=True)


def _empty(op: LinearOperator, which: str, method: str) -> EigenResult:
    """The result of a solver interrupted before its first Ritz pair."""
    empty = torch.empty(0, dtype=torch.float64)
    V = torch.empty(op.size, 0, dtype=op.dtype, device=op.device)
    return EigenResult(empty, V, empty, torch.zeros(0, dtype=torch.bool), 0, which, method, True, empty)


class _Dense:
    """Form the matrix from ``P`` identity columns (in chunks of 64) and call ``eigh``."""

    def __init__(self, op: LinearOperator, k: int, which: str):
        self.op, self.k, self.which = op, k, which
        self.A = torch.empty(op.size, op.size, dtype=torch.float64)
        self.done, self.calls = 0, 0

    def run(self, bar) -> None:
        P, op = self.op.size, self.op
        for start in range(0, P, 64):
            stop = min(start + 64, P)
            E = torch.zeros(P, stop - start, dtype=op.dtype, device=op.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            self.A[:, start:stop] = op.matmat(E).to(torch.float64).cpu()
            self.done, self.calls = stop, self.calls + 1
            bar.update(stop - start)

    def result(self, interrupted: bool) -> EigenResult:
        if interrupted:  # an incomplete matrix has no meaningful eigenpairs
            partial = _empty(self.op, self.which, "dense")
            partial.matvecs, partial.passes = self.done, self.calls
            return partial
        A = (self.A + self.A.T) / 2
        theta, S = (t.numpy() for t in torch.linalg.eigh(A))
        idx = order(theta, self.which)[: self.k]
        vecs = torch.from_numpy(S[:, idx].copy())
        res = (A @ vecs - vecs * torch.from_numpy(theta[idx])).norm(dim=0)
        floor = precision_floor(float(np.abs(theta).max(initial=0)), self.op.dtype)
        return EigenResult(
            values=torch.from_numpy(theta[idx].copy()), vectors=vecs.to(self.op.dtype).to(self.op.device),
            residuals=res, converged=torch.ones(len(idx), dtype=torch.bool),  # eigh: exact up to rounding
            matvecs=self.op.size, which=self.which, method="dense",
            error_bounds=res.clamp_min(floor), passes=self.calls,
        )


class _ThickRestart:
    """Thick-restart (block) Lanczos (:class:`hesse.linalg.lanczos.ThickRestart`) on one
    recurrence, its basis kept in ``accumulate`` (the operator's dtype by default)."""

    def __init__(self, op: LinearOperator, k: int, which: str, tol: float, max_matvecs: int,
                 V0: torch.Tensor | None, b: int, ncv: int, gen: torch.Generator, accumulate: torch.dtype):
        self.op, self.k, self.which, self.tol, self.max_matvecs = op, k, which, tol, max_matvecs
        start = V0 if V0 is not None else gaussian_block(op.size, b, gen, op.dtype, op.device)
        if start.shape[1] < b:
            start = torch.cat([start, gaussian_block(op.size, b - start.shape[1], gen, op.dtype, op.device)], 1)
        self.start = start.to(accumulate)
        matmat = op.matmat if accumulate == op.dtype else (lambda X: op.matmat(X.to(op.dtype)).to(accumulate))
        self.lz = Lanczos(matmat, op.size, accumulate, op.device, keep_products=True,
                          on_breakdown="random", generator=gen, capacity=ncv)
        self.driver = ThickRestart(self.lz, k, which, tol, max_matvecs, b, ncv, op.dtype)

    def run(self, bar) -> None:
        self.driver.run(self.start, on_step=bar.update)

    def result(self, interrupted: bool) -> EigenResult:
        """The last iterate if it met the stopping rule, else the best one (by error bound)."""
        d = self.driver
        snap = d.latest if d.reason in ("converged", "floor") else d.best
        if snap is None:
            partial = _empty(self.op, self.which, "lanczos")
            partial.matvecs, partial.passes = self.lz.products, self.lz.calls
            return partial
        conv = (snap.bounds <= self.tol * np.abs(snap.values)) & (not interrupted)
        return EigenResult(
            values=torch.from_numpy(snap.values), vectors=snap.vectors.to(self.op.dtype),
            residuals=torch.from_numpy(snap.residuals), converged=torch.from_numpy(conv),
            matvecs=self.lz.products, which=self.which, method="lanczos", interrupted=interrupted,
            error_bounds=torch.from_numpy(snap.bounds), passes=self.lz.calls,
            notes=[] if interrupted else _notes(d, snap, conv, self.op.dtype),
        )


def _notes(d: ThickRestart, snap: Snapshot, conv: np.ndarray, dtype: torch.dtype) -> list[str]:
    """Why some pairs are not certified: the precision floor, the product cap or no progress."""
    if conv.all() and len(conv) >= d.k:
        return []
    notes = []
    below = snap.targets > d.tol * np.abs(snap.values)
    if below.any():
        notes.append(
            f"precision floor: tol={d.tol:g} is below what {dtype} can certify for pairs "
            f"{np.flatnonzero(below).tolist()} (floor 10 eps ||A|| = {snap.floor:.2e}); they are "
            "returned at the floor, unconverged. Use a larger tol, or a float64 operator."
        )
    if d.reason == "max_matvecs":
        notes.append(f"did not reach tol={d.tol:g} within max_matvecs={d.max_matvecs}; raise max_matvecs or ncv.")
    elif d.reason == "stagnated":
        notes.append(f"did not reach tol={d.tol:g}: the error bounds stopped improving for {PATIENCE} "
                     "restarts (best iterate returned); raise ncv or tol.")
    return notes


class _Power:
    """Power iteration with deflation, on ``sign * A + shift * I``.

    ``sign = -1`` turns "smallest" into "largest". For "largest" the shift starts at 0
    and becomes ``|theta|`` when the dominant remaining eigenvalue ``theta`` turns out
    negative, which makes the largest remaining eigenvalue dominant (the remaining
    spectrum then lies in ``[-|theta|, |theta|]``). Vector ``j`` iterates orthogonally to
    the ``j`` found ones and stops when its deflated residual ``||(I - UU^T) A v - theta v||``
    meets the tolerance; a final Rayleigh-Ritz step on the found vectors (using the stored
    products, no extra ones) removes the errors they left in each other.
    """

    def __init__(self, op: LinearOperator, k: int, which: str, tol: float, max_matvecs: int,
                 V0: torch.Tensor | None, gen: torch.Generator):
        self.op, self.k, self.which, self.tol, self.max_matvecs, self.V0, self.gen = (
            op, k, which, tol, max_matvecs, V0, gen)
        self.sign = -1.0 if which == "smallest" else 1.0
        self.shift, self.matvecs, self.anorm = 0.0, 0, 0.0
        self.U = torch.empty(op.size, 0, dtype=op.dtype, device=op.device)
        self.AU = torch.empty_like(self.U)
        self.current = None  # the (vector, product) being iterated, kept on Ctrl-C

    def run(self, bar) -> None:
        while self.U.shape[1] < self.k and self.matvecs < self.max_matvecs:
            ok, theta = self._iterate(self._start_vector(), bar)
            if ok and self.which != "magnitude" and theta < 0 and self.shift < -theta:
                self.shift = -theta  # a dominant eigenvalue of the wrong sign: shift and retry
                continue
            self._keep_current()

    def _start_vector(self) -> torch.Tensor:
        j, U, op = self.U.shape[1], self.U, self.op
        if self.V0 is not None and j < self.V0.shape[1]:
            v = self.V0[:, j].clone()
        else:
            v = gaussian_block(op.size, 1, self.gen, op.dtype, op.device)[:, 0]
        v = v - U @ (U.T @ v)
        return v / v.norm()

    def _iterate(self, v: torch.Tensor, bar) -> tuple[bool, float]:
        """Iterate one vector until its deflated residual converges; returns (ok, theta)."""
        U, theta = self.U, 0.0
        self.current = None
        while self.matvecs < self.max_matvecs:
            Av = self.op.matvec(v)
            self.matvecs += 1
            bar.update(1)
            self.current = (v, Av)
            w = self.sign * Av
            theta = float(v @ w)
            self.anorm = max(self.anorm, abs(theta))
            deflated = w - U @ (U.T @ w)
            res = float((deflated - theta * v).norm())
            if res <= max(self.tol * abs(theta), precision_floor(self.anorm, self.op.dtype)):
                return True, theta
            v = deflated + self.shift * v
            v = v - U @ (U.T @ v)
            v = v / v.norm()
        return False, theta

    def _keep_current(self) -> None:
        """Add the last multiplied vector and its product to the found ones."""
        if self.current is not None:
            v, Av = self.current
            self.U, self.AU = torch.cat([self.U, v[:, None]], 1), torch.cat([self.AU, Av[:, None]], 1)
        self.current = None

    def result(self, interrupted: bool) -> EigenResult:
        """Rayleigh-Ritz on span(U) with the stored products: honest values and residuals."""
        if interrupted:
            self._keep_current()  # keep the vector being iterated
        op, U, AU = self.op, self.U, self.AU
        H = (U.T @ AU).to(torch.float64).cpu()
        theta, S = small_eigh(((H + H.T) / 2).numpy())
        idx = order(theta, self.which)
        theta, S = theta[idx], torch.from_numpy(np.ascontiguousarray(S[:, idx])).to(op.dtype).to(op.device)
        vectors, products = U @ S, AU @ S
        res = (products - vectors * torch.as_tensor(theta, dtype=op.dtype, device=op.device)).norm(dim=0)
        res = res.to(torch.float64).cpu()
        anorm = max(self.anorm, float(np.abs(theta).max(initial=0)))
        bounds = np.maximum(res.numpy(), precision_floor(anorm, op.dtype))  # no gap bound: neighbours unknown
        conv = (bounds <= self.tol * np.abs(theta)) & (not interrupted)
        return EigenResult(
            values=torch.from_numpy(theta.copy()), vectors=vectors, residuals=res,
            converged=torch.from_numpy(conv), matvecs=self.matvecs, which=self.which, method="power",
            interrupted=interrupted, error_bounds=torch.from_numpy(bounds), passes=self.matvecs,
        )
