"""Operator algebra: damping, scaling, sums, composition, block-diagonal assembly, callables."""

from __future__ import annotations

import pytest
import torch

import hesse
from hesse.errors import HesseError
from hesse.operators import DenseOperator, FunctionOperator, Identity, block_diagonal
from tests.helpers import sym_matrix


def _dense(op):
    return op @ torch.eye(op.shape[0], dtype=op.dtype)


def test_damping_scaling_sum_and_difference():
    A, B = sym_matrix([3.0, 1.0, 0.5], seed=0), sym_matrix([2.0, -1.0, 0.1], seed=1)
    opA, opB = DenseOperator(A), DenseOperator(B)
    I3 = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(_dense(opA + 0.5 * Identity(3)), A + 0.5 * I3)
    assert torch.allclose(_dense(2 * opA - opB / 4), 2 * A - B / 4)
    assert torch.allclose(_dense(-opA), -A)


def test_composition_versus_product():
    A, B = sym_matrix([3.0, 1.0, 0.5], seed=0), sym_matrix([2.0, 1.0, 0.1], seed=1)
    opA, opB = DenseOperator(A), DenseOperator(B)
    v = torch.randn(3, dtype=torch.float64)
    assert isinstance(opA @ v, torch.Tensor) and torch.allclose(opA @ v, A @ v)
    composed = opA @ opB
    assert isinstance(composed, hesse.LinearOperator) and torch.allclose(_dense(composed), A @ B)


def test_symmetry_flag_propagation(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    G = hesse.GGN(model, crit, batches)
    I = Identity(G.shape[0], G.dtype)
    assert (G + 1e-3 * I).symmetric_by_construction and (2 * G).symmetric_by_construction
    assert (G @ G).symmetric_by_construction
    assert not (G @ (G + I)).symmetric_by_construction
    assert not (G + DenseOperator(torch.eye(G.shape[0], dtype=G.dtype))).symmetric_by_construction
    assert (G + I).blocks == G.blocks


def test_damped_curvature_works_with_linalg(mlp_problem):
    model, crit, X, y, batches = mlp_problem
    G = hesse.GGN(model, crit, batches)
    lam = 0.3
    v = torch.randn(G.shape[0], 2, dtype=G.dtype)
    assert torch.allclose((G + lam * Identity(G.shape[0], G.dtype)) @ v, G @ v + lam * v)
    C = DenseOperator(sym_matrix([4.0, 2.0, 1.0, 0.0], seed=0))
    smallest = hesse.eigenvalues(C + lam * Identity(4), k=1, which="smallest", tol=1e-8)
    assert smallest.values[0] == pytest.approx(lam, abs=1e-6)


def test_block_diagonal_assembly():
    A, B = sym_matrix([3.0, 1.0], seed=0), sym_matrix([2.0, 1.0, 0.1], seed=1)
    op = block_diagonal(DenseOperator(A), DenseOperator(B), names=["a", "b"])
    assert op.blocks == {"a": slice(0, 2), "b": slice(2, 5)}
    assert torch.allclose(_dense(op), torch.block_diag(A, B))
    assert hesse.trace(op, budget=60).estimate == pytest.approx(float(A.trace() + B.trace()), rel=1e-6)


def test_function_operators():
    A = sym_matrix([3.0, 1.0, 0.5], seed=0)
    by_vector = FunctionOperator(lambda v: A @ v, 3, mode="matvec", symmetric=True)
    by_pair = hesse.as_operator((lambda V: A @ V, 3))
    assert torch.allclose(_dense(by_vector), A) and torch.allclose(_dense(by_pair), A)
    assert by_vector.symmetric_by_construction and not by_pair.symmetric_by_construction
    with pytest.raises(HesseError, match="matvec"):
        FunctionOperator(lambda v: A @ v[:, 0], 3) @ torch.ones(3, 2, dtype=torch.float64)


def test_mismatched_operators_are_refused():
    with pytest.raises(HesseError, match="must match"):
        DenseOperator(torch.eye(3)) + Identity(4, torch.float32)
