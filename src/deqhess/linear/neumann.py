"""Neumann / Richardson iteration ``x ← b + J x`` for contractive maps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import (
    NEUMANN_DIVERGING,
    IterativeSolver,
    LinearSolveInfo,
    Method,
    row_norms,
    row_targets,
    warm_start,
)
from .operator import ResidualOperator

__all__ = ["Neumann", "neumann", "series_inverse_norm"]


def neumann(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float,
    atol: float = 0.0,
    max_iter: int = 500,
) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``(I − J) x = b`` row-wise by ``x ← x + (b − (I − J) x) = b + J x``.

    This sums the Neumann series ``Σ Jᵏ b``; it converges, at rate ``ρ(J)``, exactly
    when the spectral radius ``ρ(J) < 1`` — true at the fixed point of a contraction,
    where ``‖J‖ ≤ c < 1``. A warm start ``x0`` is kept on the rows where it beats zero
    (see :func:`warm_start`). It does not raise.

    Returns:
        ``(x, info)``: the solution, shaped like ``b``, and the solve's statistics
        (``info.method`` marks a series whose residual grew a million-fold: ``ρ(J) ≥ 1``).
    """
    target = row_targets(b, rtol, atol)
    x, r, products = warm_start(matvec, b, x0)
    residual = row_norms(r)
    history = [residual]
    # the largest starting residual: a row whose right-hand side is zero may grow from 0
    ceiling = _DIVERGING * float(residual.max()) if residual.numel() else math.inf
    method = "Neumann"
    while not bool((residual <= target).all()) and products < max_iter:
        if not bool(torch.isfinite(residual).all()):  # J is not finite: no use going on
            break
        x = x + r
        r = b - matvec(x)
        products += 1
        residual = row_norms(r)
        history.append(residual)
        if bool((residual > ceiling).any()):  # the series diverges: ρ(J) ≥ 1
            method = NEUMANN_DIVERGING
            break
    return x, LinearSolveInfo.of(
        method, products, b, residual, target, inverse_norm=series_inverse_norm(history)
    )


def series_inverse_norm(history: list[Tensor]) -> float | None:
    """``‖(I − J)⁻¹‖ ≈ 1/(1 − ρ)``, ``ρ`` the Neumann series' observed contraction rate.

    The series ``Σ Jᵏ b`` shrinks its residual by ``ρ(J)`` per product once the dominant
    eigenvector leads, and sums that direction ``1/(1 − ρ)``-fold: the slowest row's
    geometric mean rate over the second half of the products estimates ``ρ`` (an
    estimate, like GMRES's: exact for a real positive dominant eigenvalue, from below
    while a faster transient still leads, above for a negative one).

    Args:
        history: the per-row residual norms ``[S]`` after each product (the start first).

    Returns:
        The estimate, or None with fewer than two products or no contraction seen.
    """
    steps = len(history) - 1
    if steps < 2:
        return None
    middle = steps // 2
    start, end = history[middle], history[-1]
    moving = (start > 0) & (end > 0)
    if not bool(moving.any()):
        return None
    rate = float(((end[moving] / start[moving]) ** (1.0 / (steps - middle))).max())
    return 1.0 / (1.0 - rate) if 0.0 < rate < 1.0 else None


#: a row whose residual grew this many times over its start: the series diverges
_DIVERGING = 1e6


class Neumann(IterativeSolver):
    """Matrix-free Neumann series for contractive ``f`` (``ρ(∂f/∂h) < 1``).

    Args:
        rtol: relative residual per system; default 1e-12 (float64) / 1e-6 (float32).
        atol: absolute residual floor.
        max_iter: cap on products with ``A`` per solve.
    """

    def __init__(self, rtol: float | None = None, atol: float = 0.0, max_iter: int = 500):
        super().__init__(rtol, atol, max_iter)

    def __repr__(self) -> str:
        return f"Neumann(max_iter={self.max_iter})"

    def method(self, operator: ResidualOperator, rtol: float) -> Method:
        """The Neumann series at ``operator``'s fixed point (rows may be coupled).

        Args:
            operator: ``I − J`` at the fixed point.
            rtol: the relative residual each solve must reach.

        Returns:
            ``(matvec, b, x0) ↦ (x, info)``, :func:`neumann`.
        """

        def run(matvec, b, x0):
            return neumann(matvec, b, x0, rtol=rtol, atol=self.atol, max_iter=self.max_iter)

        return run
