"""hesse's default trace call (adaptive Hutch++ to rtol=0.01) on a bench task, against the exact trace.

    PYTHONPATH=$PWD bench/.venv/bin/python bench/bench_trace_default.py --task cnn --seeds 0 1 2 --threads 2

compare.py runs every tool at the same fixed budget (99 products); this shows what hesse's own
default costs for the accuracy it states.
"""

import argparse
import json
import os
import time

import torch

import hesse
from tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cnn", choices=["mlp", "cnn", "transformer"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task(args.task)
    with open(os.path.join(os.path.dirname(__file__), f"reference_{args.task}.json")) as f:
        exact = float(json.load(f)["trace"])
    H = hesse.Hessian(task.model, task.criterion, task.loader)
    print(f"{args.task}: exact trace {exact:.6g}")
    for seed in args.seeds:
        start = time.perf_counter()
        r = hesse.trace(H, seed=seed, progress=False)
        seconds = time.perf_counter() - start
        print(f"seed {seed}: {seconds:.1f} s, {r.matvecs} products, {r.passes} passes, {r.estimate:.2f} +- {r.stderr:.2f}, "
              f"true error {abs(r.estimate - exact) / abs(exact):.4f}, converged={r.converged}", flush=True)


if __name__ == "__main__":
    main()
