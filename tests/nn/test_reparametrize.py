"""functional_call leaves every registered tensor as it was, tied submodules included."""

from __future__ import annotations

import torch
from torch import nn

from deqhess.nn import DEQ
from deqhess.nn.reparametrize import functional_call


class Tied(nn.Module):
    """One linear map registered under two paths, and a buffer."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = self.first
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x, h):
        return torch.tanh(self.scale * self.second(h) + self.first.bias + x)


def test_registered_tensors_come_back_and_the_values_are_the_swapped_ones():
    module = Tied()
    registered = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    swapped = {n: torch.randn_like(p) for n, p in module.named_parameters()}
    swapped["scale"] = torch.tensor(0.25)
    x, h = torch.randn(2, 3), torch.randn(2, 3)
    got = functional_call(module, swapped, (x, h))
    w, b = swapped["first.weight"], swapped["first.bias"]
    assert torch.allclose(got, torch.tanh(0.25 * (h @ w.T + b) + b + x), rtol=0, atol=1e-15)
    for owner, parameters, buffers in registered:
        for name, value in {**parameters, **buffers}.items():
            assert getattr(owner, name) is value, name
    assert isinstance(module.first.weight, nn.Parameter)


def test_a_layer_with_a_tied_cell_keeps_its_parameters():
    """The layer calls its cell through functional_call wherever it differentiates
    (autograd with grad enabled, torch.func transforms); afterwards the module still
    trains: its Parameters are its own."""
    deq = DEQ(Tied(), tol=1e-13)
    x = torch.randn(4, 3)
    torch.func.grad(lambda x: deq(x).pow(2).sum())(x)
    (g,) = torch.autograd.grad(deq(x).pow(2).sum(), deq.cell.first.weight, create_graph=True)
    g.sum().backward()
    assert isinstance(deq.cell.first.weight, nn.Parameter)
    assert deq.cell.second.weight is deq.cell.first.weight
    assert deq.cell.first.weight.grad is not None
