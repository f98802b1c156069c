"""Sample factories for ``hesse analyze``: a model for the built-in digits data and a loader.

    hesse analyze --model examples/models.py:make_net --data digits --lr 0.05
    hesse analyze --model examples/models.py:make_net --data examples/models.py:make_loader

A factory takes no arguments. ``make_net`` returns an ``nn.Module`` (hesse calls
``.eval()`` on it); pass trained weights with ``--checkpoint net.pt`` (a state_dict).
``make_loader`` returns a DataLoader (or a list of batches) of ``(inputs, targets)``; it
must give the same batches on every pass, so do not shuffle.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_net() -> nn.Module:
    """A two-layer MLP on 8x8 images (1x8x8 inputs), 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def make_loader() -> DataLoader:
    """The first 256 scikit-learn digits as 1x8x8 images in [0, 1], unshuffled."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target[:256])
    return DataLoader(TensorDataset(images, labels), batch_size=64)
