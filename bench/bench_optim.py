"""Per-step cost of hesse's curvature-aware optimizers, in units of one gradient.

A "gradient" is one forward and backward pass of the mini-batch loss (``loss.backward()``),
the work plain SGD does per step. Each optimizer's full step (its closure calls included)
is timed on the same model and batch; the table gives its time in gradients and its
overhead over Adam, ``(t_step - t_Adam) / t_gradient``. Optimizers are timed in interleaved
rounds (each round times ``--steps`` steps of every optimizer in turn) and the median round
is reported, so load that drifts during the run hits all of them alike. The 1-minute load
average is printed before and after: the numbers are only as steady as the machine.

Expected counts (Hessian-vector product ≈ 2 gradients, Pearlmutter 1994 / double backward):
AdaHessian 1 gradient + 1 HVP every step; Sophia-H 1 HVP every k = 10 steps; Sophia-G one
extra backward every k steps; SAM 2 gradients; K-FAC one forward + one backward for the
factors every ``factor_interval`` = 10 steps, eigendecompositions every 10 steps, and two
small matrix products per layer every step.

Run:  python bench/bench_optim.py [--model mlp cnn] [--batch-size 64] [--rounds 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_compare import LABELS, make_model, make_optimizer, split, train_step  # noqa: E402

NAMES = ("sgd", "adam", "adahessian", "sophia_h", "sophia_g", "sam", "kfac")
LR = {"sgd": 0.01, "adam": 1e-3, "adahessian": 0.05, "sophia_h": 1e-3, "sophia_g": 1e-3, "sam": 0.01,
      "kfac": 3e-3}


def timer(fn: Callable[[], None], steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bench_model(kind: str, batch_size: int, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of every optimizer, and of one gradient (key ``"gradient"``)."""
    Xtr, ytr, _, _ = split("digits")
    X, y = Xtr[:batch_size], ytr[:batch_size]
    criterion = nn.CrossEntropyLoss()
    runs: dict[str, Callable[[], None]] = {}
    grad_model = make_model("digits", kind, Xtr.shape[1:], 0)

    def gradient() -> None:
        grad_model.zero_grad(set_to_none=True)
        criterion(grad_model(X), y).backward()
    runs["gradient"] = gradient
    for name in NAMES:
        model = make_model("digits", kind, Xtr.shape[1:], 0)
        opt = make_optimizer(name, model, LR[name], criterion)
        runs[name] = (lambda n=name, m=model, o=opt: train_step(n, o, m, criterion, X, y))
        timer(runs[name], 10)  # warm-up (and the first K-FAC factors)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timer(fn, steps))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="per-step overhead of curvature-aware optimizers")
    parser.add_argument("--model", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per round (a multiple of 10 covers K-FAC's cycle)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores, {args.threads} thread)")
    for kind in args.model:
        t = bench_model(kind, args.batch_size, args.rounds, args.steps)
        g = t["gradient"]
        print(f"\ndigits {kind}, batch {args.batch_size}: one gradient = {1e3 * g:.2f} ms")
        print("| optimizer | ms/step | step in gradients | overhead over Adam (gradients) |")
        print("|---|---|---|---|")
        for name in NAMES:
            print(f"| {LABELS[name]} | {1e3 * t[name]:.2f} | {t[name] / g:.2f} | {(t[name] - t['adam']) / g:+.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
