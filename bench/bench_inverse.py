"""Damped inverse products ``(GGN + λI)^{-1} v`` on the digits MLP: CG, LiSSA, K-FAC, EK-FAC.

Task ``mlp`` of ``bench/tasks.py`` (P = 3,466, 1797 samples in uneven batches), float64.
The reference ``x`` solves the dense GGN (``Σ_b w_b J_bᵀ H_b J_b`` from per-batch Jacobians)
with ``torch.linalg.solve``; each route is scored by ``‖x̂ - x‖ / ‖x‖`` for ``λ = 1e-3 tr/P``
and ``1e-1 tr/P``, with its products of the GGN (single-vector; K-FAC needs none: one factor
pass instead) and wall time. CG and LiSSA multiply the dense GGN (so their time is the
solver's own); the table adds their time with matrix-free ``hesse.GGN`` products,
products x (measured seconds per product). Prints a markdown table.

    PYTHONPATH=. .venv/bin/python bench/bench_inverse.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hesse  # noqa: E402
from hesse.linalg import cg, lissa  # noqa: E402
from tasks import make_task  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def dense_ggn(task) -> torch.Tensor:
    """``Σ_b (n_b/N) J_bᵀ ∇²_f L_b J_b`` from per-batch Jacobians (exact, float64)."""
    params = {n: p.detach() for n, p in task.model.named_parameters()}
    total = None
    for X, y in task.batches:
        def out(p):
            return torch.func.functional_call(task.model, p, (X,))
        J = torch.func.jacrev(out)(params)
        J = torch.cat([j.reshape(X.shape[0] * 10, -1) for j in J.values()], 1)
        f = out(params).detach()
        H = torch.func.hessian(lambda o: task.criterion(o.view(f.shape), y))(f.reshape(-1))
        term = J.T @ H @ J * (len(y) / task.n)
        total = term if total is None else total + term
    return (total + total.T) / 2


def routes(G, task, lam: float, v: torch.Tensor):
    """``name -> (solution, products, seconds)`` for every route at damping ``lam``."""
    out = {}
    res, t = timed(lambda: cg(G, v, damping=lam, tol=1e-6, maxiter=300))
    out["CG (tol 1e-6)"] = (res.solution, res.matvecs, t)
    res, t = timed(lambda: lissa(G, v, damping=lam, depth=300))
    out["LiSSA (depth 300, s = 1.25 λ̂_max)"] = (res.solution, res.matvecs, t)
    for cls in (hesse.KFAC, hesse.EKFAC):
        op = cls(task.model, task.criterion, task.batches, kind="true")
        (x, _), t = timed(lambda: (op.inverse(lam) @ v, op.factors))
        out[f"{cls.__name__} (true, exact damping)"] = (x, 0, t)
        if cls is hesse.KFAC:
            res, t2 = timed(lambda: cg(G, v, damping=lam, tol=1e-6, maxiter=300, preconditioner=op.inverse(lam)))
            out["CG + K-FAC preconditioner"] = (res.solution, res.matvecs, t + t2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task("mlp", dtype=torch.float64)
    G = hesse.GGN(task.model, task.criterion, task.batches)
    P = G.shape[0]
    dense, t_dense = timed(lambda: dense_ggn(task))
    G @ torch.ones(P, dtype=torch.float64)  # warm-up (first-batch checks)
    _, per_product = timed(lambda: G @ torch.ones(P, dtype=torch.float64))
    tr = float(dense.trace())
    v = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    print(f"P = {P}, tr(GGN)/P = {tr / P:.3e}, dense GGN formed in {t_dense:.1f} s, one matrix-free GGN "
          f"product {per_product:.3f} s; threads = {args.threads}\n")
    print("| λ | route | rel. error ‖x̂−x‖/‖x‖ | GGN products | time (s) | time with hesse.GGN products (s) |")
    print("|---|---|---|---|---|---|")
    for factor in (1e-3, 1e-1):
        lam = factor * tr / P
        x = torch.linalg.solve(dense + lam * torch.eye(P, dtype=torch.float64), v)
        for name, (xhat, products, seconds) in routes(hesse.DenseOperator(dense), task, lam, v).items():
            err = float((xhat - x).norm() / x.norm())
            print(f"| {factor:g}·tr/P = {lam:.2e} | {name} | {err:.2e} | {products} | {seconds:.2f} | "
                  f"{seconds + products * per_product:.1f} |")


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", hesse.NotConvergedWarning)
    main()
