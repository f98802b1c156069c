"""``hesse prune``: the report folder and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hesse.commands.prune import prune

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", f"{ROOT}/examples/models.py:make_net", "--data", f"{ROOT}/examples/models.py:make_loader",
         "--max-samples", "64", "--no-progress", "--threads", "1"]


def run(*args: str):
    return CliRunner().invoke(prune, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_prune_writes_report_json_and_page_with_every_method_and_target(tmp_path):
    out = tmp_path / "report"
    result = run(*SMALL, "--method", "magnitude,obd,woodfisher,layerwise", "--sparsity", "0.5", "--nm", "2:4",
                 "--budget", "4", "--fisher-samples", "16", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "prune" and report["num_samples"] == 64
    assert [(r["method"], r["target"]) for r in report["results"]] == [
        (m, t) for m in ("magnitude", "obd", "woodfisher", "layerwise") for t in ("50% per layer", "2:4")]
    for row in report["results"]:
        assert row["sparsity"] == pytest.approx(0.5)
        assert set(row["layer_sparsity"]) == {"1.weight", "3.weight"} and 0 <= row["accuracy"] <= 1
    page = (out / "index.html").read_text()
    assert 'src=\'data:image/png;base64,' in page and "Sparsity per layer" in page and "3.weight" in page
    again = run(*SMALL, "--method", "magnitude", "--out", str(out), "--overwrite", "--json-only")
    assert again.exit_code == 0 and not (out / "index.html").exists()


def test_obd_with_the_empirical_fisher_diagonal(tmp_path):
    out = tmp_path / "report"
    result = run(*SMALL, "--method", "obd", "--sparsity", "0.5", "--obd-diagonal", "empirical-fisher",
                 "--fisher-samples", "16", "--out", str(out), "--json-only")
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "report.json").read_text())["results"]
    assert row["settings"] == {"curvature": "empirical-fisher", "fisher_samples": 16, "rounds": 1}
    assert row["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "--sparsity: 1.5 is not a fraction"),
    (["--sparsity", "half"], "is not a number"),
    (["--method", "magnitude,dropout"], "--method: unknown ['dropout']"),
    (["--sparsity", "", "--nm", "4:2"], "0 < N < M"),
    (["--params", "nothing.*"], "no parameter matches"),
])
def test_errors_are_one_line_with_exit_status_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "report"
    result = CliRunner().invoke(prune, [*SMALL, "--method", "magnitude", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def test_an_existing_folder_that_is_not_a_report_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(prune, [*SMALL, "--method", "magnitude", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is not a hesse report" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"
