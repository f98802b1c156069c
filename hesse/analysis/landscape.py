"""Loss landscapes: the full-data loss (and accuracy) on lines and planes through weight space.

``loss_landscape`` evaluates ``L(w + a d1)`` (1-D) or ``L(w + a d1 + b d2)`` (2-D) over a grid
for random filter-normalised directions (Li, Xu, Taylor, Studer & Goldstein 2018,
"Visualizing the Loss Landscape of Neural Nets"), the top Hessian eigenvectors, or given
directions; ``interpolate`` evaluates ``L((1 - t) w_A + t w_B)`` between two models (linear
mode connectivity; Goodfellow, Vinyals & Saxe 2015; Garipov et al. 2018; Frankle et al. 2020).

Every point is evaluated by :meth:`hesse.Objective.evaluate` at that point (``functional_call``
with the point's values substituted): the model's weights and buffers are never written
or copied. Models are evaluated in eval mode (:func:`eval_mode` switches the modules'
``training`` flags and restores them). Loss and accuracy are sample-weighted over the whole
dataset, so uneven batches are exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hesse._progress import progress_bar
from hesse.errors import HesseError, check_on_interrupt, interrupted
from hesse.operators.data import Batch, ForwardFn
from hesse.operators.objective import Evaluation, Objective, as_objective
from hesse.results import _ResultMixin

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Landscape", "eval_mode", "interpolate", "loss_landscape", "normalize_direction",
           "objective_in_eval_mode", "random_direction"]

Direction = dict[str, torch.Tensor] | torch.Tensor
NORMALIZATIONS = ("filter", "layer", None)
BATCHNORM = ("interpolate", "recompute", "keep")
_BatchNorm = nn.modules.batchnorm._BatchNorm


# ---- modes and objectives -----------------------------------------------------------------------
@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; on exit (also on error or Ctrl-C) give each module back
    its own ``training`` flag. Only the flags change: no tensor is copied or written."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def objective_in_eval_mode(model: nn.Module | Objective, criterion: Any = None, data: Any = None,
                           **settings: Any) -> Objective:
    """:func:`hesse.operators.as_objective`, built with the model in eval mode (so a model
    caught in train mode, with BatchNorm or dropout, is accepted and measured deterministically)."""
    if not isinstance(model, nn.Module):
        return as_objective(model, criterion, data, **settings)
    with eval_mode(model):
        return as_objective(model, criterion, data, **settings)


def _flat_direction(objective: Objective, direction: Direction) -> torch.Tensor:
    """A direction (dict by name, missing names = 0, or a flat ``[P]`` vector) as flat ``[P]``."""
    if isinstance(direction, torch.Tensor):
        if direction.ndim != 1 or direction.numel() != objective.size:
            raise HesseError(f"a flat direction must have shape [{objective.size}] (the selected parameters), "
                             f"got {list(direction.shape)}.")
        return direction.detach().to(objective.dtype).to(objective.device)
    if not isinstance(direction, dict):
        raise HesseError(f"a direction is a dict {{name: tensor}} or a flat [P] tensor, "
                         f"got {type(direction).__name__}.")
    unknown = set(direction) - set(objective.param_names)
    if unknown:
        raise HesseError(f"direction names {sorted(unknown)} are not selected parameters; names look like "
                         f"{objective.param_names[:4]}.")
    parts = []
    for name, p in objective.params.items():
        d = direction.get(name)
        if d is not None and tuple(d.shape) != tuple(p.shape):
            raise HesseError(f"direction for {name!r} has shape {list(d.shape)}, the parameter {list(p.shape)}.")
        parts.append(torch.zeros(p.numel(), dtype=objective.dtype, device=objective.device) if d is None
                     else d.detach().reshape(-1).to(objective.dtype).to(objective.device))
    return torch.cat(parts)


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
    ``interrupted``: Ctrl-C stopped the computation; points not evaluated are NaN.
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray | None
    kind: str
    base_loss: float
    base_accuracy: float | None
    info: dict = field(default_factory=dict)
    interrupted: bool = False

    @property
    def dims(self) -> int:
        """1 for a line, 2 for a plane."""
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
                   d["base_loss"], d["base_accuracy"], d.get("info", {}), d.get("interrupted", False))

    def plot(self, kind: str | None = None, log: bool = False) -> "Figure":
        """A matplotlib ``Figure`` (no pyplot, so safe headless; ``fig.savefig(path)``).

        ``kind``: ``"line"`` (1-D; accuracy on a second axis), ``"contour"`` or ``"surface"``
        (2-D); default line for 1-D, contour for 2-D. ``log`` plots ``log10`` of the loss.
        """
        from hesse.plotting import draw_landscape, new_figure, require_matplotlib

        require_matplotlib("Landscape.plot")
        kind = kind or ("line" if self.dims == 1 else "contour")
        if kind not in ("line", "contour", "surface"):
            raise HesseError(f"unknown plot kind {kind!r}; choose 'line', 'contour' or 'surface'.")
        if (kind == "line") != (self.dims == 1):
            raise HesseError(f"a {self.dims}-D landscape cannot be drawn as {kind!r}; use "
                             f"{'line' if self.dims == 1 else 'contour or surface'}.")
        fig = new_figure((6, 4.5))
        labels = ("t (0 = model A, 1 = model B)", "") if self.kind == "interpolation" else ("alpha", "beta")
        draw_landscape(fig, self.alphas, self.betas, self.loss, self.accuracy, kind=kind, log=log,
                       title=f"loss landscape ({self.kind})", labels=labels)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.loss.shape)
        return (f"Landscape({self.kind}, {self.dims}-D grid {shape}, base_loss={self.base_loss:.6g}, "
                f"min={np.nanmin(self.loss):.6g}, max={np.nanmax(self.loss):.6g})")


# ---- loss_landscape -----------------------------------------------------------------------------
def _store(evaluation: Evaluation, losses: np.ndarray, accs: np.ndarray, i: int) -> None:
    """Put one evaluation's loss and accuracy (NaN when not a classification) at index ``i``."""
    losses[i] = evaluation.loss
    accs[i] = np.nan if evaluation.accuracy is None else evaluation.accuracy


