"""Hessian-aware mixed precision on the 36 linear layers of all-MiniLM-L6-v2 (Q-BERT's setting).

The objective is the MiniLM example's (``hesse.examples.minilm_example``): the contrastive
loss with in-batch negatives on the 32 bundled paraphrase pairs (4 batches of 8); the metric
is its retrieval accuracy (the right paraphrase is the most similar of the batch) and the
loss. Per seed, the per-layer traces use 2 of the 4 batches drawn by the seed (small budgets:
``rtol`` 0.1, at most ``--probes`` products); weights go to 4 or 8 bits at 25%, 50%, 75% of
the way from all-4-bit to all-8-bit size; random allocations: ``--randoms`` per budget.

    python examples/quantize_minilm.py [--seeds 0 1 2] [--randoms 5] [--probes 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from hesse.apply.quantize import (
    allocate_bits, evaluate_bits, fraction_limit, random_allocation, reversed_allocation, sensitivities,
)
from hesse.examples import minilm_example
from hesse.operators import Objective

BITS = (4, 8)
FRACTIONS = (0.25, 0.5, 0.75)
LINEAR = "encoder.layer.*"


def one_seed(seed: int, randoms: int, probes: int) -> dict[float, dict]:
    """``{fraction: {"hessian": (MiB, loss, acc), "reversed": ..., "random": [...], "bits": [...]}}``."""
    problem = minilm_example()
    chosen = sorted(torch.randperm(len(problem.data), generator=torch.Generator().manual_seed(seed))[:2].tolist())
    settings = dict(forward=problem.forward, params=problem.params)
    curvature = Objective(problem.model, problem.criterion, [problem.data[i] for i in chosen], **settings)
    evaluation = Objective(problem.model, problem.criterion, problem.data, **settings)
    sens = sensitivities(curvature, bits=BITS, layers=[LINEAR], rtol=0.1, trace_probes=probes, max_steps=10,
                         tol=1e-2, seed=seed, hessian_method=problem.hessian_method)
    costs = sens.costs()

    def measured(bits: list[int]) -> tuple[float, float, float]:
        result = evaluate_bits(evaluation, sens.layers, bits)
        return float(sum(q.numel * b for q, b in zip(sens.layers, bits)) / 8 / 2 ** 20), result.loss, result.accuracy

    out = {}
    for fraction in FRACTIONS:
        limits = {"size": fraction_limit(costs["size"], fraction)}
        hessian = allocate_bits(sens.omega(), costs, limits, BITS)
        out[fraction] = {"hessian": measured(hessian.bits), "bits": hessian.bits,
                         "reversed": measured(reversed_allocation(sens, costs, limits).bits),
                         "random": [measured(random_allocation(sens, costs, limits, 1000 * seed + r).bits)
                                    for r in range(randoms)]}
    print(f"seed {seed}: float loss {evaluation.loss():.4f}; {sens.result.matvecs} products\n{sens.result.table()}")
    return out


def summary(runs: list[dict[float, dict]]) -> None:
    """Markdown: per budget, mean ± std over seeds of the loss (lower is better) and accuracy."""
    print("| size budget | Hessian MiB | Hessian loss / acc | median random loss / acc (size ≥) | reversed loss / acc "
          "| Hessian loss ≤ median random | Hessian loss < reversed |\n|---|---|---|---|---|---|---|")
    for fraction in FRACTIONS:
        rows = [run[fraction] for run in runs]
        hess = [r["hessian"] for r in rows]
        rand = [_median([x for x in r["random"] if x[0] >= r["hessian"][0] - 1e-9]) for r in rows]
        rev = [r["reversed"] for r in rows]
        print(f"| {fraction:.0%} | {np.mean([h[0] for h in hess]):.3f} | {_ms(hess)} | {_ms(rand)} | {_ms(rev)} | "
              f"{sum(h[1] <= m[1] for h, m in zip(hess, rand))}/{len(rows)} | "
              f"{sum(h[1] < v[1] for h, v in zip(hess, rev))}/{len(rows)} |")


def _median(rows: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    if not rows:
        return (float("nan"),) * 3
    return (0.0, statistics.median(r[1] for r in rows), statistics.median(r[2] for r in rows))


def _ms(rows: list[tuple[float, float, float]]) -> str:
    loss, acc = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    return f"{loss.mean():.4f} ± {loss.std():.4f} / {acc.mean():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--randoms", type=int, default=5)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary([one_seed(seed, args.randoms, args.probes) for seed in args.seeds])


if __name__ == "__main__":
    main()
