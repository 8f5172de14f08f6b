"""Curvature operators: the Hessian and its two parts as ``P × P`` linear operators.

An operator applies exact products ``H V`` for flat ``[P]`` vectors, ``[P, K]`` blocks
(the K directions go through the solves and AD passes together) and θ-structured
vectors, and converts to a dense tensor or a ``scipy.sparse.linalg.LinearOperator``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from ..chunks import default_chunk_size
from ..parameters import ParameterLayout, Parameters

__all__ = ["OPERATOR_PARTS", "PARTS", "CurvatureOperator", "scipy_operator"]

#: the operators of an equilibrium: the Hessian and its two parts at the fixed point,
#: the loss curvature ``[I; Z]ᵀ∇²L[I; Z]`` (the Gauss–Newton matrix of θ ↦ h* when L
#: ignores θ; indefinite when L(h, θ) holds a readout) and the dynamics curvature.
PARTS = ("total", "loss_curvature", "dynamics_curvature")

#: every operator's name: also the GGN ``Jᵀ∇²ℓJ`` at a model's output (deqhess.models).
OPERATOR_PARTS = (*PARTS, "ggn")


def check_part(part: str, allowed: tuple[str, ...] = PARTS) -> str:
    if part not in allowed:
        raise ValueError(f"unknown curvature part {part!r}; use one of {list(allowed)}.")
    return part


class CurvatureOperator:
    """A symmetric ``P × P`` operator given by block products ``[K, P] → [K, P]``.

    Args:
        products: ``V ↦ (H Vᵀ)ᵀ`` on row-blocks of directions ``[K, P]``.
        layout: θ's layout (structure, dtype, device).
        part: which operator this is (one of :data:`PARTS`).
        chunk_size: directions per block product in :meth:`to_dense` and large
            ``[P, K]`` products; default about 4M numbers per chunk.
    """

    def __init__(
        self,
        products: Callable[[Tensor], Tensor],
        layout: ParameterLayout,
        part: str,
        chunk_size: int | None = None,
    ) -> None:
        self._products = products
        self.layout = layout
        self.part = check_part(part, OPERATOR_PARTS)
        self.chunk_size = chunk_size

    @property
    def shape(self) -> tuple[int, int]:
        p = self.layout.size
        return (p, p)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def __repr__(self) -> str:
        return f"CurvatureOperator(part={self.part!r}, shape={self.shape}, dtype={self.dtype})"

    def matmat(self, block: Tensor) -> Tensor:
        """``H V`` for ``V`` ``[P, K]``."""
        p = self.layout.size
        step = self.chunk_size or default_chunk_size(p)
        outputs = [self._products(chunk.T.contiguous()).T for chunk in block.split(step, dim=1)]
        return torch.cat(outputs, dim=1)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` ``[P]``."""
        return self._products(v[None])[0]

    def __matmul__(self, other: Parameters) -> Parameters:
        """``H @ v``: ``[P]`` → ``[P]``, ``[P, K]`` → ``[P, K]``, θ-structured → same."""
        p = self.layout.size
        if self.layout.names is not None and self.layout.matches(other):
            return self.layout.unflatten(self.matvec(self._checked(self.layout.flatten(other))))
        if isinstance(other, Tensor) and other.ndim in (1, 2) and other.shape[0] == p:
            other = self._checked(other)
            return self.matvec(other) if other.ndim == 1 else self.matmat(other)
        if self.layout.matches(other):  # a single-tensor θ of another shape
            return self.layout.unflatten(self.matvec(self._checked(self.layout.flatten(other))))
        got = tuple(other.shape) if isinstance(other, Tensor) else type(other).__name__
        raise ValueError(
            f"the operator acts on flat [{p}] vectors, [{p}, K] blocks or theta-structured "
            f"vectors ({self.layout.describe()}); got {got}."
        )

    def _checked(self, v: Tensor) -> Tensor:
        if v.dtype != self.dtype:
            raise ValueError(
                f"vector has dtype {v.dtype} but the operator is {self.dtype}; convert it "
                f"with .to({self.dtype})."
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError("vector contains non-finite values (NaN or inf).")
        return v.detach()

    def to_dense(self) -> Tensor:
        """The ``[P, P]`` matrix, column block by column block (``P`` products)."""
        eye = torch.eye(self.layout.size, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (NumPy in and out, θ's precision).

        Symmetric, so ``rmatvec`` is ``matvec``: ready for ``eigsh``, ``cg``, ``minres``.
        """
        return scipy_operator(self)


def scipy_operator(op) -> LinearOperator:
    """A symmetric operator with ``shape``, ``dtype``, ``device`` and ``matmat`` as a
    ``scipy.sparse.linalg.LinearOperator`` (vectors and blocks, NumPy in and out)."""
    np_dtype = np.float64 if op.dtype == torch.float64 else np.float32

    def apply(a: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(a, dtype=np_dtype), device=op.device)
        return op.matmat(t.reshape(t.shape[0], -1)).reshape(t.shape).cpu().numpy()

    return LinearOperator(
        op.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=np_dtype
    )
