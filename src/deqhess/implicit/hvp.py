"""The exact matrix-free Hessian-vector product (second-order adjoint, two solves).

For directions ``v`` (the seed's H = d/dθ(λᵀ ∂f/∂θ) read as a product):

1. ``u = (∂f/∂θ) v`` (one JVP) and ``z = (I − J)⁻¹ u``, so ``z = Z v``;
2. ``(g_θ, g_h) = ∇²₍θ,h₎(L + λᵀf) · (v, z)`` (one forward-over-reverse product);
3. ``μ = (I − J)⁻ᵀ g_h``;
4. ``H v = g_θ + (∂f/∂θ)ᵀ μ`` (one VJP).

A block of ``K`` directions is pushed through each step at once (vmapped AD, block
solves). No ``P × P`` or ``N × P`` object is formed.
"""

from __future__ import annotations

from torch import Tensor

from ..linear import Solve
from .derivatives import dynamics_jvps, dynamics_vjps, lagrangian_hessian_products
from .loss import Loss
from .problem import Problem

__all__ = ["hessian_vector_products"]


def hessian_vector_products(
    problem: Problem,
    loss: Loss | None,
    adjoint: Tensor | None,
    theta: Tensor,
    h: Tensor,
    solver: Solve,
    v: Tensor,
) -> Tensor:
    """``H vₖ`` ``[K, P]`` for flat directions ``v`` ``[K, P]``, at flat θ and rows ``h``.

    ``loss``/``adjoint`` select the operator: both give the Hessian, ``loss`` only the
    loss curvature ``[I; Z]ᵀ∇²L[I; Z]`` (the GGN part), ``adjoint`` only the dynamics
    curvature ``[I; Z]ᵀ∇²(λᵀf)[I; Z]``.
    """
    dynamics = problem.dynamics
    z = solver.solve(dynamics_jvps(dynamics, theta, h, v))
    phi = problem.lagrangian(loss, adjoint)
    g_theta, g_h = lagrangian_hessian_products(phi, theta, h, v, z)
    return g_theta + dynamics_vjps(dynamics, theta, h, solver.solve_transpose(g_h))
