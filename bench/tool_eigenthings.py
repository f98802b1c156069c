"""hessian-eigenthings 1.0.0a5 adapter, used the way its README shows.

    from hessian_eigenthings import HessianOperator, lanczos, trace, spectral_density, supervised_loss
    H = HessianOperator(model, loader, supervised_loss(criterion))
    eig = lanczos(H, k=5, seed=0)                  # README call; max_iter defaults to 2k
    t = trace(H, num_matvecs=99, seed=0)           # Hutch++
    d = spectral_density(H, num_runs=n, lanczos_steps=100, seed=0)

(The 0.x API -- ``compute_hessian_eigenthings`` -- was removed in 1.0.0a1.)
Matvecs are counted by wrapping the operator's ``matvec`` (one call = one full-data
Hessian-vector product = one pass over the loader; ``__call__``, ``__matmul__`` and
``rmatvec`` all go through ``matvec``; the library has no batched product, so passes =
matvecs).
Known behaviour, reported in notes rather than fixed: ``HessianOperator`` averages the
per-batch Hessians with equal weights (``total / n_batches``), so a smaller last batch
(5 of 1797 samples here) is over-weighted and the operator is a different matrix from
the full-data Hessian; ``lanczos`` runs only ``max_iter = 2k`` steps by default and
flags convergence with a residual test (reported).
"""

from __future__ import annotations

NAME = "eigenthings"


def version() -> str:
    from importlib.metadata import version as v
    return v("hessian-eigenthings")


def run(task, quantity: str, cfg: dict, meter: dict) -> dict:
    import hessian_eigenthings as he

    H = he.HessianOperator(task.model, task.loader, he.supervised_loss(task.criterion))
    inner = H.matvec

    def counted(v):
        meter["matvecs"] += 1
        meter["passes"] += 1  # full_dataset=True: one call = one pass over the loader
        return inner(v)

    H.matvec = counted
    sizes = {len(b[1]) for b in task.batches}
    notes = []
    if len(sizes) > 1:
        notes.append("operator = unweighted mean of batch Hessians (last batch over-weighted)")
    out: dict = {"notes": notes}
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else cfg["k"]
        kw = {} if cfg.get("eigenthings_max_iter") is None else {"max_iter": cfg["eigenthings_max_iter"]}
        res = he.lanczos(H, k=k, seed=cfg["seed"], **kw)
        vals = [float(x) for x in res.eigenvalues]
        out["values"] = vals
        conv = [bool(c) for c in res.converged]
        out["converged"] = all(conv)
        how = "default max_iter=2k" if not kw else f"max_iter={kw['max_iter']}"
        notes.append(f"lanczos {res.iterations} steps ({how}), which='LM'; "
                     f"converged {sum(conv)}/{len(conv)} (own residual test)")
    elif quantity == "trace":
        res = he.trace(H, num_matvecs=cfg["trace_budget"], seed=cfg["seed"])
        out["estimate"] = float(res.estimate)
        out["stderr"] = float(res.stderr)
        notes.append(f"hutch++ num_matvecs={cfg['trace_budget']}")
    elif quantity == "density":
        res = he.spectral_density(H, num_runs=cfg["density_probes"],
                                  lanczos_steps=cfg["density_steps"], seed=cfg["seed"])
        out["nodes"] = [[float(x) for x in row if x == x] for row in res.raw_eigenvalues]
        out["weights"] = [[float(w) for x, w in zip(r, ws) if x == x]
                          for r, ws in zip(res.raw_eigenvalues, res.raw_weights)]
        out["grid"] = [float(x) for x in res.grid]
        out["density"] = [float(x) for x in res.density]
    else:
        raise ValueError(quantity)
    return out
