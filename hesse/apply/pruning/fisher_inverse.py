"""The inverse of the damped empirical Fisher and the optimal brain surgeon update.

The empirical Fisher of ``m`` per-sample gradients ``g_i`` with damping ``λ`` is
``F = λI + (1/m) Σ_i g_i g_iᵀ``. WoodFisher (Singh & Alistarh 2020) builds its inverse by ``m``
rank-one Woodbury (Sherman–Morrison) updates, ``F_0⁻¹ = I/λ``,

    F_i⁻¹ = F_{i-1}⁻¹ − v_i v_iᵀ / (m + g_iᵀ v_i),   v_i = F_{i-1}⁻¹ g_i.

Two representations:

* :func:`block_fisher_inverse`: ``F`` restricted to blocks of ``B`` consecutive weights
  (block-diagonal), each block's ``B x B`` inverse stored densely: memory ``P·B``, cost
  ``P·B·(m + B)`` (each block formed and inverted directly, the same matrix as the recursion);
* :class:`EmpiricalFisherInverse`: the whole ``F`` in the low-rank form of M-FAC (Frantar,
  Kurtic & Alistarh 2021). Writing ``v_i = Σ_j A_ij g_j`` (``A`` lower triangular, from the
  Gram matrix ``D = G Gᵀ`` in ``O(m³)``) and ``d_i = m + g_iᵀ v_i`` gives
  ``F⁻¹ = I/λ − U Uᵀ`` with ``U = Gᵀ Aᵀ diag(d)^{-1/2}``: products cost ``O(m·P)``, memory ``P·m``.

Optimal brain surgeon (Hassibi & Stork 1993): removing weight ``q`` raises the quadratic
model ``½ δwᵀ F δw`` by the saliency ``ρ_q = w_q² / (2 [F⁻¹]_qq)`` at the best update
``δw = −(w_q/[F⁻¹]_qq) F⁻¹ e_q``. Removing a set ``Q`` at once (Singh & Alistarh 2020, eq. 8):
``δw = −F⁻¹ E_Q ([F⁻¹]_QQ)⁻¹ w_Q``, the exact minimiser of ``δwᵀ F δw`` with ``(w + δw)_Q = 0``.
"""

from __future__ import annotations

import torch

from hesse.errors import HesseError


def damping(G: torch.Tensor, damp: float) -> float:
    """The absolute damping ``λ = damp · mean diag((1/m) GᵀG)`` (relative to the Fisher's scale;
    ``damp`` itself when every gradient is zero)."""
    if damp <= 0:
        raise HesseError(f"damp must be positive (relative to the mean Fisher diagonal), got {damp}.")
    scale = sum(float((g.double() ** 2).sum()) for g in G) / (G.shape[0] * G.shape[1])  # row by row: no [m, P] copy
    return damp * scale if scale > 0 else damp


