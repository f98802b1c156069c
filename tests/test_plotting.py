"""The shared drawing code: figures that fit their data and their canvas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hesse
from hesse.analysis import bulk_outlier_split
from hesse.plotting import draw_density, draw_landscape, new_figure
from hesse.report.plots import density_figure
from hesse.results import to_jsonable


@pytest.fixture(scope="module")
def spectrum() -> dict:
    """The SLQ density of a matrix with a bulk in [0, 1] and three outliers, as in report.json."""
    values = torch.cat([torch.linspace(0.0, 1.0, 60, dtype=torch.float64), torch.tensor([20.0, 35.0, 50.0])])
    op = hesse.DenseOperator(torch.diag(values))
    result = hesse.density(op, num_probes=3, lanczos_steps=30, seed=0, progress=False)
    report = to_jsonable(result)
    report["outliers"] = bulk_outlier_split(result).to_dict()["outliers"]
    return report


def _rendered(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("log", [True, False])
def test_report_density_plot_fits_the_data_and_the_canvas(spectrum, log):
    fig = density_figure(spectrum, spectrum["outliers"], log=log)
    renderer = _rendered(fig)
    (ax,) = fig.axes
    values = np.array(spectrum["density"], dtype=float)
    peak, smallest = values.max(), values[values > 0].min()
    bottom, top = ax.get_ylim()
    assert peak < top <= 2 * peak  # not orders of magnitude above the curve
    if log:
        assert ax.get_yscale() == "log"
        assert max(smallest, peak * 1e-7) <= bottom < peak * 1e-3
    else:
        assert bottom == 0
    canvas = fig.bbox
    box = ax.get_tightbbox(renderer)  # the axes with their labels, title and tick labels
    assert box.x0 >= canvas.x0 - 1 and box.y0 >= canvas.y0 - 1  # the x label is on the canvas
    assert box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1
    assert ax.get_xlabel() == "eigenvalue"


def test_density_without_positive_values_stays_linear():
    fig = new_figure((4, 3))
    ax = fig.add_subplot()
    draw_density(ax, [0.0, 1.0], [0.0, 0.0], log=True)
    assert ax.get_yscale() == "linear"


@pytest.mark.parametrize("kind", ["line", "contour", "surface"])
def test_landscape_kinds(kind):
    alphas = np.linspace(-1, 1, 5)
    fig = new_figure((5, 4))
    if kind == "line":
        ax = draw_landscape(fig, alphas, None, alphas ** 2 + 1, 1 - alphas ** 2 / 2, kind=kind, log=True,
                            labels=("t (0 = model A, 1 = model B)", ""))
        assert len(fig.axes) == 2 and ax.get_ylabel() == "log10 loss"  # accuracy on a twin axis
        assert ax.get_xlabel().startswith("t (0")
    else:
        loss = alphas[:, None] ** 2 + 2 * alphas[None, :] ** 2 + 1
        ax = draw_landscape(fig, alphas, alphas, loss, None, kind=kind, title="loss landscape (random)")
        assert ax.get_title() == "loss landscape (random)" and ax.get_xlabel() == "alpha"
    _rendered(fig)


def test_landscape_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="line, contour, surface"):
        draw_landscape(new_figure((4, 3)), [0.0], None, [1.0], kind="heatmap")


def _inside(fig, ax, renderer) -> bool:
    box, canvas = ax.get_tightbbox(renderer), fig.bbox  # the axes with labels, title and tick labels
    return (box.x0 >= canvas.x0 - 1 and box.y0 >= canvas.y0 - 1
            and box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1)


def _within(limits, low, high, margin):
    """``limits`` cover ``[low, high]`` and reach at most ``margin`` of the span beyond it."""
    span = (high - low) or 1.0
    return limits[0] <= low and limits[1] >= high and limits[0] >= low - margin * span and limits[1] <= high + margin * span


def _report_figures():
    from hesse.report import plots

    stability = {"lr": 0.1, "top_eigenvalue": 7.4, "gd_threshold": 20.0, "batch_size": 32, "trace": 42.7,
                 "trace_stderr": 0.9, "sgd_quantity": 8.5, "sgd_threshold": 20.0}
    alphas = np.linspace(-1, 1, 5).tolist()
    landscape = {"alphas": alphas, "betas": alphas, "loss": [[a * a + b * b + 1 for b in alphas] for a in alphas]}
    names = ["fc2 (Linear)", "conv1 (Conv2d)", "conv2 (Conv2d)", "a-rather-long-block-name (Linear)"]
    yield "eigenvalues", plots.top_eigenvalues_figure([7.4, 5.6, 4.7, 3.7, None], [True] * 4 + [False]), (0, 7.4)
    yield "per-layer", plots.per_layer_figure(names, [0.031, 0.021, 0.0038, 0.0031], [2e-4, 5e-5, 3e-5, 2e-5],
                                              "trace per parameter Tr/n"), (0, 0.031 + 4e-4)
    yield "per-layer", plots.per_layer_figure(names, [10.4, 1.7, 4.4, None], None, "trace"), (0, 10.4)
    yield "stability", plots.stability_figure(stability), (0, 20.0)
    yield "landscape", plots.landscape_figure(landscape), (-1, 1)


def test_every_report_plot_fits_its_data_and_its_canvas():
    for name, fig, (low, high) in _report_figures():
        renderer = _rendered(fig)
        (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
        assert _inside(fig, ax, renderer), name
        value_limits = ax.get_xlim() if name == "per-layer" else ax.get_ylim()
        assert _within(value_limits, low, high, 0.35), (name, value_limits)
        if name == "eigenvalues":
            assert ax.get_xlim() == (0.5, 5.5)
        if name == "per-layer":
            assert ax.get_ylim() == (-0.6, 3.6)
        if name == "landscape":
            assert _within(ax.get_xlim(), -1, 1, 0.05)
