"""The dense factors of ``I − J`` kept between a curvature operator's passes
(``deqhess.linear.kept``): taken again only at bitwise the same point and map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqhess as dh
from deqhess.linear import linearization
from deqhess.nn import DEQ


class _Shifted(nn.Module):
    """``tanh(W h + x + b) + α (h − r)``: with ``r`` the fixed point of the first term,
    ``α`` (a plain attribute) changes ``J`` by ``α I`` and leaves ``h*`` where it is."""

    def __init__(self, n: int) -> None:
        super().__init__()
        w = torch.randn(n, n, dtype=torch.float64)
        self.W = nn.Parameter(0.4 * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.1 * torch.randn(n, dtype=torch.float64))
        self.alpha, self.reference = 0.0, None

    def forward(self, x, h):
        out = torch.tanh(h @ self.W.T + x + self.b)
        if self.reference is not None:
            out = out + self.alpha * (h - self.reference)
        return out


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    cell = _Shifted(4)
    model = nn.Sequential(nn.Linear(3, 4), DEQ(cell, tol=1e-13, linear_solver="dense"),
                          nn.Linear(4, 2)).double()  # fmt: skip
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    return model, cell, [(x, y)]


@pytest.fixture
def adopted(monkeypatch):
    count = []
    original = linearization.Linearization.adopt

    def counting(self, prepared):
        count.append(1)
        return original(self, prepared)

    monkeypatch.setattr(linearization.Linearization, "adopt", counting)
    return count


def test_the_next_pass_takes_the_factors_and_the_same_products(adopted):
    """A second pass over the same batch at the same parameters reaches bitwise the same
    fixed point: its factors are taken again, and the products are bitwise the same."""
    model, _, data = _model_and_data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters, 3, dtype=torch.float64)
    first = curvature.hvp(v)
    assert not adopted
    assert torch.equal(curvature.hvp(v), first)
    assert len(adopted) == 1


def test_a_map_changed_outside_its_tensors_is_factorised_again(adopted):
    """A cell whose Jacobian changes through a plain attribute while its fixed point stays
    (``α (h − h*)``): the kept factors fail the check of one product against the map's
    own VJP, and the products are those of a fresh operator."""
    model, cell, data = _model_and_data()
    with torch.no_grad():
        cell.reference = model[1](model[0](data[0][0])).detach()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters, 3, dtype=torch.float64)
    curvature.hvp(v)
    cell.alpha = 0.3
    got = curvature.hvp(v)
    assert not adopted
    want = dh.ModelCurvature(model, nn.MSELoss(), data).hvp(v)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
