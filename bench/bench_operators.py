"""Cost of curvature products in units of one full-data gradient.

Task: the ~151k-parameter CNN on scikit-learn's digits from ``bench/tasks.py`` (1797
samples, batches of 256 with a last batch of 5). For each operator and product method,
times ``op @ V`` for K = 1, 4, 16 vectors (one data pass each) and reports the cost of
the pass and the cost per vector, both divided by the median time of one full-data
gradient measured in the same process.

    .venv/bin/python bench/bench_operators.py [--repeats 5] [--ks 1,4,16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hesse  # noqa: E402
from tasks import make_task  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ks", default="1,4,16")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    task = make_task("cnn")
    gradient_time = median_time(task.full_gradient, args.repeats)
    task.model.zero_grad(set_to_none=True)
    print(f"CNN: P={task.num_params:,}, N={task.n}, batches={[len(b[1]) for b in task.batches]}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"one full-data gradient: {gradient_time * 1e3:.1f} ms\n")
    operators = {
        "Hessian forward-over-reverse": hesse.Hessian(task.model, task.criterion, task.loader, method="forward-over-reverse"),
        "Hessian double-backward": hesse.Hessian(task.model, task.criterion, task.loader, method="double-backward"),
        "GGN": hesse.GGN(task.model, task.criterion, task.loader),
        "Fisher (mc)": hesse.Fisher(task.model, task.criterion, task.loader, kind="mc"),
    }
    print("| operator | K | pass (ms) | pass / gradient | per vector / gradient |")
    print("|---|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for name, op in operators.items():
        for k in ks:
            V = torch.randn(op.shape[0], k, generator=generator)
            seconds = median_time(lambda: op @ V, args.repeats)
            ratio = seconds / gradient_time
            print(f"| {name} | {k} | {seconds * 1e3:.1f} | {ratio:.2f} | {ratio / k:.2f} |", flush=True)


if __name__ == "__main__":
    main()