def block_fisher_inverse(G: torch.Tensor, block_size: int, lam: float, chunk: int = 16384) -> torch.Tensor:
    """``[nb, B, B]``: the inverse of each diagonal block of ``F = λI + (1/m) GᵀG`` (``G``: ``[m, P]``);
    ``P`` is padded with zeros to a multiple of ``B``.

    Each block ``λI + (1/m) G_bᵀG_b`` is formed by one batched product and inverted through its
    Cholesky factor, in float64, ``chunk`` blocks at a time: the same matrix as ``m`` rank-one
    Woodbury updates, at ``O(P·B·(m + B))`` in a few large products instead of ``m`` small ones."""
    m, P = G.shape
    nb = -(-P // block_size)
    padded = torch.nn.functional.pad(G, (0, nb * block_size - P)) if nb * block_size != P else G
    Finv = torch.empty(nb, block_size, block_size, dtype=torch.float64, device=G.device)
    eye = lam * torch.eye(block_size, dtype=torch.float64, device=G.device)
    for start in range(0, nb, chunk):
        stop = min(start + chunk, nb)
        Gb = padded[:, start * block_size:stop * block_size].double().view(m, stop - start, block_size).transpose(0, 1)
        Finv[start:stop] = torch.cholesky_inverse(torch.linalg.cholesky(Gb.transpose(1, 2) @ Gb / m + eye))
    return Finv


def block_obs_update(Finv: torch.Tensor, w: torch.Tensor, prune: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``δw`` (``[P]``) removing the weights ``prune`` (bool ``[P]``) with the block-diagonal
    ``F⁻¹`` of :func:`block_fisher_inverse`: in each block ``δw = −F⁻¹ E_Q ([F⁻¹]_QQ)⁻¹ w_Q``.

    The block's system is solved as ``S z = w ⊙ q`` with ``S`` equal to ``F⁻¹`` on ``Q x Q`` and
    the identity elsewhere, so ``z`` vanishes off ``Q``."""
    nb, B, _ = Finv.shape
    P = w.numel()
    wb = torch.zeros(nb * B, dtype=torch.float64, device=w.device)
    qb = torch.zeros(nb * B, dtype=torch.bool, device=w.device)
    wb[:P], qb[:P] = w, prune
    wb, qb = wb.view(nb, B), qb.view(nb, B)
    out = torch.empty(nb, B, dtype=torch.float64, device=w.device)
    eye = torch.eye(B, dtype=torch.float64, device=w.device)
    for start in range(0, nb, chunk):  # chunks of blocks bound the temporaries
        F, q = Finv[start:start + chunk], qb[start:start + chunk]
        S = torch.where(q.unsqueeze(2) & q.unsqueeze(1), F, eye * (~q).unsqueeze(2).double())
        z = torch.linalg.solve(S, (wb[start:start + chunk] * q).unsqueeze(-1))
        out[start:start + chunk] = -(F @ z).squeeze(-1)
    return out.reshape(-1)[:P]


def block_inverse_diagonal(Finv: torch.Tensor, size: int) -> torch.Tensor:
    """``diag(F⁻¹)`` (``[P]``) of the block-diagonal inverse."""
    return torch.diagonal(Finv, dim1=1, dim2=2).reshape(-1)[:size]


class EmpiricalFisherInverse:
    """``F⁻¹`` of ``F = λI + (1/m) Σ g_i g_iᵀ`` in the M-FAC low-rank form ``I/λ − U Uᵀ``.

    ``G`` (``[m, P]``) holds the per-sample gradients as rows; ``lam`` is the absolute damping.
    Computations run in float64.
    """

    def __init__(self, G: torch.Tensor, lam: float):
        if G.ndim != 2 or G.shape[0] == 0:
            raise HesseError(f"per-sample gradients must be a non-empty [m, P] matrix, got shape {list(G.shape)}.")
        if lam <= 0:
            raise HesseError(f"the damping must be positive, got {lam}.")
        self.G, self.lam = G.double(), float(lam)
        self.m, self.size = G.shape
        A, d = self._coefficients(self.G @ self.G.T)
        self.C = A.T / d.sqrt()  # U = Gᵀ C
        self._U: torch.Tensor | None = None

    def _coefficients(self, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``d`` with ``v_i = Σ_j A_ij g_j`` and ``d_i = m + g_iᵀ v_i``, from the Gram ``D``:
        ``A_i = e_i/λ − Σ_{j<i} ((A D)_ji / d_j) A_j`` (the Woodbury recursion in coefficient space)."""
        m = self.m
        A = torch.zeros(m, m, dtype=torch.float64, device=D.device)
        d = torch.zeros(m, dtype=torch.float64, device=D.device)
        for i in range(m):
            A[i, i] = 1.0 / self.lam
            if i:
                c = (A[:i] @ D[:, i]) / d[:i]
                A[i] -= c @ A[:i]
            d[i] = m + A[i] @ D[:, i]
        return A, d

    @property
    def U(self) -> torch.Tensor:
        """``[P, m]`` with ``F⁻¹ = I/λ − U Uᵀ`` (computed once, on first use)."""
        if self._U is None:
            self._U = self.G.T @ self.C
        return self._U

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``F⁻¹ x`` for ``x`` of shape ``[P]`` or ``[P, K]``, in ``O(m·P)``."""
        x = x.double()
        return x / self.lam - self.G.T @ (self.C @ (self.C.T @ (self.G @ x)))

    def diagonal(self) -> torch.Tensor:
        """``diag(F⁻¹) = 1/λ − Σ_j U_qj²`` (``[P]``)."""
        return 1.0 / self.lam - (self.U ** 2).sum(1)

    def obs_update(self, w: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        """``δw = −F⁻¹ E_Q ([F⁻¹]_QQ)⁻¹ w_Q`` removing the weights ``prune`` (bool ``[P]``) jointly.

        With ``[F⁻¹]_QQ = I/λ − U_Q U_Qᵀ``, Woodbury gives ``([F⁻¹]_QQ)⁻¹ = λI + λ U_Q (I/λ − U_QᵀU_Q)⁻¹ U_Qᵀ``:
        cost ``O(|Q|·m + m³)``."""
        w = w.double()
        UQ, wQ = self.U[prune], w[prune]
        inner = torch.eye(self.m, dtype=torch.float64, device=w.device) / self.lam - UQ.T @ UQ
        z = self.lam * wQ + self.lam * UQ @ torch.linalg.solve(inner, UQ.T @ wQ)
        spread = torch.zeros_like(w)
        spread[prune] = z
        return -self.matvec(spread)
