"""Restarted GMRES, batched: every row ``[..., d]`` is its own system, solved at once.

``I − J`` is not symmetric, so GMRES (Saad & Schultz 1986) is the Krylov method of
choice. deqhess carries its own because ``scipy.sparse.linalg.gmres`` works on one
NumPy system at a time on the CPU, while here a batch of per-sample systems times K
right-hand sides must be solved together, on θ's device and dtype, with per-row
tolerances. Arnoldi uses classical Gram–Schmidt with one reorthogonalisation (CGS2),
and Givens rotations give each row's residual without forming the iterate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .base import (
    IterativeSolve,
    LinearSolveInfo,
    LinearSolver,
    default_linear_tolerance,
    row_norms,
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
) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``A x = b`` row-wise, ``A`` given by ``matvec`` on ``[..., d]`` blocks.

    Stops when every row has ``‖b − A x‖ ≤ max(atol, rtol ‖b‖)`` or after
    ``max_iter`` products with ``A``. A warm start ``x0`` is kept on the rows where it
    beats zero (see :func:`warm_start`). Returns ``(x, info)``; does not raise.
    """
    tiny = torch.finfo(b.dtype).tiny
    target = torch.clamp(rtol * row_norms(b), min=atol)
    x, r, products = warm_start(matvec, b, x0)
    beta = row_norms(r)
    while bool((beta > target).any()) and products < max_iter:
        active = beta > target
        steps = min(restart, max_iter - products)
        basis = b.new_empty(steps + 1, *b.shape)  # Krylov vectors, filled in order
        basis[0] = r / beta.clamp_min(tiny)[..., None]
        hessenberg = b.new_zeros(*beta.shape, steps + 1, steps)
        cos, sin = b.new_zeros(*beta.shape, steps), b.new_zeros(*beta.shape, steps)
        g = b.new_zeros(*beta.shape, steps + 1)
        g[..., 0] = beta
        size = 0
        for j in range(steps):
            w = matvec(basis[j])
            products += 1
            known = basis[: j + 1]
            coeffs = (known * w).sum(-1)
            w = w - (coeffs[..., None] * known).sum(0)
            again = (known * w).sum(-1)  # reorthogonalise once (CGS2)
            w = w - (again[..., None] * known).sum(0)
            norm = row_norms(w)
            column = [*(coeffs + again).unbind(0), norm]
            for i in range(j):  # earlier rotations
                a, c = column[i], column[i + 1]
                column[i] = cos[..., i] * a + sin[..., i] * c
                column[i + 1] = -sin[..., i] * a + cos[..., i] * c
            radius = torch.hypot(column[j], column[j + 1])
            degenerate = radius <= tiny  # lucky breakdown earlier: keep y_j = 0
            cos[..., j] = torch.where(degenerate, 1.0, column[j] / radius.clamp_min(tiny))
            sin[..., j] = torch.where(degenerate, 0.0, column[j + 1] / radius.clamp_min(tiny))
            column[j] = torch.where(degenerate, 1.0, radius)
            column[j + 1] = torch.zeros_like(radius)
            hessenberg[..., : j + 2, j] = torch.stack(column, dim=-1)
            g[..., j + 1] = -sin[..., j] * g[..., j]
            g[..., j] = cos[..., j] * g[..., j]
            basis[j + 1] = w / norm.clamp_min(tiny)[..., None]
            size = j + 1
            if bool(((g[..., j + 1].abs() <= target) | ~active).all()):
                break
        y = torch.linalg.solve_triangular(
            hessenberg[..., :size, :size], g[..., :size, None], upper=True
        )[..., 0]
        update = (basis[:size] * y.movedim(-1, 0)[..., None]).sum(0)
        x = torch.where(active[..., None], x + update, x)
        r = b - matvec(x)
        products += 1
        beta = row_norms(r)
    return x, LinearSolveInfo.of("GMRES", products, b, beta, target)


class GMRES(LinearSolver):
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
        if restart < 1 or max_iter < 1:
            raise ValueError(
                f"GMRES needs restart >= 1 and max_iter >= 1; got {restart}, {max_iter}."
            )
        self.rtol, self.atol, self.restart, self.max_iter = rtol, atol, restart, max_iter

    def __repr__(self) -> str:
        return f"GMRES(restart={self.restart}, max_iter={self.max_iter})"

    def init(self, operator: ResidualOperator) -> IterativeSolve:
        rtol = default_linear_tolerance(operator.dtype) if self.rtol is None else self.rtol

        def method(matvec, b, x0):
            return gmres(
                matvec, b, x0, rtol=rtol, atol=self.atol, restart=self.restart,
                max_iter=self.max_iter,
            )  # fmt: skip

        return IterativeSolve(operator, method, repr(self))
