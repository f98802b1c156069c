"""Stochastic trace, diagonal and Frobenius-norm estimators.

* Hutchinson (1989): ``tr(A) = E[z^T A z]`` for isotropic ``z``; stderr = sample std / sqrt(m).
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): ``tr(A) = tr(Q^T A Q) + tr((I-QQ^T) A (I-QQ^T))``
  with ``Q`` an orthonormal basis of ``A S`` (m/3 probes) catching the top of the spectrum
  exactly and Hutchinson (m/3 probes) on the deflated rest; stderr is that of the rest.
* XTrace (Epperly, Tropp & Webber 2024): every probe both builds the basis and tests the
  rest, by leave-one-out: ``t_i = tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i``
  with ``Q_i`` a basis of ``A W`` without column ``i``; estimate = mean of ``t_i``,
  stderr = std(t_i)/sqrt(m) (the paper's error estimate).
* Adaptive trace (``rtol``, and the default call): Hutch++ and XTrace grow their budget by
  doubling, keeping every finished product (:class:`_Sketch`), until the estimator's own
  stderr is within ``rtol`` of the estimate or the cap is reached; Hutchinson adds chunks.
* Diagonal: Hutchinson/Bekas et al. (2007) ``diag(A) = E[z * A z]``; XDiag (same paper as
  XTrace) with the same leave-one-out exchange; or exact from identity columns.
* Frobenius norm: ``||A||_F^2 = E ||A z||^2``.

Probes (:mod:`hesse.linalg.probes`) are multiplied in chunks of ``chunk_size`` columns, one
operator call (one data pass) per chunk. On Ctrl-C the estimate from the products already
finished (``interrupted=True``) is attached to the ``KeyboardInterrupt`` as ``.partial``, or
returned with ``on_interrupt="return"`` (see :mod:`hesse.errors`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from hesse._progress import progress_bar
from hesse.errors import HesseError, check_on_interrupt, interrupted
from hesse.linalg.checks import check_choice, check_positive, prepare_operator
from hesse.linalg.lanczos import orthonormalize_against
from hesse.linalg.probes import DEFAULT_CHUNK, DISTRIBUTIONS, isotropic_probes
from hesse.operators import LinearOperator, as_operator
from hesse.results import DiagonalResult, NormResult, TraceResult

TRACE_METHODS = ("hutch++", "hutchinson", "xtrace")
DIAG_METHODS = ("hutchinson", "xdiag", "exact", "sampled")
SAMPLED_PASS_BYTES = 2**30  # one pass draws at most this much of a square root ``W`` (``P x columns``)
MIN_BUDGET = {"hutchinson": 2, "hutch++": 3, "xtrace": 4, "xdiag": 4, "sampled": 2}
DEFAULT_BUDGET = 99
RTOL_MAX_BUDGET = 10_000
DEFAULT_RTOL = 0.01  # trace(op) with no budget: about 1%
DEFAULT_MAX_MATVECS = 300  # ... within at most this many products
MIN_ADAPTIVE = 30  # adaptive Hutchinson trusts its stderr from this many samples on
START_PROBES = 10  # probes of the first adaptive round (enough for a first stderr)


class _Run:
    """Products finished so far and how to turn them into a partial result on Ctrl-C."""

    def __init__(self, op: LinearOperator, chunk_size: int, bar):
        self.op, self.chunk_size, self.bar = op, chunk_size, bar
        self.matvecs, self.done, self.calls = 0, 0, 0
        self.out = torch.empty(op.size, 0, dtype=op.dtype, device=op.device)
        self.finished_diagonal = torch.empty(0, dtype=torch.float64)  # exact diagonal entries so far
        self.partial: Callable[[], object] = lambda: None

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` in chunks; ``self.out[:, :self.done]`` holds the finished columns."""
        self.out, self.done = torch.empty_like(X), 0
        for start in range(0, X.shape[1], self.chunk_size):
            stop = min(start + self.chunk_size, X.shape[1])
            self.out[:, start:stop] = self.op.matmat(X[:, start:stop])
            self.done, self.matvecs, self.calls = stop, self.matvecs + stop - start, self.calls + 1
            self.bar.update(stop - start)
        return self.out

    def finished(self) -> torch.Tensor:
        return self.out[:, : self.done]


