"""PyTorch modules whose implicit derivatives are exact to every order."""

from __future__ import annotations

from .adapters import StateFirst, TupleState
from .deq import DEQ, LayerCall, LayerInfo, layer_calls, warm_starts
from .implicit import FixedPointSpec, fixed_point

__all__ = [
    "DEQ",
    "FixedPointSpec",
    "LayerCall",
    "LayerInfo",
    "StateFirst",
    "TupleState",
    "fixed_point",
    "layer_calls",
    "warm_starts",
]
