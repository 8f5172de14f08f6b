"""Dense Jacobian blocks ``J[s] = ∂f(h)[s] / ∂h[s]`` of a row-wise map."""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import torch
from torch import Tensor

from ..chunks import default_chunk_size
from .batched import check_batched

__all__ = ["jacobian_blocks"]


@overload
def jacobian_blocks(
    fn: Callable[[Tensor], Tensor], h: Tensor, chunk_size: int | None = None
) -> Tensor: ...
@overload
def jacobian_blocks(
    fn: Callable[[Tensor], Tensor], h: Tensor, chunk_size: int | None, extra: Tensor
) -> tuple[Tensor, Tensor]: ...
def jacobian_blocks(
    fn: Callable[[Tensor], Tensor],
    h: Tensor,
    chunk_size: int | None = None,
    extra: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The diagonal blocks of ``∂fn/∂h`` at rows ``h`` ``[S, d]``, as ``[S, d, d]``.

    One VJP with the cotangent ``e_i`` placed in every row at once gives row ``i`` of
    every block, so ``d`` VJPs (vmapped, ``chunk_size`` at a time) suffice whatever
    ``S`` is. This is exact when ``S = 1`` and, for ``S > 1``, when ``fn`` treats rows
    independently (the ``batch_dim`` contract); cross-row entries are never formed.

    Args:
        fn: the map on rows ``[S, d]``.
        h: the rows where ``∂fn/∂h`` is taken.
        chunk_size: VJPs vmapped at once.
        extra: ``[K, S, d]`` more cotangents to pull back in the same vmapped call (the
            batch-independence check's probes), or None.

    Returns:
        The blocks ``[S, d, d]``, block ``s`` being ``∂fn(h)ₛ/∂hₛ``; with ``extra``, also
        ``(∂fn/∂h)ᵀ`` of each of its cotangents, ``[K, S, d]``.
    """
    samples, width = h.shape
    chunk_size = chunk_size or default_chunk_size(h.numel())
    pullback = torch.func.vjp(fn, h)[1]
    eye = torch.eye(width, dtype=h.dtype, device=h.device)
    cotangents = eye[:, None, :].expand(width, samples, width)
    if extra is not None:
        cotangents = torch.cat([cotangents, extra.to(h)])
    rows = torch.func.vmap(pullback, chunk_size=chunk_size)(cotangents)[0]  # [d(+K), S, d]
    check_batched(lambda c: pullback(c)[0], cotangents, rows)
    blocks = rows[:width].permute(1, 0, 2).contiguous()
    return blocks if extra is None else (blocks, rows[width:])
