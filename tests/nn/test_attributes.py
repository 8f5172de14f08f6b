"""Tensors a cell keeps on itself are exact functions of ``h*`` after the layer's call.

The cell ``f = tanh(½ (W h + b) + x)`` keeps ``a = W h + b`` as ``self.feat``. Its
references: ``a(h*)`` evaluated at the layer's fixed point, and autograd through 200
plain iterations of the cell (contraction ``½·0.5``, so the unrolled error ``~K² cᴷ`` is
far below rounding); the layer solves to 1e-13, so 1e-10 holds with margin.
"""

from __future__ import annotations

import pytest
import torch
from problems import relative_error
from torch import nn

from deqhess.nn import DEQ
from deqhess.nn.attributes import assigned_since, attribute_snapshot, attributes_kept


class Keeping(nn.Module):
    def __init__(self, n: int = 4):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.calls = 0

    def forward(self, x, h):
        self.calls += 1
        self.feat = self.lin(h)
        return torch.tanh(0.5 * self.feat + x)


def _setup(hooked: bool = False):
    torch.manual_seed(0)
    cell = Keeping().double()
    if hooked:
        cell.lin.register_forward_hook(lambda m, i, o: None)
    return cell, DEQ(cell, tol=1e-13), torch.randn(5, 4, dtype=torch.float64)


def _loss(h, feat):
    return (h**2).sum() + (feat.sin() * h).sum()


def _unrolled_loss(cell, x):
    h = torch.zeros_like(x)
    for _ in range(200):
        h = cell(x, h)
    return _loss(h, cell.feat)


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "observed"])
def test_a_kept_attribute_is_the_cell_at_h_star_with_exact_derivatives(hooked):
    """Before: ``deq.cell.feat`` held a detached solver iterate; the gradient of a loss
    using it was 93% off, silently."""
    cell, deq, x = _setup(hooked)
    params = list(cell.parameters())
    h = deq(x)
    assert cell.feat.requires_grad
    assert relative_error(cell.feat.detach(), cell.lin(h).detach()) <= 1e-12
    got = torch.autograd.grad(_loss(h, cell.feat), params, create_graph=True)
    want = torch.autograd.grad(_unrolled_loss(cell, x), params, create_graph=True)
    for a, b in zip(got, want, strict=True):
        assert relative_error(a.detach(), b.detach()) <= 1e-10
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * d).sum() for g, d in zip(got, v, strict=True)), params)
    hv_want = torch.autograd.grad(sum((g * d).sum() for g, d in zip(want, v, strict=True)), params)
    for a, b in zip(hv, hv_want, strict=True):
        assert relative_error(a, b) <= 1e-10


def test_the_derivatives_products_leave_the_kept_attribute_alone():
    """The backward's products evaluate the cell again (inside ``torch.func``); before,
    ``cell.feat`` held one of their tensors after a backward."""
    cell, deq, x = _setup()
    h = deq(x)
    kept = cell.feat
    calls = cell.calls
    grads = torch.autograd.grad(_loss(h, cell.feat), list(cell.parameters()), create_graph=True)
    torch.autograd.grad(sum(g.sum() for g in grads), list(cell.parameters()))
    assert cell.calls > calls  # the products did evaluate the cell
    assert cell.feat is kept


def test_the_attribute_snapshot_tells_an_assignment_and_attributes_kept_undoes_it():
    cell, _, x = _setup()
    before = attribute_snapshot(cell)
    assert not assigned_since(before)
    with attributes_kept(cell):
        cell(x, torch.zeros_like(x))
    assert not hasattr(cell, "feat")
    assert not assigned_since(before)
    cell(x, torch.zeros_like(x))
    assert assigned_since(before)
    kept = cell.feat
    with attributes_kept(cell):
        cell(x, x)
        cell.lin.extra = x
    assert cell.feat is kept and not hasattr(cell.lin, "extra")
