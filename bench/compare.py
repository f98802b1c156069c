"""Benchmark hesse against PyHessian, hessian-eigenthings and curvlinops.

Usage (from the repository root, in the bench environment made by bench/setup_env.sh):

    bench/.venv/bin/python bench/compare.py [--tasks mlp,cnn]
        [--tools hesse,pyhessian,eigenthings,curvlinops] [--quantities top1,top5,trace,density]
        [--quick] [--out bench/results.json] [--md FILE]

Every tool runs on the same trained model, loss and DataLoader (bench/tasks.py) and is
scored against exact references (bench/reference.py, cached in bench/reference_*.json
and computed on first use). One markdown table per task (mlp, cnn, transformer) is
printed with: wall time, Hessian-vector products (matvecs), passes over the data (calls
of the tool's product entry point; one call with K columns = one pass), peak memory,
cost in full-data gradients and the error against the exact value.

Measurement, per (tool, task, quantity) cell, each in a fresh Python subprocess
(which also isolates crashes and hangs):
  * the task (cached trained weights) and the tool's library are loaded first; then the
    baseline peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is read;
  * wall time covers building the tool's operator object plus the computation;
  * peak MB = ru_maxrss after the computation minus the baseline (the extra memory the
    method needed beyond model + data + imports);
  * matvecs are counted by each adapter (see bench/tool_*.py for how);
  * afterwards the same process times one full-data gradient (forward + backward over
    all batches, median of 7 after a warm-up) and cost = wall time / gradient time.
Errors: top-1/top-5: relative error of each eigenvalue against the exact ones (max over
the 5, sorted in decreasing order); trace: relative error; density: for mlp the
Wasserstein-1 distance between the estimated spectral distribution (Ritz nodes and
weights where the tool returns them, else its gridded density) and the exact eigenvalue
distribution, divided by the spectral width lambda_max - lambda_min; for cnn, whose
full spectrum is out of reach, the relative error of the density's mean against the
exact trace / P.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

TOOLS = {
    "hesse": "tool_hesse",
    "pyhessian": "tool_pyhessian",
    "eigenthings": "tool_eigenthings",
    "curvlinops": "tool_curvlinops",
    # hessian-eigenthings' lanczos with more steps than its default 2k (max_iter=50 keeps
    # its full reorthogonalisation on): separates its convergence error from its biased
    # operator. Only top1/top5 (trace and density are the same calls as "eigenthings").
    "eigenthings50": "tool_eigenthings",
}
TOOL_ONLY = {"eigenthings50": ("top1", "top5")}
TOOL_CFG = {"eigenthings50": {"eigenthings_max_iter": 50}}
TOOL_IMPORTS = {
    "hesse": ["hesse", "hesse.linalg", "hesse.analysis", "hesse.linalg.quadrature"],
    "pyhessian": ["pyhessian"],
    "eigenthings": ["hessian_eigenthings"],
    "curvlinops": ["curvlinops", "scipy.sparse.linalg"],
    "eigenthings50": ["hessian_eigenthings"],
}
QUANTITIES = ("top1", "top5", "trace", "density")
RESULT_MARK = "@@CELL_RESULT@@"

FULL = dict(k=5, eig_tol=1e-3, power_iters=100, trace_budget=99, trace_tol=1e-3,
            density_steps=100, density_probes=3, seed=0, timeout_s=900)
QUICK = dict(k=5, eig_tol=1e-3, power_iters=20, trace_budget=30, trace_tol=1e-3,
             density_steps=30, density_probes=1, seed=0, timeout_s=300)
# per-task overrides (same for every tool): fewer SLQ probes on the expensive task
TASK_OVERRIDES = {"full": {"mlp": {"density_probes": 5}, "cnn": {"density_probes": 2},
                           "transformer": {"density_probes": 3}},
                  "quick": {}}


# ------------------------------------------------------------------ one cell (child)

def run_cell(tool: str, task_name: str, quantity: str, cfg: dict) -> dict:
    import torch
    import tasks

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    rec: dict = {"tool": tool, "task": task_name, "quantity": quantity,
                 "threads": torch.get_num_threads()}
    adapter = importlib.import_module(TOOLS[tool])
    for mod in TOOL_IMPORTS[tool]:
        try:
            importlib.import_module(mod)
        except Exception:
            pass  # the adapter reports it
    rec["tool_version"] = adapter.version()
    task = tasks.make_task(task_name)
    gc.collect()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meter = {"matvecs": 0, "passes": 0}
    t0 = time.perf_counter()
    try:
        out = adapter.run(task, quantity, cfg, meter)
        rec.update(out)
        rec["status"] = "ok"
    except Exception as e:  # record, do not hide
        rec["status"] = "not available" if type(e).__name__ == "NotAvailable" else "error"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        rec["error"] = f"{type(e).__name__}: {msg}"[:300]
        rec["traceback"] = traceback.format_exc()[-2000:]
    rec["wall_s"] = time.perf_counter() - t0
    rec["matvecs"] = meter["matvecs"]
    rec["passes"] = meter["passes"]
    rec["peak_mb"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024.0
    rec["baseline_mb"] = base_kb / 1024.0
    for p in task.model.parameters():
        p.requires_grad_(True)
    task.model.train()
    rec["grad_time_s"] = task.gradient_time()
    return rec


def cell_main(args) -> None:
    cfg = json.loads(args.config)
    import warnings
    warnings.filterwarnings("ignore")
    cfg.update(TOOL_CFG.get(args.cell[0], {}))
    rec = run_cell(args.cell[0], args.cell[1], args.cell[2], cfg)
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(rec) + "\n")
    sys.stdout.flush()


def spawn_cell(tool: str, task: str, quantity: str, cfg: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", tool, task, quantity,
           "--config", json.dumps(cfg)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg["timeout_s"], cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "task": task, "quantity": quantity, "status": "error",
                "error": f"timed out after {cfg['timeout_s']} s", "wall_s": time.perf_counter() - t0}
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"tool": tool, "task": task, "quantity": quantity, "status": "error",
            "error": f"process died (rc={p.returncode}): {tail[0][:250]}",
            "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------ scoring

def _discrete(rec: dict):
    """The estimated spectral distribution as (points, weights)."""
    import numpy as np
    if rec.get("nodes"):
        pts = np.concatenate([np.asarray(n, float) for n in rec["nodes"]])
        w = np.concatenate([np.asarray(w, float) / len(rec["weights"]) for w in rec["weights"]])
        return pts, np.clip(w, 0, None), "Ritz nodes"
    if rec.get("grid"):
        return np.asarray(rec["grid"], float), np.clip(np.asarray(rec["density"], float), 0, None), "grid"
    return None, None, None


def score(rec: dict, ref: dict) -> tuple[float | None, str]:
    """(error, description) of one cell against the reference."""
    import numpy as np
    q = rec["quantity"]
    if rec.get("status") != "ok":
        return None, ""
    if q in ("top1", "top5"):
        want = ref["top_eigenvalues"][: 1 if q == "top1" else 5]
        got = sorted(rec.get("values", []), reverse=True)
        if len(got) < len(want):
            return None, f"returned {len(got)} of {len(want)} eigenvalues"
        errs = [abs(g - w) / abs(w) for g, w in zip(got, want)]
        return max(errs), "max rel" if q == "top5" else "rel"
    if q == "trace":
        return abs(rec["estimate"] - ref["trace"]) / abs(ref["trace"]), "rel"
    if q == "density":
        pts, w, kind = _discrete(rec)
        if pts is None and rec.get("error_vs_exact") is not None:  # re-render of a stripped json
            return rec["error_vs_exact"], rec.get("error_kind", "")
        if pts is None or w.sum() <= 0:
            return None, "no density returned"
        if "eigenvalues" in ref:
            from scipy.stats import wasserstein_distance
            ev = np.asarray(ref["eigenvalues"])
            w1 = wasserstein_distance(pts, ev, u_weights=w)
            return w1 / (ev.max() - ev.min()), f"W1/width ({kind})"
        mean = float((pts * w).sum() / w.sum())
        want = ref["trace"] / ref["num_params"]
        return abs(mean - want) / abs(want), f"rel err of mean vs tr/P ({kind})"
    return None, ""


def summary(rec: dict) -> str:
    q = rec["quantity"]
    if rec.get("status") != "ok":
        return ""
    if q in ("top1", "top5"):
        v = rec.get("values", [])
        return ("λ=" + ", ".join(f"{x:.5g}" for x in v[:5])) if v else ""
    if q == "trace":
        s = f"tr={rec['estimate']:.5g}"
        if rec.get("stderr") == rec.get("stderr") and rec.get("stderr") is not None:
            s += f"±{rec['stderr']:.2g}"
        return s
    return ""


# ------------------------------------------------------------------ tables

def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def table(task: str, recs: list[dict], ref: dict, grad_time: float | None) -> str:
    gt_txt = f"; one full-data gradient = {grad_time * 1e3:.2f} ms (median)" if grad_time else ""
    if ref is None:
        lines = [f"### Task `{task}`", "",
                 f"Exact reference pending (bench/reference.py --tasks {task}); errors left empty{gt_txt}", ""]
        ref = {}
    else:
        lines = [f"### Task `{task}` — P = {ref['num_params']:,} parameters, N = {ref['num_samples']} samples, "
                 f"batches {ref['batch_sizes']}",
                 "",
                 f"Exact: trace = {ref['trace']:.6g}; top-5 = "
                 + ", ".join(f"{x:.6g}" for x in ref["top_eigenvalues"]) + gt_txt,
                 ""]
    lines += [
             "| tool | quantity | wall s | matvecs | passes | peak MB | cost (gradients) | error vs exact | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in recs:
        err, how = score(r, ref) if ref else (None, "")
        notes = []
        s = summary(r)
        if s:
            notes.append(s)
        if r.get("status") == "not available":
            notes.append(r.get("error", "not available yet"))
        elif r.get("status") == "error":
            notes.append("CRASH: " + r.get("error", "?"))
        elif r.get("status") == "skipped":
            notes.append(r.get("error", "skipped"))
        if how:
            notes.append(how)
        if r.get("converged") is False:
            notes.append("NOT CONVERGED (own flag)")
        unw = ref.get("unweighted_batch_mean")
        if unw and r["tool"].startswith("eigenthings") and r.get("status") == "ok":
            if r["quantity"] == "trace":
                notes.append(f"exact trace of its equal-weight operator: {unw['trace']:.5g}")
            elif r["quantity"] in ("top1", "top5"):
                kk = 1 if r["quantity"] == "top1" else 5
                notes.append("exact top of its equal-weight operator: "
                             + ", ".join(f"{x:.5g}" for x in unw["top_eigenvalues"][:kk]))
        notes += r.get("notes", [])
        gt = r.get("grad_time_s")
        cost = r["wall_s"] / gt if (gt and r.get("status") in ("ok", "error") and "wall_s" in r) else None
        errs = "–" if err is None else f"{err:.1e}"
        lines.append(
            f"| {r['tool']} | {r['quantity']} | {fmt(r.get('wall_s'), '.2f')} | "
            f"{r.get('matvecs', '–')} | {r.get('passes', '–')} | {fmt(r.get('peak_mb'), '.1f')} | {fmt(cost, '.0f')} | {errs} | "
            + "; ".join(n.replace("|", "/") for n in notes) + " |")
    return "\n".join(lines)


def render(results: dict) -> str:
    """Markdown tables of a results dict, scored against the references on disk."""
    import reference
    out = []
    for task, tr in results["tasks"].items():
        ref = reference.load_reference(task)
        if ref is None:
            out.append(table(task, tr["cells"], None, tr.get("gradient_time_s_median")))
            continue
        import tasks
        want, have = ref.get("weights_sha256"), tasks.weights_sha256(task)
        if want and have and want != have:
            out.append(f"**WARNING: bench/weights/{task}_seed{tasks.SEED}.pt differs from the weights "
                       f"reference_{task}.json was computed for; errors are meaningless. Restore the "
                       f"committed weights or rerun bench/reference.py --tasks {task} --force.**")
        for r in tr["cells"]:
            r["error_vs_exact"], r["error_kind"] = score(r, ref)
        out.append(table(task, tr["cells"], ref, tr.get("gradient_time_s_median")))
    return "\n\n".join(out)


def machine() -> dict:
    import torch
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


# ------------------------------------------------------------------ driver

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="hesse vs PyHessian / hessian-eigenthings / curvlinops")
    ap.add_argument("--tasks", default=None, help="comma list from mlp,cnn,transformer (default: all three; --quick: mlp)")
    ap.add_argument("--tools", default=",".join(TOOLS))  # all, incl. eigenthings50
    ap.add_argument("--quantities", default=",".join(QUANTITIES))
    ap.add_argument("--quick", action="store_true", help="smaller budgets, mlp only by default (~2 min)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads per cell (default: torch's default, = cores)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per cell before it is killed")
    ap.add_argument("--density-probes", type=int, default=None,
                    help="SLQ probes for every tool (default: mlp 5, cnn 2, transformer 3; --quick 1)")
    ap.add_argument("--md", default=None, help="also write the tables to this markdown file")
    ap.add_argument("--render", metavar="RESULTS_JSON", default=None,
                    help="only re-score and print the tables of an earlier run's json")
    ap.add_argument("--no-reference", action="store_true",
                    help="do not compute a missing reference (errors stay empty; re-score later with --render)")
    ap.add_argument("--cell", nargs=3, metavar=("TOOL", "TASK", "QUANTITY"), help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        cell_main(args)
        return 0
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        md = render(results)
        print(md)
        if args.md:
            with open(args.md, "w") as f:
                f.write(md + "\n")
        return 0

    import reference

    cfg = dict(QUICK if args.quick else FULL)
    cfg["threads"] = args.threads
    if args.timeout:
        cfg["timeout_s"] = args.timeout
    task_names = (args.tasks or ("mlp" if args.quick else "mlp,cnn,transformer")).split(",")
    tools = [t for t in args.tools.split(",") if t]
    quantities = [q for q in args.quantities.split(",") if q]
    for t in tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}; choose from {list(TOOLS)}")
    for q in quantities:
        if q not in QUANTITIES:
            ap.error(f"unknown quantity {q!r}; choose from {list(QUANTITIES)}")

    mach = machine()
    if args.threads:
        mach["torch_threads"] = args.threads
    mach["loadavg_start"] = os.getloadavg()[0]
    started = time.time()
    print(f"# hesse curvature benchmark ({'quick' if args.quick else 'full'})")
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']}, torch {mach['torch']} "
          f"({mach['torch_threads']} threads per cell), Python {mach['python']}, "
          f"load average at start {mach['loadavg_start']:.1f}")
    print("settings: " + json.dumps({k: v for k, v in cfg.items()}))
    results = {"machine": mach, "config": cfg, "quick": args.quick, "tasks": {}}
    for task in task_names:
        ref = reference.load_reference(task)
        if ref is None and not args.no_reference:
            print(f"[{task}] computing the exact reference (once; cached in bench/reference_{task}.json) ...",
                  flush=True)
            subprocess.run([sys.executable, os.path.join(HERE, "reference.py"), "--tasks", task],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            ref = reference.load_reference(task)
        recs = []
        tcfg = dict(cfg, **TASK_OVERRIDES["quick" if args.quick else "full"].get(task, {}))
        if args.density_probes:
            tcfg["density_probes"] = args.density_probes
        for q in quantities:
            for tool in tools:
                if q not in TOOL_ONLY.get(tool, QUANTITIES):
                    continue
                print(f"[{task}] {tool:13s} {q:8s} ...", end=" ", flush=True)
                r = spawn_cell(tool, task, q, tcfg)
                err = score(r, ref)[0] if ref else None
                print(f"{r.get('status')} {r.get('wall_s', 0):.1f}s matvecs={r.get('matvecs', '-')} "
                      f"passes={r.get('passes', '-')} "
                      f"err={'-' if err is None else f'{err:.1e}'} {r.get('error', '')}", flush=True)
                r.pop("traceback", None) if r.get("status") == "ok" else None
                if r.get("nodes"):  # keep the json small: Ritz nodes suffice for scoring
                    r.pop("grid", None)
                    r.pop("density", None)
                recs.append(r)
        gts = sorted(r["grad_time_s"] for r in recs if r.get("grad_time_s"))
        results["tasks"][task] = {
            "config": tcfg,
            "gradient_time_s_median": gts[len(gts) // 2] if gts else None,
            "cells": recs,
        }
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    md = render(results)
    print()
    print(md)
    results["elapsed_s"] = time.time() - started
    print(f"total {results['elapsed_s']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
