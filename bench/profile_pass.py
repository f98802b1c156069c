"""Profile one Hessian product pass (K=1 and K=16) with torch.profiler and cProfile.

Task: the CNN of ``bench/tasks.py`` (151,306 parameters, 1797 digits, 8 batches).
For each K, after two warm-up passes (for ``method="auto"`` the second may time both
methods, once the first has cost forward mode's start-up), one pass ``op @ V`` is profiled:

* torch.profiler: the top operators by self CPU time, and the share of the pass's wall
  time spent outside every recorded torch operator (Python: hesse's own code, the data
  loader, the autograd/functorch glue) -- the "Python overhead share";
* cProfile (a separate, identical pass): the Python functions with the most own time.

Prints a short markdown summary.

    bench/.venv/bin/python bench/profile_pass.py [--task cnn] [--method auto] [--ks 1,16] [--threads 2]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hesse  # noqa: E402
from tasks import make_task  # noqa: E402


def profile_k(op, K: int, top: int):
    V = torch.randn(op.shape[0], K, generator=torch.Generator().manual_seed(0))
    op @ V  # warm-up / calibration
    op @ V
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        op @ V
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6  # seconds
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]

    pr = cProfile.Profile()
    t1 = time.perf_counter()
    pr.enable()
    op @ V
    pr.disable()
    wall_cprofile = time.perf_counter() - t1
    buf = io.StringIO()
    stats = pstats.Stats(pr, stream=buf)
    py_rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True):
        if len(py_rows) >= top:
            break
        where = "built-in" if file == "~" else f"{os.path.relpath(file, os.path.dirname(os.path.dirname(__file__)))}:{line}" \
            if "hesse" in file and "site-packages" not in file else os.path.basename(file) + f":{line}"
        py_rows.append((fn, where, nc, tt))
    return wall, total_self, rows, py_rows, wall_cprofile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="cnn")
    ap.add_argument("--method", default="auto", help="Hessian product method (auto, double-backward, forward-over-reverse)")
    ap.add_argument("--ks", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task(args.task)
    op = hesse.Hessian(task.model, task.criterion, task.loader, method=args.method)
    task.full_gradient()
    t0 = time.perf_counter()
    for _ in range(3):
        task.full_gradient()
    grad_s = (time.perf_counter() - t0) / 3
    task.model.zero_grad(set_to_none=True)
    print(f"## Profile of one Hessian product pass — task `{args.task}` (P={task.num_params:,}), "
          f"method={args.method!r}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; one full-data gradient {grad_s * 1e3:.0f} ms\n")
    for K in [int(k) for k in args.ks.split(",")]:
        wall, inside, rows, py_rows, wall_cp = profile_k(op, K, args.top)
        used = op.method_for(K) if hasattr(op, "method_for") else args.method
        outside = max(0.0, wall - inside)
        print(f"### K={K} ({used}): pass {wall * 1e3:.0f} ms = {wall / grad_s:.2f} gradients "
              f"({wall / grad_s / K:.2f} per vector); time inside torch operators {inside * 1e3:.0f} ms, "
              f"outside (Python overhead share) {outside * 1e3:.0f} ms = {100 * outside / wall:.1f}%\n")
        print("| operator | calls | self CPU ms | share of pass |")
        print("|---|---:|---:|---:|")
        for e in rows:
            print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                  f"{100 * e.self_cpu_time_total / 1e6 / wall:.1f}% |")
        print(f"\ncProfile (pass {wall_cp * 1e3:.0f} ms under cProfile), Python functions by own time:\n")
        print("| function | where | calls | own ms |")
        print("|---|---|---:|---:|")
        for fn, where, nc, tt in py_rows:
            print(f"| `{fn}` | {where} | {nc} | {tt * 1e3:.1f} |")
        print()


if __name__ == "__main__":
    main()
