"""Solves with ``I − J`` and ``(I − J)ᵀ``; they know nothing of losses.

Strategies: :class:`Dense` (LU per sample block), :class:`GMRES` (restarted,
matrix-free) and :class:`Neumann` (matrix-free, contractive maps); ``"auto"`` picks
dense while the blocks are small enough (see :func:`resolve_linear_solver`).
"""

from __future__ import annotations

import torch

from .base import IterativeSolve, LinearSolveInfo, LinearSolver, Solve, default_linear_tolerance
from .dense import Dense, DenseLU, default_max_condition
from .gmres import GMRES, gmres
from .jacobian import jacobian_blocks
from .neumann import Neumann, neumann
from .operator import ResidualOperator

__all__ = [
    "GMRES",
    "Dense",
    "DenseLU",
    "IterativeSolve",
    "LinearSolveInfo",
    "LinearSolver",
    "Neumann",
    "ResidualOperator",
    "Solve",
    "default_linear_tolerance",
    "default_max_condition",
    "gmres",
    "jacobian_blocks",
    "neumann",
    "resolve_linear_solver",
]

#: ``"auto"`` factorises blocks up to this width...
DENSE_MAX_WIDTH = 2048
#: ...while all blocks together stay below this many bytes.
DENSE_MAX_BYTES = 2 * 1024**3

_ALIASES = {"dense": Dense, "gmres": GMRES, "neumann": Neumann}


def resolve_linear_solver(
    solver: str | LinearSolver,
    samples: int,
    width: int,
    dtype: torch.dtype,
    max_condition: float | None = None,
) -> LinearSolver:
    """A strategy from itself or an alias: ``"auto"``, ``"dense"``, ``"gmres"``, ``"neumann"``.

    ``"auto"`` is :class:`Dense` when a block is at most ``DENSE_MAX_WIDTH`` wide and the
    ``S`` blocks fit in ``DENSE_MAX_BYTES``, else :class:`GMRES`.
    """
    if isinstance(solver, LinearSolver):
        return solver
    if solver == "auto":
        itemsize = torch.finfo(dtype).bits // 8
        small = width <= DENSE_MAX_WIDTH and samples * width * width * itemsize <= DENSE_MAX_BYTES
        return Dense(max_condition) if small else GMRES()
    if isinstance(solver, str) and solver.lower() in _ALIASES:
        cls = _ALIASES[solver.lower()]
        return cls(max_condition) if cls is Dense else cls()
    raise ValueError(
        f"unknown linear_solver {solver!r}; use 'auto', one of {sorted(_ALIASES)}, or an "
        "instance such as deqhess.linear.GMRES(restart=50)."
    )
