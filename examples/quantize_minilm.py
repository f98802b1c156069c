"""Curvature-aware (HAWQ-V2) mixed precision on the 36 linear layers of all-MiniLM-L6-v2 (Q-BERT's setting),
measured by retrieval among many candidates on text that installs offline.

Text: the docstrings of the Python standard library (:data:`MODULES`): every documented
function, class or method whose docstring has at least two sentences gives a pair
``(first sentence, the rest)``, a query and the passage it summarises (about 1,000 pairs,
deduplicated; the exact set depends on the Python version, printed with the results).
:data:`EVAL_PAIRS` of them, drawn once with seed 0, are the evaluation set, the same for
every seed; each seed draws :data:`CALIBRATION_PAIRS` others for the curvature.

Curvature: the Gauss-Newton matrix (GGN) of the contrastive loss the model was trained with
(multiple negatives ranking loss, ``hesse.examples.minilm.contrastive_forward``: in-batch
negatives, temperature 0.05) on the seed's calibration pairs in one batch; traces of the 36
diagonal blocks to ``rtol`` 0.1 from sampled square roots of the GGN (one backward pass per
column for all 36 blocks, at most ``--probes`` per block, i.e. 36 times that in all), no top eigenvalues (HAWQ-V2's Ω
needs only traces). ``--curvature hessian``: the Hessian itself, by per-block Hutch++ (one
Hessian product per block and column: about 40 CPU minutes per seed, 6-11 GB of memory).

Metrics of a quantized model on the evaluation set (the float model's in the header): each
query retrieves among all :data:`EVAL_PAIRS` passages by cosine similarity: recall@1 and the
mean reciprocal rank of its own passage (higher is better; not saturated: about 0.5 and 0.6
in float), and the mean cosine similarity between the quantized and the float embeddings of
all queries and passages (fidelity, 1 = unchanged). Weights: 3, 4 or 8 bits symmetric per
output channel (activations float), at 25%, 50%, 75% of the way from all-3-bit to all-8-bit
size; ``--randoms`` random allocations per budget and seed, the claim compared with the
median of those at least as large as the curvature-aware one.

    python examples/quantize_minilm.py [--seeds 0 1 2] [--randoms 8] [--probes 100] [--curvature ggn]
    python examples/quantize_minilm.py --seeds 0 --save s0.json   # one process per seed, then:
    python examples/quantize_minilm.py --merge s0.json s1.json s2.json
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from hesse.apply.quantize import (
    QuantLayer, allocate_bits, find_layers, fraction_limit, quantized_weights, random_allocation, reversed_allocation,
    sensitivities,
)
from hesse.examples.minilm import contrastive_forward, load_minilm, pair_batches
from hesse.operators import Objective

BITS = (3, 4, 8)
FRACTIONS = (0.25, 0.5, 0.75)
LINEAR = "encoder.layer.*"
EVAL_PAIRS = 200
CALIBRATION_PAIRS = 16
QUERY_TOKENS, PASSAGE_TOKENS = 32, 48
MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "mailbox", "math", "mimetypes", "operator", "optparse", "os", "pathlib", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random", "re", "sched", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def docstring_pairs() -> list[tuple[str, str]]:
    """``(first sentence, rest)`` of every public documented object of :data:`MODULES` (and the
    methods of its classes) with a first sentence of 25-200 characters and a rest of at least
    60 (cut at 400), sorted, each first sentence and each rest used once."""
    pairs: dict[str, str] = {}
    for qualified, obj in _documented_objects():
        text = " ".join((inspect.getdoc(obj) or "").split())
        parts = SENTENCE_END.split(text, maxsplit=1)
        if len(parts) == 2 and 25 <= len(parts[0]) <= 200 and len(parts[1]) >= 60:
            pairs.setdefault(parts[0], parts[1][:400])
    unique = {rest: first for first, rest in sorted(pairs.items())}
    return sorted((first, rest) for rest, first in unique.items())


def _documented_objects() -> list[tuple[str, object]]:
    """``(name, object)`` of the public functions and classes defined in :data:`MODULES` and their methods."""
    found = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            found.append((f"{name}.{attr}", obj))
            if inspect.isclass(obj):
                found += [(f"{name}.{attr}.{k}", v) for k, v in sorted(vars(obj).items())
                          if not k.startswith("_") and callable(v)]
    return found


class Retrieval:
    """The evaluation set, tokenised once, and the float model's embeddings of it."""

    def __init__(self, model: nn.Module, tokenizer, pairs: list[tuple[str, str]]):
        self.model = model
        self.queries = self._tokenise(tokenizer, [p[0] for p in pairs], QUERY_TOKENS)
        self.passages = self._tokenise(tokenizer, [p[1] for p in pairs], PASSAGE_TOKENS)
        self.reference = self.embed({})

    @staticmethod
    def _tokenise(tokenizer, texts: list[str], max_length: int, chunk: int = 50) -> list[dict]:
        return [dict(tokenizer(texts[i:i + chunk], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")) for i in range(0, len(texts), chunk)]

    def embed(self, weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm mean-pooled embeddings of queries and passages with ``weights`` substituted."""
        with torch.no_grad():
            return tuple(torch.cat([self._pooled(weights, batch) for batch in batches])
                         for batches in (self.queries, self.passages))

    def _pooled(self, weights: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        states = functional_call(self.model, weights, args=(), kwargs=batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        return nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)

    def metrics(self, weights: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """``(recall@1, MRR, mean cosine to the float embeddings)`` with ``weights`` substituted."""
        queries, passages = self.embed(weights)
        similarity = queries @ passages.T
        rank = 1 + (similarity > similarity.diagonal()[:, None]).sum(1)
        fidelity = torch.cat([(queries * self.reference[0]).sum(1), (passages * self.reference[1]).sum(1)]).mean()
        return float((rank == 1).float().mean()), float((1.0 / rank).mean()), float(fidelity)


def split(pairs: list[tuple[str, str]], seed: int) -> tuple[list, list]:
    """``(evaluation, calibration)``: the evaluation pairs (seed 0, every seed) and the seed's calibration pairs."""
    order = np.random.default_rng(0).permutation(len(pairs))
    rest = order[EVAL_PAIRS:][np.random.default_rng(seed).permutation(len(pairs) - EVAL_PAIRS)]
    return [pairs[i] for i in order[:EVAL_PAIRS]], [pairs[i] for i in rest[:CALIBRATION_PAIRS]]


def one_seed(seed: int, randoms: int, probes: int, model: nn.Module, tokenizer, retrieval: Retrieval,
             curvature_kind: str = "hessian") -> dict:
    """``{fraction: {"hessian": (MiB, recall@1, MRR, fidelity), "reversed": ..., "random": [...], "bits": [...]}}``."""
    _, calibration = split(docstring_pairs(), seed)
    curvature = Objective(model, nn.CrossEntropyLoss(), pair_batches(tokenizer, calibration, CALIBRATION_PAIRS),
                          forward=contrastive_forward, params=[LINEAR])
    start, cpu = time.perf_counter(), time.process_time()
    sens = sensitivities(curvature, bits=BITS, layers=[LINEAR], curvature=curvature_kind, rtol=0.1,
                         trace_probes=probes, seed=seed, top_eigenvalues=False, hessian_method="double-backward",
                         trace_method="sampled" if curvature_kind == "ggn" else "hutch++")
    print(f"seed {seed}: calibration loss {curvature.loss():.4f}; traces {sens.result.matvecs} columns, "
          f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU\n{sens.result.table()}",
          flush=True)
    costs = sens.costs()

    def measured(bits: list[int]) -> tuple[float, ...]:
        size = float(sum(q.numel * b for q, b in zip(sens.layers, bits)) / 8 / 2 ** 20)
        return (size, *retrieval.metrics(quantized_weights(model, sens.layers, bits)))

    out = {}
    for fraction in FRACTIONS:
        limits = {"size": fraction_limit(costs["size"], fraction)}
        hessian = allocate_bits(sens.omega(), costs, limits, BITS, tie_break=sens.tie_break()).bits
        out[fraction] = {"hessian": measured(hessian), "bits": hessian, "weights": int(sens.numel.sum()),
                         "reversed": measured(reversed_allocation(sens, costs, limits).bits),
                         "random": [measured(random_allocation(sens, costs, limits, 1000 * seed + r).bits)
                                    for r in range(randoms)]}
        print(f"seed {seed} budget {fraction:.0%}: {out[fraction]}", flush=True)
    return out


def uniform(model: nn.Module, layers: list[QuantLayer], retrieval: Retrieval) -> str:
    """The float and uniform-bit metrics, one line."""
    recall, mrr, _ = retrieval.metrics({})
    rows = [f"float recall@1 {recall:.4f}, MRR {mrr:.4f}"]
    for b in BITS:
        recall, mrr, fidelity = retrieval.metrics(quantized_weights(model, layers, [b] * len(layers)))
        rows.append(f"all {b}-bit recall@1 {recall:.4f}, MRR {mrr:.4f}, fidelity {fidelity:.4f}")
    return "; ".join(rows)


def summary(runs: list[dict]) -> None:
    """Markdown: per budget, mean ± std over seeds of recall@1 / MRR / fidelity, and per seed
    whether the claim held (MRR and fidelity: higher is better)."""
    print("| size budget | HAWQ bits/weight | HAWQ R@1 / MRR / fidelity | median random (size ≥) | reversed | "
          "MRR ≥ median random | MRR > reversed | fidelity ≥ median random | fidelity > reversed |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for fraction in FRACTIONS:
        rows = [run[fraction] for run in runs]
        hess = [r["hessian"] for r in rows]
        rand = [_median([x for x in r["random"] if x[0] >= r["hessian"][0] - 1e-9]) for r in rows]
        rev = [r["reversed"] for r in rows]
        wins = [_wins(hess, other, c, loose) for c in (2, 3) for other, loose in ((rand, True), (rev, False))]
        print(f"| {fraction:.0%} | {np.mean([h[0] for h in hess]) * 8 * 2 ** 20 / rows[0]['weights']:.2f} | "
              f"{_ms(hess)} | {_ms(rand)} | {_ms(rev)} | {' | '.join(wins)} |")


def _wins(hess: list[tuple], other: list[tuple], column: int, loose: bool) -> str:
    """Seeds where the curvature-aware value is above (``loose``: at least) the other's, of those
    where the other exists (no random allocation as large: ``n/a``)."""
    pairs = [(h[column], o[column]) for h, o in zip(hess, other) if not np.isnan(o[column])]
    wins = sum(h > o or (loose and h == o) for h, o in pairs)
    return f"{wins}/{len(pairs)}" + (f" ({len(hess) - len(pairs)} n/a)" if len(pairs) < len(hess) else "")


def _median(rows: list[tuple[float, ...]]) -> tuple[float, ...]:
    if not rows:
        return (float("nan"),) * 4
    return (0.0, *(statistics.median(r[c] for r in rows) for c in (1, 2, 3)))


def _ms(rows: list[tuple[float, ...]]) -> str:
    columns = [np.array([r[c] for r in rows]) for c in (1, 2, 3)]
    return " / ".join(f"{np.nanmean(v):.4f} ± {np.nanstd(v):.4f}" if not np.isnan(v).all() else "n/a" for v in columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--randoms", type=int, default=8)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curvature", choices=("hessian", "ggn"), default="ggn")
    parser.add_argument("--save", type=Path, help="also write the runs as JSON (one process per seed, then --merge)")
    parser.add_argument("--merge", type=Path, nargs="+", help="only print the summary of runs saved with --save")
    args = parser.parse_args()
    if args.merge:
        summary([run for path in args.merge for run in _load(path)])
        return
    torch.set_num_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load_minilm()
    pairs = docstring_pairs()
    retrieval = Retrieval(model, tokenizer, split(pairs, 0)[0])
    layers = find_layers(model, only=[LINEAR])
    print(f"Python {sys.version.split()[0]}: {len(pairs)} docstring pairs, {EVAL_PAIRS} evaluated; "
          f"{uniform(model, layers, retrieval)}", flush=True)
    runs = [one_seed(seed, args.randoms, args.probes, model, tokenizer, retrieval, args.curvature)
            for seed in args.seeds]
    if args.save:
        args.save.write_text(json.dumps([{str(f): r for f, r in run.items()} for run in runs]))
    summary(runs)
    print(f"\n{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")


def _load(path: Path) -> list[dict]:
    """Runs saved with ``--save``, budgets back as floats and measurements as tuples."""
    return [{float(f): {k: [tuple(x) for x in v] if k == "random" else (tuple(v) if k in ("hessian", "reversed") else v)
                        for k, v in r.items()} for f, r in run.items()} for run in json.loads(path.read_text())]


if __name__ == "__main__":
    main()
