"""The GGN diagonal of the trained digits MLP: sampled square roots against XDiag and Hutchinson.

Each estimator gets the same budget (columns or products); reported: cost in full-data
gradients, relative error against the exact diagonal (``P`` products) and the number of
negative entries (the GGN's diagonal is non-negative). Command (recorded in bench/RESULTS.md):

    PYTHONPATH=$PWD .venv/bin/python bench/bench_diagonal_ggn.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

import hesse
from bench.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task("mlp")
    G = hesse.GGN(task.model, task.criterion, task.batches, progress=False)
    gradient = task.gradient_time(3)
    exact = hesse.diagonal(G, "exact", progress=False).estimate
    print("| method | budget | gradients | relative error | negative entries |\n|---|---|---|---|---|")
    for method, budget in (("xdiag", 100), ("hutchinson", 100), ("sampled", 100), ("sampled", 1000)):
        start = time.perf_counter()
        res = hesse.diagonal(G, method, budget=budget, progress=False, seed=args.seed)
        seconds = time.perf_counter() - start
        error = float((res.estimate - exact).norm() / exact.norm())
        print(f"| {method} | {budget} | {seconds / gradient:.0f} | {error:.3f} | {int((res.estimate < 0).sum())} |")


if __name__ == "__main__":
    main()
