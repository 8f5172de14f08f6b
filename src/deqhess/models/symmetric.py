"""A batch's GGN ``Jᵀ(∇²ℓ J)``, added to a dense sum by its upper triangle.

A batch's GGN from its output Jacobian is ``Jᵀ(∇²ℓ J)`` with ``J`` ``[M, P]``,
``M < P``. It is symmetric, so only its upper triangle is formed, straight into the
running sum (no ``[P, P]`` term per batch); the sum's lower triangle is filled once, at
the end (:func:`mirror_upper_`). Two ways, chosen by whether :func:`loss_factor` finds
a factor:

* ``∇²ℓ`` positive semi-definite per sample (cross-entropy, squared error — any convex
  loss of each sample's outputs): its pivoted Cholesky factor ``∇²ℓ = RᵀR``
  (:func:`deqhess.linear.cholesky.pivoted_cholesky`, accurate entry by entry as the
  direct product is) makes the term a Gram matrix ``(RJ)ᵀ(RJ)`` of ``rank(∇²ℓ)`` rows
  per sample (``C − 1`` for softmax cross-entropy; each row one vector-Jacobian product
  along a row of ``R``), formed by BLAS ``syrk`` on the CPU (:func:`_syrk_`), by the
  column blocks below elsewhere;
* otherwise ``Jᵀ(∇²ℓ J)`` as it is: of ``b × b`` column blocks only those on and above
  the diagonal are multiplied out, each ``addmm_``-ed into the sum's rows, ``(b + 1)/(2b)``
  of the product's arithmetic.

Measured on the tanh classifier of ``benchmarks/vs_curvlinops.py`` (P = 1,930, four
batches of 320 rows, float64, one thread): 0.060 s by ``syrk`` on the factor's 288 rows a
batch, 0.075 s by the column blocks on all 320, 0.12 s for the four full products.
An eigen-factor of ``∇²ℓ`` would allow ``syrk`` too, but is only accurate to
``ε·‖∇²ℓ‖``, which ``J`` can turn into an error as large as the result (a loss stiff
along an output the parameters do not move: 50% off, found by an adversarial test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas
from torch import Tensor

from ..linear.cholesky import pivoted_cholesky
from ..linear.dense import diagonal_block_width, diagonal_blocks

__all__ = [
    "BLOCKS",
    "TILE",
    "SymmetricProduct",
    "UpperRows",
    "curvature_times",
    "loss_factor",
    "mirror_upper_",
]

#: column blocks of :class:`SymmetricProduct` (``(b + 1)/(2b)`` = 56% of the arithmetic;
#: more, smaller blocks ran no faster)
BLOCKS = 8

#: the tile of :func:`mirror_upper_`'s transposed copies (in cache, both ways)
TILE = 256


@dataclass
class SymmetricProduct:
    """One batch's ``[P, P]`` term ``leftᵀ right``, known to be symmetric, as its factors.

    A data-set sum adds it with :meth:`add_to`, into its upper triangle (and some
    entries below it, in the diagonal blocks); the sum is made whole by
    :func:`mirror_upper_` at the end.

    Attributes:
        left: ``[M, P]`` (``J``, or ``RJ`` for a Gram term).
        right: ``[M, P]`` (``∇²ℓ J``), such that ``leftᵀ right`` is symmetric; None for
            the Gram matrix ``leftᵀ left``.
    """

    left: Tensor
    right: Tensor | None = None

    def add_to(self, total: Tensor | None, weight: float) -> Tensor:
        """``total + weight · leftᵀ right`` on and above the diagonal, in place.

        Args:
            total: ``[P, P]``, whose upper triangle holds the sum so far (None: zero).
            weight: the term's weight.

        Returns:
            ``total`` (or a new zero sum), its upper triangle added to in place.
        """
        p = self.left.shape[1]
        if total is None:
            total = self.left.new_zeros(p, p)
        if self.right is None and _syrk_(total, self.left, weight):
            return total
        right = self.left if self.right is None else self.right
        step = max(1, -(-p // BLOCKS))
        for i in range(0, p, step):
            rows = self.left[:, i : i + step].T
            total[i : i + step, i:].addmm_(rows, right[:, i:], alpha=weight)
        return total


class UpperRows:
    """One batch's symmetric ``[P, P]`` term as blocks of its rows right of a column.

    Each block holds the rows ``[start, start + k)`` from a column ``column ≤ start`` on
    (:meth:`deqhess.models.graph.BatchGraph.upper_rows`): together, the term's upper
    triangle.

    A data-set sum adds it with :meth:`add_to`, into its upper triangle (the blocks also
    hold entries below the diagonal, in the diagonal blocks); the sum is made whole by
    :func:`mirror_upper_` at the end.

    Args:
        size: ``P``.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: list[tuple[int, int, Tensor]] = []

    def add(self, start: int, column: int, rows: Tensor) -> None:
        """Keep rows ``[start, start + len(rows))``, columns ``[column, P)``.

        Args:
            start: the rows' first row.
            column: their first column, at most ``start``.
            rows: ``[k, P − column]``.
        """
        self.blocks.append((start, column, rows))

    def add_to(self, total: Tensor | None, weight: float) -> Tensor:
        """``total + weight · term`` on and above the diagonal, in place.

        Args:
            total: ``[P, P]``, whose upper triangle holds the sum so far (None: zero).
            weight: the term's weight.

        Returns:
            ``total`` (or a new zero sum), its upper triangle added to in place.
        """
        if total is None:
            like = self.blocks[0][2]
            total = like.new_zeros(self.size, self.size)
        for start, column, rows in self.blocks:
            total[start : start + rows.shape[0], column:].add_(rows, alpha=weight)
        return total


