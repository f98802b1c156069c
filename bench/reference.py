"""Exact reference values for the benchmark tasks, computed independently of hesse.

Usage: ``bench/.venv/bin/python bench/reference.py [--tasks mlp,cnn,transformer] [--force]``

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

transformer (10,402 parameters; BackPACK does not support attention)
    Every product runs under ``sdpa_kernel(SDPBackend.MATH)``: the fused CPU attention
    kernel has no double backward. (``nn.TransformerEncoderLayer``'s eval-mode fast path,
    ``torch._transformer_encoder_layer_fwd``, is not taken: it is skipped whenever grad
    mode is on and a parameter requires grad, as in every product here; ``fast_path``
    in the json records the check.) Top eigenvalues: the same eigsh (tol 1e-10) on the
    same float64 double-backward HVP. Trace: the exact diagonal, ``e_i^T H e_i`` for all
    P coordinates, P products of e_i computed in chunks by one batched second backward
    (``is_grads_batched``) per batch; resumable (``--checkpoint``), cross-checked against
    a forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) product for a few
    coordinates.
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


def math_attention():
    """Context: scaled_dot_product_attention by its math kernel (second derivatives exist)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def hvp_factory(task, math_sdpa: bool = False):
    """Independent float64 HVP of the sample-weighted full-data loss (double backward)."""
    import contextlib
    params = task.params()
    N = task.n
    count = {"n": 0}
    ctx = math_attention if math_sdpa else contextlib.nullcontext

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
            with ctx():
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


