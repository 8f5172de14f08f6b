"""Solves with ``I − J`` and ``(I − J)ᵀ``; they know nothing of losses.

Strategies: :class:`Dense` (LU per sample block), :class:`GMRES` (restarted,
matrix-free) and :class:`Neumann` (matrix-free, contractive maps); ``"auto"`` picks
between them (see :func:`resolve_linear_solver`). A :class:`Linearization` binds one
strategy to one fixed point: the object every implicit derivative solves with.
"""

from __future__ import annotations

import torch

from .base import (
    IterativeSolve,
    LinearSolveInfo,
    LinearSolver,
    LinearSolveStats,
    Solve,
    default_linear_tolerance,
)
from .dense import Dense, DenseLU, default_max_condition
from .gmres import GMRES, gmres
from .jacobian import jacobian_blocks
from .linearization import Linearization, row_coupling
from .neumann import Neumann, neumann
from .operator import ResidualOperator

__all__ = [
    "GMRES",
    "Dense",
    "DenseLU",
    "IterativeSolve",
    "LinearSolveInfo",
    "LinearSolveStats",
    "LinearSolver",
    "Linearization",
    "Neumann",
    "ResidualOperator",
    "Solve",
    "default_linear_tolerance",
    "default_max_condition",
    "gmres",
    "jacobian_blocks",
    "neumann",
    "resolve_linear_solver",
    "row_coupling",
]

#: ``"auto"`` factorises blocks up to this width...
DENSE_MAX_WIDTH = 2048
#: ...while all blocks together stay below this many bytes.
DENSE_MAX_BYTES = 2 * 1024**3
#: With few solves per fixed point (a layer's backward), forming ``J`` costs ``d``
#: products against the tens an iterative solve takes: factorise only blocks this narrow.
FEW_SOLVES_MAX_WIDTH = 64

_ALIASES = {"dense": Dense, "gmres": GMRES, "neumann": Neumann}


def resolve_linear_solver(
    solver: str | LinearSolver,
    samples: int,
    width: int,
    dtype: torch.dtype,
    max_condition: float | None = None,
    *,
    few_solves: bool = False,
) -> LinearSolver:
    """A strategy from itself or an alias: ``"auto"``, ``"dense"``, ``"gmres"``, ``"neumann"``.

    ``"auto"`` is :class:`Dense` when a block is at most ``DENSE_MAX_WIDTH`` wide (only
    ``FEW_SOLVES_MAX_WIDTH`` with ``few_solves``, as in a training step, where the ``d``
    products that form ``J`` would cost more than the solves they save) and the ``S``
    blocks fit in ``DENSE_MAX_BYTES``; else :class:`GMRES`.
    """
    if isinstance(solver, LinearSolver):
        return solver
    if solver == "auto":
        itemsize = torch.finfo(dtype).bits // 8
        widest = FEW_SOLVES_MAX_WIDTH if few_solves else DENSE_MAX_WIDTH
        small = width <= widest and samples * width * width * itemsize <= DENSE_MAX_BYTES
        return Dense(max_condition) if small else GMRES()
    if isinstance(solver, str) and solver.lower() in _ALIASES:
        cls = _ALIASES[solver.lower()]
        return cls(max_condition) if cls is Dense else cls()
    raise ValueError(
        f"unknown linear_solver {solver!r}; use 'auto', one of {sorted(_ALIASES)}, or an "
        "instance such as deqhess.linear.GMRES(restart=50)."
    )
