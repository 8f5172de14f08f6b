"""Dense LU of ``A = I − J``, factorised once and reused for ``A`` and ``Aᵀ`` solves."""

from __future__ import annotations

import copy
import math

import numpy as np
import scipy.linalg.lapack as lapack
import torch
from torch import Tensor

from ..errors import NonFiniteError, SingularSystemError
from ..options import real
from .base import LinearSolveInfo, LinearSolver, Solve
from .operator import ResidualOperator

__all__ = [
    "Dense",
    "DenseLU",
    "default_max_condition",
    "diagonal_block_width",
    "diagonal_blocks",
    "lu_factor_blocks",
]

#: Widest block factorised in one batched ``lu_factor_ex`` call on the CPU; wider blocks
#: are factorised one at a time (see :func:`lu_factor_blocks`).
BATCHED_LU_MAX_WIDTH = 64


def default_max_condition(dtype: torch.dtype) -> float:
    """``1 / (10 ε)``: beyond this condition number a solve keeps no correct digit."""
    return 1.0 / (10.0 * torch.finfo(dtype).eps)


def lu_factor_blocks(system: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.lu_factor_ex`` of ``[S, d, d]`` blocks, safe from an MKL hang.

    Why: with torch 2.13's MKL (2024.2), once ``torch.set_num_threads(n)`` has been called
    with ``n ≥ 2``, a *batched* LU of CPU blocks wider than about 150 prints ``Intel
    oneMKL ERROR: Parameter 6 was incorrect on entry to DLASWP`` and never returns (also
    ``solve``, ``inv`` and ``lu`` of such batches). One block per call does not hang, so on
    the CPU blocks wider than :data:`BATCHED_LU_MAX_WIDTH` (a margin below the observed
    151) are factorised one at a time. That costs speed where the batched call would
    not have hung — whether ``set_num_threads`` was called cannot be queried: 64 blocks
    of 256 took 86 ms instead of 58 ms with one thread, 290 instead of 72 ms with two on
    a busy 2-core machine (forming ``J`` by ``d`` VJPs costs about as much). Changing the
    thread count around the call is no guard: restoring it with ``set_num_threads`` is
    exactly what arms the hang.

    The per-block factors are stacked in LAPACK's column-major layout, as the batched
    call returns them: stacked row-major, every later ``lu_solve`` copied the whole LU
    back to column-major first (64 blocks of 256: 24 ms per one-column solve instead of 2).

    Returns:
        ``(lu, pivots, info)`` exactly as ``lu_factor_ex`` returns them.
    """
    samples, width = system.shape[0], system.shape[-1]
    if system.device.type != "cpu" or samples < 2 or width <= BATCHED_LU_MAX_WIDTH:
        return torch.linalg.lu_factor_ex(system)
    factors = [torch.linalg.lu_factor_ex(block) for block in system]
    lu = torch.stack([f[0].mT for f in factors]).mT  # column-major blocks
    return lu, torch.stack([f[1] for f in factors]), torch.stack([f[2] for f in factors])


class DenseLU(Solve):
    """LU factorisation of ``A = I − J`` for block-diagonal ``J``.

    One coupled system (``S = 1``) whose ``J`` turns out to be block-diagonal — exactly
    zero outside equal diagonal blocks, as for independent samples declared with
    ``batch_dim=None`` — is factorised block by block: the same ``A``, its zeros skipped
    (``N/b`` blocks of ``b``: ``(N/b)²`` times fewer flops per solve). The zeros are
    read from the ``J`` just formed, so this is exact for the matrix solved with.

    Args:
        jacobian: ``[S, d, d]`` blocks of ``J = ∂f/∂h`` at the fixed point.
        max_condition: largest acceptable 1-norm condition number of a block (of the
            whole system when ``S = 1``); default :func:`default_max_condition`.

    Attributes:
        condition_number: largest estimated 1-norm condition number over the ``S``
            systems (LAPACK ``gecon``), a bound-level indicator of how many digits the
            adjoint, sensitivity and Hessian can lose (about ``log10`` of it).

    Raises:
        NonFiniteError: ``J`` has non-finite entries (``f`` is not differentiable at the
            fixed point).
        SingularSystemError: a block of ``A`` is singular, or its condition
            number is not finite or exceeds ``max_condition``.
    """

    def __init__(self, jacobian: Tensor, max_condition: float | None = None) -> None:
        samples, width, _ = jacobian.shape
        self.split = samples == 1 and diagonal_block_width(jacobian[0]) < width
        if self.split:  # one system, solved as its diagonal blocks
            jacobian = diagonal_blocks(jacobian[0], diagonal_block_width(jacobian[0]))
            width = jacobian.shape[-1]
        eye = torch.eye(width, dtype=jacobian.dtype, device=jacobian.device)
        system = eye - jacobian
        self.lu, self.pivots, info = lu_factor_blocks(system)
        limit = default_max_condition(jacobian.dtype) if max_condition is None else max_condition
        # a non-finite J ends in one of the two checks below (its 1-norm is not finite):
        # only then is J scanned, so the common case pays nothing for the guard
        if bool((info > 0).any()):
            _check_finite_jacobian(jacobian)
            block = int(torch.nonzero(info > 0)[0, 0])
            raise SingularSystemError(
                f"I − ∂f/∂h is exactly singular at the fixed point (sample block {block}): "
                "the fixed point is not isolated, so its derivatives do not exist. Check that "
                "f is a contraction in h there (the spectral radius of ∂f/∂h must stay "
                "below 1), e.g. by rescaling the recurrent weights."
            )
        self.condition_number, self.inverse_norm = _condition_estimate(
            system, self.lu, one_system=self.split
        )
        if math.isnan(self.condition_number):
            _check_finite_jacobian(jacobian)
            raise SingularSystemError(
                "the condition number of I − ∂f/∂h at the fixed point is NaN (LAPACK gecon "
                "on its LU), so no derivative computed from it can be trusted: the LU holds "
                "overflowed or non-finite values. Check that f is differentiable with "
                "moderate derivatives at the fixed point, or use float64.",
                condition_number=self.condition_number,
            )
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
        """``A⁻¹ rhs`` (``A⁻ᵀ rhs`` when transposed) by the LU factors.

        Args:
            rhs: right-hand sides ``[..., S, d]``.
            x0: ignored: a direct solve needs no warm start.

        Returns:
            ``(x, info)``: the solution, shaped like ``rhs``, and the statistics of a
            direct solve (no iterations).
        """
        blocks = self.lu.shape[:-1]  # the systems solved: [S, d], or the split one's blocks
        columns = rhs.reshape(-1, *blocks).permute(1, 2, 0)  # [S, d, K]
        out = torch.linalg.lu_solve(self.lu, self.pivots, columns, adjoint=self.transposed)
        return out.permute(2, 0, 1).reshape(rhs.shape), _DIRECT

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
        """Form ``J``'s blocks by ``d`` VJPs and factorise ``I − J``.

        Args:
            operator: ``I − J`` at the fixed point.

        Returns:
            The factorised solve (refused if singular or too ill-conditioned); where the
            operator has a :class:`~deqhess.linear.kept.FactorSlot` holding factors formed
            from bitwise the same blocks, those.
        """
        blocks = operator.jacobian_blocks(self.chunk_size)
        slot = operator.kept_factors
        if slot is None:
            return DenseLU(blocks, self.max_condition)
        return slot.factors(
            blocks, (type(self), self.max_condition), lambda: DenseLU(blocks, self.max_condition)
        )


def _check_finite_jacobian(jacobian: Tensor) -> None:
    """Raise :class:`NonFiniteError` if ``J`` (``[S, d, d]``) has NaN or inf entries."""
    finite = torch.isfinite(jacobian)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    block = int(torch.nonzero(~finite.reshape(finite.shape[0], -1).all(1))[0, 0])
    raise NonFiniteError(
        f"∂f/∂h at the fixed point has {bad} non-finite (NaN or inf) entries of "
        f"{jacobian.numel()} (first in sample block {block}): f is not differentiable "
        "there — e.g. sqrt(h²) at h = 0 gives 0/0 — so I − ∂f/∂h and every derivative "
        "through it are undefined. Make f differentiable at its fixed point (e.g. "
        "sqrt(h² + ε)).",
        quantity="∂f/∂h",
    )


def _condition_estimate(
    system: Tensor, lu: Tensor, one_system: bool = False
) -> tuple[float, float]:
    """The 1-norm condition number of the blocks, estimated from their LU (O(d²) each).

    With ``one_system`` the blocks are the diagonal of one block-diagonal matrix, whose
    1-norm condition is ``max ‖A_k‖₁ · max ‖A_k⁻¹‖₁`` (at least the largest block's).
    NaN when a block's norm overflows or ``gecon`` returns NaN (a NaN or overflowed LU):
    it must not vanish in the maximum, as ``max(0.0, nan)`` would make it.

    Returns:
        ``(condition, inverse_norm)``: the largest condition estimate over the blocks
        (of the one system with ``one_system``) and the largest ``‖A_k⁻¹‖₁``.
    """
    gecon = lapack.dgecon if system.dtype == torch.float64 else lapack.sgecon
    norms = torch.linalg.matrix_norm(system, ord=1).cpu().numpy()
    factors = lu.detach().cpu().numpy()
    worst, largest_norm, largest_inverse = 0.0, 0.0, 0.0
    for block, anorm in zip(factors, norms, strict=True):
        rcond, _ = gecon(np.asfortranarray(block), float(anorm), norm="1")
        estimate = float("inf") if rcond == 0 else 1.0 / float(rcond)
        if math.isnan(estimate) or not math.isfinite(float(anorm)):
            return float("nan"), float("nan")
        worst = max(worst, estimate)
        largest_norm = max(largest_norm, float(anorm))
        largest_inverse = max(largest_inverse, estimate / float(anorm) if anorm > 0 else math.inf)
    return (largest_norm * largest_inverse if one_system else worst), largest_inverse


def diagonal_block_width(matrix: Tensor) -> int:
    """The width of the narrowest equal diagonal blocks outside which ``matrix`` is zero.

    The matrix may be split after row ``i`` when no row up to ``i`` has an entry right of
    column ``i`` and no later row has one left of column ``i + 1``; NaN and inf count as
    entries. ``b`` is the smallest divisor of ``N`` at all of whose multiples it may be
    split. One pass over the matrix.

    Returns:
        The narrowest ``b`` such that ``matrix`` ``[N, N]`` is zero outside ``N/b``
        diagonal blocks of ``b × b`` (``N`` itself when there are no such blocks).
    """
    n = matrix.shape[0]
    index = torch.arange(n, device=matrix.device)
    entries = matrix != 0
    last = torch.where(entries, index, -1).amax(dim=1)  # rightmost entry of each row
    first = torch.where(entries, index, n).amin(dim=1)  # leftmost entry of each row
    reach = torch.cummax(last, dim=0).values[:-1]  # rightmost entry of rows ≤ i
    after = torch.flip(torch.cummin(torch.flip(first, (0,)), dim=0).values, (0,))[1:]
    splits = ((reach <= index[:-1]) & (after > index[:-1])).cpu()  # split after row i
    for width in range(1, n):
        if n % width == 0 and bool(splits[width - 1 :: width].all()):
            return width
    return n


def diagonal_blocks(matrix: Tensor, width: int) -> Tensor:
    """The ``N/width`` diagonal blocks of ``matrix`` ``[N, N]`` as ``[N/width, width, width]``."""
    count = matrix.shape[0] // width
    tiles = matrix.reshape(count, width, count, width)
    return tiles.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
