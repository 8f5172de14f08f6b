"""``A = I − J`` at a fixed point, applied matrix-free by JVPs and VJPs of the residual.

Vectors are rows ``[S, d]`` (see :mod:`deqhess.state`); a block of ``K`` vectors is
``[K, S, d]``. ``J`` is never formed here; :meth:`ResidualOperator.jacobian_blocks`
forms its diagonal blocks for the dense solver on request.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InputError, NonFiniteError
from ..operator import Operator
from ..solvers import Residual
from ..tangents import Linearized, linearize
from .batched import check_batched
from .coupling import coupling_tolerance, row_coupling
from .jacobian import jacobian_blocks
from .kept import FactorSlot

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
        independent_rows: the rows are declared independent systems (``batch_dim``), so
            ``J`` is block-diagonal. Solvers that rely on it (a dense LU per block, GMRES
            per row) call :meth:`require_independent_rows` first; a Neumann iteration on
            the full operator does not need it.
        declared: for the error message, what couples what (e.g. ``"f couples the
            samples along batch_dim=0"``) and what to do instead.
        trace_tangent: trace the JVP once and replay it (verified on first use); False
            where tracing cannot serve (inside ``autograd.Function.forward``, where
            ``torch.func.linearize`` returns zeros): plain JVPs from the start.
    """

    def __init__(
        self,
        residual: Residual | Callable[[Tensor], Tensor],
        h: Tensor,
        *,
        independent_rows: bool = False,
        declared: tuple[str, str] = (
            "the map couples rows declared independent",
            "declare one coupled system instead",
        ),
        trace_tangent: bool = True,
    ) -> None:
        self.residual = residual if isinstance(residual, Residual) else Residual(residual)
        self.trace_tangent = trace_tangent
        self.h = h
        self.independent_rows = independent_rows
        self.declared = declared
        self._rows_checked = False
        #: where its dense factors are kept between passes over the same batch (None: not)
        self.kept_factors: FactorSlot | None = None
        self._batching_checked = False  # vmapped VJPs checked against a plain one
        self.shape = (h.numel(), h.numel())
        self.dtype, self.device = h.dtype, h.device
        self._pullback: Callable[[Tensor], tuple[Tensor]] | None = None  # on first Aᵀ
        self._tangent: Linearized | None = None  # on first A

    @property
    def samples(self) -> int:
        """``S``, the rows of the state (independent systems when declared so)."""
        return self.h.shape[0]

    @property
    def width(self) -> int:
        """``d``, the width of a row."""
        return self.h.shape[1]

    def __repr__(self) -> str:
        return f"ResidualOperator(samples={self.samples}, width={self.width}, dtype={self.dtype})"

    @property
    def _tangent_product(self) -> Linearized:
        # traced once, verified, then replayed (iterative solves take tens of products)
        if self._tangent is None:
            self._tangent = linearize(self.residual, self.h, self.trace_tangent)
        return self._tangent

    def _residual_jvp(self, v: Tensor) -> Tensor:
        return self._tangent_product(v.contiguous())

    def apply(self, v: Tensor) -> Tensor:
        """``(I − J) v``, by JVPs.

        Leading dimensions are directions: the traced tangent is replayed for each, or
        one vmapped JVP is taken where the cell cannot be traced.

        Args:
            v: directions ``[..., S, d]``.

        Returns:
            ``(I − J) v``, shaped like ``v``.
        """
        if v.ndim == 2 or v.numel() == self.h.numel():
            return -self._residual_jvp(v.reshape(self.h.shape)).reshape(v.shape)
        directions = v.reshape(-1, *self.h.shape)
        tangent = self._tangent_product
        if tangent.traced is None:  # the first product decides whether the trace serves
            first = tangent(directions[0].contiguous())
            if not tangent.traced:
                rest = _over_leading(tangent.plain, directions[1:])
                return -torch.cat([first[None], rest]).reshape(v.shape)
            products = [first, *(tangent(d.contiguous()) for d in directions[1:])]
            return -torch.stack(products).reshape(v.shape)
        if tangent.traced:  # replaying the trace per direction beats a vmapped fresh JVP
            return -torch.stack([tangent(d.contiguous()) for d in directions]).reshape(v.shape)
        return -_over_leading(tangent.plain, v)

    def apply_transpose(self, w: Tensor) -> Tensor:
        """``(I − J)ᵀ w`` for ``w`` ``[..., S, d]``."""
        if self._pullback is None:  # built outside any vmap, then reused
            self._pullback = torch.func.vjp(self.residual, self.h)[1]
        pullback = self._pullback

        def product(cotangent: Tensor) -> Tensor:
            return pullback(cotangent)[0]

        out = _over_leading(product, w)
        if not self._batching_checked and w.ndim > 2 and w[..., 0, 0].numel() > 1:
            self._batching_checked = True  # once: the first block's first direction
            flat = w.reshape(-1, *w.shape[-2:])
            check_batched(product, flat, out.reshape(flat.shape))
        return -out

    def matmat(self, block: Tensor) -> Tensor:
        """``(I − J) V`` for flat ``V`` ``[S·d, K]``."""
        return self._flat(self.apply, block)

    def rmatmat(self, block: Tensor) -> Tensor:
        """``(I − J)ᵀ W`` for flat ``W`` ``[S·d, K]``."""
        return self._flat(self.apply_transpose, block)

    def _flat(self, product: Callable[[Tensor], Tensor], block: Tensor) -> Tensor:
        rows = block.T.reshape(block.shape[1], self.samples, self.width)
        return product(rows).reshape(block.shape[1], -1).T

    def require_independent_rows(self, products: Callable[[Tensor], Tensor] | None = None) -> None:
        """Check, once, that rows declared independent are (see :func:`row_coupling`).

        Args:
            products: ``(I − J)ᵀ`` on ``[K, S, d]`` (default :meth:`apply_transpose`).

        Raises:
            InputError: ``F`` couples rows declared independent.
            NonFiniteError: ``∂F/∂h`` is not finite at the fixed point.
        """
        if not self.independent_rows or self._rows_checked:
            return
        coupling, row = row_coupling(products or self.apply_transpose, self.h)
        if not math.isfinite(coupling):
            raise NonFiniteError(
                f"∂F/∂h is not finite at the fixed point (sample {row}): its derivatives do "
                "not exist there. Check the map for non-differentiable points (sqrt or abs "
                "at 0, log at 0) at the equilibrium.",
                quantity="∂F/∂h",
            )
        if coupling > coupling_tolerance(self.h.dtype):
            what, remedy = self.declared
            raise InputError(
                f"{what} (declared independent): the products of ∂F/∂h for sample {row} "
                f"change by a relative {coupling:.1e} when only the other samples' "
                f"directions are rescaled (0 for independent samples); {remedy}."
            )
        self._rows_checked = True

    def jacobian_blocks(self, chunk_size: int | None = None) -> Tensor:
        """The diagonal blocks of ``J`` (see :func:`jacobian_blocks`).

        Exact when the rows are independent (checked first if declared: the check's
        few VJPs go through the same vmapped pullback as the blocks' ``d``).

        Args:
            chunk_size: VJPs vmapped at once.

        Returns:
            The blocks ``[S, d, d]``.
        """
        found: list[Tensor] = []

        def products(probes: Tensor) -> Tensor:  # (I − J)ᵀ probes = probes − Jᵀ probes
            blocks, pulled = jacobian_blocks(self.residual.fn, self.h, chunk_size, probes)
            found.append(blocks)
            return probes - pulled

        self.require_independent_rows(products)  # a no-op where checked or not declared
        # (and where one row leaves nothing to check: then no probe was pulled back)
        return found[0] if found else jacobian_blocks(self.residual.fn, self.h, chunk_size)


def _over_leading(fn: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    if v.ndim == 2:
        return fn(v)
    flat = v.reshape(-1, *v.shape[-2:])
    if flat.shape[0] == 1:  # one direction: no vmap overhead
        return fn(flat[0]).reshape(v.shape)
    return torch.func.vmap(fn)(flat).reshape(v.shape)
