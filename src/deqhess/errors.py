"""The named errors of deqhess.

Errors are part of the API: each says what went wrong, the figures that show it,
and what to try.
"""

from __future__ import annotations

__all__ = [
    "AccuracyWarning",
    "AnalysisConvergenceError",
    "ConvergenceError",
    "DenseMemoryError",
    "NonFiniteError",
    "SingularSystemError",
    "StaleEquilibriumError",
    "UnsupportedDerivativeError",
]


class ConvergenceError(RuntimeError):
    """A fixed-point or linear solver did not reach its tolerance.

    Attributes:
        info: the solver statistics at the point of failure (a
            :class:`deqhess.solvers.SolveInfo` or a linear-solve record), so a
            caller can inspect the residual history.
    """

    def __init__(self, message: str, info: object | None = None) -> None:
        super().__init__(message)
        self.info = info


class SingularSystemError(RuntimeError):
    """``I − J`` at the fixed point is singular or too ill-conditioned to trust.

    Attributes:
        condition_number: the estimated condition number (``inf`` if exactly
            singular).
    """

    def __init__(self, message: str, condition_number: float = float("inf")) -> None:
        super().__init__(message)
        self.condition_number = condition_number


class StaleEquilibriumError(RuntimeError):
    """θ or a tensor of x was modified in place after the equilibrium was solved."""


class NonFiniteError(RuntimeError):
    """A quantity deqhess computed at the fixed point has NaN or inf entries.

    The inputs were finite, so the loss or ``f`` is not differentiable (or overflows)
    at the fixed point; the message names the quantity and what to check.

    Attributes:
        quantity: what went non-finite (e.g. ``"the adjoint λ"``).
    """

    def __init__(self, message: str, quantity: str) -> None:
        super().__init__(message)
        self.quantity = quantity


class DenseMemoryError(MemoryError):
    """A dense result would not fit in the memory available; refused before allocating.

    Attributes:
        required: estimated bytes the request would allocate.
        available: bytes available (or the limit set with
            :func:`deqhess.memory_limit`).
    """

    def __init__(self, message: str, required: float, available: float) -> None:
        super().__init__(message)
        self.required = required
        self.available = available


class UnsupportedDerivativeError(NotImplementedError):
    """A derivative mode that cannot be computed exactly through the DEQ layer.

    The message names the mode, why, and the supported way to get the same derivative.
    """


class AnalysisConvergenceError(ConvergenceError):
    """An iterative analysis (:mod:`deqhess.curvature`) stopped short of its tolerance:
    its cap on products was reached, or its system could not be solved as asked.

    Attributes:
        result: what it reached, as the analysis' own result type (an
            :class:`deqhess.curvature.EigenResult` of the Ritz pairs so far, an
            :class:`deqhess.curvature.InverseResult` with its status); also ``info``.
        num_hvps: products used.
        max_hvps: the cap on products it ran under.
    """

    def __init__(self, message: str, result: object, num_hvps: int, max_hvps: int) -> None:
        super().__init__(message, info=result)
        self.result = result
        self.num_hvps = num_hvps
        self.max_hvps = max_hvps


class AccuracyWarning(UserWarning):
    """A derivative is computed, but its own error bound is above what its dtype allows
    to go unremarked (1e-6 relative in float64, 1e-3 in float32).

    The message gives the bound and where it comes from (``‖(I − J)⁻¹‖`` times the
    forward tolerance, or a linear solve's residual); it is also
    ``EquilibriumInfo.error_bound``. Past ``max_error_bound`` (default 0.1) the solve
    is refused with :class:`SingularSystemError` instead.
    """
