"""The report folder is written all-or-nothing and only over hesse's own reports."""

from __future__ import annotations

import json
import os

import pytest

import hesse.report.folder as folder_module
from hesse.errors import HesseError
from hesse.report import SCHEMA, check_output_folder, write_report_folder
from hesse.report.interpret import interpret

OURS = json.dumps({"schema": SCHEMA})


def test_writes_into_new_and_empty_folders(tmp_path):
    write_report_folder(tmp_path / "new", {"report.json": OURS, "index.html": "<html>"}, overwrite=False)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["index.html", "report.json"]
    (tmp_path / "empty").mkdir()
    write_report_folder(tmp_path / "empty", {"report.json": OURS}, overwrite=False)
    assert (tmp_path / "empty" / "report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary folders left


def test_replaces_our_report_only_with_overwrite(tmp_path):
    target = tmp_path / "r"
    write_report_folder(target, {"report.json": OURS, "old.png": "x"}, overwrite=False)
    with pytest.raises(HesseError, match="--overwrite"):
        write_report_folder(target, {"report.json": OURS}, overwrite=False)
    write_report_folder(target, {"report.json": OURS}, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.mark.parametrize("content", ["{}", "not json", json.dumps({"schema": "someone-else"})])
def test_refuses_foreign_folders_even_with_overwrite(tmp_path, content):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(content)
    with pytest.raises(HesseError, match="not a hesse report"):
        check_output_folder(tmp_path / "r", overwrite=True)


def test_unwritable_parent_is_a_one_line_error(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(folder_module.tempfile, "mkdtemp", denied)
    with pytest.raises(HesseError, match="cannot write the report to .*: Permission denied"):
        write_report_folder(tmp_path / "r", {"report.json": OURS}, overwrite=False)


def test_refuses_a_file_and_a_missing_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HesseError, match="not a hesse report"):
        check_output_folder(tmp_path / "file", overwrite=True)
    with pytest.raises(HesseError, match="does not exist"):
        check_output_folder(tmp_path / "no" / "such", overwrite=False)


@pytest.mark.parametrize("error, raised", [(KeyboardInterrupt, KeyboardInterrupt), (OSError, HesseError)])
def test_interrupt_during_the_swap_keeps_the_old_report(tmp_path, monkeypatch, error, raised):
    target = tmp_path / "r"
    write_report_folder(target, {"report.json": OURS, "index.html": "old"}, overwrite=False)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).startswith(str(tmp_path / ".r.tmp-")):
            raise error
        real_replace(src, dst)

    monkeypatch.setattr(folder_module.os, "replace", failing_replace)
    with pytest.raises(raised):
        write_report_folder(target, {"report.json": OURS, "index.html": "new"}, overwrite=True)
    assert (target / "index.html").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_interpretation_names_verdicts_and_outliers():
    report = {
        "model": {"description": "net", "num_parameters": 100},
        "data": {"description": "data", "num_samples": 10},
        "curvature": {"kind": "hessian"},
        "loss": 0.5, "gradient_norm": 0.1,
        "outliers": {"num_outliers": 2, "outliers": [9.0, 5.0], "bulk_edge": 1.0, "gap_ratio": 5.0,
                     "trace_share": 0.7, "values_used": 3, "source": "eigenvalues", "num_classes": 3,
                     "reason": "2 outlier(s): the largest ratio x_2/x_3 = 5/1 = 5 >= min_ratio=1.5",
                     "rule": "largest ratio x_k/x_(k+1) of the converged eigenvalues, at least min_ratio=1.5"},
        "results": {
            "eigenvalues": {"values": [9.0, 5.0, 1.0], "converged": [True, True, False]},
            "density": {"ritz_values": [[-2.0, 0.5, 9.0]], "weights": [[0.2, 0.7, 0.1]], "grid": [-3.0, 10.0]},
            "stability": {"lr": 0.2, "gd_threshold": 10.0, "top_eigenvalue": 9.0, "gd_ratio": 0.9,
                          "gd_verdict": "edge of stability", "sgd_threshold": 10.0, "trace": 20.0,
                          "trace_stderr": 1.0, "batch_size": 1, "sgd_quantity": 20.0, "sgd_ratio": 2.0,
                          "sgd_verdict": "violated"},
        },
    }
    texts = interpret(report)
    assert set(texts) == {"overview", "eigenvalues", "density", "stability"}
    assert "0.2222" in texts["eigenvalues"] and "self-stabilises at the edge of stability" in texts["eigenvalues"]
    assert "diverge" not in texts["eigenvalues"]
    assert "2 outliers" in texts["density"] and "20%" in texts["density"] and "70% of the trace" in texts["density"]
    assert "x_2/x_3 = 5/1" in texts["density"] and "min_ratio=1.5" in texts["density"]  # the reason and the rule
    assert "edge of stability" in texts["stability"] and "violated" in texts["stability"]
    assert "batch size 1" in texts["stability"] and "assumed" not in texts["stability"]


def _stability_report(batch_size: int, source: str) -> dict:
    quantity = 20.0 / batch_size + (1 - 1 / batch_size) * 9.0
    return {
        "model": {"description": "net", "num_parameters": 100},
        "data": {"description": "data", "num_samples": 10},
        "curvature": {"kind": "hessian"}, "loss": 0.5, "gradient_norm": 0.1, "outliers": None,
        "settings": {"train_batch_size": batch_size, "train_batch_size_source": source},
        "matvecs": {"total": 10}, "timings_s": {"total": 1.0},
        "results": {"stability": {
            "lr": 0.2, "momentum": 0.0, "batch_size": batch_size, "gd_threshold": 10.0, "top_eigenvalue": 9.0,
            "gd_ratio": 0.9, "gd_verdict": "edge of stability", "sgd_threshold": 10.0, "trace": 20.0,
            "trace_stderr": 1.0, "sgd_quantity": quantity, "sgd_ratio": quantity / 10.0,
            "sgd_verdict": "satisfied" if quantity <= 10 else "violated"}},
    }


def test_stability_texts_use_the_training_batch_size():
    from hesse.report import summary_rows
    from hesse.report.plots import stability_plot

    batched = _stability_report(32, "example training")  # 20/32 + (31/32) 9 = 9.34375
    text = interpret(batched)["stability"]
    assert "B = 32" in text and "tr/B + (1−1/B)·λ₁ = 9.344" in text and "satisfied" in text
    assert "equal per-sample gradient norms" in text and "assumed" not in text
    rows = dict(summary_rows(batched))
    assert rows["SGD stability (lr=0.2, B=32)"] == f"(tr/B + (1−1/B)λ₁)/(2/lr) = {0.934375:.5g}: satisfied"
    assert stability_plot(batched["results"]["stability"])  # draws the B=32 bars

    explicit_one = _stability_report(1, "command line")
    assert "trace < 2/lr" in interpret(explicit_one)["stability"]
    assert dict(summary_rows(explicit_one))["SGD stability (lr=0.2, B=1)"] == "trace/(2/lr) = 2: violated"


def test_full_batch_gives_the_gd_verdict_only_and_says_what_it_means():
    from hesse.report import summary_rows
    from hesse.report.plots import _stability_groups, stability_plot

    report = _stability_report(1, "assumed")
    report["settings"]["train_batch_size"] = None
    report["results"]["stability"].update(
        batch_size=None, full_batch=True, num_samples=10, gd_ratio=1.3, gd_verdict="locally unstable: ...",
        **dict.fromkeys(("sgd_threshold", "trace", "trace_stderr", "sgd_quantity", "sgd_ratio", "sgd_verdict")))
    text = interpret(report)["stability"]
    assert "Full-batch GD assumed" in text and "SGD" not in text.replace("--train-batch-size B for the mini-batch SGD", "")
    assert "not a prediction of divergence" in text and "edge of stability (Cohen et al. 2021)" in text
    assert "locally unstable along the top eigenvector of the quadratic model" in text
    assert "would diverge" not in text and "diverges" not in text
    rows = dict(summary_rows(report))
    assert rows["GD stability (lr=0.2, full-batch GD assumed)"] == "λ₁/threshold = 1.3: locally unstable"
    assert not any(label.startswith("SGD") for label in rows)
    assert [g[0] for g in _stability_groups(report["results"]["stability"])] == ["GD: λ_max vs (2+2β)/lr"]
    assert stability_plot(report["results"]["stability"])
