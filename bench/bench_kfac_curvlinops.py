"""hesse.KFAC against curvlinops' KFACLinearOperator on the bench CNN (issue 10).

Same matrix, to float precision, where both support the layers; and the time side by side.
The CNN of ``bench/tasks.py`` (Conv2d 1->32, Conv2d 32->64, Linear 1024->128, Linear
128->10, all with bias; 151,306 parameters; digits, 1797 samples in 8 batches of 256,
mean cross-entropy) has only Conv2d and Linear layers, which both libraries factorise.

Settings matched one to one, each library used as its documentation says:

    hesse.KFAC(model, criterion, batches, kind=K, weight_sharing="expand")
    curvlinops.KFACLinearOperator(model, criterion, params, batches, fisher_type=F,
        kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False)

with (K, F) = ("empirical", "empirical") and ("true", "type-2"), both deterministic.
``kind="mc"`` / ``fisher_type="mc"`` draw labels from different generators and are not
compared. ``separate_weight_and_bias=False`` makes curvlinops fold the bias into ``A`` as a
constant-1 input, which is what hesse does; curvlinops' default (``True``) drops the
weight-bias cross terms, and its distance from hesse is reported as a separate row.

Compared: per layer the factors ``A`` (hesse ``.factors[name].A`` vs
``_input_covariances[name]``) and ``S`` (``.S`` vs ``_gradient_covariances[name]``), as
max |difference| / max |curvlinops entry|; the products ``K @ V`` for 8 random columns,
as max over columns of ||K_h v - K_c v|| / ||K_c v||. In float64 and float32; the float32
rows also give each library's distance from the float64 curvlinops matrix, i.e. the
float32 rounding level the two should differ by.

Times (float32): a fresh operator plus its factors (hesse: constructor + ``.factors``;
curvlinops: constructor, which traverses the data once to count samples, +
``compute_kronecker_factors()``), and one product with a single vector after a warm-up;
median wall and CPU (process) seconds of ``--repeats`` runs, with 1 and 2 threads, and
the 1-minute load average before each block (the machine is shared: CPU seconds and the
1-thread rows are the reliable ones).

    /work/bench-venv/bin/python bench/bench_kfac_curvlinops.py [--repeats 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tasks import make_task  # noqa: E402

import hesse  # noqa: E402
from curvlinops import KFACLinearOperator  # noqa: E402

PAIRS = (("empirical", "empirical"), ("true", "type-2"))


def build_hesse(task, kind: str, sharing: str = "expand"):
    op = hesse.KFAC(task.model, task.criterion, task.batches, kind=kind, weight_sharing=sharing)
    op.factors  # computed on first use
    return op


def build_curvlinops(task, fisher_type: str, sharing: str = "expand", separate: bool = False):
    op = KFACLinearOperator(task.model, task.criterion, task.params(), task.batches, fisher_type=fisher_type,
                            kfac_approx=sharing, separate_weight_and_bias=separate, check_deterministic=False)
    op.compute_kronecker_factors()
    return op


def rel_max(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max())


def rel_cols(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float(((x - ref).norm(dim=0) / ref.norm(dim=0)).max())


def precision(columns: int = 8, seed: int = 0) -> list[str]:
    lines = ["| dtype | hesse kind / curvlinops fisher_type | layer | A | S |", "|---|---|---|---|---|"]
    prods = ["| dtype | hesse kind / curvlinops fisher_type | compared | K @ V (8 columns) |", "|---|---|---|---|"]
    t64, t32 = make_task("cnn", dtype=torch.float64), make_task("cnn", dtype=torch.float32)
    P = sum(p.numel() for p in t64.params())
    V64 = torch.randn(P, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    V32 = V64.float()
    for kind, ftype in PAIRS:
        h64, c64 = build_hesse(t64, kind), build_curvlinops(t64, ftype)
        h32, c32 = build_hesse(t32, kind), build_curvlinops(t32, ftype)
        ref = c64 @ V64
        for dtype, h, c in (("float64", h64, c64), ("float32", h32, c32)):
            hf = h.factors
            assert set(hf) == set(c._input_covariances), (list(hf), list(c._input_covariances))
            for name in c._input_covariances:
                b = hf[name]
                assert isinstance(b, hesse.operators.KroneckerBlock)
                lines.append(f"| {dtype} | {kind} / {ftype} | {name} ({type(h.model.get_submodule(name)).__name__}) | "
                             f"{rel_max(b.A, c._input_covariances[name]):.1e} | "
                             f"{rel_max(b.S, c._gradient_covariances[name]):.1e} |")
        prods.append(f"| float64 | {kind} / {ftype} | hesse vs curvlinops | {rel_cols(h64 @ V64, ref):.1e} |")
        prods.append(f"| float32 | {kind} / {ftype} | hesse vs curvlinops | {rel_cols(h32 @ V32, c32 @ V32):.1e} |")
        prods.append(f"| float32 | {kind} / {ftype} | hesse float32 vs curvlinops float64 | {rel_cols(h32 @ V32, ref):.1e} |")
        prods.append(f"| float32 | {kind} / {ftype} | curvlinops float32 vs curvlinops float64 | "
                     f"{rel_cols(c32 @ V32, ref):.1e} |")
        sep = build_curvlinops(t64, ftype, separate=True)
        prods.append(f"| float64 | {kind} / {ftype} | hesse vs curvlinops separate_weight_and_bias=True (default) | "
                     f"{rel_cols(h64 @ V64, sep @ V64):.1e} |")
        print(f"precision {kind}/{ftype} done", file=sys.stderr, flush=True)
    # weight_sharing="reduce" <-> kfac_approx="reduce" (empirical only: the cheap one)
    h, c = build_hesse(t64, "empirical", "reduce"), build_curvlinops(t64, "empirical", "reduce")
    worst = max(max(rel_max(h.factors[n].A, c._input_covariances[n]), rel_max(h.factors[n].S, c._gradient_covariances[n]))
                for n in c._input_covariances)
    prods.append(f"| float64 | empirical / empirical, reduce | hesse vs curvlinops (worst factor entry: {worst:.1e}) | "
                 f"{rel_cols(h @ V64, c @ V64):.1e} |")
    return lines + [""] + prods


def timed(fn, repeats: int, warmup: bool = False) -> tuple[float, float]:
    if warmup:
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def timing(threads_list: list[int], repeats: int) -> list[str]:
    lines = ["| threads | kind / fisher_type | library | factors: wall s | factors: CPU s | product: wall ms | "
             "product: CPU ms | load avg (1 min) |", "|---|---|---|---|---|---|---|---|"]
    task = make_task("cnn", dtype=torch.float32)
    P = sum(p.numel() for p in task.params())
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))
    for threads in threads_list:
        torch.set_num_threads(threads)
        for kind, ftype in PAIRS:
            for lib, build in (("hesse", lambda: build_hesse(task, kind)),
                               ("curvlinops", lambda: build_curvlinops(task, ftype))):
                load = os.getloadavg()[0]
                fw, fc = timed(build, repeats)
                op = build()
                pw, pc = timed(lambda: op @ v, 2 * repeats + 1, warmup=True)
                lines.append(f"| {threads} | {kind} / {ftype} | {lib} | {fw:.2f} | {fc:.2f} | {1e3 * pw:.1f} | "
                             f"{1e3 * pc:.1f} | {load:.1f} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-precision", action="store_true")
    args = parser.parse_args()
    from importlib.metadata import version
    torch.set_num_threads(args.threads[0])
    print(f"torch {torch.__version__}, curvlinops-for-pytorch {version('curvlinops-for-pytorch')}, "
          f"hesse {getattr(hesse, '__version__', 'dev')}; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    if not args.skip_precision:
        print("\n".join(precision()))
    if not args.skip_timing:
        print()
        print("\n".join(timing(args.threads, args.repeats)))
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
