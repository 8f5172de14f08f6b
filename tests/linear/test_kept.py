"""The dense factors of ``I − J`` kept between a curvature operator's passes
(``deqhess.linear.kept``): taken again only where ``J`` is bitwise the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqhess as dh
from deqhess.linear import dense
from deqhess.linear.kept import FactorSlot, KeptFactors, without_factors
from deqhess.nn import DEQ, warm_starts


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
def factorised(monkeypatch):
    """How many dense LUs were formed."""
    count = []
    original = dense.DenseLU.__init__

    def counting(self, *args, **kwargs):
        count.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dense.DenseLU, "__init__", counting)
    return count


def test_the_next_pass_takes_the_factors_and_bitwise_the_same_products(factorised):
    """A second pass over the same batch at the same parameters forms bitwise the same
    ``J``: its factors are taken again, and the products are bitwise a fresh operator's
    (whose cold start reaches bitwise the same fixed point here)."""
    model, _, data = _model_and_data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters, 3, dtype=torch.float64)
    first = curvature.hvp(v)
    assert len(factorised) == 1
    assert torch.equal(curvature.hvp(v), first)
    assert len(factorised) == 1  # none formed
    assert torch.equal(dh.ModelCurvature(model, nn.MSELoss(), data).hvp(v), first)


def test_a_map_changed_outside_its_tensors_is_factorised_again(factorised):
    """A cell whose Jacobian changes through a plain attribute while its fixed point and
    every tensor stay bitwise the same (``α (h − h*)``): the blocks of ``J`` differ, the
    factors are formed afresh, and the products are a fresh operator's — for a change of
    α far below what a check with a rounding allowance could see (float32 too); set
    back, the first pass's products, bitwise."""
    for dtype, change in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float64, 0.3)):
        model, cell, data = _model_and_data()
        model = model.to(dtype)
        data = [(x.to(dtype), y.to(dtype)) for x, y in data]
        with torch.no_grad():
            cell.reference = model[1](model[0](data[0][0])).detach()
        curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
        v = torch.randn(curvature.num_parameters, 3, dtype=dtype)
        first = curvature.hvp(v)
        before = len(factorised)
        cell.alpha = change
        got = curvature.hvp(v)
        assert len(factorised) == before + 1
        want = dh.ModelCurvature(model, nn.MSELoss(), data).hvp(v)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))
        cell.alpha = 0.0  # back: the first pass's J, formed again
        assert torch.equal(curvature.hvp(v), first)
        assert len(factorised) == before + 3  # and once for the fresh operator


def test_a_user_warm_start_store_keeps_no_factors():
    """``deqhess.nn.warm_starts`` (the user's own store) keeps fixed points only."""
    model, _, data = _model_and_data()
    x, _ = data[0]
    store: dict = {}
    with warm_starts(store):
        for _ in range(2):
            model(x).sum().backward()
    assert store and not any(isinstance(v, KeptFactors) for v in store.values())


def _blocks(seed=0, samples=3, width=4):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(samples, width, width, generator=g, dtype=torch.float64)


def test_a_slot_takes_factors_only_from_equal_blocks_and_settings():
    store: dict = {}
    slot = FactorSlot(store, "k", may_add=True)
    made = []

    def factorise(j):
        def make():
            made.append(1)
            return dense.DenseLU(j)

        return make

    j = _blocks()
    first = slot.factors(j, ("Dense", None), factorise(j))
    assert slot.factors(j.clone(), ("Dense", None), factorise(j)) is first and len(made) == 1
    changed = j.clone()
    changed[1, 2, 3] = torch.nextafter(changed[1, 2, 3], torch.tensor(1.0, dtype=j.dtype))
    assert slot.factors(changed, ("Dense", None), factorise(changed)) is not first
    assert len(made) == 2
    assert slot.factors(changed, ("Dense", 10.0), factorise(changed)) is not first
    assert len(made) == 3
    nan = changed.clone()
    nan[0, 0, 0] = float("nan")  # never equal to itself: the factorisation refuses it
    with pytest.raises(dh.DeqhessError):
        slot.factors(nan, ("Dense", 10.0), factorise(nan))
    with pytest.raises(dh.DeqhessError):
        slot.factors(nan, ("Dense", 10.0), factorise(nan))
    assert len(made) == 5


def test_a_charged_slot_only_replaces_factors_of_the_same_size():
    """A store already charged to the budget gets no new factors, and keeps none of
    another size than it was charged for."""
    store: dict = {}
    j = _blocks()
    FactorSlot(store, "k", may_add=False).factors(j, (), lambda: dense.DenseLU(j))
    assert "k" not in store
    FactorSlot(store, "k", may_add=True).factors(j, (), lambda: dense.DenseLU(j))
    kept = store["k"]
    other = _blocks(seed=1)
    FactorSlot(store, "k", may_add=False).factors(other, (), lambda: dense.DenseLU(other))
    assert store["k"] is not kept and torch.equal(store["k"].jacobian, other)
    wider = _blocks(width=5)
    FactorSlot(store, "k", may_add=False).factors(wider, (), lambda: dense.DenseLU(wider))
    assert "k" not in store
    store.update(k=kept, h=torch.zeros(2))
    assert list(without_factors(store)) == ["h"]
