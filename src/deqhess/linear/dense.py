"""Dense LU of ``A = I − J``, factorised once and reused for ``A`` and ``Aᵀ`` solves."""

from __future__ import annotations

import copy

import numpy as np
import scipy.linalg.lapack as lapack
import torch
from torch import Tensor

from ..errors import SingularSystemError
from ..options import real
from .base import LinearSolveInfo, LinearSolver, Solve
from .operator import ResidualOperator

__all__ = ["Dense", "DenseLU", "default_max_condition"]


def default_max_condition(dtype: torch.dtype) -> float:
    """``1 / (10 ε)``: beyond this condition number a solve keeps no correct digit."""
    return 1.0 / (10.0 * torch.finfo(dtype).eps)


class DenseLU(Solve):
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

    #: the solve is with ``Aᵀ`` (a view made by :meth:`transpose`).
    transposed = False

    def compute(self, rhs: Tensor, x0: Tensor | None = None) -> tuple[Tensor, LinearSolveInfo]:
        """``A⁻¹ rhs`` (``A⁻ᵀ rhs`` when transposed) for ``rhs`` ``[..., S, d]``; a direct
        solve, so ``x0`` is not needed."""
        lead = rhs.shape[:-2]
        columns = rhs.reshape(-1, *rhs.shape[-2:]).permute(1, 2, 0)  # [S, d, K]
        out = torch.linalg.lu_solve(self.lu, self.pivots, columns, adjoint=self.transposed)
        return out.permute(2, 0, 1).reshape(*lead, *rhs.shape[-2:]), _DIRECT

    def transpose(self) -> DenseLU:
        """The solve with ``Aᵀ`` on the same LU factors."""
        view = copy.copy(self)
        view.transposed = not self.transposed
        return view


_DIRECT = LinearSolveInfo(method="LU", iterations=0, residual=None, converged=True)


class Dense(LinearSolver):
    """Dense LU of each ``d × d`` block of ``I − J``, factorised once per fixed point.

    Costs ``d`` VJPs and ``S·d³/3`` flops once; each later solve ``S·d²`` per
    right-hand side. Best while ``d`` is at most a few thousand.

    Args:
        max_condition: see :class:`DenseLU`.
        chunk_size: VJPs vmapped at once when forming ``J``.
    """

    def __init__(self, max_condition: float | None = None, chunk_size: int | None = None):
        if max_condition is not None:
            max_condition = real(
                max_condition,
                "max_condition",
                minimum=1.0,
                allow_inf=True,
                meaning="It bounds the condition number of I − J (always >= 1); None picks "
                "1/(10ε) by dtype, inf turns the check off.",
            )
        self.max_condition = max_condition
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return "Dense()"

    def init(self, operator: ResidualOperator) -> DenseLU:
        return DenseLU(operator.jacobian_blocks(self.chunk_size), self.max_condition)


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
