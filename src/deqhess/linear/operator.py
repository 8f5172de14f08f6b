"""``A = I − J`` at a fixed point, applied matrix-free by JVPs and VJPs of the residual.

Vectors are rows ``[S, d]`` (see :mod:`deqhess.state`); a block of ``K`` vectors is
``[K, S, d]``. ``J`` is never formed here; :meth:`ResidualOperator.jacobian_blocks`
forms its diagonal blocks for the dense solver on request.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..operator import Operator
from ..solvers import Residual
from ..tangents import linearize
from .jacobian import jacobian_blocks

__all__ = ["ResidualOperator"]


class ResidualOperator(Operator):
    """``A = I − J = −∂g/∂h`` at ``h`` for the residual ``g(h) = F(h) − h``.

    Native products act on rows: :meth:`apply` ``(I − J) v`` and :meth:`apply_transpose`
    ``(I − J)ᵀ w`` for ``[..., S, d]`` (leading dims are independent directions); the
    :class:`deqhess.operator.Operator` products ``matmat``/``rmatmat`` act on flat
    ``[S·d, K]`` blocks.

    Args:
        residual: the residual ``g`` (or the map ``F`` itself) on rows ``[S, d]``.
        h: the fixed point, rows ``[S, d]``.
    """

    def __init__(self, residual: Residual | Callable[[Tensor], Tensor], h: Tensor) -> None:
        self.residual = residual if isinstance(residual, Residual) else Residual(residual)
        self.h = h
        self.shape = (h.numel(), h.numel())
        self.dtype, self.device = h.dtype, h.device
        self._pullback: Callable[[Tensor], tuple[Tensor]] | None = None  # on first Aᵀ
        self._tangent: Callable[[Tensor], Tensor] | None = None  # on first A

    @property
    def samples(self) -> int:
        return self.h.shape[0]

    @property
    def width(self) -> int:
        return self.h.shape[1]

    def __repr__(self) -> str:
        return f"ResidualOperator(samples={self.samples}, width={self.width}, dtype={self.dtype})"

    def _residual_jvp(self, v: Tensor) -> Tensor:
        # traced once, verified, then replayed (iterative solves take tens of products)
        if self._tangent is None:
            self._tangent = linearize(self.residual, self.h)
        return self._tangent(v.contiguous())

    def _residual_vjp(self, w: Tensor) -> Tensor:
        return self._pullback(w)[0]

    def apply(self, v: Tensor) -> Tensor:
        """``(I − J) v`` for ``v`` ``[..., S, d]`` (leading dims vmapped)."""
        if v.ndim == 2:
            return -self._residual_jvp(v)
        residual, h = self.residual, self.h
        return -_over_leading(lambda t: torch.func.jvp(residual, (h,), (t,))[1], v)

    def apply_transpose(self, w: Tensor) -> Tensor:
        """``(I − J)ᵀ w`` for ``w`` ``[..., S, d]``."""
        if self._pullback is None:  # built outside any vmap, then reused
            _, self._pullback = torch.func.vjp(self.residual, self.h)
        return -_over_leading(self._residual_vjp, w)

    def matmat(self, block: Tensor) -> Tensor:
        """``(I − J) V`` for flat ``V`` ``[S·d, K]``."""
        return self._flat(self.apply, block)

    def rmatmat(self, block: Tensor) -> Tensor:
        """``(I − J)ᵀ W`` for flat ``W`` ``[S·d, K]``."""
        return self._flat(self.apply_transpose, block)

    def _flat(self, product: Callable[[Tensor], Tensor], block: Tensor) -> Tensor:
        rows = block.T.reshape(block.shape[1], self.samples, self.width)
        return product(rows).reshape(block.shape[1], -1).T

    def jacobian_blocks(self, chunk_size: int | None = None) -> Tensor:
        """The diagonal blocks of ``J``, ``[S, d, d]`` (see :func:`jacobian_blocks`)."""
        return jacobian_blocks(self.residual.fn, self.h, chunk_size)


def _over_leading(fn: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    if v.ndim == 2:
        return fn(v)
    flat = v.reshape(-1, *v.shape[-2:])
    return torch.func.vmap(fn)(flat).reshape(v.shape)
