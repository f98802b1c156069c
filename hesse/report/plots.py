"""The report's figures, drawn from the report dictionary and returned as base64 PNG.

Each ``*_figure`` function returns a ``matplotlib.figure.Figure`` (no pyplot); the
``*_plot`` functions encode it. Density and landscape use :mod:`hesse.plotting`, the
drawing code the library's own ``.plot()`` methods share.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from hesse.plotting import draw_density, draw_landscape, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGSIZE = (6.4, 3.6)
DPI = 110


def _png(fig: Figure) -> str:
    """The figure as a base64 PNG string."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _floats(values: Sequence[float | None]) -> np.ndarray:
    """A float array with ``None`` (JSON's missing numbers) as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def density_figure(density: dict, outliers: list[float], log: bool) -> Figure:
    """The SLQ spectral density (log y-axis if ``log``), outliers marked by dashed lines."""
    fig = new_figure(FIGSIZE, DPI)
    draw_density(fig.add_subplot(), _floats(density["grid"]), _floats(density["density"]),
                 outliers=outliers, log=log)
    fig.tight_layout()
    return fig


def density_plot(density: dict, outliers: list[float], log: bool) -> str:
    """:func:`density_figure` as a base64 PNG."""
    return _png(density_figure(density, outliers, log))


def top_eigenvalues_plot(values: list[float], converged: list[bool]) -> str:
    """:func:`top_eigenvalues_figure` as a base64 PNG."""
    return _png(top_eigenvalues_figure(values, converged))


def top_eigenvalues_figure(values: list[float], converged: list[bool]) -> Figure:
    """The top-k eigenvalues as a stem plot; hollow markers for unconverged ones."""
    heights = _floats(values)
    fig = new_figure(FIGSIZE, DPI)
    ax = fig.add_subplot()
    x = np.arange(1, len(heights) + 1)
    ax.vlines(x, 0, heights, color="C0", lw=1.5)
    for xi, value, ok in zip(x, heights, converged):
        ax.plot(xi, value, "o", color="C0", markerfacecolor="C0" if ok else "white")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x)
    ax.set_xlabel("rank i")
    ax.set_ylabel("eigenvalue λ_i")
    ax.set_title("top eigenvalues")
    ax.set_xlim(0.5, len(heights) + 0.5)
    _fit_y(ax, np.append(heights, 0.0))
    fig.tight_layout()
    return fig


def _fit_y(ax, values: np.ndarray, top_margin: float = 0.08) -> None:
    """Y-limits from the finite ``values`` with a small margin (none if nothing is finite)."""
    finite = values[np.isfinite(values)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        pad = (high - low) * top_margin or max(abs(high), 1.0) * top_margin
        ax.set_ylim(low - (pad if low < 0 else 0.0), high + pad)


def per_layer_plot(names: list[str], values: list[float], errors: list[float] | None, label: str) -> str:
    """:func:`per_layer_figure` as a base64 PNG."""
    return _png(per_layer_figure(names, values, errors, label))


def per_layer_figure(names: list[str], values: list[float], errors: list[float] | None, label: str) -> Figure:
    """Horizontal bars, one per block (first block at the top), with ±2 s.e. error bars if given."""
    fig = new_figure((FIGSIZE[0], max(2.4, 0.35 * len(names) + 1.2)), DPI)
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    widths = _floats(values)
    spans = np.zeros_like(widths) if errors is None else 2 * np.nan_to_num(_floats(errors), posinf=0.0)
    ax.barh(y, np.nan_to_num(widths), xerr=None if errors is None else spans, color="C1", capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.axvline(0, color="black", lw=0.6)
    ends = np.concatenate([[0.0], np.nan_to_num(widths) + spans, np.nan_to_num(widths) - spans])
    low, high = float(ends.min()), float(ends.max())
    pad = 0.05 * ((high - low) or 1.0)
    ax.set_xlim(low - (pad if low < 0 else 0.0), high + pad)
    ax.set_xlabel(label + ("" if errors is None else " (±2 s.e.)"))
    ax.set_title(f"{label}, by block (rank 1 at the top)")
    fig.tight_layout()
    return fig


def _stability_groups(stability: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(label, measured, threshold, standard error) for the GD check, and the SGD check unless full batch."""
    gd = ("GD: λ_max vs (2+2β)/lr", stability["top_eigenvalue"], stability["gd_threshold"], None)
    if stability.get("full_batch"):
        return [gd]
    B = stability.get("batch_size") or 1
    sgd_stderr = stability["trace_stderr"]
    if B == 1:
        sgd = ("SGD (B=1): trace vs 2/lr", stability.get("sgd_quantity", stability["trace"]), sgd_stderr)
    else:
        sgd = (f"SGD (B={B}): tr/B + (1−1/B)λ₁ vs 2/lr", stability.get("sgd_quantity"),
               None if sgd_stderr is None else sgd_stderr / B)
    return [gd, (sgd[0], sgd[1], stability["sgd_threshold"], sgd[2])]


def stability_plot(stability: dict) -> str:
    """:func:`stability_figure` as a base64 PNG."""
    return _png(stability_figure(stability))


def stability_figure(stability: dict) -> Figure:
    """Bar pairs: λ_max vs (2+2 momentum)/lr (GD) and, unless full batch, tr/B + (1−1/B)λ₁ vs 2/lr (SGD at B)."""
    groups = _stability_groups(stability)
    fig = new_figure(FIGSIZE, DPI)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    measured = _floats([g[1] for g in groups])
    thresholds = _floats([g[2] for g in groups])
    errors = _floats([0.0 if g[3] is None else 2 * g[3] for g in groups])
    ax.bar(x - 0.2, measured, 0.4, yerr=errors, capsize=3, label="measured (±2 s.e.)", color="C0")
    ax.bar(x + 0.2, thresholds, 0.4, label=f"threshold (lr={stability['lr']:g})", color="C7")
    ax.set_xticks(x)
    ax.set_xticklabels([g[0] for g in groups])
    ax.set_ylabel("value")
    ax.set_title("stability at the given learning rate")
    tops = np.concatenate([measured + np.nan_to_num(errors), thresholds])
    if np.isfinite(tops).any() and np.nanmax(tops) > 0:
        lows = np.concatenate([measured - np.nan_to_num(errors), [0.0]])
        ax.set_ylim(1.1 * np.nanmin(lows), 1.3 * np.nanmax(tops))  # headroom for the legend
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def landscape_plot(landscape: dict) -> str:
    """:func:`landscape_figure` as a base64 PNG."""
    return _png(landscape_figure(landscape))


def landscape_figure(landscape: dict) -> Figure:
    """Contour lines of the loss over the 2-D plane through the weights (marked +)."""
    fig = new_figure((5.2, 4.4), DPI)
    draw_landscape(fig, _floats(landscape["alphas"]), _floats(landscape["betas"]),
                   np.array([_floats(row) for row in landscape["loss"]]), kind="contour",
                   title="loss landscape (random filter-normalised directions)",
                   labels=("direction 1", "direction 2"))
    fig.tight_layout()
    return fig
