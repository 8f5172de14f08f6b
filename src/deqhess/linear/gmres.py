"""Restarted GMRES, batched: every row ``[..., d]`` is its own system, solved at once.

``I − J`` is not symmetric, so GMRES (Saad & Schultz 1986) is the Krylov method of
choice. deqhess carries its own because ``scipy.sparse.linalg.gmres`` works on one
NumPy system at a time on the CPU, while here a batch of per-sample systems times K
right-hand sides must be solved together, on θ's device and dtype, with per-row
tolerances. Arnoldi uses classical Gram–Schmidt, reorthogonalised where a pass lost
more than ``1 − 1/√2`` of a vector's norm (the Daniel–Gragg–Kaufman–Stewart test:
"twice is enough"), and Givens rotations give each row's residual without forming the
iterate. Convergence is always judged on the recomputed residual ``b − A x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..options import integer
from .base import (
    IterativeSolver,
    LinearSolveInfo,
    Method,
    row_norms,
    row_targets,
    warm_start,
)
from .operator import ResidualOperator

__all__ = ["GMRES", "gmres"]


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float,
    atol: float = 0.0,
    restart: int = 30,
    max_iter: int = 500,
    workspace: dict | None = None,
) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``A x = b`` row-wise, ``A`` given by ``matvec`` on ``[..., d]`` blocks.

    Stops when every row has ``‖b − A x‖ ≤ max(atol, rtol ‖b‖)`` or after
    ``max_iter`` products with ``A``. A warm start ``x0`` is kept on the rows where it
    beats zero (see :func:`warm_start`). It does not raise.

    The rows ``R`` (every leading index) are batched through each step: the Krylov basis
    is ``[R, m + 1, d]``, Gram–Schmidt is two batched matrix products per pass (a second
    pass only when some row needs it), and the Givens rotations are accumulated in one
    ``[R, m + 1, m + 1]`` orthogonal matrix, so a step costs a fixed handful of tensor
    operations whatever its index.

    Args:
        matvec: ``x ↦ A x`` on blocks shaped like ``b``, row by row.
        b: right-hand sides ``[..., d]``, each row its own system.
        x0: an optional warm start shaped like ``b``.
        rtol: relative residual each row must reach.
        atol: absolute residual floor.
        restart: ``m``, the Krylov dimension before a restart.
        max_iter: cap on products with ``A``.
        workspace: a dict kept by the caller across solves; the Krylov basis is taken
            from it and put back, so repeated solves of one shape reuse its memory
            instead of allocating (and faulting in) ``R·(m + 1)·d`` numbers each time.

    Returns:
        ``(x, info)``: the solution, shaped like ``b``, and the solve's statistics
        (``info.converged`` False if a row missed the tolerance within ``max_iter``;
        ``info.inverse_norm`` the estimate of ``‖A⁻¹‖₂`` from the Krylov cycles).
    """
    shape, width = b.shape, b.shape[-1]
    rows = b.numel() // max(width, 1)
    tiny = torch.finfo(b.dtype).tiny
    flat_b = b.reshape(rows, width)
    target = row_targets(flat_b, rtol, atol)
    x, r, products = warm_start(matvec, b, x0)
    x, r = x.reshape(rows, width), r.reshape(rows, width)
    beta = row_norms(r)
    inverse_norm = None
    while bool((beta > target).any()) and products < max_iter:
        active = beta > target
        steps = min(restart, max_iter - products)
        basis = _basis(workspace, flat_b, steps + 1)  # Krylov vectors, filled in order
        basis[:, 0] = r / beta.clamp_min(tiny)[:, None]
        triangle = flat_b.new_zeros(rows, steps, steps)  # the rotated Hessenberg matrix
        # rotations so far, G_{j-1} ⋯ G_0: its first column times β is the rotated rhs
        rotations = torch.eye(steps + 1, dtype=b.dtype, device=b.device).repeat(rows, 1, 1)
        size = 0
        broke = torch.zeros(rows, dtype=torch.bool, device=b.device)
        for j in range(steps):
            w = matvec(basis[:, j].reshape(shape)).reshape(rows, width)
            products += 1
            known = basis[:, : j + 1]  # [R, j + 1, d]
            before = row_norms(w)
            coeffs = torch.bmm(known, w[:, :, None])
            w = w - torch.bmm(known.transpose(1, 2), coeffs)[:, :, 0]
            norm = row_norms(w)
            if bool((norm < _TWICE * before).any()):  # cancellation: reorthogonalise
                again = torch.bmm(known, w[:, :, None])
                w = w - torch.bmm(known.transpose(1, 2), again)[:, :, 0]
                coeffs, norm = coeffs + again, row_norms(w)
            column = torch.cat([coeffs[:, :, 0], norm[:, None]], dim=1)
            rotated = torch.bmm(rotations[:, : j + 2, : j + 2], column[:, :, None])[:, :, 0]
            top, bottom = rotated[:, j], rotated[:, j + 1]
            radius = torch.hypot(top, bottom)
            degenerate = radius <= tiny  # lucky breakdown earlier: keep y_j = 0
            broke |= degenerate
            cos = torch.where(degenerate, 1.0, top / radius.clamp_min(tiny))
            sin = torch.where(degenerate, 0.0, bottom / radius.clamp_min(tiny))
            upper, lower = rotations[:, j].clone(), rotations[:, j + 1].clone()
            rotations[:, j] = cos[:, None] * upper + sin[:, None] * lower
            rotations[:, j + 1] = cos[:, None] * lower - sin[:, None] * upper
            triangle[:, : j + 1, j] = rotated[:, : j + 1]
            triangle[:, j, j] = torch.where(degenerate, 1.0, radius)
            basis[:, j + 1] = w / norm.clamp_min(tiny)[:, None]
            size = j + 1
            estimate = beta * rotations[:, j + 1, 0].abs()  # ‖b − A xⱼ‖ without xⱼ
            if bool(((estimate <= target) | ~active).all()):
                break
        inverse_norm = _inverse_norm_estimate(triangle[:, :size, :size], active & ~broke,
                                              inverse_norm)  # fmt: skip
        rhs = beta[:, None] * rotations[:, :size, 0]
        y = torch.linalg.solve_triangular(triangle[:, :size, :size], rhs[:, :, None], upper=True)[
            :, :, 0
        ]
        update = torch.bmm(basis[:, :size].transpose(1, 2), y[:, :, None])[:, :, 0]
        x = torch.where(active[:, None], x + update, x)
        _release(workspace, basis)
        r = flat_b - matvec(x.reshape(shape)).reshape(rows, width)
        products += 1
        beta = row_norms(r)
    return x.reshape(shape), LinearSolveInfo.of(
        "GMRES", products, flat_b, beta, target, inverse_norm
    )


