"""The drawing code of every density and landscape figure, for the library and the report.

A bottom-level module: it imports nothing from hesse at import time and matplotlib only
inside its functions, always through :class:`matplotlib.figure.Figure` (never ``pyplot``,
never ``matplotlib.use``), so drawing has no global side effects and works headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LANDSCAPE_KINDS = ("line", "contour", "surface")
LOG_DENSITY_RANGE = 1e-6  # a log-scale density is drawn down to this fraction of its peak
INSTALL_HINT = "pip install 'hesse[plot]'"


def require_matplotlib(what: str = "plotting") -> None:
    """Raise a :class:`hesse.HesseError` naming ``pip install 'hesse[plot]'`` if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        from hesse.errors import HesseError  # bottom-level too; imported only to raise

        raise HesseError(f"{what} needs matplotlib; install it with: {INSTALL_HINT}") from error


def new_figure(figsize: tuple[float, float], dpi: float | None = None) -> Figure:
    """A fresh ``Figure`` that belongs to no pyplot state (save it with ``fig.savefig``)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def density_limits(density: np.ndarray, log: bool) -> tuple[float, float] | None:
    """Y-limits that fit the curve: ``[0, 1.1 max]``, or on a log axis from the smallest
    positive value worth showing (at least :data:`LOG_DENSITY_RANGE` of the peak) to 1.5x
    the peak. ``None`` when nothing positive is finite."""
    values = np.asarray(density, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    if not positive.size:
        return None
    peak = float(positive.max())
    if log:
        return max(float(positive.min()), peak * LOG_DENSITY_RANGE), 1.5 * peak
    return 0.0, 1.1 * peak


def draw_density(ax: Axes, grid: Sequence[float], density: Sequence[float], *,
                 outliers: Sequence[float] = (), log: bool = False, title: str | None = None) -> None:
    """A spectral density on ``ax``: the curve, shaded, with dashed lines at ``outliers``.

    ``log`` uses a log y-axis (if any value is positive); the y-limits always fit the data
    (:func:`density_limits`).
    """
    x = np.asarray(grid, dtype=float)
    y = np.asarray(density, dtype=float)
    ax.plot(x, y, lw=1.3, color="C0")
    ax.fill_between(x, y, alpha=0.15, color="C0")
    limits = density_limits(y, log)
    if limits is not None:
        if log:
            ax.set_yscale("log")
        ax.set_ylim(*limits)
    for value in outliers:
        ax.axvline(value, color="C3", lw=0.8, ls="--")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log else "density")
    ax.set_title(title if title is not None else "spectral density" + (" (log scale)" if log else ""))


def draw_landscape(fig: Figure, alphas: Sequence[float], betas: Sequence[float] | None, loss: Any,
                   accuracy: Any = None, *, kind: str, log: bool = False, title: str = "loss landscape",
                   labels: tuple[str, str] = ("alpha", "beta")) -> Axes:
    """Draw a loss landscape on ``fig`` and return its (main) axes.

    ``kind``: ``"line"`` (1-D ``loss[i]`` over ``alphas``; ``accuracy`` on a second y-axis if
    given), ``"contour"`` or ``"surface"`` (2-D ``loss[i, j]`` over ``alphas x betas``, the
    weights marked + on the contour). ``log`` draws ``log10`` of the loss; ``labels`` name
    the two axes (e.g. ``("t (0 = model A, 1 = model B)", "")`` for an interpolation).
    """
    if kind not in LANDSCAPE_KINDS:
        raise ValueError(f"unknown landscape plot kind {kind!r}; choose from {', '.join(LANDSCAPE_KINDS)}.")
    z = np.asarray(loss, dtype=float)
    z = np.log10(np.maximum(z, 1e-300)) if log else z
    zlabel = "log10 loss" if log else "loss"
    if kind == "line":
        ax = _landscape_line(fig, np.asarray(alphas, dtype=float), z, accuracy, labels[0], zlabel)
    else:
        A, B = np.meshgrid(np.asarray(alphas, dtype=float), np.asarray(betas, dtype=float), indexing="ij")
        if kind == "contour":
            ax = fig.add_subplot()
            contours = ax.contour(A, B, z, levels=20, cmap="viridis")
            ax.clabel(contours, fontsize=7)
            ax.plot([0], [0], "k+", markersize=10)
        else:
            ax = fig.add_subplot(projection="3d")
            ax.plot_surface(A, B, z, cmap="viridis", linewidth=0, antialiased=True)
            ax.set_zlabel(zlabel)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
    ax.set_title(title)
    return ax


def _landscape_line(fig: Figure, alphas: np.ndarray, z: np.ndarray, accuracy: Any, xlabel: str,
                    zlabel: str) -> Axes:
    """The 1-D landscape: loss on the left axis, accuracy (if any) on a twin right axis."""
    ax = fig.add_subplot()
    ax.plot(alphas, z, color="C0", marker=".", label="loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(zlabel, color="C0")
    if accuracy is not None:
        twin = ax.twinx()
        twin.plot(alphas, np.asarray(accuracy, dtype=float), color="C1", marker=".", label="accuracy")
        twin.set_ylabel("accuracy", color="C1")
    return ax
