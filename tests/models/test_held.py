"""Batch graphs kept from one pass for the next while an analysis holds a model's operator.

The products inside a held block must be the products outside it (the same graph: equal
to 1e-12 relative, the order of summation aside), each batch formed once per part, and
a change of the model's parameters or buffers inside the block must be seen (the next
product is the new model's: compared with a fresh operator of it).
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import pytest
import torch
from models import Classifier, Reference, unrolled_twin
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.batches import graph_bytes
from deqhess.curvature import extreme_eigenpairs, hutchpp, solve_damped
from deqhess.models import BatchGraph, held


def _data(batches=3, size=4, m=3, k=2):
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(size, m, generator=g), torch.randn(size, k, generator=g))
        for _ in range(batches)
    ]


class _Plain:
    """The operator's products alone: nothing to hold (the reference)."""

    symmetric = True

    def __init__(self, op):
        self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device

    def matmat(self, block):
        return self.op.matmat(block)


def _count_formed(monkeypatch) -> list[str | None]:
    formed: list[str | None] = []
    original = BatchGraph.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        formed.append(self.part)

    monkeypatch.setattr(BatchGraph, "__init__", counting)
    return formed


def test_an_analysis_forms_each_batch_once_and_finds_what_it_finds_unheld(monkeypatch):
    """Lanczos, Hutch++ and MINRES on a model's operator: every batch's graph
    formed on the first pass only (the analysis holds the operator), the results those of
    the same products taken without holding."""
    model = Classifier()
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    op = curvature.hessian_operator()
    plain = _Plain(op)
    expected = extreme_eigenpairs(plain, 2, progress=False)
    trace = hutchpp(plain, num_hvps=12)
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    b = b.to(op.dtype)
    solution = solve_damped(plain, b, damping=1.0, tol=1e-10, progress=False)
    formed = _count_formed(monkeypatch)
    got = extreme_eigenpairs(op, 2, progress=False)
    assert formed == ["total"] * len(data)  # one pass forms; every other reuses
    assert got.num_hvps == expected.num_hvps
    assert relative_error(got.eigenvalues, expected.eigenvalues) <= 1e-12
    formed.clear()
    assert abs(hutchpp(op, num_hvps=12).estimate - trace.estimate) <= 1e-12 * abs(trace.estimate)
    assert formed == ["total"] * len(data)
    formed.clear()
    held = solve_damped(op, b, damping=1.0, tol=1e-10, progress=False)
    assert formed == ["total"] * len(data)
    assert relative_error(held.solution, solution.solution) <= 1e-10
    assert curvature._held is None  # dropped when the analysis ends


def test_products_inside_a_block_follow_a_change_of_the_parameters(monkeypatch):
    """Inside ``op.holding()``, a parameter written in place — also through ``.data``,
    which no version counter sees — or a buffer changed makes the next product the new
    model's, equal to a fresh operator's."""
    model = Classifier()
    model.register_buffer("shift", torch.zeros(()))
    forward = model.forward
    model.forward = lambda x: forward(x) + model.shift  # a buffer the output reads
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    op = curvature.hessian_operator()
    v = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(1))
    formed = _count_formed(monkeypatch)
    writes = [
        lambda: model.head.weight.data.mul_(1.5),
        lambda: torch.nn.init.normal_(model.encoder.bias),
        lambda: model.shift.fill_(0.7),
    ]
    with op.holding():
        before = op @ v
        assert relative_error(op @ v, before) <= 1e-12
        assert formed == ["total"] * len(data)
        for write in writes:
            with torch.no_grad():
                write()
            fresh = dh.ModelCurvature(model, nn.MSELoss(), data).hessian_operator() @ v
            assert relative_error(op @ v, fresh) <= 1e-12
    assert curvature._held is None


