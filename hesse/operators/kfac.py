"""Kronecker-factored curvature: K-FAC (Martens & Grosse 2015) and EK-FAC (George et al. 2018).

For a layer ``s = W a`` (bias folded in as a constant-1 input, ``W`` of shape ``[m, d]``)
the gradient of one sample is ``Σ_t g_t a_tᵀ`` (``t`` runs over weight-sharing positions:
tokens, conv patches), ``g = ∂ℓ/∂s`` backpropagated from a vector ``r`` with ``r rᵀ``
equal in expectation to the output curvature. The layer's diagonal block of the
curvature ``C = Σ_b w_b Σ_n Σ_r G_n^r ⊗ ...`` is approximated by

    C_layer ≈ S ⊗ A,   A = (1/R) Σ_rows a aᵀ,   S = Σ_b w_b Σ_rows Σ_r g gᵀ

(``w_b`` the batch's weight in the loss, ``R`` the number of rows of all batches), in
the flat layout of ``W.flatten()`` (row-major: output index major). ``kind`` chooses ``r``:

* ``"true"``: the columns of an exact square root of the criterion's output Hessian
  (``√p_c (e_c - p)`` for softmax cross-entropy, ``√2 e_j`` for MSE, ``√(σ(1-σ)) e_j``
  for BCE): K-FAC of the GGN (= true Fisher for these likelihoods), one backward per column;
* ``"mc"``: ``mc_samples`` gradients at labels sampled from the model (seeded), unbiased for ``"true"``;
* ``"empirical"``: the gradient at the observed labels (empirical Fisher).

Weight sharing (Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for
Modern Neural Network Architectures"): ``"expand"`` treats every position as a row;
``"reduce"`` first averages ``a`` and sums ``g`` over a sample's positions.
Supported layers: ``nn.Linear`` (any leading dims), ``nn.Conv2d`` (patches by
``unfold``, ``groups=1``), ``nn.Embedding`` (``A`` diagonal: the token counts),
``nn.MultiheadAttention`` (recomputed with explicit q/k/v/out projections, one block each;
Hugging Face attention uses plain ``nn.Linear``). Every other selected parameter
(LayerNorm/BatchNorm affine, ...) gets its module's exact diagonal block of the same
curvature (GGN for ``"true"``, the matching Fisher otherwise), formed from products.

EK-FAC keeps the eigenbases ``Q_S, Q_A`` of K-FAC and refits the eigenvalues to the
second moments of per-sample gradients in that basis, ``Λ = Σ w (Q_Sᵀ G_n Q_A)^2``,
which is the Frobenius-optimal diagonal in the Kronecker eigenbasis (George et al. 2018).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from hesse.errors import HesseError
from hesse.operators.curvature import CurvatureOperator
from hesse.operators.data import Batch
from hesse.operators.fisher import KINDS
from hesse.operators.likelihoods import (
    batch_seed,
    check_likelihood,
    observed_gradient,
    sampled_gradient,
    scale_and_mask,
)
from hesse.operators.linear import LinearOperator

SHARING = ("expand", "reduce")
EXACT_LIMIT = 4096


@dataclass
class _Slot:
    """A parameter (or some of its rows) inside a layer's ``[m, d]`` weight matrix or its bias."""

    param: str
    role: str  # "weight" or "bias"
    rows: slice | None = None
    transposed: bool = False  # nn.Embedding stores W as [d, m]


@dataclass
class _Layer:
    """A Kronecker-factored layer: how to find its inputs/outputs and which parameters it holds."""

    key: str
    module: nn.Module
    kind: str  # "linear", "conv2d", "embedding" or "attention" (a q/k/v/o projection of MHA)
    d: int
    m: int
    bias: bool
    slots: list[_Slot] = field(default_factory=list)


