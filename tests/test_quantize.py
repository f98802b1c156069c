"""Hessian-aware mixed-precision quantization: the ILP against brute force, fake quantization,
sensitivities (HAWQ-V2 / Q-BERT) and the untouched user model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from hesse.apply.quantize import (
    allocate_bits, evaluate_bits, export_config, find_layers, fraction_limit, quantize_weight, quantized_copy,
    random_allocation, reversed_allocation, sensitivities,
)
from hesse.errors import HesseError
from hesse.operators import Hessian, Objective


def brute_force(S, costs, limits, bits, same_bits=(), fixed=None):
    best = None
    for choice in itertools.product(range(len(bits)), repeat=S.shape[0]):
        if any(len({choice[i] for i in g}) > 1 for g in same_bits):
            continue
        if any(bits[choice[i]] != b for i, b in (fixed or {}).items()):
            continue
        rows = np.arange(S.shape[0])
        if all(costs[k][rows, choice].sum() <= limits[k] for k in limits):
            value = S[rows, choice].sum()
            best = value if best is None or value < best else best
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocation_matches_brute_force_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    L, bits = 5, (2, 4, 8)
    S = np.sort(rng.exponential(size=(L, 3)), axis=1)[:, ::-1]  # fewer bits, more damage
    numel = rng.integers(10, 1000, size=(L, 1))
    costs = {"size": numel * np.array(bits), "bops": rng.integers(1, 50, size=(L, 1)) * np.array(bits) ** 2}
    limits = {"size": fraction_limit(costs["size"], rng.uniform(0.2, 0.8)),
              "bops": fraction_limit(costs["bops"], rng.uniform(0.3, 0.9))}
    same, fixed = [(0, 3)] if seed % 2 else [], {4: 8} if seed % 3 == 0 else None
    expected = brute_force(S, costs, limits, bits, same, fixed)
    if expected is None:
        with pytest.raises(HesseError):
            allocate_bits(S, costs, limits, bits, same, fixed)
        return
    result = allocate_bits(S, costs, limits, bits, same, fixed)
    assert result.objective == pytest.approx(expected)
    assert all(result.costs[k] <= limits[k] + 1e-9 for k in limits)
    assert not same or result.bits[0] == result.bits[3]
    assert fixed is None or result.bits[4] == 8


def test_hand_made_table_gives_the_published_style_answer():
    # 4 layers of 1M/4M/4M/1M weights, the middle ones large but flat, the ends sharp (a HAWQ-style
    # table): all 4-bit is 40 Mbit; with 48 Mbit the sharp small layers keep 8 bits, with 64 Mbit
    # the sharper of the big layers (Ω 2.0 vs 1.0 at 4 bits) gets 8 bits too.
    numel = np.array([[1e6], [4e6], [4e6], [1e6]])
    bits = (4, 8)
    omega = np.array([[10.0, 0.1], [1.0, 0.01], [2.0, 0.02], [8.0, 0.08]])
    costs = {"size": numel * np.array(bits)}
    result = allocate_bits(omega, costs, {"size": 48e6}, bits)
    assert result.bits == [8, 4, 4, 8] and result.costs["size"] == 48e6
    assert result.objective == pytest.approx(0.1 + 1 + 2 + 0.08)
    assert allocate_bits(omega, costs, {"size": 64e6}, bits).bits == [8, 4, 8, 8]
    assert allocate_bits(omega, costs, {"size": 80e6}, bits).bits == [8, 8, 8, 8]


def test_infeasible_limits_name_the_tightest_constraint():
    S = np.ones((2, 2))
    costs = {"size": np.array([[4.0, 8.0], [4.0, 8.0]]), "bops": np.array([[1.0, 4.0], [1.0, 4.0]])}
    with pytest.raises(HesseError, match="the size limit 7 is below the least size any allocation reaches, 8"):
        allocate_bits(S, costs, {"size": 7.0, "bops": 100.0})
    with pytest.raises(HesseError, match="least size .* 12"):
        allocate_bits(S, costs, {"size": 11.0}, fixed={0: 8})
    with pytest.raises(HesseError, match="contradict"):
        allocate_bits(S, costs, {"size": 100.0}, same_bits=[(0, 1)], fixed={0: 4, 1: 8})
    with pytest.raises(HesseError, match="shape"):
        allocate_bits(np.ones((2, 3)), costs, {"size": 10.0})
    with pytest.raises(HesseError, match="no cost array"):
        allocate_bits(S, costs, {"latency": 1.0})


def test_weight_quantization_is_symmetric_per_output_channel():
    w = torch.tensor([[1.0, -0.4, 0.26], [0.0, 0.0, 0.0], [-3.0, 1.0, 2.9]])
    q = quantize_weight(w, 3)  # levels -3..3, scale max|w|/3 per row
    assert torch.allclose(q[0], torch.tensor([1.0, -1 / 3, 1 / 3]))
    assert torch.equal(q[1], torch.zeros(3)) and torch.allclose(q[2], torch.tensor([-3.0, 1.0, 3.0]))
    assert torch.equal(quantize_weight(w, 16).abs().amax(1), w.abs().amax(1))
    with pytest.raises(HesseError, match="at least 2 bits"):
        quantize_weight(w, 1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def attention_problem():
    torch.manual_seed(0)
    model = Attention().double()
    x, y = torch.randint(0, 11, (16, 5)), torch.randint(0, 3, (16,))
    return model, [(x[:8], y[:8]), (x[8:], y[8:])]


def test_attention_projections_are_split_and_their_traces_match_the_exact_blocks():
    model, data = attention_problem()
    layers = find_layers(model)
    assert [q.name for q in layers] == ["embed", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"]
    sens = sensitivities(model, nn.CrossEntropyLoss(), data, bits=(2, 4), rtol=0.01, trace_probes=400)
    H = Hessian(model, nn.CrossEntropyLoss(), data, params=["attn.in_proj_weight"]) @ torch.eye(192, dtype=torch.float64)
    exact = [float(torch.diagonal(H)[i * 64:(i + 1) * 64].sum()) for i in range(3)]
    assert sens.trace[1:4] == pytest.approx(exact, rel=0.01)  # rtol=0.01 with ~95% confidence
    assert np.all(np.abs(sens.trace[1:4] - exact) <= 4 * sens.trace_stderr[1:4] + 1e-12)
    assert [q.macs for q in layers][1:] == [0.0] * 5 and sens.layers[1].macs == 5 * 64 and sens.layers[0].macs == 0
    assert sens.omega()[:, 0] == pytest.approx(np.maximum(sens.trace, 0) / sens.numel * sens.perturbation[:, 0])
    assert sens.omega("qbert")[:, 1] == pytest.approx(np.maximum(sens.top_eigenvalue, 0) * sens.perturbation[:, 1])


def test_negative_and_insignificant_traces_are_flagged_and_clamped():
    model, data = attention_problem()
    sens = sensitivities(model, nn.CrossEntropyLoss(), data, bits=(2, 4), trace_probes=400)
    sens.trace[0], sens.trace_stderr[0] = -1.0, 0.1
    sens.trace[5], sens.trace_stderr[5] = 0.1, 0.2
    rows = sens.rows()
    assert rows[0]["negative"] and rows[0]["omega"]["2"] == 0.0 and rows[0]["significant"]
    assert sens.tie_break()[0, 0] == sens.perturbation[0, 0] and not sens.tie_break()[1:].any()
    assert not rows[5]["negative"] and not rows[5]["significant"] and rows[5]["omega"]["2"] > 0


def test_budget_is_spent_on_layers_without_positive_curvature():
    """Ω = 0 for a negative-trace layer left it at the lowest bits with budget left over; the
    tie-break (a second integer program) gives it the bits nothing sensitive can use, and only those."""
    model, data = attention_problem()
    sens = sensitivities(model, nn.CrossEntropyLoss(), data, bits=(2, 4, 8), trace_probes=400)
    sens.trace[:] = np.abs(sens.trace) * 1e6  # large factors: a tiny weight would vanish in the solver's tolerance
    sens.trace[0] = -1.0
    costs = sens.costs()
    everything = {"size": costs["size"][:, -1].sum()}
    plain = allocate_bits(sens.omega(), costs, everything, sens.bits)
    tied = allocate_bits(sens.omega(), costs, everything, sens.bits, tie_break=sens.tie_break())
    assert tied.bits == [8] * len(sens.layers) and tied.objective == pytest.approx(plain.objective)
    tight = fraction_limit(costs["size"], 0.0) + costs["size"][0, -1] - costs["size"][0, 0]
    chosen = allocate_bits(sens.omega(), costs, {"size": tight}, sens.bits, tie_break=sens.tie_break())
    alone = allocate_bits(sens.omega(), costs, {"size": tight}, sens.bits)
    assert chosen.bits[0] == 2 and chosen.objective == pytest.approx(alone.objective)  # sensitive layers first
    with pytest.raises(HesseError, match="tie_break"):
        allocate_bits(sens.omega(), costs, everything, sens.bits, tie_break=np.zeros((2, 3)))


def test_evaluation_uses_a_copy_and_never_touches_the_model(tmp_path):
    model, data = attention_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objective = Objective(model, nn.CrossEntropyLoss(), data)
    sens = sensitivities(objective, bits=(2, 8), trace_probes=100)
    costs = sens.costs(act_bits=8)
    limits = {"size": fraction_limit(costs["size"], 0.5)}
    allocation = allocate_bits(sens.omega(), costs, limits, sens.bits)
    low = evaluate_bits(objective, sens.layers, [2] * 6, act_bits=4)
    high = evaluate_bits(objective, sens.layers, [8] * 6)
    assert low.loss != high.loss and abs(high.loss - objective.loss()) < 0.05
    copy = quantized_copy(objective, sens.layers, allocation.bits, act_bits=8)
    assert copy is not model and len(copy.attn._forward_pre_hooks) == 1 and not model.attn._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for other in (reversed_allocation(sens, costs, limits), random_allocation(sens, costs, limits, seed=1)):
        assert other.costs["size"] <= limits["size"]
    config = export_config(sens, allocation, tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text()) == config
    assert [r["bits"] for r in config["layers"]] == allocation.bits and config["layers"][1]["rows"] == [0, 8]


def test_traces_without_top_eigenvalues_match_per_layer_and_refuse_qbert():
    model, data = attention_problem()
    full = sensitivities(model, nn.CrossEntropyLoss(), data, bits=(2, 4), rtol=0.01, trace_probes=400)
    fast = sensitivities(model, nn.CrossEntropyLoss(), data, bits=(2, 4), rtol=0.01, trace_probes=400,
                         top_eigenvalues=False)
    assert fast.trace == pytest.approx(full.trace, rel=0.05) and np.isnan(fast.top_eigenvalue).all()
    assert fast.result.matvecs < full.result.matvecs and fast.omega() == pytest.approx(full.omega(), rel=0.1)
    rows = fast.rows()
    assert rows[0]["top_eigenvalue"] is None and rows[0]["omega_qbert"] is None and rows[0]["omega"]["2"] > 0
    with pytest.raises(HesseError, match="top_eigenvalues=True"):
        fast.omega("qbert")


def test_minilm_example_text_pairs_are_unique_and_the_splits_disjoint():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "quantize_minilm.py"
    spec = importlib.util.spec_from_file_location("quantize_minilm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pairs = example.docstring_pairs()
    assert len(pairs) >= 500 and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)
    evaluation, calibration = example.split(pairs, seed=1)
    assert evaluation == example.split(pairs, seed=2)[0] and calibration != example.split(pairs, seed=2)[1]
    assert len(evaluation) == example.EVAL_PAIRS and not set(evaluation) & set(calibration)