def test_nothing_is_held_without_room(monkeypatch):
    """``cache_bytes=0`` (or no memory to spare) keeps no graph: every pass forms its
    batches, the products unchanged."""
    model = Classifier()
    data = _data(batches=2)
    v = torch.randn(46, 1)
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, cache_bytes=0)
    op = curvature.hessian_operator()
    formed = _count_formed(monkeypatch)
    with op.holding():
        first, second = op @ v, op @ v
    assert formed == ["total"] * 4
    assert torch.equal(first, second)
    formed.clear()
    roomy = dh.ModelCurvature(model, nn.MSELoss(), data).hessian_operator()
    monkeypatch.setattr(held, "budget_bytes", lambda device: 1.0)  # half a byte to spare
    with roomy.holding():
        roomy @ v, roomy @ v
    assert formed == ["total"] * 4


def test_a_graph_is_charged_what_its_tensors_hold():
    """``graph_bytes`` counts the tensors a graph saved, each storage once: a loss through
    a matrix product saves both factors."""
    a = torch.randn(100, 50, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, 20, dtype=torch.float64, requires_grad=True)
    loss = torch.tanh(a @ b).sum()
    # a and b (saved by mm), tanh's output, and the loss itself
    expected = (100 * 50 + 50 * 20 + 100 * 20 + 1) * 8
    assert graph_bytes(loss) == expected
    assert graph_bytes(loss, loss) == expected  # each storage once
    assert graph_bytes(torch.ones(3, dtype=torch.float32)) == 3 * 4  # no graph: itself


@pytest.mark.parametrize("part", ["total", "ggn"])
def test_holding_is_per_part(monkeypatch, part):
    """Graphs are kept per part: the GGN's graph does not serve the Hessian."""
    model = Classifier()
    data = _data(batches=2)
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    formed = _count_formed(monkeypatch)
    op, other = (
        curvature.hessian_operator(part),
        curvature.hessian_operator("ggn" if part == "total" else "total"),
    )
    v = torch.randn(46, 1)
    with op.holding():
        op @ v, other @ v, op @ v, other @ v
    assert sorted(formed) == sorted([part, "ggn" if part == "total" else "total"] * 2)


def test_a_graph_kept_is_prepared_for_every_product_of_the_holder():
    """The DEQ layers of a graph formed while holding are told to expect the holder's
    products (their 'auto' solver factorises ``I − J`` where that pays over all of
    them) — until a graph did not fit: then a graph serves its own pass alone."""
    holder = held.HeldGraphs(budget=0, state=(), products=200)
    assert holder.expected(10) == 200
    assert holder.expected(None) == 200
    assert held.HeldGraphs(budget=0, state=()).expected(10) == 10
    assert held.HeldGraphs(budget=0, state=()).expected(None) is None
    holder.full = True
    assert holder.expected(10) == 10


class _Scaled(nn.Module):
    """The classifier's output, doubled in training mode (a deterministic branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Classifier()

    def forward(self, x):
        out = self.inner(x)
        return 2 * out if self.training else out


def test_a_mode_switched_or_a_hook_added_inside_a_block_is_seen():
    """A module switched to training mode, or a forward hook registered, inside
    ``op.holding()``: the next pass forms its batches again and finds another function
    on the same samples — the ModelChangedError it is outside a block, not the kept
    graph's products."""
    data = _data()
    for change in ("mode", "hook"):
        model = _Scaled().eval()
        for held_block in (False, True):
            op = dh.ModelCurvature(model, nn.MSELoss(), data).hessian_operator()
            v = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(3))
            with op.holding() if held_block else contextlib.nullcontext():
                op @ v, op @ v
                if change == "mode":
                    model.train()
                else:
                    handle = model.inner.head.register_forward_hook(lambda m, i, o: 3 * o)
                with pytest.raises(dh.ModelChangedError, match="returned other values"):
                    op @ v
            model.eval()
            if change == "hook":
                handle.remove()


