"""What a fixed point solves and how: :class:`FixedPointSpec`.

The map, its independent rows, the forward solver and its policy, and the linear
solver of every derived system (adjoint, tangent, at any order), with what each
reports; :meth:`FixedPointSpec.linearization` builds the ``I − J`` those systems solve
with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..linear import (
    IterativeSolve,
    Linearization,
    LinearSolver,
    LinearSolveStats,
    resolve_linear_solver,
)
from ..linear.base import IterativeSolver
from ..linear.kept import FactorSlot
from ..solvers import Convergence, FixedPointSolver, Residual, SolveInfo, Tolerance
from .second_order import RefusedSecondOrder

__all__ = ["FixedPointSpec", "ReportingSolver"]


@dataclass(frozen=True)
class FixedPointSpec:
    """What to solve and how: ``z = fn(z, *args)``.

    Attributes:
        fn: the map; must be traceable by ``torch.func``.
        independent_dims: leading dims of ``z`` indexing independent systems (their
            Jacobian blocks are solved separately; 0 = one coupled system).
        solver, tol, atol, max_iter, require_convergence, convergence: the forward
            solver and its policy (see :func:`deqhess.solvers.solve_fixed_point`).
        linear_solver: strategy for the solves with ``I − J`` (adjoint, tangent and every
            derived system); ``"auto"`` picks it for few solves per fixed point.
        check_rows: the independent rows are declared by the user (``batch_dim``), so
            the linearisation checks them (a few JVPs) before its first solve.
        on_solve: called with the forward solve's statistics (None: ignored).
        stats: where the linear solves are recorded (None: nowhere the caller sees).
        convergence: the forward policy; None follows ``require_convergence``.
        names: the arguments' names, for messages (``"x"``, ``"cell.lin.weight"``, …).
        check_registered: check that ``fn`` reads no tensor needing grad besides its
            arguments (see :func:`deqhess.nn.contract.check_registered`), on the solve's
            first evaluation.
        linear_on_failure: what an iterative linear solve that misses its tolerance
            does: ``"raise"``, or ``"report"`` (returned, recorded in
            ``stats.unconverged``; the training policy).
        directions: directions each derivative pass will push through the fixed point
            (a curvature operator's block; None: a training step's few), for
            ``"auto"``'s choice.
        watch_accuracy: the linearisation warns where the derivatives' error bound is
            high (see :class:`deqhess.linear.Linearization`); off for training.
        refused_second_order: arguments whose second derivatives torch computes wrongly
            (see :mod:`deqhess.nn.second_order`): a recorded backward guards them, so
            that differentiating it in them raises; None: none.
        kept_factors: where the solved fixed point's dense factors of ``I − J`` are kept
            between a curvature operator's passes over the batch, and taken again where
            the blocks of ``J`` are bitwise the same (:mod:`deqhess.linear.kept`); None:
            not kept.
    """

    fn: Callable[..., Tensor]
    independent_dims: int
    solver: FixedPointSolver
    tol: float | None
    atol: float | None
    max_iter: int
    linear_solver: str | LinearSolver
    require_convergence: bool = True
    check_rows: bool = False
    on_solve: Callable[[SolveInfo], None] | None = None
    stats: LinearSolveStats | None = None
    convergence: Convergence | None = None
    names: tuple[str, ...] = ()
    check_registered: bool = False
    linear_on_failure: str = "raise"
    directions: int | None = None
    watch_accuracy: bool = False
    refused_second_order: RefusedSecondOrder | None = None
    kept_factors: FactorSlot | None = None

    def rows(self, z: Tensor) -> Tensor:
        """Return ``z`` as rows ``[S, d]``: ``S`` over the leading independent dims."""
        samples = math.prod(z.shape[: self.independent_dims])
        return z.reshape(samples, -1)

    def linearization(
        self,
        fn_rows: Callable[[Tensor], Tensor],
        rows: Tensor,
        accepted: Tensor | None = None,
        tolerance: Tolerance | None = None,
    ) -> Linearization:
        """The linearisation ``I − J`` of the rows map at ``rows``.

        Args:
            fn_rows: the map on rows ``[S, d]``.
            rows: the point ``[S, d]`` (the fixed point, or zeros for an affine map).
            accepted: for a solved fixed point, the residuals ``[S]`` the solve
                accepted (what a later evaluation there is checked against).
            tolerance: for a solved fixed point, its stopping rule.

        Returns:
            The :class:`deqhess.linear.Linearization` with this spec's linear solver —
            a named strategy solving to the layer's tolerance (not below the dtype's ε),
            wrapped to report rather than raise a miss under ``linear_on_failure=
            "report"`` — checking the declared independent rows before its first solve.
        """
        strategy = resolve_linear_solver(
            self.linear_solver, rows.shape[0], rows.shape[1], rows.dtype, few_solves=True,
            directions=self.directions, device=rows.device,
        )  # fmt: skip
        if isinstance(self.linear_solver, str) and isinstance(strategy, IterativeSolver):
            # a strategy chosen by name solves to the layer's tolerance when one is given
            # (the derivatives are then as accurate as the fixed point they differentiate),
            # but not below the dtype's ε, where a residual is rounding
            if self.tol is not None and 0 < self.tol < 1:
                strategy.rtol = max(self.tol, torch.finfo(rows.dtype).eps)
        if self.linear_on_failure == "report":
            strategy = ReportingSolver(strategy)
        return Linearization(
            Residual(fn_rows),
            rows,
            strategy,
            independent_rows=self.check_rows,
            declared=(
                "the cell couples the samples of the batch (the state's first dim)",
                "use DEQ(..., batch_dim=None) for one coupled system",
            ),
            stats=self.stats,
            accepted=accepted,
            tolerance=tolerance,
            # every solve of the layer runs inside FixedPointFunction.forward, where
            # torch.func.linearize returns zeros: its trace would cost a tracing pass per
            # backward only to be rejected, so JVPs are plain from the start
            trace_tangent=False,
            watch_accuracy=self.watch_accuracy,
        )


class ReportingSolver(LinearSolver):
    """``strategy``, its iterative misses returned and recorded instead of raised.

    An iterative solve that misses its tolerance returns what it reached, counted in
    the stats as unconverged (the ``"training"`` policy).
    """

    def __init__(self, strategy: LinearSolver) -> None:
        self.strategy = strategy

    def init(self, operator: Any) -> Any:
        """The strategy's prepared solve, its iterative misses reported, not raised."""
        solve = self.strategy.init(operator)
        if isinstance(solve, IterativeSolve):
            solve.on_failure = "report"
        return solve
