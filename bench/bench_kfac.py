"""K-FAC and EK-FAC factors of all 36 linear layers of all-MiniLM-L6-v2 on 2 CPU cores.

The objective is ``hesse.examples.minilm_example()`` (contrastive loss on the 32 bundled
paraphrase pairs, 4 batches of 8 pairs); the parameters are the weights and biases of
every ``nn.Linear`` in the six encoder layers: query, key, value, attention output,
intermediate and output dense (6 x 6 = 36 layers, 10.6M parameters). Reports the time of
each factor computation and the process's peak resident memory.

    PYTHONPATH=. .venv/bin/python bench/bench_kfac.py [--threads 2] [--kind mc]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import hesse
from hesse.examples.minilm import minilm_example

LINEAR = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "intermediate.dense", "output.dense"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kind", default="mc", choices=["true", "mc", "empirical"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = minilm_example()
    params = [f"encoder.layer.{i}.{name}.{p}" for i in range(6) for name in LINEAR for p in ("weight", "bias")]
    print(f"model loaded, peak RSS {peak_rss_mb():.0f} MB; threads = {args.threads}, kind = {args.kind}\n")
    print("| operator | layers | parameters | factor time (s) | peak RSS (MB) | trace |")
    print("|---|---|---|---|---|---|")
    for cls in (hesse.KFAC, hesse.EKFAC):
        op = cls(problem.model, problem.criterion, problem.data, forward=problem.forward, params=params,
                 kind=args.kind)
        start = time.perf_counter()
        factors = op.factors
        seconds = time.perf_counter() - start
        assert len(factors) == 36 and all(isinstance(b, hesse.operators.KroneckerBlock) for b in factors.values())
        print(f"| {cls.__name__} | {len(factors)} | {op.shape[0]:,} | {seconds:.1f} | {peak_rss_mb():.0f} | "
              f"{op.trace():.4g} |")


if __name__ == "__main__":
    main()