def _discover(model: nn.Module, selected: set[str]) -> list[_Layer]:
    """The supported layers holding selected parameters, in model order."""
    layers, inside_attention = [], set()
    for prefix, module in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.add(id(module.out_proj))
            layers.extend(_attention_layers(prefix, module))
        elif isinstance(module, nn.Linear) and id(module) not in inside_attention:
            layers.append(_Layer(prefix, module, "linear", module.in_features, module.out_features,
                                 module.bias is not None, [_Slot(p + "weight", "weight")]))
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                continue  # falls back to an exact block
            d = module.in_channels * math.prod(module.kernel_size)
            layers.append(_Layer(prefix, module, "conv2d", d, module.out_channels, module.bias is not None,
                                 [_Slot(p + "weight", "weight")]))
        elif isinstance(module, nn.Embedding) and module.max_norm is None:
            layers.append(_Layer(prefix, module, "embedding", module.num_embeddings, module.embedding_dim,
                                 False, [_Slot(p + "weight", "weight", transposed=True)]))
    for layer in layers:
        if layer.bias and layer.kind != "attention":
            layer.slots.append(_Slot(f"{layer.key}.bias" if layer.key else "bias", "bias"))
        layer.slots = [s for s in layer.slots if s.param in selected]
    return [layer for layer in layers if layer.slots]


def _attention_layers(prefix: str, module: nn.MultiheadAttention) -> list[_Layer]:
    """The q, k, v and output projections of ``nn.MultiheadAttention`` as four layers."""
    p = f"{prefix}." if prefix else ""
    E, bias = module.embed_dim, module.in_proj_bias is not None
    if not module._qkv_same_embed_dim:
        return []  # separate q/k/v weights of other sizes: exact blocks
    layers = []
    for i, name in enumerate("qkv"):
        rows = slice(i * E, (i + 1) * E)
        slots = [_Slot(p + "in_proj_weight", "weight", rows)] + ([_Slot(p + "in_proj_bias", "bias", rows)] if bias else [])
        layers.append(_Layer(f"{p}{name}", module, "attention", E, E, bias, slots))
    out_bias = module.out_proj.bias is not None
    slots = [_Slot(p + "out_proj.weight", "weight")] + ([_Slot(p + "out_proj.bias", "bias")] if out_bias else [])
    layers.append(_Layer(f"{p}o", module, "attention", E, E, out_bias, slots))
    return layers


