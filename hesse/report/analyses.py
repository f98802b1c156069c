"""Run the requested analyses on one curvature operator, timing each one; Ctrl-C keeps what finished."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hesse.analysis import bulk_outlier_split, per_layer, stability
from hesse.analysis.landscape import loss_landscape
from hesse.analysis.sharpness import average_sharpness, worst_case_sharpness
from hesse.errors import HesseError
from hesse.linalg import density, eigenvalues, trace
from hesse.operators import Objective
from hesse.operators.data import to_device
from hesse.operators.curvature import CurvatureOperator

SPECTRAL_ANALYSES = ("eigenvalues", "trace", "density", "per-layer", "stability")
EXTRA_ANALYSES = ("landscape", "sharpness")
ANALYSES = SPECTRAL_ANALYSES + EXTRA_ANALYSES
LANDSCAPE_STEPS = 11
SHARPNESS_RHO = 0.05
SHARPNESS_SIGMA = 0.01
LAYER_RTOL = 0.02  # per-layer traces to 2% (95% confidence), within the layer_probes products cap


@dataclass
class AnalysisSettings:
    """Budgets and options of every analysis (the CLI's ``--top-k``, ``--budget``, ...)."""

    analyses: tuple[str, ...] = SPECTRAL_ANALYSES
    top_k: int = 12  # enough to see past 9-10 class outliers (digits, C=10) to the bulk: C + 2
    tol: float = 1e-3
    budget: int = 60
    lanczos_steps: int = 40
    probes: int = 3
    layer_probes: int = 300  # the cap on per-layer trace products; they stop at LAYER_RTOL
    lr: float | None = None
    train_batch_size: int | None = None  # the training batch size B of the SGD check; None: full-batch GD
    seed: int = 0
    layer_blocks: Any = "module"

    def __post_init__(self) -> None:
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise HesseError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}.")
        if "stability" in self.analyses and self.lr is None:
            raise HesseError("the stability analysis needs the training learning rate; pass --lr 0.1 (say).")
        B = self.train_batch_size
        if B is not None and (isinstance(B, bool) or not isinstance(B, int) or B < 1):
            raise HesseError(f"train_batch_size must be a positive integer or None (full batch), got {B!r}.")


@dataclass
class AnalysisRun:
    """Results (objects with ``to_dict``), seconds and products per analysis, and warnings.

    ``interrupted`` names the analysis Ctrl-C stopped (``None`` when all finished); the
    results then hold only the analyses that finished before it.
    """

    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    matvecs: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    interrupted: str | None = None
    num_classes: int | None = None  # C of a classifier (see num_classes), for the outlier count

    @property
    def complete(self) -> bool:
        """True when every requested analysis finished."""
        return self.interrupted is None


def _sharpness_measures(objective: Objective, seed: int, progress: bool) -> dict[str, Any]:
    """Worst-case loss rise in an L2 ball of radius rho, and the average under Gaussian noise."""
    return {
        "worst": worst_case_sharpness(objective, rho=SHARPNESS_RHO, seed=seed, progress=progress),
        "average": average_sharpness(objective, sigma=SHARPNESS_SIGMA, seed=seed, progress=progress),
    }


def _analysis_calls(op: CurvatureOperator, s: AnalysisSettings, progress: bool) -> dict[str, Callable[[], Any]]:
    """One no-argument call per analysis, with the settings' budgets."""
    return {
        "eigenvalues": lambda: eigenvalues(op, k=s.top_k, which="largest", tol=s.tol, seed=s.seed, progress=progress),
        "trace": lambda: trace(op, "hutch++", budget=s.budget, seed=s.seed, progress=progress),
        "density": lambda: density(
            op, num_probes=s.probes, lanczos_steps=s.lanczos_steps, seed=s.seed, progress=progress
        ),
        "per-layer": lambda: per_layer(
            op, by=s.layer_blocks, rtol=LAYER_RTOL, trace_probes=s.layer_probes, tol=s.tol, max_steps=s.lanczos_steps,
            seed=s.seed, progress=progress,
        ),
        "stability": lambda: stability(op, s.lr, batch_size=s.train_batch_size, tol=s.tol, trace_budget=s.budget,
                                       seed=s.seed, progress=progress),
        "landscape": lambda: loss_landscape(
            op.objective, directions="random", dims=2, steps=LANDSCAPE_STEPS, seed=s.seed, progress=progress,
        ),
        "sharpness": lambda: _sharpness_measures(op.objective, s.seed, progress),
    }