def _landscape_kind(directions: Any, dims: int | None, steps: Any) -> tuple[str, list[Direction], int]:
    """Check the arguments: ``(kind, given directions, dims)``."""
    given: list[Direction] = []
    if isinstance(directions, str):
        if directions not in ("random", "hessian"):
            raise HesseError(f"directions must be 'random', 'hessian' or a list of directions, got {directions!r}.")
        dims, kind = (1 if dims is None else dims), directions
    else:
        given = [directions] if isinstance(directions, (torch.Tensor, dict)) else list(directions)
        if dims is not None and dims != len(given):
            raise HesseError(f"dims={dims} but {len(given)} directions were given.")
        dims, kind = len(given), "given"
    if dims not in (1, 2):
        raise HesseError(f"dims must be 1 or 2, got {dims}.")
    if not (isinstance(steps, int) and steps >= 2):
        raise HesseError(f"steps must be an integer >= 2, got {steps!r}.")
    return kind, given, dims


def _directions(objective: Objective, kind: str, given: list[Direction], dims: int, normalization: str | None,
                ignore_1d: bool, seed: int, tol: float, progress: bool | None, info: dict) -> list[torch.Tensor]:
    """The flat directions of the landscape (and, for ``"hessian"``, the eigenvalues in ``info``)."""
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        weights = objective.values()
        return [_flat_direction(objective, random_direction(weights, gen, normalization, ignore_1d))
                for _ in range(dims)]
    if kind == "given":
        return [_flat_direction(objective, d) for d in given]
    from hesse.linalg import eigenvalues
    from hesse.operators import Hessian

    eig = eigenvalues(Hessian(objective), k=dims, which="largest", tol=tol, seed=seed, progress=progress)
    if getattr(eig, "interrupted", False):  # the solver caught Ctrl-C and returned its partial result
        raise KeyboardInterrupt
    info.update(eigenvalues=eig.values.tolist(), eigen_matvecs=eig.matvecs, eigen_converged=eig.converged.tolist())
    return [eig.vectors[:, i].to(objective.dtype) for i in range(dims)]


def _evaluate_grid(objective: Objective, vecs: list[torch.Tensor], grid: list[tuple[float, ...]],
                   losses: np.ndarray, accs: np.ndarray, progress: bool | None) -> None:
    """``L(w + Σ_i c_i v_i)`` at each grid point ``c`` into ``losses``/``accs`` (in order, so a
    Ctrl-C leaves NaN exactly at the points not reached)."""
    w0 = objective.parameters_vector()
    for i, point in enumerate(progress_bar(grid, total=len(grid), desc="loss landscape", enabled=progress)):
        w = w0
        for c, v in zip(point, vecs):
            w = w + float(c) * v
        _store(objective.evaluate(at=w), losses, accs, i)


