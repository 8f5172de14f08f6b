"""Neumann while it contracts fast, then GMRES from where it got to.

One Neumann step ``x ← x + (b − A x)`` costs one product with ``A = I − J`` and a vector
update; its residual falls by about ``ρ(J)`` per product. GMRES never needs more products
(it minimises the residual over the same Krylov space the Neumann iterates lie in) but
adds Gram–Schmidt and bookkeeping to every product, which dominates when products are
cheap and ``ρ(J)`` is small — the usual DEQ backward. So this strategy runs Neumann and
hands its current iterate to GMRES as a warm start as soon as Neumann's observed rate is
slow (or it diverges: ``ρ(J) ≥ 1``), so no problem pays Neumann's slow tail.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InputError
from ..options import integer
from .base import (
    IterativeSolver,
    LinearSolveInfo,
    Method,
    row_norms,
    row_targets,
    warm_start,
)
from .gmres import gmres
from .neumann import series_inverse_norm
from .operator import ResidualOperator

__all__ = ["NeumannGMRES", "neumann_then_gmres"]


def neumann_then_gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float,
    atol: float = 0.0,
    rate: float = 0.8,
    window: int = 3,
    restart: int = 30,
    max_iter: int = 500,
    before_gmres: Callable[[], None] | None = None,
) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``A x = b`` row-wise: Neumann steps, then GMRES if they are slow.

    Neumann continues while the worst unconverged row's residual falls by at least
    ``rate`` per product, measured over the last ``window`` products; otherwise the
    iterate so far warm-starts :func:`deqhess.linear.gmres` with the remaining budget.
    Stops when every row has ``‖b − A x‖ ≤ max(atol, rtol ‖b‖)`` or after ``max_iter``
    products. ``before_gmres`` is called at the switch (GMRES solves each row as its own
    system, which holds only for independent rows; Neumann iterates the full system).
    It does not raise (``before_gmres`` may).

    Returns:
        ``(x, info)``: the solution rows, shaped like ``b``, and the solve's statistics
        (``info.converged`` False if a row missed the tolerance within ``max_iter``).
    """
    target = row_targets(b, rtol, atol)
    x, r, products = warm_start(matvec, b, x0)
    residual = row_norms(r)
    history = [residual]
    while products < max_iter:
        unconverged = residual > target
        if not bool(unconverged.any()) or not bool(torch.isfinite(residual).all()):
            return x, LinearSolveInfo.of(
                "Neumann", products, b, residual, target, series_inverse_norm(history)
            )
        if len(history) > window:
            before = history[-1 - window]
            ratio = torch.where(unconverged, residual / before.clamp_min(1e-300), 0.0)
            if float(ratio.max()) > rate**window:  # slow, or diverging
                break
        x = x + r
        r = b - matvec(x)
        products += 1
        residual = row_norms(r)
        history.append(residual)
    if products >= max_iter:
        return x, LinearSolveInfo.of(
            "Neumann", products, b, residual, target, series_inverse_norm(history)
        )
    if before_gmres is not None:
        before_gmres()
    x, info = gmres(
        matvec, b, x, rtol=rtol, atol=atol, restart=restart, max_iter=max_iter - products
    )
    return x, LinearSolveInfo(
        method="Neumann→GMRES",
        iterations=products + info.iterations,
        residual=info.residual,
        converged=info.converged,
        inverse_norm=info.inverse_norm,
    )


class NeumannGMRES(IterativeSolver):
    """Neumann iteration while ``ρ(J)`` looks small, restarted GMRES once it does not.

    The default for a layer's backward (one or two solves per fixed point): as cheap as
    the plain fixed-point iteration of other DEQ libraries on easy problems, and GMRES's
    convergence — warm-started from the Neumann iterate — on hard or non-contractive ones.

    Args:
        rtol: relative residual per system; default 1e-12 (float64) / 1e-6 (float32).
        atol: absolute residual floor.
        rate: the slowest Neumann rate per product kept (switch above it).
        window: products over which the rate is measured.
        restart: GMRES's Krylov dimension before a restart.
        max_iter: cap on products with ``A`` per solve, both phases together.
    """

    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        rate: float = 0.8,
        window: int = 3,
        restart: int = 30,
        max_iter: int = 500,
    ) -> None:
        if not 0.0 < rate < 1.0:
            raise InputError(f"NeumannGMRES needs 0 < rate < 1; got rate={rate!r}.")
        super().__init__(rtol, atol, max_iter)
        self.rate = float(rate)
        self.window = integer(window, "NeumannGMRES window", minimum=1)
        self.restart = integer(restart, "NeumannGMRES restart", minimum=1)

    def __repr__(self) -> str:
        return f"NeumannGMRES(rate={self.rate:g}, restart={self.restart}, max_iter={self.max_iter})"

    def method(self, operator: ResidualOperator, rtol: float) -> Method:
        """Neumann steps, then GMRES if they are slow, at ``operator``'s fixed point.

        Args:
            operator: ``I − J`` at the fixed point (its rows checked independent before
                GMRES runs).
            rtol: the relative residual each solve must reach.

        Returns:
            ``(matvec, b, x0) ↦ (x, info)``, :func:`neumann_then_gmres`.
        """

        def run(matvec, b, x0):
            return neumann_then_gmres(
                matvec, b, x0, rtol=rtol, atol=self.atol, rate=self.rate, window=self.window,
                restart=self.restart, max_iter=self.max_iter,
                before_gmres=operator.require_independent_rows,
            )  # fmt: skip

        return run
