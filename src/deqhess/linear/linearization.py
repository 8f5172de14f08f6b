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

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..solvers import Residual
from .base import LinearSolver, LinearSolveStats, Solve, row_norms
from .operator import ResidualOperator

__all__ = ["Linearization", "row_coupling"]

#: scale factors are powers of two in [2⁻⁸, 2⁷]: one digit of base 16 per probe.
_DIGIT = 16


class Linearization:
    """``I − J`` at a fixed point ``h*`` of ``h = F(h)`` on rows ``[S, d]``, ready to solve.

    Args:
        residual: the residual ``g(h) = F(h) − h`` (or the map ``F``) on rows ``[S, d]``.
        h: the fixed point, rows ``[S, d]``.
        solver: the strategy for solves with ``I − J`` (see :mod:`deqhess.linear`).
        independent_rows: the rows are declared independent systems (``batch_dim``):
            checked by :func:`row_coupling` before the first solve, since a dense block
            solve of a coupled ``J`` would be silently wrong.
        declared: for the error message, what couples what (e.g. ``"f couples the
            samples along batch_dim=0"``) and what to do instead.
        stats: where every solve is recorded (default: a fresh record).

    Raises:
        ValueError: (on the first solve) ``F`` couples rows declared independent.
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
        self.operator = ResidualOperator(residual, h)
        self.solver = solver
        self.independent_rows = independent_rows
        self.declared = declared
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
        """The solve with ``I − J`` set up once (after the independence check)."""
        if self._prepared is None:
            if self.independent_rows:
                self.check_independent_rows()
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
        coupling, row = row_coupling(self.residual.fn, self.h)
        if not math.isfinite(coupling):
            raise NonFiniteError(
                f"∂F/∂h is not finite at the fixed point (sample {row}): its derivatives do "
                "not exist there. Check the map for non-differentiable points (sqrt or abs "
                "at 0, log at 0) at the equilibrium.",
                quantity="∂F/∂h",
            )
        if coupling > coupling_tolerance(self.h.dtype):
            what, remedy = self.declared
            raise ValueError(
                f"{what} (declared independent): sample {row}'s ∂F/∂h·v "
                f"changes by a relative {coupling:.1e} when only the other samples' "
                f"directions are rescaled (0 for independent samples); {remedy}."
            )

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
        if not bool(torch.isfinite(rhs).all()):
            raise NonFiniteError(
                "the right-hand side of a solve with I − J is not finite: a cotangent or "
                "tangent reaching the fixed point is NaN/inf (the loss, or what follows the "
                "equilibrium, is not finite or not differentiable there).",
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


def coupling_tolerance(dtype: torch.dtype) -> float:
    """Relative cross-row coupling above rounding: ``1000 ε`` of the dtype."""
    return 1e3 * torch.finfo(dtype).eps


def row_coupling(fn: Callable[[Tensor], Tensor], h: Tensor, seed: int = 0) -> tuple[float, int]:
    """How much ``J = ∂fn/∂h`` at rows ``h`` ``[S, d]`` couples different rows.

    A random direction ``v`` and copies with row ``s`` scaled by ``cₛ``: if rows are
    independent, ``J(c ⊙ v)ₛ = cₛ (J v)ₛ`` for every row, while a coupling ``Jₛₜ ≠ 0``
    adds ``Jₛₜ (cₜ − cₛ) vₜ`` — nonzero for almost every ``v`` whenever ``cₜ ≠ cₛ``. The
    factors are powers of two (exact in floating point, so independent rows give zero
    up to the order of summation), one base-16 digit of the row index per probe, so
    every pair of rows differs in some probe: ``1 + ⌈log₁₆ S⌉`` JVPs in one vmapped
    call (3 for ``S ≤ 256``) see any coupling, one-way or not, between any rows.

    Returns:
        ``(coupling, row)``: the largest relative discrepancy over rows and probes (0 for
        independent rows) and the row where it occurs.
    """
    samples = h.shape[0]
    if samples == 1:
        return 0.0, 0
    levels = max(1, math.ceil(math.log(samples) / math.log(_DIGIT)))
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device)
    index = torch.arange(samples, device=h.device)
    scales = torch.stack(
        [2.0 ** ((index // _DIGIT**level) % _DIGIT - _DIGIT // 2) for level in range(levels)]
    ).to(h.dtype)  # [L, S]
    tangents = torch.cat([v[None], scales[:, :, None] * v[None]])  # [L + 1, S, d]
    products = torch.func.vmap(lambda t: torch.func.jvp(fn, (h,), (t,))[1])(tangents)
    expected = scales[:, :, None] * products[0][None]
    discrepancy = row_norms(products[1:] - expected)  # [L, S]
    size = row_norms(products[1:]) + row_norms(expected)
    relative = torch.where(size > 0, discrepancy / size.clamp_min(torch.finfo(h.dtype).tiny), 0.0)
    relative = torch.where(torch.isfinite(products[1:]).all(-1), relative, float("nan"))
    if not bool(torch.isfinite(products[0]).all()):
        return float("nan"), int(torch.nonzero(~torch.isfinite(products[0]).all(-1))[0, 0])
    worst = torch.argmax(torch.nan_to_num(relative, nan=float("inf")).amax(dim=0))
    return float(relative[:, worst].max()), int(worst)
