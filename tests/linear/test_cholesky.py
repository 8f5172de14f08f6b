"""The pivoted Cholesky factor of positive semi-definite blocks, and its refusals.

References: the blocks themselves (``RᵀR`` against ``A``, entry by entry relative to
``√(aᵢᵢaⱼⱼ)`` — the bound the factor promises, a few ``w·ε``), closed forms (softmax
cross-entropy's ``diag(p) − ppᵀ`` has rank ``C − 1``), and matrices that are not
positive semi-definite, which must get no factor.
"""

from __future__ import annotations

import pytest
import torch

from deqhess.linear.cholesky import MAX_WIDTH, TOLERANCE, pivoted_cholesky


def _entrywise_error(factor: torch.Tensor, blocks: torch.Tensor) -> float:
    """``max |RᵀR − A|ᵢⱼ / √(aᵢᵢaⱼⱼ)`` in units of ``w·ε``."""
    diagonal = blocks.diagonal(dim1=1, dim2=2)
    scale = (diagonal[:, :, None] * diagonal[:, None, :]).sqrt()
    error = (factor.transpose(1, 2) @ factor - blocks).abs()
    relative = torch.where(scale > 0, error / scale, error)
    return float(relative.max()) / (blocks.shape[-1] * torch.finfo(blocks.dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("count, width, rank", [(5, 7, 7), (5, 7, 3), (1, 40, 12), (3, 1, 1)])
def test_a_positive_semi_definite_block_is_its_factors_gram_matrix(dtype, count, width, rank):
    g = torch.Generator().manual_seed(width + rank)
    roots = torch.randn(count, rank, width, generator=g, dtype=torch.float64)
    blocks = (roots.transpose(1, 2) @ roots).to(dtype)
    factor = pivoted_cholesky(blocks)
    assert factor is not None and factor.shape == (count, rank, width)
    assert _entrywise_error(factor, blocks) <= TOLERANCE


def test_softmax_cross_entropy_factors_with_one_row_fewer_than_classes():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 10, generator=g, dtype=torch.float64), 1)
    blocks = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    factor = pivoted_cholesky(blocks)
    assert factor is not None and factor.shape == (6, 9, 10)
    assert _entrywise_error(factor, blocks) <= TOLERANCE


def test_a_stiff_entry_leaves_the_others_exact():
    """``[[2, √K], [√K, K]]`` with K = 2⁵²: an eigen-factor is off by ``ε·K ≈ 1`` in the
    first entry; the pivoted factor keeps it to a few ε (entry by entry)."""
    stiff, e = 2.0**52, 2.0**-26
    a = torch.tensor([[stiff * e * e + 1, stiff * e - e], [stiff * e - e, stiff + e * e]])
    factor = pivoted_cholesky(a[None].double())
    assert factor is not None
    assert abs(float((factor.mT @ factor)[0, 0, 0]) - 2.0) <= 1e-14


@pytest.mark.parametrize(
    "block",
    [
        [[0.0, 1.0], [1.0, 0.0]],  # zero diagonal, indefinite
        [[1.0, 2.0], [2.0, 1.0]],  # positive diagonal, indefinite
        [[-1.0, 0.0], [0.0, 2.0]],  # a negative diagonal entry
        [[1.0, 0.0], [0.0, float("nan")]],
        [[1.0, float("inf")], [float("inf"), 1.0]],
    ],
)
def test_a_block_that_is_not_positive_semi_definite_has_no_factor(block):
    good = torch.eye(2, dtype=torch.float64)
    assert pivoted_cholesky(torch.stack([good, torch.tensor(block, dtype=torch.float64)])) is None


def test_an_indefinite_remainder_with_a_zero_diagonal_refuses():
    """After the first pivot the rest is ``[[0, δ], [δ, 0]]``: no diagonal entry left to
    pivot on, but an off-diagonal one far above rounding — indefinite, no factor."""
    block = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1e-3], [0.0, 1e-3, 0.0]], dtype=torch.float64)
    assert pivoted_cholesky(block[None]) is None


def test_zero_blocks_factor_to_no_rows_and_wide_blocks_are_not_factored():
    factor = pivoted_cholesky(torch.zeros(3, 4, 4, dtype=torch.float64))
    assert factor is not None and factor.shape == (3, 0, 4)
    wide = torch.eye(MAX_WIDTH + 1, dtype=torch.float64)[None]
    assert pivoted_cholesky(wide) is None


def test_the_blocks_are_not_modified():
    g = torch.Generator().manual_seed(3)
    roots = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    blocks = roots.transpose(1, 2) @ roots
    kept = blocks.clone()
    pivoted_cholesky(blocks)
    assert torch.equal(blocks, kept)
