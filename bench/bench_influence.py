"""Influence scores per method: seconds and agreement with the exact damped inverse.

A 64-32-10 tanh MLP (float64, P = 2,410) trained on 1,000 digits; 20 held-out digits as
queries; ``pairwise`` scores ``[20, 1000]`` with the GGN, damping ``0.01`` and ``1.0`` x the
mean eigenvalue. Prints a markdown table: seconds (curvature setup + solves + streaming)
and the Pearson and Spearman correlation of each method's scores with ``exact``.
Kronfluence is not compared here.

    python bench/bench_influence.py [--threads 2] [--dampings 0.01 1.0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from hesse.apply.influence import pairwise
from hesse.examples import load_dataset

METHODS = {"exact": {}, "identity": {}, "cg": {}, "lissa": {"depth": 500}, "arnoldi": {"rank": 50},
           "kfac": {}, "ekfac": {}}


def problem() -> tuple[nn.Module, tuple, tuple]:
    """The trained MLP, the training set and the queries."""
    digits = load_dataset("digits")
    X, y = digits.inputs.reshape(len(digits.targets), -1).double(), digits.targets
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[:1000]), y[:1000]).backward()
        optimizer.step()
    return model.eval(), (X[:1000], y[:1000]), (X[1500:1520], y[1500:1520])


def _ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a)).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, train, queries = problem()
    data = [(train[0][i:i + 250], train[1][i:i + 250]) for i in range(0, 1000, 250)]
    print("| damping | method | seconds | Pearson vs exact | Spearman vs exact |\n|---|---|---|---|---|")
    for damping in args.dampings:
        exact = None
        for method, options in METHODS.items():  # exact first: every row is printed as soon as it is done
            started = time.perf_counter()
            scores = pairwise(model, nn.CrossEntropyLoss(), data, queries, method=method, damping=damping, **options)
            seconds, scores = time.perf_counter() - started, scores.reshape(-1).numpy()
            exact = scores if exact is None else exact
            pearson = np.corrcoef(scores, exact)[0, 1]
            spearman = np.corrcoef(_ranks(scores), _ranks(exact))[0, 1]
            print(f"| {damping:g} | {method} | {seconds:.2f} | {pearson:.4f} | {spearman:.4f} |", flush=True)


if __name__ == "__main__":
    main()
