"""Shared fixtures: small models, uneven batches and dense reference curvatures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import SmallCNN, TanhMLP, uneven_batches

# Tests use tiny models, for which one thread is fastest and immune to oversubscription.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end and many-product tests; `pytest -m 'not slow'` runs the rest in seconds"
    )


@pytest.fixture
def mlp_problem():
    torch.manual_seed(0)
    model = TanhMLP().double()
    X = torch.randn(37, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (37,))
    return model, nn.CrossEntropyLoss(), X, y, uneven_batches(X, y, [16, 16, 5])


@pytest.fixture
def cnn_problem():
    torch.manual_seed(1)
    model = SmallCNN().double()
    X = torch.randn(19, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (19,))
    return model, nn.CrossEntropyLoss(), X, y, uneven_batches(X, y, [8, 8, 3])
