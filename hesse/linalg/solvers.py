"""Damped inverse products ``x = (C + lam I)^{-1} b`` with only products ``C @ V``.

Influence functions (Koh & Liang 2017), natural-gradient steps, OBS pruning and Laplace
approximations need ``(C + lam I)^{-1} b`` for a curvature ``C`` too large to factorise.
Every solver sees only an operator (anything :func:`hesse.as_operator` accepts), takes the
damping ``lam`` (or an operator already damped with ``C + lam * hesse.Identity(P)``), solves
for one ``b`` of shape ``[P]`` or several at once (``[P, K]``: one product of ``C`` per step
for all columns, i.e. one data pass for a curvature operator) and returns a
:class:`SolveResult`.

Which route (cost in products of ``C``, ``kappa = (lam_max + lam) / (lam_min + lam)``):

* :func:`cg` conjugate gradients (Hestenes & Stiefel 1952): ``C + lam I`` positive definite
  (GGN, Fisher, K-FAC); ``O(sqrt(kappa) log(1/tol))`` products; optional preconditioner
  (e.g. ``KFAC(...).inverse(lam)``).
* :func:`minres` (Paige & Saunders 1975): symmetric but indefinite (a damped Hessian away
  from a minimum); same order of products, minimises the residual.
* :func:`neumann` truncated Neumann series and :func:`lissa` (Agarwal, Bullins & Hazan 2017,
  the recursion of influence-function papers): ``O(kappa log(1/tol))`` products, no inner
  products, stochastic mini-batch curvatures allowed; need a scale ``s > lam_max + lam``.
* :func:`lowrank_inverse` / :func:`lowrank_solve` (Arnoldi influence, Schioppa et al. 2022):
  ``k`` top eigenpairs by Lanczos once, then every solve is free; exact on the top
  eigenspace, ``1/lam`` on the rest.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from hesse.errors import HesseError, NotConvergedWarning, check_on_interrupt, interrupted
from hesse.linalg.checks import check_positive
from hesse.linalg.eigen import eigenvalues
from hesse.operators import Identity, LinearOperator, as_operator
from hesse.results import EigenResult, _ResultMixin

POWER_STEPS = 20
SCALE_MARGIN = 1.25


@dataclass(repr=False)
class SolveResult(_ResultMixin):
    """The solution of ``(C + lam I) x = b`` and how it was obtained.

    ``solution`` has the shape of ``b``; ``matvecs`` counts single-vector products of ``C``
    (a product with ``K`` columns counts ``K``), ``passes`` the calls of ``C`` (data passes
    for a curvature operator); ``residuals[k] = ||b_k - (C + lam I) x_k|| / ||b_k||`` (the
    recurrence's value for CG/MINRES, which tracks the true one in float64);
    ``history`` the largest relative residual after each step.
    """

    solution: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    matvecs: int
    passes: int
    iterations: int
    method: str
    history: list[float] = field(default_factory=list)
    interrupted: bool = False
    _skip_in_dict = ("solution",)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def __repr__(self) -> str:
        flag = " INTERRUPTED" if self.interrupted else ""
        return (f"SolveResult({self.method}, max_residual={float(self.residuals.max()):.3g}, "
                f"converged={self.all_converged}, iterations={self.iterations}, matvecs={self.matvecs}, "
                f"passes={self.passes}{flag})")


class _Counted:
    """``C + lam I`` as a ``[P, K]`` product, counting products and passes of ``C``."""

    def __init__(self, op, damping: float):
        self.op = as_operator(op)
        if self.op.shape[0] != self.op.shape[1]:
            raise HesseError(f"the operator must be square, got shape {list(self.op.shape)}.")
        if not math.isfinite(damping):
            raise HesseError(f"damping must be a finite number, got {damping!r}.")
        self.damping, self.matvecs, self.passes = float(damping), 0, 0

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        if V.shape[1] == 0:
            return V.clone()
        self.matvecs += V.shape[1]
        self.passes += 1
        out = self.op.matmat(V)
        return out + self.damping * V if self.damping else out

    def right_hand_side(self, b: torch.Tensor) -> torch.Tensor:
        """``b`` as ``[P, K]`` in the operator's dtype/device (checked)."""
        if not isinstance(b, torch.Tensor) or b.ndim not in (1, 2) or b.shape[0] != self.op.shape[0]:
            shape = list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise HesseError(f"b must be a tensor [P] or [P, K] with P = {self.op.shape[0]}, got {shape}.")
        return (b[:, None] if b.ndim == 1 else b).to(self.op.dtype).to(self.op.device)

    def result(self, X: torch.Tensor, b: torch.Tensor, residuals: torch.Tensor, tol: float, iterations: int,
               method: str, history: list[float]) -> SolveResult:
        """A :class:`SolveResult` with ``X`` back in the shape of ``b``."""
        solution = X[:, 0].clone() if b.ndim == 1 else X.clone()
        residuals = residuals.detach().cpu().to(torch.float64)
        return SolveResult(solution, residuals, residuals <= tol, self.matvecs, self.passes, iterations,
                           method, list(history))


def _relative(R: torch.Tensor, bnorm: torch.Tensor) -> torch.Tensor:
    """``||r_k|| / ||b_k||`` (``||r_k||`` where ``b_k = 0``)."""
    return R.norm(dim=0) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _warn(method: str, result: SolveResult, tol: float, hint: str) -> None:
    if not result.all_converged and not result.interrupted:
        bad = int((~result.converged).sum())
        warnings.warn(f"{method}: {bad} of {len(result.converged)} right-hand sides did not reach tol={tol:g} "
                      f"(largest relative residual {float(result.residuals.max()):.2e} after "
                      f"{result.iterations} steps); {hint}", NotConvergedWarning, stacklevel=3)


def _check_common(tol: float, maxiter: int, on_interrupt: str) -> None:
    check_positive("tol", tol)
    check_positive("maxiter", maxiter, integer=True)
    check_on_interrupt(on_interrupt)


def cg(op, b: torch.Tensor, *, damping: float = 0.0, tol: float = 1e-6, maxiter: int = 1000,
       preconditioner=None, x0: torch.Tensor | None = None, on_interrupt: str = "raise") -> SolveResult:
    """Preconditioned conjugate gradients for ``(C + lam I) x = b``, all columns of ``b`` at once.

    Each column runs its own CG (Hestenes & Stiefel 1952); every step multiplies only the
    columns not yet converged (``||r_k|| <= tol ||b_k||``), in one product. Needs ``C + lam I``
    symmetric positive definite; a direction of non-positive curvature ``p^T A p <= 0``
    ends that column (reported unconverged; use :func:`minres` for indefinite matrices).
    ``preconditioner`` is an operator ``M ~ (C + lam I)^{-1}`` (e.g. ``hesse.KFAC(...).inverse(lam)``).
    Error after ``j`` steps: ``||e_j||_A <= 2 ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^j ||e_0||_A``.
    """
    _check_common(tol, maxiter, on_interrupt)
    A = _Counted(op, damping)
    B = A.right_hand_side(b)
    M = as_operator(preconditioner).matmat if preconditioner is not None else (lambda R: R)
    X = torch.zeros_like(B) if x0 is None else A.right_hand_side(x0).clone()
    state = _CGState(A, M, B, X)
    try:
        for _ in range(maxiter):
            if not state.step(tol):
                break
    except KeyboardInterrupt as error:
        partial = A.result(state.X, b, state.residuals(), tol, state.iterations, "cg", state.history)
        return interrupted(error, partial, on_interrupt, "cg")
    result = A.result(state.X, b, state.residuals(), tol, state.iterations, "cg", state.history)
    if state.breakdown.any():
        result.converged &= ~state.breakdown.cpu()
    _warn("cg", result, tol, "raise maxiter or damping, pass a preconditioner, or use minres if the "
          "matrix is indefinite" + (" (non-positive curvature met)" if state.breakdown.any() else "") + ".")
    return result


class _CGState:
    """The iterates of K independent preconditioned CG recurrences."""

    def __init__(self, A: _Counted, M, B: torch.Tensor, X: torch.Tensor):
        self.A, self.M, self.X, self.iterations, self.history = A, M, X, 0, []
        self.bnorm = B.norm(dim=0)
        self.R = B - A(X) if bool(X.any()) else B.clone()
        self.Z = M(self.R)
        self.P = self.Z.clone()
        self.rz = (self.R * self.Z).sum(0)
        self.breakdown = torch.zeros(B.shape[1], dtype=torch.bool, device=B.device)

    def residuals(self) -> torch.Tensor:
        return _relative(self.R, self.bnorm)

    def step(self, tol: float) -> bool:
        """One CG step on the active columns; ``False`` when none is left."""
        active = (self.residuals() > tol) & ~self.breakdown
        if not bool(active.any()):
            return False
        idx = active.nonzero()[:, 0]
        P = self.P[:, idx]
        AP = self.A(P)
        curvature = (P * AP).sum(0)
        bad = curvature <= 0
        self.breakdown[idx[bad]] = True
        alpha = torch.where(bad, torch.zeros_like(curvature), self.rz[idx] / torch.where(bad, 1.0, curvature))
        self.X[:, idx] += alpha * P
        self.R[:, idx] -= alpha * AP
        Z = self.M(self.R[:, idx])
        rz = (self.R[:, idx] * Z).sum(0)
        beta = rz / torch.where(self.rz[idx] == 0, 1.0, self.rz[idx])
        self.P[:, idx] = Z + beta * P
        self.rz[idx] = rz
        self.iterations += 1
        self.history.append(float(self.residuals().max()))
        return True


def minres(op, b: torch.Tensor, *, damping: float = 0.0, tol: float = 1e-6, maxiter: int = 1000,
           on_interrupt: str = "raise") -> SolveResult:
    """MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite ``C + lam I``.

    Minimises ``||b - (C + lam I) x_j||`` over the Krylov space of step ``j`` (per column,
    all columns in one product per step), so the residual never increases; works for a
    damped Hessian with negative eigenvalues, where CG may break down. A singular
    consistent system converges to a least-squares solution.
    """
    _check_common(tol, maxiter, on_interrupt)
    A = _Counted(op, damping)
    B = A.right_hand_side(b)
    state = _MinresState(A, B)
    try:
        for _ in range(maxiter):
            if not state.step(tol):
                break
    except KeyboardInterrupt as error:
        partial = A.result(state.X, b, state.residuals(), tol, state.iterations, "minres", state.history)
        return interrupted(error, partial, on_interrupt, "minres")
    result = A.result(state.X, b, state.residuals(), tol, state.iterations, "minres", state.history)
    _warn("minres", result, tol, "raise maxiter or damping.")
    return result


class _MinresState:
    """K MINRES recurrences (the unpreconditioned form of SciPy's ``minres``), scalars as ``[K]`` tensors."""

    def __init__(self, A: _Counted, B: torch.Tensor):
        self.A, self.X, self.iterations, self.history = A, torch.zeros_like(B), 0, []
        zeros = B.new_zeros(B.shape[1])
        self.bnorm = B.norm(dim=0)
        self.r1, self.r2, self.y = B.clone(), B.clone(), B.clone()
        self.beta, self.oldb, self.phibar = self.bnorm.clone(), zeros.clone(), self.bnorm.clone()
        self.dbar, self.epsln, self.cs, self.sn = zeros.clone(), zeros.clone(), -torch.ones_like(zeros), zeros.clone()
        self.w, self.w2 = torch.zeros_like(B), torch.zeros_like(B)

    def residuals(self) -> torch.Tensor:
        return self.phibar / torch.where(self.bnorm > 0, self.bnorm, torch.ones_like(self.bnorm))

    def step(self, tol: float) -> bool:
        """One Lanczos step and Givens update on the active columns; ``False`` when none is left."""
        active = (self.residuals() > tol) & (self.beta > 0)
        if not bool(active.any()):
            return False
        idx = active.nonzero()[:, 0]
        beta, oldb = self.beta[idx], self.oldb[idx]
        v = self.y[:, idx] / beta
        y = self.A(v)
        if self.iterations > 0:
            y = y - (beta / torch.where(oldb > 0, oldb, 1.0)) * self.r1[:, idx]
        alfa = (v * y).sum(0)
        y = y - (alfa / beta) * self.r2[:, idx]
        self.r1[:, idx], self.r2[:, idx], self.y[:, idx] = self.r2[:, idx], y, y
        self.oldb[idx], new_beta = beta, y.norm(dim=0)
        self.beta[idx] = new_beta
        self._givens(idx, v, alfa, new_beta)
        self.iterations += 1
        self.history.append(float(self.residuals().max()))
        return True

    def _givens(self, idx: torch.Tensor, v: torch.Tensor, alfa: torch.Tensor, beta: torch.Tensor) -> None:
        """Apply the previous rotation, form the next, and update ``x`` along the new direction."""
        cs, sn, dbar = self.cs[idx], self.sn[idx], self.dbar[idx]
        oldeps = self.epsln[idx]
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        self.epsln[idx], self.dbar[idx] = sn * beta, -cs * beta
        gamma = torch.sqrt(gbar ** 2 + beta ** 2).clamp(min=torch.finfo(v.dtype).tiny)
        cs, sn = gbar / gamma, beta / gamma
        self.cs[idx], self.sn[idx] = cs, sn
        phi = cs * self.phibar[idx]
        self.phibar[idx] = sn * self.phibar[idx]
        w1, w2 = self.w2[:, idx], self.w[:, idx]
        w = (v - oldeps * w1 - delta * w2) / gamma
        self.w2[:, idx], self.w[:, idx] = w2, w
        self.X[:, idx] += phi * w


def _scale(A: _Counted, scale: float | None, power_steps: int, seed: int) -> float:
    """The Neumann scale ``s``: given (checked), or ``1.25 x`` a power-iteration estimate of ``lam_max + lam``.

    The recursion converges iff every eigenvalue ``mu`` of ``C + lam I`` satisfies
    ``|1 - mu/s| < 1``, i.e. ``0 < mu < 2 s``; with ``s >= lam_max + lam`` (the condition of
    Agarwal et al.) all factors lie in ``[0, 1)``. Power iteration underestimates
    ``lam_max``, so ``s <= estimate / 2`` is certain divergence (refused) and ``s < estimate``
    is warned about.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(A.op.shape[0], 1, generator=gen, dtype=torch.float64).to(A.op.dtype).to(A.op.device)
    estimate = 0.0
    for _ in range(power_steps):
        v = v / v.norm()
        w = A(v)
        estimate = float((v * w).sum())
        v = w
    if scale is None:
        if estimate <= 0:
            raise HesseError("C + lam I has no positive curvature along the power iterate; the Neumann series "
                             "needs a positive definite matrix (use minres).")
        return SCALE_MARGIN * estimate
    if scale <= estimate / 2:
        raise HesseError(f"scale={scale:g} is at most half of lam_max + lam >= {estimate:.4g} (power iteration): "
                         f"the series diverges; use scale > {estimate:.4g} (or leave scale=None).")
    if scale < estimate:
        warnings.warn(f"scale={scale:g} is below lam_max + lam >= {estimate:.4g}: the top eigen-directions "
                      "oscillate and converge slowly (or diverge if lam_max is above 2 scale); use a larger scale.",
                      NotConvergedWarning, stacklevel=3)
    return float(scale)


def neumann(op, b: torch.Tensor, *, damping: float = 0.0, scale: float | None = None, tol: float = 1e-6,
            maxiter: int = 1000, power_steps: int = POWER_STEPS, seed: int = 0,
            on_interrupt: str = "raise") -> SolveResult:
    """Truncated Neumann series ``x_J = (1/s) sum_{j<J} (I - (C + lam I)/s)^j b``.

    The residual is known for free: ``b - (C + lam I) x_J = (I - (C + lam I)/s)^J b``, so the
    series stops as soon as it is below ``tol ||b||``. Converges for ``s > (lam_max + lam)/2``
    with rate ``1 - (lam_min + lam)/s`` per product, i.e. about ``kappa log(1/tol)``
    products for ``s ~ lam_max + lam``: slower than :func:`cg` but needs no inner products.
    ``scale=None`` takes 1.25 x a ``power_steps``-step power-iteration estimate (products counted).
    """
    _check_common(tol, maxiter, on_interrupt)
    A = _Counted(op, damping)
    B = A.right_hand_side(b)
    s = _scale(A, scale, power_steps, seed)
    bnorm, X, T, history, steps = B.norm(dim=0), torch.zeros_like(B), B.clone(), [], 0
    try:
        while steps < maxiter and float(_relative(T, bnorm).max()) > tol:
            X = X + T / s
            T = T - A(T) / s
            steps += 1
            history.append(float(_relative(T, bnorm).max()))
    except KeyboardInterrupt as error:
        partial = A.result(X, b, _relative(T, bnorm), tol, steps, "neumann", history)
        return interrupted(error, partial, on_interrupt, "neumann")
    result = A.result(X, b, _relative(T, bnorm), tol, steps, "neumann", history)
    _warn("neumann", result, tol, "raise maxiter or damping (the series needs about kappa steps), or use cg.")
    return result


def lissa(op, b: torch.Tensor, *, damping: float = 0.0, scale: float | None = None, depth: int = 100,
          repeats: int = 1, batch_operators=None, tol: float = 1e-6, power_steps: int = POWER_STEPS,
          seed: int = 0, on_interrupt: str = "raise") -> SolveResult:
    """LiSSA (Agarwal, Bullins & Hazan 2017) as influence-function papers run it.

    ``x_{j+1} = b + (I - (C_j + lam I)/s) x_j`` for ``depth`` steps, result ``x / s``,
    averaged over ``repeats`` runs. ``C_j`` is drawn (seeded, uniformly) from
    ``batch_operators`` (e.g. ``[hesse.GGN(model, loss, [batch]) for batch in loader]``),
    so each step costs one mini-batch product: an unbiased, noisy recursion. Without
    ``batch_operators``, ``C_j = C`` and LiSSA is the :func:`neumann` series with a fixed
    number of terms. The scale ``s`` is checked against ``lam_max(C) + lam`` by power
    iteration (see :func:`neumann`). The reported residual is measured on ``C`` with one more product.
    """
    _check_common(tol, depth, on_interrupt)
    check_positive("repeats", repeats, integer=True)
    A = _Counted(op, damping)
    B = A.right_hand_side(b)
    s = _scale(A, scale, power_steps, seed)
    steps = [_Counted(o, damping) for o in batch_operators] if batch_operators else [A]
    gen = torch.Generator().manual_seed(seed)
    total, history = torch.zeros_like(B), []  # no per-step residual: it would cost a product of C
    try:
        for r in range(repeats):
            X = B.clone()
            for _ in range(depth):
                step = steps[int(torch.randint(len(steps), (1,), generator=gen))]
                X = B + X - step(X) / s
            total = total + X / s
    except KeyboardInterrupt as error:  # the finished repeats; residual not measured (NaN)
        unknown = torch.full((B.shape[1],), float("nan"))
        partial = A.result(total / max(r, 1), b, unknown, tol, r * depth, "lissa", history)
        return interrupted(error, partial, on_interrupt, "lissa")
    X = total / repeats
    result = A.result(X, b, _relative(B - A(X), B.norm(dim=0)), tol, repeats * depth, "lissa", history)
    result.matvecs += sum(c.matvecs for c in steps if c is not A)
    result.passes += sum(c.passes for c in steps if c is not A)
    _warn("lissa", result, tol, "raise depth (about kappa steps are needed) or repeats, or use cg.")
    return result


class LowRankInverse(LinearOperator):
    """``(C + lam I)^{-1} ~ U diag(1/(theta + lam)) U^T + (I - U U^T)/lam`` from top eigenpairs ``(theta, U)``.

    Exact on the span of ``U``; elsewhere it replaces ``C`` by 0, which is accurate when the
    rest of the spectrum is small compared with ``lam`` (Schioppa et al. 2022). Products are free.
    """

    symmetric_by_construction = True

    def __init__(self, eigen: EigenResult, damping: float):
        if damping <= 0:
            raise HesseError(f"the low-rank inverse needs damping > 0 (the complement is scaled by 1/damping), "
                             f"got {damping}.")
        self.eigen, self.damping = eigen, float(damping)
        self.U, self.theta = eigen.vectors, eigen.values
        P = self.U.shape[0]
        self.shape, self.dtype, self.device = (P, P), self.U.dtype, self.U.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        coeff = self.U.T @ V
        inside = self.U @ (coeff / (self.theta + self.damping)[:, None])
        return inside + (V - self.U @ coeff) / self.damping


def lowrank_inverse(op, damping: float, rank: int = 20, *, tol: float = 1e-4, seed: int = 0,
                    **lanczos_options) -> LowRankInverse:
    """The low-rank-plus-damping inverse from the ``rank`` largest eigenpairs (:func:`hesse.linalg.eigenvalues`).

    Costs one Lanczos run (``~2-4 rank`` products for a clustered top spectrum); ``.eigen``
    holds the eigenpairs and their product count. Needs ``C`` positive semi-definite for
    the complement term to be an upper bound.
    """
    check_positive("damping", damping)
    eigen = eigenvalues(as_operator(op), k=rank, which="largest", tol=tol, seed=seed, **lanczos_options)
    return LowRankInverse(eigen, damping)


def lowrank_solve(op, b: torch.Tensor, *, damping: float, rank: int = 20, tol: float = 1e-4, seed: int = 0,
                  inverse: LowRankInverse | None = None) -> SolveResult:
    """``x = LowRankInverse @ b`` (reusing ``inverse`` if given), with the true residual from one product of ``C``.

    ``converged`` compares the residual with ``tol``; the low-rank route is an approximation
    whose error is set by ``rank`` and ``damping``, not by iterations.
    """
    A = _Counted(op, damping)
    B = A.right_hand_side(b)
    inverse = inverse if inverse is not None else lowrank_inverse(A.op, damping, rank, tol=tol, seed=seed)
    X = inverse.matmat(B)
    result = A.result(X, b, _relative(B - A(X), B.norm(dim=0)), tol, 0, "lowrank", [])
    result.matvecs += inverse.eigen.matvecs
    return result


def damped(op, damping: float) -> LinearOperator:
    """``C + lam I`` as an operator (the same as ``op + damping * hesse.Identity(P, dtype, device)``)."""
    op = as_operator(op)
    return op + damping * Identity(op.shape[0], op.dtype, op.device)
