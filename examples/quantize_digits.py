"""Hessian-aware mixed precision (HAWQ-V2 Ω, ILP allocation) against random and reversed
allocations on two digits models, at three size budgets, over several seeds.

``--model cnn``: the built-in digits CNN (``hesse.examples.classifier_example``, seed =
training seed); traces on a random subset of 512 digits drawn with the seed; accuracy on all
1,797 digits (its training set: the example has no held-out split). ``fc1`` holds 84% of its
quantized weights, so the size budget all but fixes ``fc1``'s bits.

``--model mlp``: :class:`BottleneckMLP`, five Linear layers of comparable size (1,280 weights
each, the 640-weight head 11% of 5,760), trained here on 1,297 digits (SGD, lr 0.1, batch 32,
80 epochs; the 500 held-out digits drawn with the seed); traces on all 1,297 training
digits; accuracy and loss on the 500 held-out ones.

Weights are quantized symmetric per output channel to 2, 4 or 8 bits, and in a second table
to 2, 3, 4, 5, 6 or 8 bits; activations stay float. Budgets: 25%, 50%, 75% of the way from
all-2-bit to all-8-bit size. Random allocations: ``--randoms`` per budget and seed (random
layer sensitivities, same budget); the claim compares with the median of those at least as
large as the Hessian-aware one.

    python examples/quantize_digits.py [--model cnn mlp] [--seeds 0 1 2] [--randoms 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hesse.apply.quantize import (
    Sensitivity, allocate_bits, evaluate_bits, fraction_limit, random_allocation, reversed_allocation, sensitivities,
)
from hesse.examples import classifier_example, load_dataset, train_classifier
from hesse.operators import Objective

BIT_SETS = ((2, 4, 8), (2, 3, 4, 5, 6, 8))
FRACTIONS = (0.25, 0.5, 0.75)
HELD_OUT = 500


class BottleneckMLP(nn.Sequential):
    """``64 → w → 64 → w → 64 → 10`` with ReLU (``w = 20``): every Linear holds ``64 w`` weights
    but the ``640``-weight head, so no layer decides the size budget alone."""

    def __init__(self, width: int = 20, num_classes: int = 10):
        widths = [64, width, 64, width, 64]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers, nn.Linear(64, num_classes))


def objectives(model_name: str, seed: int) -> tuple[Objective, Objective]:
    """``(curvature, evaluation)`` objectives of the trained model for ``seed`` (see the module docstring)."""
    if model_name == "cnn":
        problem = classifier_example("digits", seed=seed)
        inputs, targets = problem.data.inputs, problem.data.targets
        subset = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:512]
        return (Objective(problem.model, nn.CrossEntropyLoss(), _loader(inputs[subset], targets[subset])),
                Objective(problem.model, nn.CrossEntropyLoss(), problem.data.loader(512)))
    data = load_dataset("digits")
    order = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(seed))
    train, test = order[HELD_OUT:], order[:HELD_OUT]
    torch.manual_seed(seed)
    model = BottleneckMLP()
    summary = train_classifier(model, dataclasses.replace(data, inputs=data.inputs[train], targets=data.targets[train]),
                               epochs=80, lr=0.1, batch_size=32, seed=seed)
    print(f"seed {seed}: MLP train accuracy {summary.train_accuracy:.4f} ({summary.seconds:.1f} s)")
    return (Objective(model, nn.CrossEntropyLoss(), _loader(data.inputs[train], data.targets[train])),
            Objective(model, nn.CrossEntropyLoss(), _loader(data.inputs[test], data.targets[test])))


def _loader(inputs: torch.Tensor, targets: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(inputs, targets), batch_size=512)


def one_seed(model_name: str, seed: int, randoms: int) -> dict[tuple[int, ...], dict[float, dict]]:
    """``{bits: {fraction: {"hessian": (KiB, loss, acc), "reversed": ..., "random": [...], "bits": [...]}}}``
    for both candidate bit sets (one trace estimate: the sets differ only in ``‖ΔW‖²``)."""
    curvature, evaluation = objectives(model_name, seed)
    fine = sensitivities(curvature, bits=BIT_SETS[-1], rtol=0.05, seed=seed)
    base = evaluation.evaluate()
    print(f"seed {seed}: float loss {base.loss:.4f}, accuracy {base.accuracy:.4f}\n{fine.result.table()}")
    out = {}
    for bits in BIT_SETS:
        columns = [fine.bits.index(b) for b in bits]
        sens = dataclasses.replace(fine, bits=bits, perturbation=fine.perturbation[:, columns])
        out[bits] = budgets(sens, evaluation, randoms, seed)
    return out


def budgets(sens: Sensitivity, evaluation: Objective, randoms: int, seed: int) -> dict[float, dict]:
    """Hessian-aware, reversed and random allocations at every size fraction, evaluated."""
    costs = sens.costs()

    def measured(bits: list[int]) -> tuple[float, float, float]:
        size = float(sum(q.numel * b for q, b in zip(sens.layers, bits)) / 8 / 1024)
        result = evaluate_bits(evaluation, sens.layers, bits)
        return size, float(result.loss), float(result.accuracy)

    out = {}
    for fraction in FRACTIONS:
        limits = {"size": fraction_limit(costs["size"], fraction)}
        hessian = allocate_bits(sens.omega(), costs, limits, sens.bits, tie_break=sens.tie_break()).bits
        randomized = [random_allocation(sens, costs, limits, 1000 * seed + r).bits for r in range(randoms)]
        out[fraction] = {"hessian": measured(hessian), "bits": hessian,
                         "reversed": measured(reversed_allocation(sens, costs, limits).bits),
                         "random": [measured(b) for b in randomized],
                         "distinct_random": len({tuple(b) for b in randomized} - {tuple(hessian)})}
    return out


def summary(runs: list[dict[float, dict]], bits: tuple[int, ...]) -> None:
    """Markdown: per budget, mean ± std over seeds of accuracy (and loss), and whether the claim held per seed."""
    print(f"\nbits {bits}\n\n| size budget | Hessian bits (seed 0) | Hessian KiB | Hessian acc / loss | "
          "median random acc / loss (size ≥) | reversed acc / loss | Hessian acc ≥ median random | "
          "Hessian acc > reversed | Hessian loss ≤ median random | Hessian loss < reversed | random ≠ Hessian |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for fraction in FRACTIONS:
        rows = [run[fraction] for run in runs]
        hess = [r["hessian"] for r in rows]
        rand = [_median([x for x in r["random"] if x[0] >= r["hessian"][0] - 1e-9]) for r in rows]
        rev = [r["reversed"] for r in rows]
        wins = [_wins(hess, rand, 2, 1), _wins(hess, rev, 2, 0), _wins(hess, rand, 1, -1), _wins(hess, rev, 1, -2)]
        print(f"| {fraction:.0%} | {rows[0]['bits']} | {np.mean([h[0] for h in hess]):.2f} | {_ms(hess)} | "
              f"{_ms(rand)} | {_ms(rev)} | {' | '.join(wins)} | "
              f"{sum(r['distinct_random'] for r in rows)}/{sum(len(r['random']) for r in rows)} |")


def _wins(hess: list[tuple], other: list[tuple], column: int, rule: int) -> str:
    """Seeds where the Hessian-aware value beats ``other`` in ``column``: ``rule`` 1 ``≥``, 0 ``>``,
    -1 ``≤``, -2 ``<``."""
    tests = {1: np.greater_equal, 0: np.greater, -1: np.less_equal, -2: np.less}
    return f"{sum(bool(tests[rule](h[column], o[column])) for h, o in zip(hess, other))}/{len(hess)}"


def _median(rows: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    if not rows:
        return (float("nan"),) * 3
    return (0.0, statistics.median(r[1] for r in rows), statistics.median(r[2] for r in rows))


def _ms(rows: list[tuple[float, float, float]]) -> str:
    loss, acc = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    return f"{acc.mean():.4f} ± {acc.std():.4f} / {loss.mean():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=("cnn", "mlp"), default=["cnn", "mlp"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--randoms", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for model_name in args.model:
        start, cpu = time.perf_counter(), time.process_time()
        runs = [one_seed(model_name, seed, args.randoms) for seed in args.seeds]
        print(f"\n## {model_name}: {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
        for bits in BIT_SETS:
            summary([run[bits] for run in runs], bits)


if __name__ == "__main__":
    main()
