"""``A = I − J`` at the fixed point, applied matrix-free by JVPs and VJPs.

Vectors are rows ``[S, d]`` (see :mod:`deqhess.state`); a block of ``K`` vectors is
``[K, S, d]``. ``J`` is never formed here; :meth:`ResidualOperator.jacobian_blocks`
forms its diagonal blocks for the dense solver on request.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..tangents import linearize
from .jacobian import jacobian_blocks

__all__ = ["ResidualOperator"]


class ResidualOperator:
    """``A v = v − J v`` and ``Aᵀ w = w − Jᵀ w`` with ``J = ∂fn/∂h`` at ``h``.

    Args:
        fn: the map ``h ↦ f(x, h, θ)`` on rows ``[S, d]`` (θ and x bound).
        h: the fixed point, rows ``[S, d]``.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], h: Tensor) -> None:
        self.fn = fn
        self.h = h
        self._pullback: Callable[[Tensor], tuple[Tensor]] | None = None  # on first Aᵀ
        self._tangent: Callable[[Tensor], Tensor] | None = None  # on first A

    @property
    def samples(self) -> int:
        return self.h.shape[0]

    @property
    def width(self) -> int:
        return self.h.shape[1]

    def _jvp(self, v: Tensor) -> Tensor:
        # Traced once on first use (iterative solves call it tens of times per solve);
        # blocks of directions use plain vmapped JVPs, which any f supports.
        if self._tangent is None:
            self._tangent = linearize(self.fn, self.h)
        return self._tangent(v.contiguous())

    def _vjp(self, w: Tensor) -> Tensor:
        return self._pullback(w)[0]

    def matvec(self, v: Tensor) -> Tensor:
        """``(I − J) v`` for ``v`` ``[..., S, d]`` (leading dims vmapped)."""
        if v.ndim == 2:
            return v - self._jvp(v)
        return v - _over_leading(lambda t: torch.func.jvp(self.fn, (self.h,), (t,))[1], v)

    def rmatvec(self, w: Tensor) -> Tensor:
        """``(I − J)ᵀ w`` for ``w`` ``[..., S, d]``."""
        if self._pullback is None:  # built outside any vmap, then reused
            _, self._pullback = torch.func.vjp(self.fn, self.h)
        return w - _over_leading(self._vjp, w)

    def row_coupling(self, seed: int = 0) -> float:
        """How much ``J`` couples rows: ``‖(J v)_odd‖ / ‖(J v)_even‖`` for random ``v`` on
        the even rows only. Exactly 0 when rows are independent (as ``batch_dim``
        declares); one JVP. Couplings among even rows alone go unseen."""
        if self.samples == 1:
            return 0.0
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(self.h.shape, generator=g, dtype=self.h.dtype).to(self.h.device)
        v[1::2] = 0.0
        jv = torch.func.jvp(self.fn, (self.h,), (v,))[1]
        inside = torch.linalg.vector_norm(jv[0::2])
        outside = torch.linalg.vector_norm(jv[1::2])
        return float(outside / torch.clamp(inside, min=torch.finfo(self.h.dtype).tiny))

    def jacobian_blocks(self, chunk_size: int | None = None) -> Tensor:
        """The diagonal blocks of ``J``, ``[S, d, d]`` (see :func:`jacobian_blocks`)."""
        return jacobian_blocks(self.fn, self.h, chunk_size)


def _over_leading(fn: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    if v.ndim == 2:
        return fn(v)
    flat = v.reshape(-1, *v.shape[-2:])
    return torch.func.vmap(fn)(flat).reshape(v.shape)