def loss_landscape(
    model: nn.Module | Objective,
    criterion: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    data: Any = None,
    *,
    directions: str | Sequence[Direction] = "random",
    dims: int | None = None,
    steps: int = 21,
    span: tuple[float, float] = (-1.0, 1.0),
    normalization: str | None = "filter",
    ignore_1d: bool = True,
    seed: int = 0,
    tol: float = 1e-3,
    progress: bool | None = None,
    on_interrupt: str = "raise",
    **settings: Any,
) -> Landscape:
    """Loss and accuracy on ``w + a d1`` (``dims=1``) or ``w + a d1 + b d2`` (``dims=2``),
    ``a, b`` on ``steps`` points of ``span`` (Li et al. 2018).

    ``model`` is an :class:`hesse.Objective`, or a model with ``criterion``, ``data`` and the
    Objective's ``settings`` (``params``, ``forward``, ``num_samples``, ``reduction``, ...).
    ``directions``:
      * ``"random"``: Gaussian directions, rescaled by ``normalization`` (``"filter"``:
        Li et al. 2018's filter normalisation, ``"layer"`` or ``None``; see
        :func:`normalize_direction`); 1-D parameters zeroed when ``ignore_1d``;
      * ``"hessian"``: the top ``dims`` Hessian eigenvectors (unit norm; eigenvalues in
        ``info["eigenvalues"]``), from :func:`hesse.linalg.eigenvalues` with tolerance ``tol``;
      * a list of 1 or 2 directions, each a dict ``{param name: tensor}`` (missing names are
        zero) or a flat ``[P]`` vector over the selected parameters, used as given.
    The model is evaluated in eval mode (BatchNorm running statistics, no dropout) and never
    modified. Ctrl-C: see :mod:`hesse.errors`; the partial landscape is NaN where not evaluated.
    """
    kind, given, dims = _landscape_kind(directions, dims, steps)
    check_on_interrupt(on_interrupt)
    objective = objective_in_eval_mode(model, criterion, data, **settings)
    info: dict[str, Any] = {"normalization": normalization if kind == "random" else None,
                            "ignore_1d": ignore_1d, "seed": seed, "span": list(span), "steps": steps}
    alphas = np.linspace(span[0], span[1], steps)
    grid = [(a,) for a in alphas] if dims == 1 else [(a, b) for a in alphas for b in alphas]
    losses, accs = np.full(len(grid), np.nan), np.full(len(grid), np.nan)
    base = Evaluation(np.nan, None, None, 0)

    def result() -> Landscape:
        """The landscape as far as it was evaluated."""
        shape = (steps,) if dims == 1 else (steps, steps)
        return Landscape(alphas=alphas, betas=alphas.copy() if dims == 2 else None, loss=losses.reshape(shape),
                         accuracy=None if base.accuracy is None else accs.reshape(shape), kind=kind,
                         base_loss=base.loss, base_accuracy=base.accuracy, info=info)

    try:
        with eval_mode(objective.model):
            vecs = _directions(objective, kind, given, dims, normalization, ignore_1d, seed, tol, progress, info)
            info["direction_norms"] = [float(v.norm()) for v in vecs]
            base = objective.evaluate()
            _evaluate_grid(objective, vecs, grid, losses, accs, progress)
    except KeyboardInterrupt as error:
        return interrupted(error, result(), on_interrupt, "loss_landscape")
    return result()


# ---- interpolate --------------------------------------------------------------------------------
def _buffer_name(module: str, buffer: str) -> str:
    """The name of a module's buffer in ``named_buffers()``."""
    return f"{module}.{buffer}" if module else buffer


