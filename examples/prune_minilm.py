"""One-shot pruning of all-MiniLM-L6-v2's 36 linear layers: magnitude vs OBD vs WoodFisher vs layer-wise OBS.

Text that installs offline: docstring pairs of the Python standard library (the first
paragraph of a function's or class's docstring vs its second paragraph, parsed with ``ast``
from the ``*.py`` files of the stdlib directory; de-duplicated, summaries of 4+ words, bodies
of 8+ words, no doctest bodies). A fixed shuffle sets aside ``--eval-pairs`` pairs for
evaluation; each seed draws ``--calibration`` pairs for the curvature/calibration (and
``--candidates`` distractors) from the rest, so seeds vary the calibration sample only.

Metrics on the held-out pairs, with the pruned weights, no fine-tuning:

* retrieval top-1 accuracy: the right body is the most similar of all held-out bodies to a
  summary, and vice versa (mean of both directions; chance is 1/eval-pairs);
* cosine similarity of each pruned embedding to the dense one, averaged over all held-out texts.

Per-sample objective for OBD and WoodFisher (the MiniLM example's in-batch loss has zero
per-sample gradients; layer-wise OBS uses only the calibration texts' layer inputs): pair ``i``
of the calibration sample is scored against a fixed candidate set, the dense
embeddings ``ê`` of the calibration partners and the distractors,
``ℓ_i = ½ [CE(cos(e(s_i), ê(B))/τ, i) + CE(cos(e(b_i), ê(S))/τ, i)]``, τ = 0.05 (the multiple
negatives ranking loss of sentence-transformers with the candidate tower held fixed).
Magnitude pruning uses no data, so it is run once (its spread over seeds is zero). OBD uses
the exact empirical Fisher diagonal of the ``m = --calibration`` per-sample gradients
(``--xdiag N`` adds OBD with the GGN diagonal by XDiag with ``N`` products); WoodFisher a
block-diagonal Fisher (``--block``, same ``m``). Prints a markdown table and the CPU time.

    python examples/prune_minilm.py [--seeds 0 1 2] [--calibration 32] [--xdiag 8] [--only XDiag] [--threads 1]
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesse.apply import PruneResult, prune_layerwise_obs, prune_magnitude, prune_obd, prune_woodfisher
from hesse.examples.minilm import MAX_TOKENS, TEMPERATURE, load_minilm, mean_pooled_embedding
from hesse.operators import Objective

TARGETS = {"50%": dict(sparsity=0.5), "70%": dict(sparsity=0.7), "90%": dict(sparsity=0.9), "2:4": dict(nm=(2, 4))}
PARAMS = ["encoder.layer.*"]  # with the default targets: the 36 nn.Linear weights of the encoder
Pair = tuple[str, str]


def docstring_pairs() -> list[Pair]:
    """``(summary, body)``: first and second paragraph of stdlib docstrings, in file order."""
    pairs, seen = [], set()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                               ast.ClassDef)) else None
            paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc or "") if p.strip()]
            if len(paragraphs) < 2:
                continue
            summary, body = paragraphs[:2]
            if len(summary.split()) < 4 or len(body.split()) < 8 or ">>>" in body or {summary, body} & seen:
                continue
            seen.update((summary, body))
            pairs.append((summary, body))
    return pairs


def split(pairs: list[Pair], eval_pairs: int) -> tuple[list[Pair], list[Pair]]:
    """``(held-out, pool)`` by a fixed shuffle (seed 1234), independent of the run's seeds."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1234)).tolist()
    return [pairs[i] for i in order[:eval_pairs]], [pairs[i] for i in order[eval_pairs:]]


