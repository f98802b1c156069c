"""One-shot pruning without fine-tuning: magnitude vs OBD vs WoodFisher vs layer-wise OBS.

The built-in digits CNN (trained as ``hesse.examples.classifier_example`` does, seed =
training seed) is pruned at 50%, 70% and 90% unstructured sparsity per layer and 2:4,
with the curvature/calibration from a random subset of 512 samples (drawn with the same
seed); loss and accuracy are measured on all 1,797 digits (the training set: there is no
held-out split in the example). ``--minilm`` adds magnitude vs layer-wise OBS on all 36
linear layers of all-MiniLM-L6-v2 (calibration: 16 of the 32 bundled pairs drawn by the
seed; metric: the contrastive loss and in-batch retrieval accuracy on all 32 pairs).
Prints markdown tables: mean ± std over the seeds.

    python examples/prune_digits.py [--seeds 0 1 2] [--minilm] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hesse.apply import PruneResult, prune_layerwise_obs, prune_magnitude, prune_obd, prune_woodfisher
from hesse.examples import classifier_example, minilm_example
from hesse.operators import Objective

TARGETS = {"50%": dict(sparsity=0.5), "70%": dict(sparsity=0.7), "90%": dict(sparsity=0.9), "2:4": dict(nm=(2, 4))}
DIGITS_METHODS: dict[str, Callable[..., PruneResult]] = {
    "magnitude": lambda obj, **t: prune_magnitude(obj, **t),
    "OBD (GGN diagonal, XDiag 100 products)": lambda obj, **t: prune_obd(obj, method="xdiag", budget=100, **t),
    "WoodFisher (B=128, m=256)": lambda obj, **t: prune_woodfisher(obj, block_size=128, **t),
    "WoodFisher (M-FAC, whole F, m=256)": lambda obj, **t: prune_woodfisher(obj, block_size=None, **t),
    "WoodFisher (M-FAC, 3 gradual rounds)": lambda obj, **t: prune_woodfisher(
        obj, block_size=None, rounds=1 if "nm" in t else 3, **t),
    "layer-wise OBS (SparseGPT)": lambda obj, **t: prune_layerwise_obs(obj, **t),
}
MINILM_METHODS = {k: DIGITS_METHODS[k] for k in ("magnitude", "layer-wise OBS (SparseGPT)")}


def digits_runs(seed: int) -> tuple[dict[tuple[str, str], tuple[float, float]], tuple[float, float]]:
    """``{(method, target): (loss, accuracy)}`` on all digits, and the dense ``(loss, accuracy)``."""
    problem = classifier_example("digits", seed=seed)
    inputs, targets = problem.data.inputs, problem.data.targets
    subset = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:512]
    calibration = Objective(problem.model, nn.CrossEntropyLoss(),
                            DataLoader(TensorDataset(inputs[subset], targets[subset]), batch_size=256))
    evaluation = Objective(problem.model, nn.CrossEntropyLoss(), problem.data.loader(512))
    return _evaluate(DIGITS_METHODS, calibration, evaluation), _pair(evaluation.evaluate())


def minilm_runs(seed: int) -> tuple[dict[tuple[str, str], tuple[float, float]], tuple[float, float]]:
    """Magnitude vs layer-wise OBS on MiniLM's 36 linear layers; calibration on 2 of the 4
    batches of 8 pairs (drawn by the seed), evaluation on all 32 pairs."""
    problem = minilm_example()
    chosen = sorted(torch.randperm(len(problem.data), generator=torch.Generator().manual_seed(seed))[:2].tolist())
    settings = dict(forward=problem.forward, params=problem.params)
    calibration = Objective(problem.model, problem.criterion, [problem.data[i] for i in chosen], **settings)
    evaluation = Objective(problem.model, problem.criterion, problem.data, **settings)
    return _evaluate(MINILM_METHODS, calibration, evaluation), _pair(evaluation.evaluate())


def _evaluate(methods: dict, calibration: Objective, evaluation: Objective) -> dict[tuple[str, str], tuple[float, float]]:
    out = {}
    for method, run in methods.items():
        for target, spec in TARGETS.items():
            started = time.perf_counter()
            result = run(calibration, **spec)
            out[(method, target)] = _pair(evaluation.evaluate(at=result.pruned_values(evaluation)))
            print(f"  {method:<40} {target:>4}: sparsity {result.sparsity:.3f}, loss {out[(method, target)][0]:.3f}, "
                  f"accuracy {out[(method, target)][1]:.3f} ({time.perf_counter() - started:.1f} s)", flush=True)
    return out


def _pair(evaluation) -> tuple[float, float]:
    return evaluation.loss, evaluation.accuracy


def table(title: str, runs: list[dict], dense: list[tuple[float, float]], methods: dict) -> str:
    """Markdown: one row per method, one column per target, ``accuracy (loss)`` mean ± std."""
    def cell(values: list[tuple[float, float]]) -> str:
        acc = [100 * v[1] for v in values]
        loss = [v[0] for v in values]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        return f"{statistics.mean(acc):.1f} ± {sd:.1f} ({statistics.mean(loss):.3f})"

    lines = [f"**{title}**: accuracy % mean ± std over {len(runs)} seeds (mean loss)", "",
             "| method | " + " | ".join(TARGETS) + " |", "|---|" + "---|" * len(TARGETS),
             f"| dense | {cell(dense)} |" + " |" * (len(TARGETS) - 1)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cell([r[(method, t)] for r in runs]) for t in TARGETS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minilm", action="store_true", help="also prune MiniLM's 36 linear layers")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = []
    for name, runner, methods in [("digits CNN", digits_runs, DIGITS_METHODS)] + (
            [("MiniLM-L6 (36 linear layers)", minilm_runs, MINILM_METHODS)] if args.minilm else []):
        runs, dense = [], []
        for seed in args.seeds:
            print(f"{name}, seed {seed}", flush=True)
            result, dense_pair = runner(seed)
            runs.append(result)
            dense.append(dense_pair)
        tables.append(table(name, runs, dense, methods))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
