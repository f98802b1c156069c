"""``hesse quantize``: the report folder and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hesse.commands.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", f"{ROOT}/examples/models.py:make_net", "--data", f"{ROOT}/examples/models.py:make_loader",
         "--max-samples", "64", "--curvature-samples", "32", "--no-progress", "--threads", "1", "--rtol", "0.2"]


def test_quantize_writes_report_json_and_page(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(quantize, [*SMALL, "--bits", "2,4,8", "--size-fraction", "0.3,0.7",
                                           "--bops-fraction", "0.5", "--random-seeds", "2", "--act-bits", "8",
                                           "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "quantize" and report["num_samples"] == 64 and report["bits"] == [2, 4, 8]
    assert [b["budget"] for b in report["budgets"]] == ["size-fraction 0.3", "size-fraction 0.7", "bops-fraction 0.5"]
    assert [r["layer"] for r in report["layers"]] == ["1", "3"]
    for budget in report["budgets"]:
        assert len(budget["random"]) == 2 and set(budget["hessian"]["bits"]) <= {2, 4, 8}
        assert [row["bits"] for row in budget["config"]["layers"]] == budget["hessian"]["bits"]
    assert [u["bits"][0] for u in report["uniform"]] == [2, 4, 8]
    page = (out / "index.html").read_text()
    assert "src='data:image/png;base64," in page and "trace ± stderr" in page


@pytest.mark.parametrize("args, message", [
    (["--bits", "4"], "--bits: give at least two bit widths"),
    (["--bits", "1,4"], "--bits: give at least two bit widths"),
    (["--bits", "four,8"], "not a comma list of integers"),
    (["--size-fraction", "1.5"], "--size-fraction: 1.5 must be in [0, 1]"),
    (["--size-mb", "1e-9"], "the size limit"),
    (["--params", "nothing.*"], "no quantizable layer"),
])
def test_errors_are_one_line_with_exit_status_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "report"
    result = CliRunner().invoke(quantize, [*SMALL, "--random-seeds", "0", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def test_example_training_runs_on_one_thread_and_restores_the_callers_count():
    """The built-in example trains on one intra-op thread (``bench_quantize.py``'s 2-minute goal:
    two threads spin-wait through its tiny SGD steps on a busy machine), whatever the caller set,
    so the trained weights do not depend on ``--threads``."""
    import torch

    from hesse.examples import DigitsCNN, load_dataset, train_classifier

    data, seen, weights = load_dataset("digits"), [], []
    before = torch.get_num_threads()
    for threads in (2, 1):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = DigitsCNN()
        model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        train_classifier(model, data, epochs=1, lr=0.1, batch_size=32, seed=0)
        assert torch.get_num_threads() == threads
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.set_num_threads(before)
    assert set(seen) == {1} and torch.equal(weights[0], weights[1])
