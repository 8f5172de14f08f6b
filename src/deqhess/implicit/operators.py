"""Curvature operators: the Hessian and its parts as ``P × P`` linear operators.

An operator applies exact products ``H V`` for flat ``[P]`` vectors, ``[P, K]`` blocks
(the K directions go through the solves and AD passes together), θ-structured vectors
and, as curvlinops operators do, lists of tensors in θ's flattening order; it is a
symmetric :class:`deqhess.operator.Operator`, so it converts to a dense tensor or a
``scipy.sparse.linalg.LinearOperator``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import overload

import torch
from torch import Tensor

from ..chunks import default_chunk_size
from ..errors import InputError
from ..operator import Operator
from ..parameters import ParameterLayout, Parameters

__all__ = ["OPERATOR_PARTS", "PARTS", "CurvatureOperator"]

#: the operators of an equilibrium: the Hessian and its two parts at the fixed point,
#: the loss curvature ``[I; Z]ᵀ∇²L[I; Z]`` (the Gauss–Newton matrix of θ ↦ h* when L
#: ignores θ; indefinite when L(h, θ) holds a readout) and the dynamics curvature.
PARTS = ("total", "loss_curvature", "dynamics_curvature")

#: every operator's name: also the GGN ``Jᵀ∇²ℓJ`` at a model's output (deqhess.models).
OPERATOR_PARTS = (*PARTS, "ggn")


def check_part(part: str, allowed: tuple[str, ...] = PARTS) -> str:
    if part not in allowed:
        raise InputError(f"unknown curvature part {part!r}; use one of {list(allowed)}.")
    return part


class CurvatureOperator(Operator):
    """A symmetric ``P × P`` operator given by block products ``[K, P] → [K, P]``.

    Args:
        products: ``V ↦ (H Vᵀ)ᵀ`` on row-blocks of directions ``[K, P]``.
        layout: θ's layout (structure, dtype, device).
        part: which operator this is (one of :data:`PARTS`).
        chunk_size: directions per block product in :meth:`to_dense` and large
            ``[P, K]`` products; default about 4M numbers per chunk.
        dense: ``() ↦`` the ``[P, P]`` matrix by a cheaper assembly than ``P`` products,
            used by :meth:`to_dense` (None: ``P`` products).
        streamed: each product is a pass over a data set (see
            :attr:`deqhess.operator.Operator.streamed`).
        held: ``products ↦`` the front end's :meth:`holding` block (None: nothing to
            keep).
    """

    symmetric = True

    def __init__(
        self,
        products: Callable[[Tensor], Tensor],
        layout: ParameterLayout,
        part: str,
        chunk_size: int | None = None,
        dense: Callable[[], Tensor] | None = None,
        streamed: bool = False,
        held: Callable[[int | None], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        self._products = products
        self._held = held
        self.streamed = streamed
        self._dense = dense
        self.layout = layout
        self.part = check_part(part, OPERATOR_PARTS)
        self.chunk_size = chunk_size
        p = layout.size
        self.shape = (p, p)
        self.dtype, self.device = layout.dtype, layout.device

    def __repr__(self) -> str:
        return f"CurvatureOperator(part={self.part!r}, shape={self.shape}, dtype={self.dtype})"

    def holding(self, products: int | None = None) -> contextlib.AbstractContextManager[None]:
        """The front end's block keeping what products share.

        Args:
            products: the products the block will take at most, if known.

        Returns:
            Its context manager (see :meth:`deqhess.operator.Operator.holding`; a model's
            operator keeps batch graphs, others nothing).
        """
        return self._held(products) if self._held is not None else contextlib.nullcontext()

    def to_dense(self) -> Tensor:
        """The operator as a dense matrix.

        By its front end's own assembly where it has one (a model's, in one pass over
        the data), else from ``P`` products; refused with
        :class:`deqhess.DenseMemoryError` when it would not fit.

        Returns:
            The ``[P, P]`` matrix.
        """
        return self._dense() if self._dense is not None else super().to_dense()

    def matmat(self, block: Tensor) -> Tensor:
        """``H V`` for ``V`` ``[P, K]``.

        Returns:
            ``H V`` ``[P, K]``.

        Raises:
            InputError: ``block`` is not a ``[P, K]`` tensor.
        """  # noqa: DOC502 (raised by require_operand)
        self.require_operand(block, "matmat")
        p = self.layout.size
        if block.shape[1] == 0:  # no directions: the empty product
            return block.new_zeros(p, 0)
        step = self.chunk_size or default_chunk_size(p)
        outputs = [self._products(chunk.T.contiguous()).T for chunk in block.split(step, dim=1)]
        return torch.cat(outputs, dim=1)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` ``[P]``.

        Returns:
            ``H v`` ``[P]``.

        Raises:
            InputError: ``v`` is not a ``[P]`` tensor.
        """  # noqa: DOC502 (raised by require_operand)
        self.require_operand(v, "matvec", ndim=1)
        return self._products(v[None])[0]

    # Operator.__matmul__ takes tensors; this one takes θ-structured directions and
    # lists too, and gives a tensor for a tensor as Operator does. mypy refuses any
    # wider operand of an overloaded operator override (for reflected operators' sake;
    # none is defined here), so the override is marked.
    @overload  # type: ignore[override]
    def __matmul__(self, other: Tensor) -> Tensor: ...
    @overload
    def __matmul__(self, other: Mapping[str, Tensor]) -> Mapping[str, Tensor]: ...
    @overload
    def __matmul__(self, other: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]: ...
    def __matmul__(
        self, other: Parameters | list[Tensor] | tuple[Tensor, ...]
    ) -> Parameters | list[Tensor]:
        """``H @ v`` in the form of ``v``.

        Args:
            other: a flat ``[P]`` vector, a ``[P, K]`` block, a θ-structured direction, or
                a list of tensors shaped like θ's (each optionally with a trailing ``K``).

        Returns:
            ``H v`` in the same form as ``other``.

        Raises:
            InputError: ``other`` has none of these forms.
        """
        layout = self.layout
        if isinstance(other, Mapping) and layout.matches(other):
            return layout.unflatten(self.matvec(self.checked(layout.flatten(other))))
        if isinstance(other, (list, tuple)):
            return self._list_product(list(other))
        if isinstance(other, Tensor) and other.ndim in (1, 2) and other.shape[0] == layout.size:
            return super().__matmul__(other)
        if isinstance(other, Tensor) and layout.matches(other):  # a θ tensor of another shape
            return layout.unflatten(self.matvec(self.checked(layout.flatten(other))))
        if isinstance(other, Mapping):
            got: object = layout.mismatch(other)
        else:
            got = tuple(other.shape) if isinstance(other, Tensor) else type(other).__name__
        raise InputError(
            f"the operator acts on flat [{layout.size}] vectors, [{layout.size}, K] blocks, "
            f"theta-structured vectors ({layout.describe()}) or lists of tensors shaped "
            f"like theta's; got {got}."
        )

    def _list_product(self, tensors: list[Tensor]) -> list[Tensor]:
        """The product in the convention of curvlinops: one tensor per parameter.

        Args:
            tensors: one tensor per parameter, each ``[*shape]`` or ``[*shape, K]``.

        Returns:
            ``H v`` as one tensor per parameter, shaped like ``tensors``.

        Raises:
            InputError: the tensors do not match θ's shapes (with one common trailing K).
        """
        layout = self.layout
        shapes = list(layout.shapes)
        ok = len(tensors) == len(shapes) and all(isinstance(t, Tensor) for t in tensors)
        trailing: tuple[int, ...] = ()  # the common trailing K, if any
        if ok:
            extra = {tuple(t.shape[len(s) :]) for t, s in zip(tensors, shapes, strict=True)}
            ok = len(extra) == 1 and all(
                tuple(t.shape[: len(s)]) == tuple(s) for t, s in zip(tensors, shapes, strict=True)
            )
            if ok:
                trailing = extra.pop()
                ok = len(trailing) <= 1
        if not ok:
            got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in tensors]
            raise InputError(
                f"a list operand must hold one tensor per parameter with shapes "
                f"{[tuple(s) for s in shapes]} (each optionally with one trailing K); got {got}."
            )
        k = trailing[0] if trailing else 1
        block = torch.cat([t.reshape(-1, k) for t in tensors])
        out = self.matmat(self.checked(block))
        pieces = out.split(list(layout.numels))
        return [p.reshape(*s, *trailing) for p, s in zip(pieces, shapes, strict=True)]
