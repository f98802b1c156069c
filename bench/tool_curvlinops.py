"""curvlinops 3.0.1 adapter, used the way its documentation examples do.

    from curvlinops import HessianLinearOperator, hutchpp_trace, lanczos_approximate_spectrum
    H = HessianLinearOperator(model, loss_func, params, data)   # data: list of (X, y) / DataLoader
    eigsh(H.to_scipy(), k=5, which="LA", tol=...)                 # SciPy ARPACK on the operator
    hutchpp_trace(H, num_matvecs=99)
    lanczos_approximate_spectrum(H, ncv=100, num_repeats=n)       # Papyan 2020 SLQ

Matvecs are counted by wrapping ``HessianLinearOperator._matmat`` (class level, this
process only) and adding the number of columns of each product: a product with K
columns is one pass over the data computing K Hessian-vector products (vmap), counted
as K matvecs and 1 pass. The
count includes the products done by the constructor's ``check_deterministic`` and by
``lanczos_approximate_spectrum``'s internal eigsh estimate of the spectral boundaries.
"""

from __future__ import annotations

import numpy as np

NAME = "curvlinops"


def version() -> str:
    from importlib.metadata import version as v
    return v("curvlinops-for-pytorch")


def run(task, quantity: str, cfg: dict, meter: dict) -> dict:
    import torch
    from scipy.sparse.linalg import eigsh
    import curvlinops
    from curvlinops import HessianLinearOperator, hutchpp_trace, lanczos_approximate_spectrum

    orig = HessianLinearOperator._matmat

    def counted(self, M):
        meter["matvecs"] += int(M[0].shape[-1])
        meter["passes"] += 1  # one _matmat call = one pass over the data, K columns at once
        return orig(self, M)

    HessianLinearOperator._matmat = counted
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    H = HessianLinearOperator(task.model, task.criterion, task.params(), task.loader)
    notes = [f"{meter['matvecs']} matvecs in constructor (check_deterministic)"] if meter["matvecs"] else []
    out: dict = {"notes": notes}
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else cfg["k"]
        v0 = np.random.default_rng(cfg["seed"]).standard_normal(H.shape[0])
        vals = eigsh(H.to_scipy(dtype=np.float64), k=k, which="LA", tol=cfg["eig_tol"], v0=v0,
                     return_eigenvectors=False)
        out["values"] = sorted((float(x) for x in vals), reverse=True)
        notes.append(f"scipy eigsh which='LA' tol={cfg['eig_tol']:g}")
    elif quantity == "trace":
        out["estimate"] = float(hutchpp_trace(H, num_matvecs=cfg["trace_budget"]))
        notes.append(f"hutchpp_trace num_matvecs={cfg['trace_budget']}")
    elif quantity == "density":
        grid, dens = lanczos_approximate_spectrum(H, ncv=cfg["density_steps"],
                                                  num_repeats=cfg["density_probes"])
        out["grid"] = [float(x) for x in grid]
        out["density"] = [float(x) for x in dens]
        notes.append("grid density only (no nodes/weights returned)")
    else:
        raise ValueError(quantity)
    return out
