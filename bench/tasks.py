"""Benchmark tasks: a model, a loss and a data split, identical for every tool.

Two tasks on scikit-learn's bundled digits (1797 samples, 64 features, 10 classes,
features standardised), both with batch size 256 so the last of the 8 batches holds
only 5 samples (1797 = 7 * 256 + 5). The full-data loss is the sample-weighted mean
cross-entropy over all 1797 samples, which is what every reference value refers to.

* ``mlp``: 64-32-32-10 tanh MLP (3,466 parameters), small enough for a dense Hessian.
* ``cnn``: Conv-ReLU-Conv-ReLU-MaxPool-Flatten-Linear-ReLU-Linear on 1x8x8 images
  (151,306 parameters), an ``nn.Sequential`` of layers BackPACK supports.
* ``transformer``: each 8x8 image read as 8 tokens of 8 pixels (its rows): linear token
  embedding 8->24, learned positional embedding, a 2-layer ``nn.TransformerEncoder``
  (d_model 24, 4 heads, feed-forward 48, ``batch_first=True``, ``dropout=0.0``,
  post-norm, ReLU), mean-pool over tokens, linear head to 10 classes (10,402 parameters).
  Stock PyTorch modules throughout: attention runs through
  ``F.scaled_dot_product_attention``; the model is evaluated in eval mode.

All are trained briefly from a fixed seed (full-batch Adam: 30 steps for mlp, 15 for
cnn, to a training loss of about 0.11; TRAIN_STEPS for the transformer) so the Hessian is not taken at initialisation,
nor at an interpolating minimum where it nearly vanishes. The trained weights are
stored in ``bench/weights`` (committed) so every run uses the same point.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
# Trained weights are committed (bench/weights/, ~0.6 MB) so that every machine scores
# against the reference values computed for exactly these weights; they are retrained
# (same seed) only when missing. reference_*.json records their sha256.
CACHE = os.path.join(HERE, "weights")
SEED = 0
BATCH_SIZE = 256
TRAIN_STEPS = {"mlp": 30, "cnn": 15, "transformer": 70}
LEARNING_RATE = {"mlp": 1e-2, "cnn": 3e-3, "transformer": 3e-3}
TASKS = ("mlp", "cnn", "transformer")
# tasks whose model is evaluated (and its curvature taken) in eval mode
EVAL_MODE = ("transformer",)


def load_digits_tensors(dtype=torch.float32):
    """Standardised digits features ``X`` [1797, 64] and labels ``y`` [1797]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.data.astype(np.float64)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)  # 2 constant pixels stay 0
    return torch.tensor(X, dtype=dtype), torch.tensor(d.target, dtype=torch.long)


class DigitsTransformer(nn.Module):
    """8x8 digit = 8 tokens of 8 pixels -> embed + position -> TransformerEncoder -> mean -> head."""

    def __init__(self, d_model: int = 24, nhead: int = 4, num_layers: int = 2, dim_feedforward: int = 48,
                 tokens: int = 8, token_dim: int = 8, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(token_dim, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
        # enable_nested_tensor only matters with a padding mask (none here); off to keep the stock path quiet
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 8, 8]
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(h.mean(dim=1))


def build_model(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(),
            nn.Linear(32, 32), nn.Tanh(),
            nn.Linear(32, 10),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
            nn.Linear(128, 10),
        )
    if name == "transformer":
        return DigitsTransformer()
    raise ValueError(f"unknown task {name!r}; choose from {TASKS}")


def inputs_for(name: str, X: torch.Tensor) -> torch.Tensor:
    if name == "cnn":
        return X.reshape(-1, 1, 8, 8)
    if name == "transformer":
        return X.reshape(-1, 8, 8)  # 8 tokens (image rows) of 8 pixels
    return X


@dataclass
class Task:
    name: str
    model: nn.Module
    criterion: nn.Module
    X: torch.Tensor            # model inputs, all samples
    y: torch.Tensor
    loader: torch.utils.data.DataLoader
    batches: list = field(default_factory=list)   # the loader's batches, materialised

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def full_loss(self) -> torch.Tensor:
        """Sample-weighted mean loss over all batches (== mean over all samples)."""
        total = 0.0
        for xb, yb in self.batches:
            total = total + self.criterion(self.model(xb), yb) * (yb.shape[0] / self.n)
        return total

    def full_gradient(self) -> list[torch.Tensor]:
        """One full-data gradient: forward+backward over every batch (the cost unit)."""
        self.model.zero_grad(set_to_none=True)
        for xb, yb in self.batches:
            loss = self.criterion(self.model(xb), yb) * (yb.shape[0] / self.n)
            loss.backward()
        return [p.grad for p in self.params()]

    def gradient_time(self, repeats: int = 7) -> float:
        """Median wall time of one full-data gradient (after one warm-up)."""
        self.full_gradient()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.full_gradient()
            times.append(time.perf_counter() - t0)
        self.model.zero_grad(set_to_none=True)
        return statistics.median(times)


def weights_path(name: str) -> str:
    return os.path.join(CACHE, f"{name}_seed{SEED}.pt")


def weights_sha256(name: str) -> str | None:
    import hashlib
    p = weights_path(name)
    if not os.path.exists(p):
        return None
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _train(name: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE[name])
    crit = nn.CrossEntropyLoss()
    Xin = inputs_for(name, X)
    for _ in range(TRAIN_STEPS[name]):
        opt.zero_grad()
        crit(model(Xin), y).backward()
        opt.step()


def make_task(name: str, dtype=torch.float32, retrain: bool = False) -> Task:
    """Build the task with its trained weights (trained once, then cached)."""
    torch.manual_seed(SEED)
    X, y = load_digits_tensors()
    model = build_model(name)
    path = weights_path(name)
    if os.path.exists(path) and not retrain:
        model.load_state_dict(torch.load(path))
    else:
        _train(name, model, X, y)
        os.makedirs(CACHE, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    model = model.to(dtype)
    if name in EVAL_MODE:
        model.eval()
    Xin = inputs_for(name, X).to(dtype)
    ds = torch.utils.data.TensorDataset(Xin, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH_SIZE, shuffle=False)
    batches = list(loader)
    return Task(name, model, nn.CrossEntropyLoss(), Xin, y, loader, batches)


if __name__ == "__main__":
    for name in TASKS:
        t = make_task(name)
        with torch.no_grad():
            loss = float(t.full_loss())
            acc = float((t.model(t.X).argmax(1) == t.y).float().mean())
        print(f"{name}: P={t.num_params} N={t.n} batches={[len(b[1]) for b in t.batches]} "
              f"loss={loss:.4f} acc={acc:.3f} grad_time={t.gradient_time():.4f}s")
