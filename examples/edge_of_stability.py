"""Reproduce the edge of stability (Cohen, Kaur, Li, Kolter & Talwalkar, ICLR 2021).

Full-batch gradient descent with step size ``lr`` on a small tanh network, scikit-learn's
digits (a subset, standardised features), squared loss ``½ ||f(x) - onehot(y)||²`` averaged
over samples. The top Hessian eigenvalue ("sharpness") first rises (progressive sharpening)
until it reaches ``2 / lr``, the stability limit of GD on a quadratic, and then hovers there
while the loss keeps going down. :class:`hesse.SharpnessMonitor` measures the sharpness of
the training :class:`hesse.Objective` every few steps, warm-started from the previous
eigenvector; :func:`hesse.stability_threshold` gives the edge (``2 / lr`` for plain GD).

Run:  python examples/edge_of_stability.py            (a few minutes on 2 CPU cores)
Writes examples/output/edge_of_stability.png and .json (and the monitors' CSV/JSON logs
under examples/output/edge_of_stability_logs/ with --logs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import nn

from hesse import Objective, SharpnessMonitor, stability_threshold
from hesse.linalg import eigenvalues


class HalfSquaredError(nn.Module):
    """``½ ||output - target||²`` summed over outputs, averaged over samples (Cohen et al.'s MSE)."""

    reduction = "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of a batch."""
        return 0.5 * ((output - target) ** 2).sum(1).mean()


def digits_subset(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random digits, features standardised, targets one-hot."""
    X, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(y))[:n]
    X, y = X[idx], y[idx]
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    return torch.tensor(X, dtype=dtype), nn.functional.one_hot(torch.tensor(y), 10).to(dtype)


def make_model(width: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A 64-width-width-10 tanh MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    ).to(dtype)


def run(lr: float, X: torch.Tensor, Y: torch.Tensor, args: argparse.Namespace, log_dir: Path | None) -> dict:
    """Train with full-batch GD at ``lr``; return the monitor's history and the losses."""
    model = make_model(args.width, X.dtype)
    criterion = HalfSquaredError()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    objective = Objective(model, criterion, (X, Y))
    monitor = SharpnessMonitor(objective, every=args.every, optimizer=opt, tol=args.tol, log_dir=log_dir)
    monitor.record()  # step 0
    losses = []
    for _ in range(args.steps):
        opt.zero_grad()
        loss = criterion(model(X), Y)
        loss.backward()
        opt.step()
        monitor.step(loss.item())
        losses.append(loss.item())
    return {"monitor": monitor, "losses": np.array(losses)}


def summarize(lr: float, monitor: SharpnessMonitor, losses: np.ndarray, steps: int) -> dict:
    """Plateau sharpness = median of the records in the last quarter of training."""
    s, lam = monitor.steps, monitor.sharpness
    edge = stability_threshold(lr)  # 2 / lr: full-batch GD without momentum
    reached = np.nonzero(lam >= 0.9 * edge)[0]
    late = s >= 0.75 * steps
    plateau = float(np.median(lam[late]))
    return {
        "lr": lr,
        "two_over_lr": edge,
        "initial_sharpness": float(lam[0]),
        "plateau_sharpness": plateau,
        "plateau_min": float(lam[late].min()),
        "plateau_max": float(lam[late].max()),
        "final_sharpness": float(lam[-1]),
        "ratio_plateau_to_2_over_lr": plateau / edge,
        "step_reaching_0.9_of_2_over_lr": int(s[reached[0]]) if len(reached) else None,
        "final_loss": float(losses[-1]),
        "records": len(lam),
        "mean_matvecs_per_record": float(np.mean([r["matvecs"] for r in monitor.history[1:]])),
        "cold_start_matvecs_at_end": cold_start_matvecs(monitor),
    }


def cold_start_matvecs(monitor: SharpnessMonitor) -> int:
    """Products a cold (random) start needs at the final weights, for comparison with warm starts."""
    return int(eigenvalues(monitor.hessian, tol=monitor.tol, check_symmetric=False, progress=False).matvecs)


def plot(results: dict[float, dict], path: Path) -> None:
    """Sharpness (with each run's threshold) and training loss of every run, one figure."""
    fig = Figure(figsize=(7, 7))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for i, (lr, r) in enumerate(sorted(results.items())):
        color = f"C{i}"
        r["monitor"].plot(ax=ax1, label=f"lr={lr:g}", color=color)
        ax2.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], color=color, label=f"lr={lr:g}", lw=0.8)
    ax1.set_title("Edge of stability: full-batch GD, tanh MLP, digits, squared loss")
    ax1.legend(fontsize=8, ncol=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Train at each learning rate, print a summary, write the figure and the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--n", type=int, default=1000, help="number of digits in the subset")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    parser.add_argument("--logs", action="store_true", help="also write the monitors' CSV/JSON logs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.float32 else torch.float64
    X, Y = digits_subset(args.n, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for lr in args.lrs:
        log_dir = args.out / "edge_of_stability_logs" / f"lr_{lr:g}" if args.logs else None
        results[lr] = run(lr, X, Y, args, log_dir)
        summary = summarize(lr, results[lr]["monitor"], results[lr]["losses"], args.steps)
        results[lr]["summary"] = summary
        print(f"lr={lr:g}: sharpness {summary['initial_sharpness']:.3g} -> plateau {summary['plateau_sharpness']:.4g} "
              f"(2/lr = {summary['two_over_lr']:.4g}, ratio {summary['ratio_plateau_to_2_over_lr']:.3f}), "
              f"final loss {summary['final_loss']:.4g}, {summary['mean_matvecs_per_record']:.1f} products/record "
              f"(cold start {summary['cold_start_matvecs_at_end']})", flush=True)
    plot(results, args.out / "edge_of_stability.png")
    report = {
        "setup": {
            "data": f"sklearn digits, {args.n} samples, standardised features, one-hot targets",
            "model": f"MLP 64-{args.width}-{args.width}-10, tanh", "loss": "0.5 * ||f(x) - y||^2, mean over samples",
            "optimizer": "full-batch gradient descent", "steps": args.steps, "every": args.every,
            "dtype": str(dtype), "eigen_tol": args.tol,
            "plateau": "median top eigenvalue over the records in the last quarter of training",
        },
        "runs": [results[lr]["summary"] for lr in args.lrs],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "edge_of_stability.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'edge_of_stability.png'} and .json in {report['seconds']} s")


if __name__ == "__main__":
    main()
