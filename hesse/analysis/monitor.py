"""Track the sharpness (top Hessian eigenvalue) during training, against the stability threshold.

For gradient descent with step size ``η`` on a quadratic, the iteration is stable only if
``λ_max(H) < 2 / η``; with heavy-ball momentum ``β`` (``torch.optim.SGD(momentum=β)``) only if
``λ_max(H) < (2 + 2β) / η`` (3.8/η at β = 0.9); see
:func:`hesse.analysis.linear_stability.stability_threshold` for dampening and Nesterov.
Cohen, Kaur, Li, Kolter & Talwalkar (2021), "Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability", observed that full-batch GD on neural networks first
*sharpens progressively* (``λ_max`` rises) until it reaches ``2 / η`` (the threshold of the
optimizer in use), then hovers there ("edge of stability") while the loss keeps decreasing non-monotonically.
:class:`SharpnessMonitor` records ``λ_max`` every few steps, warm-started from the previous
eigenvector, so each measurement costs a few Hessian-vector products.

Usage in a plain loop (two lines; ``hesse.Objective(model, criterion, (X, y))`` works too)::

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hesse.analysis.landscape import eval_mode, objective_in_eval_mode
from hesse.analysis.linear_stability import stability_threshold
from hesse.errors import HesseError, interrupted
from hesse.linalg import eigenvalues, trace
from hesse.operators import Hessian, LinearOperator, Objective
from hesse.results import to_jsonable

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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


def _not_interrupted(result: Any) -> Any:
    """``result``, unless the solver caught Ctrl-C and returned it partial: then re-raise the
    interrupt (with ``error.partial``), so training stops as the user asked."""
    if getattr(result, "interrupted", False):
        interrupted(KeyboardInterrupt(), result, "raise", "SharpnessMonitor")
    return result


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
    :meth:`step`; ``time``). ``two_over_lr`` is ``2 / lr``; ``threshold`` is
    :func:`~hesse.analysis.linear_stability.stability_threshold` of the optimizer's settings,
    the largest curvature for which it is stable on a quadratic, the edge-of-stability line:
    ``2 / lr`` for plain gradient descent, ``(2 + 2β) / lr`` for heavy-ball momentum ``β``.
    The threshold is for SGD-type updates; for adaptive optimizers (Adam, RMSprop) the
    stability condition is on the preconditioned Hessian, and the line is only a reference.
    With ``log_dir`` every record rewrites ``sharpness.csv`` and ``sharpness.json`` atomically.

    ``model`` is an :class:`hesse.Objective`, or a model with ``criterion``, ``data`` and the
    Objective's ``settings`` (``params``, ``forward``, ``num_samples``, ``reduction``, ...).
    ``operator`` replaces the Hessian of that objective (e.g. a ``hesse.GGN``); it must read
    the model's current weights, as hesse's curvature operators do.

    The curvature is measured with the model in eval mode (modes are restored after); the
    model's weights and ``.grad`` are never modified. The monitor shows no progress bars, and
    Ctrl-C during a measurement stops training (the interrupt is re-raised, never swallowed).
    """

    def __init__(
        self,
        model: nn.Module | Objective,
        criterion: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        data: Any = None,
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
        seed: int = 0,
        operator: LinearOperator | None = None,
        **settings: Any,
    ):
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
        if operator is None:  # built in eval mode: a model in train mode (dropout, BatchNorm) is accepted
            operator = Hessian(objective_in_eval_mode(model, criterion, data, **settings))
        self.model = model.model if isinstance(model, Objective) else model
        self.hessian = operator
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
        """:func:`~hesse.analysis.linear_stability.stability_threshold` of the current lr, momentum,
        dampening and Nesterov flag (``None`` without a learning rate)."""
        lr = self.lr
        if not lr:
            return None
        group = self.optimizer.param_groups[0] if self.optimizer is not None else {}
        return stability_threshold(lr, self.momentum, float(group.get("dampening", 0.0) or 0.0),
                                   bool(group.get("nesterov", False)))

    def step(self, loss: float | None = None) -> dict[str, Any] | None:
        """Count one optimizer step; measure (and return the record) every ``every`` steps."""
        self.step_count += 1
        if self.step_count % self.every == 0:
            return self.record(loss)
        return None

    def record(self, loss: float | None = None) -> dict[str, Any]:
        """Measure now: top eigenvalue(s), optionally the trace; log and return the record."""
        lr = self.lr
        rec: dict[str, Any] = {"step": self.step_count, "lr": lr, "momentum": self.momentum,
                               "two_over_lr": 2.0 / lr if lr else None, "threshold": self.threshold}
        with eval_mode(self.model):
            v0 = self._vectors if self.warm_start else None
            eig = _not_interrupted(eigenvalues(self.hessian, k=self.k, which="largest", tol=self.tol, v0=v0,
                                               seed=self.seed + self.step_count, check_symmetric=False,
                                               progress=False))
            self._vectors = eig.vectors
            rec.update(eigenvalue=float(eig.values[0]), eigenvalues=eig.values.tolist(),
                       residual=float(eig.residuals[0]), converged=bool(eig.converged.all()),
                       matvecs=int(eig.matvecs))
            if self.trace:
                tr = _not_interrupted(trace(self.hessian, budget=self.trace_budget, seed=self.seed + self.step_count,
                                            check_symmetric=False, progress=False))
                rec.update(trace=float(tr.estimate), trace_stderr=float(tr.stderr), trace_matvecs=int(tr.matvecs))
        rec["loss"] = None if loss is None else float(loss)
        rec["time"] = time.perf_counter() - self._t0
        self.history.append(rec)
        if self.log_dir is not None:
            self.save(self.log_dir)
        return rec

    # ---- views of the history ---------------------------------------------------------------
    def _column(self, key: str) -> np.ndarray:
        """One field of every record as floats (NaN where missing)."""
        return np.array([np.nan if r.get(key) is None else r[key] for r in self.history], dtype=np.float64)

    @property
    def steps(self) -> np.ndarray:
        """The step of every record."""
        return self._column("step")

    @property
    def sharpness(self) -> np.ndarray:
        """The recorded top eigenvalues."""
        return self._column("eigenvalue")

    def to_dict(self) -> dict[str, Any]:
        """The settings and the history, JSON-ready."""
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

    def plot(self, ax: Axes | None = None, label: str | None = None, color: str | None = None) -> Figure:
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

