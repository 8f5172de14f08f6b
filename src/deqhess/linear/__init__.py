"""Solves with ``I − J`` and ``(I − J)ᵀ``; they know nothing of losses.

Strategies: :class:`Dense` (LU per sample block), :class:`GMRES` (restarted,
matrix-free), :class:`Neumann` (matrix-free, contractive maps) and :class:`NeumannGMRES`
(Neumann while it is fast, then GMRES); ``"auto"`` picks between them (see
:func:`resolve_linear_solver`). A :class:`Linearization` binds one
strategy to one fixed point: the object every implicit derivative solves with.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..memory import budget_bytes
from ..solvers import default_tolerance
from .accuracy import (
    DEFAULT_MAX_ERROR_BOUND,
    ErrorBound,
    check_max_error_bound,
    warning_threshold,
)
from .adaptive import NeumannGMRES, neumann_then_gmres
from .base import (
    IterativeSolve,
    LinearSolveInfo,
    LinearSolver,
    LinearSolveStats,
    Solve,
    default_linear_tolerance,
)
from .coupling import coupling_tolerance, row_coupling
from .dense import Dense, DenseLU, default_max_condition
from .gmres import GMRES, gmres
from .jacobian import jacobian_blocks
from .linearization import Linearization
from .neumann import Neumann, neumann
from .operator import ResidualOperator

__all__ = [
    "DEFAULT_MAX_ERROR_BOUND",
    "ErrorBound",
    "GMRES",
    "Dense",
    "DenseLU",
    "IterativeSolve",
    "LinearSolveInfo",
    "LinearSolveStats",
    "LinearSolver",
    "Linearization",
    "Neumann",
    "NeumannGMRES",
    "ResidualOperator",
    "Solve",
    "check_linear_solver",
    "check_max_error_bound",
    "default_linear_tolerance",
    "default_max_condition",
    "gmres",
    "jacobian_blocks",
    "neumann",
    "neumann_then_gmres",
    "resolve_linear_solver",
    "row_coupling",
    "coupling_tolerance",
    "warning_threshold",
]

#: ``"auto"`` factorises blocks up to this width...
DENSE_MAX_WIDTH = 2048
#: ...while all blocks together stay below this many bytes.
DENSE_MAX_BYTES = 2 * 1024**3
#: With few solves per fixed point (a layer's backward), forming ``J`` costs ``d``
#: products against the tens an iterative solve takes: factorise only blocks this narrow.
FEW_SOLVES_MAX_WIDTH = 64
#: Products an iterative strategy spends on one direction's solves through a layer (three
#: solves — tangent, adjoint and their product's — of ~30 products each, measured 26 on a
#: conv DEQ): a block of K directions costs about this many times K products, against the
#: ``d`` products that form a ``d``-wide ``J`` once for the LU.
PRODUCTS_PER_DIRECTION = 90

_ALIASES = {"dense": Dense, "gmres": GMRES, "neumann": Neumann, "neumann-gmres": NeumannGMRES}


def resolve_linear_solver(
    solver: str | LinearSolver,
    samples: int,
    width: int,
    dtype: torch.dtype,
    max_condition: float | None = None,
    *,
    few_solves: bool = False,
    directions: int | None = None,
    device: torch.device | None = None,
) -> LinearSolver:
    """The linear solver a ``linear_solver`` option names, for ``S`` blocks of width ``d``.

    ``"auto"`` is :class:`Dense` when a block is at most ``DENSE_MAX_WIDTH`` wide and the
    ``S`` blocks fit in ``DENSE_MAX_BYTES``, else :class:`GMRES` — for many solves per
    fixed point (HVPs). With ``few_solves`` (a layer's backward) it is :class:`Dense` only
    up to ``FEW_SOLVES_MAX_WIDTH`` (forming ``J`` costs ``d`` products, more than the
    solves save) and else :class:`NeumannGMRES`, as cheap per product as a plain
    fixed-point iteration, to the forward solve's default relative tolerance (1e-10 in
    float64, 1e-5 in float32: the gradient's error is set by the larger of the two).
    With ``directions`` — the number of directions a curvature operator's pass pushes
    through the fixed point (a layer inside :class:`deqhess.ModelCurvature`) — it is
    :class:`Dense` wherever forming ``J`` costs fewer products than the iterative solves
    would, ``width ≤ PRODUCTS_PER_DIRECTION · directions`` (and the blocks fit): a dense
    form's P directions factorise, a single HVP through a wide state does not. Given the
    ``device``, the blocks must also fit in a quarter of the memory available there.

    Args:
        solver: a :class:`LinearSolver` (returned as it is) or an alias: ``"auto"``,
            ``"dense"``, ``"gmres"``, ``"neumann"``, ``"neumann-gmres"``.
        samples: ``S``, the number of independent blocks of ``I − J``.
        width: ``d``, the width of a block.
        dtype: the state's dtype (sizes the dense blocks).
        max_condition: the largest condition number a :class:`Dense` accepts.
        few_solves: a layer's backward: few solves per fixed point.
        directions: the directions a curvature operator's pass pushes through the
            fixed point, or None.
        device: where the blocks would live (their memory is checked there), or None.

    Returns:
        The solver.
    """
    if isinstance(solver, LinearSolver):
        return solver
    if solver == "auto":
        itemsize = torch.finfo(dtype).bits // 8
        widest = FEW_SOLVES_MAX_WIDTH if few_solves else DENSE_MAX_WIDTH
        if directions is not None:
            widest = min(DENSE_MAX_WIDTH, max(widest, PRODUCTS_PER_DIRECTION * directions))
        room: float = DENSE_MAX_BYTES
        if device is not None:
            budget = budget_bytes(device)
            room = room if budget is None else min(room, 0.25 * budget)
        small = width <= widest and samples * width * width * itemsize <= room
        if small:
            return Dense(max_condition)
        # a backward needs its solve no more accurate than the forward's default tolerance
        return NeumannGMRES(rtol=default_tolerance(dtype)) if few_solves else GMRES()
    check_linear_solver(solver)
    cls = _ALIASES[solver.lower()]
    return cls(max_condition) if cls is Dense else cls()


def check_linear_solver(solver: str | LinearSolver) -> None:
    """Refuse now a ``linear_solver`` that :func:`resolve_linear_solver` would refuse later.

    An option is checked where it is given.

    Raises:
        InputError: not ``"auto"``, a known name or a :class:`LinearSolver`.
    """
    if isinstance(solver, LinearSolver) or solver == "auto":
        return
    if isinstance(solver, str) and solver.lower() in _ALIASES:
        return
    raise InputError(
        f"unknown linear_solver {solver!r}; use 'auto', one of {sorted(_ALIASES)}, or an "
        "instance such as deqhess.linear.GMRES(restart=50)."
    )
