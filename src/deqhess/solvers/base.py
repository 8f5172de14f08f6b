"""The contract of a fixed-point solver: how to take a step, nothing else."""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor

__all__ = ["FixedPointSolver"]


class FixedPointSolver(abc.ABC):
    """A rule for the next iterate of ``h = f(h)`` on rows ``[S, d]``.

    Subclasses implement :meth:`init` (their memory for a first iterate) and
    :meth:`step` (the next iterate from ``h`` and ``f(h)``). They never test
    convergence, count iterations or raise: the driver
    (:func:`deqhess.solvers.solve_fixed_point`) does, under a
    :class:`deqhess.solvers.Convergence` policy.
    """

    #: the step's damping β in ``(0, 1]`` (1: undamped); read by the convergence advice.
    damping: float = 1.0

    @abc.abstractmethod
    def init(self, h: Tensor) -> Any:
        """Memory for a solve starting at rows ``h`` ``[S, d]``."""

    @abc.abstractmethod
    def step(self, memory: Any, h: Tensor, fh: Tensor) -> tuple[Tensor, Any]:
        """Next iterate ``[S, d]`` from ``h`` and ``fh = f(h)``, and updated memory."""