def _attention_forward(module: nn.MultiheadAttention, record, query, key, value, key_padding_mask=None,
                       need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention`` with explicit projections, each reported as ``record(name, input, output)``.

    Returns ``(output, None)``: attention weights are not recomputed."""
    if module.bias_k is not None or module.add_zero_attn or (module.training and module.dropout > 0):
        raise HesseError("K-FAC supports nn.MultiheadAttention without add_bias_kv/add_zero_attn and "
                         "without active dropout; use model.eval() or leave its parameters out of params=.")
    if not module.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    E, h = module.embed_dim, module.num_heads
    W, b = module.in_proj_weight, module.in_proj_bias
    heads = []
    for i, (name, x) in enumerate(zip("qkv", (query, key, value))):
        y = F.linear(x, W[i * E:(i + 1) * E], None if b is None else b[i * E:(i + 1) * E])
        record(name, x, y)
        heads.append(y.unflatten(-1, (h, E // h)).transpose(1, 2))
    mask = _attention_mask(key_padding_mask, attn_mask, heads[0])
    o = F.scaled_dot_product_attention(*heads, attn_mask=mask, is_causal=is_causal and mask is None)
    o = o.transpose(1, 2).flatten(2)
    out = F.linear(o, module.out_proj.weight, module.out_proj.bias)
    record("o", o, out)
    return (out if module.batch_first else out.transpose(0, 1)), None


def _attention_mask(key_padding_mask, attn_mask, q: torch.Tensor) -> torch.Tensor | None:
    """The additive float mask of MHA's boolean/float ``key_padding_mask`` and ``attn_mask``."""
    mask = None
    for m, shape in ((key_padding_mask, (q.shape[0], 1, 1, -1)), (attn_mask, None)):
        if m is None:
            continue
        add = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(q.dtype)
        add = add.view(shape) if shape else (add if add.ndim == 2 else add.view(q.shape[0], q.shape[1], *add.shape[1:]))
        mask = add if mask is None else mask + add
    return mask


class _Capture:
    """Forward hooks recording each layer's input and output (one entry per call)."""

    def __init__(self, layers: list[_Layer]):
        self.layers, self.records = layers, {layer.key: [] for layer in layers}
        self.handles = []

    def __enter__(self) -> "_Capture":
        seen = set()
        for layer in self.layers:
            if id(layer.module) in seen:
                continue
            seen.add(id(layer.module))
            if layer.kind == "attention":
                self.handles.append(layer.module.register_forward_hook(self._attention_hook(layer.module), with_kwargs=True))
            else:
                self.handles.append(layer.module.register_forward_hook(self._hook(layer.key)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, key: str):
        def hook(module, args, output):
            self.records[key].append((args[0].detach(), output))
        return hook

    def _attention_hook(self, module: nn.MultiheadAttention):
        prefix = next(layer.key[:-1] for layer in self.layers if layer.module is module)

        def record(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
            if prefix + name in self.records:
                self.records[prefix + name].append((x.detach(), y))

        def hook(module, args, kwargs, output):
            return _attention_forward(module, record, *args, **kwargs)
        return hook


def _rows(layer: _Layer, a: torch.Tensor, gs: list[torch.Tensor], sharing: str):
    """``a`` as ``[N, T, d(+1)]`` and each ``g`` of ``gs`` as ``[N, T, m]`` (``a``: token ids ``[N, T]`` for an embedding).

    ``a`` is unfolded once however many backpropagated vectors ``gs`` holds (``kind="true"``: one per class)."""
    N = a.shape[0] if a.ndim > 1 else 1
    if layer.kind == "conv2d":
        mod = layer.module
        a = F.unfold(a, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2)
        gs = [g.flatten(2).transpose(1, 2) for g in gs]
    elif layer.kind == "embedding":
        return a.reshape(N, -1), [g.reshape(N, -1, layer.m) for g in gs]
    else:
        a = a.reshape(N, -1, layer.d)
        gs = [g.reshape(N, -1, layer.m) for g in gs]
    if layer.bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    if sharing == "reduce" and a.shape[1] > 1:
        a, gs = a.mean(1, keepdim=True), [g.sum(1, keepdim=True) for g in gs]
    return a, gs


def _backprop_vectors(criterion, reduction: str, kind: str, output: torch.Tensor, target,
                      generator: torch.Generator, mc_samples: int) -> list[torch.Tensor]:
    """Output-space vectors ``r`` with ``Σ r rᵀ`` = the batch loss's output curvature (exactly, or in expectation).

    Each includes the loss's scale ``√s_b`` and the mask of ignored targets."""
    scale, mask = scale_and_mask(criterion, reduction, output, target)
    root = torch.sqrt(torch.as_tensor(scale, dtype=output.dtype)) * mask
    if kind == "empirical":
        return [root * observed_gradient(criterion, output, target)]
    if kind == "mc":
        return [root * sampled_gradient(criterion, output, generator) / math.sqrt(mc_samples)
                for _ in range(mc_samples)]
    if isinstance(criterion, nn.CrossEntropyLoss):
        p = torch.softmax(output, dim=1)
        onehots = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return [root * p[:, c:c + 1].sqrt() * (onehots[c].view(1, -1, *[1] * (p.ndim - 2)) - p)
                for c in range(p.shape[1])]
    curvature = 2.0 * torch.ones_like(output) if isinstance(criterion, nn.MSELoss) \
        else torch.sigmoid(output) * (1 - torch.sigmoid(output))
    flat = (root * curvature.sqrt()).reshape(output.shape[0], -1)
    vectors = []
    for j in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, j] = flat[:, j]
        vectors.append(e.view(output.shape))
    return vectors


class _Block:
    """One diagonal block ``C_b`` in an eigenbasis: ``C_b = Q diag(Λ) Qᵀ``, acting on gathered ``X``.

    Subclasses define how to gather a block's coordinates from per-parameter tensors and
    how to move them into (``_to``) and out of (``_from``) the eigenbasis."""

    name: str
    scales: torch.Tensor  # the eigenvalues Λ, in the shape of the coordinates in the basis

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        return self._from(self._to(X) * self.scales)

    def solve(self, X: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C_b + λ I)^{-1} X`` (exact damping through the eigenbasis)."""
        return self._from(self._to(X) / (self.scales.clamp(min=0) + damping))

    def trace(self) -> float:
        return float(self.scales.sum())

    def logdet(self, damping: float) -> float:
        return float(torch.log(self.scales.clamp(min=0) + damping).sum())


class KroneckerBlock(_Block):
    """``C_b ≈ S ⊗ A`` on ``X = [m, d']`` (row-major ``W.flatten()``; bias = last column).

    ``A`` is ``[d', d']`` (``[d']`` when diagonal, e.g. an embedding's token counts), ``S``
    is ``[m, m]``. ``scales`` are ``λ_S λ_Aᵀ`` (K-FAC) or the refitted EK-FAC eigenvalues."""

    def __init__(self, layer: _Layer, A: torch.Tensor, S: torch.Tensor):
        self.name, self.layer = layer.key, layer
        roles = {s.role for s in layer.slots}
        idx = (list(range(layer.d)) if "weight" in roles else []) + ([layer.d] if "bias" in roles else [])
        self.index = torch.tensor(idx, device=A.device)
        self.A = A[self.index] if A.ndim == 1 else A[self.index][:, self.index]
        self.S = S
        self.eig_S, self.Q_S = torch.linalg.eigh(S)
        if self.A.ndim == 1:
            self.eig_A, self.Q_A = self.A, None
        else:
            self.eig_A, self.Q_A = torch.linalg.eigh(self.A)
        self.scales = torch.outer(self.eig_S.clamp(min=0), self.eig_A.clamp(min=0))
        self.refitted = False

    def _to(self, X: torch.Tensor) -> torch.Tensor:
        Z = self.Q_S.T @ X
        return Z if self.Q_A is None else Z @ self.Q_A

    def _from(self, Z: torch.Tensor) -> torch.Tensor:
        X = self.Q_S @ Z
        return X if self.Q_A is None else X @ self.Q_A.T

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        if self.refitted:
            return super().apply(X)
        return (self.S @ X) * self.A if self.A.ndim == 1 else self.S @ X @ self.A

    def solve_pi(self, X: torch.Tensor, damping: float) -> torch.Tensor:
        """``(S + π√λ I)^{-1} X (A + √λ/π I)^{-1}`` with ``π² = (tr A / d') / (tr S / m)`` (Martens & Grosse 2015, §6.3)."""
        if self.refitted:
            raise HesseError("pi-damping is a K-FAC heuristic; EK-FAC has no Kronecker factors to damp, use heuristic='exact'.")
        ratio = (self.eig_A.sum() / len(self.eig_A)) / (self.eig_S.sum() / len(self.eig_S)).clamp(min=1e-30)
        pi = float(ratio.clamp(min=1e-30).sqrt())
        root = math.sqrt(damping)
        denominator = torch.outer(self.eig_S.clamp(min=0) + pi * root, self.eig_A.clamp(min=0) + root / pi)
        return self._from(self._to(X) / denominator)

    def gather(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[K, m, d']`` from per-parameter ``[K, *shape]`` tensors."""
        parts = []
        for slot in self.layer.slots:
            t = vectors[slot.param]
            t = t[:, slot.rows] if slot.rows is not None else t
            if slot.role == "bias":
                parts.append(t.reshape(t.shape[0], -1, 1))
            else:
                parts.append(t.transpose(1, 2) if slot.transposed else t.reshape(t.shape[0], self.layer.m, -1))
        return torch.cat(parts, dim=2)

    def scatter(self, Y: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        """Write ``[K, m, d']`` back into per-parameter tensors ``out``."""
        col = 0
        for slot in self.layer.slots:
            width = 1 if slot.role == "bias" else self.layer.d
            piece = Y[:, :, col:col + width]
            col += width
            target = out[slot.param] if slot.rows is None else out[slot.param][:, slot.rows]
            target.copy_(piece.transpose(1, 2) if slot.transposed else piece.reshape(target.shape))

    def diagonal(self) -> torch.Tensor:
        """``diag(C_b)`` as ``[m, d']``."""
        if not self.refitted:
            return torch.outer(self.S.diagonal(), self.A if self.A.ndim == 1 else self.A.diagonal())
        in_basis = (self.Q_S ** 2) @ self.scales
        return in_basis if self.Q_A is None else in_basis @ (self.Q_A ** 2).T


class ExactBlock(_Block):
    """The exact diagonal block ``M`` of the curvature for one module's other parameters."""

    def __init__(self, name: str, params: list[str], matrix: torch.Tensor):
        self.name, self.params = name, params
        self.matrix = (matrix + matrix.T) / 2
        self.scales, self.Q = torch.linalg.eigh(self.matrix)

    def _to(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.Q

    def _from(self, Z: torch.Tensor) -> torch.Tensor:
        return Z @ self.Q.T

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.matrix

    def trace(self) -> float:
        return float(self.matrix.diagonal().sum())

    def gather(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([vectors[p].reshape(vectors[p].shape[0], -1) for p in self.params], dim=1)

    def scatter(self, Y: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        start = 0
        for p in self.params:
            n = out[p][0].numel()
            out[p].copy_(Y[:, start:start + n].reshape(out[p].shape))
            start += n

    def diagonal(self) -> torch.Tensor:
        return self.matrix.diagonal()


class KFAC(CurvatureOperator):
    """K-FAC approximation of the GGN/Fisher of an :class:`~hesse.Objective` (see the module docstring).

    Same constructor as :class:`hesse.GGN` plus ``kind`` (``"true"``, ``"mc"``, ``"empirical"``),
    ``mc_samples``, ``seed`` and ``weight_sharing`` (``"expand"`` or ``"reduce"``). The factors
    are computed on first use in ONE data pass (forward + one backward per output vector
    per batch; ``kind="true"`` needs one backward per class), sample-weighted like the loss
    and all-reduced under ``torch.distributed``; :meth:`refresh` recomputes them at the current
    parameters. Products, :meth:`inverse`, :meth:`trace`, :meth:`logdet` and
    :meth:`diagonal` then cost no data pass.
    """

    symmetric_by_construction = True

    def __init__(self, model, criterion=None, data=None, *, kind: str = "mc", mc_samples: int = 1, seed: int = 0,
                 weight_sharing: str = "expand", **kwargs):
        super().__init__(model, criterion, data, **kwargs)
        if kind not in KINDS:
            raise HesseError(f"unknown K-FAC kind {kind!r}; choose one of {KINDS}.")
        if weight_sharing not in SHARING:
            raise HesseError(f"weight_sharing must be one of {SHARING}, got {weight_sharing!r}.")
        if mc_samples < 1:
            raise HesseError(f"mc_samples must be at least 1, got {mc_samples}.")
        check_likelihood(self.criterion)
        self.kind, self.mc_samples, self.seed, self.weight_sharing = kind, mc_samples, seed, weight_sharing
        self.layers = _discover(self.model, set(self.param_names))
        self._blocks: list[_Block] | None = None

    def _extra_kwargs(self) -> dict:
        return {"kind": self.kind, "mc_samples": self.mc_samples, "seed": self.seed,
                "weight_sharing": self.weight_sharing}

    @property
    def factors(self) -> dict[str, _Block]:
        """Per-layer blocks by name: :class:`KroneckerBlock` (``.A``, ``.S``) or :class:`ExactBlock` (``.matrix``)."""
        if self._blocks is None:
            self.refresh()
        return {block.name: block for block in self._blocks}

    def refresh(self) -> "KFAC":
        """(Re)compute the factors at the current parameter values."""
        stats = self._factor_pass()
        blocks: list[_Block] = [KroneckerBlock(layer, A, S) for layer, (A, S) in zip(self.layers, stats)]
        self._blocks = blocks + self._exact_blocks()
        return self

    def kronecker_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer key: (A, S)}`` from one weighted pass over the data, without the
        eigendecompositions of :meth:`refresh` (for callers that average factors over steps,
        such as :class:`hesse.apply.optim.KFACOptimizer`)."""
        return dict(zip((layer.key for layer in self.layers), self._factor_pass()))

    def _factor_pass(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(A, S)`` per layer from one weighted pass over the data."""
        shapes = [((l.d,) if l.kind == "embedding" else (l.d + l.bias,) * 2, (1,), (l.m, l.m)) for l in self.layers]

        def per_batch(batch: Batch, index: int, weight: float) -> torch.Tensor:
            parts = []
            for layer, calls in zip(self.layers, self._capture(batch, index)):
                parts.extend(_factor_sums(layer, calls, weight, self.dtype, self.device))
            return torch.cat([p.reshape(-1) for p in parts])

        total, count = self.objective.sum_over_data(per_batch, desc="K-FAC factors")
        norm = count if self.objective.reduction == "mean" else 1
        out, start = [], 0
        for shape_A, _, shape_S in shapes:
            nA, nS = math.prod(shape_A), math.prod(shape_S)
            A, rows = total[start:start + nA].view(shape_A), total[start + nA]
            S = total[start + nA + 1:start + nA + 1 + nS].view(shape_S)
            start += nA + 1 + nS
            out.append((A / rows.clamp(min=1), S / norm))
        return out

    def _capture(self, batch: Batch, index: int) -> list[list[tuple[torch.Tensor, list[torch.Tensor]]]]:
        """Per layer, per call: the rows ``a`` and, per backpropagated vector, the rows ``g``."""
        values = {n: t.detach().requires_grad_(True) for n, t in self.objective.values().items()}
        generator = torch.Generator(device=self.device)
        generator.manual_seed(batch_seed(self.seed, index))
        with _Capture(self.layers) as capture, torch.enable_grad():
            output, target = self.objective.call_model(values, batch)
            vectors = _backprop_vectors(self.criterion, self.objective.reduction, self.kind, output.detach(),
                                        target, generator, self.mc_samples)
            outs = [y for layer in self.layers for _, y in capture.records[layer.key]]
            grads = [torch.autograd.grad(output, outs, r, retain_graph=True, allow_unused=True) for r in vectors]
        result, i = [], 0
        for layer in self.layers:
            calls = []
            for a, y in capture.records[layer.key]:
                gs = [g[i] if g[i] is not None else torch.zeros_like(y) for g in grads]
                calls.append(_rows(layer, a, [g.detach() for g in gs], self.weight_sharing))
                i += 1
            result.append(calls)
        return result

    def _exact_blocks(self) -> list[ExactBlock]:
        """Exact diagonal blocks (one per module) for selected parameters outside supported layers."""
        covered = {slot.param for layer in self.layers for slot in layer.slots}
        groups: dict[str, list[str]] = {}
        for name in self.param_names:
            if name not in covered:
                groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
        blocks = []
        for module, names in groups.items():
            restricted = self.objective.restrict(names)
            if restricted.size > EXACT_LIMIT:
                raise HesseError(f"{module} ({restricted.size} parameters) is not a layer K-FAC factorises and "
                                 f"too large for an exact block (> {EXACT_LIMIT}); leave it out of params=.")
            op = _exact_curvature(restricted, self.kind, self.mc_samples, self.seed)
            eye = torch.eye(restricted.size, dtype=self.dtype, device=self.device)
            blocks.append(ExactBlock(module, names, op @ eye))
        return blocks

    # ---- the operator ---------------------------------------------------------------------------
    def _apply(self, V: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn(block, X)`` block by block to ``V [P, K]``."""
        vectors = self.objective.unflatten(V)
        out = {n: torch.zeros_like(t) for n, t in vectors.items()}
        for block in self.factors.values():
            block.scatter(fn(block, block.gather(vectors)), out)
        return torch.cat([out[n].reshape(V.shape[1], -1) for n in self.param_names], dim=1).T

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._apply(V, lambda block, X: block.apply(X))

    def inverse(self, damping: float, heuristic: str = "exact") -> LinearOperator:
        """``(C + λ I)^{-1}`` as an operator: ``heuristic="exact"`` through the eigenbases,
        ``(Q_S ⊗ Q_A)(Λ_S ⊗ Λ_A + λ)^{-1}(Q_S ⊗ Q_A)ᵀ``; ``"pi"``: Martens & Grosse's
        ``(S + π√λ I)^{-1} ⊗ (A + √λ/π I)^{-1}`` (an approximation of the damped inverse)."""
        if not (damping > 0) or heuristic not in ("exact", "pi"):
            raise HesseError(f"inverse needs damping > 0 and heuristic 'exact' or 'pi', got {damping}, {heuristic!r}.")
        return _KFACInverse(self, float(damping), heuristic)

    def trace(self) -> float:
        """``tr C = Σ_layers tr S · tr A`` (K-FAC) or ``Σ Λ`` (EK-FAC)."""
        return sum(block.trace() for block in self.factors.values())

    def logdet(self, damping: float) -> float:
        """``log det (C + λ I) = Σ log(Λ + λ)`` over all blocks."""
        return sum(block.logdet(damping) for block in self.factors.values())

    def diagonal(self) -> torch.Tensor:
        """``diag(C)`` as a flat ``[P]`` vector."""
        out = {n: torch.zeros(1, *s, dtype=self.dtype, device=self.device)
               for n, s in zip(self.param_names, self.objective.param_shapes)}
        for block in self.factors.values():
            block.scatter(block.diagonal().unsqueeze(0), out)
        return torch.cat([out[n].reshape(-1) for n in self.param_names])


class _KFACInverse(LinearOperator):
    """The damped inverse of a :class:`KFAC`/:class:`EKFAC` operator, block by block."""

    symmetric_by_construction = True

    def __init__(self, op: KFAC, damping: float, heuristic: str):
        self.op, self.damping, self.heuristic = op, damping, heuristic
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    @property
    def blocks(self) -> dict[str, slice]:
        return self.op.blocks

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        lam = self.damping
        if self.heuristic == "pi":
            return self.op._apply(V, lambda b, X: b.solve_pi(X, lam) if isinstance(b, KroneckerBlock) else b.solve(X, lam))
        return self.op._apply(V, lambda b, X: b.solve(X, lam))


def _exact_curvature(objective, kind: str, mc_samples: int, seed: int) -> LinearOperator:
    """The curvature K-FAC approximates, for an exact block: the GGN (``"true"``) or the Fisher of that kind."""
    from hesse.operators.fisher import Fisher
    from hesse.operators.ggn import GGN

    return GGN(objective) if kind == "true" else Fisher(objective, kind=kind, mc_samples=mc_samples, seed=seed)


def _factor_sums(layer: _Layer, calls, weight: float, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """``[Σ a aᵀ, rows, weight Σ g gᵀ]`` of one batch for one layer (token counts ``Σ a`` for an embedding)."""
    shape_A = (layer.d,) if layer.kind == "embedding" else (layer.d + layer.bias,) * 2
    A, S = torch.zeros(shape_A, dtype=dtype, device=device), torch.zeros(layer.m, layer.m, dtype=dtype, device=device)
    rows = torch.zeros(1, dtype=dtype, device=device)
    for a, gs in calls:
        if layer.kind == "embedding":
            A += torch.bincount(a.reshape(-1), minlength=layer.d).to(A)
        else:
            flat = a.reshape(-1, a.shape[-1])
            A += flat.T @ flat
        rows += a.shape[0] * a.shape[1]
        for g in gs:
            flat = g.reshape(-1, g.shape[-1])
            S += flat.T @ flat
    return [A, rows, weight * S]


class EKFAC(KFAC):
    """EK-FAC (George et al. 2018): K-FAC's eigenbases with eigenvalues refitted to the data.

    After the K-FAC pass, a second pass accumulates ``Λ = Σ_b w_b Σ_n Σ_r (Q_Sᵀ G_n^r Q_A)^2``
    from each sample's gradient matrix ``G_n^r = Σ_t g_t a_tᵀ`` (same backpropagated vectors,
    same seeds), so ``Q Λ Qᵀ`` is the closest matrix to the exact block in Frobenius norm among
    those diagonal in the Kronecker eigenbasis; it is never farther from it than K-FAC.
    ``weight_sharing`` only affects the eigenbases.
    """

    def refresh(self) -> "EKFAC":
        super().refresh()
        kron = [b for b in self._blocks if isinstance(b, KroneckerBlock)]
        shapes = [b.scales.shape for b in kron]

        def per_batch(batch: Batch, index: int, weight: float) -> torch.Tensor:
            sharing, self.weight_sharing = self.weight_sharing, "expand"  # per-sample gradients need every row
            try:
                captured = self._capture(batch, index)
            finally:
                self.weight_sharing = sharing
            return torch.cat([weight * _eigen_sums(b, calls).reshape(-1) for b, calls in zip(kron, captured)])

        total, count = self.objective.sum_over_data(per_batch, desc="EK-FAC eigenvalues")
        norm = count if self.objective.reduction == "mean" else 1
        start = 0
        for block, shape in zip(kron, shapes):
            n = math.prod(shape)
            block.scales, block.refitted = total[start:start + n].view(shape) / norm, True
            start += n
        return self


def _eigen_sums(block: KroneckerBlock, calls) -> torch.Tensor:
    """``Σ_n Σ_r (Q_Sᵀ G_n^r Q_A)^2`` of one batch for one layer, ``[m, d']``."""
    out = torch.zeros_like(block.scales)
    for a, gs in calls:
        for g in gs:
            gq = g @ block.Q_S  # [N, T, m]
            if block.Q_A is None:  # embedding: Q_A = I, G_n = Σ_t g_t e_{token_t}ᵀ
                out += _embedding_squares(a, gq, block.layer.d).T[:, block.index]
            else:
                aq = a[..., block.index] @ block.Q_A  # [N, T, d']
                out += (torch.einsum("ntm,ntd->nmd", gq, aq) ** 2).sum(0)
    return out


def _embedding_squares(tokens: torch.Tensor, gq: torch.Tensor, vocab: int) -> torch.Tensor:
    """``Σ_n (Σ_{t: token_t = v} gq_t)^2`` for every token ``v``: ``[vocab, m]``."""
    N, T = tokens.shape
    keys = (torch.arange(N, device=tokens.device)[:, None] * vocab + tokens).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    per_sample = gq.new_zeros(len(unique), gq.shape[-1]).index_add_(0, inverse, gq.reshape(N * T, -1))
    return gq.new_zeros(vocab, gq.shape[-1]).index_add_(0, unique % vocab, per_sample ** 2)
