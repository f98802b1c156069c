"""Matrix-free curvature operators (layer 1): Hessian, GGN, Fisher and generic views."""

from hesse.operators.base import (
    BlockDiagonalOperator,
    BlockView,
    DenseOperator,
    LinearOperator,
    ScipyOperator,
    as_operator,
)
from hesse.operators.curvature import CurvatureOperator, select_parameters
from hesse.operators.data import default_forward
from hesse.operators.fisher import Fisher
from hesse.operators.ggn import GGN
from hesse.operators.hessian import Hessian

__all__ = [
    "BlockDiagonalOperator", "BlockView", "CurvatureOperator", "DenseOperator", "Fisher", "GGN",
    "Hessian", "LinearOperator", "ScipyOperator", "as_operator", "default_forward", "select_parameters",
]
