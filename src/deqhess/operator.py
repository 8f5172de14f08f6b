"""The one linear-operator contract of deqhess: ``shape``, ``dtype``, ``matmat``, ``.T``.

Every operator in the library — ``I − J`` at a fixed point
(:class:`deqhess.linear.ResidualOperator`), the Hessian and its parts
(:class:`deqhess.CurvatureOperator`), a principal block of one
(:class:`deqhess.curvature.ParameterBlock`), a counting wrapper
(:class:`deqhess.curvature.Counted`) — subclasses :class:`Operator`. It acts on flat
vectors ``[n]`` and blocks ``[n, K]``, knows whether it is symmetric, has a transpose,
and converts to a dense tensor or a ``scipy.sparse.linalg.LinearOperator``. The
``@``/``adjoint`` surface follows curvlinops' ``PyTorchLinearOperator`` where it is
cheap to do so, so code written for curvlinops operators runs on these.
"""

from __future__ import annotations

import abc
import contextlib

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from .errors import InputError
from .finiteness import all_finite
from .memory import check_dense

__all__ = ["Operator", "scipy_operator"]


class Operator(abc.ABC):
    """A linear map ``A`` of shape ``(m, n)``, applied to blocks ``[n, K] → [m, K]``.

    Subclasses set :attr:`shape`, :attr:`dtype`, :attr:`device` (and :attr:`symmetric`
    when ``A = Aᵀ``) and implement :meth:`matmat`; a non-symmetric operator that has a
    transpose implements :meth:`rmatmat` too.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    #: whether ``A = Aᵀ`` (then ``.T`` is the operator itself).
    symmetric: bool = False
    #: whether each product is a pass over a data set, whose batches' forward solves and
    #: graphs a block's directions share (a block of ten then costs about one product):
    #: the analyses' default blocks are wider for such operators.
    streamed: bool = False

    @abc.abstractmethod
    def matmat(self, block: Tensor) -> Tensor:
        """``A V`` for ``V`` ``[n, K]``, returning ``[m, K]``."""

    def holding(self, products: int | None = None) -> contextlib.AbstractContextManager[None]:
        """A block within which the operator may keep what its products share.

        An analysis that takes many products (Lanczos, conjugate gradients, Hutch++)
        runs inside it. A model's operator (:meth:`deqhess.ModelCurvature.hessian_operator`)
        then keeps each batch's graph from one pass for the next (within its
        ``cache_bytes``), dropped at the end of the block or when the model's parameters
        or buffers change; state the model reads besides them (a plain tensor attribute,
        a global) must not change inside the block. Other operators keep nothing.

        Args:
            products: the products the block will take at most, if known (what is kept
                is prepared for that many).

        Returns:
            A context manager (``with op.holding(): ...``).
        """
        return contextlib.nullcontext()

    def rmatmat(self, block: Tensor) -> Tensor:
        """``Aᵀ W`` for ``W`` ``[m, K]``, returning ``[n, K]``."""
        if self.symmetric:
            return self.matmat(block)
        raise NotImplementedError(f"{type(self).__name__} has no transpose product.")

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` ``[n]``."""
        return self.matmat(v[:, None])[:, 0]

    def rmatvec(self, w: Tensor) -> Tensor:
        """``Aᵀ w`` for ``w`` ``[m]``."""
        return self.rmatmat(w[:, None])[:, 0]

    @property
    def T(self) -> Operator:
        """The transpose ``Aᵀ`` (the operator itself when symmetric)."""
        return self if self.symmetric else _Transposed(self)

    def adjoint(self) -> Operator:
        """``Aᵀ`` (real operators), under curvlinops' and SciPy's name."""
        return self.T

    def __matmul__(self, other: Tensor) -> Tensor:
        """``A @ v`` for ``[n]`` vectors and ``[n, K]`` blocks."""
        n = self.shape[1]
        if isinstance(other, Tensor) and other.ndim in (1, 2) and other.shape[0] == n:
            other = self.checked(other)
            return self.matvec(other) if other.ndim == 1 else self.matmat(other)
        got = tuple(other.shape) if isinstance(other, Tensor) else type(other).__name__
        raise InputError(
            f"{type(self).__name__} acts on flat [{n}] vectors or [{n}, K] blocks; got {got}."
        )

    def require_operand(self, value: object, call: str, ndim: int = 2) -> None:
        """Refuse what ``call`` cannot take: a flat ``[n]`` vector or an ``[n, K]`` block.

        Args:
            value: what the caller passed.
            call: the method's name, for the message (``"matmat"``, ``"matvec"``).
            ndim: 1 for a vector, 2 for a block.

        Raises:
            InputError: ``value`` is not a tensor of that form; the message points a vector
                given for a block (or a block for a vector) to the other method.
        """
        n = self.shape[1]
        if isinstance(value, Tensor) and value.ndim == ndim and value.shape[0] == n:
            return
        forms = {1: (f"flat [{n}] vectors", "matvec(v)"), 2: (f"[{n}, K] blocks", "matmat(V)")}
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        other = 3 - ndim
        hint = ""
        if isinstance(value, Tensor) and value.ndim == other and value.shape[0] == n:
            hint = f" For {forms[other][0]}, use op.{forms[other][1]} or op @ v."
        raise InputError(f"{type(self).__name__}.{call} takes {forms[ndim][0]}; got {got}.{hint}")

    def checked(self, v: Tensor) -> Tensor:
        """``v`` detached, after checking its dtype and that it is finite.

        Returns:
            ``v`` detached; a tensor made under ``torch.inference_mode`` as a plain copy
            (the products' autograd graphs cannot save it).

        Raises:
            InputError: ``v`` has another dtype than the operator, or non-finite entries.
        """
        if v.dtype != self.dtype:
            raise InputError(
                f"vector has dtype {v.dtype} but the operator is {self.dtype}; convert it "
                f"with .to({self.dtype})."
            )
        if not all_finite(v):
            raise InputError("vector contains non-finite values (NaN or inf).")
        if v.is_inference():
            with torch.inference_mode(False):
                return v.clone()
        return v.detach()

    def to_dense(self) -> Tensor:
        """The ``[m, n]`` matrix, from ``n`` products.

        Refused with :class:`~deqhess.DenseMemoryError`, before allocating, when the
        identity, the products and the result (about ``3·m·n`` numbers) would not fit in
        the memory available (see :func:`deqhess.memory_limit`).

        Returns:
            ``A`` as a dense ``[m, n]`` tensor of the operator's dtype and device.
        """
        m, n = self.shape
        check_dense(
            m * n + 2 * n * n,
            self.dtype,
            self.device,
            f"op.to_dense() on a {type(self).__name__} ({m:,} × {n:,})",
            "Apply the operator to the vectors you need (op @ V for an [n, K] block), or use "
            "the analyses of deqhess.curvature, which need only products.",
        )
        return self.matmat(torch.eye(n, dtype=self.dtype, device=self.device))

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (NumPy in and out, this precision)."""
        return scipy_operator(self)


class _Transposed(Operator):
    def __init__(self, op: Operator) -> None:
        self.op = op
        self.shape = (op.shape[1], op.shape[0])
        self.dtype, self.device = op.dtype, op.device

    def matmat(self, block: Tensor) -> Tensor:
        return self.op.rmatmat(block)

    def rmatmat(self, block: Tensor) -> Tensor:
        return self.op.matmat(block)

    @property
    def T(self) -> Operator:
        return self.op

    def __repr__(self) -> str:
        return f"{self.op!r}.T"


def scipy_operator(op: Operator) -> LinearOperator:
    """``op`` as a ``scipy.sparse.linalg.LinearOperator``.

    Args:
        op: the operator.

    Returns:
        A SciPy operator taking vectors and blocks, NumPy in and out, in ``op``'s
        precision (``rmatvec`` by the transpose product).
    """
    np_dtype = np.float64 if op.dtype == torch.float64 else np.float32

    def as_block(a: np.ndarray) -> tuple[Tensor, tuple[int, ...]]:
        t = torch.as_tensor(np.asarray(a, dtype=np_dtype), device=op.device)
        return t.reshape(t.shape[0], -1), t.shape

    def apply(a: np.ndarray) -> np.ndarray:
        block, shape = as_block(a)
        return op.matmat(block).reshape(op.shape[0], *shape[1:]).cpu().numpy()

    def apply_transpose(a: np.ndarray) -> np.ndarray:
        block, shape = as_block(a)
        return op.rmatmat(block).reshape(op.shape[1], *shape[1:]).cpu().numpy()

    return LinearOperator(
        op.shape,
        matvec=apply,
        rmatvec=apply_transpose,
        matmat=apply,
        rmatmat=apply_transpose,
        dtype=np_dtype,
    )
