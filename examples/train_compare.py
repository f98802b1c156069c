"""Compare SGD, Adam and hesse's curvature-aware optimizers on the same model and data.

Every optimizer trains the same model (same initialisations: one per seed) on the same
80 % training split, with the same mini-batch order, for a fixed budget of data passes
(``--epochs``) and optionally of wall time (``--seconds``, whichever ends first). Each one
is tuned over its own small learning-rate grid (3 values by default); the learning rate with
the lowest seed-mean final training loss is reported, with the steps and training seconds
(evaluation excluded) to reach ``--target`` training loss, and the final test accuracy on
the held-out 20 %. ``--monitor`` attaches :class:`hesse.SharpnessMonitor` (top Hessian
eigenvalue of the training loss on a 256-sample subset) to every run.

Optimizers: SGD (momentum 0.9), Adam, AdaHessian (Yao et al. 2021), Sophia-H and Sophia-G
(Liu et al. 2023), SAM (Foret et al. 2021; base SGD with momentum 0.9, rho 0.05) and K-FAC
(Martens & Grosse 2015; momentum 0.9, damping 1e-2 (``--kfac-damping``), factors every 10 steps). No weight decay.

Run:  python examples/train_compare.py --dataset digits --model mlp
Writes examples/output/train_compare_<dataset>_<model>.png and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from hesse import SharpnessMonitor
from hesse.errors import HesseError
from hesse.apply.optim import SAM, AdaHessian, KFACOptimizer, SophiaG, SophiaH
from hesse.examples import DigitsCNN, MNIST1DCNN, load_dataset

GRIDS = {
    "sgd": (0.03, 0.1, 0.3), "adam": (3e-3, 1e-2, 3e-2), "adahessian": (0.05, 0.15, 0.5),
    "sophia_h": (3e-3, 1e-2, 3e-2), "sophia_g": (3e-3, 1e-2, 3e-2), "sam": (0.03, 0.1, 0.3),
    "kfac": (3e-3, 1e-2, 3e-2),
}
LABELS = {"sgd": "SGD", "adam": "Adam", "adahessian": "AdaHessian", "sophia_h": "Sophia-H",
          "sophia_g": "Sophia-G", "sam": "SAM", "kfac": "K-FAC"}


def split(name: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(X_train, y_train, X_test, y_test)``: a fixed, seeded 80/20 split of a built-in dataset."""
    data = load_dataset(name)
    order = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    tr, te = order[:cut], order[cut:]
    return data.inputs[tr], data.targets[tr], data.inputs[te], data.targets[te]


def make_model(dataset: str, kind: str, in_shape: torch.Size, seed: int) -> nn.Module:
    """The CNN of :mod:`hesse.examples` for the dataset, or a 1-hidden-layer tanh MLP (64 units)."""
    torch.manual_seed(seed)
    if kind == "cnn":
        return DigitsCNN() if dataset == "digits" else MNIST1DCNN()
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 64), nn.Tanh(), nn.Linear(64, 10))


def make_optimizer(name: str, model: nn.Module, lr: float, criterion: nn.Module,
                   kfac_damping: float = 1e-2) -> torch.optim.Optimizer:
    """Each optimizer at learning rate ``lr`` with the settings described in the module docstring."""
    p = model.parameters()
    return {
        "sgd": lambda: torch.optim.SGD(p, lr=lr, momentum=0.9),
        "adam": lambda: torch.optim.Adam(p, lr=lr),
        "adahessian": lambda: AdaHessian(p, lr=lr),
        "sophia_h": lambda: SophiaH(p, lr=lr, weight_decay=0.0),
        "sophia_g": lambda: SophiaG(p, lr=lr, weight_decay=0.0),
        "sam": lambda: SAM(p, torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9),
        "kfac": lambda: KFACOptimizer(model, criterion, lr=lr, momentum=0.9, damping=kfac_damping, factor_interval=10,
                                      inverse_interval=10),
    }[name]()


