"""Solves with ``I − J`` and ``(I − J)ᵀ``; they know nothing of losses."""

from __future__ import annotations

from .dense import DenseLU, default_max_condition
from .jacobian import jacobian_blocks

__all__ = ["DenseLU", "default_max_condition", "jacobian_blocks"]
