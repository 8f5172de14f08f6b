"""Products over a block of directions by ``torch.func.vmap``, checked against a plain call.

deqhess batches the products of a linear solve — a block of VJPs forming ``J``'s
diagonal blocks, the directions of an iterative solve, the batch-independence probes —
with ``vmap``. Where torch's batching rule of an operation in ``f`` is wrong (the
backward of ``torch.cdist`` under ``vmap``, in torch 2.13: 0.64 off on values of 1.03),
every derivative built on them would be silently wrong. So a random combination of a
block's directions is also taken by a plain call and compared: a disagreement beyond
rounding is
refused by name. The check costs one plain product per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import UnsupportedDerivativeError

__all__ = ["BATCHING_TOLERANCE", "check_batched", "combination_weights", "disagreement"]

#: relative disagreement of a vmapped product with a plain one accepted as rounding:
#: the two sum in other orders (a wrong batching rule is off by order one)
BATCHING_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}


def check_batched(fn: Callable[[Tensor], Tensor], directions: Tensor, batched: Tensor) -> None:
    """Refuse a block of vmapped products that differs from plain calls of ``fn``.

    ``fn`` is linear, so a random combination of the block's directions, taken by one
    plain call, must give the same combination of the vmapped products — for every
    direction at once (a wrong batching rule need not show on a basis vector).

    Args:
        fn: the product, one direction in, one out (linear in it).
        directions: ``[K, ...]``, the block's directions.
        batched: ``[K, ...]``, what the vmapped call gave for them.

    Raises:
        UnsupportedDerivativeError: the two differ beyond :data:`BATCHING_TOLERANCE`,
            relative to the combination's terms (not checked under an outer
            ``torch.func`` transform, whose values are not there to compare).
    """
    if directions.shape[0] == 0 or batched.numel() == 0:
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return  # under an outer transform the values are not there to compare
    weights = combination_weights(directions.shape[0]).to(batched)
    plain = fn(torch.tensordot(weights, directions.to(batched.dtype), dims=1))
    (gap,), terms = disagreement(weights, [batched], [plain])
    # the terms' size: the products', or the directions' where the products cancel
    # (I − J with J near I: a product far below what it was computed from)
    scale = max(
        terms,
        float((weights.abs() @ directions.abs().reshape(len(weights), -1).to(batched)).max()),
    )
    if not gap == gap or not scale == scale:  # NaN: the products' finiteness is checked elsewhere
        return
    if gap <= BATCHING_TOLERANCE.get(batched.dtype, 1e-3) * scale:
        return
    raise UnsupportedDerivativeError(
        "torch.func.vmap gives other products than plain calls for the map f: a random "
        f"combination of a block of derivative products differs by {gap:.2e} (its terms "
        f"are up to {scale:.2e}). That is a wrong batching rule in torch for an operation in f "
        "(torch.cdist's backward is one, in torch 2.13), and deqhess batches its products "
        "with vmap, so no derivative through f can be trusted. Write the operation "
        "another way (torch.cdist(a, b) as ((a[..., :, None, :] - b[..., None, :, :]) "
        "** 2).sum(-1).sqrt(), say)."
    )


def combination_weights(count: int) -> Tensor:
    """The seeded random weights ``[K]`` (float64, CPU) of a block's random combination."""
    generator = torch.Generator().manual_seed(7)
    return torch.randn(count, generator=generator, dtype=torch.float64)


def disagreement(
    weights: Tensor, batched: Sequence[Tensor], plain: Sequence[Tensor | None]
) -> tuple[list[float], float]:
    """How far ``Σₖ wₖ batchedₖ`` is from the plain product of the combination.

    Args:
        weights: ``[K]``, the combination's weights.
        batched: per product, ``[K, ...]``: what the batched call gave.
        plain: per product, the plain call on the combination (None: zero).

    Returns:
        ``(gaps, scale)``: each product's largest entry of the difference (NaN where
        one is not finite), and the largest of the combination's terms
        ``Σₖ |wₖ| |batchedₖ|`` over them all.
    """
    gaps, scale = [], 0.0
    for b, p in zip(batched, plain, strict=True):
        if not b.numel():
            continue
        w = weights.to(b)
        scale = max(scale, float((w.abs() @ b.abs().reshape(len(w), -1)).max()))
        mixed = torch.tensordot(w, b, dims=1)
        gaps.append(float((mixed - (p if p is not None else 0.0)).abs().max()))
    return gaps, scale
