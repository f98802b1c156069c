"""Layer-wise optimal brain surgeon: OBC / SparseGPT (Frantar & Alistarh 2022, 2023).

Each ``nn.Linear`` / ``nn.Conv2d`` weight ``W`` (``[rows, cols]``, a convolution's kernel
flattened as ``[out, in·kh·kw]``) is pruned to keep its outputs on calibration inputs ``X``
(``[cols, N]``, convolution inputs unfolded into patches), minimising
``‖W X − Ŵ X‖²``. Every row shares the layer Hessian ``H = 2 X Xᵀ / N + λI``
(``λ = damp · mean diag(2XXᵀ/N)``).

SparseGPT visits the columns left to right. At column ``j`` the remaining columns
``j..cols`` are free; with ``U`` the upper Cholesky factor of ``H⁻¹`` (row ``j`` of ``U``
is ``[H_{j:,j:}⁻¹]_{j,:}/√[H_{j:,j:}⁻¹]_jj``), removing ``w_rj`` costs
``w_rj² / U_jj²`` (the OBS saliency) and the optimal update of the free columns is
``W_{r,j:} −= (w_rj / U_jj) U_{j,j:}``. Columns are processed in blocks of ``B``: the
updates to later blocks are applied lazily, once per block, as one matrix product.
The mask of a block is chosen when the block starts (adaptive mask selection), from
the saliencies of the updated weights; N:M masks are chosen per group of M columns.

When the damped ``H`` is not positive definite in the weights' precision, the
factorisation is retried in float64, then with ten times more damping, and a
:class:`DampingWarning` names the layer and the damping used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from hesse.errors import HesseError
from hesse.apply.pruning.masks import keep_highest
from hesse.operators import Objective
from hesse.operators.data import to_device

MAX_RELATIVE_DAMPING = 1e3


class DampingWarning(UserWarning):
    """A layer's Hessian needed float64 or more damping than asked to be factorised."""


def layer_module(model: nn.Module, name: str) -> nn.Module:
    """The ``nn.Linear`` / ``nn.Conv2d`` that owns the weight ``name`` (refusing anything else)."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise HesseError(f"layer-wise OBS prunes nn.Linear and nn.Conv2d weights; {name!r} is not one "
                         "(leave it out with params=[...]).")
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        raise HesseError(f"layer-wise OBS needs groups=1 and zero padding; {name!r} has groups={module.groups}, "
                         f"padding_mode={module.padding_mode!r} (leave it out with params=[...]).")
    return module


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``x_n`` (``[N, cols]``) that multiply the weight: the last dimension of a linear
    layer's input, or the unfolded ``in·kh·kw`` patches of a convolution's."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


class _Collected(Exception):
    """Raised by a forward hook to end a calibration forward once the layers of interest have run."""


def layer_groups(objective: Objective, modules: Mapping[str, nn.Module], values: Mapping[str, torch.Tensor],
                 batch: object) -> tuple[list[list[str]], dict[str, int]]:
    """Groups of consecutive layers (in ``modules`` order) that read the same input tensor (e.g. the
    query, key and value projections of an attention layer), and how often each layer runs per
    forward, from one forward of ``batch``. Pruning one layer of a group leaves the inputs of the
    others unchanged, so a group's Hessians can be collected in one sequential pass."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [module.register_forward_hook(lambda _m, inputs, _o, name=name: seen[name].append(inputs[0]))
               for name, module in modules.items()]
    try:
        with torch.no_grad():
            objective.call_model(values, to_device(batch, objective.device))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in modules:  # the tensors are held in ``seen``, so ``is`` cannot match a reused id
        first = seen[groups[-1][0]] if groups else []
        if seen[name] and len(seen[name]) == len(first) and all(a is b for a, b in zip(seen[name], first)):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, {name: len(calls) for name, calls in seen.items()}


