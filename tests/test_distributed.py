"""Two gloo processes on CPU, each with its own uneven shard, give the single-process operator."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hesse
from tests.helpers import TanhMLP, uneven_batches

pytestmark = pytest.mark.slow


def _problem():
    torch.manual_seed(0)
    model = TanhMLP().double()
    X = torch.randn(29, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (29,))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    return model, X, y, V


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, X, y, V = _problem()
        # rank 0 holds 20 samples in 3 batches, rank 1 holds 9 in 1 batch
        shard = uneven_batches(X[:20], y[:20], [8, 8, 4]) if rank == 0 else [(X[20:], y[20:])]
        crit = nn.CrossEntropyLoss()
        results = {
            "hessian": hesse.Hessian(model, crit, shard) @ V,
            "ggn": hesse.GGN(model, crit, shard) @ V,
            "fisher": hesse.Fisher(model, crit, shard, kind="empirical") @ V,
            "gradient": hesse.Hessian(model, crit, shard).gradient(),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one():
    model, X, y, V = _problem()
    crit = nn.CrossEntropyLoss()
    data = uneven_batches(X, y, [10, 10, 9])
    expected = {
        "hessian": hesse.Hessian(model, crit, data) @ V,
        "ggn": hesse.GGN(model, crit, data) @ V,
        "fisher": hesse.Fisher(model, crit, data, kind="empirical") @ V,
        "gradient": hesse.Hessian(model, crit, data).gradient(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        except mp.ProcessExitedException:
            # gloo sometimes aborts a worker at interpreter shutdown ("terminate called without an
            # active exception"), after its results are written; only missing results are a failure
            missing = [r for r in range(2) if not os.path.exists(os.path.join(tmp, f"rank{r}.pt"))]
            assert not missing, f"ranks {missing} died before writing their results"
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"rank{rank}.pt"))
            for name, value in expected.items():
                assert torch.allclose(got[name], value, rtol=1e-10, atol=1e-12), (rank, name)