def exact_diagonal(task, chunk: int = 32, checkpoint: str | None = None) -> tuple[torch.Tensor, dict]:
    """diag(H) of the full-data loss: e_i^T H e_i for every i, float64, batched second backward.

    For each chunk of C coordinates (within one parameter tensor p) and each batch: one
    forward, one graph-building backward for dL/dp, one backward of dL/dp to p batched
    over the C unit vectors (``is_grads_batched``), all
    under the math attention kernel; batches weighted n_b/N. Progress is saved to
    ``checkpoint`` (an .npz) after every chunk so an interrupted run resumes.
    """
    params = task.params()
    P, N = task.num_params, task.n
    sizes = [p.numel() for p in params]
    diag = torch.full((P,), float("nan"))
    start = 0
    if checkpoint and os.path.exists(checkpoint):
        z = np.load(checkpoint)
        if int(z["P"]) == P and str(z["sha"]) == str(tasks.weights_sha256(task.name)):
            diag = torch.from_numpy(z["diag"].copy())
            start = int(z["done"])
            print(f"  exact diagonal: resuming at {start}/{P} from {checkpoint}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done0 = start
    offsets = np.cumsum([0] + sizes)
    # chunks never cross a parameter tensor: the second backward then runs from that
    # tensor's gradient to that tensor only (autograd prunes the rest of the graph)
    spans = []
    for j, p in enumerate(params):
        for lo in range(int(offsets[j]), int(offsets[j + 1]), chunk):
            spans.append((j, lo, min(int(offsets[j + 1]), lo + chunk)))
    for j, lo, hi in spans:
        if hi <= start:
            continue
        lo = max(lo, start)
        p, C = params[j], hi - lo
        local = torch.arange(lo, hi) - int(offsets[j])
        E = torch.zeros(C, p.numel())
        E[torch.arange(C), local] = 1.0
        E = E.reshape(C, *p.shape)
        acc = torch.zeros(C)
        for xb, yb in task.batches:
            with math_attention():
                loss = task.criterion(task.model(xb), yb) * (yb.shape[0] / N)
                (g,) = torch.autograd.grad(loss, [p], create_graph=True)
                (hv,) = torch.autograd.grad([g], [p], grad_outputs=[E], is_grads_batched=True)
            acc += hv.reshape(C, -1)[torch.arange(C), local]
        diag[lo:hi] = acc
        if checkpoint:
            tmp = checkpoint + ".tmp.npz"
            np.savez(tmp, diag=diag.numpy(), done=hi, P=P, sha=str(tasks.weights_sha256(task.name)))
            os.replace(tmp, checkpoint)
        el = time.perf_counter() - t0
        rate = el / max(1, hi - done0)
        if len(spans) and (lo // chunk) % 10 == 0 or hi == P:
            print(f"  exact diagonal {hi}/{P} ({el:.0f} s, {rate * 1e3:.0f} ms/coordinate, "
                  f"~{rate * (P - hi) / 60:.1f} min left)", file=sys.stderr, flush=True)
    info = {"chunk": chunk, "seconds_this_run": time.perf_counter() - t0, "resumed_at": done0}
    return diag, info


def transformer_fast_path_check(task) -> dict:
    """Whether nn.TransformerEncoderLayer takes its fused eval-mode fast path in our products."""
    import torch.nn.functional as F
    hits = {"fast_path_calls": 0}
    orig = torch._transformer_encoder_layer_fwd

    def spy(*a, **k):
        hits["fast_path_calls"] += 1
        return orig(*a, **k)

    torch._transformer_encoder_layer_fwd = spy
    try:
        xb, yb = task.batches[0]
        with torch.no_grad():  # inference: the fast path may run here
            task.model(xb)
        no_grad_calls = hits["fast_path_calls"]
        hits["fast_path_calls"] = 0
        with math_attention():
            loss = task.criterion(task.model(xb), yb)
            torch.autograd.grad(loss, task.params(), create_graph=True)
        grad_calls = hits["fast_path_calls"]
    finally:
        torch._transformer_encoder_layer_fwd = orig
    del F
    return {"fast_path_calls_under_no_grad": no_grad_calls, "fast_path_calls_with_grad": grad_calls,
            "model_training": task.model.training}


def reference_transformer(tol: float = 1e-10, checkpoint: str | None = None, chunk: int = 32) -> dict:
    from scipy.sparse.linalg import LinearOperator, eigsh

    torch.set_default_dtype(torch.float64)
    task = tasks.make_task("transformer", dtype=torch.float64)
    assert not task.model.training
    P = task.num_params
    fast = transformer_fast_path_check(task)
    hvp, count = hvp_factory(task, math_sdpa=True)

    op = LinearOperator((P, P), matvec=lambda x: hvp(torch.from_numpy(np.asarray(x).reshape(-1))).numpy(),
                        dtype=np.float64)
    v0 = np.random.default_rng(tasks.SEED).standard_normal(P)
    t0 = time.perf_counter()
    vals, vecs = eigsh(op, k=TOPK, which="LA", tol=tol, ncv=30, v0=v0)
    t_eig = time.perf_counter() - t0
    n_eig = count["n"]
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    resid = []
    for j in range(TOPK):
        v = torch.from_numpy(vecs[:, j].copy())
        resid.append(float(torch.linalg.vector_norm(hvp(v) - vals[j] * v)))
    print(f"  transformer top-{TOPK}: {vals.tolist()} ({t_eig:.0f} s, {n_eig} HVPs); residuals {resid}",
          file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    diag, diag_info = exact_diagonal(task, chunk=chunk, checkpoint=checkpoint)
    t_diag = time.perf_counter() - t0
    trace = float(diag.sum())

    # cross-check a few diagonal entries (one per parameter tensor, at most 8) with an
    # independent forward-over-reverse product (torch.func), and with the plain HVP
    rng = np.random.default_rng(0)
    offsets = np.cumsum([0] + [p.numel() for p in task.params()])
    layers = rng.choice(len(offsets) - 1, size=min(8, len(offsets) - 1), replace=False)
    idx = [int(rng.integers(offsets[k], offsets[k + 1])) for k in sorted(layers)]
    names = [n for n, _ in task.model.named_parameters()]
    values = {n: p.detach() for n, p in task.model.named_parameters()}

    def fwd_rev(i: int) -> float:
        e = torch.zeros(P)
        e[i] = 1.0
        tang, j = {}, 0
        for n in names:
            k = values[n].numel()
            tang[n] = e[j:j + k].reshape(values[n].shape)
            j += k
        total = 0.0
        for xb, yb in task.batches:
            def loss(p, xb=xb, yb=yb):
                return task.criterion(torch.func.functional_call(task.model, p, (xb,)), yb) * (yb.shape[0] / task.n)
            with math_attention():
                hv = torch.func.jvp(torch.func.grad(loss), (values,), (tang,))[1]
            total += float(torch.cat([hv[n].reshape(-1) for n in names])[i])
        return total

    spot = [{"index": i, "forward_over_reverse": fwd_rev(i), "diag": float(diag[i])} for i in idx]
    spot_err = max(abs(s["forward_over_reverse"] - s["diag"]) / max(abs(s["forward_over_reverse"]), 1e-30)
                   for s in spot)
    return {
        "task": "transformer",
        "num_params": P,
        "num_samples": task.n,
        "batch_sizes": [int(b[1].shape[0]) for b in task.batches],
        "seed": tasks.SEED,
        "train_steps": tasks.TRAIN_STEPS["transformer"],
        "model_mode": "eval",
        "loss": float(task.full_loss()),
        "method": {
            "top_eigenvalues": f"reference Lanczos (tol {tol:g}): scipy eigsh(which='LA', k={TOPK}, "
                               f"ncv=30, tol={tol:g}) on an independent float64 double-backward HVP under "
                               "sdpa_kernel(SDPBackend.MATH), batches weighted n_b/N",
            "trace": f"sum of the exact Hessian diagonal: e_i^T H e_i for all {P} coordinates, float64, "
                     f"chunks of {chunk} unit vectors by a batched second backward (is_grads_batched) under "
                     "the math attention kernel, batches weighted n_b/N",
        },
        "trace": trace,
        "top_eigenvalues": [float(x) for x in vals],
        "residual_norms": resid,
        "eigsh_matvecs": n_eig,
        "eigsh_seconds": t_eig,
        "diag_seconds": t_diag,
        "diag_info": diag_info,
        "diag_min": float(diag.min()),
        "diag_num_negative": int((diag < 0).sum()),
        "fast_path": fast,
        "checks": {
            "diag_spot_check": spot,
            "diag_spot_check_max_rel_err": spot_err,
        },
        "versions": versions(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="mlp,cnn,transformer")
    ap.add_argument("--force", action="store_true", help="recompute even if the json exists")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--checkpoint", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                         "hesse_reference_transformer_diag.npz"),
                    help="transformer: resumable progress file of the exact diagonal ('' = none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    for name in args.tasks.split(","):
        if load_reference(name) is not None and not args.force:
            print(f"{name}: {ref_path(name)} exists (use --force to recompute)")
            continue
        t0 = time.perf_counter()
        if name == "transformer":
            ref = reference_transformer(checkpoint=args.checkpoint or None)
        else:
            ref = {"mlp": reference_mlp, "cnn": reference_cnn}[name]()
        ref["seconds_total"] = time.perf_counter() - t0
        ref["weights_sha256"] = tasks.weights_sha256(name)
        with open(ref_path(name), "w") as f:
            json.dump(ref, f, indent=1)
        short = {k: v for k, v in ref.items() if k != "eigenvalues"}
        print(json.dumps(short, indent=1))


if __name__ == "__main__":
    main()
