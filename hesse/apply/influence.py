"""Influence functions: which training examples made a prediction, and which look mislabeled.

Sign convention (used everywhere in hesse): the influence of training example ``z`` on a
query ``q`` is

    score(q, z) = g_qᵀ (C + λI)⁻¹ g_z,        g = ∇_θ ℓ(sample; θ̂)

with ``C`` the curvature of the full-data training loss (GGN by default). Positive means
``z`` HELPS the query: removing ``z`` would RAISE the query loss. Koh & Liang (2017) define
``I_up,loss(z, q) = -g_qᵀ H⁻¹ g_z``, the change of the query loss per unit upweighting of
``z``; our score is ``-I_up,loss``, so upweighting a helpful example lowers the query loss.
For a ``"mean"`` loss over ``n`` examples, the first-order change of the query loss when
``z`` is left out of training is ``score(q, z) / n`` (``score`` for a ``"sum"`` loss), with
``λ`` playing the role of an L2 regulariser ``(n λ / 2)||θ||²``.

Self-influence ``g_zᵀ (C + λI)⁻¹ g_z`` (Koh & Liang 2017, Sec. 5.4; Schioppa et al. 2022)
is large for examples the model has to bend towards, such as mislabeled ones.

Methods for ``(C + λI)⁻¹`` (``P`` parameters):

* ``"identity"``: no curvature, plain gradient dot products (TracIn at one checkpoint,
  Pruthi et al. 2020);
* ``"exact"``: dense ``C`` (``P`` products) and a direct solve; small models only;
* ``"cg"``: conjugate gradients (MINRES for the Hessian, which may be indefinite);
* ``"lissa"``: the LiSSA recursion (Agarwal, Bullins & Hazan 2017), as Koh & Liang run it;
* ``"arnoldi"``: top-``rank`` eigenpairs by Lanczos, exact there and ``1/λ`` elsewhere
  (Schioppa et al. 2022);
* ``"kfac"`` / ``"ekfac"``: Kronecker-factored inverses (Grosse et al. 2023 use EK-FAC).

Damping: ``damping`` is relative (``relative_damping=True``, the default): ``λ = damping ·
tr(C)/P``, the mean eigenvalue, so one value fits models of any scale (``tr C`` is exact
for ``"exact"``, free for K-FAC/EK-FAC, a Hutch++ estimate otherwise; ``"identity"``
ignores it). ``relative_damping=False`` uses ``damping`` as ``λ`` itself.

Per-sample gradients come from ``torch.func`` (:meth:`Objective.per_sample_gradients`) in
chunks of ``chunk_size`` samples (default: as many as fit in ``memory`` bytes), so memory
never grows with the dataset. Query gradients are preconditioned once (one batched solve)
and dotted with training gradients streamed chunk by chunk; ``out=`` writes scores to a
``.npy`` memmap as they come and ``resume=True`` continues an interrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hesse.errors import HesseError, check_on_interrupt, interrupted
from hesse.linalg.estimators import trace
from hesse.linalg.solvers import cg, lissa, lowrank_inverse, minres
from hesse.operators import EKFAC, GGN, KFAC, Fisher, Hessian, LinearOperator, Objective, as_objective
from hesse.operators.data import DataSource, default_num_samples

METHODS = ("identity", "exact", "cg", "lissa", "arnoldi", "kfac", "ekfac")
CURVATURES = ("ggn", "hessian", "fisher")
EXACT_LIMIT = 5000
MEMORY = 256 * 2**20
TRACE_BUDGET = 30
OPTIONS = {"cg": {"tol", "maxiter"}, "lissa": {"depth", "repeats", "scale"}, "arnoldi": {"rank"}}


@dataclass
class Preconditioner:
    """``G ↦ (C + λI)⁻¹ G`` for ``G`` of shape ``[P, K]``, built once by :func:`preconditioner`.

    ``damping`` is the absolute ``λ``; ``info`` records the method, curvature, setup seconds
    and products of ``C`` (``matvecs``) spent so far.
    """

    method: str
    damping: float
    apply: Callable[[torch.Tensor], torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def curvature_operator(objective: Objective, curvature: str, method: str, seed: int = 0) -> LinearOperator:
    """The curvature ``C`` of the training loss: ``hesse.GGN``, ``hesse.Hessian``, the
    empirical ``hesse.Fisher`` (``"fisher"``), or their K-FAC/EK-FAC approximation
    (``kind="true"`` for the GGN, ``"empirical"`` for the Fisher)."""
    if curvature not in CURVATURES:
        raise HesseError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}.")
    if method in ("kfac", "ekfac"):
        if curvature == "hessian":
            raise HesseError(f"{method} approximates the GGN or Fisher, not the Hessian; use curvature='ggn' "
                             "or 'fisher', or method='cg'/'exact' for the Hessian.")
        kind = "true" if curvature == "ggn" else "empirical"
        return (EKFAC if method == "ekfac" else KFAC)(objective, kind=kind, seed=seed)
    if curvature == "hessian":
        return Hessian(objective)
    return GGN(objective) if curvature == "ggn" else Fisher(objective, kind="empirical")


def dense_matrix(op: LinearOperator, limit: int = EXACT_LIMIT, columns: int = 256) -> torch.Tensor:
    """``C`` as a dense ``[P, P]`` matrix from ``P`` products (``columns`` per data pass),
    refused when ``P > limit``."""
    P = op.shape[0]
    if P > limit:
        raise HesseError(f"method='exact' needs the dense {P} x {P} curvature ({P * P * 8 / 2**30:.1f} GiB in "
                         f"float64, {P} products); it is limited to P <= {limit}: use 'cg', 'arnoldi' or 'ekfac'.")
    eye = torch.eye(P, dtype=op.dtype, device=op.device)
    matrix = torch.cat([op.matmat(eye[:, i:i + columns]) for i in range(0, P, columns)], dim=1)
    return (matrix + matrix.T) / 2


def preconditioner(objective: Objective, method: str = "cg", damping: float = 0.01, *,
                   relative_damping: bool = True, curvature: str = "ggn", seed: int = 0,
                   **options: Any) -> Preconditioner:
    """Build ``(C + λI)⁻¹`` by ``method`` (see the module docstring) on the training objective.

    ``info`` records the absolute ``damping``, ``setup_seconds``, the products of ``C`` so far
    (``matvecs``: ``P`` for exact, the trace estimate and every solve for the iterative methods)
    and, for cg/lissa, the last solve's ``max_residual`` and ``converged``.

    ``options``: ``tol`` and ``maxiter`` (cg; defaults 1e-6, 500), ``depth``, ``repeats`` and
    ``scale`` (lissa; defaults 1000, 1, automatic), ``rank`` (arnoldi; default 50).
    """
    if method not in METHODS:
        raise HesseError(f"unknown influence method {method!r}; choose one of {', '.join(METHODS)}.")
    if not (math.isfinite(damping) and damping >= 0):
        raise HesseError(f"damping must be a finite number >= 0, got {damping!r}.")
    unknown = set(options) - OPTIONS.get(method, set())
    if unknown:
        raise HesseError(f"options {sorted(unknown)} do not apply to method={method!r}; it takes "
                         f"{sorted(OPTIONS.get(method, set())) or 'none'}.")
    started, info = time.perf_counter(), {}
    if method == "identity":
        return Preconditioner(method, 0.0, lambda G: G, {"method": method, "setup_seconds": 0.0})
    op = curvature_operator(objective, curvature, method, seed)
    if method == "exact":
        matrix, info["matvecs"] = dense_matrix(op), op.shape[0]
        lam = _absolute(damping, relative_damping, float(matrix.diagonal().sum()), op.shape[0], method)
        apply = _dense_solver(matrix, lam)
    elif method in ("kfac", "ekfac"):
        lam = _absolute(damping, relative_damping, op.trace(), op.shape[0], method)
        apply = op.inverse(lam).matmat
    else:
        estimate = trace(op, budget=TRACE_BUDGET, seed=seed) if relative_damping else None
        tr, info["matvecs"] = (estimate.estimate, estimate.matvecs) if estimate else (0.0, 0)
        lam = _absolute(damping, relative_damping, tr, op.shape[0], method)
        apply = _iterative(op, method, lam, curvature, seed, options, info)
    info.update(method=method, curvature=curvature, damping=lam, setup_seconds=time.perf_counter() - started)
    return Preconditioner(method, lam, apply, info)


def _absolute(damping: float, relative: bool, trace_value: float, size: int, method: str) -> float:
    """``λ = damping · tr(C)/P`` (relative) or ``damping``; refuse ``λ <= 0`` where a method needs it."""
    lam = damping * trace_value / size if relative else damping
    if relative and trace_value <= 0:
        raise HesseError(f"the curvature's trace is {trace_value:.3g} <= 0, so relative damping is undefined; "
                         "pass relative_damping=False with an absolute damping.")
    if lam <= 0 and method in ("arnoldi", "kfac", "ekfac", "lissa"):
        raise HesseError(f"method={method!r} needs damping > 0, got {lam:g}.")
    return float(lam)


def _dense_solver(matrix: torch.Tensor, lam: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``G ↦ (C + λI)⁻¹ G`` by one eigendecomposition (also for an indefinite Hessian)."""
    theta, U = torch.linalg.eigh(matrix)
    shifted = theta + lam
    if bool((shifted.abs() <= 1e-12 * theta.abs().max()).any()):
        raise HesseError("C + damping I is singular; raise damping.")
    return lambda G: U @ ((U.T @ G.to(U.dtype)) / shifted[:, None])


