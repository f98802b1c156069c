"""``hesse quantize``: Hessian-aware mixed-precision quantization (HAWQ-V2/V3) with a report.

The sensitivities ``Ω_i(b)`` come from per-layer Hessian (or GGN) traces with error bars on
the first ``--curvature-samples`` samples; the bit widths from the integer program of
:func:`hesse.apply.quantize.allocate_bits`, one allocation per budget (``--size-mb``,
``--size-fraction``, ``--bops-fraction``: each value is one budget). Every allocation is
evaluated as a fake-quantized copy of the model on all the data, next to uniform bit widths,
random allocations (``--random-seeds``) and the reversed-sensitivity allocation under the same
budget. The report folder (``report.json`` + ``index.html``) is written atomically; a
problem the user can fix is one ``error:`` line and exit status 2; Ctrl-C writes nothing (130).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from hesse.apply.quantize import (
    Sensitivity, allocate_bits, evaluate_bits, export_config, fraction_limit, random_allocation,
    reversed_allocation, sensitivities,
)
from hesse.cli import LOSSES, CliError, describe, first_samples, stderr_is_terminal
from hesse.commands._shared import ProblemRequest, load_problem, model_and_data_options, one_line_errors, problem_data, stage
from hesse.errors import HesseError
from hesse.operators import Objective
from hesse.report.document import SCHEMA
from hesse.report.folder import INDEX_HTML, REPORT_JSON, write_report_folder

BITS_PER_MB = 8 * 2 ** 20  # 1 MB = 2^20 bytes


@dataclass(kw_only=True)
class QuantizeRequest(ProblemRequest):
    """What ``hesse quantize`` is asked to do."""

    curvature_samples: int
    bits: tuple[int, ...]
    budgets: list[tuple[str, float]]
    act_bits: int | None
    curvature: str
    measure: str
    rtol: float
    random_seeds: int


def parse_bits(text: str) -> tuple[int, ...]:
    """``--bits 2,4,8`` as distinct ascending integers of at least 2."""
    try:
        widths = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise CliError(f"--bits: {text!r} is not a comma list of integers, e.g. 2,4,8.") from None
    if len(widths) < 2 or widths[0] < 2:
        raise CliError(f"--bits: give at least two bit widths of 2 or more, e.g. 2,4,8; got {text!r}.")
    return tuple(widths)


def parse_budgets(size_mb: str | None, size_fraction: str | None, bops_fraction: str | None) -> list[tuple[str, float]]:
    """Every budget value as ``(kind, value)``: ``size-mb``, ``size-fraction`` or ``bops-fraction``."""
    budgets = []
    for kind, text in (("size-mb", size_mb), ("size-fraction", size_fraction), ("bops-fraction", bops_fraction)):
        for part in (text or "").split(","):
            if not part.strip():
                continue
            try:
                value = float(part)
            except ValueError:
                raise CliError(f"--{kind}: {part.strip()!r} is not a number.") from None
            if not (value > 0 if kind == "size-mb" else 0 <= value <= 1):
                raise CliError(f"--{kind}: {value} must be " + ("positive." if kind == "size-mb" else "in [0, 1] "
                               "(0: all lowest bits, 1: all highest)."))
            budgets.append((kind, value))
    return budgets or [("size-fraction", f) for f in (0.25, 0.5, 0.75)]


@click.command()
@model_and_data_options
@click.option("--max-samples", type=click.IntRange(min=1), help="Evaluate on the first N samples only [all].")
@click.option("--curvature-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples (the first ones) the Hessian traces are estimated on.")
@click.option("--params", "param_globs", multiple=True, metavar="GLOB",
              help="Quantize only these layers (layer or weight names or globs; repeatable) [all quantizable].")
@click.option("--loss", type=click.Choice(tuple(LOSSES)), default="cross_entropy", show_default=True)
@click.option("--bits", "bits_text", default="2,4,8", show_default=True, help="Candidate weight bit widths.")
@click.option("--size-mb", help="Comma list of limits on the quantized weights' size in MB (2^20 bytes).")
@click.option("--size-fraction", help="Comma list of size budgets between all-lowest (0) and all-highest (1) bits "
              "[0.25,0.5,0.75 if no budget is given].")
@click.option("--bops-fraction", help="Comma list of BOPs budgets between all-lowest (0) and all-highest (1) bits.")
@click.option("--act-bits", type=click.IntRange(min=2), help="Also quantize layer inputs to this many bits [float].")
@click.option("--curvature", type=click.Choice(("hessian", "ggn")), default="hessian", show_default=True)
@click.option("--measure", type=click.Choice(("hawq-v2", "qbert")), default="hawq-v2", show_default=True,
              help="Sensitivity: trace per parameter (HAWQ-V2) or top eigenvalue (Q-BERT), times ||Q(W)-W||^2.")
@click.option("--rtol", type=click.FloatRange(min=1e-4, max=1.0), default=0.1, show_default=True,
              help="Target relative accuracy (95%) of the per-layer traces.")
@click.option("--random-seeds", type=click.IntRange(min=0), default=3, show_default=True,
              help="Random allocations per budget (baseline).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of training (examples) and probes.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [examples: 1].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("hesse-quantize-report"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing hesse report in --out.")
@click.option("--no-progress", "quiet", is_flag=True, help="Silence the stage messages.")
@click.option("--json-only", is_flag=True, help="Write report.json only.")
def quantize(bits_text: str, size_mb: str | None, size_fraction: str | None, bops_fraction: str | None,
             **options: Any) -> None:
    """Choose a bit width per layer from Hessian traces (HAWQ-V2/V3) and report accuracy against size.

    \b
    Examples:
      hesse quantize --example digits --bits 2,4,8 --size-fraction 0.25,0.5,0.75 --out quantize-report
      hesse quantize --model net.py:make_net --checkpoint net.pt --data digits --size-mb 0.01
    """
    with one_line_errors():
        request = QuantizeRequest(bits=parse_bits(bits_text), budgets=parse_budgets(size_mb, size_fraction,
                                                                                    bops_fraction), **options)
        _quantize(request)


def _quantize(request: QuantizeRequest) -> None:
    """Build the objectives, measure the sensitivities, allocate and evaluate, write the report."""
    problem = load_problem(request)
    evaluation, curvature = _objectives(problem, request)
    stage(f"per-layer {request.curvature} traces on {request.curvature_samples} samples (rtol {request.rtol:g})",
           request.quiet)
    started = time.perf_counter()
    try:
        sens = sensitivities(curvature, bits=request.bits, curvature=request.curvature, rtol=request.rtol,
                             layers=list(request.param_globs) or None, seed=request.seed,
                             progress=not request.quiet and stderr_is_terminal(),
                             hessian_method=problem.hessian_method)
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"the per-layer traces failed: {describe(error)}") from error
    curvature_seconds = time.perf_counter() - started
    report = _compare(sens, evaluation, request)
    timings = {"training": problem.info.get("training", {}).get("seconds"), "curvature": curvature_seconds,
               "allocation_and_evaluation": time.perf_counter() - started - curvature_seconds}
    report.update(schema=SCHEMA, kind="quantize", command=shlex.join(["hesse", *sys.argv[1:]]),
                  settings={k: (str(v) if isinstance(v, Path) else v) for k, v in request.__dict__.items()},
                  model=problem.info.get("model"), data=problem.info.get("data"),
                  num_samples=evaluation.num_samples, layers=sens.rows(), curvature_matvecs=sens.result.matvecs,
                  trace_matvecs=sens.result.trace_matvecs, seconds=timings,
                  trace_methods=sorted(set(sens.result.trace_method.values())))
    files = {REPORT_JSON: json.dumps(report, indent=1, allow_nan=False)}
    if not request.json_only:
        files[INDEX_HTML] = render_quantize_report(report)
    write_report_folder(request.out, files, request.overwrite)
    for row in report["budgets"]:
        click.echo(f"{row['budget']:<22} bits {row['hessian']['bits']}  size {row['hessian']['size_mb']:.4g} MB  "
                   f"{_metric_text(row['hessian'])}")
    click.echo(f"report written to {request.out / (REPORT_JSON if request.json_only else INDEX_HTML)}")


def _metric_text(row: dict[str, Any]) -> str:
    return f"loss {row['loss']:.4g}" + (f"  accuracy {row['accuracy']:.4f}" if row["accuracy"] is not None else "")


def _objectives(problem: Any, request: QuantizeRequest) -> tuple[Objective, Objective]:
    """The evaluation objective (first ``--max-samples``) and the curvature one (first
    ``--curvature-samples`` of those), both with ``--loss``."""
    data = problem_data(problem, request.loss, request.batch_size, request.max_samples)
    try:
        objectives = tuple(Objective(problem.model, problem.criterion, d, forward=problem.forward,
                                     params=problem.params)
                           for d in (data, first_samples(data, request.curvature_samples)))
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"setting up the model and data failed: {describe(error)}") from error
    return objectives


def _limits(kind: str, value: float, costs: dict[str, np.ndarray]) -> dict[str, float]:
    """The ``allocate_bits`` limits of one budget."""
    if kind == "size-mb":
        return {"size": value * BITS_PER_MB}
    key = "size" if kind == "size-fraction" else "bops"
    return {key: fraction_limit(costs[key], value)}


def _compare(sens: Sensitivity, evaluation: Objective, request: QuantizeRequest) -> dict[str, Any]:
    """Every allocation (Hessian-aware, reversed, random; per budget) and uniform bit width, evaluated."""
    costs = sens.costs(request.act_bits)
    cache: dict[tuple[int, ...], dict[str, Any]] = {}

    def entry(bits: list[int], objective: float | None = None) -> dict[str, Any]:
        key = tuple(bits)
        if key not in cache:
            result = evaluate_bits(evaluation, sens.layers, bits, act_bits=request.act_bits)
            rows = np.arange(len(bits))
            columns = [sens.bits.index(b) for b in bits]
            cache[key] = {"bits": list(bits), "size_mb": float(costs["size"][rows, columns].sum() / BITS_PER_MB),
                          "bops": float(costs["bops"][rows, columns].sum()), "loss": result.loss,
                          "accuracy": result.accuracy}
        omega = float(sens.omega(request.measure)[np.arange(len(bits)), [sens.bits.index(b) for b in bits]].sum())
        return dict(cache[key], omega=omega if objective is None else objective)

    budgets = []
    for kind, value in request.budgets:
        stage(f"allocating and evaluating at {kind} {value:g}", request.quiet)
        limits = _limits(kind, value, costs)
        hessian = allocate_bits(sens.omega(request.measure), costs, limits, sens.bits,
                                tie_break=sens.tie_break(request.measure))
        budgets.append({
            "budget": f"{kind} {value:g}", "limits": limits, "hessian": entry(hessian.bits, hessian.objective),
            "config": export_config(sens, hessian, measure=request.measure),
            "reversed": entry(reversed_allocation(sens, costs, limits, request.measure).bits),
            "random": [entry(random_allocation(sens, costs, limits, seed, request.measure).bits)
                       for seed in range(request.random_seeds)]})
    uniform = [entry([b] * len(sens.layers)) for b in sens.bits]
    full = evaluation.evaluate()
    return {"bits": list(sens.bits), "measure": request.measure, "budgets": budgets, "uniform": uniform,
            "float": {"loss": full.loss, "accuracy": full.accuracy,
                      "size_mb": float(sum(q.numel for q in sens.layers) * 32 / BITS_PER_MB)}}


# ---- the page ------------------------------------------------------------------------------------
def pareto_plot(report: dict) -> str:
    """Base64 PNG: accuracy (or loss) against the quantized weights' size for every allocation."""
    import base64
    import io

    from hesse.plotting import new_figure

    metric = "accuracy" if report["float"]["accuracy"] is not None else "loss"
    unit, factor = _size_unit(report)
    point = lambda row: (row["size_mb"] * factor, row[metric])  # noqa: E731
    fig = new_figure((9.0, 4.4), dpi=110)
    ax = fig.add_subplot()
    budgets = report["budgets"]
    uniform = sorted(point(u) + (u["bits"][0],) for u in report["uniform"])
    ax.plot([u[0] for u in uniform], [u[1] for u in uniform], "s--", color="tab:blue", label="uniform bits", zorder=2)
    for x, y, width in uniform:
        ax.annotate(f"{width}-bit", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8, color="tab:blue")
    ax.plot(*zip(*(point(b["reversed"]) for b in budgets)), "v", ms=10, color="tab:red",
            label="reversed sensitivity", zorder=3)
    ax.plot(*zip(*sorted(point(b["hessian"]) for b in budgets)), "o-", ms=6, color="tab:green",
            label=f"{_aware(report)} ({report['measure']})", zorder=4)
    randoms = [point(r) for b in budgets for r in b["random"]]
    if randoms:
        ax.scatter(*zip(*randoms), marker="x", s=30, color="black", alpha=0.6, zorder=5,
                   label="random allocations (same budget)")
    ax.axhline(report["float"][metric], color="grey", ls=":", lw=1, label="float32")
    ax.margins(x=0.08)  # room for the bit-width labels at both ends
    ax.set(xlabel=f"size of the quantized weights ({unit})", ylabel=metric, title=f"{metric} against size")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _aware(report: dict) -> str:
    """``Hessian-aware`` or ``GGN-aware``: the curvature the allocation used."""
    return "GGN-aware" if report["settings"].get("curvature") == "ggn" else "Hessian-aware"


