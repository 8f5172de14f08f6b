"""The linearisation of a solved fixed point: one object for every implicit derivative.

At ``h* = F(h*)`` every derivative — the adjoint ``(I − J)ᵀλ = ∇L``, the sensitivity
``(I − J)Z = ∂f/∂θ``, the tangent of forward mode, and every system derived from those
when they are differentiated again — is a solve with ``A = I − J`` or ``Aᵀ`` at the same
point. :class:`Linearization` holds what they share: the residual ``g = F − id``, ``A`` as
a :class:`ResidualOperator`, the check that rows declared independent are, and one
prepared solve (``LinearSolver.init`` once; ``compute`` and ``transpose`` on it), with the
statistics of every solve. :class:`deqhess.Equilibrium` and the :class:`deqhess.nn.DEQ`
layer both hold one, so each fixed point is factorised (or traced) once, whichever path
asks for its derivatives.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..errors import NonFiniteError
from ..finiteness import all_finite
from ..solvers import Residual
from .base import LinearSolver, LinearSolveStats, Solve
from .coupling import coupling_tolerance, row_coupling
from .operator import ResidualOperator

__all__ = ["Linearization", "coupling_tolerance", "row_coupling"]


class Linearization:
    """``I − J`` at a fixed point ``h*`` of ``h = F(h)`` on rows ``[S, d]``, ready to solve.

    Args:
        residual: the residual ``g(h) = F(h) − h`` (or the map ``F``) on rows ``[S, d]``.
        h: the fixed point, rows ``[S, d]``.
        solver: the strategy for solves with ``I − J`` (see :mod:`deqhess.linear`).
        independent_rows: the rows are declared independent systems (``batch_dim``):
            checked by :func:`row_coupling` before a strategy relies on it (a dense
            solve per block or GMRES per row of a coupled ``J`` would be silently wrong;
            a Neumann iteration on the full operator is right either way).
        declared: for the error message, what couples what (e.g. ``"f couples the
            samples along batch_dim=0"``) and what to do instead.
        stats: where every solve is recorded (default: a fresh record).

    Raises:
        ValueError: (on a solve that relies on it) ``F`` couples rows declared independent.
        NonFiniteError: ``∂F/∂h`` or a right-hand side is not finite.
    """

    def __init__(
        self,
        residual: Residual | Callable[[Tensor], Tensor],
        h: Tensor,
        solver: LinearSolver,
        *,
        independent_rows: bool = False,
        declared: tuple[str, str] = (
            "the map couples rows declared independent",
            "declare one coupled system instead",
        ),
        stats: LinearSolveStats | None = None,
    ) -> None:
        self.operator = ResidualOperator(
            residual, h, independent_rows=independent_rows, declared=declared
        )
        self.solver = solver
        self.stats = LinearSolveStats() if stats is None else stats
        self._prepared: Solve | None = None
        self._previous: dict[bool, Tensor] = {}

    @property
    def h(self) -> Tensor:
        """The fixed point, rows ``[S, d]``."""
        return self.operator.h

    @property
    def residual(self) -> Residual:
        return self.operator.residual

    @property
    def prepared(self) -> Solve:
        """The solve with ``I − J``, set up once. Strategies that rely on independent
        rows (dense blocks, GMRES per row) check them first."""
        if self._prepared is None:
            self._prepared = self.solver.init(self.operator)
        return self._prepared

    @property
    def is_prepared(self) -> bool:
        return self._prepared is not None

    @property
    def condition_number(self) -> float | None:
        """Estimated condition number of ``I − J`` once prepared (dense LU), else None."""
        return None if self._prepared is None else self._prepared.condition_number

    def check_independent_rows(self) -> None:
        """Raise ``ValueError`` if ``F`` couples rows declared independent."""
        self.operator.require_independent_rows()

    def solve(
        self, rhs: Tensor, x0: Tensor | None = None, *, transpose: bool = False,
        warm_start: bool = False,
    ) -> Tensor:  # fmt: skip
        """``(I − J)⁻¹ rhs`` (``(I − J)⁻ᵀ rhs`` with ``transpose``) for ``rhs`` ``[..., S, d]``.

        Args:
            x0: initial guess for an iterative solver.
            warm_start: without ``x0``, start from the previous solution of the same
                system and shape on this linearisation (kept only where it beats zero).
        """
        if not all_finite(rhs):
            raise NonFiniteError(
                "the right-hand side of a solve with I − J is not finite: what reaches the "
                "fixed point — ∇L or a cotangent from the layers after it, ∂f/∂θ along a "
                "direction, or a second derivative of f — is NaN/inf there (the loss or f is "
                "not finite or not differentiable at the fixed point: sqrt, abs or division "
                "at 0, overflow).",
                quantity="the right-hand side of a linear solve",
            )
        prepared = self.prepared.transpose() if transpose else self.prepared
        if x0 is None and warm_start:
            previous = self._previous.get(transpose)
            x0 = previous if previous is not None and previous.shape == rhs.shape else None
        x, info = prepared.compute(rhs, x0)
        self.stats.record(info)
        if warm_start:
            self._previous[transpose] = x
        return x

    def solve_transpose(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        """``(I − J)⁻ᵀ rhs`` for ``rhs`` ``[..., S, d]``."""
        return self.solve(rhs, x0, transpose=True)