def _run_guarded(op: LinearOperator, used: int, chunk_size: int, total: int, desc: str, progress: bool | None,
                 on_interrupt: str, algorithm: Callable[[_Run], object]):
    """Run ``algorithm`` under a progress bar, adding the ``used`` products of the symmetry
    check; on Ctrl-C hand its partial result to :func:`hesse.errors.interrupted`."""
    with progress_bar(total=total, desc=desc, enabled=progress, unit="matvec") as bar:
        run = _Run(op, chunk_size, bar)
        try:
            result = algorithm(run)
        except KeyboardInterrupt as error:
            partial = run.partial()
            partial.matvecs, partial.passes = partial.matvecs + used, run.calls + (used > 0)
            return interrupted(error, partial, on_interrupt, desc.split(" ")[0])
    result.matvecs, result.passes = result.matvecs + used, run.calls + (used > 0)
    return result


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    if m == 0:
        return float("nan"), float("inf")
    mean = float(samples.mean())
    return mean, (float(samples.std() / math.sqrt(m)) if m > 1 else float("inf"))


def _check_common(budget, distribution: str, chunk_size: int, on_interrupt: str) -> None:
    if budget is not None:
        check_positive("budget", budget, integer=True)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("chunk_size", chunk_size, integer=True)
    check_on_interrupt(on_interrupt)


def _check_budget(method: str, budget: int) -> None:
    if method in MIN_BUDGET and budget < MIN_BUDGET[method]:
        raise HesseError(f"method {method!r} needs budget >= {MIN_BUDGET[method]}, got {budget}.")