def _inverse_norm_estimate(triangle: Tensor, rows: Tensor, so_far: float | None) -> float | None:
    """An estimate of ``‖A⁻¹‖₂`` from a GMRES cycle's triangular factor ``R`` ``[R, m, m]``.

    ``R`` is the Arnoldi matrix ``H̄ₘ = V_{m+1}ᵀ A Vₘ`` rotated (Givens rotations are
    orthogonal), so ``σ_min(R) = min ‖A Vₘ y‖ ≥ σ_min(A)``: ``1/σ_min(R) ≤ ‖A⁻¹‖₂``, a
    lower bound — an estimate of how much ``A⁻¹`` amplifies errors, no product needed.

    Returns:
        The larger of ``so_far`` and ``1/σ_min(R)`` over the given rows (``so_far`` when
        no row qualifies).
    """
    rows = rows & torch.isfinite(triangle).all(-1).all(-1)  # NaN products: named elsewhere
    if triangle.shape[-1] == 0 or not bool(rows.any()):
        return so_far
    smallest = torch.linalg.svdvals(triangle[rows].double())[..., -1].min()
    estimate = float("inf") if float(smallest) == 0.0 else 1.0 / float(smallest)
    return estimate if so_far is None else max(so_far, estimate)


#: a Gram–Schmidt pass that keeps less than this share of a vector's norm is repeated.
_TWICE = 2**-0.5


def _basis(workspace: dict | None, b: Tensor, length: int) -> Tensor:
    """An uninitialised ``[R, length, d]`` basis, from ``workspace`` when one fits."""
    key = (b.shape[0], length, b.shape[1], b.dtype, b.device)
    kept = workspace.pop(key, None) if workspace is not None else None
    return kept if kept is not None else b.new_empty(b.shape[0], length, b.shape[1])


def _release(workspace: dict | None, basis: Tensor) -> None:
    if workspace is not None:
        workspace.clear()  # one basis kept: the latest shape
        workspace[(basis.shape[0], basis.shape[1], basis.shape[2], basis.dtype, basis.device)] = (
            basis
        )


class GMRES(IterativeSolver):
    """Matrix-free restarted GMRES with ``I − J`` applied by JVPs (``Aᵀ`` by VJPs).

    Args:
        rtol: relative residual per system; default 1e-12 (float64) / 1e-6 (float32).
        atol: absolute residual floor.
        restart: Krylov dimension before a restart.
        max_iter: cap on products with ``A`` per solve.
    """

    def __init__(
        self, rtol: float | None = None, atol: float = 0.0, restart: int = 30, max_iter: int = 500
    ) -> None:
        super().__init__(rtol, atol, max_iter)
        self.restart = integer(restart, "GMRES restart", minimum=1)

    def __repr__(self) -> str:
        return f"GMRES(restart={self.restart}, max_iter={self.max_iter})"

    def method(self, operator: ResidualOperator, rtol: float) -> Method:
        """Restarted GMRES at ``operator``'s fixed point, each row its own Krylov problem.

        Args:
            operator: ``I − J`` at the fixed point (its rows checked independent).
            rtol: the relative residual each solve must reach.

        Returns:
            ``(matvec, b, x0) ↦ (x, info)``, :func:`gmres` with a Krylov basis reused by
            this fixed point's solves.
        """
        operator.require_independent_rows()  # each row is its own Krylov problem
        workspace: dict = {}  # the Krylov basis, reused by this fixed point's solves

        def run(matvec, b, x0):
            return gmres(
                matvec, b, x0, rtol=rtol, atol=self.atol, restart=self.restart,
                max_iter=self.max_iter, workspace=workspace,
            )  # fmt: skip

        return run
