"""Per-layer GGN traces: per-block Hutch++ against sampled square roots, on the bench tasks.

For each task (the trained digits MLP, CNN and transformer of ``bench/tasks.py``, all 1,797
samples) both estimators run to ``rtol`` (95% confidence) on the module blocks of the GGN:

* ``hutch++``: :class:`hesse.linalg.block_estimators.BlockTraces`, one GGN product per block
  column, all blocks sharing each data pass;
* ``sampled``: :class:`hesse.linalg.block_estimators.SampledBlockTraces`, columns
  ``w = Jᵀ z`` with ``E[w wᵀ] = G``, one backward per column for every block at once;
* ``auto`` (the default): one sampled pass, then whichever is predicted cheaper
  (:class:`hesse.linalg.block_estimators.AutoBlockTraces`).

Reported: wall seconds, data passes, columns (GGN products, or square-root columns), cost in
full-data gradients, and the worst relative error against the exact block traces (float64,
from per-sample gradients: :func:`exact_block_traces`) over ``--seeds`` seeds. Command (recorded in bench/RESULTS.md):

    PYTHONPATH=$PWD .venv/bin/python bench/bench_per_layer_ggn.py --threads 1 --seeds 1
"""

from __future__ import annotations

import argparse
import time

import torch

import hesse
from bench.tasks import make_task
from hesse.apply.quantize import layer_traces


def exact_block_traces(task) -> dict[str, float]:
    """``tr(G_bb)`` exactly, in float64: ``G = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` and
    ``diag p − p pᵀ = Σ_c r_c r_cᵀ`` with ``r_c = √p_c (e_c − p)``, so ``tr(G_bb)`` is the mean
    over samples of ``Σ_c ‖∂(r_cᵀ f_n)/∂θ_b‖²``: 10 per-sample-gradient passes (``vmap`` of ``grad``)."""
    model = task.model.to(torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def score(values, x, r):
        return (torch.func.functional_call(model, values, (x.unsqueeze(0),)).squeeze(0) * r).sum()

    per_sample = torch.func.vmap(torch.func.grad(score), in_dims=(None, 0, 0))
    squares = dict.fromkeys(params, 0.0)
    for xb, _ in task.batches:
        xb = xb.to(torch.float64)
        with torch.no_grad():
            p = torch.softmax(model(xb), dim=1)
        for c in range(p.shape[1]):
            r = p[:, c:c + 1].sqrt() * (torch.nn.functional.one_hot(torch.tensor(c), p.shape[1]) - p)
            for name, g in per_sample(params, xb, r).items():
                squares[name] += float((g**2).sum()) / task.n
    task.model.to(torch.float32)
    G = hesse.GGN(task.model, task.criterion, task.batches, progress=False)
    layout = G.blocks  # parameter name -> slice; module blocks are unions of them
    return {block: sum(v for n, v in squares.items() if layout[n].start >= s.start and layout[n].stop <= s.stop)
            for block, s in G.module_blocks().items()}


def run(task, method: str, rtol: float, seed: int, budget: int) -> dict:
    G = hesse.GGN(task.model, task.criterion, task.batches, progress=False)
    D = G.block_diagonal()
    start, passes = time.perf_counter(), G.passes
    res = layer_traces(D, rtol=rtol, trace_probes=budget, seed=seed, progress=False, trace_method=method)
    return {"seconds": time.perf_counter() - start, "passes": G.passes - passes, "columns": res.trace_matvecs,
            "trace": res.trace, "met": all(res.rtol_met.values()), "methods": set(res.trace_method.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--rtol", type=float, default=0.02)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["hutch++", "sampled", "auto"])
    parser.add_argument("--budget", type=int, default=250, help="trace_probes: columns per block (sampled: times the blocks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| task | P | blocks | method | wall s | passes | columns | gradients | worst error (max over {args.seeds} seeds) | rtol met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.tasks:
        task = make_task(name)
        started = time.perf_counter()
        exact = exact_block_traces(task)
        print(f"<!-- {name}: exact block traces in {time.perf_counter() - started:.1f} s -->", flush=True)
        gradient = task.gradient_time()
        for method in args.methods:
            runs = [run(task, method, args.rtol, seed, args.budget) for seed in range(args.seeds)]
            worst = max(abs(r["trace"][b] - exact[b]) / abs(exact[b]) for r in runs for b in exact)
            mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
            chosen = sorted({m.split(" (")[0] for r in runs for m in r["methods"]})
            print(f"| {name} | {task.num_params} | {len(exact)} | {method} ({', '.join(chosen)}) | {mean('seconds'):.2f} | {mean('passes'):.0f} "
                  f"| {mean('columns'):.0f} | {mean('seconds') / gradient:.0f} | {100 * worst:.2f}% "
                  f"| {sum(r['met'] for r in runs)}/{len(runs)} |", flush=True)


if __name__ == "__main__":
    main()
