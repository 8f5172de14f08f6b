"""Dense assembly of the DEQ Hessian and of ``d²h*/dθ²`` (step 5 of the seed).

With ``Z = dh*/dθ`` ``[S, d, P]`` and λ from the adjoint solve,

    H = [I; Z]ᵀ ∇²₍θ,h₎(L + λᵀf) [I; Z],

which for ``L(h)`` is the seed's ``Zᵀ ∇²ₕL Z + [I; Z]ᵀ ∇²(λᵀf) [I; Z]``. Column ``i``
of ``∇²Φ [I; Z]`` is one second-order product ``(g_θ, g_h)`` along ``(e_i, Z_i)``, and
column ``i`` of H is ``g_θ + Zᵀ g_h``. Since ``Z = (I − J)⁻¹ ∂f/∂θ``,

    Zᵀ g_h = (∂f/∂θ)ᵀ (I − J)⁻ᵀ g_h,

one transposed solve and one VJP per column. With a direct solve (a dense LU of
``S`` blocks of width ``d``) that costs ``O(S·d² + cost of a VJP)`` per column instead of
the ``N·P`` of the projection by Z — at P = 6,208, N = 1,024 about 25× fewer flops — so
the whole assembly is ``P`` Hessian-vector products sharing Z, in vmapped blocks. With
an iterative solve each solve costs many products, and the projection by Z (one
``P × N × P`` matrix product, chunk by chunk) is kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..callers import user_stacklevel
from ..chunks import default_chunk_size
from ..linear import Linearization
from .derivatives import lagrangian_hessian
from .loss import Loss
from .problem import Problem

__all__ = ["HessianSplit", "dense_hessian", "second_sensitivity", "split_deprecated"]


@dataclass(frozen=True)
class HessianSplit:
    """The master formula's two parts, each ``[P, P]``.

    Attributes:
        loss_curvature: ``[I; Z]ᵀ ∇²L [I; Z]`` (``= Zᵀ ∇²ₕL Z`` when L ignores θ; the
            Gauss–Newton part, positive semi-definite when L is convex in (θ, h)).
        dynamics_curvature: ``[I; Z]ᵀ ∇²(λᵀf) [I; Z]``, the part every GGN drops.
        total: their sum, the exact Hessian.
    """

    loss_curvature: Tensor
    dynamics_curvature: Tensor
    total: Tensor


def split_deprecated(where: str, replacement: str) -> None:
    """Warn that ``where(..., split=True)`` is deprecated in favour of ``replacement``.

    The flag changed the return type; the method or function that returns a
    :class:`HessianSplit` replaces it (one release of overlap).

    Args:
        where: the call, e.g. ``"Equilibrium.hessian"``.
        replacement: the call to use instead, e.g. ``"eq.hessian_split(loss)"``.

    Warns:
        DeprecationWarning: always, pointing at the caller of ``where``.
    """
    warnings.warn(
        f"{where}(..., split=True) is deprecated and will be removed in deqhess 0.3; use "
        f"{replacement}, which returns the HessianSplit.",
        DeprecationWarning,
        stacklevel=user_stacklevel(),
    )


def _projected(
    problem: Problem,
    loss: Loss | None,
    adjoint: Tensor | None,
    theta: Tensor,
    h: Tensor,
    sensitivity: Tensor,
    chunk_size: int | None,
    back_projection: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """``[I; Z]ᵀ ∇²Φ [I; Z]`` ``[P, P]`` for Φ = (L if given) + (λᵀf if given).

    Directions go in chunks; each chunk's ``g_θ + Zᵀ g_h`` is written straight into the
    output (by ``back_projection``, or one GEMM with Z), so only a chunk of
    ``∇²Φ [I; Z]`` is ever held. The arguments are those of :func:`dense_hessian`.

    Returns:
        ``[I; Z]ᵀ ∇²Φ [I; Z]`` ``[P, P]``.
    """
    samples, width, params = sensitivity.shape
    second_order = torch.func.vmap(lagrangian_hessian(problem.lagrangian(loss, adjoint), theta, h))
    z_flat = sensitivity.reshape(samples * width, params)
    tangents = sensitivity.permute(2, 0, 1)
    step = chunk_size or default_chunk_size(params + samples * width)
    columns = theta.new_empty(params, params)  # row i holds column i of H
    for start in range(0, params, step):
        stop = min(start + step, params)
        basis = theta.new_zeros(stop - start, params)
        basis[:, start:stop].fill_diagonal_(1.0)
        g_theta, g_h = second_order(basis, tangents[start:stop].contiguous())
        if back_projection is not None:
            torch.add(g_theta, back_projection(g_h), out=columns[start:stop])
        else:
            torch.addmm(g_theta, g_h.reshape(stop - start, -1), z_flat, out=columns[start:stop])
    return columns.mT


def dense_hessian(
    problem: Problem,
    loss: Loss,
    adjoint: Tensor,
    theta: Tensor,
    h: Tensor,
    sensitivity: Tensor,
    split: bool = False,
    chunk_size: int | None = None,
    back_projection: Callable[[Tensor], Tensor] | None = None,
) -> Tensor | HessianSplit:
    """The exact Hessian ``H = [I; Z]ᵀ ∇²₍θ,h₎(L + λᵀf) [I; Z]``, or its two parts.

    Args:
        problem: the equilibrium's problem (``f``, θ's layout, the state's rows).
        loss: the loss ``L(h, θ)``.
        adjoint: λ rows ``[S, d]`` solving ``(I − J)ᵀ λ = ∇ₕL``.
        theta: flat θ ``[P]``.
        h: the fixed point's rows ``[S, d]``.
        sensitivity: Z ``[S, d, P]`` solving ``(I − J) Z = ∂f/∂θ``.
        split: assemble the loss and the dynamics curvature apart (twice the cost).
        chunk_size: directions vmapped at once; None picks about 4M numbers per chunk.
        back_projection: ``g ↦ Zᵀ g`` on blocks ``[K, S, d] → [K, P]`` computed as
            ``(∂f/∂θ)ᵀ (I − J)⁻ᵀ g`` (a transposed solve and a VJP); None projects by Z
            (an ``N × P`` product per column).

    Returns:
        The Hessian ``[P, P]``; with ``split`` a :class:`HessianSplit` of
        ``[I; Z]ᵀ∇²L[I; Z]``, ``[I; Z]ᵀ∇²(λᵀf)[I; Z]`` and their sum.
    """
    args = (theta, h, sensitivity, chunk_size, back_projection)
    if not split:
        return _projected(problem, loss, adjoint, *args)
    loss_part = _projected(problem, loss, None, *args)
    dynamics_part = _projected(problem, None, adjoint, *args)
    return HessianSplit(loss_part, dynamics_part, loss_part + dynamics_part)


def second_sensitivity(
    problem: Problem,
    theta: Tensor,
    h: Tensor,
    sensitivity: Tensor,
    solver: Linearization,
    chunk_size: int | None = None,
) -> Tensor:
    """``d²h*/dθ²``, solving ``(I − J) d²h*/dθᵢdθⱼ = D²f[(eᵢ, Zᵢ), (eⱼ, Zⱼ)]``.

    The right-hand side is the full second derivative of ``f`` along the total
    directions ``(eᵢ, Zᵢ)``: ``∂²f/∂θ²``, both mixed terms and ``Zᵀ ∂²f/∂h² Z`` of the
    seed at once. Costs ``P²`` nested JVPs and ``N·P²`` memory: small problems only.

    Args:
        problem: the equilibrium's problem (``f`` on flat θ and rows).
        theta: flat θ ``[P]``.
        h: the fixed point's rows ``[S, d]``.
        sensitivity: Z ``[S, d, P]``.
        solver: the prepared solve with ``I − J`` at the fixed point.
        chunk_size: directions vmapped at once (the outer of the two ``vmap``).

    Returns:
        ``d²h*/dθ²`` ``[S, d, P, P]``.
    """
    params = sensitivity.shape[-1]
    dynamics = problem.dynamics

    def second_directional(v1: Tensor, z1: Tensor, v2: Tensor, z2: Tensor) -> Tensor:
        def first(t: Tensor, r: Tensor) -> Tensor:
            return torch.func.jvp(dynamics, (t, r), (v1, z1))[1]

        return torch.func.jvp(first, (theta, h), (v2, z2))[1]

    directions = torch.eye(params, dtype=theta.dtype, device=theta.device)
    tangents = sensitivity.permute(2, 0, 1)
    inner = torch.func.vmap(second_directional, in_dims=(None, None, 0, 0))
    outer = torch.func.vmap(inner, in_dims=(0, 0, None, None), chunk_size=chunk_size)
    rhs = outer(directions, tangents, directions, tangents)  # [P, P, S, d]
    return solver.solve(rhs).permute(2, 3, 0, 1)
