"""Hessian-aware mixed-precision quantization: sensitivities, bit allocation, fake quantization.

1. :func:`sensitivities`: for every quantizable layer ``i`` (see
   :mod:`hesse.apply.quantization.layers`) and candidate bit width ``b``, HAWQ-V2's measure
   (Dong et al. 2020, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks")

   .. math::  \\Omega_i(b) = \\frac{\\operatorname{Tr}(H_{ii})}{n_i}\\,\\lVert Q_b(W_i) - W_i\\rVert^2,

   from the traces of the diagonal blocks ``H_ii`` of the Hessian (or GGN) restricted to the
   quantized weights, estimated with error bars by :func:`hesse.analysis.spectrum.per_layer`;
   and the Q-BERT variant (Shen et al. 2020; HAWQ, Dong et al. 2019, ranks layers by the same
   top eigenvalue) ``λ_max(H_ii) ‖Q_b(W_i) − W_i‖²``. A trace that is negative (possible for
   the Hessian away from a minimum) enters as ``max(Tr, 0) = 0`` and is flagged
   ``negative``; one with ``|Tr| < 2 stderr`` is used as estimated and flagged
   ``not significant`` (its ordering against other layers is noise). Nothing divides by a trace.
2. :func:`allocate_bits` (HAWQ-V3, Yao et al. 2021): the integer linear program of
   :mod:`hesse.apply.quantization.allocation` under size, BOPs or latency limits.
3. :func:`evaluate_bits`: loss and accuracy of a quantized **copy** of the model through an
   :class:`~hesse.Objective` (:mod:`hesse.apply.quantization.fake`); :func:`export_config`
   writes the chosen configuration as JSON.

Baselines for the claim that curvature helps: :func:`random_allocation` (random per-layer
sensitivities, log-uniform over the range of the measured ones, same limits) and
:func:`reversed_allocation` (the measured per-parameter traces given to the layers in
reversed rank order, same limits).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hesse._progress import progress_bar
from hesse.analysis.spectrum import PerLayerResult, block_traces, budget_unit, per_layer
from hesse.apply.quantization.allocation import Allocation, allocate_bits, fraction_limit
from hesse.apply.quantization.fake import perturbation, quantize_weight, quantized_copy, quantized_weights
from hesse.apply.quantization.layers import QuantLayer, find_layers, layer_costs, measure_macs
from hesse.errors import HesseError, NotConvergedWarning
from hesse.linalg.checks import check_positive
from hesse.operators import GGN, BlockDiagonalOperator, Hessian, Objective, as_objective
from hesse.operators.objective import Evaluation

__all__ = [
    "Allocation", "QuantLayer", "Sensitivity", "allocate_bits", "evaluate_bits", "export_config", "find_layers",
    "fraction_limit", "layer_traces", "quantize_weight", "quantized_copy", "quantized_weights", "random_allocation",
    "reversed_allocation", "sensitivities",
]
MEASURES = ("hawq-v2", "qbert")
SIGNIFICANCE = 2.0  # a trace is significant when |trace| >= 2 stderr


@dataclass
class Sensitivity:
    """Per-layer curvature and quantization error; ``trace``, ``trace_stderr``, ``top_eigenvalue``
    are ``[L]`` arrays, ``perturbation[i, j] = ‖Q_{bits[j]}(W_i) − W_i‖²`` is ``[L, len(bits)]``."""

    layers: list[QuantLayer]
    bits: tuple[int, ...]
    trace: np.ndarray
    trace_stderr: np.ndarray
    top_eigenvalue: np.ndarray
    perturbation: np.ndarray
    curvature: str
    result: PerLayerResult

    @property
    def names(self) -> list[str]:
        return [q.name for q in self.layers]

    @property
    def numel(self) -> np.ndarray:
        return np.array([q.numel for q in self.layers], dtype=float)

    @property
    def trace_per_parameter(self) -> np.ndarray:
        """``max(Tr(H_ii), 0) / n_i``: HAWQ-V2's layer sensitivity (negative traces clamped to 0)."""
        return np.maximum(self.trace, 0.0) / self.numel

    @property
    def negative(self) -> np.ndarray:
        """Layers whose trace estimate is below zero (clamped to 0 in ``Ω``)."""
        return self.trace < 0

    @property
    def significant(self) -> np.ndarray:
        """Layers with ``|Tr| ≥ 2 stderr`` (an exact trace, stderr 0, is significant unless 0)."""
        return (np.abs(self.trace) >= SIGNIFICANCE * self.trace_stderr) & (self.trace != 0)

    def omega(self, measure: str = "hawq-v2") -> np.ndarray:
        """``[L, len(bits)]``: ``max(Tr,0)/n · ‖ΔW‖²`` (``"hawq-v2"``) or ``max(λ_max,0) · ‖ΔW‖²`` (``"qbert"``)."""
        return _scale(self, measure)[:, None] * self.perturbation

    def tie_break(self, measure: str = "hawq-v2") -> np.ndarray | None:
        """``‖ΔW‖²`` of the layers whose ``Ω`` is 0 (no positive curvature), 0 elsewhere: the
        ``tie_break`` of :func:`allocate_bits`, which then spends budget that no sensitive
        layer can use on them, largest error first. ``None`` when every layer has curvature."""
        zero = _scale(self, measure) <= 0
        return np.where(zero[:, None], self.perturbation, 0.0) if zero.any() else None

    def costs(self, act_bits: int | None = None) -> dict[str, np.ndarray]:
        """``{"size": bits, "bops": MACs · b_w · b_a}`` per layer and bit width (see :func:`layer_costs`)."""
        return layer_costs(self.layers, self.bits, act_bits)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per layer: name, kind, size, trace ± stderr, flags, Ω per bit width."""
        omega = self.omega("hawq-v2")
        qbert = None if np.isnan(self.top_eigenvalue).any() else self.omega("qbert")
        return [{"layer": q.name, "param": q.param, "kind": q.kind, "numel": q.numel, "macs": q.macs,
                 "trace": float(self.trace[i]), "trace_stderr": float(self.trace_stderr[i]),
                 "trace_per_parameter": float(self.trace_per_parameter[i]),
                 "top_eigenvalue": None if qbert is None else float(self.top_eigenvalue[i]),
                 "negative": bool(self.negative[i]),
                 "significant": bool(self.significant[i]),
                 "omega": {str(b): float(omega[i, j]) for j, b in enumerate(self.bits)},
                 "omega_qbert": None if qbert is None else {str(b): float(v) for b, v in zip(self.bits, qbert[i])}}
                for i, q in enumerate(self.layers)]


def sensitivities(model: torch.nn.Module | Objective, criterion: Any = None, data: Any = None, *,
                  bits: Sequence[int] = (2, 4, 8), curvature: str = "hessian", layers: Iterable[str] | None = None,
                  rtol: float = 0.02, trace_probes: int = 300, max_steps: int = 60, tol: float = 1e-3,
                  seed: int = 0, hessian_method: str = "auto", progress: bool | None = None,
                  top_eigenvalues: bool = True, trace_method: str = "auto", **settings: Any) -> Sensitivity:
    """Traces (``rtol``, at most ``trace_probes`` columns per block), top eigenvalues (Lanczos to ``tol``,
    at most ``max_steps``) and quantization errors of every quantizable layer, for ``bits``.

    ``model, criterion, data, **settings`` are those of :class:`~hesse.Objective` (or pass one);
    ``layers``: globs on layer or parameter names (default: every quantizable layer among the
    objective's parameters); ``curvature``: ``"hessian"`` (HAWQ-V2) or ``"ggn"`` (PSD). All
    blocks share each product of the block-diagonal view, one data pass per product.
    ``top_eigenvalues=False`` skips the per-layer Lanczos (HAWQ-V2's ``Ω`` needs only traces;
    each Lanczos step multiplies every block, as costly as one trace probe per block): the
    top eigenvalues are NaN and the ``"qbert"`` measure is refused. ``trace_method``: as in
    :func:`~hesse.analysis.spectrum.per_layer`; ``"auto"`` samples the GGN's square root (one
    backward per column for all layers, at most ``trace_probes`` times the layers in all) for the supported
    likelihoods and runs per-block Hutch++ on the Hessian.
    """
    if curvature not in ("hessian", "ggn"):
        raise HesseError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}.")
    bits = _check_bits(bits)
    objective = as_objective(model, criterion, data, **settings)
    found = find_layers(objective.model, objective.param_names, layers)
    measure_macs(objective, found)
    restricted = objective.restrict(list(dict.fromkeys(q.param for q in found)))
    op = Hessian(restricted, method=hessian_method) if curvature == "hessian" else GGN(restricted)
    view = BlockDiagonalOperator(op, _layer_slices(restricted, found))
    if top_eigenvalues:
        result = per_layer(view, rtol=rtol, trace_probes=trace_probes, tol=tol, max_steps=max_steps, seed=seed,
                           progress=progress, trace_method=trace_method)
    else:
        result = layer_traces(view, rtol=rtol, trace_probes=trace_probes, seed=seed, progress=progress,
                              trace_method=trace_method)
    if np.isnan(list(result.trace.values())).any():
        raise HesseError(f"some layer traces got no probe within trace_probes={trace_probes}; raise trace_probes.")
    weights = {q.name: objective.model.get_parameter(q.param).detach()[q.rows] for q in found}
    errors = np.array([[perturbation(weights[q.name], b) for b in bits] for q in found])
    column = lambda values: np.array([values[q.name] for q in found], dtype=float)  # noqa: E731
    return Sensitivity(found, bits, column(result.trace), column(result.trace_stderr),
                       column(result.top_eigenvalue), errors, curvature, result)


def layer_traces(view: BlockDiagonalOperator, *, rtol: float, trace_probes: int, seed: int = 0,
                 progress: bool | None = None, trace_method: str = "auto") -> PerLayerResult:
    """The traces of :func:`hesse.analysis.spectrum.per_layer` alone (same estimators, same
    ``rtol``, ``trace_probes`` and ``trace_method``); top eigenvalues NaN (unconverged);
    ``matvecs``: products of the whole operator (or square-root columns)."""
    check_positive("rtol", rtol)
    if trace_probes < 2:
        raise HesseError("trace_probes must be at least 2 to report a stderr.")
    names = list(view.blocks)
    traces = block_traces(view, trace_method, rtol, trace_probes, seed, torch.Generator().manual_seed(seed))
    with progress_bar(total=trace_probes, desc="layer traces", enabled=progress, unit="column") as bar:
        traces.run(bar.update)
    found, products = traces.results(), traces.matvecs
    result = PerLayerResult(names, {n: s.stop - s.start for n, s in view.blocks.items()},
                            dict.fromkeys(names, math.nan), dict.fromkeys(names, False),
                            {n: t.estimate for n, t in found.items()}, {n: t.stderr for n, t in found.items()},
                            {n: t.method for n, t in found.items()}, rtol, products, products)
    loose = [n for n, ok in result.rtol_met.items() if not ok]
    if loose:
        warnings.warn(f"layer_traces: traces of {loose} did not reach rtol={rtol:g} within trace_probes="
                      f"{trace_probes} columns {budget_unit(result)}; raise trace_probes.", NotConvergedWarning, stacklevel=2)
    return result


def _check_bits(bits: Sequence[int]) -> tuple[int, ...]:
    """Distinct integer bit widths of at least 2, ascending."""
    widths = tuple(sorted(set(int(b) for b in bits)))
    if not widths or widths[0] < 2 or any(int(b) != b for b in bits):
        raise HesseError(f"bit widths must be integers of at least 2, e.g. (2, 4, 8); got {tuple(bits)}.")
    return widths


def _layer_slices(objective: Objective, layers: list[QuantLayer]) -> dict[str, slice]:
    """Each layer's slice of the flat vector of the quantized weights (row blocks of a packed
    weight are contiguous in its row-major flattening)."""
    slices = {}
    for q in layers:
        block = objective.blocks[q.param]
        width = q.numel // (q.rows.stop - q.rows.start)
        slices[q.name] = slice(block.start + q.rows.start * width, block.start + q.rows.stop * width)
    return slices


def random_allocation(sens: Sensitivity, costs: Mapping[str, np.ndarray], limits: Mapping[str, float],
                      seed: int, measure: str = "hawq-v2") -> Allocation:
    """The allocation for random layer sensitivities ``s_i`` (log-uniform between the smallest and
    largest positive measured ones) times ``‖ΔW_i‖²``, under the same limits: a random allocation
    that still spends the budget."""
    scale = _scale(sens, measure)
    positive = scale[scale > 0]
    lo, hi = (positive.min(), positive.max()) if positive.size else (1.0, 1.0)
    rng = np.random.default_rng(seed)
    s = np.exp(rng.uniform(math.log(lo), math.log(hi) + 1e-12, size=scale.size))
    return allocate_bits(s[:, None] * sens.perturbation, costs, limits, sens.bits)


def reversed_allocation(sens: Sensitivity, costs: Mapping[str, np.ndarray], limits: Mapping[str, float],
                        measure: str = "hawq-v2") -> Allocation:
    """The allocation when the most sensitive layer gets the least sensitive layer's measure and so
    on (ranks reversed), under the same limits: what curvature-blind luck could do worst."""
    scale = _scale(sens, measure)
    order = np.argsort(scale)
    swapped = np.empty_like(scale)
    swapped[order] = scale[order[::-1]]
    return allocate_bits(swapped[:, None] * sens.perturbation, costs, limits, sens.bits)


def _scale(sens: Sensitivity, measure: str) -> np.ndarray:
    """The per-layer factor of ``Ω`` (trace per parameter or top eigenvalue, at least 0)."""
    if measure not in MEASURES:
        raise HesseError(f"measure must be one of {MEASURES}, got {measure!r}.")
    if measure == "qbert" and np.isnan(sens.top_eigenvalue).any():
        raise HesseError("the qbert measure needs the top eigenvalues: sensitivities(..., top_eigenvalues=True).")
    return sens.trace_per_parameter if measure == "hawq-v2" else np.maximum(sens.top_eigenvalue, 0.0)


def evaluate_bits(objective: Objective, layers: Sequence[QuantLayer], bits: Sequence[int], *,
                  act_bits: int | None = None, calibration: Iterable | None = None) -> Evaluation:
    """Loss and accuracy of a quantized copy of the objective's model (layer ``i`` at ``bits[i]``,
    activations at ``act_bits`` if given) on the objective's data, through an :class:`Objective`
    with the same settings; the objective's model is never modified."""
    model = quantized_copy(objective, layers, bits, act_bits, calibration)
    copy_objective = Objective(model, objective.criterion, objective.data.source, params=objective.param_names,
                               forward=objective.forward, num_samples=objective.count_samples,
                               reduction=objective.reduction, stochastic=objective.stochastic,
                               check_data=objective.check_data)
    return copy_objective.evaluate()


def export_config(sens: Sensitivity, allocation: Allocation, path: str | Path | None = None,
                  measure: str = "hawq-v2") -> dict[str, Any]:
    """The configuration as a JSON-ready dict (and written to ``path`` if given): per layer its
    name, parameter, rows, bits, size in bytes and ``Ω`` at the chosen bits; and the totals."""
    omega = sens.omega(measure)
    layers = [{"name": q.name, "param": q.param, "rows": [q.rows.start, q.rows.stop], "bits": b,
               "size_bytes": q.numel * b / 8, "omega": float(omega[i, sens.bits.index(b)])}
              for i, (q, b) in enumerate(zip(sens.layers, allocation.bits))]
    config = {"measure": measure, "curvature": sens.curvature, "objective": allocation.objective,
              "costs": allocation.costs, "layers": layers}
    if path is not None:
        Path(path).write_text(json.dumps(config, indent=1), encoding="utf-8")
    return config
