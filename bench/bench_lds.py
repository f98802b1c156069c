"""Linear datamodeling score (LDS) of hesse's influence methods on a digits MLP.

LDS (Park et al. 2023, TRAK, Sec. 2; Grosse et al. 2023, Sec. 5.1, as Kronfluence runs it):
draw ``M`` random subsets ``S_j`` of the ``n`` training examples, each of size ``α n``;
retrain on each with ``K`` seeds and measure every query's output ``f(q; θ_{S_j})``, averaged
over the seeds; the attribution's prediction is the sum of its scores over the subset,
``g(q, S_j) = Σ_{z ∈ S_j} score(q, z)``, and

    LDS = mean over queries q of  Spearman_j( g(q, S_j), f(q; θ_{S_j}) ).

Here ``f = -m(q)`` for a loss-like measurement ``m``: the query cross-entropy
(``--measurement loss``, default) or minus TRAK's margin ``o_y - log Σ_{k≠y} exp o_k``
(``--measurement margin``), whose gradients the scores use (``pairwise(measurement=...)``;
a positive score means ``z`` lowers ``m(q)``, see ``hesse.apply.influence``). The scores come from ONE model trained on all
``n`` examples (seed 0). The "noise ceiling" row is the LDS of one retraining seed's outputs
against the mean of the others: the best a predictor can score against ``K``-seed averages
is about this (higher with more seeds). Prints markdown tables: LDS ± std over queries,
wall and CPU seconds per method, and the Pearson correlation of each method's scores with
``exact``.

    python bench/bench_lds.py [--subsets 50] [--seeds 3] [--dampings 0.01 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from hesse.apply.influence import negative_margin, pairwise
from hesse.examples import load_dataset

METHODS = {"exact": {}, "cg": {"maxiter": 100}, "lissa": {"depth": 300}, "arnoldi": {"rank": 50},
           "kfac": {}, "ekfac": {}, "identity": {}}
MEASUREMENTS = {"loss": nn.CrossEntropyLoss(), "margin": negative_margin}


def digits(n_train: int, n_query: int, seed: int = 0) -> tuple[tuple, tuple]:
    """``(train (X [n, 64], y), queries (X, y))``: disjoint random digits, float64."""
    data = load_dataset("digits")
    order = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(seed))
    X, y = data.inputs.reshape(len(data.targets), -1).double()[order], data.targets[order]
    return (X[:n_train], y[:n_train]), (X[n_train:n_train + n_query], y[n_train:n_train + n_query])


def train(X: torch.Tensor, y: torch.Tensor, seed: int, hidden: int, l2: float, steps: int) -> nn.Module:
    """A 64-hidden-10 tanh MLP: full-batch Adam (lr 1e-2) on mean cross-entropy + (l2/2)||θ||²."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        penalty = sum((p ** 2).sum() for p in model.parameters())
        (nn.functional.cross_entropy(model(X), y) + 0.5 * l2 * penalty).backward()
        optimizer.step()
    return model.eval()