def test_only_analyses_of_several_products_hold(monkeypatch):
    """Hutchinson, the diagonal and the operator's accuracy take one block product: they
    keep nothing (holding would only cost memory); Hutch++ and Lanczos hold."""
    from deqhess.curvature import diagonal, hutchinson, operator_accuracy

    curvature = dh.ModelCurvature(Classifier(), nn.MSELoss(), _data(batches=2))
    held_for: list[int | None] = []
    original = type(curvature).holding

    def recording(self, products=None):
        held_for.append(products)
        return original(self, products)

    monkeypatch.setattr(type(curvature), "holding", recording)
    op = curvature.hessian_operator()
    hutchinson(op, num_probes=30)
    diagonal(op, num_probes=30)
    operator_accuracy(op, num_probes=2)
    assert held_for == []
    hutchpp(op, num_hvps=30)
    extreme_eigenpairs(op, 1, progress=False)
    assert len(held_for) == 2 and all(p is not None and p >= 6 for p in held_for)


def test_a_loss_weight_changed_and_restored_inside_a_block_is_seen():
    """A module loss's buffer set to another value and back inside ``op.holding()``:
    each product is the loss's as it is then (the state is compared with the last
    pass's, not the block's start)."""
    torch.manual_seed(4)
    model = Classifier(k=3)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(2)]  # fmt: skip
    w0, w1 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.2, 1.0, 3.0])
    loss = nn.CrossEntropyLoss(weight=w0.clone())
    op = dh.ModelCurvature(model, loss, data).hessian_operator()
    v = torch.randn(op.shape[0], 2, generator=g)

    def fresh(weight):
        return (
            dh.ModelCurvature(model, nn.CrossEntropyLoss(weight=weight), data).hessian_operator()
            @ v
        )

    with op.holding():
        for weight in (w1, w0, w1):
            loss.weight.copy_(weight)
            assert relative_error(op @ v, fresh(weight)) <= 1e-12


class _Counting(nn.Module):
    """A classifier whose output grows with every call: another function each time."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = Classifier(), 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * (1 + 0.5 * self.calls)


def test_a_forward_changing_its_own_state_is_refused_inside_an_analysis():
    """A kept graph's first reuse runs the model forward once more: a model that is
    another function on every call is refused as it is without holding."""
    op = dh.ModelCurvature(_Counting(), nn.MSELoss(), _data()).hessian_operator()
    with pytest.raises(dh.ModelChangedError, match="returned other values"):
        extreme_eigenpairs(op, 2, progress=False, dense_below=0)


def test_a_batch_written_and_restored_inside_a_block_is_formed_again(monkeypatch):
    """The input written in place and back (the same content, a moved version): its
    graph, which saved it, is formed again rather than differentiated stale."""
    data = _data(batches=2)
    curvature = dh.ModelCurvature(Classifier(), nn.MSELoss(), data)
    op = curvature.hessian_operator()
    v = torch.randn(op.shape[0], 1)
    formed = _count_formed(monkeypatch)
    with op.holding():
        first = op @ v
        data[0][0].mul_(2).div_(2)
        assert relative_error(op @ v, first) <= 1e-12
    assert formed == ["total"] * 3  # batch 0 again, batch 1 kept


def test_keeping_stops_when_the_batches_do_not_recur():
    """A shuffling loader regroups the samples every pass: once a pass found none of the
    graphs kept, nothing more is kept (no memory spent for nothing); products unchanged."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 2, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    model = Classifier()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), loader)
    op = curvature.hessian_operator()
    v = torch.randn(op.shape[0], 1)
    expected = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)]).hessian_operator()
    with op.holding():
        for _ in range(4):
            assert relative_error(op @ v, expected @ v) <= 1e-10
        assert curvature._held.used == 0 and curvature._held.full


_GLOBAL_WEIGHT = torch.ones(2)


def _globally_weighted(output, target):
    """A loss reading a module-level weight (not a module, not a closure)."""
    return ((output - target) ** 2 * _GLOBAL_WEIGHT).mean()


