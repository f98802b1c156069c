"""hesse adapter (the lead finalises this once the public API lands).

    op = hesse.Hessian(model, criterion, loader)
    r = hesse.eigenvalues(op, k=5, which="largest")      # .values .vectors .matvecs .converged
    t = hesse.trace(op, method="hutch++", budget=99)     # .estimate .stderr .matvecs
    d = hesse.density(op, num_probes=n, lanczos_steps=100)  # .grid .density .ritz_values .weights

Matvecs are counted independently of hesse's own ``.matvecs`` by wrapping the
operator's ``_matmat`` and adding the number of columns of every product (a product
``op @ V`` with K columns is one data pass computing K Hessian-vector products); if
hesse's reported count differs, the note says so. Passes: one ``_matmat`` call = one
pass (checked against the operator's own ``op.passes`` where hesse has it).
If ``import hesse`` fails or a function is missing, ``run`` raises ``NotAvailable``
and the table says "not available yet".
"""

from __future__ import annotations

import inspect

NAME = "hesse"


class NotAvailable(RuntimeError):
    pass


def version() -> str:
    try:
        import hesse
        return getattr(hesse, "__version__", "dev")
    except Exception as e:  # pragma: no cover
        return f"unavailable ({type(e).__name__})"


# where each function may live while the top-level API is being assembled
_LOCATIONS = {
    "Hessian": ("hesse", "hesse.operators"),
    "eigenvalues": ("hesse", "hesse.linalg"),
    "trace": ("hesse", "hesse.linalg"),
    "density": ("hesse", "hesse.linalg", "hesse.analysis"),
}


class _API:
    pass


def _api():
    import importlib
    try:
        import hesse  # noqa: F401
    except Exception as e:
        raise NotAvailable(f"not available yet: import hesse failed ({type(e).__name__}: {e})")
    api, missing = _API(), []
    for name, mods in _LOCATIONS.items():
        for m in mods:
            try:
                fn = getattr(importlib.import_module(m), name, None)
            except Exception:
                fn = None
            if fn is not None:
                setattr(api, name, fn)
                break
        else:
            missing.append(name)
    if missing:
        raise NotAvailable(f"not available yet: hesse has no {', '.join(missing)}")
    return api


def _kwargs(fn, wanted: dict, required: tuple = ()) -> dict:
    """Pass only the keyword arguments ``fn`` accepts (the API is still settling).

    ``required`` names the settings every tool gets on equal terms (eigen tolerance,
    trace budget, Lanczos steps, probes): if ``fn`` no longer accepts one, fail loudly
    rather than silently fall back to hesse's own (changing) default.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return wanted
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return wanted
    lost = [k for k in required if k not in params]
    if lost:
        raise TypeError(f"{getattr(fn, '__name__', fn)} no longer accepts {lost}: the benchmark passes "
                        "these explicitly so every tool runs with the same settings; update tool_hesse.py")
    return {k: v for k, v in wanted.items() if k in params}


def run(task, quantity: str, cfg: dict, meter: dict) -> dict:
    hesse = _api()
    op = hesse.Hessian(task.model, task.criterion, task.loader)
    inner = op._matmat
    widths: set[int] = set()

    def counted(V):
        widths.add(int(V.shape[1]) if V.ndim == 2 else 1)
        meter["matvecs"] += int(V.shape[1]) if V.ndim == 2 else 1
        meter["passes"] += 1  # one _matmat call = one pass over the data, K columns at once
        return inner(V)

    op._matmat = counted
    out: dict = {"notes": []}
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else cfg["k"]
        kw = _kwargs(hesse.eigenvalues, {"k": k, "which": "largest", "tol": cfg["eig_tol"],
                                         "seed": cfg["seed"], "progress": False}, required=("k", "tol"))
        res = hesse.eigenvalues(op, **kw)
        out["values"] = sorted((float(x) for x in res.values), reverse=True)
        conv = getattr(res, "converged", None)
        if conv is not None:
            try:
                ok = bool(conv) if not hasattr(conv, "__len__") else all(bool(c) for c in conv)
            except Exception:
                ok = None
            out["converged"] = ok
        out["reported_matvecs"] = getattr(res, "matvecs", None)
    elif quantity == "trace":
        kw = _kwargs(hesse.trace, {"method": "hutch++", "budget": cfg["trace_budget"], "seed": cfg["seed"],
                                   "rtol": None, "progress": False}, required=("method", "budget"))
        res = hesse.trace(op, **kw)
        out["estimate"] = float(res.estimate)
        out["stderr"] = float(getattr(res, "stderr", float("nan")))
        out["reported_matvecs"] = getattr(res, "matvecs", None)
        out["notes"].append(f"hutch++ budget={cfg['trace_budget']}")
    elif quantity == "density":
        kw = _kwargs(hesse.density, {"num_probes": cfg["density_probes"],
                                     "lanczos_steps": cfg["density_steps"], "seed": cfg["seed"],
                                     "progress": False}, required=("num_probes", "lanczos_steps"))
        res = hesse.density(op, **kw)
        rv = getattr(res, "ritz_values", None)
        w = getattr(res, "weights", None)
        if rv is not None and w is not None:
            import torch
            rv, w = torch.as_tensor(rv), torch.as_tensor(w)
            if rv.ndim == 1:
                rv, w = rv[None], w[None]
            out["nodes"] = [[float(x) for x, y in zip(r, q) if x == x] for r, q in zip(rv, w)]
            out["weights"] = [[float(y) for x, y in zip(r, q) if x == x] for r, q in zip(rv, w)]
        out["grid"] = [float(x) for x in res.grid]
        out["density"] = [float(x) for x in res.density]
        out["reported_matvecs"] = getattr(res, "matvecs", None)
    else:
        raise ValueError(quantity)
    rep = out.get("reported_matvecs")
    if rep is not None and int(rep) != meter["matvecs"]:
        out["notes"].append(f"hesse reports {int(rep)} matvecs, counted {meter['matvecs']}")
    rep_passes = getattr(res, "passes", None)
    if rep_passes is not None and int(rep_passes) != meter["passes"]:
        out["notes"].append(f"hesse reports {int(rep_passes)} passes, counted {meter['passes']}")
    if getattr(op, "method", None) == "auto" and hasattr(op, "method_for") and widths:
        timed = getattr(op, "calibration", {})
        out["notes"].append("auto: " + ", ".join(
            f"K={k}->{op.method_for(k)}{'' if k in timed or k == 1 else ' (not timed)'}" for k in sorted(widths)))
    return out
