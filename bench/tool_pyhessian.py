"""PyHessian 0.1 adapter, used the way its README/examples do.

    from pyhessian import hessian
    h = hessian(model, criterion, dataloader=loader, cuda=False)
    top_eigenvalues, _ = h.eigenvalues(top_n=k, maxIter=100, tol=1e-3)
    trace = np.mean(h.trace(maxIter=100, tol=1e-3))
    eigs, weights = h.density(iter=100, n_v=n)

Matvecs are counted by wrapping the instance's ``dataloader_hv_product`` (one call =
one Hessian-vector product over the full data set = one pass; PyHessian has no batched
product, so passes = matvecs).
Known behaviour, reported in notes rather than fixed: ``hessian()`` calls
``model.eval()`` and never restores the mode; eigenvalues come from deflated power
iteration stopped at 1e-3 relative change of the Rayleigh quotient (not a residual
test); ``trace()`` stops when |mean - previous| / (previous + 1e-6) < tol, which is
always true once the running estimate is negative; ``density()`` calls
``torch.eig``, removed in torch 2.x, after its Lanczos loop.
"""

from __future__ import annotations

import numpy as np

NAME = "pyhessian"


def version() -> str:
    from importlib.metadata import version as v
    return v("pyhessian")


def run(task, quantity: str, cfg: dict, meter: dict) -> dict:
    from pyhessian import hessian

    was_training = task.model.training
    h = hessian(task.model, task.criterion, dataloader=task.loader, cuda=False)
    notes = []
    if was_training and not task.model.training:
        notes.append("left model in eval mode")
    inner = h.dataloader_hv_product

    def counted(v):
        meter["matvecs"] += 1
        meter["passes"] += 1  # one product = one pass over the data loader
        return inner(v)

    h.dataloader_hv_product = counted
    out: dict = {"notes": notes}
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else cfg["k"]
        vals, _ = h.eigenvalues(top_n=k, maxIter=cfg["power_iters"], tol=cfg["eig_tol"])
        out["values"] = [float(x) for x in vals]
        notes.append(f"power iteration, stop at {cfg['eig_tol']:g} rel. change, maxIter={cfg['power_iters']}")
    elif quantity == "trace":
        samples = h.trace(maxIter=cfg["trace_budget"], tol=cfg["trace_tol"])
        out["estimate"] = float(np.mean(samples))
        n = len(samples)
        out["stderr"] = float(np.std(samples, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        notes.append(f"Hutchinson stopped after {n} samples (tol={cfg['trace_tol']:g})")
    elif quantity == "density":
        eigs, weights = h.density(iter=cfg["density_steps"], n_v=cfg["density_probes"])
        out["nodes"] = [[float(x) for x in e] for e in eigs]
        out["weights"] = [[float(x) for x in w] for w in weights]
    else:
        raise ValueError(quantity)
    return out