#: BLAS ``syrk`` by dtype (CPU tensors of these dtypes only)
_SYRK = {torch.float64: blas.dsyrk, torch.float32: blas.ssyrk}


def _syrk_(total: Tensor, rows: Tensor, weight: float) -> bool:
    """``total += weight · rowsᵀ rows`` on and above the diagonal, by BLAS ``syrk``.

    Args:
        total: ``[P, P]``, contiguous, on the CPU.
        rows: ``[M, P]``, of ``total``'s dtype.
        weight: the term's weight.

    Returns:
        Whether it was done: ``syrk`` serves contiguous float32 / float64 CPU tensors
        outside autograd; otherwise ``total`` is untouched (the caller multiplies).

    SciPy's BLAS takes its thread count from the environment (``OMP_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS``), not from ``torch.set_num_threads``.
    """
    syrk = _SYRK.get(total.dtype)
    if (
        syrk is None
        or total.device.type != "cpu"
        or rows.device.type != "cpu"
        or rows.dtype != total.dtype
        or not total.is_contiguous()
        or total.requires_grad
        or rows.requires_grad
    ):
        return False
    if rows.shape[0] == 0:
        return True
    # row-major [P, P] is column-major transposed: BLAS's lower triangle of total.T
    # is total's upper one; rows.T, column-major [P, M], times its transpose is rowsᵀrows
    target = total.numpy().T
    out = syrk(weight, rows.contiguous().numpy().T, beta=1.0, c=target, trans=0, lower=1,
               overwrite_c=1)  # fmt: skip
    if not np.shares_memory(out, target):  # f2py made a copy: bring the result back
        target[...] = out
    return True


def loss_factor(curvature: Tensor) -> Tensor | None:
    """Rows ``R`` with ``RᵀR = ∇²ℓ`` (to rounding, entry by entry), where it factors.

    ``∇²ℓ`` factors when it is positive semi-definite in diagonal blocks (a loss summed
    over samples, rows ordered sample by sample; or one block) no wider than
    :data:`deqhess.linear.cholesky.MAX_WIDTH`: each block's pivoted Cholesky factor
    (:func:`deqhess.linear.cholesky.pivoted_cholesky`), placed in its block's columns.
    Then ``Jᵀ∇²ℓJ`` is the Gram matrix of ``RJ``, whose rows are vector-Jacobian
    products along ``R``'s rows: ``rank(∇²ℓ)`` of them per block (``C − 1`` for softmax
    cross-entropy) instead of ``J``'s ``C``.

    Args:
        curvature: ``[M, M]``, the symmetric ``∇²ℓ`` at the output.

    Returns:
        ``[r·M/w, M]`` (``w`` the blocks' width, ``r`` their largest rank); None where
        ``∇²ℓ`` does not factor so (the term is then ``Jᵀ(∇²ℓ J)``, :func:`curvature_times`).
    """
    m = curvature.shape[0]
    if m == 0:
        return None
    width = diagonal_block_width(curvature)
    factor = pivoted_cholesky(diagonal_blocks(curvature, width))  # [B, r, w]
    if factor is None:
        return None
    count, rank = factor.shape[:2]
    rows = factor.new_zeros(count, rank, count, width)
    index = torch.arange(count, device=factor.device)
    rows[index, :, index] = factor
    return rows.reshape(count * rank, m)


def curvature_times(curvature: Tensor, jacobian: Tensor) -> Tensor:
    """``∇²ℓ J`` (``[M, M] @ [M, P]``), by its diagonal blocks where it has them.

    A loss that is a sum over samples has a block-diagonal ``∇²ℓ`` (``C × C`` per
    sample, rows ordered sample by sample): its ``n_b`` blocks multiply their own rows of
    ``J``, ``n_b`` times fewer operations than the dense product. A loss coupling samples
    (or outputs whose rows interleave them) keeps the dense product.

    Args:
        curvature: ``[M, M]``: ``∇²ℓ`` at the output.
        jacobian: ``[M, P]``: ``J``.

    Returns:
        ``[M, P]``: ``∇²ℓ J``.
    """
    m = curvature.shape[0]
    width = diagonal_block_width(curvature) if m else 1
    if width == m:
        return curvature @ jacobian
    blocks = diagonal_blocks(curvature, width)  # [M/w, w, w]
    return (blocks @ jacobian.reshape(m // width, width, -1)).reshape(m, -1)


def mirror_upper_(matrix: Tensor) -> Tensor:
    """Make ``matrix`` symmetric from its upper triangle, in place, tile by tile.

    Args:
        matrix: ``[P, P]``.

    Returns:
        ``matrix``, its strictly lower triangle overwritten by the upper's transpose.
    """
    p = matrix.shape[0]
    for i in range(0, p, TILE):
        block = matrix[i : i + TILE, i : i + TILE]
        block.copy_(block.triu() + block.triu(1).T)
        for j in range(i + TILE, p, TILE):
            matrix[j : j + TILE, i : i + TILE].copy_(matrix[i : i + TILE, j : j + TILE].T)
    return matrix
