"""torchdeq-style cells and tuple states through the adapters."""

from __future__ import annotations

import pytest
import torch
from problems import relative_error
from torch import nn

from deqhess.nn import DEQ, StateFirst, TupleState


class ZX(nn.Module):
    """A torchdeq-style cell: ``f(z, x)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.4))

    def forward(self, z, x):
        return self.a * torch.tanh(z) + x


class XH(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, h):
        return self.a * torch.tanh(h) + x


def test_state_first_adapter_equals_plain_cell():
    zx = ZX()
    x = torch.randn(3, 4)
    h1 = DEQ(StateFirst(zx), tol=1e-13)(x)
    h2 = DEQ(XH(zx.a), tol=1e-13)(x)
    assert torch.allclose(h1, h2, atol=1e-12)
    (g1,) = torch.autograd.grad(h1.sum(), zx.a)
    t = torch.tanh(h1.detach())
    expected = (t / (1 - 0.4 * (1 - t**2))).sum()  # dh/da from h = a·tanh(h) + x
    assert relative_error(g1, expected) <= 1e-10
    assert [n for n, _ in DEQ(StateFirst(zx)).named_parameters()] == ["cell.module.a"]


class Pair(nn.Module):
    """State (p [B, 2], q [B, 3]) coupled through each other."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, state):
        p, q = state
        return torch.tanh(self.w * q[:, :2] + x[:, :2]), torch.tanh(
            self.w * p.sum(1, keepdim=True) + x
        )


def test_tuple_state_adapter_matches_unrolled():
    pair = Pair()
    cell = TupleState(pair, shapes=[(2,), (3,)])
    x = torch.randn(4, 3)
    h = DEQ(cell, tol=1e-14, atol=1e-15)(x)
    p, q = cell.split(h)
    assert p.shape == (4, 2) and q.shape == (4, 3)
    state = (torch.zeros(4, 2), torch.zeros(4, 3))
    for _ in range(80):
        state = pair(x, state)
    assert torch.allclose(p, state[0], atol=1e-12) and torch.allclose(q, state[1], atol=1e-12)
    (g,) = torch.autograd.grad(h.pow(2).sum(), pair.w)

    def unrolled(w):
        s = (torch.zeros(4, 2), torch.zeros(4, 3))
        for _ in range(80):
            s = torch.func.functional_call(pair, {"w": w}, (x, s))
        return sum(t.pow(2).sum() for t in s)

    assert relative_error(g, torch.func.grad(unrolled)(pair.w.detach())) <= 1e-9


def test_tuple_state_errors():
    with pytest.raises(ValueError, match="at least one state shape"):
        TupleState(Pair(), shapes=[])

    class Three(nn.Module):
        def forward(self, x, state):
            return (*state, state[0])

    cell = TupleState(Three(), shapes=[(2,), (3,)])
    with pytest.raises(ValueError, match="returned 3 state tensors; expected 2"):
        cell(torch.randn(4, 3), torch.zeros(4, 5))


def test_tuple_state_checks_what_the_cell_returns():
    class Swapped(nn.Module):
        def forward(self, x, state):
            p, q = state
            return q, p  # wrong order: shapes (3,) and (2,)

    cell = TupleState(Swapped(), shapes=[(2,), (3,)])
    with pytest.raises(ValueError, match=r"state 0 returned by the cell has per-sample shape \(3"):
        cell(torch.randn(4, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="shapes must be a sequence of per-sample shapes"):
        TupleState(Swapped(), shapes=[2, 3])
