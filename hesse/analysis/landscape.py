"""Loss landscapes: the full-data loss (and accuracy) on lines and planes through weight space.

``loss_landscape`` evaluates ``L(w + a d1)`` (1-D) or ``L(w + a d1 + b d2)`` (2-D) over a grid
for random filter-normalised directions (Li, Xu, Taylor, Studer & Goldstein 2018,
"Visualizing the Loss Landscape of Neural Nets"), the top Hessian eigenvectors, or given
directions; ``interpolate`` evaluates ``L((1 - t) w_A + t w_B)`` between two models (linear
mode connectivity; Goodfellow, Vinyals & Saxe 2015; Garipov et al. 2018; Frankle et al. 2020).

Every function works on the model in place and restores its parameters and buffers
bit-for-bit, and the train/eval mode of every module, on return, on error and on Ctrl-C.
Loss and accuracy are sample-weighted over the whole dataset, so uneven batches are exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hesse.errors import HesseError
from hesse.operators.objective import ParamSpec, select_parameters
from hesse.operators.data import (
    Batch,
    DataSource,
    ForwardFn,
    all_reduce_sum,
    default_forward,
    sample_counter,
    to_device,
)
from hesse.results import _ResultMixin

__all__ = ["Evaluator", "Landscape", "interpolate", "loss_landscape", "normalize_direction", "preserved",
           "random_direction"]

Direction = dict[str, torch.Tensor] | torch.Tensor
NORMALIZATIONS = ("filter", "layer", None)
BATCHNORM = ("interpolate", "recompute", "keep")


# ---- keeping the model intact -----------------------------------------------------------------
@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Save every parameter and buffer (a copy) and every module's mode; put them back on exit.

    Restoration is ``copy_`` from the saved copy, so values are bit-identical afterwards,
    also when the body raises or is interrupted (``KeyboardInterrupt``).
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    saved = [(t, t.detach().clone()) for _, t in tensors]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, copy in saved:
                t.copy_(copy)
        for m, training in modes:
            m.training = training


class _FlatParams:
    """The selected parameters of a model as one flat vector (read and written in place)."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.names = list(params)
        self.numels = [p.numel() for p in params.values()]
        first = next(iter(params.values()))
        self.dtype, self.device = first.dtype, first.device

    @property
    def size(self) -> int:
        return sum(self.numels)

    def get(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params.values()])

    def set(self, vector: torch.Tensor) -> None:
        with torch.no_grad():
            for p, part in zip(self.params.values(), torch.split(vector, self.numels)):
                p.copy_(part.view_as(p))

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vector, self.numels)
        return {n: t.view_as(p) for (n, p), t in zip(self.params.items(), parts)}

    def flatten(self, direction: Direction) -> torch.Tensor:
        """A direction (dict by name, missing names = 0, or a flat ``[P]`` vector) as flat ``[P]``."""
        if isinstance(direction, torch.Tensor):
            if direction.ndim != 1 or direction.numel() != self.size:
                raise HesseError(
                    f"a flat direction must have shape [{self.size}] (the selected parameters), "
                    f"got {list(direction.shape)}."
                )
            return direction.detach().to(self.dtype).to(self.device)
        if not isinstance(direction, dict):
            raise HesseError(
                f"a direction is a dict {{name: tensor}} or a flat [P] tensor, got {type(direction).__name__}."
            )
        unknown = set(direction) - set(self.names)
        if unknown:
            raise HesseError(
                f"direction names {sorted(unknown)} are not selected parameters; names look like {self.names[:4]}."
            )
        parts = []
        for n, p in self.params.items():
            d = direction.get(n)
            if d is None:
                parts.append(torch.zeros(p.numel(), dtype=self.dtype, device=self.device))
                continue
            if tuple(d.shape) != tuple(p.shape):
                raise HesseError(f"direction for {n!r} has shape {list(d.shape)}, the parameter {list(p.shape)}.")
            parts.append(d.detach().reshape(-1).to(self.dtype).to(self.device))
        return torch.cat(parts)


