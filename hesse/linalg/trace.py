"""Stochastic trace, diagonal and Frobenius-norm estimators.

* Hutchinson (1989): ``tr(A) = E[z^T A z]`` for isotropic ``z``; stderr = sample std / sqrt(m).
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): ``tr(A) = tr(Q^T A Q) + tr((I-QQ^T) A (I-QQ^T))``
  with ``Q`` an orthonormal basis of ``A S`` (m/3 probes) catching the top of the spectrum
  exactly and Hutchinson (m/3 probes) on the deflated rest; stderr is that of the rest.
* XTrace (Epperly, Tropp & Webber 2024): every probe both builds the basis and tests the
  rest, by leave-one-out: ``t_i = tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i``
  with ``Q_i`` a basis of ``A W`` without column ``i``; estimate = mean of ``t_i``,
  stderr = std(t_i)/sqrt(m/2) (the paper's error estimate).
* Diagonal: Hutchinson/Bekas et al. (2007) ``diag(A) = E[z * A z]``; XDiag (same paper as
  XTrace) with the same leave-one-out exchange; or exact from identity columns.
* Frobenius norm: ``||A||_F^2 = E ||A z||^2``.

Probes are multiplied in chunks of ``chunk_size`` columns, one operator call (one data
pass) per chunk. Ctrl-C returns the estimate from the probes already multiplied, with
``interrupted=True`` and a :class:`NotConvergedWarning`.
"""

from __future__ import annotations

import math
import warnings

import torch

from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg._common import (
    DEFAULT_CHUNK,
    check_choice,
    check_positive,
    make_progress,
    prepare_operator,
    probes,
)
from hesse.operators import LinearOperator
from hesse.results import DiagonalResult, NormResult, TraceResult

TRACE_METHODS = ("hutch++", "hutchinson", "xtrace")
DIAG_METHODS = ("hutchinson", "xdiag", "exact")
DISTRIBUTIONS = ("rademacher", "gaussian")
MIN_BUDGET = {"hutchinson": 2, "hutch++": 3, "xtrace": 4, "xdiag": 4}
DEFAULT_BUDGET = 99
RTOL_MAX_BUDGET = 10_000


def _warn_interrupted(what: str, done: int) -> None:
    warnings.warn(
        f"{what} interrupted: returning the estimate from the {done} probes already multiplied "
        "(interrupted=True).", NotConvergedWarning, stacklevel=4,
    )


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    if m == 0:
        return float("nan"), float("inf")
    mean = float(samples.mean())
    return mean, (float(samples.std() / math.sqrt(m)) if m > 1 else float("inf"))


def _check_common(budget, distribution: str, chunk_size: int) -> None:
    if budget is not None:
        check_positive("budget", budget, integer=True)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("chunk_size", chunk_size, integer=True)


def trace(
    op,
    method: str = "hutch++",
    *,
    budget: int | None = None,
    rtol: float | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk_size: int = DEFAULT_CHUNK,
    check_symmetric: bool = True,
    progress: bool = True,
) -> TraceResult:
    """Estimate ``tr(A)`` with ``budget`` single-vector products (default 99).

    ``method``: ``"hutch++"`` (default; best when a few large eigenvalues dominate, as in
    NN Hessians), ``"xtrace"`` (same spectra, about 2x fewer products for the same error)
    or ``"hutchinson"`` (unbiased, error ``~ ||A||_F / sqrt(m)``). With ``rtol`` (Hutchinson
    only) probes are added chunk by chunk until ``stderr <= rtol * |estimate|`` or
    ``budget`` (default 10000) products are used. When ``P <= budget`` the trace is computed
    exactly from ``P`` identity columns (``method="exact"``, ``stderr = 0``).
    """
    check_choice("method", method, TRACE_METHODS)
    _check_common(budget, distribution, chunk_size)
    if rtol is not None:
        check_positive("rtol", rtol)
        if method != "hutchinson":
            raise HesseError(
                f"rtol (adaptive stopping) works with method='hutchinson' only, not {method!r}; "
                "pass budget=... instead, or use method='hutchinson'."
            )
    budget = budget if budget is not None else (RTOL_MAX_BUDGET if rtol is not None else DEFAULT_BUDGET)
    if budget < MIN_BUDGET[method]:
        raise HesseError(f"method {method!r} needs budget >= {MIN_BUDGET[method]}, got {budget}.")
    op, used = prepare_operator(op, check_symmetric, seed)
    gen = torch.Generator().manual_seed(seed)
    if op.size <= budget:  # P identity columns cost no more than the probes: be exact
        with make_progress(op.size, "trace (exact)", progress) as bar:
            diag = _exact_diagonal(op, chunk_size, bar)
        return TraceResult(float(diag.estimate.sum()), 0.0, diag.matvecs + used, "exact", diag.interrupted)
    with make_progress(budget, f"trace ({method})", progress) as bar:
        if method == "hutchinson":
            result = _hutchinson(op, budget, rtol, distribution, gen, chunk_size, bar)
        elif method == "hutch++":
            result = _hutchpp(op, budget, distribution, gen, chunk_size, bar)
        else:
            result = _xtrace(op, budget, distribution, gen, chunk_size, bar)
    result.matvecs += used
    return result


