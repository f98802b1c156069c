"""The report dictionary written to ``report.json``: every number, the settings and versions."""

from __future__ import annotations

import datetime
import math
import platform
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import hesse
from hesse.report.analyses import AnalysisRun, outlier_summary
from hesse.report.interpret import interpret
from hesse.results import to_jsonable

SCHEMA = "hesse-report/1"


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: replace them by ``null`` (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def versions() -> dict[str, str]:
    """Versions of hesse, its main dependencies, Python and the platform."""
    return {
        "hesse": hesse.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def build_report(
    *,
    command: str,
    settings: dict,
    model_info: dict,
    data_info: dict,
    curvature: dict,
    loss: float,
    gradient_norm: float,
    run: AnalysisRun,
    setup_seconds: dict[str, float],
    training: dict | None = None,
) -> dict:
    """Assemble the JSON-ready report, including the plain-language interpretation.

    ``complete`` is false when Ctrl-C stopped the run; ``interrupted`` then names the
    analysis it stopped, and ``results`` holds the analyses that finished before it.
    """
    results = {name.replace("-", "_"): to_jsonable(result) for name, result in run.results.items()}
    timings = {**setup_seconds, **run.seconds}
    report = {
        "schema": SCHEMA,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "complete": run.complete,
        "interrupted": run.interrupted,
        "versions": versions(),
        "settings": settings,
        "model": model_info,
        "data": data_info,
        "training": training,
        "curvature": curvature,
        "loss": loss,
        "gradient_norm": gradient_norm,
        "results": results,
        "outliers": outlier_summary(run),
        "timings_s": {**timings, "total": sum(timings.values())},
        "matvecs": {**run.matvecs, "total": sum(run.matvecs.values())},
        "warnings": list(run.warnings),
    }
    report = _finite_or_none(to_jsonable(report))
    report["interpretation"] = interpret(report)
    return report


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """Key numbers as (label, value) rows, for the terminal and the HTML summary."""
    def g(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.5g}"

    results = report["results"]
    rows = [
        ("model", report["model"]["description"]),
        ("parameters", f"{report['model']['num_parameters']:,}"),
        ("samples", f"{report['data']['num_samples']:,}"),
        ("curvature", report["curvature"]["kind"]),
        ("loss", g(report["loss"])),
    ]
    if report.get("training"):
        t = report["training"]
        rows.append(("training", f"{t['optimizer']} lr={t['lr']:g}, batch {t['batch_size']}, {t['epochs']} epochs: "
                                 f"train accuracy {100 * t['train_accuracy']:.1f}%"))
    if "eigenvalues" in results:
        values = results["eigenvalues"]["values"]
        rows.append(("top eigenvalues", ", ".join(g(v) for v in values)))
    if "trace" in results:
        rows.append(("trace", f"{g(results['trace']['estimate'])} ± {g(results['trace']['stderr'])}"))
    if report.get("outliers"):
        rows.extend(outlier_rows(report["outliers"]))
    if "per_layer" in results and results["per_layer"].get("ranking"):
        rows.append(("highest curvature per parameter", top_layer(results["per_layer"])))
    if "stability" in results:
        rows.extend(_stability_rows(report, g))
    if "sharpness" in results:
        rows.append(("sharpness (worst / average)",
                     f"{g(results['sharpness']['worst']['value'])} / {g(results['sharpness']['average']['value'])}"))
    rows.append(("products / seconds", f"{report['matvecs']['total']} / {report['timings_s']['total']:.1f}"))
    return rows


def _stability_rows(report: dict, g: Callable[[float | None], str]) -> list[tuple[str, str]]:
    """The GD verdict (full batch: "full-batch GD assumed" when no batch size was given) and the SGD one."""
    st = report["results"]["stability"]
    assumed = (report.get("settings") or {}).get("train_batch_size_source") == "assumed"
    if st.get("full_batch"):
        label = f"GD stability (lr={st['lr']:g}, {'full-batch GD assumed' if assumed else 'full batch'})"
        return [(label, f"λ₁/threshold = {g(st['gd_ratio'])}: {st['gd_verdict'].split(':')[0]}")]
    B = st.get("batch_size") or 1
    quantity = "trace" if B == 1 else "(tr/B + (1−1/B)λ₁)"
    return [(f"GD stability (lr={st['lr']:g})", f"λ₁/threshold = {g(st['gd_ratio'])}: {st['gd_verdict'].split(':')[0]}"),
            (f"SGD stability (lr={st['lr']:g}, B={B})",
             f"{quantity}/(2/lr) = {g(st['sgd_ratio'])}: {st['sgd_verdict'].split(':')[0]}")]


def outlier_rows(outliers: dict) -> list[tuple[str, str]]:
    """``count (λ_k/λ_k+1 = ratio, share of the trace)``, or the reason no count stands out; the
    bulk edge only when there is one."""
    count = outliers["num_outliers"]
    if not count:
        return [("outliers above the bulk", f"0 ({outliers['reason']})")]
    share = outliers.get("trace_share")
    details = [f"λ_k/λ_k+1 = {outliers['gap_ratio']:.3g}"] + ([] if share is None else [f"{100 * share:.0f}% of the trace"])
    rows = [("outliers above the bulk", f"{count} ({', '.join(details)})")]
    if outliers.get("bulk_edge") is not None:
        rows.append(("bulk edge (largest bulk eigenvalue)", f"{outliers['bulk_edge']:.5g}"))
    return rows


def top_layer(layers: dict) -> str:
    """``block (Tr/n ± s.e.)`` of the first block of the per-parameter ranking, and the block it
    cannot be told apart from, if any."""
    first = layers["ranking"][0]
    tpp, se = layers["trace_per_parameter"][first], layers["trace_per_parameter_stderr"][first]
    if tpp is None:
        return f"{first} (n/a)"
    text = f"{first} ({tpp:.3g} ± {se:.2g})" if se is not None else f"{first} ({tpp:.3g})"
    tied = [b for a, b in layers.get("indistinguishable") or [] if a == first]
    return text + (f" (not distinguishable from {tied[0]})" if tied else "")
