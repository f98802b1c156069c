"""Matrix-free curvature operators (layer 1): the objective, Hessian, GGN, Fisher and generic views."""

from hesse.operators.algebra import (
    BlockDiagonalAssembly,
    ComposedOperator,
    FunctionOperator,
    Identity,
    ScaledOperator,
    SumOperator,
    block_diagonal,
)
from hesse.operators.curvature import CurvatureOperator
from hesse.operators.data import DataSource, default_forward
from hesse.operators.fisher import Fisher
from hesse.operators.ggn import GGN
from hesse.operators.hessian import Hessian
from hesse.operators.kfac import EKFAC, KFAC, ExactBlock, KroneckerBlock
from hesse.operators.linear import (
    BlockDiagonalOperator,
    BlockView,
    DenseOperator,
    LinearOperator,
    ScipyOperator,
    as_operator,
)
from hesse.operators.objective import Evaluation, Objective, as_objective, select_parameters

__all__ = [
    "BlockDiagonalAssembly", "ComposedOperator", "FunctionOperator", "Identity", "ScaledOperator",
    "SumOperator", "block_diagonal", "EKFAC", "KFAC", "ExactBlock", "KroneckerBlock",
    "BlockDiagonalOperator", "BlockView", "CurvatureOperator", "DataSource", "DenseOperator", "Evaluation",
    "Fisher", "GGN", "Hessian", "LinearOperator", "Objective", "ScipyOperator", "as_objective", "as_operator",
    "default_forward", "select_parameters",
]