def trace(
    op,
    method: str = "hutch++",
    *,
    budget: int | None = None,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk_size: int = DEFAULT_CHUNK,
    check_symmetric: bool = True,
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> TraceResult:
    """Estimate ``tr(A)``: to a target relative accuracy, or with a fixed budget.

    ``method``: ``"hutch++"`` (default; best when a few large eigenvalues dominate, as in
    NN Hessians), ``"xtrace"`` (same spectra, often fewer products for the same error) or
    ``"hutchinson"`` (unbiased, error ``~ ||A||_F / sqrt(m)``).

    Adaptive (``rtol``; the default when neither ``budget`` nor ``rtol`` is given is
    ``rtol=0.01`` capped at ``max_matvecs=300``): the budget grows by doubling, reusing every
    finished product, until the estimator's own error estimate ``stderr <= rtol |estimate|``
    or ``max_matvecs`` products (default 300; 10000 when ``rtol`` is given) are used.
    ``.converged`` says whether the target was met, ``.stderr`` is the error bar reached.
    Hutch++ grows an orthonormal sketch basis ``B`` of ``range(A S)`` (its products kept, so
    ``tr(B^T A B)`` is exact) and estimates the rest by Hutchinson probes deflated against
    the current ``B`` (Meyer et al. 2021; adaptive variant in the spirit of Persson,
    Cortinovis & Kressner 2022); XTrace adds probes and recomputes its leave-one-out
    estimate and error estimate (Epperly, Tropp & Webber 2024) from all of them.
    Fixed (``budget=m``, no ``rtol``): exactly the original algorithms with ``m`` products.
    When ``P`` is at most the budget (adaptively: at most ``min(max_matvecs, 300)``) the
    trace is computed exactly from ``P`` identity columns (``method="exact"``, ``stderr = 0``).
    Ctrl-C: see the module docstring (``on_interrupt``).
    """
    check_choice("method", method, TRACE_METHODS)
    _check_common(budget, distribution, chunk_size, on_interrupt)
    if rtol is not None:
        check_positive("rtol", rtol)
    if max_matvecs is not None:
        check_positive("max_matvecs", max_matvecs, integer=True)
    adaptive = rtol is not None or budget is None
    cap = _trace_cap(budget, rtol, max_matvecs)
    rtol = DEFAULT_RTOL if adaptive and rtol is None else rtol
    _check_budget(method, cap)
    op, used = prepare_operator(op, check_symmetric, seed)
    gen = torch.Generator().manual_seed(seed)
    if op.size <= (min(cap, DEFAULT_MAX_MATVECS) if adaptive else cap):  # P identity columns cost no more
        method = "exact"  # than the probes (adaptively: than the default cap): be exact
    algorithm = _trace_algorithm(method, adaptive, cap, rtol, distribution, gen)
    total = op.size if method == "exact" else cap
    return _run_guarded(op, used, chunk_size, total, f"trace ({method})", progress, on_interrupt, algorithm)


def _trace_cap(budget: int | None, rtol: float | None, max_matvecs: int | None) -> int:
    """Products allowed: ``max_matvecs``, else ``budget``, else 10000 with an explicit
    ``rtol`` or 300 for the default call."""
    if max_matvecs is not None:
        return max_matvecs
    if budget is not None:
        return budget
    return RTOL_MAX_BUDGET if rtol is not None else DEFAULT_MAX_MATVECS


def _trace_algorithm(method: str, adaptive: bool, cap: int, rtol: float | None, distribution: str, gen):
    """The algorithm to run on a :class:`_Run` for these settings."""
    if method == "exact":
        return lambda run: _exact_trace(run, gen)
    if method == "hutchinson":
        return lambda run: _hutchinson(run, cap, rtol, distribution, gen)
    if adaptive:
        grow = _hutchpp_adaptive if method == "hutch++" else _xtrace_adaptive
        return lambda run: grow(run, cap, rtol, distribution, gen)
    return {"hutch++": lambda run: _hutchpp(run, cap, distribution, gen),
            "xtrace": lambda run: _xtrace(run, cap, distribution, gen)}[method]


def _hutchinson_trace(Z: torch.Tensor, AZ: torch.Tensor, matvecs: int, method: str, stopped: bool) -> TraceResult:
    """Hutchinson on the probes ``Z[:, :n]`` whose products ``AZ`` (``n`` columns) finished."""
    est, err = _mean_stderr((Z[:, : AZ.shape[1]] * AZ).sum(0).to(torch.float64).cpu())
    return TraceResult(est, err, matvecs, method, stopped)


def _hutchinson(run: _Run, budget: int, rtol: float | None, distribution: str, gen) -> TraceResult:
    samples: list[torch.Tensor] = []

    def estimate(stopped: bool) -> TraceResult:
        est, err = _mean_stderr(torch.cat(samples) if samples else torch.empty(0))
        met = None if rtol is None else bool(run.matvecs >= MIN_ADAPTIVE and err <= rtol * abs(est))
        return TraceResult(est, err, run.matvecs, "hutchinson", stopped, rtol=rtol, converged=met)

    run.partial = lambda: estimate(True)
    while run.matvecs < budget:
        Z = isotropic_probes(run.op, min(run.chunk_size, budget - run.matvecs), distribution, generator=gen)
        AZ = run.apply(Z)
        samples.append((Z * AZ).sum(0).to(torch.float64).cpu())
        if rtol is not None and estimate(False).converged:
            break
    return estimate(False)


def _hutchpp(run: _Run, budget: int, distribution: str, gen) -> TraceResult:
    s = budget // 3
    S = isotropic_probes(run.op, s, distribution, generator=gen)
    run.partial = lambda: _hutchinson_trace(S, run.finished(), run.matvecs, "hutch++ (interrupted: hutchinson)", True)
    AS = run.apply(S)
    Q, _ = torch.linalg.qr(AS.to(torch.float64))
    G = isotropic_probes(run.op, budget - 2 * s, distribution, generator=gen).to(torch.float64)
    G = G - Q @ (Q.T @ G)
    G = G - Q @ (Q.T @ G)

    def estimate(stopped: bool) -> TraceResult:
        AX = run.finished().to(torch.float64)
        if AX.shape[1] < s:  # the exact part is incomplete: Hutchinson on the sketch probes
            return _hutchinson_trace(S, AS, run.matvecs, "hutch++ (interrupted: hutchinson)", True)
        rest = (G[:, : AX.shape[1] - s] * AX[:, s:]).sum(0).cpu()
        est, err = _mean_stderr(rest)
        return TraceResult(float((Q * AX[:, :s]).sum()) + (est if rest.numel() else 0.0), err,
                           run.matvecs, "hutch++", stopped)

    run.partial = lambda: estimate(True)
    run.apply(torch.cat([Q, G], 1).to(run.op.dtype))
    return estimate(False)


class _Sketch:
    """An orthonormal basis ``B`` (float64) of the sketched range with its products ``AB``.

    Every vector in ``span(B)`` has a known product, so ``M = B^T A B`` is exact and grows
    with the basis; products are never recomputed when the budget grows.
    """

    def __init__(self, run: _Run):
        self.run = run
        self.B = torch.empty(run.op.size, 0, dtype=torch.float64, device=run.op.device)
        self.AB = torch.empty_like(self.B)

    def extend(self, Y: torch.Tensor) -> None:
        """Add ``orth(Y)`` (orthogonalised against ``B``) and its products."""
        Q, _ = orthonormalize_against(Y.to(torch.float64), self.B)
        AQ = self.run.apply(Q.to(self.run.op.dtype)).to(torch.float64)
        self.B, self.AB = torch.cat([self.B, Q], 1), torch.cat([self.AB, AQ], 1)

    def M(self) -> torch.Tensor:
        M = self.B.T @ self.AB
        return (M + M.T) / 2

    def deflated_forms(self, G: torch.Tensor, AG: torch.Tensor) -> torch.Tensor:
        """``x^T A x`` for ``x = (I - B B^T) g`` of every column ``g`` of ``G``, from ``A g``.

        ``x^T A x = g^T A g - 2 c^T (B^T A g) + c^T M c`` with ``c = B^T g``: exact for the
        current ``B`` even when ``g`` was multiplied before ``B`` grew."""
        c, d = self.B.T @ G, self.B.T @ AG
        return ((G * AG).sum(0) - 2 * (c * d).sum(0) + (c * (self.M() @ c)).sum(0)).cpu()


def _rounds(run: _Run, cap: int, per_probe: int):
    """Probe counts of the adaptive rounds: ``START_PROBES``, then doubling the total, while
    ``per_probe`` products per probe fit under ``cap``."""
    total, m = 0, START_PROBES
    while True:
        m = min(m, (cap - run.matvecs) // per_probe)
        if m < 1:
            return
        yield m
        total += m
        m = total


def _met(result: TraceResult, rtol: float) -> TraceResult:
    """Record the target ``rtol`` and whether ``stderr <= rtol |estimate|`` (never when interrupted)."""
    met = result.stderr <= rtol * abs(result.estimate) and not result.interrupted
    result.rtol, result.converged = rtol, bool(met)
    return result


def _hutchpp_adaptive(run: _Run, cap: int, rtol: float, distribution: str, gen) -> TraceResult:
    """Hutch++ with a growing budget: each round adds ``m`` sketch probes (``B`` grows by
    ``orth(A S)``) and ``m`` Hutchinson probes deflated against ``B``; all earlier probes are
    re-deflated against the grown ``B`` (:meth:`_Sketch.deflated_forms`), no product is lost."""
    sketch, Gs, AGs = _Sketch(run), [], []

    def estimate(stopped: bool) -> TraceResult:
        forms = sketch.deflated_forms(torch.cat(Gs, 1), torch.cat(AGs, 1)) if Gs else torch.empty(0)
        rest, err = _mean_stderr(forms)
        exact_part = float(torch.trace(sketch.M()))
        return _met(TraceResult(exact_part + (rest if forms.numel() else 0.0), err, run.matvecs, "hutch++",
                                stopped), rtol)

    run.partial = lambda: estimate(True)
    for m in _rounds(run, cap, 3):
        S = isotropic_probes(run.op, m, distribution, generator=gen)
        sketch.extend(run.apply(S))
        G = isotropic_probes(run.op, m, distribution, generator=gen).to(torch.float64)
        G = G - sketch.B @ (sketch.B.T @ G)
        AG = run.apply(G.to(run.op.dtype)).to(torch.float64)
        Gs, AGs = Gs + [G], AGs + [AG]
        if estimate(False).converged:
            break
    return estimate(False)


def _xtrace_adaptive(run: _Run, cap: int, rtol: float, distribution: str, gen) -> TraceResult:
    """XTrace with a growing number of probes: each round adds ``m`` probes ``Omega`` (``m``
    products) and extends ``B`` by ``orth(A Omega)`` (``m`` products); the leave-one-out
    estimate uses ``H = Q^T A Q = (B^T Q)^T M (B^T Q)`` from the kept products. If the sketch
    is rank deficient, ``B`` holds the whole range of ``A`` and ``tr(M)`` is exact."""
    sketch, Omegas, Ys = _Sketch(run), [], []
    result = TraceResult(float("nan"), float("inf"), 0, "xtrace (interrupted before a first estimate)", True)
    # on Ctrl-C: the last finished estimate, with the products actually spent
    run.partial = lambda: dataclasses.replace(result, matvecs=run.matvecs, converged=False)
    for m in _rounds(run, cap, 2):
        Omega = _xtrace_probes(run.op, m, distribution, gen)
        Y = run.apply(Omega)
        sketch.extend(Y)
        Omegas, Ys = Omegas + [Omega], Ys + [Y]
        Om, Yall = torch.cat(Omegas, 1), torch.cat(Ys, 1)
        try:
            Q, R, W, S = _leave_one_out(Om, Yall, "")
        except HesseError:  # rank(A) < probes: the sketch holds the whole range
            return _met(TraceResult(float(torch.trace(sketch.M())), 0.0, run.matvecs, "xtrace"), rtol)
        C = sketch.B.T @ Q
        est, err = _xtrace_from(Om, Yall, Q, R, W, S, C.T @ sketch.M() @ C, distribution)
        result = _met(TraceResult(est, err, run.matvecs, "xtrace"), rtol)
        if result.converged:
            break
    return result


def _leave_one_out(Omega: torch.Tensor, Y: torch.Tensor, alternative: str):
    """Shared XTrace/XDiag quantities: ``Q, R`` of ``Y = A Omega``, ``W = Q^T Omega`` and the
    unit vectors ``s_i ~ R^{-T} e_i`` with ``Q s_i`` orthogonal to all columns of ``Y`` but ``i``."""
    Q, R = torch.linalg.qr(Y.to(torch.float64))
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


def _xtrace_probes(op: LinearOperator, m: int, distribution: str, gen) -> torch.Tensor:
    """XTrace probes; Gaussian ones are put on the sphere of radius ``sqrt(P)`` (the paper)."""
    Omega = isotropic_probes(op, m, distribution, generator=gen)
    if distribution == "gaussian":
        Omega = Omega * (math.sqrt(op.size) / Omega.norm(dim=0))
    return Omega


def _xtrace_from(Omega: torch.Tensor, Y: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, W: torch.Tensor,
                 S: torch.Tensor, H: torch.Tensor, distribution: str) -> tuple[float, float]:
    """The XTrace estimate and its error estimate ``std(t_i) / sqrt(m)`` from the probes
    ``Omega``, ``Y = A Omega`` and its QR, the leave-one-out vectors ``S`` and ``H = Q^T A Q``."""
    P, m = Omega.shape
    H = (H + H.T) / 2
    Omega, Y = Omega.to(torch.float64), Y.to(torch.float64)
    c = (S * W).sum(0)
    if distribution == "gaussian":  # the paper's "improved" rescaling of sphere probes
        scale = math.sqrt(P - m + 1) / torch.sqrt(P - (W * W).sum(0) + c**2)
        Omega, Y, R, W, c = Omega * scale, Y * scale, R * scale, W * scale, c * scale
    D = W - S * c
    per_probe = (
        torch.trace(H) - (S * (H @ S)).sum(0) + (Omega * Y).sum(0) - 2 * (R * D).sum(0) + (D * (H @ D)).sum(0)
    ).cpu()
    return _mean_stderr(per_probe)


def _xtrace(run: _Run, budget: int, distribution: str, gen) -> TraceResult:
    Omega = _xtrace_probes(run.op, budget // 2, distribution, gen)
    label = "xtrace (interrupted: hutchinson on finished probes)"
    run.partial = lambda: _hutchinson_trace(Omega, run.finished(), run.matvecs, label, True)
    Y = run.apply(Omega)
    Q, R, W, S = _leave_one_out(Omega, Y, "method='hutch++' (exact for low rank)")
    run.partial = lambda: _hutchinson_trace(Omega, Y, run.matvecs, label, True)
    H = Q.T @ run.apply(Q.to(run.op.dtype)).to(torch.float64)
    est, err = _xtrace_from(Omega, Y, Q, R, W, S, H, distribution)
    return TraceResult(est, err, run.matvecs, "xtrace", False)


def _exact_trace(run: _Run, gen: torch.Generator) -> TraceResult:
    """``tr(A)`` from the exact diagonal, its entries taken in random order. If interrupted
    after ``n`` of ``P`` entries: ``P * mean(d_i)`` over the finished ones (a sample without
    replacement), stderr with the finite-population correction ``sqrt(1 - n/P)``."""

    def partial() -> TraceResult:
        d = run.finished_diagonal
        n, P = d.numel(), run.op.size
        mean, err = _mean_stderr(d)
        label = f"exact (interrupted: extrapolated from {n} of {P} diagonal entries)"
        return TraceResult(P * mean, P * err * math.sqrt(1 - n / P), run.matvecs, label, True)

    diag = _exact_diagonal(run, partial, torch.randperm(run.op.size, generator=gen))
    return TraceResult(float(diag.estimate.sum()), 0.0, diag.matvecs, "exact", False)


def _exact_diagonal(run: _Run, partial: Callable[[], object] | None = None,
                    order: torch.Tensor | None = None) -> DiagonalResult:
    """``diag(A)`` from ``P`` identity columns (in ``order``, default 0..P-1); unfinished
    entries are NaN on Ctrl-C (or ``partial()`` is the result then)."""
    op, P = run.op, run.op.size
    order = order if order is not None else torch.arange(P)
    diag = torch.full((P,), float("nan"), dtype=torch.float64)
    run.partial = partial or (lambda: DiagonalResult(diag, None, run.matvecs, "exact", True))
    for start in range(0, P, run.chunk_size):
        stop = min(start + run.chunk_size, P)
        rows, cols = order[start:stop].to(op.device), torch.arange(stop - start, device=op.device)
        E = torch.zeros(P, stop - start, dtype=op.dtype, device=op.device)
        E[rows, cols] = 1
        diag[order[start:stop]] = op.matmat(E)[rows, cols].to(torch.float64).cpu()
        run.matvecs, run.finished_diagonal, run.calls = stop, diag[order[:stop]], run.calls + 1
        run.bar.update(stop - start)
    return DiagonalResult(diag, None, run.matvecs, "exact", False)


def diagonal(
    op,
    method: str = "xdiag",
    *,
    budget: int | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk_size: int = DEFAULT_CHUNK,
    check_symmetric: bool = True,
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> DiagonalResult:
    """Estimate ``diag(A)`` (a ``[P]`` tensor) with ``budget`` products (default 99).

    ``"hutchinson"``: mean of ``z * (A z)``, per-entry stderr std/sqrt(m).
    ``"xdiag"`` (default): ``diag(Q_i Q_i^T A) + w_i * ((I - Q_i Q_i^T) A w_i)`` averaged over
    the leave-one-out bases ``Q_i``; exact for matrices of rank < budget/2 in the top part.
    ``"exact"``: ``P`` products with identity columns (``budget`` ignored), stderr ``None``.
    ``"sampled"`` (GGN and Fisher, :meth:`hesse.GGN.sample_square_root`): the mean of ``w ⊙ w``
    over ``budget`` columns of a random square root ``A = E[w wᵀ]``, one backward pass per
    column instead of a product, unbiased and never negative (the Monte Carlo GGN diagonal).
    Ctrl-C: Hutchinson on the finished probes (sampled: the finished columns), or NaN for
    unfinished exact entries.
    """
    check_choice("method", method, DIAG_METHODS)
    _check_common(budget, distribution, chunk_size, on_interrupt)
    budget = budget if budget is not None else DEFAULT_BUDGET
    _check_budget(method, budget)
    if method == "sampled":
        return _sampled_diagonal(as_operator(op), budget, seed, progress, on_interrupt)
    op, used = prepare_operator(op, check_symmetric, seed)
    gen = torch.Generator().manual_seed(seed)
    if op.size <= budget:  # P identity columns cost no more than the probes: be exact
        method = "exact"
    algorithm = {
        "exact": lambda run: _exact_diagonal(run),
        "hutchinson": lambda run: _hutchinson_diagonal(run, budget, distribution, gen),
        "xdiag": lambda run: _xdiag(run, budget, distribution, gen),
    }[method]
    total = op.size if method == "exact" else budget
    return _run_guarded(op, used, chunk_size, total, f"diagonal ({method})", progress, on_interrupt, algorithm)


def _sampled_diagonal(op: LinearOperator, columns: int, seed: int, progress: bool | None,
                      on_interrupt: str) -> DiagonalResult:
    """``mean(w ⊙ w)`` and its per-entry stderr over ``columns`` square-root columns, drawn in
    passes of at most :data:`SAMPLED_PASS_BYTES`."""
    sample = op.square_root_sampler()
    if sample is None:
        raise HesseError("method='sampled' needs a GGN or Fisher operator with nn.CrossEntropyLoss, nn.MSELoss "
                         "or nn.BCEWithLogitsLoss (a random square root); use 'xdiag' for this operator.")
    width = max(1, SAMPLED_PASS_BYTES // (op.size * op.dtype.itemsize))
    sums = torch.zeros(2, op.size, dtype=torch.float64)  # Σ w², Σ w⁴ per entry
    state = {"columns": 0, "passes": 0}

    def result(stopped: bool) -> DiagonalResult:
        m = state["columns"]
        mean = sums[0] / m if m else torch.full((op.size,), math.nan, dtype=torch.float64)
        var = (sums[1] / m - mean**2) * m / (m - 1) if m > 1 else torch.full_like(mean, math.inf)
        label = "sampled square root" + (" (interrupted)" if stopped else "")
        return DiagonalResult(mean, (var.clamp(min=0) / max(m, 1)).sqrt(), m, label, stopped, state["passes"])

    with progress_bar(total=columns, desc="diagonal (sampled)", enabled=progress, unit="column") as bar:
        try:
            while state["columns"] < columns:
                k = min(width, columns - state["columns"])
                squares = sample(k, seed + 7919 * state["passes"]).to(torch.float64).cpu() ** 2
                sums += torch.stack([squares.sum(1), (squares**2).sum(1)])
                state["columns"] += k
                state["passes"] += 1
                bar.update(k)
        except KeyboardInterrupt as error:
            return interrupted(error, result(True), on_interrupt, "diagonal")
    return result(False)


def _hutchinson_diagonal_of(Z: torch.Tensor, AZ: torch.Tensor, matvecs: int, method: str, stopped: bool):
    """Mean of ``z * (A z)`` over the finished columns of ``AZ``, per-entry stderr."""
    n = AZ.shape[1]
    samples = (Z[:, :n] * AZ).to(torch.float64)
    std = samples.std(1) / math.sqrt(n) if n > 1 else torch.full((Z.shape[0],), float("inf"))
    return DiagonalResult(samples.mean(1).cpu(), std.cpu(), matvecs, method, stopped)


def _hutchinson_diagonal(run: _Run, budget: int, distribution: str, gen) -> DiagonalResult:
    Z = isotropic_probes(run.op, budget, distribution, generator=gen)
    run.partial = lambda: _hutchinson_diagonal_of(Z, run.finished(), run.matvecs, "hutchinson", True)
    return _hutchinson_diagonal_of(Z, run.apply(Z), run.matvecs, "hutchinson", False)


def _xdiag(run: _Run, budget: int, distribution: str, gen) -> DiagonalResult:
    m = budget // 2
    Omega = isotropic_probes(run.op, m, distribution, generator=gen)
    label = "xdiag (interrupted: hutchinson)"
    run.partial = lambda: _hutchinson_diagonal_of(Omega, run.finished(), run.matvecs, label, True)
    Y = run.apply(Omega)
    Q, R, _, S = _leave_one_out(Omega, Y, "method='exact' or 'hutchinson'")
    run.partial = lambda: _hutchinson_diagonal_of(Omega, Y, run.matvecs, label, True)
    Z = run.apply(Q.to(run.op.dtype)).to(torch.float64)
    QS, ZS = Q @ S, Z @ S
    base = (Q * Z).sum(1, keepdim=True)
    coef = (S * R).sum(0)
    per_probe = base - QS * ZS + Omega.to(torch.float64) * QS * coef
    return DiagonalResult(per_probe.mean(1).cpu(), (per_probe.std(1) / math.sqrt(m)).cpu(), run.matvecs, "xdiag")


def frobenius_norm(
    op,
    *,
    budget: int | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk_size: int = DEFAULT_CHUNK,
    check_symmetric: bool = True,
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> NormResult:
    """Estimate ``||A||_F`` from ``E ||A z||^2 = ||A||_F^2`` with ``budget`` probes (default 99).

    The stderr of the norm comes from that of the square by the delta method:
    ``se(F) = se(F^2) / (2 F)``. Ctrl-C: the estimate from the finished probes.
    """
    _check_common(budget, distribution, chunk_size, on_interrupt)
    budget = budget if budget is not None else DEFAULT_BUDGET
    if budget < 2:
        raise HesseError(f"frobenius_norm needs budget >= 2 to report a stderr, got {budget}.")
    op, used = prepare_operator(op, check_symmetric, seed)
    gen = torch.Generator().manual_seed(seed)

    def algorithm(run: _Run) -> NormResult:
        Z = isotropic_probes(op, budget, distribution, generator=gen)
        run.partial = lambda: _norm_from(run.finished(), run.matvecs, True)
        return _norm_from(run.apply(Z), run.matvecs, False)

    return _run_guarded(op, used, chunk_size, budget, "frobenius_norm", progress, on_interrupt, algorithm)


def _norm_from(AZ: torch.Tensor, matvecs: int, stopped: bool) -> NormResult:
    sq, sq_err = _mean_stderr((AZ.to(torch.float64) ** 2).sum(0).cpu())
    norm = math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else float("nan")
    err = sq_err / (2 * norm) if norm > 0 else float("inf")
    return NormResult(norm, err, matvecs, "hutchinson", stopped)
