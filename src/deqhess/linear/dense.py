"""Dense LU of ``A = I − J``, factorised once and reused for ``A`` and ``Aᵀ`` solves."""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack as lapack
import torch
from torch import Tensor

from ..errors import SingularSystemError

__all__ = ["DenseLU", "default_max_condition"]


def default_max_condition(dtype: torch.dtype) -> float:
    """``1 / (10 ε)``: beyond this condition number a solve keeps no correct digit."""
    return 1.0 / (10.0 * torch.finfo(dtype).eps)


class DenseLU:
    """LU factorisation of ``A = I − J`` for block-diagonal ``J``.

    Args:
        jacobian: ``[S, d, d]`` blocks of ``J = ∂f/∂h`` at the fixed point.
        max_condition: largest acceptable 1-norm condition number of a block;
            default :func:`default_max_condition`.

    Attributes:
        condition_number: largest estimated 1-norm condition number over blocks
            (LAPACK ``gecon``), a bound-level indicator of how many digits the
            adjoint, sensitivity and Hessian can lose (about ``log10`` of it).

    Raises:
        SingularSystemError: a block of ``A`` is singular or its condition number
            exceeds ``max_condition``.
    """

    def __init__(self, jacobian: Tensor, max_condition: float | None = None) -> None:
        _samples, width, _ = jacobian.shape
        eye = torch.eye(width, dtype=jacobian.dtype, device=jacobian.device)
        system = eye - jacobian
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(system)
        limit = default_max_condition(jacobian.dtype) if max_condition is None else max_condition
        if bool((info > 0).any()):
            block = int(torch.nonzero(info > 0)[0, 0])
            raise SingularSystemError(
                f"I − ∂f/∂h is exactly singular at the fixed point (sample block {block}): "
                "the fixed point is not isolated, so its derivatives do not exist. Check that "
                "f is a contraction in h there (the spectral radius of ∂f/∂h must stay "
                "below 1), e.g. by rescaling the recurrent weights."
            )
        self.condition_number = _condition_estimate(system, self.lu)
        if not self.condition_number <= limit:
            raise SingularSystemError(
                f"I − ∂f/∂h is too ill-conditioned to trust: estimated condition number "
                f"{self.condition_number:.3e} exceeds {limit:.3e} for {jacobian.dtype}, so "
                "solves with it keep no reliable digit. Use float64, or make f more "
                "contractive in h (spectral radius of ∂f/∂h further below 1).",
                condition_number=self.condition_number,
            )

    def solve(self, rhs: Tensor) -> Tensor:
        """``A⁻¹ rhs`` for ``rhs`` ``[S, d, K]``."""
        return torch.linalg.lu_solve(self.lu, self.pivots, rhs)

    def solve_transpose(self, rhs: Tensor) -> Tensor:
        """``A⁻ᵀ rhs`` for ``rhs`` ``[S, d, K]``."""
        return torch.linalg.lu_solve(self.lu, self.pivots, rhs, adjoint=True)


def _condition_estimate(system: Tensor, lu: Tensor) -> float:
    """Largest 1-norm condition estimate over blocks, from the LU (O(d²) per block)."""
    gecon = lapack.dgecon if system.dtype == torch.float64 else lapack.sgecon
    norms = torch.linalg.matrix_norm(system, ord=1).cpu().numpy()
    factors = lu.detach().cpu().numpy()
    worst = 0.0
    for block, anorm in zip(factors, norms, strict=True):
        rcond, _ = gecon(np.asfortranarray(block), float(anorm), norm="1")
        worst = max(worst, float("inf") if rcond == 0 else 1.0 / float(rcond))
    return worst