def _hutchinson(op, budget, rtol, distribution, gen, chunk_size, bar) -> TraceResult:
    samples: list[torch.Tensor] = []
    done, interrupted = 0, False
    try:
        while done < budget:
            c = min(chunk_size, budget - done)
            Z = probes(op.size, c, distribution, gen, op)
            samples.append((Z * op.matmat(Z)).sum(0).to(torch.float64).cpu())
            done += c
            bar.update(c)
            if rtol is not None:
                est, err = _mean_stderr(torch.cat(samples))
                if done >= 30 and err <= rtol * abs(est):
                    break
    except KeyboardInterrupt:
        interrupted = True
        _warn_interrupted("trace", done)
    est, err = _mean_stderr(torch.cat(samples) if samples else torch.empty(0))
    return TraceResult(est, err, done, "hutchinson", interrupted)


def _fallback_hutchinson(op, Omega, AOmega_done, method, matvecs) -> TraceResult:
    """Hutchinson on the probes multiplied before an interrupt (they are isotropic probes)."""
    n = AOmega_done.shape[1]
    est, err = _mean_stderr((Omega[:, :n] * AOmega_done).sum(0).to(torch.float64).cpu())
    _warn_interrupted("trace", n)
    return TraceResult(est, err, matvecs, method + " (interrupted: hutchinson on finished probes)", True)


def _chunks_until_interrupt(op, X, chunk_size, bar):
    """``A @ X`` in chunks; returns ``(AX_done, interrupted)`` with the finished columns."""
    out = torch.empty_like(X)
    done = 0
    try:
        for start in range(0, X.shape[1], chunk_size):
            stop = min(start + chunk_size, X.shape[1])
            out[:, start:stop] = op.matmat(X[:, start:stop])
            bar.update(stop - start)
            done = stop
    except KeyboardInterrupt:
        return out[:, :done], True
    return out, False


