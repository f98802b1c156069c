"""``hesse prune``: one-shot pruning of a model, each method at each target, in a report folder.

The model and data options are those of ``hesse analyze`` (its helpers are reused). The
data (after ``--max-samples``) serves both as the curvature/calibration data and for the
loss and accuracy of every pruned model. Writes ``report.json`` and ``index.html`` (a plot
of accuracy, or loss, against sparsity per method and a per-layer sparsity table)
atomically; a problem the user can fix is one ``error:`` line and exit status 2; Ctrl-C
writes nothing and exits with 130.
"""

from __future__ import annotations

import html
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from hesse.apply import prune_layerwise_obs, prune_magnitude, prune_obd, prune_woodfisher
from hesse.cli import LOSSES, CliError, describe, stderr_is_terminal
from hesse.commands._shared import ProblemRequest, load_problem, model_and_data_options, one_line_errors, problem_data, stage
from hesse.errors import HesseError
from hesse.operators import Objective
from hesse.report.document import SCHEMA
from hesse.report.folder import INDEX_HTML, REPORT_JSON, write_report_folder

METHODS = ("magnitude", "obd", "woodfisher", "layerwise")


@dataclass(kw_only=True)
class PruneRequest(ProblemRequest):
    """What ``hesse prune`` is asked to do."""

    methods: tuple[str, ...]
    targets: list[dict[str, Any]]
    scope: str
    budget: int
    obd_diagonal: str
    fisher_samples: int


def parse_methods(text: str) -> tuple[str, ...]:
    """The ``--method`` comma list."""
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise CliError(f"--method: unknown {unknown or 'empty list'}; choose from {','.join(METHODS)}.")
    return names


def parse_targets(sparsity: str | None, nm: str | None) -> list[dict[str, Any]]:
    """``--sparsity 0.5,0.7`` and ``--nm 2:4`` as a list of ``{"sparsity": s}`` / ``{"nm": "2:4"}``."""
    targets: list[dict[str, Any]] = []
    for text in (sparsity or "").split(","):
        if text.strip():
            try:
                value = float(text)
            except ValueError:
                raise CliError(f"--sparsity: {text.strip()!r} is not a number; write fractions like 0.5,0.7,0.9.") from None
            if not 0.0 <= value < 1.0:
                raise CliError(f"--sparsity: {value} is not a fraction in [0, 1) of weights to remove.")
            targets.append({"sparsity": value})
    targets += [{"nm": p.strip()} for p in (nm or "").split(",") if p.strip()]
    if not targets:
        raise CliError("give --sparsity 0.5,0.7,0.9 and/or --nm 2:4.")
    return targets


@click.command()
@model_and_data_options
@click.option("--max-samples", type=click.IntRange(min=1), help="Use only the first N samples [all].")
@click.option("--params", "param_globs", multiple=True, metavar="GLOB",
              help="Prune only these tensors (names or globs; repeatable) [every Linear/Conv2d weight].")
@click.option("--loss", type=click.Choice(tuple(LOSSES)), default="cross_entropy", show_default=True)
@click.option("--method", "methods", default=",".join(METHODS), show_default=True, help="Comma list of methods.")
@click.option("--sparsity", default="0.5,0.7,0.9", show_default=True, help="Comma list of fractions to remove.")
@click.option("--nm", help="Comma list of N:M patterns, e.g. 2:4.")
@click.option("--scope", type=click.Choice(("layer", "global")), default="layer", show_default=True,
              help="Sparsity per layer, or over all pruned tensors (layer-wise OBS is always per layer).")
@click.option("--budget", type=click.IntRange(min=4), default=100, show_default=True,
              help="Products for OBD's diagonal estimate (XDiag).")
@click.option("--obd-diagonal", type=click.Choice(("ggn-xdiag", "empirical-fisher")), default="ggn-xdiag",
              show_default=True, help="OBD's curvature diagonal: the GGN's by XDiag (--budget products) or the exact "
                                      "empirical Fisher's (--fisher-samples per-sample gradients; large models).")
@click.option("--fisher-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Per-sample gradients in WoodFisher's empirical Fisher (and OBD's, with --obd-diagonal empirical-fisher).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of training (examples) and probes.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [examples: 1].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("hesse-prune-report"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing hesse report in --out.")
@click.option("--no-progress", "quiet", is_flag=True, help="Silence the stage messages.")
@click.option("--json-only", is_flag=True, help="Write report.json only.")
def prune(methods: str, sparsity: str, nm: str | None, **options: Any) -> None:
    """Prune a model with each method at each sparsity (one shot) and report loss and accuracy.

    \b
    Examples:
      hesse prune --example digits --sparsity 0.5,0.7,0.9 --nm 2:4 --out prune-report
      hesse prune --model net.py:make_net --checkpoint net.pt --data digits --method magnitude,layerwise
    """
    with one_line_errors():
        request = PruneRequest(methods=parse_methods(methods), targets=parse_targets(sparsity, nm), **options)
        _prune(request)