# ---- sample-weighted full-data passes ---------------------------------------------------------
def _accuracy_counts(output: torch.Tensor, target: Any) -> tuple[float, int] | None:
    """``(correct, count)`` for a classification output, ``None`` when the task is not one.

    Integer targets ``[N, ...]`` with outputs ``[N, C, ...]`` compare ``argmax`` over ``C``
    (entries equal to -100, PyTorch's ignore index, are skipped); one-hot/probability targets
    of the output's shape compare ``argmax`` of both.
    """
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor) or output.ndim < 2:
        return None
    if not target.is_floating_point() and target.ndim == output.ndim - 1 and output.shape[1] > 1:
        keep = target != -100
        correct = (output.argmax(1) == target) & keep
        return float(correct.sum()), int(keep.sum())
    if target.is_floating_point() and target.shape == output.shape and output.shape[1] > 1:
        is_dist = bool((target >= 0).all()) and bool(torch.allclose(target.sum(1), torch.ones(()).to(target)))
        if is_dist:
            return float((output.argmax(1) == target.argmax(1)).sum()), int(target[:, 0].numel())
    return None


def resolve_reduction(criterion: Any, reduction: str | None) -> str:
    """``reduction`` or the criterion's own (``"mean"`` for a plain function); ``"mean"`` or ``"sum"``."""
    resolved = reduction if reduction is not None else getattr(criterion, "reduction", "mean")
    if resolved not in ("mean", "sum"):
        raise HesseError(
            f"criterion reduction is {resolved!r}; the loss must be a scalar: use reduction 'mean' or 'sum' "
            "(for a plain function say which with reduction=)."
        )
    return resolved


class Evaluator:
    """Sample-weighted full-data loss, accuracy and gradient at the model's current weights.

    With a ``reduction="mean"`` criterion ``L = Σ_b (n_b / N) L_b``; with ``"sum"`` ``L = Σ_b L_b``
    (summed over processes when ``torch.distributed`` is initialised). ``reduction`` defaults to
    ``criterion.reduction`` (``"mean"`` for a plain function: pass ``reduction="sum"`` for a
    summed one); ``"none"`` is refused. ``n_b`` counts the non-ignored targets for a criterion
    with an ``ignore_index`` (unless ``num_samples`` is given).
    Gradients are taken with ``torch.autograd.grad``, so ``.grad`` is never touched; selected
    parameters with ``requires_grad=False`` are differentiated too (the flag is restored).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[torch.Tensor, Any], torch.Tensor],
        data: Any,
        *,
        params: ParamSpec = None,
        forward: ForwardFn | None = None,
        num_samples: Callable[[Batch], int] | None = None,
        reduction: str | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise HesseError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(criterion):
            raise HesseError("criterion must be a loss callable criterion(output, target), e.g. nn.CrossEntropyLoss().")
        self.model, self.criterion = model, criterion
        self.data = DataSource(data)
        self.forward = forward or default_forward
        self.num_samples = sample_counter(criterion, num_samples)
        self.reduction = resolve_reduction(criterion, reduction)
        self.flat = _FlatParams(select_parameters(model, params))
        self.passes = 0

    def __call__(self, grad: bool = False) -> tuple[float, float | None, torch.Tensor | None]:
        """``(loss, accuracy or None, flat gradient or None)`` over the whole dataset."""
        loss_sum, count, correct, total = 0.0, 0, 0.0, 0
        g_sum: torch.Tensor | None = None
        params = list(self.flat.params.values())
        frozen = [p for p in params if not p.requires_grad] if grad else []
        try:
            for p in frozen:  # differentiate explicitly selected frozen parameters too
                p.requires_grad_(True)
            loss_sum, count, correct, total, classification, g_sum = self._passes(grad, params)
        finally:
            for p in frozen:
                p.requires_grad_(False)
        stats = torch.tensor([loss_sum, count, correct, total, float(not classification)], dtype=torch.float64,
                             device=self.flat.device)
        all_reduce_sum(stats)  # over processes under torch.distributed (no-op otherwise)
        if g_sum is not None:
            all_reduce_sum(g_sum)
        loss_sum, count, correct, total, not_classification = stats.tolist()
        self.passes += 1
        norm = count if self.reduction == "mean" else 1
        accuracy = correct / total if not_classification == 0 and total > 0 else None
        return loss_sum / norm, accuracy, (g_sum / norm if g_sum is not None else None)

    def _passes(self, grad: bool, params: list[torch.Tensor]):
        """This process's weighted sums over its batches."""
        loss_sum, count, correct, total = 0.0, 0, 0.0, 0
        g_sum: torch.Tensor | None = None
        classification = True
        for batch in self.data:
            batch = to_device(batch, self.flat.device)
            n = int(self.num_samples(batch))
            with torch.set_grad_enabled(grad):
                output, target = self.forward(self.model, batch)
                loss = self.criterion(output, target)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise HesseError("the criterion must return a scalar; use reduction='mean' or 'sum'.")
            weight = float(n) if self.reduction == "mean" else 1.0
            loss_sum += weight * float(loss.detach())
            count += n
            if grad:
                gs = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
                g = torch.cat([x.reshape(-1) for x in gs]) * weight
                g_sum = g if g_sum is None else g_sum + g
            counts = _accuracy_counts(output, target) if classification else None
            if counts is None:
                classification = False
            else:
                correct, total = correct + counts[0], total + counts[1]
        return loss_sum, count, correct, total, classification, g_sum


