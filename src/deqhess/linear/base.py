"""The contract of a linear solver for ``A = I − J`` and ``Aᵀ``, and the shared pieces.

A :class:`LinearSolver` is a strategy chosen by the user (``Dense()``, ``GMRES()``,
``Neumann()``). As in lineax, ``init(operator)`` does the one-time set-up at a fixed
point (an LU for the dense solver) and returns a :class:`Solve`; ``compute`` solves with
it and ``transpose()`` gives the solve with ``Aᵀ`` on the same set-up, so the
sensitivity, the adjoint and every derived system share one factorisation.
Right-hand sides are ``[..., S, d]``: any leading dims are independent directions.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConvergenceError, InputError, NonFiniteError
from ..options import integer, real
from .operator import ResidualOperator

#: the method of a Neumann solve stopped because its series diverges (ρ(J) ≥ 1)
NEUMANN_DIVERGING = "Neumann (diverging)"

__all__ = [
    "IterativeSolve",
    "IterativeSolver",
    "LinearSolveInfo",
    "LinearSolveStats",
    "LinearSolver",
    "Solve",
    "default_linear_tolerance",
]

_DEFAULT_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def default_linear_tolerance(dtype: torch.dtype) -> float:
    """Relative residual for iterative solves: 1e-12 in float64, 1e-6 in float32."""
    return _DEFAULT_RTOL.get(dtype, 1e-6)


def iterative_tolerances(
    rtol: float | None, atol: float, method: str
) -> tuple[float | None, float]:
    """An iterative solver's ``(rtol, atol)``, checked.

    Args:
        rtol: the relative residual, in ``(0, 1)`` (a relative residual of 1 or more
            accepts ``x = 0`` for any ``b``), or None (by dtype).
        atol: the absolute residual floor, finite and ``≥ 0``.
        method: the solver's name, for messages.

    Returns:
        ``(rtol, atol)`` as floats (``rtol`` None if it was).

    Raises:
        InputError: a value out of range, or both zero (a zero residual is unreachable).
    """
    if rtol is not None:
        rtol = real(rtol, f"{method} rtol", minimum=0.0, below=1.0,
                    meaning="It is the relative residual each solve must reach; None picks "
                    "it by dtype.")  # fmt: skip
        if rtol == 0.0 and atol == 0.0:
            raise InputError(
                f"{method} needs rtol > 0 or atol > 0: a zero residual is unreachable."
            )
    atol = real(atol, f"{method} atol", minimum=0.0, meaning="It is an absolute residual floor.")
    return rtol, atol


@dataclass(frozen=True)
class LinearSolveInfo:
    """Statistics of one solve over a block of right-hand sides.

    Attributes:
        method: the solver.
        iterations: matrix-vector products per right-hand side (slowest one); 0 for a
            direct solve.
        residual: largest final relative residual ``‖b − A x‖ / ‖b‖``, or None where it
            is not measured (a direct solve: its accuracy is set by the condition
            number).
        converged: whether every right-hand side met the tolerance.
        inverse_norm: an estimate of ``‖A⁻¹‖₂`` the method found on the way (GMRES: the
            largest ``1/σ_min`` of its Hessenberg matrices, a lower bound that nears
            ``‖A⁻¹‖₂`` once the Krylov space holds the direction ``A`` shrinks most;
            Neumann: ``1/(1 − ρ)`` from its contraction rate, see
            :func:`deqhess.linear.neumann.series_inverse_norm`), or None.
    """

    method: str
    iterations: int
    residual: float | None
    converged: bool
    inverse_norm: float | None = None

    @classmethod
    def of(
        cls, method: str, products: int, b: Tensor, residual: Tensor, target: Tensor,
        inverse_norm: float | None = None,
    ):  # fmt: skip
        """From per-row residual norms ``‖b − A x‖`` and the per-row bounds they must meet."""
        relative = residual / row_scales(b)
        return cls(
            method=method,
            iterations=products,
            residual=float(relative.max()) if relative.numel() else 0.0,
            converged=bool((residual <= target).all()),
            inverse_norm=inverse_norm,
        )


@dataclass
class LinearSolveStats:
    """A running record of the solves on one linearisation (no per-solve storage).

    Attributes:
        solves: solves done (each over a block of right-hand sides).
        products: matrix-vector products with ``A`` or ``Aᵀ`` over all solves.
        max_iterations: most products any one solve took.
        max_residual: largest relative residual any iterative solve ended with (None
            until one has run).
        last: the latest solve's :class:`LinearSolveInfo`.
        condition_number: estimated condition number of ``I − J`` where the strategy
            gives one (dense LU), else None.
        inverse_norm: the largest estimate of ``‖(I − J)⁻¹‖₂`` an iterative solve found
            (GMRES, Neumann; see :class:`LinearSolveInfo`), else None.
        inverse_norm_method: the method of the solve that found it.
        unconverged: solves that missed their tolerance and were returned anyway (a
            solve that reports misses, see :attr:`IterativeSolve.on_failure`).
    """

    solves: int = 0
    products: int = 0
    max_iterations: int = 0
    max_residual: float | None = None
    last: LinearSolveInfo | None = None
    condition_number: float | None = None
    inverse_norm: float | None = None
    unconverged: int = 0
    inverse_norm_method: str | None = None

    def record(self, info: LinearSolveInfo) -> None:
        """Count one solve in the totals and keep it as the last."""
        self.solves += 1
        self.unconverged += not info.converged
        self.products += info.iterations
        self.max_iterations = max(self.max_iterations, info.iterations)
        if info.residual is not None:
            self.max_residual = max(self.max_residual or 0.0, info.residual)
        self.estimated(info.inverse_norm, info.method)
        self.last = info

    def estimated(self, inverse_norm: float | None, method: str) -> None:
        """Keep ``inverse_norm`` (from ``method``) if it is the largest estimate yet."""
        if inverse_norm is not None and inverse_norm > (self.inverse_norm or 0.0):
            self.inverse_norm, self.inverse_norm_method = inverse_norm, method

    def snapshot(self) -> LinearSolveStats:
        """A copy that later solves do not change."""
        return LinearSolveStats(
            self.solves, self.products, self.max_iterations, self.max_residual, self.last,
            self.condition_number, self.inverse_norm, self.unconverged,
            self.inverse_norm_method,
        )  # fmt: skip


class Solve(abc.ABC):
    """Solves with ``A`` (or, after :meth:`transpose`, ``Aᵀ``) at one fixed point."""

    #: estimated condition number of ``A`` where the method provides one, else None.
    condition_number: float | None = None
    #: estimated ``‖A⁻¹‖`` (how much a residual is amplified into the solution), or None.
    inverse_norm: float | None = None
    #: the error bound's second-order term measured at this solve's fixed point, and the
    #: sample where it was largest (:mod:`deqhess.linear.accuracy`); a factorisation kept
    #: between passes — formed from bitwise the same ``J`` — carries it (None: not yet)
    newton_change: tuple[float, int] | None = None

    @abc.abstractmethod
    def compute(self, rhs: Tensor, x0: Tensor | None = None) -> tuple[Tensor, LinearSolveInfo]:
        """``A⁻¹ rhs`` and its statistics.

        Raises :class:`deqhess.ConvergenceError` rather than return an inexact answer.

        Args:
            rhs: right-hand sides ``[..., S, d]``.
            x0: an optional warm start shaped like ``rhs``.

        Returns:
            ``(x, info)``: the solution, shaped like ``rhs``, and its statistics.
        """

    @abc.abstractmethod
    def transpose(self) -> Solve:
        """The solve with ``Aᵀ``, sharing this one's set-up (factorisation, traces)."""

    def solve(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        """``A⁻¹ rhs`` (see :meth:`compute`)."""
        return self.compute(rhs, x0)[0]

    def solve_transpose(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        """``A⁻ᵀ rhs``."""
        return self.transpose().compute(rhs, x0)[0]


class LinearSolver(abc.ABC):
    """A strategy for solves with ``I − J``; ``init`` does the per-fixed-point set-up."""

    @abc.abstractmethod
    def init(self, operator: ResidualOperator) -> Solve:
        """Set up at one fixed point (factorise, or bind the operator)."""


Method = Callable[
    [Callable[[Tensor], Tensor], Tensor, Tensor | None], tuple[Tensor, LinearSolveInfo]
]


class IterativeSolver(LinearSolver):
    """A matrix-free strategy: an iterative method on products with ``I − J``.

    Products with ``I − J`` (JVPs) or ``(I − J)ᵀ`` (VJPs), to a relative residual
    ``rtol`` (default by dtype) or ``atol``, within ``max_iter`` products per solve.
    Subclasses bind their method to a fixed point in :meth:`method`.
    """

    def __init__(self, rtol: float | None, atol: float, max_iter: int) -> None:
        name = type(self).__name__
        self.rtol, self.atol = iterative_tolerances(rtol, atol, name)
        self.max_iter = integer(max_iter, f"{name} max_iter", minimum=1)

    def init(self, operator: ResidualOperator) -> IterativeSolve:
        """Bind the method to ``operator``'s fixed point (nothing is factorised).

        Args:
            operator: ``I − J`` at the fixed point.

        Returns:
            The solve, to ``rtol`` (by the operator's dtype if None).
        """
        rtol = default_linear_tolerance(operator.dtype) if self.rtol is None else self.rtol
        return IterativeSolve(operator, self.method(operator, rtol), repr(self))

    @abc.abstractmethod
    def method(self, operator: ResidualOperator, rtol: float) -> Method:
        """``(matvec, b, x0) ↦ (x, info)`` at the fixed point of ``operator``."""


class IterativeSolve(Solve):
    """An iterative method applied to ``A`` (``operator.apply``) or, transposed, to ``Aᵀ``.

    Attributes:
        on_failure: ``"raise"`` (default) or ``"report"``: return the iterate that missed
            the tolerance, its ``LinearSolveInfo.converged`` False (a training policy; a
            diverging Neumann series and non-finite products still raise).

    Raises:
        ConvergenceError: a right-hand side did not meet the tolerance; the message
            gives the residual reached and what to try.
    """

    def __init__(
        self,
        operator: ResidualOperator,
        method: Method,
        name: str,
        transposed: bool = False,
        on_failure: str = "raise",
    ) -> None:
        self.operator = operator
        self.method = method
        self.name = name
        self.transposed = transposed
        self.on_failure = on_failure

    def __repr__(self) -> str:
        return self.name + (".transpose()" if self.transposed else "")

    def transpose(self) -> IterativeSolve:
        """The same method applied to the transposed operator.

        Returns:
            The solve with ``Aᵀ`` (or, if this one is transposed, with ``A``).
        """
        return IterativeSolve(
            self.operator, self.method, self.name, not self.transposed, self.on_failure
        )

    def compute(self, rhs: Tensor, x0: Tensor | None = None) -> tuple[Tensor, LinearSolveInfo]:
        """``A⁻¹ rhs`` (or ``A⁻ᵀ rhs``) by the iterative method.

        Args:
            rhs: right-hand sides ``[..., S, d]``.
            x0: an optional warm start shaped like ``rhs``.

        Returns:
            ``(x, info)``: the solution and its statistics.

        Raises:
            ConvergenceError: the Neumann series diverged, or (``on_failure="raise"``) a
                right-hand side missed the tolerance.
            NonFiniteError: the products with ``I − J`` are not finite.
        """
        apply = self.operator.apply_transpose if self.transposed else self.operator.apply
        x, info = self.method(apply, rhs, x0)
        if info.method == NEUMANN_DIVERGING:
            raise ConvergenceError(
                f"{self.name} diverged: its residual grew a million-fold in "
                f"{info.iterations} products. The Neumann series Σ Jᵏ b converges only when "
                "every eigenvalue of J = ∂f/∂h lies inside the unit circle, and at this fixed "
                "point one does not (ρ(J) ≥ 1). Use linear_solver='gmres' or 'dense' (or "
                "NeumannGMRES), which need only I − J invertible.",
                info=info,
            )
        if info.residual is not None and not math.isfinite(info.residual):
            raise NonFiniteError(
                f"{self.name}: products with I − J are not finite, so ∂f/∂h is NaN/inf at the "
                "fixed point (sqrt, abs or division at 0, or overflow there): its "
                "derivatives do not exist; check torch.func.jacrev of f at the fixed point.",
                quantity="products with I − J",
            )
        if not info.converged and self.on_failure != "report":
            system = "(I − J)ᵀ" if self.transposed else "I − J"
            raise ConvergenceError(
                f"{self.name} did not solve {system} x = b: relative residual "
                f"{info.residual:.3e} after {info.iterations} matrix-vector products. Try "
                "a larger max_iter or restart, linear_solver='dense' for small states, or "
                "check the conditioning of I − J (a fixed point close to losing stability).",
                info=info,
            )
        return x, info


def row_norms(t: Tensor) -> Tensor:
    """Euclidean norms over the last dimension (each row an independent system)."""
    return torch.linalg.vector_norm(t, dim=-1)


def row_scales(b: Tensor) -> Tensor:
    """What each row's residual is measured against.

    A row whose right-hand side is zero is held to the accuracy the others can have, not
    to exactly zero (which coupled rows, iterated as one system by Neumann, cannot
    reach).

    Returns:
        ``‖b_row‖`` per row, but at least ``ε`` times the largest row's.
    """
    norms = row_norms(b)
    floor = torch.finfo(b.dtype).eps * norms.amax() if norms.numel() else norms.new_zeros(())
    return torch.maximum(norms, floor).clamp_min(torch.finfo(b.dtype).tiny)


def row_targets(b: Tensor, rtol: float, atol: float) -> Tensor:
    """Per-row residual bounds ``max(atol, rtol · scale)`` (see :func:`row_scales`)."""
    return torch.clamp(rtol * row_scales(b), min=atol)


def warm_start(
    matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None
) -> tuple[Tensor, Tensor, int]:
    """The start of an iteration: ``x0`` where it helps, zero elsewhere.

    A poor guess can only cost the one product that tests it.

    Returns:
        ``(x, r, products)``: ``x0`` on the rows where it lowers the residual below
        ``‖b‖`` and zero elsewhere, the residual ``b − A x``, and the products used (0
        or 1).
    """
    if x0 is None:
        return torch.zeros_like(b), b, 0
    r = b - matvec(x0)
    better = (row_norms(r) < row_norms(b))[..., None]
    return torch.where(better, x0, torch.zeros_like(x0)), torch.where(better, r, b), 1
