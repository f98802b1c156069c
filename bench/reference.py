"""Exact reference values for the benchmark tasks, computed independently of hesse.

Usage: ``bench/.venv/bin/python bench/reference.py [--tasks mlp,cnn] [--force]``

Writes ``bench/reference_<task>.json``. Everything is computed in float64 on the same
trained weights that ``compare.py`` uses (``tasks.make_task``), for the full-data loss
= sample-weighted mean over all 1797 samples.

mlp (3,466 parameters)
    Dense Hessian of the full-data loss via ``torch.func.hessian`` over the flattened
    parameters; all eigenvalues by ``torch.linalg.eigvalsh`` (stored: the exact spectrum
    is the density reference); exact trace. Also stored: the top eigenvalues of the
    *unweighted mean of per-batch Hessians* (what a library that averages batch
    Hessians with equal weights computes, biased because the last batch has 5 samples),
    and a check of BackPACK's ``DiagHessian`` against the dense diagonal.

cnn (151,306 parameters)
    Top eigenvalues: SciPy ``eigsh`` (ARPACK, which='LA', tol=1e-10) on an independent
    float64 double-backward Hessian-vector product summed over batches with weights
    n_b/N ("reference Lanczos (tol 1e-10)"), with the residual norms ||Hv - lambda v||.
    Trace: sum of the exact Hessian diagonal from BackPACK ``DiagHessian`` (per batch,
    on the batch-mean loss, combined with weights n_b/N), spot-checked against
    ``e_i^T H e_i`` from the HVP for a few coordinates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tasks  # noqa: E402

TOPK = 5


def ref_path(name: str) -> str:
    return os.path.join(HERE, f"reference_{name}.json")


def load_reference(name: str) -> dict | None:
    p = ref_path(name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("scipy", "backpack", "sklearn"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "unknown")
        except Exception as e:  # pragma: no cover
            out[mod] = f"unavailable ({e})"
    try:
        from importlib.metadata import version
        out["backpack-for-pytorch"] = version("backpack-for-pytorch")
    except Exception:
        pass
    return out


# ---------------------------------------------------------------- helpers

def flat_loss_fn(task, batches):
    """f(theta_flat) = sum_b (n_b/N) * mean-CE of batch b, via functional_call."""
    names = [n for n, _ in task.model.named_parameters()]
    shapes = [p.shape for _, p in task.model.named_parameters()]
    sizes = [p.numel() for _, p in task.model.named_parameters()]

    def unflatten(theta):
        out, i = {}, 0
        for n, s, k in zip(names, shapes, sizes):
            out[n] = theta[i:i + k].reshape(s)
            i += k
        return out

    N = sum(int(yb.shape[0]) for _, yb in batches)

    def f(theta):
        params = unflatten(theta)
        total = 0.0
        for xb, yb in batches:
            out = torch.func.functional_call(task.model, params, (xb,))
            total = total + task.criterion(out, yb) * (yb.shape[0] / N)
        return total

    return f


def flat_params(task) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])


def hvp_factory(task):
    """Independent float64 HVP of the sample-weighted full-data loss (double backward)."""
    params = task.params()
    N = task.n
    count = {"n": 0}

    t_start = time.perf_counter()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        count["n"] += 1
        if count["n"] % 25 == 0:
            print(f"  reference HVP {count['n']} ({time.perf_counter() - t_start:.0f} s)",
                  file=sys.stderr, flush=True)
        vs, i = [], 0
        for p in params:
            vs.append(v[i:i + p.numel()].reshape(p.shape))
            i += p.numel()
        out = torch.zeros_like(v)
        for xb, yb in task.batches:
            loss = task.criterion(task.model(xb), yb) * (yb.shape[0] / N)
            g = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(g, params, grad_outputs=vs)
            out += torch.cat([h.reshape(-1) for h in hv])
        return out

    return hvp, count


def backpack_diag_hessian(task) -> torch.Tensor:
    """Exact Hessian diagonal of the full-data loss from BackPACK DiagHessian."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model = extend(copy.deepcopy(task.model))  # keep BackPACK's hooks off task.model
    lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    diag = torch.zeros(task.num_params, dtype=torch.float64)
    for xb, yb in task.batches:
        model.zero_grad()
        loss = lossfunc(model(xb), yb)
        with backpack(DiagHessian()):
            loss.backward()
        d = torch.cat([p.diag_h.detach().reshape(-1) for p in model.parameters()])
        diag += d * (yb.shape[0] / task.n)
    model.zero_grad()
    return diag


# ---------------------------------------------------------------- tasks

