"""The self-contained ``index.html``: figures embedded as base64 PNG next to their explanation."""

from __future__ import annotations

import html
import json

from hesse.report import plots

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
.figures { display: flex; flex-wrap: wrap; gap: 0.5rem; } .figures img { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9rem; } td, th { padding: 0.2rem 0.7rem; text-align: left;
       border-bottom: 1px solid #eee; } .muted { color: #777; font-size: 0.85rem; }
.warning { color: #8a4b00; }
.incomplete { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6rem; font-weight: bold; } pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
"""

TITLES = {
    "eigenvalues": "Top eigenvalues (sharpness)",
    "trace": "Trace",
    "density": "Spectral density",
    "per_layer": "Per-layer curvature",
    "stability": "Stability at the learning rate",
    "landscape": "Loss landscape",
    "sharpness": "Perturbation sharpness",
}


def _img(png: str, alt: str) -> str:
    """An ``<img>`` tag embedding a base64 PNG."""
    return f'<img src="data:image/png;base64,{png}" alt="{html.escape(alt)}">'


def figures(report: dict) -> dict[str, list[str]]:
    """The ``<img>`` tags of each section, drawn from the report's numbers."""
    results = report["results"]
    out: dict[str, list[str]] = {}
    if "eigenvalues" in results:
        eig = results["eigenvalues"]
        out["eigenvalues"] = [_img(plots.top_eigenvalues_plot(eig["values"], eig["converged"]), "top eigenvalues")]
    if "density" in results:
        outliers = (report.get("outliers") or {}).get("outliers", [])
        out["density"] = [
            _img(plots.density_plot(results["density"], outliers, log=False), "spectral density"),
            _img(plots.density_plot(results["density"], outliers, log=True), "spectral density, log scale"),
        ]
    if "per_layer" in results:
        layers = results["per_layer"]
        names = layers.get("ranking") or layers["names"]
        out["per_layer"] = [
            _img(plots.per_layer_plot(names, [layers["trace_per_parameter"][n] for n in names],
                                      [layers["trace_per_parameter_stderr"][n] for n in names],
                                      "trace per parameter Tr/n"), "per-layer trace per parameter"),
            _img(plots.per_layer_plot(names, [layers["trace"][n] for n in names],
                                      [layers["trace_stderr"][n] for n in names], "trace"), "per-layer trace"),
        ]
    if "stability" in results:
        out["stability"] = [_img(plots.stability_plot(results["stability"]), "stability comparison")]
    if "landscape" in results:
        out["landscape"] = [_img(plots.landscape_plot(results["landscape"]), "loss landscape")]
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    """A two-column table of (label, value) rows."""
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


PER_LAYER_HEAD = ("rank", "block", "size", "trace ± s.e.", "trace per parameter ± s.e.", "top eigenvalue",
                  "trace method")


def _per_layer_table(layers: dict) -> str:
    """One row per block in ranking order (trace per parameter): ``=`` marks a rank not resolved
    from the next one's (within 2 standard errors)."""
    names = layers.get("ranking") or layers["names"]
    tied = {a for a, _ in layers.get("indistinguishable") or []}
    tpp, tpp_se = layers.get("trace_per_parameter") or {}, layers.get("trace_per_parameter_stderr") or {}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in PER_LAYER_HEAD)
    body = "".join(
        f"<tr><td>{i + 1}{'=' if n in tied else ''}</td><td>{html.escape(n)}</td><td>{layers['sizes'][n]:,}</td>"
        f"<td>{_num(layers['trace'][n])} ± {_num(layers['trace_stderr'][n], 2)}</td>"
        f"<td>{_num(tpp.get(n), 4)} ± {_num(tpp_se.get(n), 2)}</td>"
        f"<td>{_num(layers['top_eigenvalue'][n])}{'' if (layers.get('eigen_converged') or {}).get(n, True) else ' (unconverged)'}</td>"
        f"<td>{html.escape(str(layers['trace_method'].get(n, 'n/a')))}</td></tr>"
        for i, n in enumerate(names)
    )
    note = ("<p class='muted'>= : not distinguishable from the next block within 2 standard errors; "
            f"the traces aim at {100 * layers.get('rtol', 0.02):g}% accuracy (95% confidence).</p>")
    return f"<table><tr>{head}</tr>{body}</table>{note}"


def _num(x: float | None, digits: int = 5) -> str:
    """A number to ``digits`` significant digits, ``n/a`` for a missing one."""
    return "n/a" if x is None else f"{x:.{digits}g}"


def _incomplete_banner(report: dict) -> str:
    """A banner naming the analysis Ctrl-C stopped; empty for a complete report."""
    if report.get("complete", True):
        return ""
    return (f"<p class='incomplete'>Incomplete: interrupted during {html.escape(str(report['interrupted']))}. "
            "Only the analyses that finished before it are shown.</p>")


def render(report: dict, summary_rows: list[tuple[str, str]]) -> str:
    """The complete HTML page for ``report`` (see :func:`hesse.report.document.build_report`)."""
    texts = report["interpretation"]
    images = figures(report)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>hesse report: {html.escape(report['model']['description'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Curvature report</h1>",
        _incomplete_banner(report),
        f"<p class='muted'>hesse {html.escape(report['versions']['hesse'])}, "
        f"{html.escape(report['created_utc'])}, seed {report['settings']['seed']}</p>",
        f"<p>{html.escape(texts['overview'])}</p>",
        "<h2>Summary</h2>", _table(summary_rows),
    ]
    for name, title in TITLES.items():
        if name not in report["results"]:
            continue
        parts.append(f"<h2>{title}</h2>")
        if name in images:
            parts.append(f"<div class='figures'>{''.join(images[name])}</div>")
        parts.append(f"<p>{html.escape(texts[name])}</p>")
        if name == "per_layer":
            parts.append(_per_layer_table(report["results"]["per_layer"]))
    if report["warnings"]:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"])
        parts.append(f"<h2>Warnings</h2><ul class='warning'>{items}</ul>")
    cost = [(name, f"{report['timings_s'][name]:.2f} s, {report['matvecs'].get(name, 0)} products")
            for name in report["timings_s"]]
    parts += [
        "<h2>Cost</h2>", _table(cost),
        "<h2>Settings</h2>",
        f"<pre>{html.escape(report['command'])}\n\n{html.escape(json.dumps(report['settings'], indent=2))}</pre>",
        "<p class='muted'>Every number on this page is in report.json next to this file.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)