def run_analyses(
    op: CurvatureOperator, settings: AnalysisSettings, *, progress: bool = True, on_start: Callable[[str], None] | None = None
) -> AnalysisRun:
    """Run ``settings.analyses`` in the canonical order on ``op``.

    Ctrl-C stops the run: the ``KeyboardInterrupt`` is re-raised with the partial
    :class:`AnalysisRun` (the analyses that finished, ``interrupted`` naming the one that
    did not) attached as ``error.partial``. A partial result of the interrupted analysis
    is left out of the results, and a warning says so.
    """
    counted = {"eigenvalues", "density"} & set(settings.analyses)
    run = AnalysisRun(num_classes=num_classes(op) if counted else None)
    calls = _analysis_calls(op, settings, progress)
    for name in (a for a in ANALYSES if a in settings.analyses):
        try:
            if on_start is not None:
                on_start(name)
            _run_one(run, name, calls[name])
        except KeyboardInterrupt as error:
            run.interrupted = name
            if getattr(error, "partial", None) is not None:
                run.warnings.append(f"{name}: interrupted; its partial result is left out of this report.")
            error.partial = run  # type: ignore[attr-defined]
            raise
    return run


def _run_one(run: AnalysisRun, name: str, call: Callable[[], Any]) -> None:
    """Time ``call``, record its result, products and warnings in ``run``."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)  # torch internals (e.g. forward-mode AD setup), not findings
        result = call()
    if getattr(result, "interrupted", False):  # a partial result returned instead of raised
        interrupt = KeyboardInterrupt()
        interrupt.partial = result  # type: ignore[attr-defined]
        raise interrupt
    run.results[name] = result
    run.seconds[name] = time.perf_counter() - start
    run.matvecs[name] = int(getattr(result, "matvecs", 0))
    run.warnings.extend(f"{name}: {w.message}" for w in caught)


def outlier_summary(run: AnalysisRun) -> dict | None:
    """How many eigenvalues stand out of the bulk (:func:`hesse.analysis.bulk_outlier_split`, with the trace).

    From the top-k eigenvalues when their converged values reach past the expected count
    (:func:`values_needed`); otherwise from whichever of the density (the Ritz values all
    probes agree on) and the eigenvalues saw more reliable values. The dict adds ``source``
    ("eigenvalues" or "density"), ``num_classes`` and ``values_needed``.
    """
    trace_result = run.results.get("trace")
    eig, dens = run.results.get("eigenvalues"), run.results.get("density")
    splits = {}
    if eig is not None and len(eig.values) >= 3 and eig.which != "smallest":
        splits["eigenvalues"] = bulk_outlier_split(eig, trace=trace_result)
    if dens is not None:
        splits["density"] = bulk_outlier_split(dens, trace=trace_result)
    if not splits:
        return None
    needed = values_needed(run.num_classes, splits.get("eigenvalues", splits.get("density")))
    eig_split = splits.get("eigenvalues")
    if eig_split is not None and eig_split.values_used >= needed:
        source = "eigenvalues"
    else:  # the source that saw more (the eigenvalues on a tie)
        source = max(splits, key=lambda name: (splits[name].values_used, name == "eigenvalues"))
    return {**splits[source].to_dict(), "source": source, "num_classes": run.num_classes, "values_needed": needed}


def values_needed(num_classes: int | None, split) -> int:
    """Reliable eigenvalues needed to see the gap below the outliers: ``C + 2`` for ``C`` classes
    (a gap after ``C - 1`` or ``C`` outliers, with two bulk values below it); without a class
    count, twice the outliers found plus one (at least 3)."""
    if num_classes:
        return num_classes + 2
    return max(3, 2 * split.num_outliers + 1)


def num_classes(op: CurvatureOperator) -> int | None:
    """``C`` for a classifier (cross-entropy or NLL loss on ``(N, C)`` outputs), from the model's
    output on the first batch; ``None`` for any other loss or when that cannot be run."""
    objective = getattr(op, "objective", None)
    if objective is None or not isinstance(getattr(objective, "criterion", None), (nn.CrossEntropyLoss, nn.NLLLoss)):
        return None
    try:
        batch = to_device(next(iter(objective.data)), objective.device)
        with torch.no_grad():
            output, _ = objective.call_model(objective.values(), batch)
    except Exception:  # noqa: BLE001 - a count for the report only; the analyses report real errors
        return None
    return int(output.shape[-1]) if getattr(output, "ndim", 0) == 2 and output.shape[-1] >= 2 else None
