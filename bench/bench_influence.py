"""Influence scores per method: seconds and agreement with the exact damped inverse.

A 64-32-10 tanh MLP (float64, P = 2,410) trained on 1,000 digits; 20 held-out digits as
queries; ``pairwise`` scores ``[20, 1000]`` with the GGN, damping ``0.01`` and ``1.0`` x the
mean eigenvalue. Prints a markdown table per method: wall and CPU seconds (curvature setup +
solves + streaming), products of the GGN, the largest relative residual
``||g - (C + λI) x|| / ||g||`` of the iterative solvers (cg is capped at ``--cg-maxiter``
steps, lissa runs ``--lissa-depth``), and the Pearson and Spearman correlation of the scores
with ``exact``. ``--hidden 16`` gives a smaller problem (P = 1,210).
Kronfluence is compared in ``bench_influence_kronfluence.py``.

    python bench/bench_influence.py [--threads 1] [--dampings 0.01 1.0] [--cg-maxiter 200]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from hesse.apply.influence import pairwise, preconditioner
from hesse.examples import load_dataset
from hesse.operators import Objective

METHODS = ("exact", "identity", "cg", "lissa", "arnoldi", "kfac", "ekfac")


def problem(hidden: int = 32) -> tuple[nn.Module, tuple, tuple]:
    """The trained 64-hidden-10 MLP, the training set (1,000 digits) and the 20 queries."""
    digits = load_dataset("digits")
    X, y = digits.inputs.reshape(len(digits.targets), -1).double(), digits.targets
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[:1000]), y[:1000]).backward()
        optimizer.step()
    return model.eval(), (X[:1000], y[:1000]), (X[1500:1520], y[1500:1520])


def _ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a)).astype(float)


def run(objective: Objective, queries: tuple, method: str, damping: float, options: dict) -> tuple:
    """``(scores [n_query, n_train], wall s, CPU s, info)`` of one method, curvature included."""
    wall, cpu = time.perf_counter(), time.process_time()
    inverse = preconditioner(objective, method, damping, **options)
    scores = pairwise(objective, query_data=queries, inverse=inverse)
    return scores, time.perf_counter() - wall, time.process_time() - cpu, inverse.info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 1.0])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cg-maxiter", type=int, default=200)
    parser.add_argument("--lissa-depth", type=int, default=500)
    parser.add_argument("--rank", type=int, default=50, help="arnoldi rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"cg": {"maxiter": args.cg_maxiter}, "lissa": {"depth": args.lissa_depth}, "arnoldi": {"rank": args.rank}}
    model, train, queries = problem(args.hidden)
    data = [(train[0][i:i + 250], train[1][i:i + 250]) for i in range(0, 1000, 250)]
    objective = Objective(model, nn.CrossEntropyLoss(), data)
    print(f"P = {objective.size}, load average {os.getloadavg()[0]:.2f}")
    print("| damping | method | wall s | CPU s | GGN products | max residual | Pearson vs exact | Spearman vs exact |\n"
          "|---|---|---|---|---|---|---|---|")
    for damping in args.dampings:
        exact = None
        for method in args.methods:  # exact first: every row is printed as soon as it is done
            scores, wall, cpu, info = run(objective, queries, method, damping, options.get(method, {}))
            scores = scores.reshape(-1).numpy()
            exact = scores if exact is None else exact
            pearson = np.corrcoef(scores, exact)[0, 1]
            spearman = np.corrcoef(_ranks(scores), _ranks(exact))[0, 1]
            residual = f"{info['max_residual']:.2g}" if "max_residual" in info else "-"
            print(f"| {damping:g} | {method} | {wall:.1f} | {cpu:.1f} | {info.get('matvecs', '-')} | {residual} | "
                  f"{pearson:.4f} | {spearman:.4f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
