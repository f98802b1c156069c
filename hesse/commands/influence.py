"""``hesse influence``: which training examples drove chosen predictions, and which look mislabeled.

The model and data options are those of ``hesse analyze`` (its helpers are reused). The data
(after ``--max-samples``) is the training set; the queries are samples of it chosen with
``--queries`` (default: the highest-loss ones), and each query is left out of its own ranking.
Scores follow :mod:`hesse.apply.influence` (positive: the training example helps the query;
removing it would raise the query loss). Writes ``report.json`` and ``index.html`` (the top
helpful and harmful examples of each query, shown as images for image data and as values
otherwise, and the self-influence ranking with a plot) atomically; a problem the user can
fix is one ``error:`` line and exit status 2; Ctrl-C writes nothing and exits with 130.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from hesse.apply.influence import CURVATURES, METHODS, _take_range, pairwise, preconditioner, self_influence
from hesse.cli import LOSSES, CliError, FiniteFloatRange, describe
from hesse.commands._shared import ProblemRequest, load_problem, model_and_data_options, one_line_errors, problem_data, stage
from hesse.errors import HesseError
from hesse.operators import Objective
from hesse.operators.data import DataSource, default_num_samples
from hesse.report.document import SCHEMA
from hesse.report.folder import INDEX_HTML, REPORT_JSON, write_report_folder


@dataclass(kw_only=True)
class InfluenceRequest(ProblemRequest):
    """What ``hesse influence`` is asked to do."""

    method: str
    curvature: str
    damping: float
    queries: tuple[int, ...] | None
    top: int


def parse_queries(text: str | None) -> tuple[int, ...] | None:
    """The ``--queries`` comma list of sample indices (``None``: choose the highest-loss samples)."""
    if not text:
        return None
    try:
        indices = tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise CliError(f"--queries: {text!r} is not a comma list of sample indices like 0,17,42.") from None
    if not indices or min(indices) < 0:
        raise CliError(f"--queries: give sample indices >= 0, got {text!r}.")
    return indices


@click.command()
@model_and_data_options
@click.option("--max-samples", type=click.IntRange(min=1), help="Use only the first N samples as training set [all].")
@click.option("--params", "param_globs", multiple=True, metavar="GLOB",
              help="Differentiate only these tensors (names or globs; repeatable) [all trainable].")
@click.option("--loss", type=click.Choice(tuple(LOSSES)), default="cross_entropy", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="ekfac", show_default=True,
              help="Inverse curvature: identity (gradient dot products), exact, cg, lissa, arnoldi, kfac, ekfac.")
@click.option("--curvature", type=click.Choice(CURVATURES), default="ggn", show_default=True)
@click.option("--damping", type=FiniteFloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="Damping relative to the mean eigenvalue tr(C)/P.")
@click.option("--queries", "query_text", metavar="I,J,...", help="Sample indices to explain [the 4 highest-loss samples].")
@click.option("--top", type=click.IntRange(min=1, max=50), default=6, show_default=True,
              help="Training examples shown per query and per ranking.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of training (examples) and estimators.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [examples: 1].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("hesse-influence-report"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing hesse report in --out.")
@click.option("--no-progress", "quiet", is_flag=True, help="Silence the stage messages.")
@click.option("--json-only", is_flag=True, help="Write report.json only.")
def influence(query_text: str | None, **options: Any) -> None:
    """Rank training examples by their influence on chosen predictions, and by self-influence.

    \b
    Examples:
      hesse influence --example digits --method ekfac --out influence-report
      hesse influence --model net.py:make_net --checkpoint net.pt --data digits --queries 3,10 --method cg
    """
    with one_line_errors():
        _influence(InfluenceRequest(queries=parse_queries(query_text), **options))


def _influence(request: InfluenceRequest) -> None:
    """Build the objective, score the queries and the self-influence, write the report."""
    problem = load_problem(request)
    objective, samples = _objective(problem, request)
    queries = _choose_queries(objective, samples, request)
    started = time.perf_counter()
    try:
        stage(f"{request.method} inverse of the {request.curvature} curvature", request.quiet)
        inverse = preconditioner(objective, request.method, request.damping, curvature=request.curvature,
                                 seed=request.seed)
        stage(f"self-influence of {len(samples)} training examples", request.quiet)
        selfs = self_influence(objective, inverse=inverse)
        stage(f"influence on {len(queries)} queries", request.quiet)
        scores = pairwise(objective, query_data=[_stack([samples[i] for i in queries])], inverse=inverse)
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"influence scores failed: {describe(error)}") from error
    report = _report(problem, objective, request, samples, queries, scores, selfs, time.perf_counter() - started)
    files = {REPORT_JSON: json.dumps(report, indent=1, allow_nan=False)}
    if not request.json_only:
        files[INDEX_HTML] = render_influence_report(report, samples)
    write_report_folder(request.out, files, request.overwrite)
    click.echo(f"report written to {request.out / (REPORT_JSON if request.json_only else INDEX_HTML)}")


def _objective(problem: Any, request: InfluenceRequest) -> tuple[Objective, list[Any]]:
    """The training objective on the (first ``--max-samples``) data, and its samples one by one."""
    data = problem_data(problem, request.loss, request.batch_size, request.max_samples)
    params = list(request.param_globs) or problem.params
    try:
        objective = Objective(problem.model, problem.criterion, data, forward=problem.forward, params=params)
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"setting up the model and data failed: {describe(error)}") from error
    samples = [_take_range(batch, i, i + 1) for batch in DataSource(data) for i in range(default_num_samples(batch))]
    return objective, samples


def _stack(samples: list[Any]) -> Any:
    """One batch from single-sample batches (tensors concatenated along the leading dimension)."""
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(samples)
    if isinstance(first, dict):
        return {k: _stack([s[k] for s in samples]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([s[i] for s in samples]) for i in range(len(first)))
    return first


def _sample_losses(objective: Objective, samples: list[Any]) -> list[float]:
    """The loss of every sample alone (one forward each)."""
    values = objective.values()
    with torch.no_grad():
        return [float(objective.batch_loss(values, s)) for s in samples]


def _choose_queries(objective: Objective, samples: list[Any], request: InfluenceRequest) -> list[int]:
    """``--queries`` (checked against the data size) or the 4 highest-loss samples."""
    if request.queries is None:
        losses = _sample_losses(objective, samples)
        return sorted(range(len(samples)), key=lambda i: -losses[i])[:4]
    bad = [i for i in request.queries if i >= len(samples)]
    if bad:
        raise CliError(f"--queries: {bad} out of range; the training data has {len(samples)} samples (0-{len(samples) - 1}).")
    return list(request.queries)


def _describe_sample(objective: Objective, sample: Any) -> dict[str, Any]:
    """Label, prediction and loss of one sample (label/prediction for classification only)."""
    values = objective.values()
    with torch.no_grad():
        output, target = objective.call_model(values, sample)
        loss = float(objective.criterion_loss(output, target))
    classified = isinstance(target, torch.Tensor) and not target.is_floating_point() and target.numel() == 1
    return {"label": int(target) if classified else None,
            "prediction": int(output.argmax(-1).reshape(-1)[0]) if classified else None, "loss": loss}


def _report(problem: Any, objective: Objective, request: InfluenceRequest, samples: list[Any], queries: list[int],
            scores: torch.Tensor, selfs: torch.Tensor, seconds: float) -> dict[str, Any]:
    """``report.json``: per query its top helpful and harmful training examples, and the self-influence ranking."""
    info = lambda i: {"index": i, **_describe_sample(objective, samples[i])}  # noqa: E731
    rows = []
    for q, row in zip(queries, scores):
        row = row.clone()
        row[q] = float("nan")  # a query is not explained by itself
        order = [i for i in torch.argsort(torch.nan_to_num(row, nan=0.0), descending=True).tolist() if i != q]
        rows.append({"query": info(q),
                     "helpful": [{**info(i), "score": float(row[i])} for i in order[:request.top]],
                     "harmful": [{**info(i), "score": float(row[i])} for i in order[::-1][:request.top]]})
    ranking = torch.argsort(selfs, descending=True).tolist()
    return {
        "schema": SCHEMA, "kind": "influence", "command": shlex.join(["hesse", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in request.__dict__.items()},
        "model": problem.info.get("model"), "data": problem.info.get("data"), "num_samples": len(samples),
        "seconds": seconds, "queries": rows,
        "self_influence": {"values": [float(v) for v in selfs],
                           "top": [{**info(i), "score": float(selfs[i])} for i in ranking[:2 * request.top]]},
    }


# ---- the page ------------------------------------------------------------------------------------
def sample_image(sample: Any) -> torch.Tensor | None:
    """A 2-D grey image of a sample's input, or ``None`` when it is not image-like.

    The input is the first tensor of a ``(inputs, targets)`` batch: ``[1, H, W]`` or ``[1, C, H, W]``
    with ``H, W >= 4`` (channels averaged), or a flat vector of a square length >= 16.
    """
    x = sample[0] if isinstance(sample, (tuple, list)) else sample
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    x = x[0].detach().float().cpu()
    if x.ndim == 3:
        x = x.mean(0)
    side = math.isqrt(x.numel()) if x.ndim == 1 else 0
    if x.ndim == 1 and side * side == x.numel() and side >= 4:
        x = x.reshape(side, side)
    return x if x.ndim == 2 and min(x.shape) >= 4 else None


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _caption(entry: dict[str, Any]) -> str:
    label = f"#{entry['index']}" + (f" y={entry['label']}" if entry["label"] is not None else "")
    return label + (f"\n{entry['score']:+.3g}" if "score" in entry else "")


def image_strip(entries: list[dict[str, Any]], samples: list[Any], title: str) -> str | None:
    """Base64 PNG: the samples of ``entries`` side by side with index, label and score; ``None`` for non-images."""
    from hesse.plotting import new_figure

    images = [sample_image(samples[e["index"]]) for e in entries]
    if not images or any(img is None for img in images):
        return None
    fig = new_figure((1.1 * len(images) + 0.4, 2.1), dpi=100)
    for k, (entry, img) in enumerate(zip(entries, images)):
        ax = fig.add_subplot(1, len(images), k + 1)
        ax.imshow(img.numpy(), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(_caption(entry), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return _png(fig)


def self_influence_plot(values: list[float]) -> str:
    """Base64 PNG: self-influence of every training example, sorted (log scale) and as a histogram."""
    import numpy as np

    from hesse.plotting import new_figure

    v = np.sort(np.asarray(values))[::-1]
    fig = new_figure((9.0, 3.2), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.plot(np.arange(1, len(v) + 1), np.clip(v, 1e-12, None))
    ax1.set(xlabel="rank", ylabel="self-influence", yscale="log", title="sorted self-influence")
    ax2.hist(np.log10(np.clip(v, 1e-12, None)), bins=40)
    ax2.set(xlabel="log10 self-influence", ylabel="training examples", title="distribution")
    fig.tight_layout()
    return _png(fig)


def _entries_html(entries: list[dict[str, Any]], samples: list[Any], title: str) -> str:
    """An image strip for image data, else a table of index, label, prediction, loss, score and values."""
    strip = image_strip(entries, samples, title)
    if strip is not None:
        return f"<img src='data:image/png;base64,{strip}' alt='{html.escape(title)}'>"
    rows = "".join(
        f"<tr><td>{e['index']}</td><td>{e['label']}</td><td>{e['prediction']}</td><td>{e['loss']:.3g}</td>"
        f"<td>{e.get('score', float('nan')):+.4g}</td><td><code>{html.escape(_sample_text(samples[e['index']]))}</code></td></tr>"
        for e in entries)
    return (f"<p>{html.escape(title)}</p><table><tr><th>index</th><th>label</th><th>prediction</th><th>loss</th>"
            f"<th>score</th><th>sample</th></tr>{rows}</table>")


def _sample_text(sample: Any) -> str:
    x = sample[0] if isinstance(sample, (tuple, list)) else sample
    if isinstance(x, dict):
        x = next(iter(x.values()))
    values = x.reshape(-1)[:12].tolist() if isinstance(x, torch.Tensor) else [x]
    return " ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values) + " ..."


def render_influence_report(report: dict, samples: list[Any]) -> str:
    """``index.html``: per query its top helpful/harmful training examples; the self-influence ranking and plot."""
    esc = html.escape
    s = report["settings"]
    parts = []
    for row in report["queries"]:
        q = row["query"]
        head = (f"Query #{q['index']}" + (f": label {q['label']}, predicted {q['prediction']}" if q["label"] is not None
                                          else "") + f", loss {q['loss']:.3g}")
        parts.append(f"<h3>{esc(head)}</h3><div class='row'><div class='strip'>{_entries_html([q], samples, 'query')}</div>"
                     f"<div>{_entries_html(row['helpful'], samples, 'most helpful (removing raises the query loss)')}</div>"
                     f"<div>{_entries_html(row['harmful'], samples, 'most harmful (removing lowers the query loss)')}</div></div>")
    top = report["self_influence"]["top"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>hesse influence report</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}.row{display:flex;gap:16px;align-items:flex-end;flex-wrap:wrap}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd}table{border-collapse:collapse}img{display:block;margin:4px 0;max-width:100%}"
        ".strip img{max-width:160px}</style></head><body>"
        f"<h1>Influence report</h1><p>{esc(str(report['model']))}<br>{esc(str(report['data']))}<br>"
        f"<code>{esc(report['command'])}</code></p>"
        f"<p>Method <b>{esc(s['method'])}</b> on the {esc(s['curvature'])} curvature, damping {s['damping']:g} "
        f"× mean eigenvalue; {report['num_samples']} training examples; {report['seconds']:.1f} s. "
        "Score of training example z for query q: g<sub>q</sub><sup>T</sup> (C + λI)<sup>-1</sup> g<sub>z</sub>; "
        "positive = z helps q (removing it would raise the query loss); a query is left out of its own ranking.</p>"
        "<h2>Queries</h2>" + "".join(parts)
        + "<h2>Self-influence</h2><p>g<sub>z</sub><sup>T</sup> (C + λI)<sup>-1</sup> g<sub>z</sub>: high for "
        "examples the model bends towards (atypical or mislabeled). The highest:</p>"
        + _entries_html(top, samples, "highest self-influence")
        + f"<img src='data:image/png;base64,{self_influence_plot(report['self_influence']['values'])}' "
        "alt='self-influence distribution'></body></html>"
    )
