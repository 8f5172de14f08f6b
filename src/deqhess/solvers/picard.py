"""Damped Picard iteration ``h ← (1 − β) h + β f(h)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import InputError
from .base import FixedPointSolver

__all__ = ["Picard"]


class Picard(FixedPointSolver):
    """Damped fixed-point (Picard / Krasnosel'skii–Mann) iteration.

    Converges linearly at rate ``|1 − β + β c|`` when ``f`` is a contraction with
    constant ``c`` in ``h``; damping ``β < 1`` can make averaged non-expansive maps
    converge.

    Args:
        damping: β in ``(0, 1]``.
    """

    def __init__(self, damping: float = 1.0) -> None:
        if not 0.0 < damping <= 1.0:
            raise InputError(f"Picard damping must lie in (0, 1]; got {damping}.")
        self.damping = float(damping)

    def __repr__(self) -> str:
        return f"Picard(damping={self.damping:g})"

    def init(self, h: Tensor) -> None:
        """No memory: a Picard step needs only ``h`` and ``f(h)``."""
        return None

    def step(self, memory: Any, h: Tensor, fh: Tensor) -> tuple[Tensor, None]:
        """``(1 − β) h + β f(h)`` ``[S, d]``, and no memory."""
        if self.damping == 1.0:  # the plain iteration: f(h) itself
            return fh, None
        return h + self.damping * (fh - h), None
