"""Vmapped products checked against plain calls (:mod:`deqhess.linear.batched`).

The reference is torch itself: a product taken one direction at a time by a plain
call. ``torch.cdist``'s backward under ``vmap`` is wrong in torch 2.13 (0.2 off here),
which made a gradient through it silently 17% off (and, with ``batch_dim=0``, a false
refusal as "f couples the samples").
"""

from __future__ import annotations

import pytest
import torch

import deqhess as dh
from deqhess.linear.batched import check_batched


def _f(x, h, theta):
    distances = torch.cdist(h, theta["A"])
    return torch.tanh(h @ theta["W"].T + x @ theta["U"].T + 0.1 * distances.sum(1, keepdim=True))


def _problem():
    g = torch.Generator().manual_seed(0)
    theta = {"W": 0.3 * torch.eye(4), "U": torch.randn(4, 3, generator=g),
             "A": torch.randn(2, 4, generator=g)}  # fmt: skip
    return theta, torch.randn(3, 3, generator=g), torch.zeros(3, 4)


def _batching_is_wrong() -> bool:
    theta, x, _ = _problem()
    h = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    pull = torch.func.vjp(lambda h: _f(x, h, theta), h)[1]
    directions = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(2))
    batched = torch.func.vmap(pull)(directions)[0]
    plain = torch.stack([pull(d)[0] for d in directions])
    return bool((batched - plain).abs().max() > 1e-6 * plain.abs().max())


@pytest.mark.skipif(not _batching_is_wrong(), reason="this torch batches cdist's backward right")
@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("linear_solver", ["auto", "gmres"])
def test_a_wrong_batching_rule_in_torch_is_refused_by_name(batch_dim, linear_solver):
    theta, x, h0 = _problem()
    if batch_dim is None and linear_solver == "gmres":  # forward mode: torch's own refusal
        pytest.skip("torch has no forward-mode derivative of cdist")
    eq = dh.Equilibrium(_f, theta, x, h0, batch_dim=batch_dim, linear_solver=linear_solver)
    with pytest.raises(dh.UnsupportedDerivativeError, match="wrong batching rule in torch"):
        eq.grad(lambda h: (h**3).sum())


def test_products_that_agree_pass_and_a_wrong_one_anywhere_in_the_block_is_caught():
    matrix = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    directions = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    right = directions @ matrix.T
    check_batched(lambda v: matrix @ v, directions, right)  # no error
    wrong = right.clone()
    wrong[3, 2] += 1e-3 * right.abs().max()  # the last direction, one entry
    with pytest.raises(dh.UnsupportedDerivativeError, match="differs by"):
        check_batched(lambda v: matrix @ v, directions, wrong)