def test_a_loss_function_state_or_a_backward_hook_changed_inside_a_block_is_seen():
    """Inside ``op.holding()``: a weight a loss function reads as a global (or a module
    loss it wraps in a lambda) changed, or a full backward hook registered — the next
    product is the one a fresh operator gives."""
    data = _data()
    model = Classifier()
    wrapped = nn.MSELoss()
    cases = {
        "global weight": (_globally_weighted, lambda: _GLOBAL_WEIGHT.mul_(3.0)),
        "backward hook": (
            lambda o, y: wrapped(o, y),
            lambda: model.head.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,)),
        ),
    }
    for name, (loss, change) in cases.items():
        op = dh.ModelCurvature(model, loss, data).hessian_operator()
        v = torch.randn(op.shape[0], 1, generator=torch.Generator().manual_seed(8))
        with op.holding():
            op @ v, op @ v
            handle = change()
            fresh = dh.ModelCurvature(model, loss, data).hessian_operator() @ v
            assert relative_error(op @ v, fresh) <= 1e-12, name
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()
        _GLOBAL_WEIGHT.fill_(1.0)


_GLOBAL_SCALE = 0.0
_CONFIG = {"scale": 0.0}
_ARGS = argparse.Namespace(scale=np.float64(0.0))


def _globally_scaled(output, target):
    """A loss reading a module-level Python float."""
    return ((output - target) ** 2).mean() + _GLOBAL_SCALE * (output**2).mean()


_WEIGHTS = [0.0, torch.zeros(2)]


def _configured(output, target):
    """A loss reading a global dict, a global argparse.Namespace (a NumPy number) and a
    global list (a number and a small tensor)."""
    extra = _CONFIG["scale"] * (output**2).mean() + _ARGS.scale * output.mean()
    extra = extra + _WEIGHTS[0] * output.mean() + (_WEIGHTS[1] * output).mean()
    return ((output - target) ** 2).mean() + extra


def test_a_number_the_loss_or_a_module_holds_changed_inside_a_block_is_seen():
    """Inside ``op.holding()``: a loss module's float attribute (``label_smoothing``), a
    Python float a loss function reads as a global or from its closure, changed between
    products — the next product is the one a fresh operator gives (were 0.36–0.75
    relative off: only tensors were compared); a float of the model's own modules is
    refused as a changed model, as outside a block (the kept graph had served it)."""
    global _GLOBAL_SCALE
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(10)
    labels = [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g))
              for _ in range(2)]  # fmt: skip
    data = _data()
    factor = 0.0

    def closed(output, target):
        return ((output - target) ** 2).mean() + factor * (output**3).mean()

    def rebind_closure():
        nonlocal factor
        factor = 0.7

    def set_global():
        global _GLOBAL_SCALE
        _GLOBAL_SCALE = 0.7

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.scale, self.factors = Classifier(), 1.0, [1.0]

        def forward(self, x):
            return self.inner(x) * self.scale * self.factors[0]

    smoothing = nn.CrossEntropyLoss()
    scaled = Scaled()
    cases = {
        "label_smoothing": (Classifier(), smoothing, labels,
                            lambda: setattr(smoothing, "label_smoothing", 0.3)),
        "global float": (Classifier(), _globally_scaled, data, set_global),
        "closure float": (Classifier(), closed, data, rebind_closure),
        "global dict": (Classifier(), _configured, data, lambda: _CONFIG.update(scale=0.7)),
        "global Namespace": (Classifier(), _configured, data,
                             lambda: setattr(_ARGS, "scale", np.float64(0.4))),
        "global list": (Classifier(), _configured, data, lambda: _WEIGHTS.__setitem__(0, 0.3)),
        "tensor in a list": (Classifier(), _configured, data, lambda: _WEIGHTS[1].add_(0.5)),
    }  # fmt: skip
    for name, (model, loss, batches, change) in cases.items():
        op = dh.ModelCurvature(model, loss, batches).hessian_operator()
        v = torch.randn(op.shape[0], 1, generator=torch.Generator().manual_seed(8))
        with op.holding():
            op @ v, op @ v
            change()
            fresh = dh.ModelCurvature(model, loss, batches).hessian_operator() @ v
            assert relative_error(op @ v, fresh) <= 1e-12, name
    _GLOBAL_SCALE = 0.0
    _CONFIG["scale"], _ARGS.scale = 0.0, np.float64(0.0)
    _WEIGHTS[0] = 0.0
    _WEIGHTS[1].zero_()
    # the model's own number (or one in its list): refused as a changed model, inside a
    # block as outside it (a list entry changed in place was served stale, 0.92 off)
    for change in (
        lambda: setattr(scaled, "scale", 1.5),
        lambda: scaled.factors.__setitem__(0, 2.0),
    ):
        scaled.scale, scaled.factors = 1.0, [1.0]
        op = dh.ModelCurvature(scaled, nn.MSELoss(), data).hessian_operator()
        with op.holding():
            op @ v, op @ v
            change()
            with pytest.raises(dh.ModelChangedError, match="returned other values"):
                op @ v


