"""The exact matrix-free Hessian-vector product (second-order adjoint, two solves).

For a direction ``v`` ``[P]`` (the seed's H = d/dθ(λᵀ ∂f/∂θ) read as a product):

1. ``u = (∂f/∂θ) v`` (one JVP) and ``z = (I − J)⁻¹ u``, so ``z = Z v``;
2. ``(g_θ, g_h) = ∇²₍θ,h₎(L + λᵀf) · (v, z)`` (one forward-over-reverse product);
3. ``μ = (I − J)⁻ᵀ g_h``;
4. ``H v = g_θ + (∂f/∂θ)ᵀ μ`` (one VJP).

No ``P × P`` or ``N × P`` object is formed.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from .derivatives import dynamics_jvp, dynamics_vjp, lagrangian_hessian_product
from .loss import Loss
from .problem import Problem

__all__ = ["ResidualSolver", "hessian_vector_product"]


class ResidualSolver(Protocol):
    """Anything that solves with ``A = I − J`` and ``Aᵀ`` on ``[S, d, K]`` blocks."""

    def solve(self, rhs: Tensor) -> Tensor: ...

    def solve_transpose(self, rhs: Tensor) -> Tensor: ...


def hessian_vector_product(
    problem: Problem,
    loss: Loss | None,
    adjoint: Tensor | None,
    theta: Tensor,
    h: Tensor,
    solver: ResidualSolver,
    v: Tensor,
) -> Tensor:
    """``H v`` ``[P]`` for flat ``v`` ``[P]``, at flat θ and rows ``h`` ``[S, d]``.

    ``loss``/``adjoint`` select the operator: both give the Hessian, ``loss`` only
    the loss curvature (GGN part), ``adjoint`` only the dynamics curvature.
    """
    dynamics = problem.dynamics
    z = solver.solve(dynamics_jvp(dynamics, theta, h, v)[..., None])[..., 0]
    phi = problem.lagrangian(loss, adjoint)
    g_theta, g_h = lagrangian_hessian_product(phi, theta, h, v, z)
    mu = solver.solve_transpose(g_h[..., None])[..., 0]
    return g_theta + dynamics_vjp(dynamics, theta, h, mu)