def collect_hessians(objective: Objective, modules: Mapping[str, nn.Module], values: Mapping[str, torch.Tensor],
                     batches: Iterable, calls: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """``2 X Xᵀ / N`` (float64, undamped) of each module's inputs over ``batches``, with the
    model run at parameter ``values`` (forward hooks, removed afterwards). With ``calls`` (runs of
    each module per forward, from :func:`layer_groups`), each forward stops once every module
    has run that often: the rest of the model is not computed."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    runs = dict.fromkeys(modules, 0)

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, _output) -> None:
            X = layer_inputs(module, inputs[0].detach()).double()
            sums[name] = sums[name] + X.T @ X if name in sums else X.T @ X
            counts[name] += X.shape[0]
            runs[name] += 1
            if calls is not None and all(runs[n] >= calls[n] for n in modules):
                raise _Collected
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                runs.update(dict.fromkeys(modules, 0))
                try:
                    objective.call_model(values, to_device(batch, objective.device))
                except _Collected:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in sums]
    if missing:
        raise HesseError(f"the calibration data never reached {missing}; layer-wise OBS needs layers the forward uses.")
    return {name: 2.0 * sums[name] / counts[name] for name in modules}


def inverse_cholesky(H: torch.Tensor, damp: float, dtype: torch.dtype, name: str) -> tuple[torch.Tensor, str | None]:
    """``U`` (upper) with ``Uᵀ U = (H + λI)⁻¹``, ``λ = damp · mean diag(H)``, and a warning or ``None``.

    Tries ``dtype``, then float64, then ten times more damping each time (up to
    ``damp =`` :data:`MAX_RELATIVE_DAMPING`) instead of failing."""
    if damp <= 0:
        raise HesseError(f"damp must be positive (relative to the mean diagonal of H), got {damp}.")
    scale = float(H.diagonal().mean())
    scale = scale if scale > 0 else 1.0
    retries = math.ceil(math.log10(max(MAX_RELATIVE_DAMPING / damp, 1.0)))
    attempts = [(dtype, damp)] + [(torch.float64, damp * 10 ** k) for k in range(retries + 1)]
    for attempt, (precision, relative) in enumerate(attempts):
        damped = H.to(precision) + relative * scale * torch.eye(H.shape[0], dtype=precision, device=H.device)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            note = None if attempt == 0 else (
                f"layer {name}: the damped input Hessian was not positive definite in {dtype} with damp={damp:g}; "
                f"factorised in {precision} with damp={relative:g} (λ={relative * scale:.3g}).")
            return U, note
    raise HesseError(f"layer {name}: the input Hessian could not be factorised even with damp={relative:g}; "
                     "check the calibration data for NaN/inf values.")


def sparsegpt(W: torch.Tensor, U: torch.Tensor, *, fraction: float | None = None, nm: tuple[int, int] | None = None,
              mask: torch.Tensor | None = None, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ŵ, mask)``: SparseGPT on ``W`` (``[rows, cols]``) with ``U`` from :func:`inverse_cholesky`.

    Exactly one of ``fraction`` (remove ``round(fraction·rows·cols)`` weights, spread over the
    column blocks in proportion to their width), ``nm`` (N:M along the columns) or ``mask``
    (a given mask, only the weights are re-fitted). Returns the new weights (zero where pruned)."""
    W = W.clone()
    rows, cols = W.shape
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.clone()
    total = round(fraction * rows * cols) if fraction is not None else 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        if fraction is not None:
            count = round(total * i2 / cols) - round(total * i1 / cols)
            keep[:, i1:i2] = keep_highest(W1 ** 2 / U1.diagonal() ** 2, count)
        errors = _prune_block(W1, U1, keep[:, i1:i2], nm)
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return W, keep


def _prune_block(W1: torch.Tensor, U1: torch.Tensor, keep1: torch.Tensor, nm: tuple[int, int] | None) -> torch.Tensor:
    """Prune one column block in place (``W1``, ``keep1`` are views), column by column with the
    OBS update of the block's later columns; returns the scaled errors ``[rows, B]`` for the lazy update."""
    errors = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            scores = W1[:, i:i + nm[1]] ** 2 / U1.diagonal()[i:i + nm[1]] ** 2
            keep1[:, i:i + nm[1]] = False
            keep1[:, i:i + nm[1]].scatter_(1, torch.topk(scores, nm[0], dim=1).indices, True)
        w, d = W1[:, i], U1[i, i]
        err = w * (~keep1[:, i]) / d
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        W1[:, i] *= keep1[:, i]  # exactly zero (the update leaves rounding residue)
        errors[:, i] = err
    return errors


def prune_layer(W: torch.Tensor, H: torch.Tensor, name: str, *, damp: float, block_size: int,
                fraction: float | None, nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """``(Ŵ, mask, warning)`` for one layer's weight (any shape; pruned as ``[out, -1]``)."""
    rows = W.reshape(W.shape[0], -1)
    if nm is not None and rows.shape[1] % nm[1]:
        raise HesseError(f"{name} has {rows.shape[1]} inputs per output, not a multiple of {nm[1]}; "
                         "N:M needs input sizes divisible by M (leave it out with params=).")
    dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    U, note = inverse_cholesky(H, damp, dtype, name)
    if note is not None:
        warnings.warn(note, DampingWarning, stacklevel=3)
    pruned, keep = sparsegpt(rows.to(U.dtype), U, fraction=fraction, nm=nm, block_size=block_size)
    return pruned.to(W.dtype).view(W.shape), keep.view(W.shape), note
