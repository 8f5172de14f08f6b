"""Fixed-point solvers for ``h = f(h)``; they know nothing of derivatives."""

from __future__ import annotations

from .anderson import Anderson
from .driver import FixedPointSolver, SolveInfo, Tolerance, default_tolerance, solve_fixed_point
from .picard import Picard
from .residual import Residual

__all__ = [
    "Anderson",
    "FixedPointSolver",
    "Picard",
    "Residual",
    "SolveInfo",
    "Tolerance",
    "default_tolerance",
    "resolve_solver",
    "solve_fixed_point",
]

_ALIASES = {"anderson": Anderson, "picard": Picard}


def resolve_solver(solver: str | FixedPointSolver) -> FixedPointSolver:
    """A solver object from itself or a short alias (``"anderson"``, ``"picard"``)."""
    if isinstance(solver, FixedPointSolver):
        return solver
    if isinstance(solver, str) and solver.lower() in _ALIASES:
        return _ALIASES[solver.lower()]()
    raise ValueError(
        f"unknown solver {solver!r}; use one of {sorted(_ALIASES)} or an instance such as "
        "deqhess.solvers.Anderson(memory=5)."
    )