def _cost_text(report: dict) -> str:
    """What the traces cost and which estimators made them."""
    methods = report.get("trace_methods") or []
    text = f"traces from {report['trace_matvecs']} columns ({', '.join(methods) or 'none'})"
    if any(m.startswith("sampled") for m in methods):
        text += ("; a sampled square-root column of the GGN is one backward pass for all layers at once, "
                 "a Hutch++ column one GGN product of one layer")
    return text + f"; {report['curvature_matvecs']} curvature columns in all"


def _size_unit(report: dict) -> tuple[str, float]:
    """KiB for models under 1 MB (the digits CNN), MB otherwise, and the factor from MB."""
    return ("KiB", 1024.0) if report["float"]["size_mb"] < 1 else ("MB", 1.0)


def _cell(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _layer_table(report: dict) -> str:
    """Per-layer rows: size, trace ± stderr (flags), top eigenvalue, Ω per bit width, chosen bits."""
    import html

    bits = report["bits"]
    heads = "".join(f"<th>Ω({b})</th>" for b in bits) + "".join(f"<th>bits<br>{html.escape(b['budget'])}</th>"
                                                                  for b in report["budgets"])
    rows = []
    for i, r in enumerate(report["layers"]):
        flag = " (negative: Ω=0)" if r["negative"] else "" if r["significant"] else " (not significant)"
        chosen = "".join(f"<td>{b['hessian']['bits'][i]}</td>" for b in report["budgets"])
        omegas = "".join(f"<td>{_cell(r['omega'][str(b)], 3)}</td>" for b in bits)
        rows.append(f"<tr><td>{html.escape(r['layer'])}</td><td>{html.escape(r['kind'])}</td><td>{r['numel']}</td>"
                    f"<td>{r['trace']:.4g} ± {r['trace_stderr']:.2g}{flag}</td><td>{r['trace_per_parameter']:.3g}</td>"
                    f"<td>{r['top_eigenvalue']:.4g}</td>{omegas}{chosen}</tr>")
    return ("<table><tr><th>layer</th><th>kind</th><th>weights</th><th>trace ± stderr</th><th>trace/weight</th>"
            f"<th>top eigenvalue</th>{heads}</tr>{''.join(rows)}</table>")


def _budget_table(report: dict) -> str:
    """Per budget: the Hessian-aware, reversed and median random allocations' size and metric."""
    metric = "accuracy" if report["float"]["accuracy"] is not None else "loss"
    unit, factor = _size_unit(report)
    rows = []
    for b in report["budgets"]:
        randoms = [r[metric] for r in b["random"]]
        median = _cell(float(np.median(randoms))) if randoms else ""
        sizes = ", ".join(f"{r['size_mb'] * factor:.3g}" for r in b["random"])
        rows.append(f"<tr><td>{b['budget']}</td><td>{b['hessian']['size_mb'] * factor:.4g}</td>"
                    f"<td>{_cell(b['hessian'][metric])}</td><td>{b['reversed']['size_mb'] * factor:.4g}</td>"
                    f"<td>{_cell(b['reversed'][metric])}</td><td>{median}</td>"
                    f"<td>{sizes}</td></tr>")
    aware = _aware(report).split("-")[0]
    return (f"<table><tr><th>budget</th><th>{aware} {unit}</th><th>{aware} {metric}</th><th>reversed {unit}</th>"
            f"<th>reversed {metric}</th><th>median random {metric}</th><th>random {unit}</th></tr>{''.join(rows)}</table>")


def render_quantize_report(report: dict) -> str:
    """``index.html``: the Pareto plot, the per-budget comparison and the per-layer table."""
    import html

    full = report["float"]
    unit, factor = _size_unit(report)
    matrix = "G" if report["settings"].get("curvature") == "ggn" else "H"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>hesse quantize report</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}"
        "table{border-collapse:collapse;font-size:90%}</style></head><body>"
        f"<h1>Mixed-precision quantization report</h1><p>{html.escape(str(report['model']))}<br>"
        f"{html.escape(str(report['data']))}<br><code>{html.escape(report['command'])}</code></p>"
        f"<p>Float32 model: {_metric_text(full)}, quantized weights {full['size_mb'] * factor:.4g} {unit}. Weights: symmetric "
        f"per-output-channel fake quantization; sensitivity Ω<sub>i</sub>(b) = max(Tr {matrix}<sub>ii</sub>, 0)/n<sub>i</sub> "
        "· ‖Q<sub>b</sub>(W<sub>i</sub>) − W<sub>i</sub>‖² (HAWQ-V2; qbert: top eigenvalue instead of "
        f"Tr/n); {_cost_text(report)}.</p>"
        f"<img src='data:image/png;base64,{pareto_plot(report)}' alt='accuracy against size'>"
        f"<h2>Allocations per budget</h2>{_budget_table(report)}"
        f"<h2>Layers</h2>{_layer_table(report)}</body></html>"
    )