def tokenize(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """The MiniLM example's tokenisation (padded, at most ``MAX_TOKENS`` tokens)."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))


def embed(model: nn.Module, tokenizer: Any, texts: list[str], chunk: int = 64) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings ``[len(texts), 384]``."""
    with torch.no_grad():
        return torch.cat([mean_pooled_embedding(model, tokenize(tokenizer, texts[i:i + chunk]))
                          for i in range(0, len(texts), chunk)])


def scores(embeddings: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """``(top-1 accuracy, mean cosine to dense)``; rows: the held-out summaries, then their bodies."""
    count = embeddings.shape[0] // 2
    sims = embeddings[:count] @ embeddings[count:].T
    right = torch.arange(count)
    top1 = 0.5 * float((sims.argmax(1) == right).double().mean() + (sims.argmax(0) == right).double().mean())
    return top1, float((embeddings * dense).sum(1).mean())


def calibration(model: nn.Module, tokenizer: Any, pool: list[Pair], seed: int, count: int, candidates: int,
                pairs_per_batch: int = 8) -> Objective:
    """The per-sample contrastive objective on ``count`` pairs drawn from ``pool`` by ``seed``, against
    fixed dense embeddings of their partners and ``candidates`` further distractors (module docstring)."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [pool[i] for i in order[:count]]
    fixed = [pool[i] for i in order[:count + candidates]]
    summaries, bodies = (embed(model, tokenizer, [p[k] for p in fixed]) for k in (0, 1))

    def forward(m: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = {k: v.reshape(-1, v.shape[-1]) for k, v in batch["tokens"].items()}
        e = mean_pooled_embedding(m, tokens).view(-1, 2, summaries.shape[1])
        return torch.cat([e[:, 0] @ bodies.T, e[:, 1] @ summaries.T]) / TEMPERATURE, batch["index"].repeat(2)

    batches = []
    for start in range(0, count, pairs_per_batch):
        chunk = chosen[start:start + pairs_per_batch]
        encoded = tokenize(tokenizer, [text for pair in chunk for text in pair])  # s_0, b_0, s_1, b_1, ...
        batches.append({"tokens": {k: v.view(len(chunk), 2, -1) for k, v in encoded.items()},
                        "index": torch.arange(start, start + len(chunk))})
    return Objective(model, nn.CrossEntropyLoss(), batches, forward=forward, params=PARAMS)


def methods(args: argparse.Namespace, seed: int) -> dict[str, Callable[..., PruneResult]]:
    """The methods and their (small) settings; labels name the settings. Per-sample gradients are
    taken in a loop (``vectorize=False``): transformers' attention-mask code cannot be ``vmap``-ed."""
    m = args.calibration
    chosen = {
        "magnitude": lambda obj, **t: prune_magnitude(obj, **t),
        f"OBD (empirical Fisher diagonal, m={m})": lambda obj, **t: prune_obd(
            obj, curvature="empirical-fisher", fisher_samples=m, vectorize=False, **t),
        f"OBD (GGN diagonal, XDiag {args.xdiag} products)": lambda obj, **t: prune_obd(
            obj, method="xdiag", budget=args.xdiag, seed=seed, **t),
        f"WoodFisher (B={args.block}, m={m})": lambda obj, **t: prune_woodfisher(
            obj, block_size=args.block, fisher_samples=m, vectorize=False, **t),
        "layer-wise OBS (SparseGPT)": lambda obj, **t: prune_layerwise_obs(obj, progress=False, **t),
    }
    chosen = {k: v for k, v in chosen.items() if args.xdiag or "XDiag" not in k}
    return {k: v for k, v in chosen.items() if not args.only or any(word in k for word in args.only)}


def one_seed(setup: dict, args: argparse.Namespace, seed: int, done: dict) -> dict[tuple[str, str], tuple[float, float]]:
    """``{(method, target): (top-1, cosine)}`` for one calibration draw; magnitude once (``done``)."""
    model, tokenizer = setup["model"], setup["tokenizer"]
    objective = calibration(model, tokenizer, setup["pool"], seed, args.calibration, args.candidates)
    dense_values = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    for method, run in methods(args, seed).items():
        for target, spec in TARGETS.items():
            if method == "magnitude" and (method, target) in done:
                out[(method, target)] = done[(method, target)]
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            result = run(objective, **spec)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            with torch.no_grad():
                for name, value in result.pruned_values(model).items():
                    model.get_parameter(name).copy_(value)
                out[(method, target)] = scores(embed(model, tokenizer, setup["texts"]), setup["dense"])
                for name, value in dense_values.items():
                    model.get_parameter(name).copy_(value)
            print(f"  seed {seed} {method:<42} {target:>4}: sparsity {result.sparsity:.3f}, top-1 "
                  f"{out[(method, target)][0]:.3f}, cos {out[(method, target)][1]:.3f} "
                  f"(prune {wall:.1f} s wall, {cpu:.1f} s CPU)", flush=True)
    done.update({k: v for k, v in out.items() if k[0] == "magnitude"})
    return out


def zeroed_linear_layers(model: nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Embeddings with all 36 linear weights zero (biases, LayerNorms, token embeddings kept): the
    floor below which a pruned encoder is no better than its residual bag of word embeddings."""
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")
               and isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Linear) and n.startswith("encoder.")}
    with torch.no_grad():
        for name in weights:
            model.get_parameter(name).zero_()
        out = embed(model, tokenizer, texts)
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
    return out


def table(runs: list[dict], dense_top1: float, floor: tuple[float, float], labels: list[str], eval_pairs: int) -> str:
    """Markdown: one row per method, one column per target, ``top-1 % mean ± std (mean cosine)``."""
    def cell(values: list[tuple[float, float]]) -> str:
        top1 = [100 * v[0] for v in values]
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        return f"{statistics.mean(top1):.1f} ± {sd:.1f} ({statistics.mean(v[1] for v in values):.3f})"

    lines = [f"**MiniLM-L6 (36 linear layers)**: retrieval top-1 % among {eval_pairs} held-out docstring pairs, "
             f"mean ± std over {len(runs)} seeds (mean cosine to the dense embeddings)", "",
             "| method | " + " | ".join(TARGETS) + " |", "|---|" + "---|" * len(TARGETS),
             f"| dense | {100 * dense_top1:.1f} (1.000) |" + " |" * (len(TARGETS) - 1),
             f"| all 36 linear weights zero | {100 * floor[0]:.1f} ({floor[1]:.3f}) |" + " |" * (len(TARGETS) - 1)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell([r[(label, t)] for r in runs]) for t in TARGETS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-pairs", type=int, default=256, help="held-out pairs (retrieval among these)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration pairs per seed (= m of OBD/WoodFisher)")
    parser.add_argument("--candidates", type=int, default=96, help="fixed distractors in the per-sample loss")
    parser.add_argument("--xdiag", type=int, default=0, help="also OBD with the GGN diagonal by XDiag with this many products")
    parser.add_argument("--block", type=int, default=16, help="WoodFisher block size B")
    parser.add_argument("--only", nargs="+", help="run only the methods whose label contains one of these words")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load_minilm()
    held_out, pool = split(docstring_pairs(), args.eval_pairs)
    texts = [p[0] for p in held_out] + [p[1] for p in held_out]
    dense = embed(model, tokenizer, texts)
    setup = {"model": model, "tokenizer": tokenizer, "pool": pool, "texts": texts, "dense": dense}
    floor = scores(zeroed_linear_layers(model, tokenizer, texts), dense)
    print(f"{len(held_out)} held-out pairs, {len(pool)} in the calibration pool; dense top-1 "
          f"{scores(dense, dense)[0]:.3f}; all 36 linear weights zero: top-1 {floor[0]:.3f}, cos {floor[1]:.3f}",
          flush=True)
    done: dict = {}
    runs = [one_seed(setup, args, seed, done) for seed in args.seeds]
    print(table(runs, scores(dense, dense)[0], floor, list(methods(args, 0)), len(held_out)))
    print(f"\ntotal: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
