"""Hessian-aware mixed precision (HAWQ-V2 Ω, ILP allocation) against random and reversed
allocations on the built-in digits CNN, at three size budgets, over several seeds.

Per seed: the CNN is trained as ``hesse.examples.classifier_example`` does (seed = training
seed); per-layer Hessian traces come from a random subset of 512 digits (drawn with the seed);
accuracy is measured on all 1,797 digits (the training set: the example has no held-out
split). Weights are quantized symmetric per output channel to 2, 4 or 8 bits, and in a second
table to 2, 3, 4, 5, 6 or 8 bits (more room for the allocation to differ); activations stay
float. Budgets: 25%, 50%, 75% of the way from all-2-bit to all-8-bit size. Random
allocations: ``--randoms`` per budget and seed (random layer sensitivities, same budget); the
claim compares with the median of those at least as large as the Hessian-aware one.

    python examples/quantize_digits.py [--seeds 0 1 2] [--randoms 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hesse.apply.quantize import (
    Sensitivity, allocate_bits, evaluate_bits, fraction_limit, random_allocation, reversed_allocation, sensitivities,
)
from hesse.examples import classifier_example
from hesse.operators import Objective

BIT_SETS = ((2, 4, 8), (2, 3, 4, 5, 6, 8))
FRACTIONS = (0.25, 0.5, 0.75)


def one_seed(seed: int, randoms: int) -> dict[tuple[int, ...], dict[float, dict]]:
    """``{bits: {fraction: {"hessian": (KiB, acc), "reversed": (KiB, acc), "random": [...], "bits": [...]}}}``
    for both candidate bit sets (one trace estimate: the sets differ only in ``‖ΔW‖²``)."""
    problem = classifier_example("digits", seed=seed)
    inputs, targets = problem.data.inputs, problem.data.targets
    subset = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:512]
    curvature = Objective(problem.model, nn.CrossEntropyLoss(),
                          DataLoader(TensorDataset(inputs[subset], targets[subset]), batch_size=256))
    evaluation = Objective(problem.model, nn.CrossEntropyLoss(), problem.data.loader(512))
    fine = sensitivities(curvature, bits=BIT_SETS[-1], rtol=0.05, seed=seed)
    print(f"seed {seed}:\n{fine.result.table()}")
    out = {}
    for bits in BIT_SETS:
        columns = [fine.bits.index(b) for b in bits]
        sens = dataclasses.replace(fine, bits=bits, perturbation=fine.perturbation[:, columns])
        out[bits] = budgets(sens, evaluation, randoms, seed)
    return out


def budgets(sens: Sensitivity, evaluation: Objective, randoms: int, seed: int) -> dict[float, dict]:
    """Hessian-aware, reversed and random allocations at every size fraction, evaluated."""
    costs = sens.costs()

    def measured(bits: list[int]) -> tuple[float, float]:
        size = float(sum(q.numel * b for q, b in zip(sens.layers, bits)) / 8 / 1024)
        return size, float(evaluate_bits(evaluation, sens.layers, bits).accuracy)

    out = {}
    for fraction in FRACTIONS:
        limits = {"size": fraction_limit(costs["size"], fraction)}
        out[fraction] = {
            "hessian": measured(allocate_bits(sens.omega(), costs, limits, sens.bits).bits),
            "reversed": measured(reversed_allocation(sens, costs, limits).bits),
            "random": [measured(random_allocation(sens, costs, limits, 1000 * seed + r).bits) for r in range(randoms)],
            "bits": allocate_bits(sens.omega(), costs, limits, sens.bits).bits,
        }
    return out


def summary(runs: list[dict[float, dict]], bits: tuple[int, ...]) -> None:
    """Markdown: per budget, mean ± std over seeds, and whether the claim held per seed."""
    print(f"\nbits {bits}\n\n| size budget | Hessian bits (seed 0) | Hessian KiB | Hessian acc | median random acc (size ≥) | "
          "reversed acc | Hessian ≥ median random | Hessian > reversed |\n|---|---|---|---|---|---|---|---|")
    for fraction in FRACTIONS:
        rows = [run[fraction] for run in runs]
        hess = [r["hessian"][1] for r in rows]
        medians = [statistics.median([a for s, a in r["random"] if s >= r["hessian"][0] - 1e-9] or [float("nan")])
                   for r in rows]
        rev = [r["reversed"][1] for r in rows]
        print(f"| {fraction:.0%} | {rows[0]['bits']} | {np.mean([r['hessian'][0] for r in rows]):.2f} | "
              f"{_ms(hess)} | {_ms(medians)} | {_ms(rev)} | "
              f"{sum(h >= m for h, m in zip(hess, medians))}/{len(rows)} | {sum(h > v for h, v in zip(hess, rev))}/{len(rows)} |")


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--randoms", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [one_seed(seed, args.randoms) for seed in args.seeds]
    for bits in BIT_SETS:
        summary([run[bits] for run in runs], bits)


if __name__ == "__main__":
    main()
