"""The exact matrix-free Hessian-vector product (second-order adjoint, two solves).

For directions ``v`` (the seed's H = d/dθ(λᵀ ∂f/∂θ) read as a product):

1. ``u = (∂f/∂θ) v`` (one JVP) and ``z = (I − J)⁻¹ u``, so ``z = Z v``;
2. ``(g_θ, g_h) = ∇²₍θ,h₎(L + λᵀf) · (v, z)`` (one backward through the cached
   pullback of ``∇(L + λᵀf)``: reverse-over-reverse, as ∇² is symmetric);
3. ``μ = (I − J)⁻ᵀ g_h``;
4. ``H v = g_θ + (∂f/∂θ)ᵀ μ`` (one VJP).

A block of ``K`` directions goes through each step at once (vmapped products, block
solves). No ``P × P`` or ``N × P`` object is formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..linear import Linearization
from ..tangents import linearize
from .derivatives import dynamics_jvp

__all__ = ["TRACE_AFTER", "ParameterProducts", "hessian_vector_products"]

#: single-direction JVPs made plainly before the tangent is traced for the rest
TRACE_AFTER = 3


class ParameterProducts:
    """Products with ``∂f/∂θ`` at ``(θ, h*)`` on blocks of K directions.

    JVPs ``[K, P] → [K, S, d]`` and VJPs ``[K, S, d] → [K, P]`` (through one cached
    pullback: no forward per call). A single direction's JVP replays a tangent traced
    once these products have served :data:`TRACE_AFTER` single directions
    (:func:`deqhess.tangents.linearize`: no forward of ``f`` per call, 0.3 instead of
    0.8 ms at P = 82k; but a trace costs as much as a hundred or more plain JVPs, and
    products made afresh for each pass over a data set would trace at every pass); a
    block is vmapped.

    Args:
        jvp: ``v ↦ (∂f/∂θ) v`` for one direction ``[P] → [S, d]`` (vmappable).
        vjp: ``μ ↦ (∂f/∂θ)ᵀ μ`` for one cotangent ``[S, d] → [P]`` (vmappable).
        traced_jvp: builds a faster ``jvp`` for single directions (called once).
    """

    def __init__(
        self,
        jvp: Callable[[Tensor], Tensor],
        vjp: Callable[[Tensor], Tensor],
        traced_jvp: Callable[[], Callable[[Tensor], Tensor]] | None = None,
    ) -> None:
        self.jvp, self.vjp = jvp, vjp
        self._trace = traced_jvp
        self._traced: Callable[[Tensor], Tensor] | None = None
        self._singles = 0

    def jvps(self, v: Tensor) -> Tensor:
        """``[K, P] → [K, S, d]`` (vmapped; a single direction skips vmap's overhead)."""
        if v.shape[0] > 1:
            return torch.func.vmap(self.jvp)(v)
        if self._traced is None:
            self._singles += 1
            if self._trace is None or self._singles <= TRACE_AFTER:
                return self.jvp(v[0])[None]
            self._traced = self._trace()
        return self._traced(v[0])[None]

    def vjps(self, mu: Tensor) -> Tensor:
        """``[K, S, d] → [K, P]``."""
        return self.vjp(mu[0])[None] if mu.shape[0] == 1 else torch.func.vmap(self.vjp)(mu)

    @classmethod
    def at(
        cls, dynamics: Callable[[Tensor, Tensor], Tensor], theta: Tensor, h: Tensor
    ) -> ParameterProducts:
        """The products at ``(θ, h)``, with the pullback of ``θ ↦ f`` taken once.

        Args:
            dynamics: ``(θ, h) ↦ f(x, h, θ)`` on flat θ ``[P]`` and rows ``[S, d]``.
            theta: flat θ ``[P]``.
            h: the fixed point's rows ``[S, d]``.

        Returns:
            The products with ``∂f/∂θ`` at ``(θ, h)``.
        """

        def of_theta(t: Tensor) -> Tensor:
            return dynamics(t, h)

        pullback = torch.func.vjp(of_theta, theta)[1]
        return cls(
            jvp=lambda v: dynamics_jvp(dynamics, theta, h, v),
            vjp=lambda mu: pullback(mu)[0],
            traced_jvp=lambda: linearize(of_theta, theta),
        )


def hessian_vector_products(
    parameter: ParameterProducts,
    second_order: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    solver: Linearization,
    v: Tensor,
) -> Tensor:
    """``H vₖ`` for K flat directions: the seed's matrix-free product, two solves each.

    ``z = (I − J)⁻¹ (∂f/∂θ) v``; ``(g_θ, g_h) = ∇²Φ (v, z)``; ``H v = g_θ + (∂f/∂θ)ᵀ μ``
    with ``μ = (I − J)⁻ᵀ g_h``. The K directions share each solve and vmapped AD pass.

    Args:
        parameter: the products with ``∂f/∂θ`` at the fixed point.
        second_order: ``(v, z) ↦ ∇²Φ (v, z)`` (see
            :func:`deqhess.implicit.derivatives.lagrangian_hessian`) for the Lagrangian Φ
            of the wanted operator: ``L + λᵀf`` (the Hessian), ``L`` (loss curvature, the
            GGN part) or ``λᵀf`` (dynamics curvature).
        solver: solves with ``I − J`` and ``(I − J)ᵀ`` at the fixed point.
        v: the directions, rows ``[K, P]``.

    Returns:
        ``H vₖ`` as rows ``[K, P]``.
    """
    z = solver.solve(parameter.jvps(v))
    if v.shape[0] == 1:  # one direction: no vmap overhead
        g_theta, g_h = (g[None] for g in second_order(v[0], z[0]))
    else:
        g_theta, g_h = torch.func.vmap(second_order)(v, z)
    return g_theta + parameter.vjps(solver.solve_transpose(g_h))
