"""Accuracy against cost (operator products) of hesse's spectral estimators.

A dense ``P x P`` matrix with an NN-Hessian-like spectrum (ten outliers, a bulk near zero,
a few negative eigenvalues; Sagun et al. 2017, Ghorbani et al. 2019) stands in for a
curvature operator, so exact answers are known. Prints one table per estimator.

Also ``--only block``: passes, products and time of ``eigenvalues`` by block size on that
matrix and on ``hesse.Hessian`` of a small CNN (the measurement behind the default
``block_size=min(k, 4)``). Count passes and products; time only on a quiet machine.

    python bench/bench_estimators.py [--size 2000] [--threads 1] [--only block]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from hesse.analysis import bulk_outlier_split, per_layer
from hesse.errors import NotConvergedWarning
from hesse.linalg import density, diagonal, eigenvalues, frobenius_norm, trace
from hesse.operators import BlockDiagonalOperator, DenseOperator


def nn_like_spectrum(P: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    outliers = np.array([120.0, 60, 35, 22, 15, 10, 7, 5, 3.5, 2.5])
    bulk = 0.5 * rng.beta(0.5, 3.0, P - len(outliers) - P // 20)  # most mass near zero
    negatives = -np.abs(rng.normal(0, 0.08, P // 20))
    negatives[0] = -1.5  # one clear negative direction (a saddle)
    return np.concatenate([outliers, bulk, negatives])


def matrix_with_spectrum(lams: np.ndarray, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lams), len(lams), generator=g, dtype=torch.float64))
    return (Q * torch.from_numpy(lams)) @ Q.T


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def bench_eigenvalues(A: torch.Tensor, lams: np.ndarray) -> None:
    rows = []
    desc, asc = np.sort(lams)[::-1], np.sort(lams)
    for which, k, method in [("largest", 1, "lanczos"), ("largest", 5, "lanczos"), ("largest", 10, "lanczos"),
                             ("smallest", 5, "lanczos"), ("largest", 1, "power"), ("largest", 5, "power"),
                             ("largest", 5, "lanczos-block1")]:
        exact = (desc if which == "largest" else asc)[:k]
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotConvergedWarning)
            if method == "lanczos-block1":
                res = eigenvalues(A, k=k, which=which, block_size=1, progress=False)
            else:
                res = eigenvalues(A, k=k, which=which, method=method, progress=False)
        err = np.max(np.abs(res.values.numpy() - exact) / np.abs(exact))
        rows.append([which, k, method, res.passes, res.matvecs, f"{err:.1e}", bool(res.converged.all()),
                     f"{time.perf_counter() - t:.2f}"])
    table("eigenvalues (default tol=1e-3 certified, block_size=min(k, 4); error = max relative error)",
          ["which", "k", "method", "passes", "matvecs", "max rel err", "converged", "seconds"], rows)

    top = eigenvalues(A, k=1, progress=False)
    drift = A + 1e-3 * matrix_with_spectrum(np.random.default_rng(9).normal(size=len(lams)), seed=9)
    cold = eigenvalues(drift, k=1, progress=False, seed=1)
    warm = eigenvalues(drift, k=1, v0=top.vectors, progress=False)
    table("warm start (matrix drifted by 1e-3, as between training steps)", ["start", "matvecs", "value"],
          [["cold", cold.matvecs, f"{float(cold.values[0]):.6f}"],
           ["warm", warm.matvecs, f"{float(warm.values[0]):.6f}"]])


def small_cnn_hessian(n: int = 512, seed: int = 0):
    """``hesse.Hessian`` of a small CNN (about 3k parameters, ``n`` 12x12 images in 4 batches)."""
    import hesse
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 10))
    X, y = torch.randn(n, 1, 12, 12), torch.randint(0, 10, (n,))
    batches = [(X[i:i + n // 4], y[i:i + n // 4]) for i in range(0, n, n // 4)]
    return hesse.Hessian(model, nn.CrossEntropyLoss(), batches)


def bench_block_size(A: torch.Tensor, lams: np.ndarray, repeats: int = 3) -> None:
    """Passes, products and time of eigenvalues() by block size, on the dense NN-like matrix
    and on a small CNN's Hessian (float32; reference: a tol=1e-9 run in float64 accumulation)."""
    H = small_cnn_hessian()
    ref_h = eigenvalues(H, k=10, tol=1e-7, block_size=1, accumulate=torch.float64, progress=False).values.numpy()
    rows = []
    for name, op, ref in [("dense", A, np.sort(lams)[::-1]), ("cnn", H, ref_h)]:
        for k in (1, 5, 10):
            for b in (1, 2, 4, 8):
                if b > max(k, 1) * 2 or (k == 1 and b > 1):
                    continue
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", NotConvergedWarning)
                        res = eigenvalues(op, k=k, block_size=b, progress=False)
                    times.append(time.perf_counter() - t)
                err = np.max(np.abs(res.values.numpy() - ref[:k]) / np.abs(ref[:k]))
                rows.append([name, k, b, res.passes, res.matvecs, f"{err:.1e}", bool(res.converged.all()),
                             f"{min(times):.2f}"])
    table("eigenvalues by block size (default tol=1e-3; seconds: best of repeats)",
          ["operator", "k", "block", "passes", "matvecs", "max rel err", "converged", "seconds"], rows)


