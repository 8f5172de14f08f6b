"""The exact matrix-free Hessian-vector product (second-order adjoint, two solves).

For directions ``v`` (the seed's H = d/dθ(λᵀ ∂f/∂θ) read as a product):

1. ``u = (∂f/∂θ) v`` (one JVP) and ``z = (I − J)⁻¹ u``, so ``z = Z v``;
2. ``(g_θ, g_h) = ∇²₍θ,h₎(L + λᵀf) · (v, z)`` (one forward-over-reverse product);
3. ``μ = (I − J)⁻ᵀ g_h``;
4. ``H v = g_θ + (∂f/∂θ)ᵀ μ`` (one VJP).

A block of ``K`` directions goes through each step at once (vmapped products, block
solves). No ``P × P`` or ``N × P`` object is formed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..linear import Solve
from .derivatives import dynamics_jvp

__all__ = ["ParameterProducts", "hessian_vector_products"]


@dataclass(frozen=True)
class ParameterProducts:
    """Products with ``∂f/∂θ`` at ``(θ, h*)`` on blocks: ``[K, P] → [K, S, d]`` (JVPs) and
    ``[K, S, d] → [K, P]`` (VJPs through one cached pullback: no forward per call)."""

    jvps: Callable[[Tensor], Tensor]
    vjps: Callable[[Tensor], Tensor]

    @classmethod
    def at(
        cls, dynamics: Callable[[Tensor, Tensor], Tensor], theta: Tensor, h: Tensor
    ) -> ParameterProducts:
        def of_theta(t: Tensor) -> Tensor:
            return dynamics(t, h)

        _, pullback = torch.func.vjp(of_theta, theta)
        return cls(
            jvps=torch.func.vmap(lambda v: dynamics_jvp(dynamics, theta, h, v)),
            vjps=torch.func.vmap(lambda mu: pullback(mu)[0]),
        )


def hessian_vector_products(
    parameter: ParameterProducts,
    second_order: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    solver: Solve,
    v: Tensor,
) -> Tensor:
    """``H vₖ`` ``[K, P]`` for flat directions ``v`` ``[K, P]``.

    Args:
        parameter: the products with ``∂f/∂θ`` at the fixed point.
        second_order: ``(v, z) ↦ ∇²Φ (v, z)`` (see
            :func:`deqhess.implicit.derivatives.lagrangian_hessian`) for the Lagrangian Φ
            of the wanted operator: ``L + λᵀf`` (the Hessian), ``L`` (loss curvature, the
            GGN part) or ``λᵀf`` (dynamics curvature).
        solver: solves with ``I − J`` and ``(I − J)ᵀ`` at the fixed point.
    """
    z = solver.solve(parameter.jvps(v))
    g_theta, g_h = torch.func.vmap(second_order)(v, z)
    return g_theta + parameter.vjps(solver.solve_transpose(g_h))
