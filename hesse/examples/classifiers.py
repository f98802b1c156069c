"""The built-in ``digits`` and ``mnist1d`` examples: a small CNN trained for a few seconds."""

from __future__ import annotations

import torch
from torch import nn

from hesse.examples.datasets import load_dataset
from hesse.examples.models import MODELS, train_classifier
from hesse.examples.problem import Problem

TRAINING = {
    "digits": dict(epochs=15, lr=0.1, batch_size=32),
    "mnist1d": dict(epochs=15, lr=0.1, batch_size=32),
}
# samples whose loss curvature is analysed by default: all 1,797 digits, 1,000 of MNIST-1D's 4,000
ANALYSED_SAMPLES = {"digits": None, "mnist1d": 1000}


def classifier_example(name: str, seed: int = 0) -> Problem:
    """Train the example CNN on ``name`` with plain SGD (seeded, deterministic) and wrap it.

    The curvature is analysed on the training samples (:data:`ANALYSED_SAMPLES`;
    ``--max-samples`` changes it); the recommended ``lr`` is the training one.
    """
    dataset = load_dataset(name)
    torch.manual_seed(seed)
    model = MODELS[name](dataset.num_classes)
    training = train_classifier(model, dataset, seed=seed, **TRAINING[name])
    return Problem(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        data=dataset,
        defaults={"lr": training.lr, "max_samples": ANALYSED_SAMPLES[name], "batch_size": 256},
        info={
            "model": f"{type(model).__name__} (built-in example, trained here)",
            "data": dataset.description,
            "training": training.to_dict(),
        },
    )