# ---- directions ---------------------------------------------------------------------------------
def normalize_direction(
    direction: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    normalization: str | None = "filter",
    ignore_1d: bool = True,
) -> dict[str, torch.Tensor]:
    """Rescale a direction to the scale of the weights (Li et al. 2018).

    ``"filter"``: each filter ``d_i`` (a slice along dim 0: a conv output channel, a linear
    row) becomes ``d_i / ||d_i|| * ||w_i||``; ``"layer"``: each tensor ``d / ||d|| * ||w||``;
    ``None``: unchanged. 1-D tensors (biases, normalisation scales/shifts) are zeroed when
    ``ignore_1d`` (the paper's default), otherwise normalised as one filter.
    """
    if normalization not in NORMALIZATIONS:
        raise HesseError(f"unknown normalization {normalization!r}; choose 'filter', 'layer' or None.")
    out = {}
    for name, d in direction.items():
        w = weights[name].detach().to(d.dtype)
        if d.ndim <= 1 and ignore_1d:
            out[name] = torch.zeros_like(d)
        elif normalization is None:
            out[name] = d.clone()
        elif normalization == "layer" or d.ndim <= 1:
            out[name] = d * (w.norm() / d.norm().clamp_min(1e-30))
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-30)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            out[name] = d * (wn / dn).view(-1, *([1] * (d.ndim - 1)))
    return out


def random_direction(
    weights: dict[str, torch.Tensor],
    generator: torch.Generator,
    normalization: str | None = "filter",
    ignore_1d: bool = True,
) -> dict[str, torch.Tensor]:
    """A Gaussian direction (drawn in float64 on the CPU, so reproducible across devices),
    normalised by :func:`normalize_direction`."""
    raw = {
        n: torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.dtype).to(w.device)
        for n, w in weights.items()
    }
    return normalize_direction(raw, weights, normalization, ignore_1d)


