"""PyTorch modules whose implicit derivatives are exact to every order."""

from __future__ import annotations

from .adapters import StateFirst, TupleState
from .deq import DEQ, LayerInfo, warm_starts
from .implicit import FixedPointSpec, fixed_point
from .policy import ConvergenceRecord, LayerCall, convergence
from .torchdeq_compat import TorchdeqDEQ, get_deq

__all__ = [
    "ConvergenceRecord",
    "DEQ",
    "FixedPointSpec",
    "LayerCall",
    "LayerInfo",
    "StateFirst",
    "TorchdeqDEQ",
    "TupleState",
    "convergence",
    "fixed_point",
    "get_deq",
    "warm_starts",
]
