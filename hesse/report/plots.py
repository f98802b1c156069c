"""The report's figures, drawn from the report dictionary and returned as base64 PNG."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGSIZE = (6.4, 3.6)


def _png(draw: Callable[[plt.Axes], None], figsize: tuple[float, float] = FIGSIZE) -> str:
    """Draw on a fresh figure and return it as a base64 PNG string."""
    fig, ax = plt.subplots(figsize=figsize, dpi=110)
    try:
        draw(ax)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def density_plot(density: dict, outliers: list[float], log: bool) -> str:
    """The SLQ spectral density (log y-axis if ``log``), outliers marked by dashed lines."""
    grid, values = _floats(density["grid"]), _floats(density["density"])

    def draw(ax: plt.Axes) -> None:
        ax.plot(grid, values, lw=1.3, color="C0")
        ax.fill_between(grid, values, alpha=0.15, color="C0")
        positive = values[values > 0]
        if log and positive.size:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(positive.min(), positive.max() * 1e-8), top=positive.max() * 3)
        for value in outliers:
            ax.axvline(value, color="C3", lw=0.8, ls="--")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)" if log else "density")
        ax.set_title("spectral density" + (" (log scale)" if log else ""))

    return _png(draw)


def top_eigenvalues_plot(values: list[float], converged: list[bool]) -> str:
    """The top-k eigenvalues as a stem plot; hollow markers for unconverged ones."""
    heights = _floats(values)

    def draw(ax: plt.Axes) -> None:
        x = np.arange(1, len(heights) + 1)
        ax.vlines(x, 0, heights, color="C0", lw=1.5)
        for xi, value, ok in zip(x, heights, converged):
            ax.plot(xi, value, "o", color="C0", markerfacecolor="C0" if ok else "white")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x)
        ax.set_xlabel("rank i")
        ax.set_ylabel("eigenvalue λ_i")
        ax.set_title("top eigenvalues")

    return _png(draw)


def per_layer_plot(names: list[str], values: list[float], errors: list[float] | None, label: str) -> str:
    """Horizontal bars, one per block (first block at the top), with optional error bars."""
    height = max(2.4, 0.35 * len(names) + 1.2)

    def draw(ax: plt.Axes) -> None:
        y = np.arange(len(names))[::-1]
        ax.barh(y, _floats(values), xerr=None if errors is None else _floats(errors), color="C1", capsize=3)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=8)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_xlabel(label)
        ax.set_title(f"{label} per block")

    return _png(draw, (FIGSIZE[0], height))


def stability_plot(stability: dict) -> str:
    """Two bar pairs: λ_max vs (2+2 momentum)/lr (GD) and tr/B + (1−1/B)λ₁ vs 2/lr (SGD at batch size B)."""
    B = stability.get("batch_size", 1)
    sgd_stderr = stability["trace_stderr"]
    if B == 1:
        sgd = ("SGD (B=1): trace vs 2/lr", stability.get("sgd_quantity", stability["trace"]), sgd_stderr)
    else:
        sgd = (f"SGD (B={B}): tr/B + (1−1/B)λ₁ vs 2/lr", stability.get("sgd_quantity"),
               None if sgd_stderr is None else sgd_stderr / B)

    def draw(ax: plt.Axes) -> None:
        groups = [
            ("GD: λ_max vs (2+2β)/lr", stability["top_eigenvalue"], stability["gd_threshold"], None),
            (sgd[0], sgd[1], stability["sgd_threshold"], sgd[2]),
        ]
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

    return _png(draw)


def landscape_plot(landscape: dict) -> str:
    """Contour lines of the loss over the 2-D plane through the weights (marked +)."""
    alphas, betas = _floats(landscape["alphas"]), _floats(landscape["betas"])
    loss = np.array([_floats(row) for row in landscape["loss"]])

    def draw(ax: plt.Axes) -> None:
        A, B = np.meshgrid(alphas, betas, indexing="ij")
        contours = ax.contour(A, B, loss, levels=20, cmap="viridis")
        ax.clabel(contours, fontsize=7)
        ax.plot([0], [0], "k+", markersize=10)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_title("loss landscape (random filter-normalised directions)")

    return _png(draw, (5.2, 4.4))
