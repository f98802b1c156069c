"""Time of layer-wise OBS (SparseGPT) on all 36 linear layers of all-MiniLM-L6-v2, on the CPU.

Calibration: the 32 bundled paraphrase pairs (4 batches of 8 pairs, both sentences, up to
32 tokens). Layers are pruned sequentially (each layer's inputs collected with the earlier
layers already pruned): one calibration pass per group of layers reading the same input
(query, key and value together: 24 passes for 36 layers), each forward stopped once the
group has run. Goal: under 5 minutes on 2 cores. Prints wall and process CPU time and the
load average (on a shared machine the wall time depends on the load).

    python bench/bench_prune.py [--threads 2] [--targets 0.5,2:4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from hesse.apply import prune_layerwise_obs
from hesse.examples import minilm_example
from hesse.operators import Objective

GOAL_SECONDS = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", default="0.5,2:4", help="comma list of sparsities and N:M patterns")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = minilm_example()
    objective = Objective(problem.model, problem.criterion, problem.data, forward=problem.forward,
                          params=problem.params)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(problem.data)} calibration batches")
    for target in args.targets.split(","):
        spec = {"nm": target} if ":" in target else {"sparsity": float(target)}
        times, cpu = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            result = prune_layerwise_obs(objective, **spec)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        best = min(times)
        print(f"| {target} | {len(result.masks)} layers | sparsity {result.sparsity:.3f} | "
              f"wall {best:.1f} s (best of {len(times)}), CPU {min(cpu):.1f} s | goal {GOAL_SECONDS:.0f} s wall: "
              f"{'met' if best < GOAL_SECONDS else 'missed'} | load average {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
