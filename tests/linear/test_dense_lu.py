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
