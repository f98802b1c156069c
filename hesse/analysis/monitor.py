"""Track the sharpness (top Hessian eigenvalue) during training, against the stability threshold.

For gradient descent with step size ``η`` on a quadratic, the iteration is stable only if
``λ_max(H) < 2 / η``; with heavy-ball momentum ``β`` (``torch.optim.SGD(momentum=β)``) only if
``λ_max(H) < (2 + 2β) / η`` (3.8/η at β = 0.9). Cohen, Kaur, Li, Kolter & Talwalkar (2021),
"Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability", observed that
full-batch GD on neural networks first *sharpens progressively* (``λ_max`` rises) until it
reaches ``2 / η`` (the threshold of the optimizer in use), then
hovers there ("edge of stability") while the loss keeps decreasing non-monotonically.
:class:`SharpnessMonitor` records ``λ_max`` every few steps, warm-started from the previous
eigenvector, so each measurement costs a few Hessian-vector products.

Usage in a plain loop (two lines)::

    monitor = SharpnessMonitor(model, criterion, (X, y), every=10, optimizer=opt, log_dir="runs/eos")
    for step in range(n_steps):
        ...; opt.step()
        monitor.step()            # or monitor.step(loss=loss.item()) to log the loss too
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hesse.errors import HesseError
from hesse.operators import LinearOperator
from hesse.operators.objective import ParamSpec
from hesse.operators.data import Batch, ForwardFn
from hesse.results import to_jsonable
from hesse.analysis.landscape import resolve_reduction

__all__ = ["SharpnessMonitor"]


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SharpnessMonitor:
    """Record the top Hessian eigenvalue(s) (and optionally the trace) every ``every`` steps.

    Call :meth:`step` once per optimizer step; measurements happen when the step count is a
    multiple of ``every`` (call :meth:`record` to measure now, e.g. before training). Each
    measurement warm-starts Lanczos from the previous eigenvectors (``warm_start=True``),
    so near a slowly moving eigenvector it converges in a few products. The learning rate is
    read from ``optimizer.param_groups[0]["lr"]`` (or a fixed ``lr``), and so are ``momentum``,
    ``dampening`` and ``nesterov`` (or a fixed ``momentum``, default 0). ``history`` is a list of
    dicts with ``step, lr, momentum, two_over_lr, threshold, eigenvalue, eigenvalues, residual,
    converged, matvecs`` (+ ``trace, trace_stderr, trace_matvecs``; ``loss`` when given to
    :meth:`step`; ``time``). ``two_over_lr`` is ``2 / lr``; ``threshold`` is the largest
    curvature for which the optimizer is stable on a quadratic, the edge-of-stability line:
    ``2 / lr`` for plain gradient descent, ``(2 + 2β) / lr`` for heavy-ball momentum ``β``
    (``(2 + 2β) / ((1 - dampening) lr)`` with dampening), ``(2 + 2β) / ((1 + 2β) lr)`` for
    PyTorch's Nesterov momentum. The threshold is for SGD-type updates; for adaptive optimizers
    (Adam, RMSprop) the stability condition is on the preconditioned Hessian, and the line is
    only a reference.
    With ``log_dir`` every record rewrites ``sharpness.csv`` and ``sharpness.json`` atomically.

    ``operator`` replaces the Hessian built from ``criterion`` and ``data`` (e.g.
    ``hesse.Hessian(..., method="double-backward")`` or a ``hesse.GGN``); it must read the
    model's current weights, as hesse's curvature operators do.

    The curvature is measured with the model in eval mode (modes are restored after); the
    model's weights and ``.grad`` are never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[torch.Tensor, Any], torch.Tensor],
        data: Any,
        *,
        every: int = 10,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        momentum: float | None = None,
        trace: bool = False,
        trace_budget: int | None = None,
        log_dir: str | Path | None = None,
        k: int = 1,
        tol: float = 1e-3,
        warm_start: bool = True,
        params: ParamSpec = None,
        forward: ForwardFn | None = None,
        num_samples: Callable[[Batch], int] | None = None,
        reduction: str | None = None,
        seed: int = 0,
        operator: LinearOperator | None = None,
    ):
        from hesse.operators import Hessian

        if not (isinstance(every, int) and every >= 1):
            raise HesseError(f"every must be a positive integer, got {every!r}.")
        if not (isinstance(k, int) and k >= 1):
            raise HesseError(f"k must be a positive integer, got {k!r}.")
        if optimizer is not None and lr is not None:
            raise HesseError("pass either optimizer= (lr read from it) or a fixed lr=, not both.")
        if optimizer is not None and momentum is not None:
            raise HesseError("pass either optimizer= (momentum read from it) or a fixed momentum=, not both.")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise HesseError(f"momentum must be a number in [0, 1), got {momentum!r}.")
        if operator is None:
            reduction = resolve_reduction(criterion, reduction)
        self.model = model
        modes = [(m, m.training) for m in model.modules()]
        try:  # built in eval mode: a training model with dropout/BatchNorm is measured deterministically
            model.eval()
            self.hessian = operator if operator is not None else Hessian(
                model, criterion, data, params=params, forward=forward, num_samples=num_samples,
                reduction=reduction)
        finally:
            for m, training in modes:
                m.training = training
        self.every, self.optimizer, self.fixed_lr, self.fixed_momentum = every, optimizer, lr, momentum
        self.trace, self.trace_budget = trace, trace_budget
        self.k, self.tol, self.warm_start, self.seed = k, tol, warm_start, seed
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self._vectors: torch.Tensor | None = None
        self._t0 = time.perf_counter()

    @property
    def lr(self) -> float | None:
        """The current learning rate (``None`` when neither optimizer nor lr was given)."""
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return self.fixed_lr

    @property
    def momentum(self) -> float:
        """The current momentum ``β`` (``optimizer.param_groups[0]["momentum"]``, 0 without one)."""
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0].get("momentum", 0.0) or 0.0)
        return float(self.fixed_momentum or 0.0)

    @property
    def threshold(self) -> float | None:
        """The stability threshold on ``λ_max``: ``(2 + 2β) / lr`` (heavy ball; ``2 / lr`` without
        momentum), divided by ``1 - dampening`` with dampening and by ``1 + 2β`` with Nesterov."""
        lr = self.lr
        if not lr:
            return None
        beta = self.momentum
        group = self.optimizer.param_groups[0] if self.optimizer is not None else {}
        if group.get("nesterov", False):
            return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
        dampening = float(group.get("dampening", 0.0) or 0.0) if beta else 0.0
        if dampening >= 1.0:
            return None
        return (2.0 + 2.0 * beta) / ((1.0 - dampening) * lr)

    def step(self, loss: float | None = None) -> dict[str, Any] | None:
        """Count one optimizer step; measure (and return the record) every ``every`` steps."""
        self.step_count += 1
        if self.step_count % self.every == 0:
            return self.record(loss)
        return None

    def record(self, loss: float | None = None) -> dict[str, Any]:
        """Measure now: top eigenvalue(s), optionally the trace; log and return the record."""
        from hesse.linalg import eigenvalues

        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            v0 = self._vectors if self.warm_start else None
            eig = eigenvalues(self.hessian, k=self.k, which="largest", tol=self.tol, v0=v0,
                              seed=self.seed + self.step_count, check_symmetric=False, progress=False)
            self._vectors = eig.vectors
            rec: dict[str, Any] = {"step": self.step_count}
            lr = self.lr
            rec["lr"] = lr
            rec["momentum"] = self.momentum
            rec["two_over_lr"] = 2.0 / lr if lr else None
            rec["threshold"] = self.threshold
            rec["eigenvalue"] = float(eig.values[0])
            rec["eigenvalues"] = eig.values.tolist()
            rec["residual"] = float(eig.residuals[0])
            rec["converged"] = bool(eig.converged.all())
            rec["matvecs"] = int(eig.matvecs)
            if self.trace:
                from hesse.linalg import trace

                tr = trace(self.hessian, budget=self.trace_budget, seed=self.seed + self.step_count,
                           check_symmetric=False, progress=False)
                rec.update(trace=float(tr.estimate), trace_stderr=float(tr.stderr), trace_matvecs=int(tr.matvecs))
        finally:
            for m, training in modes:
                m.training = training
        rec["loss"] = None if loss is None else float(loss)
        rec["time"] = time.perf_counter() - self._t0
        self.history.append(rec)
        if self.log_dir is not None:
            self.save(self.log_dir)
        return rec

    # ---- views of the history ---------------------------------------------------------------
    def _column(self, key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in self.history], dtype=np.float64)

    @property
    def steps(self) -> np.ndarray:
        return self._column("step")

    @property
    def sharpness(self) -> np.ndarray:
        """The recorded top eigenvalues."""
        return self._column("eigenvalue")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "every": self.every, "k": self.k, "tol": self.tol, "warm_start": self.warm_start,
            "trace": self.trace, "history": self.history,
        })

    def save(self, log_dir: str | Path) -> tuple[Path, Path]:
        """Write ``sharpness.csv`` and ``sharpness.json`` in ``log_dir`` (atomically)."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        columns = ["step", "lr", "momentum", "two_over_lr", "threshold", "eigenvalue"]
        columns += [f"eigenvalue_{i + 1}" for i in range(self.k)]
        columns += ["residual", "converged", "matvecs"]
        if self.trace:
            columns += ["trace", "trace_stderr", "trace_matvecs"]
        columns += ["loss", "time"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in self.history:
            row = dict(r)
            for i, v in enumerate(r["eigenvalues"]):
                row[f"eigenvalue_{i + 1}"] = v
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
        csv_path, json_path = log_dir / "sharpness.csv", log_dir / "sharpness.json"
        _atomic_write(csv_path, buf.getvalue())
        _atomic_write(json_path, json.dumps(self.to_dict(), indent=2, allow_nan=True))
        return csv_path, json_path

    def plot(self, ax=None, label: str | None = None, color: str | None = None):
        """Sharpness over training with the stability threshold (``2/lr``, or ``(2+2β)/lr`` with
        momentum ``β``); returns the ``Figure``.

        Pass ``ax`` to draw into existing axes (e.g. several runs in one plot).
        """
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(6, 4))
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        line, = ax.plot(self.steps, self.sharpness, marker=".", markersize=3, label=label or "top eigenvalue",
                        color=color)
        limit = self._column("threshold")
        if not np.isfinite(limit).any():  # histories recorded before the threshold column existed
            limit = self._column("two_over_lr")
        if np.isfinite(limit).any():
            momenta = self._column("momentum")
            name = "stability threshold" if np.nan_to_num(momenta).any() else "2/lr"
            ax.plot(self.steps, limit, linestyle="--", color=line.get_color(),
                    label=f"{name}{f' ({label})' if label else ''}", drawstyle="steps-post")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness (top Hessian eigenvalue)")
        ax.legend()
        return fig

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else None
        tail = f", last eigenvalue={last['eigenvalue']:.6g} at step {last['step']}" if last else ""
        return f"SharpnessMonitor(every={self.every}, records={len(self.history)}{tail})"