# ---- results ------------------------------------------------------------------------------------
@dataclass(repr=False)
class Landscape(_ResultMixin):
    """Loss (and accuracy) over a 1-D line or 2-D plane of weights.

    ``loss[i]`` is at ``alphas[i]`` (1-D); ``loss[i, j]`` at ``(alphas[i], betas[j])`` (2-D).
    ``accuracy`` is ``None`` unless the task is classification. ``kind`` is ``"random"``,
    ``"hessian"``, ``"given"`` or ``"interpolation"`` (``alphas`` are then ``t``, model A at 0).
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray | None
    kind: str
    base_loss: float
    base_accuracy: float | None
    info: dict = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return 1 if self.betas is None else 2

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path.npz`` (the arrays) and ``path.json`` (everything); returns both paths."""
        base = Path(path)
        if base.suffix in (".npz", ".json"):
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"alphas": self.alphas, "loss": self.loss}
        if self.betas is not None:
            arrays["betas"] = self.betas
        if self.accuracy is not None:
            arrays["accuracy"] = self.accuracy
        npz, js = base.with_suffix(".npz"), base.with_suffix(".json")
        np.savez(npz, **arrays)
        js.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True))
        return npz, js

    @classmethod
    def load(cls, path: str | Path) -> "Landscape":
        """Read a landscape written by :meth:`save` (from the ``.json`` file)."""
        d = json.loads(Path(path).with_suffix(".json").read_text())
        arr = lambda x: None if x is None else np.asarray(x, dtype=np.float64)  # noqa: E731
        return cls(arr(d["alphas"]), arr(d["betas"]), arr(d["loss"]), arr(d["accuracy"]), d["kind"],
                   d["base_loss"], d["base_accuracy"], d.get("info", {}))

    def plot(self, kind: str | None = None, log: bool = False):
        """A matplotlib ``Figure`` (no pyplot, so safe headless; ``fig.savefig(path)``).

        ``kind``: ``"line"`` (1-D; accuracy on a second axis), ``"contour"`` or ``"surface"``
        (2-D); default line for 1-D, contour for 2-D. ``log`` plots ``log10`` of the loss.
        """
        from matplotlib.figure import Figure

        kind = kind or ("line" if self.dims == 1 else "contour")
        if kind not in ("line", "contour", "surface"):
            raise HesseError(f"unknown plot kind {kind!r}; choose 'line', 'contour' or 'surface'.")
        if (kind == "line") != (self.dims == 1):
            raise HesseError(f"a {self.dims}-D landscape cannot be drawn as {kind!r}; use "
                             f"{'line' if self.dims == 1 else 'contour or surface'}.")
        z = np.log10(np.maximum(self.loss, 1e-300)) if log else self.loss
        zlabel = "log10 loss" if log else "loss"
        xlabel = "t (0 = model A, 1 = model B)" if self.kind == "interpolation" else "alpha"
        fig = Figure(figsize=(6, 4.5))
        if kind == "line":
            ax = fig.add_subplot()
            ax.plot(self.alphas, z, color="C0", marker=".", label="loss")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(zlabel, color="C0")
            if self.accuracy is not None:
                ax2 = ax.twinx()
                ax2.plot(self.alphas, self.accuracy, color="C1", marker=".", label="accuracy")
                ax2.set_ylabel("accuracy", color="C1")
        elif kind == "contour":
            ax = fig.add_subplot()
            A, B = np.meshgrid(self.alphas, self.betas, indexing="ij")
            cs = ax.contour(A, B, z, levels=20, cmap="viridis")
            ax.clabel(cs, fontsize=7)
            ax.plot([0], [0], "k+", markersize=10)
            ax.set_xlabel("alpha")
            ax.set_ylabel("beta")
        else:
            ax = fig.add_subplot(projection="3d")
            A, B = np.meshgrid(self.alphas, self.betas, indexing="ij")
            ax.plot_surface(A, B, z, cmap="viridis", linewidth=0, antialiased=True)
            ax.set_xlabel("alpha")
            ax.set_ylabel("beta")
            ax.set_zlabel(zlabel)
        ax.set_title(f"loss landscape ({self.kind})")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.loss.shape)
        return (f"Landscape({self.kind}, {self.dims}-D grid {shape}, base_loss={self.base_loss:.6g}, "
                f"min={np.nanmin(self.loss):.6g}, max={np.nanmax(self.loss):.6g})")


