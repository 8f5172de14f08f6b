"""The visible evaluation runs at ``h*`` itself: what it hands on is exact, at no cost.

The cell ``f = tanh(W h + x + 0.1 h²)`` uses its state twice (the gradient to it is a
sum of two products). References: the adjoint ``λ = (I − J)⁻ᵀ ḡ`` by a dense solve of
``J = diag(1 − f²)(W + 0.2 diag(h))`` per sample, the layer solves to
1e-13, so 1e-10 holds with margin. Derivatives of every order, in autograd and
``torch.func``, are checked in ``test_derivative_grid.py``.
"""

from __future__ import annotations

import pytest
import torch
from problems import relative_error
from torch import nn

from deqhess.nn import DEQ


class Cell(nn.Module):
    def __init__(self, n: int = 4):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, x, h):
        return torch.tanh(self.lin(h) + x + 0.1 * h * h)


def _setup(dtype=torch.float64):
    torch.manual_seed(0)
    cell = Cell().to(dtype)
    return (
        cell,
        DEQ(cell, tol=1e-13 if dtype == torch.float64 else None),
        torch.randn(5, 4, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_plain_backward_solves_once_and_once_more_for_a_captured_feature(dtype):
    """The compensation cancels the cell's ``Jᵀλ`` to ``h*`` to the last bit, so ``h*``'s
    own backward finds a zero gradient and solves nothing; a feature the user took from
    the visible evaluation brings a gradient, solved for. Before: one solve either way,
    the feature's path through ``h*`` dropped."""
    cell, deq, x = _setup(dtype)
    features: list[torch.Tensor] = []
    cell.lin.register_forward_hook(lambda m, i, o: features.append(o))
    solution = deq.solve(x)
    solution.h.pow(2).sum().backward()
    assert solution.info.linear_solves.solves == 1
    solution = deq.solve(x)
    (solution.h.pow(2).sum() + features[-1].sin().sum()).backward()
    assert solution.info.linear_solves.solves == 2


def test_a_full_backward_hook_on_the_cell_sees_the_adjoint_and_j_transpose_lambda():
    """The cell's own backward at ``h*``: ``grad_output = λ``, and the gradient reaching its
    input ``h*`` is ``Jᵀλ`` (what the compensation cancels)."""
    cell, deq, x = _setup()
    seen: list[tuple] = []
    cell.register_full_backward_hook(lambda m, gi, go: seen.append((gi, go)))
    h = deq(x)
    g = torch.randn_like(h)
    (h * g).sum().backward()
    ((grad_input, grad_output),) = seen
    h = h.detach()
    # J = diag(1 − f²) (W + 0.2 diag(h)) per sample, f = h at the fixed point
    jac = (1 - h**2)[:, :, None] * (cell.lin.weight.detach() + 0.2 * torch.diag_embed(h))
    adjoint = torch.linalg.solve(torch.eye(4, dtype=h.dtype) - jac.mT, g)
    assert relative_error(grad_output[0], adjoint) <= 1e-10
    assert relative_error(grad_input[1], (jac.mT @ adjoint[..., None])[..., 0]) <= 1e-10
