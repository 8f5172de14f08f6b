"""Dense LU of I − J: solves, transposed solves, block Jacobians, conditioning."""

from __future__ import annotations

import pytest
import torch

from deqhess import SingularSystemError
from deqhess.linear import DenseLU, default_max_condition, jacobian_blocks


def test_jacobian_blocks_match_autograd_per_sample():
    w = torch.randn(3, 5, 5)

    def fn(h):  # rows independent: sample s uses its own matrix
        return torch.tanh(torch.einsum("sij,sj->si", w, h))

    h = torch.randn(3, 5)
    blocks = jacobian_blocks(fn, h, chunk_size=2)
    full = torch.func.jacrev(fn)(h)  # [3, 5, 3, 5]
    for s in range(3):
        assert torch.allclose(blocks[s], full[s, :, s, :], rtol=0, atol=1e-15)


def test_solves_and_transposed_solves():
    j = 0.3 * torch.randn(2, 6, 6) / 6**0.5
    lu = DenseLU(j)
    a = torch.eye(6) - j
    rhs = torch.randn(4, 2, 6)  # [K, S, d]: K directions over S sample blocks
    x, y = lu.solve(rhs), lu.transpose().solve(rhs)
    assert torch.equal(y, lu.solve_transpose(rhs))
    assert torch.allclose(torch.einsum("sij,ksj->ksi", a, x), rhs, atol=1e-13)
    assert torch.allclose(torch.einsum("sji,ksj->ksi", a, y), rhs, atol=1e-13)
    single = torch.randn(2, 6)  # no leading dims
    assert torch.allclose(torch.einsum("sij,sj->si", a, lu.solve(single)), single, atol=1e-13)
    exact = max(float(torch.linalg.cond(a[s], p=1)) for s in range(2))
    assert exact / 3 <= lu.condition_number <= exact * 3  # gecon is an estimate


def test_exactly_singular_raises():
    j = torch.eye(3)[None]
    with pytest.raises(SingularSystemError, match=r"exactly singular .*block 0.*contraction"):
        DenseLU(j)


def test_ill_conditioned_raises_with_the_estimate():
    j = torch.diag(torch.tensor([1 - 1e-15, 0.5, 0.1]))[None]
    with pytest.raises(
        SingularSystemError, match=r"too ill-conditioned .*exceeds 4\.5\d*e\+14"
    ) as err:
        DenseLU(j)
    assert err.value.condition_number > default_max_condition(torch.float64)


def test_max_condition_is_configurable():
    j = torch.diag(torch.tensor([0.999, 0.5]))[None]
    DenseLU(j)
    with pytest.raises(SingularSystemError, match="too ill-conditioned"):
        DenseLU(j, max_condition=100.0)


def test_diagonal_block_width():
    """The narrowest equal diagonal blocks outside which the matrix is exactly zero: any
    entry outside (also a tiny, a NaN or a one-way one) merges blocks; unequal blocks that
    no equal width covers keep it whole."""
    from deqhess.linear.dense import diagonal_block_width

    blocks = torch.block_diag(*torch.randn(4, 3, 3))
    assert diagonal_block_width(blocks) == 3
    assert diagonal_block_width(torch.eye(6)) == 1
    assert diagonal_block_width(torch.randn(5, 5)) == 5
    assert diagonal_block_width(torch.block_diag(torch.randn(2, 2), torch.randn(3, 3))) == 5
    for row, col, value, width in [
        (0, 5, 1e-300, 6),  # blocks 0 and 1 coupled: blocks of 6 remain
        (11, 0, 1.0, 12),
        (4, 9, float("nan"), 12),  # blocks 1 to 3 coupled
    ]:
        coupled = blocks.clone()
        coupled[row, col] = value
        assert diagonal_block_width(coupled) == width, (row, col)
    inside = blocks.clone()
    inside[4, 4] = float("nan")  # a non-finite entry inside a block stays in that block
    assert diagonal_block_width(inside) == 3


def test_one_system_with_block_diagonal_jacobian_is_solved_by_blocks():
    """``S = 1`` with ``J`` block-diagonal (independent samples under ``batch_dim=None``):
    factorised as its 4 blocks of 6, the solves and transposed solves still solve the whole
    24 × 24 system, and the condition number is the whole system's, not a block's."""
    j = torch.block_diag(*(0.4 * torch.randn(4, 6, 6) / 6**0.5))
    # A's blocks 3·I and 0.1·I are perfectly conditioned; the whole is not (3 / 0.1 = 30)
    j[:6, :6], j[6:12, 6:12] = -2.0 * torch.eye(6), 0.9 * torch.eye(6)
    lu = DenseLU(j[None])
    assert lu.split and lu.lu.shape == (4, 6, 6)
    a = torch.eye(24) - j
    rhs = torch.randn(5, 1, 24)
    x, y = lu.solve(rhs), lu.solve_transpose(rhs)
    assert x.shape == y.shape == rhs.shape
    assert torch.allclose(x[:, 0], torch.linalg.solve(a, rhs[:, 0].T).T, atol=1e-13)
    assert torch.allclose(y[:, 0], torch.linalg.solve(a.T, rhs[:, 0].T).T, atol=1e-13)
    exact = float(torch.linalg.cond(a, p=1))
    worst_block = max(float(torch.linalg.cond(a[6 * k : 6 * k + 6, 6 * k : 6 * k + 6], p=1))
                      for k in range(4))  # fmt: skip
    assert exact >= 30 > 3 * worst_block
    assert exact / 3 <= lu.condition_number <= exact * 3  # gecon is an estimate
    assert not DenseLU(torch.randn(1, 24, 24) / 24).split
