"""The contract of a linear solver for ``A = I − J`` and ``Aᵀ``, and the shared pieces.

A :class:`LinearSolver` is a strategy chosen by the user (``Dense()``, ``GMRES()``,
``Neumann()``); ``prepare(operator)`` does the one-time set-up at a fixed point (an LU
for the dense solver) and returns a :class:`Solve` whose ``solve`` and
``solve_transpose`` are reused for the adjoint, the sensitivity and every HVP.
Right-hand sides are ``[..., S, d]``: any leading dims are independent directions.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConvergenceError
from .operator import ResidualOperator

__all__ = [
    "IterativeSolve",
    "LinearSolveInfo",
    "LinearSolver",
    "Solve",
    "default_linear_tolerance",
]

_DEFAULT_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def default_linear_tolerance(dtype: torch.dtype) -> float:
    """Relative residual for iterative solves: 1e-12 in float64, 1e-6 in float32."""
    return _DEFAULT_RTOL.get(dtype, 1e-6)


@dataclass(frozen=True)
class LinearSolveInfo:
    """Statistics of one iterative solve over a block of right-hand sides.

    Attributes:
        method: the solver.
        iterations: matrix-vector products per right-hand side (slowest one).
        residual: largest final relative residual ``‖b − A x‖ / ‖b‖``.
        converged: whether every right-hand side met the tolerance.
    """

    method: str
    iterations: int
    residual: float
    converged: bool

    @classmethod
    def of(cls, method: str, products: int, b: Tensor, residual: Tensor, target: Tensor):
        """From per-row residual norms ``‖b − A x‖`` and the per-row bounds they must meet."""
        relative = residual / torch.clamp(row_norms(b), min=torch.finfo(b.dtype).tiny)
        return cls(
            method=method,
            iterations=products,
            residual=float(relative.max()) if relative.numel() else 0.0,
            converged=bool((residual <= target).all()),
        )


class Solve(abc.ABC):
    """Solves with ``A`` and ``Aᵀ`` at one fixed point."""

    #: estimated condition number of ``A`` where the method provides one, else None.
    condition_number: float | None = None

    @abc.abstractmethod
    def solve(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        """``A⁻¹ rhs`` for ``rhs`` ``[..., S, d]``; ``x0`` is an optional warm start."""

    @abc.abstractmethod
    def solve_transpose(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        """``A⁻ᵀ rhs`` for ``rhs`` ``[..., S, d]``."""


class LinearSolver(abc.ABC):
    """A strategy for solves with ``I − J``; ``prepare`` does the per-fixed-point set-up."""

    @abc.abstractmethod
    def prepare(self, operator: ResidualOperator) -> Solve:
        """Set up at one fixed point (factorise, or bind the operator)."""


Method = Callable[
    [Callable[[Tensor], Tensor], Tensor, Tensor | None], tuple[Tensor, LinearSolveInfo]
]


class IterativeSolve(Solve):
    """An iterative method applied to ``A`` (``matvec``) or ``Aᵀ`` (``rmatvec``).

    Raises:
        ConvergenceError: a right-hand side did not meet the tolerance; the message
            gives the residual reached and what to try.
    """

    def __init__(self, operator: ResidualOperator, method: Method, name: str) -> None:
        self.operator = operator
        self.method = method
        self.name = name

    def solve_with_info(
        self, rhs: Tensor, x0: Tensor | None = None, transpose: bool = False
    ) -> tuple[Tensor, LinearSolveInfo]:
        """The solution and its statistics (raises if not converged)."""
        apply = self.operator.rmatvec if transpose else self.operator.matvec
        x, info = self.method(apply, rhs, x0)
        if not info.converged:
            system = "(I − J)ᵀ" if transpose else "I − J"
            raise ConvergenceError(
                f"{self.name} did not solve {system} x = b: relative residual "
                f"{info.residual:.3e} after {info.iterations} matrix-vector products. Try "
                "a larger max_iter or restart, linear_solver='dense' for small states, or "
                "check the conditioning of I − J (a fixed point close to losing stability).",
                info=info,
            )
        return x, info

    def solve(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        return self.solve_with_info(rhs, x0)[0]

    def solve_transpose(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        return self.solve_with_info(rhs, x0, transpose=True)[0]


def row_norms(t: Tensor) -> Tensor:
    """Euclidean norms over the last dimension (each row an independent system)."""
    return torch.linalg.vector_norm(t, dim=-1)