def _orthonormal_basis(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR in float64 (the basis is small: ``[P, m]``)."""
    return torch.linalg.qr(Y.to(torch.float64))


def _hutchpp(op, budget, distribution, gen, chunk_size, bar) -> TraceResult:
    s = budget // 3
    g = budget - 2 * s
    S = probes(op.size, s, distribution, gen, op)
    AS, interrupted = _chunks_until_interrupt(op, S, chunk_size, bar)
    if interrupted:
        return _fallback_hutchinson(op, S, AS, "hutch++", AS.shape[1])
    Q, _ = _orthonormal_basis(AS)
    G = probes(op.size, g, distribution, gen, op).to(torch.float64)
    G = G - Q @ (Q.T @ G)
    G = G - Q @ (Q.T @ G)
    X = torch.cat([Q, G], 1).to(op.dtype)
    AX, interrupted = _chunks_until_interrupt(op, X, chunk_size, bar)
    done = AX.shape[1]
    if done < s:  # the exact part is incomplete: fall back to the sketch probes
        return _fallback_hutchinson(op, S, AS, "hutch++", s + done)
    AX = AX.to(torch.float64)
    exact = float((Q * AX[:, :s]).sum())
    rest = (G[:, : done - s] * AX[:, s:done]).sum(0).cpu()
    est, err = _mean_stderr(rest)
    if interrupted:
        _warn_interrupted("trace", done)
    return TraceResult(exact + (est if rest.numel() else 0.0), err, s + done, "hutch++", interrupted)


def _leave_one_out(Omega: torch.Tensor, Y: torch.Tensor, alternative: str):
    """Shared XTrace/XDiag quantities: ``Q, R`` of ``Y = A Omega``, ``W = Q^T Omega`` and the
    unit vectors ``s_i ~ R^{-T} e_i`` with ``Q s_i`` orthogonal to all columns of ``Y`` but ``i``."""
    Q, R = _orthonormal_basis(Y)
    diag = R.diagonal().abs()
    if float(diag.min()) <= 1e-12 * float(diag.max()):
        raise HesseError(
            "the sketch A @ probes is rank deficient (the operator has rank below budget/2); "
            f"use {alternative} or a smaller budget."
        )
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    Rinv_T = torch.linalg.solve_triangular(R, eye, upper=True).T
    S = Rinv_T / Rinv_T.norm(dim=0)
    return Q, R, Q.T @ Omega.to(torch.float64), S


def _xtrace(op, budget, distribution, gen, chunk_size, bar) -> TraceResult:
    m = budget // 2
    Omega = probes(op.size, m, distribution, gen, op)
    if distribution == "gaussian":  # uniform on the sphere of radius sqrt(P), as in the paper
        Omega = Omega * (math.sqrt(op.size) / Omega.norm(dim=0))
    Y, interrupted = _chunks_until_interrupt(op, Omega, chunk_size, bar)
    if interrupted:
        return _fallback_hutchinson(op, Omega, Y, "xtrace", Y.shape[1])
    Q, R, W, S = _leave_one_out(Omega, Y, "method='hutch++' (exact for low rank)")
    Z, interrupted = _chunks_until_interrupt(op, Q.to(op.dtype), chunk_size, bar)
    if interrupted:
        return _fallback_hutchinson(op, Omega, Y, "xtrace", m + Z.shape[1])
    H = Q.T @ Z.to(torch.float64)
    H = (H + H.T) / 2
    Omega, Y = Omega.to(torch.float64), Y.to(torch.float64)
    c = (S * W).sum(0)
    if distribution == "gaussian":  # the paper's "improved" rescaling of sphere probes
        scale = math.sqrt(op.size - m + 1) / torch.sqrt(op.size - (W * W).sum(0) + c**2)
        Omega, Y, R, W, c = Omega * scale, Y * scale, R * scale, W * scale, c * scale
    D = W - S * c
    per_probe = (
        torch.trace(H)
        - (S * (H @ S)).sum(0)
        + (Omega * Y).sum(0)
        - 2 * (R * D).sum(0)
        + (D * (H @ D)).sum(0)
    ).cpu()
    est, err = _mean_stderr(per_probe)
    return TraceResult(est, err, 2 * m, "xtrace", False)


def diagonal(
    op,
    method: str = "xdiag",
    *,
    budget: int | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk_size: int = DEFAULT_CHUNK,
    check_symmetric: bool = True,
    progress: bool = True,
) -> DiagonalResult:
    """Estimate ``diag(A)`` (a ``[P]`` tensor) with ``budget`` products (default 99).

    ``"hutchinson"``: mean of ``z * (A z)``, per-entry stderr std/sqrt(m).
    ``"xdiag"`` (default): ``diag(Q_i Q_i^T A) + w_i * ((I - Q_i Q_i^T) A w_i)`` averaged over
    the leave-one-out bases ``Q_i``; exact for matrices of rank < budget/2 in the top part.
    ``"exact"``: ``P`` products with identity columns (``budget`` ignored), stderr ``None``.
    """
    check_choice("method", method, DIAG_METHODS)
    _check_common(budget, distribution, chunk_size)
    budget = budget if budget is not None else DEFAULT_BUDGET
    if method in MIN_BUDGET and budget < MIN_BUDGET[method]:
        raise HesseError(f"method {method!r} needs budget >= {MIN_BUDGET[method]}, got {budget}.")
    op, used = prepare_operator(op, check_symmetric, seed)
    gen = torch.Generator().manual_seed(seed)
    if op.size <= budget:  # P identity columns cost no more than the probes: be exact
        method = "exact"
    total = op.size if method == "exact" else budget
    with make_progress(total, f"diagonal ({method})", progress) as bar:
        if method == "exact":
            result = _exact_diagonal(op, chunk_size, bar)
        elif method == "hutchinson":
            Z = probes(op.size, budget, distribution, gen, op)
            AZ, interrupted = _chunks_until_interrupt(op, Z, chunk_size, bar)
            n = AZ.shape[1]
            if interrupted:
                _warn_interrupted("diagonal", n)
            samples = (Z[:, :n] * AZ).to(torch.float64)
            std = samples.std(1) / math.sqrt(n) if n > 1 else torch.full((op.size,), float("inf"))
            result = DiagonalResult(samples.mean(1), std, n, "hutchinson", interrupted)
        else:
            result = _xdiag(op, budget, distribution, gen, chunk_size, bar)
    result.matvecs += used
    return result


def _exact_diagonal(op: LinearOperator, chunk_size: int, bar) -> DiagonalResult:
    P = op.size
    diag = torch.empty(P, dtype=torch.float64)
    done, interrupted = 0, False
    try:
        for start in range(0, P, chunk_size):
            stop = min(start + chunk_size, P)
            E = torch.zeros(P, stop - start, dtype=op.dtype, device=op.device)
            rows = torch.arange(start, stop, device=op.device)
            E[rows, rows - start] = 1
            diag[start:stop] = op.matmat(E)[rows, rows - start].to(torch.float64).cpu()
            done = stop
            bar.update(stop - start)
    except KeyboardInterrupt:
        interrupted = True
        diag[done:] = float("nan")
        warnings.warn(f"diagonal interrupted: entries {done}..{P - 1} are NaN (interrupted=True).",
                      NotConvergedWarning, stacklevel=3)
    return DiagonalResult(diag, None, done, "exact", interrupted)


def _xdiag(op, budget, distribution, gen, chunk_size, bar) -> DiagonalResult:
    m = budget // 2
    Omega = probes(op.size, m, distribution, gen, op)
    Y, interrupted = _chunks_until_interrupt(op, Omega, chunk_size, bar)
    if not interrupted:
        Q, R, _, S = _leave_one_out(Omega, Y, "method='exact' or 'hutchinson'")
        Z, interrupted = _chunks_until_interrupt(op, Q.to(op.dtype), chunk_size, bar)
    if interrupted:  # Hutchinson on the sketch probes that finished
        n = Y.shape[1]
        _warn_interrupted("diagonal", n)
        samples = (Omega[:, :n] * Y[:, :n]).to(torch.float64)
        std = samples.std(1) / math.sqrt(n) if n > 1 else torch.full((op.size,), float("inf"))
        done = n if Y.shape[1] < m else m + Z.shape[1]
        return DiagonalResult(samples.mean(1), std, done, "xdiag (interrupted: hutchinson)", True)
    Z = Z.to(torch.float64)
    QS, ZS = Q @ S, Z @ S
    base = (Q * Z).sum(1, keepdim=True)
    coef = (S * R).sum(0)
    per_probe = base - QS * ZS + Omega.to(torch.float64) * QS * coef
    return DiagonalResult(per_probe.mean(1).cpu(), (per_probe.std(1) / math.sqrt(m)).cpu(), 2 * m, "xdiag")


def frobenius_norm(
    op,
    *,
    budget: int | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk_size: int = DEFAULT_CHUNK,
    check_symmetric: bool = True,
    progress: bool = True,
) -> NormResult:
    """Estimate ``||A||_F`` from ``E ||A z||^2 = ||A||_F^2`` with ``budget`` probes (default 99).

    The stderr of the norm comes from that of the square by the delta method:
    ``se(F) = se(F^2) / (2 F)``.
    """
    _check_common(budget, distribution, chunk_size)
    budget = budget if budget is not None else DEFAULT_BUDGET
    if budget < 2:
        raise HesseError(f"frobenius_norm needs budget >= 2 to report a stderr, got {budget}.")
    op, used = prepare_operator(op, check_symmetric, seed)
    gen = torch.Generator().manual_seed(seed)
    with make_progress(budget, "frobenius_norm", progress) as bar:
        Z = probes(op.size, budget, distribution, gen, op)
        AZ, interrupted = _chunks_until_interrupt(op, Z, chunk_size, bar)
    n = AZ.shape[1]
    if interrupted:
        _warn_interrupted("frobenius_norm", n)
    sq, sq_err = _mean_stderr((AZ.to(torch.float64) ** 2).sum(0).cpu())
    norm = math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else float("nan")
    err = sq_err / (2 * norm) if norm > 0 else float("inf")
    return NormResult(norm, err, n + used, "hutchinson", interrupted)
