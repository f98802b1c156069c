"""Curvature-based pruning: magnitude, OBD, OBS/WoodFisher/M-FAC and layer-wise OBS (SparseGPT).

One call per method; each returns a :class:`PruneResult` holding masks (``True`` = kept) and,
for the OBS-type methods, the compensating weight update ``δw``, so that the pruned
weights are ``(w + δw) ⊙ mask``. The user's model is never modified unless ``apply=True``
(or :func:`apply_masks` is called); evaluate a result without touching the model with
``objective.evaluate(at=result.pruned_values(objective))``.

* :func:`prune_magnitude`: remove the smallest ``|w_q|`` (the baseline);
* :func:`prune_obd`: optimal brain damage (LeCun, Denker & Solla 1990), saliency
  ``½ H_qq w_q²`` with the exact or estimated diagonal of the GGN or Hessian
  (:func:`hesse.linalg.diagonal`);
* :func:`prune_woodfisher`: optimal brain surgeon (Hassibi & Stork 1993) with the inverse of the
  damped empirical Fisher ``F = λI + (1/m) Σ g_i g_iᵀ`` (WoodFisher, Singh & Alistarh 2020;
  M-FAC, Frantar, Kurtic & Alistarh 2021), saliency ``w_q² / (2[F⁻¹]_qq)``, all chosen weights
  removed jointly with ``δw = −F⁻¹ E_Q ([F⁻¹]_QQ)⁻¹ w_Q``, per block of ``B`` weights or globally;
* :func:`prune_layerwise_obs`: OBC/SparseGPT (Frantar & Alistarh 2022, 2023) per
  ``nn.Linear``/``nn.Conv2d`` layer from calibration inputs, ``H = 2XXᵀ/N + λI``.

Targets: ``sparsity=0.7`` (a fraction per layer, or over all pruned tensors with
``scope="global"``), ``sparsity={"fc1.weight": 0.9, ...}`` (per tensor) or ``nm=(2, 4)``.
``rounds=T`` prunes gradually (cubic schedule, Zhu & Gupta 2017), recomputing the
curvature at the pruned weights between rounds; pruned weights stay pruned.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hesse._progress import progress_bar
from hesse.apply.pruning.fisher_inverse import (
    EmpiricalFisherInverse,
    block_fisher_inverse,
    block_inverse_diagonal,
    block_obs_update,
    damping,
)
from hesse.apply.pruning.layerwise import collect_hessians, layer_groups, layer_module, prune_layer
from hesse.apply.pruning.masks import (
    PruneResult,
    Sparsity,
    apply_masks,
    layer_fractions,
    nm_compatible,
    parse_sparsity,
    prunable_targets,
    schedule,
    select_masks,
)
from hesse.errors import HesseError
from hesse.linalg import diagonal
from hesse.operators import GGN, Hessian, Objective, as_objective

Values = dict[str, torch.Tensor]
RoundFn = Callable[[Values], tuple[Values, Callable[[Values, Values], Values] | None]]
"""One round of a score-based method: ``values -> (scores, update)``, where
``update(values, masks)`` returns the new values (``None``: just zero the pruned weights)."""

CURVATURES = {"ggn": GGN, "hessian": Hessian}


def prune_magnitude(model: nn.Module | Objective, *, sparsity: float | Mapping[str, float] | None = None,
                    nm: tuple[int, int] | str | None = None, scope: str = "layer", params: Any = None,
                    apply: bool = False) -> PruneResult:
    """Magnitude pruning: remove the weights with the smallest ``|w_q|`` (no data needed).

    ``model`` is an ``nn.Module`` or an :class:`~hesse.Objective`; ``params`` names the tensors
    to prune (default: every ``nn.Linear``/``nn.Conv2d`` weight, of the objective's parameters
    if an objective is given; the same default for every method)."""
    module = model.model if isinstance(model, Objective) else model
    among = model.param_names if isinstance(model, Objective) else None
    spec = parse_sparsity(sparsity, nm, scope)
    names, notes = nm_compatible(module, prunable_targets(module, params, among), spec, params is not None)
    start = time.perf_counter()
    weights = {n: p.detach() for n, p in module.named_parameters() if n in set(names)}
    masks = select_masks({n: w.abs() for n, w in weights.items()}, spec)
    result = PruneResult("magnitude", spec.label(), masks, None, notes, time.perf_counter() - start)
    if apply:
        apply_masks(module, result)
    return result


def prune_obd(model: nn.Module | Objective, criterion: Callable | None = None, data: Any = None, *,
              sparsity: float | Mapping[str, float] | None = None, nm: tuple[int, int] | str | None = None,
              scope: str = "layer", params: Any = None, curvature: str = "ggn", method: str = "exact",
              budget: int | None = None, seed: int = 0, fisher_samples: int = 256, vectorize: bool = True,
              rounds: int = 1, apply: bool = False, **settings: Any) -> PruneResult:
    """Optimal brain damage: remove the weights of least saliency ``½ H_qq w_q²``.

    ``H`` is the diagonal of the ``curvature`` of the full-data loss w.r.t. the pruned tensors:
    ``"ggn"`` (PSD, default) or ``"hessian"`` by :func:`hesse.linalg.diagonal` with ``method``
    (``"exact"``: one product per weight; ``"xdiag"``/``"hutchinson"``: ``budget`` products;
    ``"sampled"``, GGN only: ``budget`` square-root columns, one backward pass each), or
    ``"empirical-fisher"``: ``(1/m) Σ_i g_i²`` exactly, from the per-sample gradients of the first
    ``m = fisher_samples`` samples (as :func:`prune_woodfisher`; no estimator noise, so the
    choice for models with millions of weights, where ``budget`` products cannot resolve a
    diagonal). ``model, criterion, data, **settings`` are those of :class:`~hesse.Objective`.
    """
    if curvature not in (*CURVATURES, "empirical-fisher"):
        raise HesseError(f"curvature must be 'ggn', 'hessian' or 'empirical-fisher', got {curvature!r}.")
    objective, names, spec, notes = _prepare(model, criterion, data, sparsity, nm, scope, params, settings)

    def one_round(values: Values) -> tuple[Values, None]:
        if curvature == "empirical-fisher":
            G = per_sample_gradients(objective.restrict(names), values, fisher_samples, vectorize)
            diag = objective.restrict(names).unflatten(sum(g.double() ** 2 for g in G) / G.shape[0])
        else:
            op = CURVATURES[curvature](_objective_at(objective, values, names))
            diag = op.objective.unflatten(diagonal(op, method, budget=budget, seed=seed).estimate)
        return {n: 0.5 * diag[n].to(values[n].dtype) * values[n] ** 2 for n in names}, None

    record = {"curvature": curvature, "method": method, "budget": budget, "seed": seed, "rounds": rounds}
    if curvature == "empirical-fisher":
        record = {"curvature": curvature, "fisher_samples": fisher_samples, "rounds": rounds}
    return _score_prune("obd", objective, names, spec, rounds, one_round, apply, record, notes)


def prune_woodfisher(model: nn.Module | Objective, criterion: Callable | None = None, data: Any = None, *,
                     sparsity: float | Mapping[str, float] | None = None, nm: tuple[int, int] | str | None = None,
                     scope: str = "layer", params: Any = None, block_size: int | None = 128,
                     fisher_samples: int = 256, damp: float = 1e-2, rounds: int = 1, vectorize: bool = True,
                     apply: bool = False, **settings: Any) -> PruneResult:
    """Optimal brain surgeon with the inverse damped empirical Fisher (WoodFisher / M-FAC).

    ``F = λI + (1/m) Σ g_i g_iᵀ`` from the per-sample gradients of the first ``m = fisher_samples``
    samples of the data (:meth:`Objective.per_sample_gradients`), ``λ = damp · mean diag((1/m)Σ g gᵀ)``.
    ``block_size=B``: ``F`` block-diagonal over blocks of ``B`` consecutive weights (memory ``P·B``);
    ``None``: the whole ``F`` in M-FAC's low-rank form (memory ``P·m``). The weights of least
    saliency ``w_q²/(2[F⁻¹]_qq)`` are removed jointly by the exact OBS update within each block
    (or globally). ``vectorize=False`` loops over the samples instead of ``torch.func.vmap`` (for
    models with data-dependent control flow, e.g. transformers' attention masks). ``model, criterion,
    data, **settings`` are those of :class:`~hesse.Objective`.
    """
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise HesseError(f"block_size must be a positive integer or None (whole Fisher), got {block_size!r}.")
    if not isinstance(fisher_samples, int) or fisher_samples < 1:
        raise HesseError(f"fisher_samples must be a positive integer, got {fisher_samples!r}.")
    objective, names, spec, notes = _prepare(model, criterion, data, sparsity, nm, scope, params, settings)
    restricted = objective.restrict(names)

    def one_round(values: Values) -> tuple[Values, Callable[[Values, Values], Values]]:
        G = per_sample_gradients(restricted, values, fisher_samples, vectorize)
        lam = damping(G, damp)
        w = restricted.flatten(values).double()
        if block_size is None:
            inverse = EmpiricalFisherInverse(G, lam)
            inv_diag, update = inverse.diagonal(), inverse.obs_update
        else:
            Finv = block_fisher_inverse(G, block_size, lam)
            inv_diag = block_inverse_diagonal(Finv, w.numel())
            update = lambda w_, prune: block_obs_update(Finv, w_, prune)  # noqa: E731

        def surgeon(current: Values, masks: Values) -> Values:
            new = w + update(w, ~restricted.flatten(masks))
            return {n: t.to(current[n].dtype) * masks[n] for n, t in restricted.unflatten(new).items()}

        scores = restricted.unflatten((w ** 2 / (2 * inv_diag)).to(restricted.dtype))
        return scores, surgeon

    record = {"block_size": block_size, "fisher_samples": fisher_samples, "damp": damp, "rounds": rounds,
              "vectorize": vectorize}
    return _score_prune("woodfisher", objective, names, spec, rounds, one_round, apply, record, notes)


def prune_layerwise_obs(model: nn.Module | Objective, criterion: Callable | None = None, data: Any = None, *,
                        sparsity: float | Mapping[str, float] | None = None, nm: tuple[int, int] | str | None = None,
                        params: Any = None, damp: float = 1e-2, block_size: int = 128, sequential: bool = True,
                        calibration: Iterable | None = None, apply: bool = False, progress: bool | None = None,
                        **settings: Any) -> PruneResult:
    """Layer-wise OBS (SparseGPT) of every ``nn.Linear``/``nn.Conv2d`` weight to its own target.

    ``H = 2XXᵀ/N + λI`` from the layer's inputs on the ``calibration`` batches (default: the
    objective's data), ``λ = damp · mean diag(2XXᵀ/N)``; columns in blocks of ``block_size``
    with lazy updates. ``sequential=True`` collects each layer's inputs with the earlier
    layers already pruned: one calibration pass per group of layers reading the same input
    (e.g. query, key, value), each pass stopped once the group has run; ``False``: one pass,
    dense inputs.
    A Hessian that is not positive definite is retried in float64, then with more damping
    (a :class:`~hesse.apply.pruning.layerwise.DampingWarning`, also in ``result.warnings``).
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise HesseError(f"block_size must be a positive integer, got {block_size!r}.")
    objective, names, spec, notes = _prepare(model, criterion, data, sparsity, nm, "layer", params, settings)
    modules = {n: layer_module(objective.model, n) for n in names}
    fractions = layer_fractions(spec, names) if spec.nm is None else dict.fromkeys(names)
    batches = list(calibration if calibration is not None else objective.data)
    start = time.perf_counter()
    values = {n: p.detach() for n, p in objective.model.named_parameters()}
    masks: Values = {}
    groups, calls = layer_groups(objective, modules, values, batches[0]) if batches else ([names], None)
    with progress_bar(total=len(names), desc="layer-wise OBS", enabled=progress, unit="layer") as bar:
        for group in (groups if sequential else [names]):
            hessians = collect_hessians(objective, {n: modules[n] for n in group}, values, batches, calls)
            for name in group:
                values[name], masks[name], note = prune_layer(
                    values[name], hessians.pop(name), name, damp=damp, block_size=block_size,
                    fraction=fractions[name], nm=spec.nm)
                notes += [note] if note else []
                bar.update(1)
    original = {n: p.detach() for n, p in objective.model.named_parameters()}
    result = PruneResult("layerwise-obs", spec.label(), masks, {n: values[n] - original[n] for n in names},
                         notes, time.perf_counter() - start,
                         {"damp": damp, "block_size": block_size, "sequential": sequential})
    if apply:
        apply_masks(objective.model, result)
    return result


# ---- shared steps ------------------------------------------------------------------------------
def _prepare(model: nn.Module | Objective, criterion: Callable | None, data: Any, sparsity: Any, nm: Any,
             scope: str, params: Any, settings: dict[str, Any]) -> tuple[Objective, list[str], Sparsity, list[str]]:
    """The objective, the names of the tensors to prune (among its parameters), the target and
    notes on tensors left dense."""
    objective = as_objective(model, criterion, data, **settings)
    spec = parse_sparsity(sparsity, nm, scope)
    targets = prunable_targets(objective.model, params, objective.param_names)
    names, notes = nm_compatible(objective.model, targets, spec, params is not None)
    outside = [n for n in names if n not in objective.param_names]
    if outside:
        raise HesseError(f"{outside[:3]} are to be pruned but are not parameters of the objective; "
                         "select them in the objective's params= too.")
    return objective, names, spec, notes


def _score_prune(method: str, objective: Objective, names: list[str], spec: Sparsity, rounds: int,
                 one_round: RoundFn, apply: bool, record: dict[str, Any], notes: list[str]) -> PruneResult:
    """Run ``rounds`` rounds of a score-based method: score at the current pruned weights, keep
    earlier removals (score ``-inf``), select masks for this round's target, update the weights."""
    if spec.nm is not None and rounds != 1:
        raise HesseError("N:M pruning is one-shot; use rounds=1 with nm=.")
    start = time.perf_counter()
    original = {n: objective.values()[n] for n in names}
    values = dict(original)
    masks = {n: torch.ones_like(t, dtype=torch.bool) for n, t in original.items()}
    surgeon = None
    for factor in schedule(rounds):
        scores, surgeon = one_round(values)
        scores = {n: s.masked_fill(~masks[n], float("-inf")) for n, s in scores.items()}
        masks = select_masks(scores, spec, factor)
        values = surgeon(values, masks) if surgeon else {n: values[n] * masks[n] for n in names}
    updates = {n: values[n] - original[n] for n in names} if surgeon else None
    result = PruneResult(method, spec.label(), masks, updates, notes, time.perf_counter() - start, record)
    if apply:
        apply_masks(objective.model, result)
    return result


def _objective_at(objective: Objective, values: Values, names: list[str]) -> Objective:
    """The objective restricted to ``names`` at the parameter ``values``: itself when those are the
    current values, else the same objective on a copy of the model holding them (curvature
    operators read the model's current values; the user's model is never written)."""
    current = objective.values()
    if all(torch.equal(values[n], current[n]) for n in names):
        return objective.restrict(names)
    model = copy.deepcopy(objective.model)
    with torch.no_grad():
        for n in names:
            model.get_parameter(n).copy_(values[n])
    return Objective(model, objective.criterion, objective.data.source, params=names, forward=objective.forward,
                     num_samples=objective.count_samples, reduction=objective.reduction,
                     stochastic=objective.stochastic, check_data=objective.check_data, progress=objective.progress)


def per_sample_gradients(objective: Objective, values: Values, count: int, vectorize: bool = True) -> torch.Tensor:
    """``[m, P]`` per-sample gradients at ``values`` of the first ``m ≤ count`` samples of the data."""
    rows, seen = [], 0
    for batch in objective.data:
        rows.append(objective.per_sample_gradients(batch, at=values, vectorize=vectorize)[: count - seen])
        seen += rows[-1].shape[0]
        if seen >= count:
            break
    return torch.cat(rows).detach()