def _prune(request: PruneRequest) -> None:
    """Build the objective, run every method at every target, write the report."""
    problem = load_problem(request)
    objective = _objective(problem, request)
    dense = _evaluate(objective, None)
    results = []
    for method in request.methods:
        for target in request.targets:
            stage(f"{method} at {target.get('nm') or target['sparsity']}", request.quiet)
            results.append(_run_one(objective, method, target, request))
    report = {
        "schema": SCHEMA, "kind": "prune", "command": shlex.join(["hesse", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in request.__dict__.items()},
        "model": problem.info.get("model"), "data": problem.info.get("data"), "num_samples": objective.num_samples,
        "dense": dense, "results": results,
    }
    files = {REPORT_JSON: json.dumps(report, indent=1, allow_nan=False)}
    if not request.json_only:
        files[INDEX_HTML] = render_prune_report(report)
    write_report_folder(request.out, files, request.overwrite)
    for row in results:
        click.echo(f"{row['method']:<10} {row['target']:<14} sparsity {row['sparsity']:.3f}  loss {row['loss']:.4g}"
                   + (f"  accuracy {row['accuracy']:.4f}" if row["accuracy"] is not None else ""))
    click.echo(f"report written to {request.out / (REPORT_JSON if request.json_only else INDEX_HTML)}")


def _objective(problem: Any, request: PruneRequest) -> Objective:
    """The objective of the problem on its (first ``--max-samples``) data with ``--loss``."""
    data = problem_data(problem, request.loss, request.batch_size, request.max_samples)
    params = list(request.param_globs) or problem.params
    try:
        return Objective(problem.model, problem.criterion, data, forward=problem.forward, params=params)
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"setting up the model and data failed: {describe(error)}") from error


def _run_one(objective: Objective, method: str, target: dict[str, Any], request: PruneRequest) -> dict[str, Any]:
    """One method at one target: its summary with the pruned model's loss and accuracy."""
    params = list(request.param_globs) or None
    common = dict(params=params, **target)
    scoped = dict(common, scope=request.scope)
    started = time.perf_counter()
    try:
        result = {
            "magnitude": lambda: prune_magnitude(objective, **scoped),
            "obd": lambda: prune_obd(objective, method="xdiag", budget=request.budget, seed=request.seed, **scoped)
            if request.obd_diagonal == "ggn-xdiag" else
            prune_obd(objective, curvature="empirical-fisher", fisher_samples=request.fisher_samples, **scoped),
            "woodfisher": lambda: prune_woodfisher(objective, fisher_samples=request.fisher_samples, **scoped),
            "layerwise": lambda: prune_layerwise_obs(objective, progress=not request.quiet and stderr_is_terminal(),
                                                     **common),
        }[method]()
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"{method} pruning failed: {describe(error)}") from error
    summary = result.to_dict()
    summary.update(_evaluate(objective, result.pruned_values(objective)), method=method,
                   seconds=time.perf_counter() - started)
    return summary


def _evaluate(objective: Objective, values: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    evaluation = objective.evaluate(at=values)
    return {"loss": evaluation.loss, "accuracy": evaluation.accuracy}


# ---- the page ------------------------------------------------------------------------------------
def sparsity_plot(report: dict) -> str:
    """Base64 PNG: accuracy (or loss) against achieved sparsity, one line per method."""
    import base64
    import io

    from hesse.plotting import new_figure

    metric = "accuracy" if report["dense"]["accuracy"] is not None else "loss"
    fig = new_figure((6.4, 3.6), dpi=110)
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in report["results"]):
        rows = [r for r in report["results"] if r["method"] == method]
        unstructured = sorted((r["sparsity"], r[metric]) for r in rows if ":" not in r["target"])
        line = ax.plot(*zip(*unstructured), marker="o", label=method) if unstructured else None
        for r in (r for r in rows if ":" in r["target"]):
            ax.plot([r["sparsity"]], [r[metric]], marker="s", ls="", color=line[0].get_color() if line else None,
                    label=f"{method} {r['target']}")
    ax.axhline(report["dense"][metric], color="grey", ls="--", lw=1, label="dense")
    ax.set(xlabel="sparsity (fraction of pruned weights removed)", ylabel=metric, title=f"{metric} after one-shot pruning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def render_prune_report(report: dict) -> str:
    """``index.html``: the summary table, the plot and the per-layer sparsity table."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r['method'])}</td><td>{esc(r['target'])}</td><td>{r['sparsity']:.4f}</td>"
        f"<td>{r['loss']:.4g}</td><td>{_number(r['accuracy'])}</td>"
        f"<td>{r['seconds']:.2f}</td></tr>" for r in report["results"])
    layers = list(report["results"][0]["layer_sparsity"]) if report["results"] else []
    heads = "".join(f"<th>{esc(r['method'])}<br>{esc(r['target'])}</th>" for r in report["results"])
    layer_rows = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{r['layer_sparsity'].get(name, 0.0):.3f}</td>"
                                              for r in report["results"]) + "</tr>" for name in layers)
    notes = sorted({w for r in report["results"] for w in r["warnings"]})
    dense = report["dense"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>hesse prune report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>Pruning report</h1><p>{esc(str(report['model']))}<br>{esc(str(report['data']))}<br>"
        f"<code>{esc(report['command'])}</code></p>"
        f"<p>Dense model: loss {dense['loss']:.4g}"
        + (f", accuracy {dense['accuracy']:.4f}" if dense["accuracy"] is not None else "") + "</p>"
        f"<img src='data:image/png;base64,{sparsity_plot(report)}' alt='accuracy against sparsity'>"
        "<h2>Results (one shot, no fine-tuning)</h2><table><tr><th>method</th><th>target</th><th>sparsity</th>"
        f"<th>loss</th><th>accuracy</th><th>seconds</th></tr>{rows}</table>"
        f"<h2>Sparsity per layer</h2><table><tr><th>tensor</th>{heads}</tr>{layer_rows}</table>"
        + (("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>") if notes else "")
        + "</body></html>"
    )
