"""Short names for the fixed-point solvers, accepted at the public edge."""

from __future__ import annotations

from ..errors import InputError
from .anderson import Anderson
from .base import FixedPointSolver
from .picard import Picard

__all__ = ["resolve_solver"]

_ALIASES = {"anderson": Anderson, "picard": Picard}


def resolve_solver(solver: str | FixedPointSolver) -> FixedPointSolver:
    """A solver object from itself or a short alias (``"anderson"``, ``"picard"``)."""
    if isinstance(solver, FixedPointSolver):
        return solver
    if isinstance(solver, str) and solver.lower() in _ALIASES:
        return _ALIASES[solver.lower()]()
    raise InputError(
        f"unknown solver {solver!r}; use one of {sorted(_ALIASES)} or an instance such as "
        "deqhess.solvers.Anderson(memory=5)."
    )