class _CountingCalls(nn.Module):
    """A classifier that counts its calls (a plain attribute its forward changes)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = Classifier(), 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_a_forward_changing_its_own_plain_attribute_keeps_what_is_held(monkeypatch):
    """A call counter changes the model's plain attributes on every pass: the next pass
    is compared with the state the last one left, so its graphs stay kept (each batch
    formed once, as for a model without the counter; were formed every pass, twice the
    time of an eigensolve) and the products are those taken without holding."""
    model = _CountingCalls()
    op = dh.ModelCurvature(model, nn.MSELoss(), _data()).hessian_operator()
    v = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(3))
    expected = op @ v
    formed = _count_formed(monkeypatch)
    with op.holding():
        for _ in range(3):
            assert relative_error(op @ v, expected) <= 1e-12
    assert formed == ["total"] * 3  # three batches, once each


def test_loss_only_passes_and_batches_of_other_objects_are_not_kept():
    """``grad()`` twice inside a block (its backward frees its graph: not kept), and a
    batch whose input is an object deqhess cannot read into (not kept: a write into it
    would go unseen) — both as without holding."""

    class Boxed:
        def __init__(self, x):
            self.x = x

        def __repr__(self):
            return "Boxed"

    class Unboxing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Classifier()

        def forward(self, boxed):
            return self.inner(boxed.x)

    data = _data(batches=2)
    model = Unboxing()
    curvature = dh.ModelCurvature(
        model, nn.MSELoss(), [(Boxed(x), y) for x, y in data], batch_size_fn=lambda b: len(b.x)
    )
    op = curvature.hessian_operator()
    with op.holding():
        first = curvature.grad()
        second = curvature.grad()
        op @ torch.randn(op.shape[0], 1)
        assert curvature._held.used == 0
    for a, b in zip(first.values(), second.values(), strict=True):
        assert torch.equal(a, b)


def test_a_forward_running_layers_in_other_threads_does_not_wait_on_itself():
    """A forward that runs its DEQ branches in a thread pool: a pass holds the model's
    own lock, not the engine's, which the pool's layers take."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Classifier()

        def forward(self, x):
            z = torch.tanh(self.inner.encoder(x))
            h = pool.submit(self.inner.deq0, z).result()
            return self.inner.head(h)

    model = Branches()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), _data(batches=1))
    done = []
    worker = threading.Thread(target=lambda: done.append(curvature.hessian()), daemon=True)
    worker.start()
    worker.join(timeout=60)
    pool.shutdown(wait=False)
    assert done, "the pass waited on the pool's layers (a deadlock)"
    reference = Reference(unrolled_twin(model.inner), nn.MSELoss(), _data(batches=1),
                          [n.removeprefix("inner.") for n in curvature.layout.names])  # fmt: skip
    assert relative_error(done[0], reference.total()) <= 1e-9


def test_held_graphs_and_what_the_store_keeps_share_one_budget():
    """Holding begun on a fresh operator: the first pass inside stores the warm starts
    too, and the graphs held and the store together stay within ``cache_bytes`` (they
    had exceeded it by the warm starts' bytes)."""
    model = Classifier()
    data = _data()
    probe = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(probe.num_parameters, 2)
    with probe.hessian_operator().holding(4):
        probe.hvp(v)
        everything = probe._held.used + probe.cached_bytes
    for budget in (everything, everything - 1, everything // 2):
        curvature = dh.ModelCurvature(model, nn.MSELoss(), data, cache_bytes=budget)
        with curvature.hessian_operator().holding(4):
            for _ in range(2):
                curvature.hvp(v)
                assert curvature._held.used + curvature.cached_bytes <= budget
