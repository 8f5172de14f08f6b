"""First- and second-order AD products of the bound problem, via ``torch.func``.

Shapes: θ flat ``[P]``, state rows ``[S, d]``; a block of ``K`` directions puts
``K`` first. Nothing here solves a linear system.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..chunks import default_chunk_size

__all__ = [
    "dynamics_jvp",
    "lagrangian_hessian_product",
    "lagrangian_hessian_products",
    "parameter_jacobian",
]

Dynamics = Callable[[Tensor, Tensor], Tensor]
Scalar = Callable[[Tensor, Tensor], Tensor]


def dynamics_jvp(dynamics: Dynamics, theta: Tensor, h: Tensor, v: Tensor) -> Tensor:
    """``(∂f/∂θ) v`` ``[S, d]`` for a direction ``v`` ``[P]`` (one JVP)."""
    return torch.func.jvp(lambda t: dynamics(t, h), (theta,), (v,))[1]


def parameter_jacobian(
    dynamics: Dynamics, theta: Tensor, h: Tensor, chunk_size: int | None = None
) -> Tensor:
    """``∂f/∂θ`` at ``(θ, h)`` as ``[S, d, P]``.

    Reverse mode (``N = S·d`` VJPs) when ``N ≤ P``, else forward mode (``P`` JVPs),
    vmapped ``chunk_size`` at a time.
    """
    samples, width = h.shape
    size, params = samples * width, theta.numel()
    chunk_size = chunk_size or default_chunk_size(size + params)
    if size <= params:
        _, pullback = torch.func.vjp(lambda t: dynamics(t, h), theta)
        basis = torch.eye(size, dtype=h.dtype, device=h.device).reshape(size, samples, width)
        rows = torch.func.vmap(lambda c: pullback(c)[0], chunk_size=chunk_size)(basis)
        return rows.reshape(samples, width, params)
    basis = torch.eye(params, dtype=theta.dtype, device=theta.device)
    cols = torch.func.vmap(lambda v: dynamics_jvp(dynamics, theta, h, v), chunk_size=chunk_size)(
        basis
    )
    return cols.permute(1, 2, 0)


def lagrangian_hessian_product(
    phi: Scalar, theta: Tensor, h: Tensor, v: Tensor, z: Tensor
) -> tuple[Tensor, Tensor]:
    """``∇²₍θ,h₎Φ · (v, z)`` as ``(g_θ [P], g_h [S, d])`` (forward-over-reverse)."""
    gradient = torch.func.grad(phi, argnums=(0, 1))
    _, (g_theta, g_h) = torch.func.jvp(gradient, (theta, h), (v, z))
    return g_theta, g_h


def lagrangian_hessian_products(
    phi: Scalar,
    theta: Tensor,
    h: Tensor,
    v: Tensor,
    z: Tensor,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`lagrangian_hessian_product` for ``K`` directions ``v [K, P]``, ``z [K, S, d]``."""
    product = torch.func.vmap(
        lambda a, b: lagrangian_hessian_product(phi, theta, h, a, b),
        chunk_size=chunk_size,
    )
    return product(v, z)