# ---- public functions ---------------------------------------------------------------------------
def loss_landscape(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, Any], torch.Tensor],
    data: Any,
    *,
    directions: str | Sequence[Direction] = "random",
    dims: int | None = None,
    steps: int = 21,
    span: tuple[float, float] = (-1.0, 1.0),
    normalization: str | None = "filter",
    ignore_1d: bool = True,
    params: ParamSpec = None,
    forward: ForwardFn | None = None,
    num_samples: Callable[[Batch], int] | None = None,
    reduction: str | None = None,
    seed: int = 0,
    tol: float = 1e-3,
    progress: bool = True,
) -> Landscape:
    """Loss and accuracy on ``w + a d1`` (``dims=1``) or ``w + a d1 + b d2`` (``dims=2``),
    ``a, b`` on ``steps`` points of ``span``.

    ``directions``:
      * ``"random"``: Gaussian directions, rescaled by ``normalization`` (``"filter"``:
        Li et al. 2018's filter normalisation, ``"layer"`` or ``None``; see
        :func:`normalize_direction`); 1-D parameters zeroed when ``ignore_1d``;
      * ``"hessian"``: the top ``dims`` Hessian eigenvectors (unit norm; eigenvalues in
        ``info["eigenvalues"]``), from :func:`hesse.linalg.eigenvalues` with tolerance ``tol``;
      * a list of 1 or 2 directions, each a dict ``{param name: tensor}`` (missing names are
        zero) or a flat ``[P]`` vector over the selected parameters, used as given.
    ``reduction``: ``"mean"`` or ``"sum"``, how ``criterion`` reduces over a batch (default
    ``criterion.reduction``, ``"mean"`` for a plain function).
    The model is evaluated in eval mode (BatchNorm running statistics, no dropout); its
    weights, buffers and modes are restored exactly afterwards.
    """
    if isinstance(directions, str):
        if directions not in ("random", "hessian"):
            raise HesseError(f"directions must be 'random', 'hessian' or a list of directions, got {directions!r}.")
        dims = 1 if dims is None else dims
        kind = directions
    else:
        given = [directions] if isinstance(directions, (torch.Tensor, dict)) else list(directions)
        if dims is not None and dims != len(given):
            raise HesseError(f"dims={dims} but {len(given)} directions were given.")
        dims, kind = len(given), "given"
    if dims not in (1, 2):
        raise HesseError(f"dims must be 1 or 2, got {dims}.")
    if not (isinstance(steps, int) and steps >= 2):
        raise HesseError(f"steps must be an integer >= 2, got {steps!r}.")
    ev = Evaluator(model, criterion, data, params=params, forward=forward, num_samples=num_samples,
                   reduction=reduction)
    weights = {n: p.detach() for n, p in ev.flat.params.items()}
    info: dict[str, Any] = {"normalization": normalization if kind == "random" else None,
                            "ignore_1d": ignore_1d, "seed": seed, "span": list(span), "steps": steps}
    with preserved(model):
        model.eval()
        if kind == "random":
            gen = torch.Generator().manual_seed(seed)
            vecs = [ev.flat.flatten(random_direction(weights, gen, normalization, ignore_1d)) for _ in range(dims)]
        elif kind == "hessian":
            from hesse.linalg import eigenvalues
            from hesse.operators import Hessian

            H = Hessian(model, criterion, data, params=params, forward=forward, num_samples=num_samples,
                        reduction=ev.reduction)
            eig = eigenvalues(H, k=dims, which="largest", tol=tol, seed=seed, progress=progress)
            vecs = [eig.vectors[:, i].to(ev.flat.dtype) for i in range(dims)]
            info.update(eigenvalues=eig.values.tolist(), eigen_matvecs=eig.matvecs,
                        eigen_converged=eig.converged.tolist())
        else:
            vecs = [ev.flat.flatten(d) for d in given]
        info["direction_norms"] = [float(v.norm()) for v in vecs]
        w0 = ev.flat.get()
        base_loss, base_acc, _ = ev()
        alphas = np.linspace(span[0], span[1], steps)
        grid = [(a,) for a in alphas] if dims == 1 else [(a, b) for a in alphas for b in alphas]
        losses, accs = np.empty(len(grid)), np.empty(len(grid))
        for i, point in enumerate(tqdm(grid, desc="loss landscape", disable=not progress, leave=False)):
            w = w0
            for c, v in zip(point, vecs):
                w = w + float(c) * v
            ev.flat.set(w)
            losses[i], acc, _ = ev()
            accs[i] = np.nan if acc is None else acc
    shape = (steps,) if dims == 1 else (steps, steps)
    return Landscape(
        alphas=alphas, betas=alphas.copy() if dims == 2 else None, loss=losses.reshape(shape),
        accuracy=None if base_acc is None else accs.reshape(shape), kind=kind,
        base_loss=base_loss, base_accuracy=base_acc, info=info,
    )


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _recompute_batchnorm(model: nn.Module, ev: Evaluator) -> None:
    """Re-estimate BatchNorm running statistics as exact sample-weighted averages over ``data``.

    One pass with every module in eval mode and a forward hook on each BatchNorm that tracks
    running statistics: the hook accumulates, per channel, the count, ``Σ(x - K)`` and
    ``Σ(x - K)²`` of its input (float64, shifted by the old running mean ``K`` against
    cancellation) and returns the input normalised by the batch's own statistics, as a
    train-mode forward would (so later layers see what they see in training). Afterwards
    ``running_mean = Σx / N`` and ``running_var = N / (N - 1) · (E[x²] - mean²)`` (unbiased, as
    BatchNorm keeps it), ``N`` counting all elements of a channel over the whole dataset, so
    the result does not depend on how the data is split into batches, and a batch of one
    sample is fine. Sums are added over processes under ``torch.distributed``.
    """
    bns = [m for m in _batchnorms(model) if m.track_running_stats and m.running_mean is not None]
    if not bns:
        return
    sums: dict[int, list] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if x.ndim < 2:
            raise HesseError(f"a BatchNorm input has shape {list(x.shape)}; expected [N, C, ...].")
        dims = [0] + list(range(2, x.ndim))
        view = [1, -1] + [1] * (x.ndim - 2)
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            shift, acc = sums[id(module)][0], sums[id(module)][1]
            xd = x.detach().to(torch.float64) - shift.view(view)
            acc[0] += n
            acc[1] += xd.sum(dims)
            acc[2] += (xd * xd).sum(dims)
            mean = xd.mean(dims)
            var = (xd - mean.view(view)).pow(2).mean(dims)  # biased, as train-mode normalisation
            y = (xd - mean.view(view)) / torch.sqrt(var.view(view) + module.eps)
            y = y.to(x.dtype)
            if module.affine:
                y = y * module.weight.view(view) + module.bias.view(view)
        return y

    handles = []
    try:
        for m in bns:
            C = m.running_mean.numel()
            shift = m.running_mean.detach().to(torch.float64).clone()
            zeros = torch.zeros(C, dtype=torch.float64, device=m.running_mean.device)
            sums[id(m)] = [shift, [0, zeros.clone(), zeros.clone()]]
            handles.append(m.register_forward_hook(hook))
        batches = 0
        with torch.no_grad():
            for batch in ev.data:
                ev.forward(model, to_device(batch, ev.flat.device))
                batches += 1
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for m in bns:
            shift, (n, s1, s2) = sums[id(m)]
            stats = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=s1.device), s1, s2])
            all_reduce_sum(stats)
            N, s1, s2 = stats[0].item(), stats[1:1 + s1.numel()], stats[1 + s1.numel():]
            m.reset_running_stats()
            if N == 0:
                continue
            mean_shifted = s1 / N
            var = (s2 / N - mean_shifted ** 2).clamp_min(0) * (N / max(N - 1, 1))
            m.running_mean.copy_((mean_shifted + shift).to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(batches)


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    criterion: Callable[[torch.Tensor, Any], torch.Tensor],
    data: Any,
    *,
    steps: int = 21,
    span: tuple[float, float] = (0.0, 1.0),
    batchnorm: str = "interpolate",
    forward: ForwardFn | None = None,
    num_samples: Callable[[Batch], int] | None = None,
    reduction: str | None = None,
    progress: bool = True,
) -> Landscape:
    """Loss and accuracy on the straight line ``w(t) = (1 - t) w_A + t w_B``, ``t`` on ``steps``
    points of ``span`` (``(0, 1)``: from A to B; wider spans extrapolate).

    Linear mode connectivity (Goodfellow et al. 2015; Frankle et al. 2020): a barrier
    ``max_t L(w(t)) - ((1 - t) L(w_A) + t L(w_B))`` near 0 means A and B are linearly connected;
    ``info["barrier"]`` holds it when ``span`` covers ``[0, 1]``. All floating-point parameters
    are interpolated. BatchNorm running statistics (``batchnorm=``): ``"interpolate"`` them
    like the weights, ``"recompute"`` them on ``data`` at each point (Jordan et al. 2023,
    "REPAIR", show interpolated statistics can be far off), or ``"keep"`` model A's.
    Recomputed statistics are sample-weighted over all of ``data`` (the mean and the unbiased
    variance of each channel's inputs, as one train-mode pass over the whole dataset would
    give), so uneven batches, even of one sample, bias nothing. ``reduction`` as in
    :func:`loss_landscape`.
    Evaluation runs on ``model_a`` in eval mode, which is restored exactly; ``model_b`` is only read.
    """
    if batchnorm not in BATCHNORM:
        raise HesseError(f"unknown batchnorm {batchnorm!r}; choose one of {BATCHNORM}.")
    if not (isinstance(steps, int) and steps >= 2):
        raise HesseError(f"steps must be an integer >= 2, got {steps!r}.")
    sa = dict(model_a.named_parameters()) | dict(model_a.named_buffers())
    sb = dict(model_b.named_parameters()) | dict(model_b.named_buffers())
    if set(sa) != set(sb) or any(sa[n].shape != sb[n].shape for n in sa):
        raise HesseError(
            "model_a and model_b must have the same architecture (same parameter and buffer names and shapes)."
        )
    params_a = dict(model_a.named_parameters())
    stats = ("running_mean", "running_var")
    bn_buffers = {f"{name}.{s}" if name else s for name, m in model_a.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) for s in stats}
    moving = [n for n in sa if sa[n].is_floating_point()
              and (n in params_a or (batchnorm == "interpolate" and n in bn_buffers))]
    ev = Evaluator(model_a, criterion, data, forward=forward, num_samples=num_samples, params=list(params_a),
                   reduction=reduction)
    ts = np.linspace(span[0], span[1], steps)
    losses, accs = np.empty(steps), np.empty(steps)
    acc_seen = False
    with preserved(model_a):
        model_a.eval()
        start = {n: sa[n].detach().clone() for n in moving}
        end = {n: sb[n].detach().to(sa[n].dtype).to(sa[n].device) for n in moving}
        for i, t in enumerate(tqdm(ts, desc="interpolate", disable=not progress, leave=False)):
            with torch.no_grad():
                for n in moving:
                    sa[n].copy_(torch.lerp(start[n], end[n], float(t)))
            if batchnorm == "recompute" and _batchnorms(model_a):
                _recompute_batchnorm(model_a, ev)
            losses[i], acc, _ = ev()
            acc_seen = acc_seen or acc is not None
            accs[i] = np.nan if acc is None else acc
    info: dict[str, Any] = {"batchnorm": batchnorm, "span": list(span), "steps": steps}
    if span[0] <= 0.0 and span[1] >= 1.0:
        la, lb = np.interp(0.0, ts, losses), np.interp(1.0, ts, losses)
        inside = (ts >= 0) & (ts <= 1)
        info["barrier"] = float(np.max(losses[inside] - ((1 - ts[inside]) * la + ts[inside] * lb)))
        info["loss_a"], info["loss_b"] = float(la), float(lb)
    i0 = int(np.argmin(np.abs(ts)))
    return Landscape(
        alphas=ts, betas=None, loss=losses, accuracy=accs if acc_seen else None, kind="interpolation",
        base_loss=float(losses[i0]), base_accuracy=float(accs[i0]) if acc_seen else None, info=info,
    )