def train_step(name: str, opt: torch.optim.Optimizer, model: nn.Module, criterion: nn.Module,
               X: torch.Tensor, y: torch.Tensor) -> float:
    """One step with the closure convention each optimizer needs; returns the batch loss."""
    def backward_closure() -> torch.Tensor:
        loss = criterion(model(X), y)
        loss.backward()
        return loss

    if name in ("adahessian", "sophia_h"):
        loss = opt.step(lambda: criterion(model(X), y))
    elif name == "sophia_g":
        loss = opt.step(lambda: (criterion(out := model(X), y), out))
    elif name == "sam":
        loss = opt.step(backward_closure)
    else:
        opt.zero_grad(set_to_none=True)
        loss = backward_closure()
        opt.step(batch=(X, y)) if name == "kfac" else opt.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(loss, accuracy)`` on a whole split."""
    logits = model(X)
    return float(criterion(logits, y)), float((logits.argmax(1) == y).float().mean())


def run(name: str, lr: float, seed: int, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict[str, Any]:
    """Train one (optimizer, lr, seed) within the budget; the curve is evaluated every ``--eval-every`` steps."""
    Xtr, ytr, Xte, yte = data
    criterion = nn.CrossEntropyLoss()
    model = make_model(args.dataset, args.model, Xtr.shape[1:], seed)
    opt = make_optimizer(name, model, lr, criterion, args.kfac_damping)
    monitor = SharpnessMonitor(model, criterion, (Xtr[:256], ytr[:256]), every=args.monitor_every, optimizer=opt) \
        if args.monitor else None
    if monitor is not None:
        monitor.record()  # the sharpness at initialisation
    order_gen = torch.Generator().manual_seed(1000 + seed)
    curve, step, seconds = [], 0, 0.0
    curve.append(dict(step=0, seconds=0.0, epoch=0, **_metrics(model, criterion, data)))
    for epoch in range(args.epochs):
        order = torch.randperm(len(ytr), generator=order_gen)
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            start = time.perf_counter()
            model.train()
            try:
                loss = train_step(name, opt, model, criterion, Xtr[idx], ytr[idx])
            except (HesseError, torch.linalg.LinAlgError):  # K-FAC on diverged weights
                loss = math.nan
            seconds += time.perf_counter() - start
            if not math.isfinite(loss):  # diverged: the run ends with a nan loss
                break
            step += 1
            if monitor is not None:
                monitor.step()
            if step % args.eval_every == 0:
                curve.append(dict(step=step, seconds=seconds, epoch=epoch + (i + len(idx)) / len(order),
                                  **_metrics(model, criterion, data)))
            if args.seconds is not None and seconds >= args.seconds:
                break
        if not math.isfinite(loss) or (args.seconds is not None and seconds >= args.seconds):
            break
    curve.append(dict(step=step, seconds=seconds, epoch=epoch + 1, **_metrics(model, criterion, data)))
    sharp = [(h["step"], h["eigenvalue"]) for h in monitor.history] if monitor is not None else []
    return dict(optimizer=name, lr=lr, seed=seed, curve=curve, sharpness=sharp)


def _metrics(model: nn.Module, criterion: nn.Module, data: tuple[torch.Tensor, ...]) -> dict[str, float]:
    model.eval()
    train_loss, train_acc = evaluate(model, criterion, data[0], data[1])
    test_loss, test_acc = evaluate(model, criterion, data[2], data[3])
    return dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)


def to_target(curve: list[dict[str, float]], target: float) -> tuple[float, float]:
    """``(steps, seconds)`` at the first evaluation with training loss ≤ ``target`` (``nan`` if never)."""
    for point in curve:
        if point["train_loss"] <= target:
            return point["step"], point["seconds"]
    return math.nan, math.nan


def summarise(runs: list[dict[str, Any]], target: float) -> dict[str, dict[str, Any]]:
    """Per optimizer: the lr with the lowest seed-mean final training loss, and its numbers over seeds."""
    table = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
            if r["optimizer"] == name:
                by_lr.setdefault(r["lr"], []).append(r)
        final = {lr: np.mean([_final(r)["train_loss"] for r in rs]) for lr, rs in by_lr.items()}
        best = min(final, key=lambda lr: final[lr] if math.isfinite(final[lr]) else math.inf)
        rs = by_lr[best]
        hits = [to_target(r["curve"], target) for r in rs]
        table[name] = dict(
            lr=best, final_loss=_stats([_final(r)["train_loss"] for r in rs]),
            test_acc=_stats([_final(r)["test_acc"] for r in rs]),
            steps_to_target=_stats([h[0] for h in hits]), seconds_to_target=_stats([h[1] for h in hits]),
            reached=sum(math.isfinite(h[0]) for h in hits), seeds=len(rs),
            diverged=sum(not math.isfinite(_final(r)["train_loss"]) for r in rs),
            seconds_per_step=_stats([_final(r)["seconds"] / max(_final(r)["step"], 1) for r in rs]),
            final_loss_by_lr={str(lr): float(v) for lr, v in final.items()},
        )
    return table


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to 5 significant digits (a compact JSON record)."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _final(r: dict[str, Any]) -> dict[str, float]:
    return r["curve"][-1]


def _stats(values: list[float]) -> tuple[float, float]:
    """``(mean, std)`` over the finite values (``nan`` when none)."""
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)), float(np.std(finite))) if finite else (math.nan, math.nan)


def plot(runs: list[dict[str, Any]], table: dict[str, dict[str, Any]], args: argparse.Namespace) -> Figure:
    """Training loss against steps and against seconds, and test accuracy against steps (best lr, seed mean)."""
    panels = 4 if args.monitor else 3
    fig = Figure(figsize=(4.2 * panels, 3.8), layout="constrained")
    axes = fig.subplots(1, panels)
    for k, (name, row) in enumerate(table.items()):
        rs = [r for r in runs if r["optimizer"] == name and r["lr"] == row["lr"]]
        rs = [r for r in rs if math.isfinite(_final(r)["train_loss"])] or rs  # diverged seeds would cut the curve
        n = min(len(r["curve"]) for r in rs)
        mean = {key: np.mean([[p[key] for p in r["curve"][:n]] for r in rs], axis=0)
                for key in ("step", "seconds", "train_loss", "test_acc")}
        label, color = f"{LABELS[name]} (lr {row['lr']:g})", f"C{k}"
        axes[0].plot(mean["step"], mean["train_loss"], color=color, label=label)
        axes[1].plot(mean["seconds"], mean["train_loss"], color=color)
        axes[2].plot(mean["step"], mean["test_acc"], color=color)
        if args.monitor and rs[0]["sharpness"]:
            s = np.array(rs[0]["sharpness"])
            axes[3].plot(s[:, 0], s[:, 1], color=color)
    for ax, (x, y) in zip(axes, [("step", "training loss"), ("training seconds", "training loss"),
                                  ("step", "test accuracy"), ("step", "sharpness λ_max (seed 0)")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.axhline(args.target, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{args.dataset} {args.model}: {args.epochs} epochs, batch {args.batch_size}, "
                 f"{len(args.seeds)} seeds, best of {len(args.lrs or GRIDS['sgd'])} learning rates")
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--optimizers", nargs="+", choices=tuple(GRIDS), default=list(GRIDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="one learning-rate grid for all selected optimizers (default: each one's GRIDS entry)")
    parser.add_argument("--epochs", type=int, default=20, help="budget of passes over the training split")
    parser.add_argument("--seconds", type=float, default=None, help="budget of training seconds per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.1, help="training loss to reach")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--monitor", action="store_true", help="attach hesse.SharpnessMonitor to every run")
    parser.add_argument("--monitor-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--kfac-damping", type=float, default=1e-2)
    parser.add_argument("--replot", action="store_true", help="redo the table and figure from the saved JSON")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = args.out / f"train_compare_{args.dataset}_{args.model}{args.tag}"
    runs = json.loads(stem.with_suffix(".json").read_text())["runs"] if args.replot else train_all(args)
    table = summarise(runs, args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, table, args).savefig(stem.with_suffix(".png"), dpi=120)
    record = dict(args={k: str(v) for k, v in vars(args).items()}, table=table, runs=runs)
    stem.with_suffix(".json").write_text(json.dumps(_rounded(record), separators=(",", ":")))
    print_table(table, args.target)


def train_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (optimizer, lr, seed) run, printed as it ends."""
    data = split(args.dataset)
    runs = []
    for name in args.optimizers:
        for lr in args.lrs or GRIDS[name]:
            for seed in args.seeds:
                runs.append(run(name, lr, seed, data, args))
                c = runs[-1]["curve"][-1]
                print(f"{LABELS[name]:>10} lr={lr:<7g} seed={seed} steps={c['step']:4d} {c['seconds']:6.1f}s "
                      f"train loss {c['train_loss']:.4f} test acc {c['test_acc']:.3f}", flush=True)
    return runs


def print_table(table: dict[str, dict[str, Any]], target: float) -> None:
    """The markdown table of :func:`summarise`."""
    print(f"\n| optimizer | best lr | final train loss | test acc | steps to loss {target} | "
          f"train s to {target} | reached | diverged | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt: Callable[[tuple[float, float], str], str] = lambda s, f: f"{s[0]:{f}} ± {s[1]:{f}}"
    for name, row in table.items():
        print(f"| {LABELS[name]} | {row['lr']:g} | {fmt(row['final_loss'], '.4f')} | {fmt(row['test_acc'], '.3f')} | "
              f"{fmt(row['steps_to_target'], '.0f')} | {fmt(row['seconds_to_target'], '.2f')} | "
              f"{row['reached']}/{row['seeds']} | {row['diverged']} | {1000 * row['seconds_per_step'][0]:.2f} |")


if __name__ == "__main__":
    main()
