"""``hesse influence``: the report's content against the Python API, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hesse.apply.influence import pairwise, self_influence
from hesse.commands.influence import influence, sample_image
from hesse.examples import load_dataset

MODEL = '''
import torch
from torch import nn

def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
'''
TINY = ["--data", "digits", "--max-samples", "48", "--batch-size", "16", "--top", "3", "--no-progress",
        "--threads", "1"]


def run(*args: str):
    return CliRunner().invoke(influence, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(MODEL)
    return path


@pytest.fixture(scope="module")
def report(model_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "report"
    result = run("--model", f"{model_file}:make_net", "--method", "exact", "--queries", "3,7", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    return out


def test_report_matches_api(report):
    data = json.loads((report / "report.json").read_text())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    digits = load_dataset("digits")
    X, y = digits.inputs[:48], digits.targets[:48]
    selfs = self_influence(model, nn.CrossEntropyLoss(), (X, y), method="exact")
    scores = pairwise(model, nn.CrossEntropyLoss(), (X, y), (X[[3, 7]], y[[3, 7]]), method="exact")
    assert data["kind"] == "influence" and data["num_samples"] == 48
    torch.testing.assert_close(torch.tensor(data["self_influence"]["values"]), selfs.float(), rtol=1e-4, atol=1e-6)
    first = data["queries"][0]
    assert first["query"]["index"] == 3 and len(first["helpful"]) == 3
    best = scores[0].clone()
    best[3] = -float("inf")
    assert first["helpful"][0]["index"] == int(best.argmax())
    assert first["helpful"][0]["score"] == pytest.approx(float(scores[0, int(best.argmax())]), rel=1e-4)
    assert first["harmful"][0]["score"] <= first["helpful"][-1]["score"]
    assert all(e["index"] != 3 for e in first["helpful"] + first["harmful"])
    page = (report / "index.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 2 * 3 + 2 and "Self-influence" in page


def test_errors_are_one_line(model_file, tmp_path):
    cases = [
        (["--queries", "3,500"], "out of range"),
        (["--queries", "a,b"], "not a comma list"),
        (["--method", "kfac", "--curvature", "hessian"], "not the Hessian"),
    ]
    for extra, message in cases:
        result = run("--model", f"{model_file}:make_net", "--out", str(tmp_path / "r"), *TINY, *extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("\n") == 1
        assert not (tmp_path / "r").exists()


def test_sample_image_shapes():
    assert sample_image((torch.zeros(1, 1, 8, 8), torch.zeros(1))).shape == (8, 8)
    assert sample_image((torch.zeros(1, 64), torch.zeros(1))).shape == (8, 8)
    assert sample_image((torch.zeros(1, 40), torch.zeros(1))) is None
    assert sample_image(({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, torch.zeros(1))) is None
