"""Time the whole ``hesse quantize`` run on the built-in digits CNN (training, per-layer Hessian
traces, allocations and evaluations) and report the load average of the machine.

    python bench/bench_quantize.py [--threads 2] [--out /tmp/bench-quantize]

Goal: under 2 minutes on 2 cores. Prints one markdown row: wall time, the CPU time of the run
(user + system, all threads: on a shared machine it tells the work apart from the waiting),
the curvature products and the 1-minute load average before and after. On a busy machine
compare ``--threads 1`` (the default of ``hesse quantize --example``): with two threads every
small op of the digits CNN waits for a second core that other jobs hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "report")
    args = parser.parse_args()
    command = [sys.executable, "-c", "from hesse.commands.quantize import quantize; quantize()", "--example", "digits", "--bits", "2,4,8",
               "--size-fraction", "0.25,0.5,0.75", "--threads", str(args.threads), "--out", str(args.out),
               "--overwrite", "--no-progress"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    load_after = os.getloadavg()[0]
    if done.returncode != 0:
        raise SystemExit(f"hesse quantize failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    report = json.loads((args.out / "report.json").read_text())
    print(f"| command | wall s | CPU s (user+sys) | curvature products | load avg (1 min) before / after | cores |\n"
          f"|---|---|---|---|---|---|\n| `hesse quantize {' '.join(command[3:])}` | {wall:.1f} | {cpu:.1f} | "
          f"{report['curvature_matvecs']} | "
          f"{load_before:.2f} / {load_after:.2f} | {os.cpu_count()} |")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items() if v is not None)
    print(f"\nstages: {stages}; trace products {report['trace_matvecs']} of {report['curvature_matvecs']}")


if __name__ == "__main__":
    main()
