"""Built-in real datasets that need no download: scikit-learn's digits and MNIST-1D."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from hesse.errors import HesseError

DATASETS = ("digits", "mnist1d")


@dataclass
class Dataset:
    """Inputs and class labels of a classification dataset, as tensors."""

    name: str
    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    description: str

    def loader(self, batch_size: int, max_samples: int | None = None) -> DataLoader:
        """A fixed-order (unshuffled) loader over the first ``max_samples`` samples."""
        n = len(self.targets) if max_samples is None else min(max_samples, len(self.targets))
        return DataLoader(TensorDataset(self.inputs[:n], self.targets[:n]), batch_size=batch_size)


def load_digits() -> Dataset:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn, as ``[N, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Dataset(
        "digits", images, torch.tensor(digits.target, dtype=torch.long), 10,
        "scikit-learn digits: 1,797 handwritten 8x8 grey images, 10 classes",
    )


def load_mnist1d() -> Dataset:
    """The MNIST-1D training split (4,000 signals of length 40), generated locally.

    ``mnist1d.data.make_dataset`` builds the data from its templates with a fixed seed
    (no download); it seeds Python's and NumPy's global generators, which are restored.
    """
    try:
        from mnist1d.data import make_dataset
    except ImportError as error:
        raise HesseError(
            "the mnist1d dataset needs the mnist1d package; install it with: pip install 'hesse[mnist1d]'"
        ) from error
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset()
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    signals = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    return Dataset(
        "mnist1d", signals, torch.tensor(data["y"], dtype=torch.long), 10,
        "MNIST-1D (Greydanus 2020): 4,000 one-dimensional signals of length 40, 10 classes",
    )


def load_dataset(name: str) -> Dataset:
    """A built-in dataset by name (one of :data:`DATASETS`)."""
    loaders = {"digits": load_digits, "mnist1d": load_mnist1d}
    if name not in loaders:
        raise HesseError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or pass path.py:factory.")
    return loaders[name]()
