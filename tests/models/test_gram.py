"""The GGN's low-rank assembly: ``∇²ℓ = FᵀSF`` without its null space, the signed Gram
matrix ``A₊ᵀA₊ − A₋ᵀA₋`` added by BLAS ``syrk`` into a sum's upper triangle, mirrored once.

References: the plain products ``Jᵀ∇²ℓJ`` in the same dtype; float64 to 1e-13 of the
largest entry (a few roundings of O(M) sums), float32 to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from deqhess.models.gram import LowRankTerm, add_gram_, curvature_factor, mirror_upper_


def _curvatures(m: int, width: int, dtype: torch.dtype, g: torch.Generator) -> list[torch.Tensor]:
    blocks = torch.randn(m // width, width, width, dtype=dtype, generator=g)
    indefinite = torch.block_diag(*(blocks + blocks.transpose(1, 2)))
    definite = torch.block_diag(*(blocks @ blocks.transpose(1, 2)))
    coupled = indefinite + 0.1  # no diagonal blocks: factored whole
    return [indefinite, definite, coupled]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("m, p, width", [(12, 37, 3), (12, 5, 4), (7, 1, 7), (30, 600, 10)])
def test_the_low_rank_term_is_the_product(dtype, tol, m, p, width):
    g = torch.Generator().manual_seed(m + p)
    jacobian = torch.randn(m, p, dtype=dtype, generator=g)
    for curvature in _curvatures(m, width, dtype, g):
        factor, negative = curvature_factor(curvature)
        term = LowRankTerm(factor @ jacobian, negative)
        total = mirror_upper_(term.add_to(term.add_to(None, 2.0), 0.5))
        want = 2.5 * jacobian.T @ curvature @ jacobian
        assert float((total - want).abs().max()) <= tol * float(want.abs().max())
        assert torch.equal(total, total.T)


def test_the_factor_leaves_out_the_null_space_and_orders_the_signs():
    """A cross-entropy's per-sample curvature ``diag(p) − ppᵀ`` has rank C − 1: one row
    fewer per sample; an indefinite curvature's negative rows come last."""
    probabilities = torch.randn(4, 5, dtype=torch.float64).softmax(1)
    curvature = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in probabilities])
    factor, negative = curvature_factor(curvature)
    assert factor.shape == (16, 20) and negative == 0
    assert torch.allclose(factor.T @ factor, curvature, atol=1e-15)
    signs = torch.tensor([3.0, -2.0, 1.0, -1e-3], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    factor, negative = curvature_factor(q @ torch.diag(signs) @ q.T)
    assert negative == 2
    split = len(factor) - negative
    rebuilt = factor[:split].T @ factor[:split] - factor[split:].T @ factor[split:]
    assert torch.allclose(rebuilt, q @ torch.diag(signs) @ q.T, atol=1e-14)
    assert curvature_factor(torch.zeros(3, 3, dtype=torch.float64))[0].shape == (0, 3)


def test_syrk_adds_to_the_upper_triangle_only_and_keeps_the_memory():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(6, 9, dtype=torch.float64, generator=g)
    total = torch.randn(9, 9, dtype=torch.float64, generator=g)
    before, storage = total.clone(), total.data_ptr()
    add_gram_(total, rows, -1.5)
    assert total.data_ptr() == storage
    want = before - 1.5 * rows.T @ rows
    assert torch.allclose(total.triu(), want.triu(), atol=1e-13)
    assert torch.equal(total.tril(-1), before.tril(-1))
    add_gram_(total, rows[:0], 1.0)  # no rows: nothing added
    assert torch.allclose(total.triu(), want.triu(), atol=1e-13)
