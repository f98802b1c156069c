"""Models and dense references shared by the tests (a plain module, not a test module)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sym_matrix(lams, seed=0) -> torch.Tensor:
    """Q diag(lams) Q^T with a random orthogonal Q (float64): a matrix with a known spectrum."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lams), len(lams), generator=g, dtype=torch.float64))
    return (Q * torch.as_tensor(lams, dtype=torch.float64)) @ Q.T


def uneven_batches(X, y, sizes):
    """Split (X, y) into consecutive batches of the given sizes (deliberately uneven)."""
    out, start = [], 0
    for s in sizes:
        out.append((X[start:start + s], y[start:start + s]))
        start += s
    assert start == len(y)
    return out


def flat_functional(model: nn.Module, names: list[str] | None = None):
    """(theta0, call) where call(theta, *args) runs the model with flat parameters theta."""
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    shapes = [named[n].shape for n in names]
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def call(theta, *args, **kwargs):
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        return torch.func.functional_call(model, params, args, kwargs)

    return theta0, call


def dense_hessian(model, criterion, X, y, names=None):
    theta, call = flat_functional(model, names)
    return torch.func.hessian(lambda t: criterion(call(t, X), y))(theta)


def dense_ggn(model, criterion, X, y, names=None):
    theta, call = flat_functional(model, names)
    out = call(theta, X).detach()
    J = torch.func.jacrev(lambda t: call(t, X))(theta).reshape(out.numel(), -1)
    H_out = torch.func.hessian(lambda o: criterion(o.view(out.shape), y))(out.reshape(-1))
    return J.T @ H_out @ J


class TanhMLP(nn.Module):
    def __init__(self, d_in=6, hidden=12, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self, batchnorm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 2)
        return self.fc(h.flatten(1))


class TinyTransformer(nn.Module):
    """An encoder block over token ids with an attention mask, Hugging Face style (dict in)."""

    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        a, _ = self.attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(h + a)
        h = h + self.mlp(h)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))