def _iterative(op: LinearOperator, method: str, lam: float, curvature: str, seed: int,
               options: dict[str, Any], info: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cg/minres, lissa or arnoldi route as ``G ↦ X``; each solve records its largest relative
    residual ``max_k ||g_k - (C + λI) x_k|| / ||g_k||``, ``converged`` and ``matvecs`` in ``info``."""
    if method == "arnoldi":
        inverse = lowrank_inverse(op, lam, options.get("rank", 50), seed=seed)
        info["matvecs"] += inverse.eigen.matvecs
        return inverse.matmat
    if method == "lissa":
        solver, settings = lissa, dict(depth=options.get("depth", 1000), repeats=options.get("repeats", 1),
                                       scale=options.get("scale"), seed=seed, tol=1e-6)
    else:
        solver = minres if curvature == "hessian" else cg
        settings = dict(tol=options.get("tol", 1e-6), maxiter=options.get("maxiter", 500))

    def solve(G: torch.Tensor) -> torch.Tensor:
        result = solver(op, G, damping=lam, **settings)
        info.update(max_residual=float(result.residuals.max()), converged=result.all_converged,
                    matvecs=info["matvecs"] + result.matvecs, iterations=result.iterations)
        return result.solution

    return solve


# ---- streaming per-sample gradients --------------------------------------------------------------
def _take_range(batch: Any, lo: int, hi: int) -> Any:
    """Samples ``lo:hi`` of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.ndim > 0 else batch
    if isinstance(batch, dict):
        return {k: _take_range(v, lo, hi) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take_range(v, lo, hi) for v in batch)
    return batch


def count_samples(data: Any) -> int:
    """The number of samples in ``data`` (leading dimension of every batch; no model call)."""
    return sum(default_num_samples(batch) for batch in DataSource(data))


def chunk_length(size: int, chunk_size: int | None, memory: int, itemsize: int = 8) -> int:
    """Samples per chunk: ``chunk_size``, or as many ``[P]`` gradients (plus their scores) as fit in ``memory`` bytes."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise HesseError(f"chunk_size must be at least 1, got {chunk_size}.")
        return int(chunk_size)
    return max(1, int(memory // (3 * size * itemsize)))


def gradient_chunks(objective: Objective, data: Any, chunk: int, *, skip: int = 0,
                    vectorize: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, G)`` with ``G = [c, P]`` per-sample gradients of samples ``start:start+c``,
    batch by batch and ``chunk`` samples at a time; chunks ending at or before ``skip`` are skipped."""
    start = 0
    for batch in DataSource(data):
        n = default_num_samples(batch)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            if start + hi > skip:
                piece = _take_range(batch, lo, hi)
                yield start + lo, objective.per_sample_gradients(piece, vectorize=vectorize).detach()
        start += n


def query_gradients(objective: Objective, data: Any, chunk: int, vectorize: bool = True) -> torch.Tensor:
    """All query gradients as ``[P, n_query]`` (the queries are few: they are kept in memory)."""
    return torch.cat([G for _, G in gradient_chunks(objective, data, chunk, vectorize=vectorize)]).T


# ---- the scores -------------------------------------------------------------------------------------
def _objective(model_or_objective: nn.Module | Objective, criterion: Any, train_data: Any,
               settings: dict[str, Any]) -> Objective:
    """The training objective (given, or built from the model, criterion, data and settings)."""
    objective = as_objective(model_or_objective, criterion, train_data, **settings)
    if objective.stochastic:
        raise HesseError("influence scores need a deterministic model; call model.eval() first.")
    return objective


def pairwise(model_or_objective: nn.Module | Objective, criterion: Any = None, train_data: Any = None,
             query_data: Any = None, *, method: str = "cg", damping: float = 0.01,
             relative_damping: bool = True, curvature: str = "ggn", chunk_size: int | None = None,
             memory: int = MEMORY, out: str | Path | None = None, resume: bool = False, vectorize: bool = True,
             seed: int = 0, on_interrupt: str = "raise", params: Any = None, forward: Any = None,
             inverse: Preconditioner | None = None, measurement: Any = None, **options: Any) -> torch.Tensor:
    """Influence of every training example on every query: ``[n_query, n_train]``,
    ``S[q, z] = g_qᵀ (C + λI)⁻¹ g_z`` (positive: ``z`` helps ``q``; see the module docstring).

    ``g_q`` is the gradient of the training criterion on the query, or of ``measurement(output,
    target)`` (Grosse et al. 2023's measurement ``f``, Kronfluence's ``compute_measurement``),
    a loss-like callable: a positive score means removing ``z`` would raise it. For TRAK's margin
    (Park et al. 2023) pass :func:`negative_margin`.

    ``train_data`` and ``query_data`` follow the operators' conventions (a DataLoader, a list
    of batches or one batch; dict batches with ``forward=``). The query gradients are
    preconditioned once (one batched solve of ``n_query`` columns), then the training
    gradients stream through in chunks. ``out="scores.npy"`` writes the scores to a memmap as
    they come (with ``scores.npy.json`` recording progress and ``scores.query.npy`` the
    preconditioned queries); ``resume=True`` continues from there. On Ctrl-C the scores so far
    (NaN where not computed) are on ``error.partial`` (or returned, ``on_interrupt="return"``).
    ``options`` go to the solver (see :func:`preconditioner`); ``inverse`` reuses a built
    :class:`Preconditioner` (then ``method``, ``damping``, ``curvature`` and ``options`` are unused).
    """
    check_on_interrupt(on_interrupt)
    objective = _objective(model_or_objective, criterion, train_data, dict(params=params, forward=forward))
    if query_data is None:
        raise HesseError("pass query_data: the examples whose predictions are explained.")
    chunk = chunk_length(objective.size, chunk_size, memory, objective.dtype.itemsize)
    settings = (method, damping, curvature) if inverse is None else \
        (inverse.method, inverse.damping, inverse.info.get("curvature", curvature))  # what produced the scores
    measured = None if measurement is None else getattr(measurement, "__name__", type(measurement).__name__)
    store = _Store.open(out, resume, count_samples(objective.data.source), *settings, measured)
    X = store.preconditioned() if store else None
    if X is None:
        G = query_gradients(_measured(objective, measurement, query_data), query_data, chunk, vectorize)
        inverse = inverse or preconditioner(objective, method, damping, relative_damping=relative_damping,
                                            curvature=curvature, seed=seed, **options)
        X = inverse.apply(G)
        if store:
            store.save_preconditioned(X)
    n_train = count_samples(objective.data.source) if store is None else store.n_train
    scores = torch.full((X.shape[1], n_train), float("nan"), dtype=X.dtype)
    return _stream(objective, chunk, vectorize, lambda Gt: X.T @ Gt.T.to(X.dtype), scores, store, on_interrupt)


def negative_margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log Σ_{k≠y} exp o_k − o_y``, averaged over the samples: minus the classification margin
    of TRAK (Park et al. 2023), lower is better like a loss; use as ``pairwise(measurement=...)``."""
    own = torch.arange(output.shape[-1], device=output.device) == target[..., None]
    others = torch.where(own, torch.full_like(output, float("-inf")), output).logsumexp(-1)
    return (others - (output * own).sum(-1)).mean()


def _measured(objective: Objective, measurement: Any, query_data: Any) -> Objective:
    """The objective whose per-sample gradients are the query gradients: the training one, or
    ``measurement`` on the same model, parameters and forward."""
    if measurement is None:
        return objective
    return Objective(objective.model, measurement, query_data, forward=objective.forward,
                     params=objective.param_names)


def self_influence(model_or_objective: nn.Module | Objective, criterion: Any = None, train_data: Any = None, *,
                   method: str = "cg", damping: float = 0.01, relative_damping: bool = True,
                   curvature: str = "ggn", chunk_size: int | None = None, memory: int = MEMORY,
                   vectorize: bool = True, seed: int = 0, on_interrupt: str = "raise", params: Any = None,
                   forward: Any = None, inverse: Preconditioner | None = None, **options: Any) -> torch.Tensor:
    """``[n_train]`` self-influence ``g_zᵀ (C + λI)⁻¹ g_z`` of every training example.

    Explicit inverses (``identity``, ``exact``, ``arnoldi``, ``kfac``, ``ekfac``) cost one
    product per chunk; ``cg``/``lissa`` solve one system per training example (batched per
    chunk), which is ``n_train`` solves: use them on small sets. Interrupts and ``inverse`` as
    :func:`pairwise`.
    """
    check_on_interrupt(on_interrupt)
    objective = _objective(model_or_objective, criterion, train_data, dict(params=params, forward=forward))
    chunk = chunk_length(objective.size, chunk_size, memory, objective.dtype.itemsize)
    inverse = inverse or preconditioner(objective, method, damping, relative_damping=relative_damping,
                                        curvature=curvature, seed=seed, **options)
    scores = torch.full((1, count_samples(objective.data.source)), float("nan"), dtype=objective.dtype)

    def diagonal(Gt: torch.Tensor) -> torch.Tensor:
        return (inverse.apply(Gt.T) * Gt.T).sum(0, keepdim=True)

    return _stream(objective, chunk, vectorize, diagonal, scores, None, on_interrupt)[0]


def _stream(objective: Objective, chunk: int, vectorize: bool, score_fn: Callable[[torch.Tensor], torch.Tensor],
            scores: torch.Tensor, store: "_Store | None", on_interrupt: str) -> torch.Tensor:
    """Fill ``scores[:, start:start+c]`` with ``score_fn(G_train_chunk)`` chunk by chunk (and the store)."""
    done = store.done if store else 0
    if store and done:
        scores[:, :done] = torch.from_numpy(np.asarray(store.scores[:, :done])).to(scores.dtype)
    try:
        for start, Gt in gradient_chunks(objective, objective.data.source, chunk, skip=done, vectorize=vectorize):
            block = score_fn(Gt).detach().cpu()
            scores[:, start:start + block.shape[1]] = block
            if store:
                store.write(start, block)
    except KeyboardInterrupt as error:
        return interrupted(error, scores, on_interrupt, "influence scores")
    return scores


class _Store:
    """Scores on disk: ``path`` (a ``[n_query, n_train]`` float64 ``.npy`` memmap), ``path.json``
    (progress: the training examples done, and the settings, checked on resume) and
    ``path.query.npy`` (the preconditioned query gradients ``[P, n_query]``)."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = path, meta
        self.n_train, self.done, self.scores = meta["n_train"], meta["done"], None

    @classmethod
    def open(cls, out: str | Path | None, resume: bool, n_train: int, method: str, damping: float,
             curvature: str, measurement: str | None = None) -> "_Store | None":
        """A fresh store, the one to resume (settings checked), or ``None`` without ``out``."""
        if out is None:
            if resume:
                raise HesseError("resume=True needs out= (the .npy file of the interrupted run).")
            return None
        path = Path(out)
        meta = {"n_train": n_train, "done": 0, "method": method, "damping": damping, "curvature": curvature,
                "measurement": measurement}
        progress = Path(f"{path}.json")
        if resume and progress.exists():
            saved = json.loads(progress.read_text())
            differs = {k: (saved.get(k), v) for k, v in meta.items() if k != "done" and saved.get(k) != v}
            if differs:
                raise HesseError(f"cannot resume {path}: its settings differ {differs}; use another out= or resume=False.")
            meta = saved
        elif path.exists() and not resume:
            raise HesseError(f"{path} exists; pass resume=True to continue it, or remove it.")
        return cls(path, meta)

    def preconditioned(self) -> torch.Tensor | None:
        """The saved preconditioned queries, if this run is resumed past them."""
        query = Path(f"{self.path}.query.npy")
        if not (self.meta["done"] and query.exists() and self.path.exists()):
            return None
        self.scores = np.load(self.path, mmap_mode="r+")
        return torch.from_numpy(np.load(query))

    def save_preconditioned(self, X: torch.Tensor) -> None:
        np.save(Path(f"{self.path}.query.npy"), X.detach().cpu().numpy())
        self.meta["done"], self.done = 0, 0
        self.scores = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float64,
                                                shape=(X.shape[1], self.n_train))
        self._save_progress()

    def write(self, start: int, block: torch.Tensor) -> None:
        """Write one chunk of columns, flush, then record it as done."""
        self.scores[:, start:start + block.shape[1]] = block.numpy()
        self.scores.flush()
        self.meta["done"] = self.done = start + block.shape[1]
        self._save_progress()

    def _save_progress(self) -> None:
        tmp = Path(f"{self.path}.json.tmp")
        tmp.write_text(json.dumps(self.meta))
        tmp.replace(Path(f"{self.path}.json"))
