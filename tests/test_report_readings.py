"""The report's readings: outliers by the ratio rule, per-layer ranking with ties, honest wording."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import hesse
from hesse.analysis.spectrum import PerLayerResult
from hesse.linalg import density, eigenvalues
from hesse.report import summary_rows
from hesse.report.analyses import AnalysisRun, num_classes, outlier_summary, values_needed
from hesse.report.interpret import interpret
from hesse.report.page import _per_layer_table
from hesse.results import TraceResult, to_jsonable

BULK = torch.linspace(0.0, 1.0, 60, dtype=torch.float64)
SPIKED = hesse.DenseOperator(torch.diag(torch.cat([BULK, torch.tensor([20.0, 35.0, 50.0], dtype=torch.float64)])))
TRACE = float(BULK.sum()) + 105.0


def _run(k: int | None, with_density: bool = True, classes: int | None = None) -> AnalysisRun:
    run = AnalysisRun(num_classes=classes)
    if k is not None:
        run.results["eigenvalues"] = eigenvalues(SPIKED, k=k, tol=1e-8, seed=0, progress=False)
    if with_density:
        run.results["density"] = density(SPIKED, num_probes=3, lanczos_steps=30, seed=0, progress=False)
    run.results["trace"] = TraceResult(TRACE, 0.0, 63, "exact")
    return run


def _report(outliers=None, per_layer=None) -> dict:
    results = {} if per_layer is None else {"per_layer": per_layer}
    return {"model": {"description": "net", "num_parameters": 100}, "data": {"description": "d", "num_samples": 10},
            "curvature": {"kind": "hessian"}, "loss": 0.5, "gradient_norm": 0.1, "outliers": outliers,
            "results": results, "matvecs": {"total": 1}, "timings_s": {"total": 1.0}}


def test_outliers_from_enough_eigenvalues_with_the_trace_share():
    summary = outlier_summary(_run(k=8, with_density=False, classes=3))
    assert summary["source"] == "eigenvalues" and summary["num_outliers"] == 3
    assert summary["outliers"] == pytest.approx([50.0, 35.0, 20.0])
    assert summary["bulk_edge"] == pytest.approx(1.0) and summary["gap_ratio"] == pytest.approx(20.0)
    assert summary["trace_share"] == pytest.approx(105.0 / TRACE)
    rows = dict(summary_rows(_report(summary)))
    assert rows["outliers above the bulk"] == f"3 (λ_k/λ_k+1 = 20, {100 * 105 / TRACE:.0f}% of the trace)"
    assert rows["bulk edge (largest bulk eigenvalue)"] == "1"
    text = interpret({**_report(summary), "results": {"density": {"ritz_values": [], "weights": []}}})["density"]
    assert "x_3/x_4" in text and "min_ratio=1.5" in text and "3 classes" in text


def test_too_few_eigenvalues_fall_back_to_the_density():
    run = _run(k=3, classes=3)  # 3 values cannot show the gap below 3 outliers; the density's agreed values can
    assert values_needed(3, None) == 5
    summary = outlier_summary(run)
    assert summary["source"] == "density" and summary["num_outliers"] == 3
    assert outlier_summary(_run(k=3, with_density=False, classes=3))["source"] == "eigenvalues"  # the only one
    assert outlier_summary(_run(k=None, with_density=False)) is None


def test_no_clear_separation_shows_the_reason_and_no_bulk_edge():
    smooth = hesse.DenseOperator(torch.diag(torch.linspace(1.0, 2.0, 30, dtype=torch.float64)))
    run = AnalysisRun()
    run.results["eigenvalues"] = eigenvalues(smooth, k=6, tol=1e-8, seed=0, progress=False)
    summary = outlier_summary(run)
    assert summary["num_outliers"] == 0 and summary["bulk_edge"] is None
    rows = dict(summary_rows(_report(summary)))
    assert rows["outliers above the bulk"].startswith("0 (no clear separation")
    assert not any(label.startswith("bulk edge") for label in rows)
    text = interpret({**_report(summary), "results": {"eigenvalues": {"values": [2.0, 1.9], "converged": [True] * 2}}})
    assert "no clear separation" in text["eigenvalues"]


def _layers(tpp_b: float) -> dict:
    sizes = {"a": 10, "b": 100, "c": 1000}
    traces = {"a": 5.0, "b": tpp_b * 100, "c": 2.0}
    result = PerLayerResult(
        list(sizes), sizes, {"a": 3.0, "b": 1.0, "c": 0.5}, dict.fromkeys(sizes, True), traces,
        {"a": 0.05, "b": 0.5, "c": 0.02}, dict.fromkeys(sizes, "hutch++"), 0.02, 40, 45)
    return to_jsonable(result)


def test_per_layer_reading_ranks_by_trace_per_parameter_and_names_ties():
    tied = _layers(0.49)  # b: 0.49 ± 0.005 vs a: 0.5 ± 0.005 -> not distinguishable
    rows = dict(summary_rows(_report(per_layer=tied)))
    assert rows["highest curvature per parameter"] == "a (0.5 ± 0.005) (not distinguishable from b)"
    assert "largest per-layer trace" not in rows
    text = interpret(_report(per_layer=tied))["per_layer"]
    assert "'a' and 'b'" in text and "HAWQ-V2" in text
    table = _per_layer_table(tied)
    for head in ("rank", "block", "size", "trace ± s.e.", "trace per parameter ± s.e.", "top eigenvalue", "trace method"):
        assert f"<th>{head}</th>" in table
    assert "<td>1=</td><td>a</td>" in table and "<td>3</td><td>c</td>" in table
    clear = dict(summary_rows(_report(per_layer=_layers(0.2))))
    assert clear["highest curvature per parameter"] == "a (0.5 ± 0.005)"


def test_num_classes_of_a_classifier_only():
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    model = nn.Linear(4, 3)
    assert num_classes(hesse.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])) == 3
    assert num_classes(hesse.Hessian(model, nn.MSELoss(), [(x, torch.randn(8, 3))])) is None
    assert num_classes(SPIKED) is None


def test_no_sentence_says_training_would_diverge():
    folder = Path(hesse.__file__).parent / "report"
    for name in ("interpret.py", "document.py", "page.py"):
        source = (folder / name).read_text()
        assert "would diverge" not in source and "will diverge" not in source and "diverges only" not in source
    assert math.isfinite(TRACE)
