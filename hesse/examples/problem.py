"""What an analysis needs besides budgets: model, loss, data and how to call the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class Problem:
    """A model with its criterion and data, ready for :class:`hesse.Hessian` and friends.

    ``criterion`` may be ``None`` until the CLI picks it from ``--loss``.
    ``params`` selects the parameters (``None``: all trainable), ``layer_blocks`` is the
    ``by=`` of the per-layer view, ``hessian_method`` the product method of
    :class:`hesse.Hessian`, ``defaults`` holds recommended CLI settings (e.g. the
    training ``lr``), and ``info`` describes model, data and training for the report.
    """

    model: nn.Module
    criterion: Callable | None
    data: Any
    forward: Callable | None = None
    params: Any = None
    layer_blocks: Any = "module"
    hessian_method: str = "auto"
    defaults: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
