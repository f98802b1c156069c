"""hesse's influence methods against Kronfluence on the same digits task: time, memory, agreement.

The problem of ``bench_influence.py`` (64-32-10 tanh MLP, float64, 1,000 training digits,
20 held-out queries, measurement = query cross-entropy, pairwise scores ``[20, 1000]``).
Both libraries get the same absolute damping ``λ = damping · tr(C)/P`` (``tr C`` from hesse's
EK-FAC of the GGN) and run in float64 on one thread. Every tool runs in its own subprocess:
wall and CPU seconds of the whole influence computation (factors + scores, Kronfluence's
writes to disk included), and the peak resident memory during it (``VmHWM``, reset through
``/proc/self/clear_refs`` after the setup: imports, model, data) with its increase over the
resident memory at its start.

Kronfluence (Grosse et al. 2023; Analyzer / Task / ``fit_all_factors`` /
``compute_pairwise_scores`` as its documentation shows) fits the true Fisher with ONE sampled
label per example; hesse's ``kind="true"`` K-FAC/EK-FAC of the GGN takes the exact expectation
over the labels. ``*-empirical`` rows use the observed labels in both (hesse
``curvature="fisher"``, Kronfluence ``use_empirical_fisher=True``): the same matrix, so their
scores should agree to rounding. Prints a markdown table; correlations are with hesse's
``exact`` (``cg`` where exact is not run) and with the counterpart in the other library
(Pearson, and the least-squares slope of this tool's scores on the counterpart's).

    python bench/bench_influence_kronfluence.py [--damping 0.01] [--tools ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench_influence import problem

HESSE = {"exact": ("exact", "ggn"), "cg": ("cg", "ggn"), "kfac": ("kfac", "ggn"), "ekfac": ("ekfac", "ggn"),
         "identity": ("identity", "ggn"), "ekfac-empirical": ("ekfac", "fisher")}
KRONFLUENCE = {"ekfac": ("ekfac", False), "kfac": ("kfac", False), "diagonal": ("diagonal", False),
               "identity": ("identity", False), "ekfac-empirical": ("ekfac", True)}
TOOLS = [f"hesse-{m}" for m in HESSE] + [f"kronfluence-{m}" for m in KRONFLUENCE]


def _loaders(train: tuple, batch: int = 250) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(train[0][i:i + batch], train[1][i:i + batch]) for i in range(0, len(train[1]), batch)]


def run_hesse(model: nn.Module, train: tuple, queries: tuple, name: str, lam: float, cg_maxiter: int,
              memory_mib: int) -> torch.Tensor:
    """hesse ``pairwise`` with the absolute damping ``lam`` and a ``memory`` budget for per-sample gradients."""
    from hesse.apply.influence import pairwise

    method, curvature = HESSE[name]
    options = {"maxiter": cg_maxiter} if method == "cg" else {}
    return pairwise(model, nn.CrossEntropyLoss(), _loaders(train), queries, method=method, damping=lam,
                    relative_damping=False, curvature=curvature, memory=memory_mib * 2**20, **options)


def run_kronfluence(model: nn.Module, train: tuple, queries: tuple, name: str, lam: float, workdir: Path) -> torch.Tensor:
    """Kronfluence: ``prepare_model``, ``Analyzer.fit_all_factors``, ``compute_pairwise_scores`` (float64)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            target = batch[1]
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    target = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return nn.functional.cross_entropy(logits, target, reduction="sum")

        def compute_measurement(self, batch, model):
            return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    strategy, empirical = KRONFLUENCE[name]
    f64 = torch.float64
    task = Classification()
    analyzer = Analyzer("digits", prepare_model(model, task), task, cpu=True, disable_tqdm=True,
                        output_dir=str(workdir / "kronfluence"))
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical, activation_covariance_dtype=f64,
                                  gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64)
    train_set, query_set = torch.utils.data.TensorDataset(*train), torch.utils.data.TensorDataset(*queries)
    analyzer.fit_all_factors("factors", dataset=train_set, per_device_batch_size=250, factor_args=factor_args,
                             overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=lam, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                score_dtype=f64)
    analyzer.compute_pairwise_scores("scores", "factors", query_dataset=query_set, train_dataset=train_set,
                                     per_device_query_batch_size=len(queries[1]), per_device_train_batch_size=250,
                                     score_args=score_args, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("scores")["all_modules"]


def child(tool: str, workdir: Path) -> None:
    """One tool in this process: scores to ``workdir/<tool>.npy``, timings and memory to ``<tool>.json``."""
    setup = json.loads((workdir / "setup.json").read_text())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, train, queries = problem(setup["hidden"])
    library, name = tool.split("-", 1)
    if library == "kronfluence":
        import kronfluence  # noqa: F401  (imported before the baseline memory is read)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure the computation only
    base_rss = _status_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    if library == "hesse":
        scores = run_hesse(model, train, queries, name, setup["lam"], setup["cg_maxiter"], setup["memory_mib"])
    else:
        scores = run_kronfluence(model, train, queries, name, setup["lam"], workdir)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_kib("VmHWM")
    np.save(workdir / f"{tool}.npy", scores.detach().double().numpy())
    (workdir / f"{tool}.json").write_text(json.dumps({"wall": wall, "cpu": cpu, "peak_mib": peak / 1024,
                                                      "added_mib": (peak - base_rss) / 1024}))


def _status_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB (``VmRSS``: now, ``VmHWM``: peak since the reset)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def _corr(a: np.ndarray, b: np.ndarray, ranks: bool = False) -> float:
    if ranks:
        a, b = (np.argsort(np.argsort(v)).astype(float) for v in (a, b))
    return float(np.corrcoef(a, b)[0, 1])


def table(workdir: Path, tools: list[str]) -> None:
    """The markdown table of the finished tools."""
    scores = {t: np.load(workdir / f"{t}.npy").reshape(-1) for t in tools if (workdir / f"{t}.npy").exists()}
    reference = "hesse-exact" if "hesse-exact" in scores else "hesse-cg"  # exact is refused above P = 5,000
    exact = scores.get(reference)
    print(f"\n| tool | wall s | CPU s | peak RSS MiB (+ over the start) | Pearson / Spearman vs {reference} | "
          "vs counterpart (Pearson, slope) |\n|---|---|---|---|---|---|")
    for tool, s in scores.items():
        info = json.loads((workdir / f"{tool}.json").read_text())
        vs_exact = f"{_corr(s, exact):.4f} / {_corr(s, exact, True):.4f}" if exact is not None else "-"
        library, name = tool.split("-", 1)
        other = scores.get(f"{'hesse' if library == 'kronfluence' else 'kronfluence'}-{name}")
        vs_other = f"{_corr(s, other):.4f}, {float(s @ other / (other @ other)):.3f}" if other is not None else "-"
        print(f"| {tool} | {info['wall']:.1f} | {info['cpu']:.1f} | {info['peak_mib']:.0f} (+{info['added_mib']:.0f}) | "
              f"{vs_exact} | {vs_other} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--damping", type=float, default=0.01, help="relative: λ = damping · tr(C)/P")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--cg-maxiter", type=int, default=200)
    parser.add_argument("--memory-mib", type=int, default=256, help="hesse's memory= budget for per-sample gradients")
    parser.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the scores here (default: a temporary folder)")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workdir)
    torch.set_num_threads(1)
    from hesse.operators import EKFAC, Objective

    model, train, _ = problem(args.hidden)
    ekfac = EKFAC(Objective(model, nn.CrossEntropyLoss(), _loaders(train)), kind="true")
    lam = args.damping * ekfac.trace() / ekfac.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "setup.json").write_text(json.dumps({"hidden": args.hidden, "lam": lam, "cg_maxiter": args.cg_maxiter,
                                                        "memory_mib": args.memory_mib}))
        print(f"P = {ekfac.shape[0]}, λ = {args.damping:g} · tr/P = {lam:.4g}; load average {os.getloadavg()[0]:.2f}")
        for tool in args.tools:
            done = subprocess.run([sys.executable, __file__, "--child", tool, "--workdir", str(workdir)],
                                  capture_output=True, text=True)
            status = "ok" if done.returncode == 0 else f"FAILED: {done.stderr.strip().splitlines()[-1:]}"
            print(f"{tool}: {status}", flush=True)
        table(workdir, args.tools)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
