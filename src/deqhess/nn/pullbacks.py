"""Pullbacks (VJPs) that stay differentiable, for the fixed point's rules.

A rule of :func:`deqhess.nn.implicit.fixed_point` pulls a cotangent back through the
map at the saved fixed point; the pullback must itself be differentiable, in reverse
and in forward mode, for the derivatives of every order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["args_pullback", "pullback"]


def pullback(fn: Callable[[Any], Tensor], primal: Any) -> tuple[Tensor, Callable]:
    """``fn(primal)`` and the VJP of ``fn`` there, forward-differentiable.

    Where an operator's backward has no forward-AD formula
    (``native_group_norm_backward``, ...) the VJP is taken as the transpose of the JVP
    instead (reverse over forward: the same values).

    Returns:
        ``(fn(primal), pullback)``, ``pullback(cotangent)`` a tuple like ``primal``'s.
    """
    primal_out = torch.func.vjp(fn, primal)  # (value, pullback): no auxiliary output
    value, pullback = primal_out[0], primal_out[1]

    def apply(cotangent: Tensor) -> tuple:
        try:
            return pullback(cotangent)
        except NotImplementedError as error:
            if "forward AD" not in str(error):
                raise
        transposed = torch.func.vjp(
            lambda t: torch.func.jvp(fn, (primal,), (t,))[1], tree_map(torch.zeros_like, primal)
        )[1]
        return transposed(cotangent)

    return value, apply


def args_pullback(
    fn: Callable[..., Tensor], z: Tensor, args: tuple[Tensor, ...], wanted: list[int]
) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    """``fn(z, *args)`` and its pullback in the arguments ``wanted``, at ``(z, args)``.

    Args:
        fn: the map ``(z, *args) ↦ F``.
        z: the state.
        args: the other arguments.
        wanted: the indices of the arguments to pull back to.

    Returns:
        ``(fn(z, *args), pull)``, ``pull(μ) = ((∂fn/∂args_i)ᵀ μ for i in wanted)``.
    """

    def of_wanted(chosen: tuple[Tensor, ...]) -> Tensor:
        full = list(args)
        for i, t in zip(wanted, chosen, strict=True):
            full[i] = t
        return fn(z, *full)

    value, pull = pullback(of_wanted, tuple(args[i] for i in wanted))
    return value, lambda mu: pull(mu)[0]
