"""End-to-end tests of ``hesse analyze``: the report's content against the Python API."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import hesse
from hesse.analysis import per_layer, stability
from hesse.linalg import density
from hesse.cli import main
from hesse.examples import classifier_example
from hesse.linalg import eigenvalues, trace

TINY = ["--max-samples", "64", "--top-k", "3", "--budget", "6", "--lanczos-steps", "6", "--probes", "2",
        "--layer-probes", "2", "--tol", "1e-2", "--no-progress", "--threads", "1"]
IMG = '<img src="data:image/png;base64,'


def analyze(*args: str):
    return CliRunner().invoke(main, ["analyze", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "report"
    result = analyze("--example", "digits", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def digits_operator():
    """The same trained model and data the CLI analyses, built through the Python API."""
    torch.set_num_threads(1)
    problem = classifier_example("digits", seed=0)
    loader = problem.data.loader(batch_size=256, max_samples=64)
    return hesse.Hessian(problem.model, nn.CrossEntropyLoss(), loader)


@pytest.mark.slow
def test_report_json_has_schema_settings_and_costs(digits_report):
    report = json.loads((digits_report / "report.json").read_text())
    assert report["schema"] == "hesse-report/1"
    assert set(report["versions"]) >= {"hesse", "torch", "python"}
    assert report["settings"]["seed"] == 0 and report["settings"]["lr"] == 0.1
    # the SGD stability check uses the example's own training batch size
    assert report["settings"]["train_batch_size"] == report["training"]["batch_size"] == 32
    assert report["settings"]["train_batch_size_source"] == "example training"
    assert report["results"]["stability"]["batch_size"] == 32
    assert report["settings"]["analyses"] == ["eigenvalues", "trace", "density", "per-layer", "stability"]
    assert set(report["results"]) == {"eigenvalues", "trace", "density", "per_layer", "stability"}
    assert report["data"]["num_samples"] == 64
    assert report["model"]["num_parameters"] == 9802
    assert report["training"]["train_accuracy"] > 0.9
    for name in report["results"]:
        assert report["matvecs"][name.replace("_", "-")] > 0
        assert report["timings_s"][name.replace("_", "-")] > 0
    assert report["matvecs"]["total"] == sum(v for k, v in report["matvecs"].items() if k != "total")
    assert set(report["interpretation"]) == {"overview", *report["results"]}


@pytest.mark.slow
def test_report_numbers_equal_the_python_api(digits_report, digits_operator):
    report = json.loads((digits_report / "report.json").read_text())
    results, op = report["results"], digits_operator
    assert report["loss"] == pytest.approx(op.loss(), rel=1e-5)
    eig = eigenvalues(op, k=3, tol=1e-2, seed=0, progress=False)
    assert results["eigenvalues"]["values"] == pytest.approx(eig.values.tolist(), rel=1e-4)
    tr = trace(op, "hutch++", budget=6, seed=0, progress=False)
    assert results["trace"]["estimate"] == pytest.approx(tr.estimate, rel=1e-4)
    dens = density(op, num_probes=2, lanczos_steps=6, seed=0, progress=False)
    assert results["density"]["ritz_values"][0] == pytest.approx(dens.ritz_values[0].tolist(), rel=1e-3, abs=1e-6)
    layers = per_layer(op, tol=1e-2, max_steps=6, trace_probes=2, seed=0, progress=False)
    assert results["per_layer"]["trace"] == pytest.approx(layers.trace, rel=1e-4)
    st = stability(op, 0.1, batch_size=32, tol=1e-2, trace_budget=6, seed=0, progress=False)
    assert results["stability"]["top_eigenvalue"] == pytest.approx(st.top_eigenvalue, rel=1e-4)
    assert results["stability"]["gd_verdict"] == st.gd_verdict
    assert results["stability"]["sgd_quantity"] == pytest.approx(st.sgd_quantity, rel=1e-4)
    assert results["stability"]["sgd_ratio"] == pytest.approx(st.sgd_ratio, rel=1e-4)
    assert results["stability"]["sgd_verdict"] == st.sgd_verdict


def test_html_is_self_contained_with_every_plot(digits_report):
    page = (digits_report / "index.html").read_text()
    # density (linear + log), top eigenvalues, per-layer trace + top eigenvalue, stability
    assert page.count(IMG) == 6
    assert not re.search(r'src="(?!data:)', page)
    assert "edge of stability" in page and "per-layer" in page.lower()


def test_summary_and_page_name_the_training_batch_size(digits_report):
    from hesse.report import summary_rows

    report = json.loads((digits_report / "report.json").read_text())
    rows = dict(summary_rows(report))
    assert "SGD stability (lr=0.1, B=32)" in rows
    assert rows["SGD stability (lr=0.1, B=32)"].startswith("(tr/B + (1−1/B)λ₁)/(2/lr) = ")
    assert "batch size B = 32" in report["interpretation"]["stability"]
    assert "assumed" not in report["interpretation"]["stability"]
    assert "batch size B = 32" in (digits_report / "index.html").read_text()


@pytest.mark.parametrize("given", [None, 16, 1000])
def test_train_batch_size_for_user_models(tmp_path, given):
    extra = [] if given is None else ["--train-batch-size", str(given)]
    result = CliRunner().invoke(main, ["analyze", "--model", "examples/models.py:make_net", "--data", "digits",
                                       "--lr", "0.05", "--analyses", "stability", "--json-only",
                                       "--out", str(tmp_path / "r"), *TINY, *extra])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    st, settings = report["results"]["stability"], report["settings"]
    assert st["batch_size"] == settings["train_batch_size"] == given
    text = report["interpretation"]["stability"]
    assert "would make training diverge" not in text and "not a prediction of divergence" in text
    if given == 16:  # mini-batch SGD: both verdicts
        assert settings["train_batch_size_source"] == "command line" and not st["full_batch"]
        assert st["sgd_quantity"] == pytest.approx(st["trace"] / 16 + (1 - 1 / 16) * st["top_eigenvalue"])
        assert st["sgd_ratio"] == pytest.approx(st["sgd_quantity"] * 0.05 / 2)
        assert "assumed" not in text and "B=16)" in result.output
        return
    # full batch (unset, or a batch at least the 64 analysed samples): the GD verdict only
    assert st["full_batch"] and st["num_samples"] == 64
    assert st["sgd_verdict"] is None and st["trace"] is None and "SGD" not in result.output
    assert "SGD condition violated" not in text
    if given is None:  # the report says that full-batch GD was assumed
        assert settings["train_batch_size_source"] == "assumed"
        assert "Full-batch GD assumed" in text and "full-batch GD assumed" in result.output


def test_existing_report_needs_overwrite(digits_report):
    before = (digits_report / "report.json").read_text()
    result = analyze("--example", "digits", "--out", str(digits_report), *TINY)
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert (digits_report / "report.json").read_text() == before


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_json_only_and_user_model_with_mse_loss(tmp_path, curvature):
    out = tmp_path / "r"
    result = analyze("--model", "examples/models.py:make_net", "--data", "examples/models.py:make_loader",
                     "--curvature", curvature, "--loss", "mse", "--analyses", "eigenvalues,trace",
                     "--json-only", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["curvature"] == {**report["curvature"], "kind": curvature, "loss": "mse"}
    assert report["data"]["num_samples"] == 64
    assert report["results"]["eigenvalues"]["values"][0] > 0
    assert "stability" not in report["results"]


def test_ggn_with_user_model(tmp_path):
    result = analyze("--model", "examples/models.py:make_net", "--data", "digits", "--curvature", "ggn",
                     "--analyses", "eigenvalues", "--json-only", "--out", str(tmp_path / "r"), *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert min(report["results"]["eigenvalues"]["values"]) > 0  # the GGN is positive semi-definite


def test_fisher_on_builtin_data_without_lr_skips_stability(tmp_path):
    result = analyze("--model", "examples/models.py:make_net", "--data", "digits", "--curvature", "fisher",
                     "--fisher-kind", "empirical", "--out", str(tmp_path / "r"), *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["results"]) == {"eigenvalues", "trace", "density", "per_layer"}
    assert (tmp_path / "r" / "index.html").read_text().count(IMG) == 5


def test_sharpness_flag(tmp_path):
    result = analyze("--model", "examples/models.py:make_net", "--data", "digits", "--analyses", "trace",
                     "--sharpness", "--json-only", "--out", str(tmp_path / "r"), *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["results"]) == ["trace", "sharpness"]
    assert report["results"]["sharpness"]["worst"]["value"] >= 0


@pytest.mark.skipif(next(iter(inspect.signature(hesse.loss_landscape).parameters)) != "objective",
                    reason="the report passes op.objective; loss_landscape(objective, ...) comes with the analysis branch")
def test_landscape_and_sharpness_flags(tmp_path):
    result = analyze("--model", "examples/models.py:make_net", "--data", "digits", "--analyses", "trace",
                     "--landscape", "--sharpness", "--out", str(tmp_path / "r"), *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["results"]) == ["trace", "landscape", "sharpness"]
    assert len(report["results"]["landscape"]["loss"]) == 11
    assert report["results"]["sharpness"]["worst"]["value"] >= 0
    assert (tmp_path / "r" / "index.html").read_text().count(IMG) == 1  # the landscape's contour plot


def test_page_renders_from_the_json_alone_even_with_missing_numbers(digits_report):
    from hesse.report import render, summary_rows
    from hesse.report.interpret import interpret

    report = json.loads((digits_report / "report.json").read_text())
    report["results"]["eigenvalues"]["values"][1] = None
    report["results"]["density"]["density"] = [0.0] * len(report["results"]["density"]["grid"])
    report["results"]["per_layer"]["trace"]["fc1"] = None
    report["interpretation"] = interpret(report)
    assert render(report, summary_rows(report)).count(IMG) == 6


@pytest.mark.slow
def test_mnist1d_example(tmp_path):
    pytest.importorskip("mnist1d")
    result = analyze("--example", "mnist1d", "--analyses", "trace", "--json-only", "--out", str(tmp_path / "r"), *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["model"]["num_parameters"] == 9610 and report["training"]["train_accuracy"] > 0.8


def test_params_restricts_the_analysed_parameters(tmp_path):
    result = analyze("--model", "examples/models.py:make_net", "--data", "digits", "--params", "3.*",
                     "--analyses", "trace,per-layer", "--json-only", "--out", str(tmp_path / "r"), *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["model"]["num_parameters"] == 32 * 10 + 10 and report["settings"]["params"] == ["3.*"]
    assert report["results"]["per_layer"]["names"] == ["3 (Linear)"]
