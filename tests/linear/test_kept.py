"""The dense factors of ``I − J`` kept between a curvature operator's passes
(``deqhess.linear.kept``): taken again only where ``J`` is bitwise the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqhess as dh
from deqhess.batches import held_bytes
from deqhess.linear import dense
from deqhess.linear.kept import FactorSlot, KeptFactors
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


def test_a_later_pass_takes_the_factors_and_bitwise_the_same_products(factorised):
    """The first pass over a batch stores its warm start, the second its factors too,
    and the third forms bitwise the same ``J``: the factors are taken again, and the
    products are bitwise a fresh operator's (whose cold start reaches bitwise the same
    fixed point here)."""
    model, _, data = _model_and_data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters, 3, dtype=torch.float64)
    first = curvature.hvp(v)
    assert torch.equal(curvature.hvp(v), first)
    assert len(factorised) == 2
    assert torch.equal(curvature.hvp(v), first)
    assert len(factorised) == 2  # none formed
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
        assert torch.equal(curvature.hvp(v), first)  # the factors kept
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


class _Budget:
    """A budget of ``room`` bytes that records what it charged (negative: gave back)."""

    def __init__(self, room: int) -> None:
        self.room, self.charged = room, []

    def __call__(self, nbytes: int) -> bool:
        if nbytes > self.room:
            return False
        self.room -= nbytes
        self.charged.append(nbytes)
        return True


def test_a_slot_takes_factors_only_from_equal_blocks_and_settings():
    store: dict = {}
    slot = FactorSlot(store, "k", _Budget(10**6))
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


def test_a_slot_keeps_only_what_its_budget_charged():
    """Factors are kept only where their bytes are charged; new ones in place of kept ones
    are charged for what they take beyond them, or not kept; what is kept is what was
    charged, in bytes."""
    store: dict = {}
    j = _blocks()
    size = held_bytes({"f": (j, dense.DenseLU(j))})  # J, the LU and its pivots
    FactorSlot(store, "k", _Budget(size - 1)).factors(j, (), lambda: dense.DenseLU(j))
    assert "k" not in store
    budget = _Budget(size)
    FactorSlot(store, "k", budget).factors(j, (), lambda: dense.DenseLU(j))
    assert budget.charged == [size] and held_bytes(store) == size == store["k"].charged
    other = _blocks(seed=1)  # the same size: no more charged
    FactorSlot(store, "k", budget).factors(other, (), lambda: dense.DenseLU(other))
    assert torch.equal(store["k"].jacobian, other) and budget.charged == [size, 0]
    wider = _blocks(width=5)  # more than was charged, and no room: none kept, bytes back
    FactorSlot(store, "k", budget).factors(wider, (), lambda: dense.DenseLU(wider))
    assert "k" not in store and budget.charged == [size, 0, -size]
    roomy = _Budget(10**6)
    FactorSlot(store, "k", roomy).factors(j, (), lambda: dense.DenseLU(j))
    FactorSlot(store, "k", roomy).factors(wider, (), lambda: dense.DenseLU(wider))
    assert sum(roomy.charged) == held_bytes(store) == store["k"].charged
    FactorSlot(store, "k", roomy).factors(j, (), lambda: dense.DenseLU(j))  # smaller again
    assert sum(roomy.charged) == held_bytes(store) == store["k"].charged == size


class _Cell(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x, h):
        return torch.tanh(0.5 * self.lin(h) + x)


def _classifier(n=8, batches=5, samples=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, n), DEQ(_Cell(n), tol=1e-12, linear_solver="dense"),
                          nn.Linear(n, 3)).double()  # fmt: skip
    data = [(torch.randn(samples, 3, dtype=torch.float64), torch.randint(0, 3, (samples,)))
            for _ in range(batches)]  # fmt: skip
    return model, data, samples * n * 8  # a batch's fixed points, in bytes


def _held(curvature) -> int:
    return sum(held_bytes(entry.warm) for entry in curvature._stream.store.entries())


@pytest.mark.parametrize("first", ["grad", "ggn", "hvp", "hessian", "eigen"])
def test_what_is_kept_is_charged_whatever_the_first_call(first):
    """Every call's passes keep no more than ``cache_bytes``, and ``cached_bytes`` is what
    the store holds — where a pass factorises ``I − J`` after its batch was stored (the
    gradient, GGN products) as where it does before."""
    model, data, fixed = _classifier()
    factor = 6 * (2 * 8 * 8 * 8 + 8 * 4)  # a batch's J and LU blocks, and pivots (int32)
    for budget in (5 * fixed, 5 * fixed + factor, 5 * fixed + factor - 1, 10**7):
        curvature = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data, cache_bytes=budget)
        v = torch.randn(curvature.num_parameters, 2, dtype=torch.float64)
        for _ in range(3):
            if first == "grad":
                curvature.grad()
            elif first == "ggn":
                curvature.ggn_operator() @ v
            elif first == "hvp":
                curvature.hvp(v)
            elif first == "hessian":
                curvature.hessian()
            else:
                dh.curvature.extreme_eigenpairs(curvature.ggn_operator(), k=2)
            assert _held(curvature) == curvature.cached_bytes <= budget
        factors = sum(isinstance(v, KeptFactors) for e in curvature._stream.store.entries()
                      for v in e.warm.values())  # fmt: skip
        wanted = {5 * fixed: 0, 5 * fixed + factor: 1, 5 * fixed + factor - 1: 0, 10**7: 5}
        assert factors == wanted[budget] or (
            first == "eigen" and factors == 0  # an analysis holds graphs: no factors needed
        )


def test_factors_never_crowd_out_warm_starts():
    """Every batch's fixed point is stored on its first visit, before any factors: a
    budget that holds them all keeps them all, and the factors fill what is left."""
    model, data, fixed = _classifier(batches=10)
    curvature = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data, cache_bytes=12 * fixed)
    v = torch.randn(curvature.num_parameters, 2, dtype=torch.float64)
    for _ in range(3):
        curvature.hvp(v)
    entries = list(curvature._stream.store.entries())
    assert len(entries) == 10
    assert all(any(isinstance(v, torch.Tensor) for v in e.warm.values()) for e in entries)
    assert _held(curvature) == curvature.cached_bytes <= 12 * fixed


def test_a_batch_recurring_in_the_first_pass_keeps_no_factors_before_the_others_are_stored():
    """Data ``[A, B, A, C, D]``: A's second visit comes before C's and D's first. No
    factors are kept until a whole pass has stored every batch's fixed point, so a
    budget of the four batches' fixed points and one batch's factors keeps every fixed
    point (A's factors charged first had left D none)."""
    model, data, fixed = _classifier(batches=4)
    a, b, c, d = data
    factor = 6 * (2 * 8 * 8 * 8 + 8 * 4)
    curvature = dh.ModelCurvature(
        model, nn.CrossEntropyLoss(), [a, b, a, c, d], cache_bytes=4 * fixed + factor - 1
    )
    v = torch.randn(curvature.num_parameters, 2, dtype=torch.float64)
    for _ in range(3):
        curvature.hvp(v)
        assert len(curvature._stream.store) == 4
        assert _held(curvature) == curvature.cached_bytes == 4 * fixed


def test_a_failed_first_pass_keeps_no_factors_before_the_others_are_stored():
    """A first pass that fails at its second batch (the loss raises) leaves one batch
    stored; the next calls store the others' fixed points before any factors."""

    class Flaky(nn.Module):
        """Cross-entropy that fails once, on the batch with these targets."""

        def __init__(self, fail_on: torch.Tensor) -> None:
            super().__init__()
            self.fail_on, self.armed = fail_on, True

        def forward(self, out, target):
            if self.armed and torch.equal(target, self.fail_on):
                self.armed = False
                raise ValueError("the loss failed once")
            return nn.functional.cross_entropy(out, target)

    model, data, fixed = _classifier(batches=4)
    factor = 6 * (2 * 8 * 8 * 8 + 8 * 4)
    loss = Flaky(data[1][1])
    curvature = dh.ModelCurvature(model, loss, data, cache_bytes=4 * fixed + factor - 1)
    v = torch.randn(curvature.num_parameters, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="failed once"):
        curvature.hvp(v)
    assert len(curvature._stream.store) == 1
    for _ in range(3):
        curvature.hvp(v)
    assert len(curvature._stream.store) == 4
    assert _held(curvature) == curvature.cached_bytes == 4 * fixed


def test_factors_give_way_to_fixed_points_of_calls_new_on_a_later_pass():
    """Factors kept, then a forward that calls its DEQ layer more often (a plain
    attribute): the new calls' fixed points come first, the factors are given up for
    them (every fixed point kept; before, the factors kept 3 of 12 for good)."""

    class Repeated(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.extra = inner, 0

        def forward(self, x):
            y = self.inner(x)
            for i in range(self.extra):
                y = y + 0.0 * self.inner(x + i + 1)
            return y

    inner, data, fixed = _classifier(batches=3)
    model = Repeated(inner)
    factor = 6 * (2 * 8 * 8 * 8 + 8 * 4)
    budget = 3 * fixed + factor
    curvature = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data, cache_bytes=budget)
    v = torch.randn(curvature.num_parameters, 2, dtype=torch.float64)
    for extra in (0, 0, 0, 3, 3):
        model.extra = extra
        curvature.hvp(v)
        assert _held(curvature) == curvature.cached_bytes <= budget
    warm = [v for e in curvature._stream.store.entries() for v in e.warm.values()]
    assert sum(isinstance(v, torch.Tensor) for v in warm) == 12
