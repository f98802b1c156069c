"""Cost of curvature products in units of one full-data gradient.

Tasks (``bench/tasks.py``, digits, 1797 samples, batches of 256 with a last batch of 5):
the 3,466-parameter MLP, the 151,306-parameter CNN and the 10,402-parameter transformer
(eval mode). For each operator and product method, times ``op @ V`` for K = 1, 4, 16
vectors (one data pass each) and reports the cost of the pass and the cost per vector,
both divided by the median time of one full-data gradient (forward + backward over all
batches, the model as the task sets it, default attention kernel) measured in the same
process.

Operators: ``Hessian`` with ``method="double-backward"``, ``"forward-over-reverse"`` and
``"auto"`` (after the timing, ``op.calibration[K]`` -- the seconds each method took on one
batch -- and ``op.method_for(K)`` are printed, so the table shows whether "auto" chose the
faster method; K=1, and K whose products have not yet cost forward mode's start-up, are
"not timed" and use double-backward), ``GGN`` and ``Fisher`` (``kind="mc"``).

    bench/.venv/bin/python bench/bench_operators.py [--tasks mlp,cnn,transformer]
        [--repeats 3] [--ks 1,4,16] [--threads 2]
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
    fn()  # warm-up (for method="auto": the calibration pass)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def operators(task):
    m, c, d = task.model, task.criterion, task.loader
    return {
        "Hessian double-backward": hesse.Hessian(m, c, d, method="double-backward"),
        "Hessian forward-over-reverse": hesse.Hessian(m, c, d, method="forward-over-reverse"),
        "Hessian auto": hesse.Hessian(m, c, d, method="auto"),
        "GGN": hesse.GGN(m, c, d),
        "Fisher (mc)": hesse.Fisher(m, c, d, kind="mc"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mlp,cnn,transformer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}, repeats {args.repeats} (median)\n")
    autos = []
    for name in args.tasks.split(","):
        task = make_task(name)
        gradient_time = median_time(task.full_gradient, max(args.repeats, 5))
        task.model.zero_grad(set_to_none=True)
        print(f"### {name}: P={task.num_params:,}, N={task.n}, model in {'train' if task.model.training else 'eval'} "
              f"mode; one full-data gradient: {gradient_time * 1e3:.1f} ms\n")
        print("| operator | K | method used | pass (ms) | pass / gradient | per vector / gradient |")
        print("|---|---:|---|---:|---:|---:|")
        generator = torch.Generator().manual_seed(0)
        for op_name, op in operators(task).items():
            for k in ks:
                V = torch.randn(op.shape[0], k, generator=generator)
                try:
                    seconds = median_time(lambda: op @ V, args.repeats)
                except Exception as e:  # noqa: BLE001 -- report and go on
                    print(f"| {op_name} | {k} | FAILED: {type(e).__name__}: {str(e)[:120]} | | | |", flush=True)
                    continue
                used = op.method_for(k) if hasattr(op, "method_for") else "-"
                ratio = seconds / gradient_time
                print(f"| {op_name} | {k} | {used} | {seconds * 1e3:.1f} | {ratio:.2f} | {ratio / k:.2f} |",
                      flush=True)
            if op_name == "Hessian auto":
                autos.append((name, op.calibration, {k: op.method_for(k) for k in ks}))
        print()
    print("### method='auto': calibration (seconds on the first batch) and choice\n")
    print("| task | K | double-backward s | forward-over-reverse s | chosen |")
    print("|---|---:|---:|---:|---|")
    for name, cal, chosen in autos:
        for k in sorted(chosen):
            if k not in cal:  # K=1, or products too short to pay forward mode's start-up
                print(f"| {name} | {k} | not timed | not timed | {chosen[k]} |")
                continue
            t = cal[k]
            fr = t.get("forward-over-reverse")
            print(f"| {name} | {k} | {t.get('double-backward', float('nan')):.4f} | "
                  f"{'–' if fr is None else f'{fr:.4f}'} | {chosen.get(k)} |")
    print()


if __name__ == "__main__":
    main()
