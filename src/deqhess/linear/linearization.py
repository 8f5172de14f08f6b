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

import torch
from torch import Tensor

from ..errors import NonFiniteError, SingularSystemError
from ..finiteness import all_finite
from ..solvers import Residual, Tolerance
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
        accepted: ``[S]`` each row's residual ``‖F(h) − h‖`` as the forward solve measured
            it. Before the first solve ``F`` is evaluated once more at ``h``: a row whose
            residual is now clearly above both that and the tolerance means ``F`` is not a
            deterministic function of ``h`` (dropout, noise, state updated at each call)
            and has no fixed point.
        tolerance: the forward solve's stopping rule. With an estimate of ``‖(I − J)⁻¹‖``
            (dense LU), ``‖(I − J)⁻¹‖ × rtol`` bounds the derivatives' relative error (the
            residual left in ``h*`` is amplified by it); above ``0.1`` they keep no correct
            digit and the first solve raises.
        trace_tangent: trace the JVP of ``F`` once for the solves with ``I − J``
            (verified on its first use); False where the caller knows tracing cannot
            serve (see :class:`ResidualOperator`).

    Raises:
        ValueError: (on a solve that relies on it) ``F`` couples rows declared
            independent; ``F`` is not deterministic (see ``accepted``).
        NonFiniteError: ``∂F/∂h`` or a right-hand side is not finite.
        SingularSystemError: ``I − J`` too ill-conditioned for the forward tolerance.
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
        accepted: Tensor | None = None,
        tolerance: Tolerance | None = None,
        trace_tangent: bool = True,
    ) -> None:
        self.operator = ResidualOperator(
            residual,
            h,
            independent_rows=independent_rows,
            declared=declared,
            trace_tangent=trace_tangent,
        )
        self.solver = solver
        self.stats = LinearSolveStats() if stats is None else stats
        self.accepted, self.tolerance = accepted, tolerance
        self.outer: tuple[int, ...] | None = None  # the callers' row layout, if not h's
        self._certified = accepted is None
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
            if not self._certified:
                self.certify(self.residual.fn(self.h))
            prepared = self.solver.init(self.operator)
            self.stats.condition_number = prepared.condition_number
            if prepared.inverse_norm is not None and self.tolerance is not None:
                _check_accuracy(prepared.inverse_norm, self.tolerance.rtol, self.h.dtype)
            self._prepared = prepared
        return self._prepared

    def certify(self, value: Tensor) -> None:
        """Check, once, that ``value = F(h*)`` (a fresh evaluation, rows) still has the
        residuals the solve accepted (see ``accepted``); a caller that evaluates ``F`` at
        ``h*`` anyway (a VJP in ``θ``) passes it here and spares an evaluation.

        Raises:
            ValueError: ``F`` is not a deterministic function of ``h``.
        """
        if self._certified:
            return
        h = self.h
        g = value - h
        now = torch.linalg.vector_norm(g, dim=-1)
        allowed = 2 * self.accepted.to(now)
        if self.tolerance is not None:  # coupled rows may drift within the tolerance
            allowed = torch.maximum(
                allowed, 2 * self.tolerance.threshold(torch.linalg.vector_norm(value, dim=-1))
            )
        slack = 64 * torch.finfo(h.dtype).eps * torch.linalg.vector_norm(h, dim=-1)
        moved = now > allowed + slack
        if bool(moved.any()):
            row = int(torch.nonzero(moved)[0, 0])
            raise ValueError(
                f"f is not a deterministic function of the state: evaluated again at the fixed "
                f"point, sample {row}'s residual ‖f(h) − h‖ is {float(now[row]):.2e} where the "
                f"solve accepted {float(self.accepted[row]):.2e}. A map that changes between calls "
                "(dropout or noise in training mode, a parametrisation or buffer updated at "
                "each call) has no fixed point to differentiate: make it deterministic (eval "
                "mode, or draw any random mask once and pass it in x)."
            )
        self._certified = True

    @property
    def is_prepared(self) -> bool:
        return self._prepared is not None

    @property
    def condition_number(self) -> float | None:
        """Estimated condition number of ``I − J`` once prepared (dense LU), else None."""
        return None if self._prepared is None else self._prepared.condition_number

    @property
    def inverse_norm(self) -> float | None:
        """Estimated ``‖(I − J)⁻¹‖₁`` (largest over blocks) once prepared (dense LU): how
        much a residual left in ``h*`` is amplified into its error. Else None."""
        return None if self._prepared is None else self._prepared.inverse_norm

    def check_independent_rows(self) -> None:
        """Raise ``ValueError`` if ``F`` couples rows declared independent."""
        self.operator.require_independent_rows()

    @classmethod
    def in_blocks(
        cls, residual: Residual, h: Tensor, blocks: tuple[int, int], solver: LinearSolver,
        **options,
    ) -> Linearization:  # fmt: skip
        """The linearisation of one coupled system ``h`` ``[1, N]`` whose ``J`` is block
        diagonal with ``blocks = (B, n)`` blocks, solved block by block; right-hand sides
        stay ``[..., 1, N]`` for the caller."""

        def in_rows(r: Tensor) -> Tensor:
            return residual.fn(r.reshape(h.shape)).reshape(blocks)

        lin = cls(in_rows, h.reshape(blocks), solver, **options)
        lin.outer = tuple(h.shape)
        return lin

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
        shape = rhs.shape
        if self.outer is not None:  # the caller's [..., 1, N] as [..., B, n] blocks
            rhs = rhs.reshape(*shape[:-2], *self.h.shape)
            x0 = None if x0 is None else x0.reshape(rhs.shape)
        prepared = self.prepared.transpose() if transpose else self.prepared
        if x0 is None and warm_start:
            previous = self._previous.get(transpose)
            x0 = previous if previous is not None and previous.shape == rhs.shape else None
        x, info = prepared.compute(rhs, x0)
        self.stats.record(info)
        if warm_start:
            self._previous[transpose] = x
        return x.reshape(shape)

    def solve_transpose(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        """``(I − J)⁻ᵀ rhs`` for ``rhs`` ``[..., S, d]``."""
        return self.solve(rhs, x0, transpose=True)


#: above this bound on the derivatives' relative error, ``‖(I − J)⁻¹‖ × rtol``, they keep
#: no correct digit.
ACCURACY_LIMIT = 0.1


def _check_accuracy(inverse_norm: float, rtol: float, dtype: torch.dtype) -> None:
    bound = inverse_norm * max(rtol, torch.finfo(dtype).eps)
    if bound > ACCURACY_LIMIT:
        raise SingularSystemError(
            f"I − ∂f/∂h is too ill-conditioned for the fixed point's accuracy: ‖(I − J)⁻¹‖ ≈ "
            f"{inverse_norm:.2e} amplifies the forward tolerance {rtol:.1e} left in h* into a "
            f"relative error of up to {bound:.1e} in the derivatives, so they keep no correct "
            "digit. Tighten tol (float64 allows ~1e-12), or make f more contractive in h at "
            "its fixed point.",
            condition_number=inverse_norm,
        )
