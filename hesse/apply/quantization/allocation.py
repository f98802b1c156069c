"""Mixed-precision bit allocation as an integer linear program (HAWQ-V3, Yao et al. 2021).

With binary ``x_ij = 1`` when layer ``i`` gets the ``j``-th candidate bit width ``b_j``:

.. math::

    \\min_x \\sum_{ij} \\Omega_i(b_j) x_{ij} \\quad \\text{s.t.} \\quad
    \\sum_j x_{ij} = 1 \\;\\forall i, \\qquad
    \\sum_{ij} c^{(k)}_{ij} x_{ij} \\le \\text{limit}_k \\;\\forall k,

plus ``x_ij = x_i'j`` for layers that must share a bit width and ``x_{i, j(b)} = 1`` for
fixed layers. Solved exactly by HiGHS through :func:`scipy.optimize.milp` (no solver
binaries). HAWQ-V3 solves the same program with PuLP; HAWQ-V2 (Dong et al. 2020) picks the
Pareto point of ``Σ Ω`` against size, which is this program with a size limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from hesse.errors import HesseError


@dataclass
class Allocation:
    """One bit width per layer (``bits``), the minimised ``objective = Σ_i Ω_i(b_i)`` and the
    total of every cost (``costs``, e.g. ``{"size": ..., "bops": ...}``) at that choice."""

    bits: list[int]
    objective: float
    costs: dict[str, float]


def fraction_limit(cost: np.ndarray, fraction: float) -> float:
    """The limit ``lo + fraction · (hi − lo)`` between the all-cheapest total ``lo = Σ_i min_j c_ij``
    and the all-dearest total ``hi = Σ_i max_j c_ij`` (``fraction`` in ``[0, 1]``)."""
    if not 0.0 <= fraction <= 1.0:
        raise HesseError(f"a budget fraction must lie in [0, 1] (0: all lowest bits, 1: all highest), got {fraction}.")
    cost = np.asarray(cost, dtype=float)
    lo, hi = cost.min(1).sum(), cost.max(1).sum()
    return float(lo + fraction * (hi - lo))


def allocate_bits(sensitivity: np.ndarray, costs: Mapping[str, np.ndarray], limits: Mapping[str, float],
                  bits: Sequence[int] = (4, 8), same_bits: Iterable[Sequence[int]] = (),
                  fixed: Mapping[int, int] | None = None, tie_break: np.ndarray | None = None) -> Allocation:
    """The bit widths minimising ``Σ_i sensitivity[i, j(i)]`` under ``costs[k] · x ≤ limits[k]``.

    ``sensitivity``: ``[L, len(bits)]`` (e.g. HAWQ-V2's ``Ω_i(b)``); ``costs``: ``{name: [L,
    len(bits)]}`` (size in bits, BOPs ``MACs · b_w · b_a``, latency, ...); ``limits``: upper
    bounds on the totals of some of those costs; ``same_bits``: tuples of layer indices that
    must share one bit width; ``fixed``: ``{layer index: bit width}``; ``tie_break``: an
    ``[L, len(bits)]`` second objective, minimised among the allocations with the least
    ``Σ sensitivity`` (to a relative ``1e-9``): e.g. the quantization error of layers whose
    sensitivity is 0, so that budget nothing sensitive can use is spent on them (a second
    integer program: a tiny weight in one objective would fall below the solver's tolerance).
    Raises a :class:`HesseError` naming the tightest constraint when no allocation satisfies them all.
    """
    S, cost_arrays, fixed = _check_problem(sensitivity, costs, limits, bits, fixed or {})
    T = None if tie_break is None else _check_problem(tie_break, {}, {}, bits, {})[0]
    if T is not None and T.shape != S.shape:
        raise HesseError(f"tie_break has shape {list(T.shape)}, the sensitivity {list(S.shape)}.")
    L, B = S.shape
    structure = _structure(L, B, [tuple(g) for g in same_bits])
    lower = np.zeros(L * B)
    for layer, width in fixed.items():
        lower[layer * B + list(bits).index(width)] = 1.0
    budget = [LinearConstraint(cost_arrays[k].reshape(1, -1), -np.inf, float(limits[k])) for k in limits]
    bounds = Bounds(lower, np.ones(L * B))
    objective = S.reshape(-1) / max(float(np.abs(S).max()), 1e-300)  # O(1) for the solver's tolerances
    solution = _solve(objective, structure + budget, bounds)
    if solution is None:
        raise HesseError(_infeasible_reason(cost_arrays, limits, structure, lower))
    if T is not None and np.abs(T).max() > 0:
        best = float(objective @ solution)
        keep = LinearConstraint(objective.reshape(1, -1), -np.inf, best + 1e-9 * max(1.0, abs(best)))
        second = _solve(T.reshape(-1) / float(np.abs(T).max()), structure + budget + [keep], bounds)
        solution = solution if second is None else second
    choice = solution.reshape(L, B).argmax(1)
    rows = np.arange(L)
    return Allocation([int(bits[j]) for j in choice], float(S[rows, choice].sum()),
                      {k: float(c[rows, choice].sum()) for k, c in cost_arrays.items()})


def _check_problem(sensitivity: np.ndarray, costs: Mapping[str, np.ndarray], limits: Mapping[str, float],
                   bits: Sequence[int], fixed: Mapping[int, int]) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Validated float arrays (shapes ``[L, len(bits)]``, finite) and the fixed layers."""
    S = np.asarray(sensitivity, dtype=float)
    if S.ndim != 2 or S.shape[1] != len(bits) or S.shape[0] == 0:
        raise HesseError(f"sensitivity must be [layers, len(bits)={len(bits)}], got shape {list(S.shape)}.")
    if len(set(bits)) != len(bits):
        raise HesseError(f"bits must be distinct, got {tuple(bits)}.")
    arrays = {k: np.asarray(c, dtype=float) for k, c in costs.items()}
    for name, array in {"sensitivity": S, **arrays}.items():
        if array.shape != S.shape:
            raise HesseError(f"cost {name!r} has shape {list(array.shape)}, the sensitivity {list(S.shape)}.")
        if not np.isfinite(array).all():
            raise HesseError(f"{name!r} holds NaN or inf; every entry must be a finite number.")
    unknown = [k for k in limits if k not in arrays]
    if unknown:
        raise HesseError(f"limits {unknown} have no cost array; costs are {sorted(arrays)}.")
    for layer, width in fixed.items():
        if not 0 <= layer < S.shape[0] or width not in bits:
            raise HesseError(f"fixed {{{layer}: {width}}}: the layer must be in [0, {S.shape[0]}) and the "
                             f"bit width one of {tuple(bits)}.")
    return S, arrays, dict(fixed)


def _structure(L: int, B: int, same_bits: list[tuple[int, ...]]) -> list[LinearConstraint]:
    """One bit width per layer (``Σ_j x_ij = 1``) and ``x_aj = x_bj`` within every ``same_bits`` group."""
    one = np.kron(np.eye(L), np.ones((1, B)))
    rows = []
    for group in same_bits:
        if any(not 0 <= i < L for i in group):
            raise HesseError(f"same_bits group {group} names a layer outside [0, {L}).")
        for other in group[1:]:
            for j in range(B):
                row = np.zeros(L * B)
                row[group[0] * B + j], row[other * B + j] = 1.0, -1.0
                rows.append(row)
    constraints = [LinearConstraint(one, 1.0, 1.0)]
    if rows:
        constraints.append(LinearConstraint(np.array(rows), 0.0, 0.0))
    return constraints


def _solve(c: np.ndarray, constraints: list[LinearConstraint], bounds: Bounds) -> np.ndarray | None:
    """The optimal binary ``x`` of ``min cᵀx`` (``None`` when infeasible)."""
    result = milp(c, constraints=constraints, integrality=np.ones(c.size), bounds=bounds,
                  options={"mip_rel_gap": 1e-9})
    if result.status == 2 or result.x is None:
        return None
    if result.status != 0:
        raise HesseError(f"the bit-allocation solver stopped without an optimum: {result.message}")
    return np.round(result.x)


def _infeasible_reason(costs: dict[str, np.ndarray], limits: Mapping[str, float],
                       structure: list[LinearConstraint], lower: np.ndarray) -> str:
    """Which constraint makes the program infeasible: every limit against the least total its
    cost can reach under the one-width, ``same_bits`` and ``fixed`` constraints alone."""
    bounds = Bounds(lower, np.ones(lower.size))
    if _solve(np.zeros(lower.size), structure, bounds) is None:
        return "no bit allocation satisfies the same_bits and fixed constraints together; they contradict each other."
    least = {k: float(costs[k].reshape(-1) @ _solve(costs[k].reshape(-1), structure, bounds)) for k in limits}
    over = {k: least[k] / limits[k] if limits[k] > 0 else np.inf for k in limits if least[k] > limits[k]}
    if not over:
        return (f"no bit allocation meets all the limits {dict(limits)} at once, though each alone can be met "
                f"(least totals {least}); loosen one of them.")
    name = max(over, key=over.get)
    return (f"the {name} limit {limits[name]:.6g} is below the least {name} any allocation reaches, "
            f"{least[name]:.6g} (with the fixed and same_bits layers); raise the {name} limit.")
