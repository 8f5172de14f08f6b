"""PyTorch modules whose implicit derivatives are exact to every order."""

from __future__ import annotations

from .adapters import StateFirst, TupleState
from .calls import ConvergenceRecord, LayerCall, convergence, layer_calls, warm_starts
from .deq import DEQ, LayerInfo, LayerSolution
from .implicit import FixedPointSpec, fixed_point
from .torchdeq_compat import TorchdeqDEQ, get_deq

__all__ = [
    "ConvergenceRecord",
    "DEQ",
    "FixedPointSpec",
    "LayerCall",
    "LayerInfo",
    "LayerSolution",
    "StateFirst",
    "TorchdeqDEQ",
    "TupleState",
    "convergence",
    "fixed_point",
    "get_deq",
    "layer_calls",
    "warm_starts",
]