def reference_mlp() -> dict:
    torch.set_default_dtype(torch.float64)
    task = tasks.make_task("mlp", dtype=torch.float64)
    theta = flat_params(task)
    t0 = time.perf_counter()
    H = torch.func.hessian(flat_loss_fn(task, task.batches))(theta)
    H = 0.5 * (H + H.T)
    t_dense = time.perf_counter() - t0
    evals = torch.linalg.eigvalsh(H)  # ascending
    # Check against a one-batch (all 1797 samples) dense Hessian: same loss.
    full = [(task.X, task.y)]
    H_full = torch.func.hessian(flat_loss_fn(task, full))(theta)
    consistency = float((H - H_full).abs().max() / H.abs().max())
    # Unweighted mean of per-batch Hessians (the equal-weight batch average).
    H_unw = torch.zeros_like(H)
    for xb, yb in task.batches:
        Hb = torch.func.hessian(flat_loss_fn(task, [(xb, yb)]))(theta)
        H_unw += Hb / len(task.batches)
    evals_unw = torch.linalg.eigvalsh(0.5 * (H_unw + H_unw.T))
    # BackPACK DiagHessian vs the dense diagonal.
    d_bp = backpack_diag_hessian(task)
    d_dense = torch.diagonal(H)
    bp_err = float((d_bp - d_dense).abs().max() / d_dense.abs().max())
    ev = evals.numpy()
    return {
        "task": "mlp",
        "num_params": task.num_params,
        "num_samples": task.n,
        "batch_sizes": [int(b[1].shape[0]) for b in task.batches],
        "seed": tasks.SEED,
        "train_steps": tasks.TRAIN_STEPS["mlp"],
        "loss": float(task.full_loss()),
        "method": "dense Hessian of the sample-weighted full-data loss, torch.func.hessian "
                  "over flattened params in float64; eigenvalues torch.linalg.eigvalsh",
        "dense_seconds": t_dense,
        "trace": float(torch.trace(H)),
        "top_eigenvalues": [float(x) for x in ev[::-1][:TOPK]],
        "bottom_eigenvalues": [float(x) for x in ev[:TOPK]],
        "lambda_max_abs": float(np.abs(ev).max()),
        "num_negative": int((ev < 0).sum()),
        "eigenvalues": [float(x) for x in ev],
        "unweighted_batch_mean": {
            "what": "eigenvalues of (1/8) sum_b H_b (equal weight per batch; the last batch has 5 samples)",
            "top_eigenvalues": [float(x) for x in evals_unw.numpy()[::-1][:TOPK]],
            "trace": float(torch.trace(H_unw)),
        },
        "checks": {
            "batched_vs_single_batch_dense_max_rel_diff": consistency,
            "backpack_diag_hessian_vs_dense_diag_max_rel_err": bp_err,
            "backpack_diag_trace": float(d_bp.sum()),
        },
        "versions": versions(),
    }


def reference_cnn(tol: float = 1e-10) -> dict:
    from scipy.sparse.linalg import LinearOperator, eigsh

    torch.set_default_dtype(torch.float64)
    task = tasks.make_task("cnn", dtype=torch.float64)
    P = task.num_params
    hvp, count = hvp_factory(task)

    t0 = time.perf_counter()
    d_bp = backpack_diag_hessian(task)
    t_diag = time.perf_counter() - t0
    trace = float(d_bp.sum())

    # spot-check the diagonal: e_i^T H e_i for a few coordinates, one per layer
    rng = np.random.default_rng(0)
    offsets = np.cumsum([0] + [p.numel() for p in task.params()])
    idx = [int(rng.integers(offsets[k], offsets[k + 1])) for k in range(len(offsets) - 1)]
    spot = []
    for i in idx:
        e = torch.zeros(P)
        e[i] = 1.0
        hii = float(hvp(e)[i])
        spot.append({"index": i, "hvp": hii, "backpack": float(d_bp[i])})
    spot_err = max(abs(s["hvp"] - s["backpack"]) / max(abs(s["hvp"]), 1e-30) for s in spot)
    n_spot = count["n"]

    op = LinearOperator((P, P), matvec=lambda x: hvp(torch.from_numpy(np.asarray(x).reshape(-1))).numpy(),
                        dtype=np.float64)
    v0 = np.random.default_rng(tasks.SEED).standard_normal(P)
    t0 = time.perf_counter()
    vals, vecs = eigsh(op, k=TOPK, which="LA", tol=tol, ncv=30, v0=v0)
    t_eig = time.perf_counter() - t0
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    resid = []
    for j in range(TOPK):
        v = torch.from_numpy(vecs[:, j].copy())
        resid.append(float(torch.linalg.vector_norm(hvp(v) - vals[j] * v)))
    # largest-magnitude negative end, to know whether "largest" == "largest magnitude"
    vals_sa = eigsh(op, k=1, which="SA", tol=1e-6, ncv=30, v0=v0)[0]
    return {
        "task": "cnn",
        "num_params": P,
        "num_samples": task.n,
        "batch_sizes": [int(b[1].shape[0]) for b in task.batches],
        "seed": tasks.SEED,
        "train_steps": tasks.TRAIN_STEPS["cnn"],
        "loss": float(task.full_loss()),
        "method": {
            "top_eigenvalues": f"reference Lanczos (tol {tol:g}): scipy eigsh(which='LA', k={TOPK}, "
                               f"ncv=30, tol={tol:g}) on an independent float64 double-backward HVP, "
                               "batches weighted n_b/N",
            "trace": "sum of the exact Hessian diagonal from BackPACK DiagHessian (float64), "
                     "per batch on the batch-mean loss, combined with weights n_b/N",
        },
        "trace": trace,
        "top_eigenvalues": [float(x) for x in vals],
        "residual_norms": resid,
        "smallest_eigenvalue_approx": float(vals_sa[0]),
        "eigsh_matvecs": count["n"] - n_spot,
        "eigsh_seconds": t_eig,
        "diag_seconds": t_diag,
        "checks": {
            "diag_spot_check": spot,
            "diag_spot_check_max_rel_err": spot_err,
        },
        "versions": versions(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="mlp,cnn")
    ap.add_argument("--force", action="store_true", help="recompute even if the json exists")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in args.tasks.split(","):
        if load_reference(name) is not None and not args.force:
            print(f"{name}: {ref_path(name)} exists (use --force to recompute)")
            continue
        t0 = time.perf_counter()
        ref = {"mlp": reference_mlp, "cnn": reference_cnn}[name]()
        ref["seconds_total"] = time.perf_counter() - t0
        ref["weights_sha256"] = tasks.weights_sha256(name)
        with open(ref_path(name), "w") as f:
            json.dump(ref, f, indent=1)
        short = {k: v for k, v in ref.items() if k != "eigenvalues"}
        print(json.dumps(short, indent=1))


if __name__ == "__main__":
    main()
