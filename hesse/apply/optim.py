"""Curvature-aware optimizers as drop-in ``torch.optim.Optimizer`` subclasses.

* :class:`AdaHessian` (Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, AAAI 2021, "ADAHESSIAN:
  An Adaptive Second Order Optimizer for Machine Learning"): Adam with the squared gradient
  replaced by a Hutchinson estimate of the Hessian diagonal ``D = |z ⊙ Hz|`` (Rademacher ``z``),
  averaged over the spatial dimensions of convolution kernels (any dimensionality).
* :class:`SophiaH` and :class:`SophiaG` (Liu, Li, Hall, Liang & Ma, ICLR 2024, "Sophia: A
  Scalable Stochastic Second-order Optimizer for Language Model Pre-training"): momentum
  preconditioned by an EMA of a diagonal curvature estimate refreshed every ``k`` steps
  (Hutchinson ``z ⊙ Hz`` for H, Gauss-Newton-Bartlett ``B ĝ ⊙ ĝ`` for G), clipped per coordinate.
* :class:`SAM` (Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021, "Sharpness-Aware Minimization")
  and its adaptive variant ASAM (Kwon, Kim, Park & Choi, ICML 2021): the gradient at the
  worst-case neighbour ``w + ε`` drives any base optimizer; BatchNorm statistics are updated
  once per step.
* :class:`KFACOptimizer` (Martens & Grosse, ICML 2015, "Optimizing Neural Networks with
  Kronecker-factored Approximate Curvature"): SGD with momentum on the K-FAC-preconditioned
  gradient ``(F + λI)⁻¹ g``, with the factors of :class:`hesse.KFAC`.

Second-order information comes from closures that **return the loss without calling
backward**: the optimizer differentiates it itself (``create_graph=True`` where it needs
Hessian-vector products) and every graph is released before :meth:`step` returns, so no
step can keep the previous step's graph alive (the reference cycle ``p.grad → graph → p``
that ``loss.backward(create_graph=True)`` creates never exists). ``p.grad`` is set to the
detached gradient, so ``zero_grad`` and gradient inspection work as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hesse.analysis.landscape import eval_mode
from hesse.errors import HesseError
from hesse.operators.kfac import KFAC, KroneckerBlock

__all__ = ["AdaHessian", "KFACOptimizer", "SAM", "SophiaG", "SophiaH"]

Closure = Callable[[], Any]


# ---- shared machinery ---------------------------------------------------------------------------
class _ClosureOptimizer(torch.optim.Optimizer):
    """Base of the optimizers whose closure returns the loss: a seeded generator for probes
    (its state travels in ``state_dict``, so a resumed run draws the same probes) and the
    gradient/Hessian-vector helpers."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], seed: int):
        super().__init__(params, defaults)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def rademacher(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Independent Rademacher (±1) tensors shaped like ``params``: ``E[z zᵀ] = I``."""
        g = self._rng(params[0].device)
        return [torch.randint(0, 2, p.shape, generator=g, device=p.device).to(p.dtype).mul_(2).sub_(1)
                for p in params]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = None if self._generator is None else self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        self._generator = None
        if generator is not None:
            self._rng(self._params()[0].device).set_state(generator)


def _call(closure: Closure | None, what: str, twice_differentiable: bool = False) -> Any:
    """Run the closure with gradients enabled (``step`` itself runs under ``no_grad``); for
    Hessian-vector products, attention uses the math kernel (fused kernels have no double backward)."""
    if closure is None:
        raise HesseError(f"{what}.step needs a closure that computes and returns the loss "
                         "(without calling backward): opt.step(lambda: criterion(model(x), y)).")
    if twice_differentiable:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            return closure()
    with torch.enable_grad():
        return closure()


def _as_loss(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 0 or value.grad_fn is None:
        raise HesseError(f"{what}'s closure must return the scalar loss tensor, still attached to the graph "
                         "(do not call .item(), .detach() or .backward() in it).")
    return value


def _gradients(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    """``∇L`` for each parameter (zeros where the loss does not depend on it)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _hvp(grads: list[torch.Tensor], params: list[torch.Tensor], vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` by Pearlmutter's trick, ``∇(∇L · v)``, from ``create_graph=True`` gradients.

    The graph is released by this call (no ``retain_graph``)."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if live:
        with torch.enable_grad():
            hv = torch.autograd.grad([grads[i] for i in live], params, [vectors[i] for i in live], allow_unused=True)
        out = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]
    return out


def _set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach()


def spatial_average(diagonal: torch.Tensor) -> torch.Tensor:
    """AdaHessian's spatial averaging: a kernel ``[out, in, *spatial]`` (``ndim ≥ 3``: 1-D, 2-D,
    3-D convolutions) gets, at every spatial position, the mean over its spatial dimensions,
    ``D[o, i, ...] ← mean_s D[o, i, s]`` (Yao et al. 2021, §3.2); other tensors are unchanged."""
    if diagonal.ndim < 3:
        return diagonal
    return diagonal.mean(dim=tuple(range(2, diagonal.ndim)), keepdim=True).expand_as(diagonal)


# ---- AdaHessian -------------------------------------------------------------------------------
class AdaHessian(_ClosureOptimizer):
    """AdaHessian (Yao et al. 2021), Algorithm 1, with decoupled weight decay as in the authors' code.

    Each step draws Rademacher ``z`` and forms ``D = |z ⊙ Hz|`` (spatially averaged for
    convolution kernels; ``spatial_average=False`` in a group turns that off), then with
    ``t`` the step, ``k`` the Hessian power::

        m ← β₁ m + (1-β₁) g,     v ← β₂ v + (1-β₂) D ⊙ D,
        w ← w - lr · ( (m / (1-β₁ᵗ)) / ((√v / √(1-β₂ᵗ))ᵏ + ε) + wd · w ).

    Defaults are the paper's: ``lr=0.15, betas=(0.9, 0.999), eps=1e-4, hessian_power=1``.
    ``step(closure)``: the closure returns the loss (no backward); one step costs a gradient
    and one Hessian-vector product (about 2 gradients more than Adam's one), and the
    double-backward graph is released inside the step.
    """

    def __init__(self, params: Iterable, lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0,
                 spatial_average: bool = True, seed: int = 0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not 0 <= hessian_power <= 1:
            raise HesseError("AdaHessian needs lr, eps, weight_decay >= 0 and 0 <= hessian_power <= 1.")
        if not all(0 <= b < 1 for b in betas):
            raise HesseError(f"betas must lie in [0, 1), got {betas}.")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      hessian_power=hessian_power, spatial_average=spatial_average), seed)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:
        """One AdaHessian step; returns the (detached) loss at the current weights."""
        params = self._params()
        loss = _as_loss(_call(closure, "AdaHessian", twice_differentiable=True), "AdaHessian")
        grads = _gradients(loss, params, create_graph=True)
        zs = self.rademacher(params)
        hvs = _hvp(grads, params, zs)
        _set_grads(params, grads)
        diag = {p: (z * hv).abs() for p, z, hv in zip(params, zs, hvs)}
        del grads, hvs
        for group in self.param_groups:
            for p in group["params"]:
                if p in diag:
                    d = spatial_average(diag[p]) if group["spatial_average"] else diag[p]
                    self._update(p, p.grad, d, group)
        return loss.detach()

    def _update(self, p: torch.Tensor, grad: torch.Tensor, diag: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_hessian_diag_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t, k = state["step"], group["hessian_power"]
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_hessian_diag_sq"].mul_(beta2).addcmul_(diag, diag, value=1 - beta2)
        denom = (state["exp_hessian_diag_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).pow(k).add_(group["eps"])
        step = state["exp_avg"] / (1 - beta1 ** t) / denom
        p.add_(step + group["weight_decay"] * p, alpha=-group["lr"])


# ---- Sophia -----------------------------------------------------------------------------------
class _Sophia(_ClosureOptimizer):
    """Sophia (Liu et al. 2023), Algorithm 3: with ``ĥ`` the curvature estimate of every
    ``k``-th step (steps 1, k+1, 2k+1, ...)::

        m ← β₁ m + (1-β₁) g,   h ← β₂ h + (1-β₂) ĥ  (estimate steps only),
        w ← w - lr · wd · w,   w ← w - lr · clip(m / max(ρ h, ε), 1),

    ``clip(x, 1) = max(min(x, 1), -1)`` per coordinate: the update is at most ``lr`` per
    coordinate, and where ``h ≤ 0`` (possible for Hutchinson) it is ``lr · sign(m)``.
    Subclasses define :meth:`_estimate`.
    """

    hessian_vector_products = False  # whether the estimate differentiates twice

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float], rho: float,
                 weight_decay: float, eps: float, update_interval: int, seed: int):
        if lr < 0 or rho <= 0 or weight_decay < 0 or eps <= 0 or update_interval < 1:
            raise HesseError("Sophia needs lr, weight_decay >= 0, rho, eps > 0 and update_interval >= 1.")
        if not all(0 <= b < 1 for b in betas):
            raise HesseError(f"betas must lie in [0, 1), got {betas}.")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps), seed)
        self.update_interval = update_interval
        self.steps = 0

    def _estimate(self, output: Any, params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(loss, gradients, ĥ)`` from the closure's output (graphs released)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _loss(self, output: Any) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:
        """One Sophia step; returns the (detached) loss at the current weights."""
        name = type(self).__name__
        estimate = self.steps % self.update_interval == 0
        params = self._params()
        output = _call(closure, name, twice_differentiable=estimate and self.hessian_vector_products)
        if estimate:
            loss, grads, hessian = self._estimate(output, params)
        else:
            loss = self._loss(output)
            grads, hessian = _gradients(loss, params, create_graph=False), None
        _set_grads(params, grads)
        self.steps += 1
        curvature = dict(zip(params, hessian)) if hessian is not None else {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._update(p, p.grad, curvature.get(p), group)
        return loss.detach()

    def _update(self, p: torch.Tensor, grad: torch.Tensor, h_hat: torch.Tensor | None, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        if h_hat is not None:
            state["hessian"].mul_(beta2).add_(h_hat, alpha=1 - beta2)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        ratio = state["exp_avg"] / (group["rho"] * state["hessian"]).clamp(min=group["eps"])
        p.add_(ratio.clamp_(-1, 1), alpha=-group["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps = state_dict.pop("steps", 0)
        super().load_state_dict(state_dict)


class SophiaH(_Sophia):
    """Sophia-H: ``ĥ = z ⊙ Hz`` (Hutchinson, Rademacher ``z``; unbiased for ``diag H``).

    ``step(closure)``: the closure returns the loss (no backward). Estimate steps cost a
    gradient plus a Hessian-vector product; the others one gradient. Defaults: the
    paper's ``betas=(0.965, 0.99)``, ``k=10`` and ``weight_decay=0.1``; ``rho=0.01`` (the
    smaller ``γ`` quoted for Sophia-H), ``lr=1e-4`` (language-model scale: tune it).
    """

    hessian_vector_products = True

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.01, weight_decay: float = 0.1, eps: float = 1e-12, update_interval: int = 10,
                 seed: int = 0):
        super().__init__(params, lr, betas, rho, weight_decay, eps, update_interval, seed)

    def _loss(self, output: Any) -> torch.Tensor:
        return _as_loss(output, "SophiaH")

    def _estimate(self, output: Any, params: list[torch.Tensor]):
        loss = self._loss(output)
        grads = _gradients(loss, params, create_graph=True)
        zs = self.rademacher(params)
        hvs = _hvp(grads, params, zs)
        return loss, [g.detach() for g in grads], [z * hv for z, hv in zip(zs, hvs)]


class SophiaG(_Sophia):
    """Sophia-G: the Gauss-Newton-Bartlett estimator ``ĥ = B · ĝ ⊙ ĝ`` with
    ``ĝ = ∇ (1/B) Σ_b CE(f(x_b), ŷ_b)`` at labels ``ŷ_b ~ softmax(f(x_b))`` sampled from the
    model (``B`` = number of rows of the logits); ``E[B ĝ ĝ]`` is the diagonal of the
    Gauss-Newton matrix of the cross-entropy (Bartlett's identity), and it is never negative.

    ``step(closure)``: the closure returns ``(loss, logits)`` from one forward pass (no
    backward; logits ``[B, C]`` or ``[..., C]``, flattened to rows). Estimate steps cost one
    extra backward through the same graph. Defaults are the authors' code's
    (github.com/Liuhong99/Sophia ``SophiaG``): ``lr=1e-4, betas=(0.965, 0.99), rho=0.04,
    weight_decay=0.1``, ``k=10``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-12, update_interval: int = 10,
                 seed: int = 0):
        super().__init__(params, lr, betas, rho, weight_decay, eps, update_interval, seed)

    @staticmethod
    def _split(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise HesseError("SophiaG's closure must return (loss, logits) from one forward pass, "
                             "e.g. lambda: (criterion(out := model(x), y), out).")
        return _as_loss(output[0], "SophiaG"), output[1]

    def _loss(self, output: Any) -> torch.Tensor:
        return self._split(output)[0]

    def _estimate(self, output: Any, params: list[torch.Tensor]):
        loss, logits = self._split(output)
        with torch.enable_grad():  # (step runs under no_grad; the reshape must stay on the graph)
            rows = logits.reshape(-1, logits.shape[-1])
            probs = torch.softmax(rows.detach().float(), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=self._rng(rows.device)).squeeze(1)
            # the graph is kept for the loss's own gradient, and freed by it just after
            sampled_grads = torch.autograd.grad(F.cross_entropy(rows, sampled), params, retain_graph=True,
                                                allow_unused=True)
        B = rows.shape[0]
        hessian = [torch.zeros_like(p) if s is None else B * s * s for s, p in zip(sampled_grads, params)]
        return loss, _gradients(loss, params, create_graph=False), hessian


# ---- SAM / ASAM -------------------------------------------------------------------------------
@contextmanager
def frozen_batchnorm_statistics() -> Iterator[None]:
    """While active, BatchNorm layers in train mode normalise with the batch statistics as
    usual but do not update ``running_mean``/``running_var``/``num_batches_tracked``.

    A global forward pre-hook switches ``track_running_stats`` off on each BatchNorm that
    runs (in train mode the batch statistics are used either way) and every flag is restored
    on exit, also on error."""
    touched: list[nn.Module] = []

    def hook(module: nn.Module, args: Any) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and module.training:
            module.track_running_stats = False
            touched.append(module)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for module in touched:
            module.track_running_stats = True


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021) and ASAM (Kwon et al. 2021) around any base optimizer.

    ``step(closure)``: the closure computes the loss, calls ``loss.backward()`` and returns
    the loss (the usual torch closure; ``step`` zeroes the gradients before each call). With
    ``g = ∇L(w)``, ``T_w = diag(|w| + η)`` for ASAM (``I`` for SAM)::

        ε = ρ T_w² g / ‖T_w g‖,     g_SAM = ∇L(w + ε),     w ← base_step(w, g_SAM),

    (the first-order solution of ``max_{‖T_w⁻¹ε‖ ≤ ρ} L(w + ε)``). ASAM scales the weights
    but, as the authors' code (github.com/SamsungLabs/ASAM, parameters whose name contains
    "weight") excludes biases; an optimizer sees no names, so tensors with ``ndim ≥ 2`` are
    scaled and 1-D tensors (biases, norm scales) are not; set ``adaptive`` per group to
    override. ``eta=0.01`` as in the ASAM paper; ASAM's paper uses ``rho`` about 10x SAM's
    (0.5 vs 0.05 on CIFAR). The second pass runs under
    :func:`frozen_batchnorm_statistics`, so BatchNorm running statistics are updated once,
    by the first pass (as in a plain step). Costs two gradients per step.
    """

    def __init__(self, params: Iterable, base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, **kwargs: Any):
        if rho < 0 or eta < 0:
            raise HesseError(f"SAM needs rho >= 0 and eta >= 0, got rho={rho}, eta={eta}.")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @staticmethod
    def _scale(p: torch.Tensor, group: dict) -> torch.Tensor | float:
        """``T_w``: ``|w| + η`` for ASAM on weight tensors, 1 otherwise."""
        return p.abs() + group["eta"] if group["adaptive"] and p.ndim >= 2 else 1.0

    @torch.no_grad()
    def perturbation(self) -> dict[torch.Tensor, torch.Tensor]:
        """``ε = ρ T² g / ‖T g‖`` per parameter, from the current ``.grad``."""
        scaled = [(p, group, self._scale(p, group) * p.grad) for group in self.param_groups
                  for p in group["params"] if p.grad is not None]
        if not scaled:
            raise HesseError("SAM found no gradients: the closure must call loss.backward().")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(tg) for _, _, tg in scaled]))
        return {p: tg * self._scale(p, group) * (group["rho"] / (norm + 1e-12)) for p, group, tg in scaled}

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:
        """One SAM step; returns the loss at ``w`` (the first closure call)."""
        if closure is None:
            raise HesseError("SAM.step needs a closure that computes the loss, calls backward and returns it.")
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        eps = self.perturbation()
        for p, e in eps.items():
            p.add_(e)
        self.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad(), frozen_batchnorm_statistics():
                closure()
        finally:
            for p, e in eps.items():
                p.sub_(e)
        self.base_optimizer.step()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (its groups carry ``rho``, ``adaptive`` and ``eta``)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


# ---- K-FAC ------------------------------------------------------------------------------------
class KFACOptimizer(torch.optim.Optimizer):
    """K-FAC (Martens & Grosse 2015) as a preconditioner of SGD with momentum.

    Every ``factor_interval`` steps the Kronecker factors ``A`` (input second moments) and
    ``S`` (backpropagated output-gradient second moments, labels sampled from the model:
    ``kind="mc"``) of :class:`hesse.KFAC` are computed on the step's batch and averaged,
    ``A ← α A + (1-α) A_batch`` (``α = factor_decay``; the first batch initialises); every
    ``inverse_interval`` steps the averaged factors are eigendecomposed. Each step, per layer
    with gradient matrix ``G`` (bias as last column) and ``λ = damping``::

        Δ = (S ⊗ A + λ I)⁻¹ vec(G) = Q_S [(Q_Sᵀ G Q_A) / (λ_S λ_Aᵀ + λ)] Q_Aᵀ,
        b ← μ b + Δ,   w ← w - lr · b,

    (``g`` includes ``weight_decay · w``). Parameters outside a factorised layer
    (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.MultiheadAttention``) get ``Δ = g``
    (plain SGD with momentum). Factors are computed with the model in eval mode (BatchNorm
    uses its running statistics, no dropout).

    ``step(closure=None, batch=None)``: the closure (optional) computes the loss, calls
    backward and returns it; ``batch`` is what :class:`hesse.KFAC` takes as data (e.g.
    ``(inputs, targets)``), needed on factor steps. ``params`` are the model's parameters by
    default (groups allowed). Factor steps cost one forward and one backward more.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, params: Iterable | None = None, lr: float = 0.01,
                 momentum: float = 0.9, damping: float = 1e-3, weight_decay: float = 0.0,
                 factor_interval: int = 10, inverse_interval: int = 10, factor_decay: float = 0.95,
                 seed: int = 0, **kfac_kwargs: Any):
        if lr < 0 or damping <= 0 or not 0 <= momentum < 1 or not 0 <= factor_decay < 1:
            raise HesseError("KFACOptimizer needs lr >= 0, damping > 0, 0 <= momentum < 1, 0 <= factor_decay < 1.")
        if factor_interval < 1 or inverse_interval < 1:
            raise HesseError("factor_interval and inverse_interval must be at least 1.")
        super().__init__(model.parameters() if params is None else params,
                         dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay))
        self.model, self.criterion, self.kfac_kwargs = model, criterion, {"kind": "mc", **kfac_kwargs}
        self.factor_interval, self.inverse_interval, self.factor_decay = factor_interval, inverse_interval, factor_decay
        self.seed, self.steps = seed, 0
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._layers = self._factorised_layers()
        self._blocks: dict[str, KroneckerBlock] = {}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inverted: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _factorised_layers(self) -> dict[str, Any]:
        """The layers :class:`hesse.KFAC` factorises among this optimizer's parameters, by key."""
        mine = [self._names[id(p)] for g in self.param_groups for p in g["params"] if id(p) in self._names]
        with eval_mode(self.model):  # no data is read: the layers are found from the modules
            probe = KFAC(self.model, self.criterion, (torch.zeros(1), torch.zeros(1)), params=mine, **self.kfac_kwargs)
        return {layer.key: layer for layer in probe.layers}

    def _refresh_factors(self, batch: Any) -> None:
        """Average in the factors of ``batch`` at the current weights."""
        names = [s.param for layer in self._layers.values() for s in layer.slots]
        if any(not bool(torch.isfinite(p).all()) for g in self.param_groups for p in g["params"]):
            raise HesseError("KFACOptimizer: the parameters are not finite (training diverged); "
                             "lower lr or raise damping.")
        with eval_mode(self.model):
            op = KFAC(self.model, self.criterion, batch, params=names, seed=self.seed + self.steps,
                      stochastic=True, check_data=False, **self.kfac_kwargs)
            stats = op.kronecker_factors()  # no eigendecompositions: those come from the averages
        a = self.factor_decay
        for key in self._layers:
            A, S = stats[key]
            old = self._factors.get(key)
            self._factors[key] = (A, S) if old is None else (a * old[0] + (1 - a) * A, a * old[1] + (1 - a) * S)

    def _invert(self) -> None:
        """Eigendecompose the averaged factors (the "inverse" of K-FAC; damping enters at solve time)."""
        self._inverted = {k: (A.clone(), S.clone()) for k, (A, S) in self._factors.items()}
        self._blocks = _eigen_blocks(self._layers, self._inverted)

    def _directions(self) -> dict[torch.Tensor, torch.Tensor]:
        """``g + wd·w`` per parameter, preconditioned block by block where a K-FAC block exists
        (with the damping of the group holding the layer's weight)."""
        named = dict(self.model.named_parameters())
        out, groups = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    out[p], groups[p] = p.grad + group["weight_decay"] * p, group
        for block in self._blocks.values():
            params = [named[s.param] for s in block.layer.slots]
            if all(q in out for q in params):
                lam = groups[params[0]]["damping"]
                vectors = {s.param: out[q].unsqueeze(0) for s, q in zip(block.layer.slots, params)}
                solved = {n: v.clone() for n, v in vectors.items()}  # a block may own only some rows (q/k/v)
                block.scatter(block.solve(block.gather(vectors).double(), lam), solved)  # copy_ casts back
                out.update({q: solved[s.param][0] for s, q in zip(block.layer.slots, params)})
        return out

    @torch.no_grad()
    def step(self, closure: Closure | None = None, batch: Any = None) -> Any:
        """One K-FAC step; returns the closure's loss (``None`` without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.steps % self.factor_interval == 0:
            if batch is None:
                raise HesseError(f"step {self.steps} refreshes the K-FAC factors: pass the batch, "
                                 "opt.step(closure, batch=(inputs, targets)).")
            with torch.enable_grad():
                self._refresh_factors(batch)
        if self.steps % self.inverse_interval == 0 or not self._blocks:
            self._invert()
        directions = self._directions()
        for group in self.param_groups:
            for p in group["params"]:
                if p in directions:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(directions[p])
                    p.add_(buf, alpha=-group["lr"])
        self.steps += 1
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the step count and the averaged and inverted factors."""
        return {**super().state_dict(), "steps": self.steps,
                "factors": {k: (A.clone(), S.clone()) for k, (A, S) in self._factors.items()},
                "inverted": {k: (A.clone(), S.clone()) for k, (A, S) in self._inverted.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps = state_dict.pop("steps")
        self._factors = {k: (A.clone(), S.clone()) for k, (A, S) in state_dict.pop("factors").items()}
        self._inverted = state_dict.pop("inverted")
        self._blocks = _eigen_blocks(self._layers, self._inverted)
        super().load_state_dict(state_dict)


def _eigen_blocks(layers: dict[str, Any], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, KroneckerBlock]:
    """:class:`KroneckerBlock` per layer, eigendecomposed in float64: float32 ``eigh`` fails to
    converge on factors with many repeated eigenvalues (e.g. ``A`` of a convolution whose
    zero-padded patches are often all zero)."""
    return {k: KroneckerBlock(layers[k], A.double(), S.double()) for k, (A, S) in factors.items()}
