"""A batch's GGN ``Jᵀ(∇²ℓ J)``, added to a dense sum by its upper block triangle.

A batch's GGN from its output Jacobian is ``Jᵀ(∇²ℓ J)`` with ``J`` ``[M, P]``,
``M < P``. It is symmetric, so of its ``b × b`` column blocks only those on and above
the diagonal are multiplied out, each straight into the running sum's rows
(``addmm_`` on a view: no ``[P, P]`` term per batch, no copy):
``(b + 1)/(2b)`` of the matrix product's arithmetic. The sum's lower triangle is
filled once, at the end (:func:`mirror_upper_`).

``∇²ℓ`` is applied as it is, not factored: a factor ``∇²ℓ = FᵀSF`` would let BLAS
``syrk`` form ``(FJ)ᵀ(FJ)`` in half the arithmetic (0.064 s against 0.07–0.08 s below),
but an eigen-factor is only accurate to ``ε·‖∇²ℓ‖``, which ``J`` can turn into an error
as large as the result (a loss stiff along an output the parameters do not move: 50%
off, found by an adversarial test); ``J``'s rows times ``∇²ℓ`` are exact to rounding in
what they multiply. (A pivoted Cholesky factor of a positive semi-definite ``∇²ℓ``
would keep that accuracy — its error is bounded entry by entry by ``ε·√(∇²ℓᵢᵢ ∇²ℓⱼⱼ)``,
as the direct product's — but not an indefinite one's; not done.)

Measured on the tanh classifier of ``benchmarks/vs_curvlinops.py`` (P = 1,930, four
batches of 320 rows, float64, one thread): 0.07–0.08 s against 0.12 s for the four full
products, and against the same products as ``[P, P]`` terms added to the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..linear.dense import diagonal_block_width, diagonal_blocks

__all__ = ["BLOCKS", "TILE", "SymmetricProduct", "curvature_times", "mirror_upper_"]

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
        left: ``[M, P]`` (``J``).
        right: ``[M, P]`` (``∇²ℓ J``), such that ``leftᵀ right`` is symmetric.
    """

    left: Tensor
    right: Tensor

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
        step = max(1, -(-p // BLOCKS))
        for i in range(0, p, step):
            rows = self.left[:, i : i + step].T
            total[i : i + step, i:].addmm_(rows, self.right[:, i:], alpha=weight)
        return total


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
