"""Dense Jacobian blocks ``J[s] = ∂f(h)[s] / ∂h[s]`` of a row-wise map."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..chunks import default_chunk_size

__all__ = ["jacobian_blocks"]


def jacobian_blocks(
    fn: Callable[[Tensor], Tensor], h: Tensor, chunk_size: int | None = None
) -> Tensor:
    """The diagonal blocks of ``∂fn/∂h`` at rows ``h`` ``[S, d]``, as ``[S, d, d]``.

    One VJP with the cotangent ``e_i`` placed in every row at once gives row ``i`` of
    every block, so ``d`` VJPs (vmapped, ``chunk_size`` at a time) suffice whatever
    ``S`` is. This is exact when ``S = 1`` and, for ``S > 1``, when ``fn`` treats rows
    independently (the ``batch_dim`` contract); cross-row entries are never formed.

    Returns:
        The blocks ``[S, d, d]``, block ``s`` being ``∂fn(h)ₛ/∂hₛ``.
    """
    samples, width = h.shape
    chunk_size = chunk_size or default_chunk_size(h.numel())
    pullback = torch.func.vjp(fn, h)[1]
    eye = torch.eye(width, dtype=h.dtype, device=h.device)
    cotangents = eye[:, None, :].expand(width, samples, width)
    rows = torch.func.vmap(pullback, chunk_size=chunk_size)(cotangents)[0]  # [d, S, d]
    return rows.permute(1, 0, 2).contiguous()
