"""What damped inverse products are for: Newton steps and influence scores.

Each rests on one :func:`~deqhess.curvature.inverse.solve_damped` solve and raises its
errors. A Newton step with an indefinite ``H`` may point uphill; damping with
``δ > −λ_min`` makes it a descent direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from .base import SymmetricOperator, checked_operator
from .inverse import InverseResult, solve_damped

__all__ = ["InfluenceResult", "influence", "newton_step"]


def newton_step(
    op: SymmetricOperator, gradient: Tensor, damping: float | Tensor = 0.0, **options
) -> InverseResult:
    """The (damped) Newton step ``−(H + δI)⁻¹ ∇L``.

    Its errors are :func:`solve_damped`'s.

    Args:
        op: the symmetric ``P × P`` operator ``H``.
        gradient: ``∇L``, a flat ``[P]`` tensor.
        damping: ``δ``: a real number, or a 0-dim tensor (e.g. ``1.0 - lowest`` with
            ``lowest`` an eigenvalue from :func:`extreme_eigenpairs`).
        **options: :func:`solve_damped`'s (``method``, ``tol``, ``max_iter``,
            ``require_convergence``…).

    Returns:
        The solve, whose ``solution`` is the step.
    """
    if not isinstance(gradient, Tensor):  # the checks and their message are solve_damped's
        return solve_damped(op, gradient, damping, **options)
    return solve_damped(op, -gradient, damping, **options)


@dataclass(frozen=True)
class InfluenceResult:
    """Influence of training points on a test loss (Koh & Liang 2017).

    Attributes:
        scores: ``[N]`` ``−∇L_trainᵢᵀ (H + δI)⁻¹ ∇L_test``: the first-order change of the
            test loss when training point i is up-weighted by ε, divided by ε.
        inverse: the solve ``(H + δI)⁻¹ ∇L_test`` it rests on.
    """

    scores: Tensor
    inverse: InverseResult


def influence(
    op: SymmetricOperator,
    test_gradient: Tensor,
    train_gradients: Tensor,
    damping: float | Tensor = 0.0,
    **options,
) -> InfluenceResult:
    """Influence scores of ``N`` training gradients ``[N, P]`` on one test gradient ``[P]``.

    The scores rest on one solve, which raises :class:`deqhess.AnalysisConvergenceError`
    when it ends short of ``tol`` (scores from an unconverged solve only with
    ``require_convergence=False``; check ``result.inverse.converged``).

    Args:
        op: the symmetric ``P × P`` operator ``H``.
        test_gradient: ``∇L_test`` ``[P]``.
        train_gradients: ``∇L_trainᵢ`` as rows ``[N, P]``.
        damping: ``δ``: a real number, or a 0-dim tensor (e.g. ``1.0 - lowest`` with
            ``lowest`` an eigenvalue from :func:`extreme_eigenpairs`).
        **options: :func:`solve_damped`'s.

    Returns:
        The scores ``[N]`` and the solve they rest on.

    Raises:
        InputError: ``train_gradients`` is not an ``[N, P]`` tensor of the operator's
            dtype (refused before the solve); and :func:`solve_damped`'s errors.
    """  # noqa: DOC502 (solve_damped's are raised by it)
    _check_rows(train_gradients, checked_operator(op, "influence"), op.dtype)
    inverse = solve_damped(op, test_gradient, damping, **options)
    return InfluenceResult(scores=-(train_gradients @ inverse.solution), inverse=inverse)


def _check_rows(gradients: object, size: int, dtype: torch.dtype) -> None:
    """Refuse training gradients that are not ``N`` rows of ``P`` numbers in ``dtype``.

    Raises:
        InputError: not a 2-dim tensor with ``P`` columns (a ``[P, N]`` one is named as
            transposed), or another dtype than the operator's.
    """
    if not isinstance(gradients, Tensor):
        raise InputError(
            f"train_gradients must be an [N, P] = [N, {size}] tensor, one flat gradient per "
            f"row; got {type(gradients).__name__}. Stack them: torch.stack([g1, g2, ...])."
        )
    if gradients.ndim != 2 or gradients.shape[1] != size:
        transposed = gradients.ndim == 2 and gradients.shape[0] == size
        raise InputError(
            f"train_gradients must be [N, P] = [N, {size}], one flat gradient per row; got "
            f"{tuple(gradients.shape)}"
            + (
                ": it looks transposed ([P, N]); pass train_gradients.T."
                if transposed
                else ". Stack the flat gradients as rows: torch.stack([g1, g2, ...])."
            )
        )
    if gradients.dtype != dtype:
        raise InputError(
            f"train_gradients has dtype {gradients.dtype} but the operator is {dtype}; "
            f"convert them with .to({dtype})."
        )