def _normalise_and_count(module: _BatchNorm, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A train-mode BatchNorm output (batch statistics) and ``[n, Σ(x - K), Σ(x - K)²]`` per channel.

    ``n`` counts the elements of a channel; sums are in float64, shifted by ``K`` (model A's
    running mean) against cancellation.
    """
    if x.ndim < 2:
        raise HesseError(f"a BatchNorm input has shape {list(x.shape)}; expected [N, C, ...].")
    dims = [0] + list(range(2, x.ndim))
    view = [1, -1] + [1] * (x.ndim - 2)
    xd = x.detach().to(torch.float64) - shift.view(view)
    n = xd.new_tensor([x.numel() // x.shape[1]])
    mean = xd.mean(dims)
    var = (xd - mean.view(view)).pow(2).mean(dims)  # biased, as train-mode normalisation
    y = ((xd - mean.view(view)) / torch.sqrt(var.view(view) + module.eps)).to(x.dtype)
    if module.affine:
        y = y * module.weight.view(view) + module.bias.view(view)
    return y, torch.cat([n, xd.sum(dims), (xd * xd).sum(dims)])


def _batchnorm_statistics(objective: Objective, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact sample-weighted BatchNorm running statistics at the parameter ``values``, as buffers.

    One pass over the data (:meth:`Objective.call_model`, eval mode) with a forward hook on each
    BatchNorm that tracks running statistics: it accumulates the count, ``Σ(x - K)`` and
    ``Σ(x - K)²`` of its input per channel and returns the input normalised by the batch's own
    statistics, as a train-mode forward would. Then ``running_mean = Σx / N`` and
    ``running_var = N / (N - 1) · (E[x²] - mean²)`` (unbiased, as BatchNorm keeps it), ``N``
    counting a channel's elements over the whole dataset (and all processes): independent
    of the batching, and a batch of one sample is fine. Nothing is written into the model.
    """
    bns = {name: m for name, m in objective.model.named_modules()
           if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None}
    if not bns:
        return {}
    shifts = {name: m.running_mean.detach().to(torch.float64) for name, m in bns.items()}
    sizes = {name: 1 + 2 * m.running_mean.numel() for name, m in bns.items()}
    current: dict[str, torch.Tensor] = {}
    batches = [0]

    def hook(name: str) -> Callable[..., torch.Tensor]:
        """A forward hook accumulating the statistics of BatchNorm ``name``."""
        def run(module: _BatchNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            """Replace the output by the batch-normalised input; add the batch's sums."""
            with torch.no_grad():
                y, stats = _normalise_and_count(module, inputs[0], shifts[name])
            current[name] = current[name] + stats if name in current else stats
            return y
        return run

    def per_batch(batch: Batch, index: int, weight: float) -> torch.Tensor:
        """One forward pass; the batch's sums of every BatchNorm, concatenated."""
        current.clear()
        batches[0] += 1
        with torch.no_grad():
            objective.call_model(values, batch)
        return torch.cat([current.get(n, shifts[n].new_zeros(sizes[n])) for n in bns])

    handles = [m.register_forward_hook(hook(name)) for name, m in bns.items()]
    try:
        total, _ = objective.sum_over_data(per_batch, "batchnorm statistics")
    finally:
        for h in handles:
            h.remove()
    buffers, parts = {}, torch.split(total, list(sizes.values()))
    for (name, m), part in zip(bns.items(), parts):
        buffers.update(_running_statistics(name, m, part, shifts[name], batches[0]))
    return buffers


def _running_statistics(name: str, m: _BatchNorm, sums: torch.Tensor, shift: torch.Tensor,
                        batches: int) -> dict[str, torch.Tensor]:
    """``running_mean``/``running_var``/``num_batches_tracked`` buffers from ``[N, Σ(x-K), Σ(x-K)²]``."""
    C = shift.numel()
    N, s1, s2 = float(sums[0]), sums[1:1 + C], sums[1 + C:]
    if N == 0:  # never reached: the reset statistics
        mean, var, batches = torch.zeros_like(shift), torch.ones_like(shift), 0
    else:
        mean_shifted = s1 / N
        mean = mean_shifted + shift
        var = (s2 / N - mean_shifted ** 2).clamp_min(0) * (N / max(N - 1, 1))
    out = {_buffer_name(name, "running_mean"): mean.to(m.running_mean.dtype),
           _buffer_name(name, "running_var"): var.to(m.running_var.dtype)}
    if m.num_batches_tracked is not None:
        out[_buffer_name(name, "num_batches_tracked")] = torch.full_like(m.num_batches_tracked, batches)
    return out


def _interpolation_result(ts: np.ndarray, losses: np.ndarray, accs: np.ndarray, info: dict) -> Landscape:
    """The landscape of an interpolation, with the barrier when ``ts`` covers ``[0, 1]``."""
    if ts[0] <= 0.0 and ts[-1] >= 1.0:
        la, lb = np.interp(0.0, ts, losses), np.interp(1.0, ts, losses)
        inside = (ts >= 0) & (ts <= 1)
        info["barrier"] = float(np.max(losses[inside] - ((1 - ts[inside]) * la + ts[inside] * lb)))
        info["loss_a"], info["loss_b"] = float(la), float(lb)
    i0 = int(np.argmin(np.abs(ts)))
    acc_seen = not np.all(np.isnan(accs))
    return Landscape(alphas=ts, betas=None, loss=losses, accuracy=accs if acc_seen else None, kind="interpolation",
                     base_loss=float(losses[i0]), base_accuracy=float(accs[i0]) if acc_seen else None, info=info)


def _check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> tuple[dict, dict]:
    """Both models' parameters and buffers by name; refuses different names or shapes."""
    sa = dict(model_a.named_parameters()) | dict(model_a.named_buffers())
    sb = dict(model_b.named_parameters()) | dict(model_b.named_buffers())
    if set(sa) != set(sb) or any(sa[n].shape != sb[n].shape for n in sa):
        raise HesseError(
            "model_a and model_b must have the same architecture (same parameter and buffer names and shapes)."
        )
    return sa, sb


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
    progress: bool | None = None,
    on_interrupt: str = "raise",
) -> Landscape:
    """Loss and accuracy on the straight line ``w(t) = (1 - t) w_A + t w_B``, ``t`` on ``steps``
    points of ``span`` (``(0, 1)``: from A to B; wider spans extrapolate).

    Linear mode connectivity (Goodfellow et al. 2015; Frankle et al. 2020): a barrier
    ``max_t L(w(t)) - ((1 - t) L(w_A) + t L(w_B))`` near 0 means A and B are linearly connected;
    ``info["barrier"]`` holds it when ``span`` covers ``[0, 1]``. All of model A's parameters
    are interpolated (one :class:`hesse.Objective` over them). BatchNorm running statistics
    (``batchnorm=``): ``"interpolate"`` them like the weights, ``"recompute"`` them on ``data``
    at each point (exact sample-weighted mean and unbiased variance, see
    :func:`_batchnorm_statistics`; Jordan et al. 2023, "REPAIR", show interpolated statistics
    can be far off), or ``"keep"`` model A's. Points are evaluated in eval mode with the
    values and statistics substituted; neither model is modified. Ctrl-C: see :mod:`hesse.errors`.
    """
    if batchnorm not in BATCHNORM:
        raise HesseError(f"unknown batchnorm {batchnorm!r}; choose one of {BATCHNORM}.")
    if not (isinstance(steps, int) and steps >= 2):
        raise HesseError(f"steps must be an integer >= 2, got {steps!r}.")
    check_on_interrupt(on_interrupt)
    sa, sb = _check_same_architecture(model_a, model_b)
    objective = objective_in_eval_mode(model_a, criterion, data, params=list(dict(model_a.named_parameters())),
                                       forward=forward, num_samples=num_samples, reduction=reduction)
    bn_names = {_buffer_name(name, s) for name, m in model_a.named_modules() if isinstance(m, _BatchNorm)
                for s in ("running_mean", "running_var")}
    moving_buffers = ([n for n in sb if n in bn_names and sa[n].is_floating_point()]
                      if batchnorm == "interpolate" else [])
    start = {n: sa[n].detach() for n in objective.param_names + moving_buffers}
    end = {n: sb[n].detach().to(sa[n].dtype).to(sa[n].device) for n in start}
    ts = np.linspace(span[0], span[1], steps)
    losses, accs = np.full(steps, np.nan), np.full(steps, np.nan)
    info: dict[str, Any] = {"batchnorm": batchnorm, "span": list(span), "steps": steps}
    try:
        with eval_mode(model_a):
            for i, t in enumerate(progress_bar(ts, total=steps, desc="interpolate", enabled=progress)):
                values = {n: torch.lerp(start[n], end[n], float(t)) for n in objective.param_names}
                buffers = {n: torch.lerp(start[n], end[n], float(t)) for n in moving_buffers}
                if batchnorm == "recompute":
                    buffers = _batchnorm_statistics(objective, values)
                _store(objective.evaluate(at=values, buffers=buffers or None), losses, accs, i)
    except KeyboardInterrupt as error:
        return interrupted(error, _interpolation_result(ts, losses, accs, info), on_interrupt, "interpolate")
    return _interpolation_result(ts, losses, accs, info)