def retrained_outputs(train_set: tuple, queries: tuple, masks: torch.Tensor, seeds: int,
                      settings: dict, measurement: str) -> np.ndarray:
    """``[seeds, M, n_query]``: ``f = -m(q)`` of the model retrained on each subset, per seed."""
    X, y = train_set
    measure = MEASUREMENTS[measurement]
    out = np.empty((seeds, len(masks), len(queries[1])))
    for j, mask in enumerate(masks):
        for s in range(seeds):
            model = train(X[mask], y[mask], 1000 * j + s + 1, **settings)
            with torch.no_grad():
                logits = model(queries[0])
                out[s, j] = [-float(measure(logits[i:i + 1], queries[1][i:i + 1])) for i in range(len(logits))]
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of ``a[:, q]`` with ``b[:, q]`` for every column ``q`` (no ties assumed)."""
    ra, rb = (np.argsort(np.argsort(m, axis=0), axis=0).astype(float) for m in (a, b))
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    return (ra * rb).sum(0) / np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))


def lds(scores: torch.Tensor, masks: torch.Tensor, actual: np.ndarray) -> np.ndarray:
    """Per-query LDS: Spearman over subsets of ``Σ_{z∈S_j} score(q, z)`` against ``actual [M, n_query]``."""
    predicted = masks.double().numpy() @ scores.T.numpy()          # [M, n_query]
    return spearman_rows(predicted, actual)


def timed(fn, *args, **kwargs):
    """``(result, wall seconds, CPU seconds of this process)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def score_methods(model: nn.Module, train_set: tuple, queries: tuple, masks: torch.Tensor,
                  actual: np.ndarray, damping: float, methods: list[str], measurement: str) -> list[str]:
    """One markdown row per method: LDS, seconds, agreement with ``exact``."""
    data = [(train_set[0][i:i + 250], train_set[1][i:i + 250]) for i in range(0, len(train_set[1]), 250)]
    rows, exact = [], None
    for method in methods:
        scores, wall, cpu = timed(pairwise, model, nn.CrossEntropyLoss(), data, queries, method=method,
                                  damping=damping, measurement=MEASUREMENTS[measurement], **METHODS[method])
        exact = scores if method == "exact" else exact
        agree = f"{np.corrcoef(scores.reshape(-1), exact.reshape(-1))[0, 1]:.3f}" if exact is not None else "-"
        per_query = lds(scores, masks, actual)
        row = (f"| {damping:g} | {method} | {per_query.mean():.3f} ± {per_query.std():.3f} | {wall:.1f} | "
               f"{cpu:.1f} | {agree} |")
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=50, help="M random subsets")
    parser.add_argument("--fraction", type=float, default=0.5, help="α: subset size / n")
    parser.add_argument("--seeds", type=int, default=3, help="K retraining seeds per subset")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=500, help="Adam steps per training run")
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--measurement", choices=list(MEASUREMENTS), default="loss")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--outputs", default=None, help=".npy file: reuse the retrained outputs saved there "
                        "by an earlier run with the same settings and measurement, or save them to it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(hidden=args.hidden, l2=args.l2, steps=args.steps)
    train_set, queries = digits(args.n_train, args.n_query)
    gen = torch.Generator().manual_seed(1)
    size = int(args.fraction * args.n_train)
    masks = torch.zeros(args.subsets, args.n_train, dtype=torch.bool)
    for j in range(args.subsets):
        masks[j, torch.randperm(args.n_train, generator=gen)[:size]] = True
    model, wall, cpu = timed(train, *train_set, 0, **settings)
    if args.outputs and os.path.exists(args.outputs):
        outputs, rwall, rcpu = np.load(args.outputs), 0.0, 0.0
        if outputs.shape != (args.seeds, args.subsets, args.n_query):
            parser.error(f"{args.outputs} holds outputs of shape {outputs.shape}, not (seeds, subsets, n_query)")
    else:
        outputs, rwall, rcpu = timed(retrained_outputs, train_set, queries, masks, args.seeds, settings,
                                     args.measurement)
        if args.outputs:
            np.save(args.outputs, outputs)
    print(f"full model: train accuracy {float((model(train_set[0]).argmax(1) == train_set[1]).double().mean()):.3f}, "
          f"query accuracy {float((model(queries[0]).argmax(1) == queries[1]).double().mean()):.3f}; "
          f"{args.subsets} x {args.seeds} retrainings: {rwall:.0f} s wall, {rcpu:.0f} s CPU; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    actual = outputs.mean(0)
    if args.seeds > 1:
        ceiling = spearman_rows(outputs[0], outputs[1:].mean(0))
        print(f"noise ceiling (seed 0 vs mean of the other {args.seeds - 1}): {ceiling.mean():.3f} ± {ceiling.std():.3f}")
    print("\n| damping | method | LDS ± std over queries | wall s | CPU s | Pearson vs exact |\n|---|---|---|---|---|---|")
    for damping in args.dampings:
        score_methods(model, train_set, queries, masks, actual, damping, args.methods, args.measurement)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