def bench_trace(A: torch.Tensor, lams: np.ndarray, seeds: int = 8) -> None:
    exact = float(lams.sum())
    rows = []
    for method in ["hutchinson", "hutch++", "xtrace"]:
        for budget in [30, 99, 300, None]:
            kw = {"budget": budget} if budget is not None else ({} if method != "hutchinson" else {"rtol": 0.01})
            res = [trace(A, method, seed=s, progress=False, **kw) for s in range(seeds)]
            errs = np.array([r.estimate - exact for r in res]) / abs(exact)
            se = np.mean([r.stderr for r in res]) / abs(exact)
            rows.append([method, budget or "rtol=0.01", f"{np.mean([r.matvecs for r in res]):.0f}",
                         f"{np.mean([r.passes for r in res]):.1f}", f"{np.sqrt(np.mean(errs**2)):.2e}", f"{se:.2e}"])
    table(f"trace (exact {exact:.4g}; relative rms error over {seeds} seeds vs mean reported stderr)",
          ["method", "budget", "matvecs", "passes", "rms rel err", "reported"], rows)


def bench_diagonal_and_norm(A: torch.Tensor, lams: np.ndarray) -> None:
    exact = torch.diagonal(A)
    rows = []
    for method in ["hutchinson", "xdiag"]:
        for budget in [30, 100, 300]:
            res = diagonal(A, method, budget=budget, progress=False)
            rows.append([method, budget, f"{float((res.estimate - exact).norm() / exact.norm()):.2e}"])
    table("diagonal (relative error ||d_est - d|| / ||d||)", ["method", "budget", "rel err"], rows)
    fro = float(np.sqrt((lams**2).sum()))
    rows = []
    for budget in [30, 100, 300]:
        res = frobenius_norm(A, budget=budget, progress=False)
        rows.append([budget, f"{abs(res.estimate - fro) / fro:.2e}", f"{res.stderr / fro:.2e}"])
    table("frobenius_norm (relative error, relative stderr)", ["budget", "rel err", "rel stderr"], rows)


def bench_density(A: torch.Tensor, lams: np.ndarray) -> None:
    rows = []
    for probes, steps in [(None, None), (5, 50), (10, 90)]:
        t = time.perf_counter()
        kw = {} if probes is None else {"num_probes": probes, "lanczos_steps": steps}
        res = density(A, progress=False, **kw)
        probes, steps = res.num_probes, res.lanczos_steps
        m1 = abs(res.moment(1) - lams.mean()) / abs(lams.mean())
        m2 = abs(res.moment(2) - (lams**2).mean()) / (lams**2).mean()
        rows.append([probes, steps, res.passes, res.matvecs, f"{res.sigma:.3g}", f"{m1:.2e}", f"{m2:.2e}",
                     bulk_outlier_split(res).num_outliers, f"{time.perf_counter() - t:.2f}"])
    table("density (SLQ): moment errors tr(A)/P, tr(A^2)/P; outliers found (true: 10)",
          ["probes", "steps", "passes", "matvecs", "sigma", "m1 rel err", "m2 rel err", "outliers", "seconds"], rows)
    split = bulk_outlier_split(eigenvalues(A, k=25, progress=False))
    print(f"bulk_outlier_split on top-25 Lanczos eigenvalues: {split}")


def bench_per_layer(A: torch.Tensor) -> None:
    P = A.shape[0]
    cuts = np.linspace(0, P, 6).astype(int)
    blocks = {f"layer{i}": slice(int(a), int(b)) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))}
    D = BlockDiagonalOperator(DenseOperator(A), blocks)
    t = time.perf_counter()
    res = per_layer(D, progress=False)
    exact = {n: float(torch.linalg.eigvalsh(A[s, s])[-1]) for n, s in blocks.items()}
    err = max(abs(res.top_eigenvalue[n] - exact[n]) / abs(exact[n]) for n in blocks)
    print(f"\n## per_layer: {len(blocks)} blocks, {res.matvecs} block-diagonal products, "
          f"max top-eigenvalue rel err {err:.1e}, {time.perf_counter() - t:.2f}s")
    print(res.table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for small dense products)")
    parser.add_argument("--only", default=None, help="run only this part (eigenvalues, block, trace, density, ...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lams = nn_like_spectrum(args.size)
    A = matrix_with_spectrum(lams)
    print(f"# hesse spectral estimators on a {args.size}x{args.size} NN-like spectrum "
          f"(top {lams.max():.4g}, bottom {lams.min():.4g}, trace {lams.sum():.4g})")
    parts = {"eigenvalues": lambda: bench_eigenvalues(A, lams), "block": lambda: bench_block_size(A, lams),
             "trace": lambda: bench_trace(A, lams), "diagonal": lambda: bench_diagonal_and_norm(A, lams),
             "density": lambda: bench_density(A, lams), "per_layer": lambda: bench_per_layer(A)}
    for name, part in parts.items():
        if args.only in (None, name):
            part()
    print(f"\ntotal {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
