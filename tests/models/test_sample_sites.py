"""Each sample's rows of the output Jacobian from stacked cotangents (:mod:`deqhess.models.
sample_sites`): the dense GGN takes that route where the graph shows where every parameter
meets the samples, and the one-hot route wherever it does not — exact either way.

References: unrolled float64 autograd of the same model (``models.py``: the DEQ replaced
by 60 iterations of its 0.4-contraction), ``torch.func.jacrev`` rows and the loss's
``torch.func.hessian``; 1e-9 relative (the layer solves to 1e-13).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import Cell, Classifier, Reference, unrolled_twin
from problems import relative_error
from torch import Tensor, nn

import deqhess as dh
from deqhess.models.sample_sites import find_sites, sample_rows
from deqhess.nn import DEQ, layer_calls

SITES = "each sample's rows of RJ from R's rows stacked"


def _data(sizes=(5, 7, 3), m=3, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x, y = torch.randn(n, m, generator=g), torch.randint(0, classes, (n,), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def _ggn(model, loss, data, twin=None):
    curvature = dh.ModelCurvature(model, loss, data)
    ggn = curvature.ggn_operator().to_dense()
    names = curvature.layout.names
    reference = Reference(twin if twin is not None else unrolled_twin(model), loss, data, names)
    return ggn, reference.ggn(), curvature.info.assembly["ggn"]


@pytest.mark.parametrize(
    "loss, targets",
    [(nn.CrossEntropyLoss(), "classes"), (nn.MSELoss(), "values")],
)
def test_a_linear_deq_linear_model_takes_the_stacked_route_exactly(loss, targets):
    """Cross-entropy (C − 1 rows a sample) and a squared error (C rows), batches of 5, 7
    and 3: the weights' blocks from outer products, the biases' from rows."""
    torch.manual_seed(0)
    model = Classifier(m=3, n=5, k=3)  # P = 20 + 30 + 18 = 68 > n·C
    data = _data()
    if targets == "values":
        data = [(x, torch.randn(len(x), 3, generator=torch.Generator().manual_seed(3)))
                for x, _ in data]  # fmt: skip
    ggn, reference, said = _ggn(model, loss, data)
    assert SITES in said
    assert relative_error(ggn, reference) <= 1e-9
    assert torch.equal(ggn, ggn.T)


class CenteredOutput(nn.Module):
    """The classifier's output minus its batch mean: the samples couple after every site."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return out - out.mean(0, keepdim=True)


class CenteredInput(nn.Module):
    """The inputs minus their batch mean, then the classifier: coupled before every site."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x - x.mean(0, keepdim=True))


def test_samples_coupled_after_the_sites_are_caught_and_before_them_are_exact():
    """Centering the output couples every site's gradient across samples: the probes see
    it and the one-hot route is taken. Centering the input couples nothing the sites'
    gradients depend on (each sample's row is still its own ``gₙ ⊗ aₙ``)."""
    torch.manual_seed(0)
    inner = Classifier(m=3, n=4, k=3)
    data = _data(sizes=(6, 4))
    for wrapper, stacked in ((CenteredOutput, False), (CenteredInput, True)):
        model = wrapper(inner)
        ggn, reference, said = _ggn(model, nn.CrossEntropyLoss(), data,
                                    twin=wrapper(unrolled_twin(inner)))  # fmt: skip
        assert (SITES in said) is stacked, wrapper.__name__
        assert relative_error(ggn, reference) <= 1e-9, wrapper.__name__


class GainCell(nn.Module):
    """``tanh(g ⊙ (W h) + x)``: the gain ``g`` meets the samples in a product the sites
    do not read."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.inner = Cell(n)
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(n))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.gain * (h @ self.inner.W.T) + x + self.inner.b)


def test_a_parameter_no_site_explains_leaves_the_stacked_route():
    """A gain multiplying the state: the one-hot route, exact."""
    torch.manual_seed(0)
    model = Classifier(m=3, n=4, k=3)
    model.deq0 = DEQ(GainCell(4), tol=1e-13, linear_solver="dense")
    twin = unrolled_twin(model)
    ggn, reference, said = _ggn(model, nn.CrossEntropyLoss(), _data(sizes=(5, 4)), twin=twin)
    assert SITES not in said
    assert relative_error(ggn, reference) <= 1e-9


class TwoSites(nn.Module):
    """A weight used by two matrix products (its rows the sum of two outer products)."""

    def __init__(self, m: int = 3, n: int = 4, k: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Linear(m, n)
        self.deq = DEQ(Cell(n), tol=1e-13, linear_solver="dense")
        self.shared = nn.Linear(n, n)
        self.head = nn.Linear(n, k)

    def forward(self, x: Tensor, unrolled: bool = False) -> Tensor:
        u = self.shared(torch.tanh(self.encoder(x)))
        h = self.deq(u) if not unrolled else _unroll(self.deq.cell, u)
        return self.head(torch.tanh(self.shared(h)))


def _unroll(cell: nn.Module, x: Tensor) -> Tensor:
    h = torch.zeros_like(x)
    for _ in range(60):
        h = cell(x, h)
    return h


class _Unrolled(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, unrolled=True)


def test_a_weight_at_two_sites_is_added_as_rows():
    torch.manual_seed(0)
    model = TwoSites()
    curvature = dh.ModelCurvature(model, nn.CrossEntropyLoss(), _data(sizes=(4, 5)))
    ggn = curvature.ggn_operator().to_dense()
    assert SITES in curvature.info.assembly["ggn"]
    twin = _Unrolled(model)
    names = [f"model.{n}" for n in curvature.layout.names]
    reference = Reference(twin, nn.CrossEntropyLoss(), _data(sizes=(4, 5)), names).ggn()
    assert relative_error(ggn, reference) <= 1e-9


def test_a_fixed_point_without_its_visible_evaluation_is_not_read():
    """Outside ``layer_calls(visible=True)`` the cell's parameters meet the samples only
    in the fixed point's own backward: what reaches it is not zero, so no rows."""
    torch.manual_seed(0)
    model = Classifier(m=3, n=4, k=3)
    x = torch.randn(5, 3)
    params = list(model.parameters())
    for visible in (False, True):
        with layer_calls(visible=visible):
            out = model(x)
        sites = find_sites(out, params, 5)
        assert sites is not None  # a fixed point's inputs are left to the check
        assert len(sites.fixed_points) == 1  # found on the same walk
        stacked = torch.randn(2, *out.shape)
        rows = sample_rows(out, sites, stacked, 5)
        assert (rows is not None) is visible
        if visible:  # each sample's rows against one-hot backwards
            for n in range(5):
                for r in range(2):
                    cotangent = torch.zeros_like(out)
                    cotangent[n] = stacked[r, n]
                    grads = torch.autograd.grad(out, params, cotangent, retain_graph=True)
                    for i, g in enumerate(grads):
                        (share,) = rows.factors[i]
                        mine = share[n, r] if not isinstance(share, tuple) else torch.outer(
                            share[0][n, r], share[1][n])  # fmt: skip
                        assert relative_error(mine.reshape(g.shape), g) <= 1e-12


def test_the_visible_evaluation_leaves_the_layers_derivatives_as_they_are():
    torch.manual_seed(0)
    model = Classifier(m=3, n=4, k=3)
    x = torch.randn(5, 3)
    grads = []
    for visible in (False, True):
        with layer_calls(visible=visible):
            loss = model(x).pow(2).sum()
        first = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), list(model.parameters()))
        grads.append(torch.cat([g.detach().reshape(-1) for g in (*first, *second)]))
    assert relative_error(grads[1], grads[0]) <= 1e-12


@pytest.mark.parametrize("case", ["subset", "sum", "float32"])
def test_parameter_subsets_sums_and_float32_take_the_route_exactly(case):
    """The cell's and the head's weights only (biases and the encoder left out), a summed
    data-set loss, a float32 model (against the float64 reference, to float32's
    accuracy)."""
    torch.manual_seed(0)
    model = Classifier(m=3, n=5, k=3)
    data = _data()
    names = ["deq0.cell.W", "head.weight"] if case == "subset" else None
    reduction = "sum" if case == "sum" else "mean"
    reference = Reference(unrolled_twin(model), nn.CrossEntropyLoss(), data,
                          names or [n for n, _ in model.named_parameters()], reduction)  # fmt: skip
    if case == "float32":
        model = model.float()
        model.deq0.tol = 1e-6  # what float32 can reach
        data = [(x.float(), y) for x, y in data]
    curvature = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data, theta=names,
                                  reduction=reduction)  # fmt: skip
    ggn = curvature.ggn_operator().to_dense()
    assert SITES in curvature.info.assembly["ggn"]
    tolerance = 1e-5 if case == "float32" else 1e-9
    assert relative_error(ggn.double(), reference.ggn().detach()) <= tolerance


class _ReusedBuffer:
    """Batches streamed through one reused input buffer (a memory-mapped reader's way)."""

    def __init__(self, data):
        self.data, self.buffer = data, torch.empty_like(data[0][0])

    def __iter__(self):
        for x, y in self.data:
            self.buffer.copy_(x)
            yield self.buffer, y

    def __len__(self):
        return len(self.data)


def test_a_loader_reusing_its_input_buffer_and_an_all_ignored_batch():
    """The weights' activations were kept by reference to the pass's end: a loader
    refilling one buffer made the earlier batches' blocks the last batch's (0.35 off).
    A batch whose targets are all ignore_index has ∇²ℓ = 0 (no factor rows): a raw
    reshape error. Both exact now, on the stacked route."""
    torch.manual_seed(0)
    model = Classifier(m=3, n=4, k=3)
    data = _data(sizes=(5, 5, 5))
    ggn, reference, said = _ggn(model, nn.CrossEntropyLoss(), data)
    reused = dh.ModelCurvature(model, nn.CrossEntropyLoss(), _ReusedBuffer(data))
    assert relative_error(reused.ggn_operator().to_dense(), reference) <= 1e-9
    assert SITES in reused.info.assembly["ggn"]
    ignored = [(x, torch.full_like(y, -100) if i == 1 else y) for i, (x, y) in enumerate(data)]
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    ggn, reference, said = _ggn(model, loss, ignored)
    assert SITES in said and relative_error(ggn, reference) <= 1e-9


class _LeakyOutput(nn.Module):
    """Each sample's output plus ``eps`` times the next sample's: a weak coupling after
    every site."""

    def __init__(self, inner, eps):
        super().__init__()
        self.inner, self.eps = inner, eps

    def forward(self, x):
        out = self.inner(x)
        return out + self.eps * torch.cat([out[1:], torch.zeros_like(out[:1])])


def test_a_weak_coupling_amplified_by_one_samples_large_inputs_is_caught():
    """A float32 coupling of 1e-5 (below the probes' relative 1e3·ε on the gradients at
    the sites) leaked into a sample whose inputs are 10⁴ times the others' and which the
    loss ignores: its rows g ⊗ a carried the leak 10⁴-fold (3.6e-3 off). The probes'
    discrepancy is weighed by each row's activation over the median: the one-hot rows."""
    torch.manual_seed(0)
    inner = Classifier(m=3, n=4, k=3)
    inner.deq0.tol = 1e-6  # float32's reach
    with torch.no_grad():
        inner.encoder.weight.mul_(1e-4)
    data = []
    for x, y in _data(sizes=(5, 4)):
        x = x.clone()
        x[2] *= 1e4
        y = y.clone()
        y[2] = -100
        data.append((x.float(), y))
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    model = _LeakyOutput(inner, 1e-5).float()
    curvature = dh.ModelCurvature(model, loss, data)
    ggn = curvature.ggn_operator().to_dense()
    assert SITES not in curvature.info.assembly["ggn"]
    twin = _LeakyOutput(unrolled_twin(copy.deepcopy(inner).double()), 1e-5)
    names = curvature.layout.names
    reference = Reference(twin, loss, [(x.double(), y) for x, y in data], names).ggn()
    assert relative_error(ggn.double(), reference) <= 1e-5


def test_a_float32_model_whose_output_is_cast_to_float64():
    """The sum was made in the output's dtype: a raw dtype error assembling it."""
    torch.manual_seed(0)
    inner = Classifier(m=3, n=4, k=3).float()
    inner.deq0.tol = 1e-6
    model = nn.Sequential(inner, _Double())
    data = [(x.float(), y) for x, y in _data(sizes=(5, 4))]
    curvature = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data)
    ggn = curvature.ggn_operator().to_dense()
    assert ggn.dtype == torch.float32 and SITES in curvature.info.assembly["ggn"]
    names = [n.removeprefix("0.") for n in curvature.layout.names]
    twin = unrolled_twin(copy.deepcopy(inner).double())
    reference = Reference(twin, nn.CrossEntropyLoss(), [(x.double(), y) for x, y in data],
                          names).ggn()  # fmt: skip
    assert relative_error(ggn.double(), reference) <= 1e-5


class _Double(nn.Module):
    def forward(self, x):
        return x.double()


def test_a_model_the_route_failed_on_is_not_tried_again(monkeypatch):
    """Each try forms its batch's graph with the DEQ cells evaluated visibly (20% of a
    conv model's dense GGN when the route then fails): tried on the first batch of the
    first dense GGN only."""
    from deqhess.models import dense

    torch.manual_seed(0)
    model = Classifier(m=3, n=4, k=3)
    model.deq0 = DEQ(GainCell(4), tol=1e-13, linear_solver="dense")
    tried = []
    original = dense._from_sites
    monkeypatch.setattr(dense, "_from_sites", lambda *a, **k: tried.append(1) or original(*a, **k))
    curvature = dh.ModelCurvature(model, nn.CrossEntropyLoss(), _data(sizes=(5, 4, 3)))
    first = curvature.ggn_operator().to_dense()
    assert torch.equal(curvature.ggn_operator().to_dense(), first)
    assert len(tried) == 1


def test_any_leak_between_samples_however_weak_leaves_the_route():
    """A 1e-12 leak of each sample's output into the previous one (float64): a gain on
    the sample it leaks into can amplify it without bound, so the probes accept no
    discrepancy at all — and a model whose parameters sit in a layer norm is not even
    tried (its graph is formed as usual)."""
    torch.manual_seed(0)
    inner = Classifier(m=3, n=4, k=3)
    curvature = dh.ModelCurvature(_LeakyOutput(inner, 1e-12), nn.CrossEntropyLoss(),
                                  _data(sizes=(5, 4)))  # fmt: skip
    curvature.ggn_operator().to_dense()
    assert SITES not in curvature.info.assembly["ggn"]
    normed = nn.Sequential(inner, nn.LayerNorm(3))
    assert not dh.ModelCurvature(normed, nn.CrossEntropyLoss(), _data())._stacking["ggn"].promising


class _RolledLeak(nn.Module):
    """``l2(h + eps·roll(h))``, ``h = l1(x)``: a leak between samples below rounding
    against a sample whose inputs are 10³⁰ times the others'."""

    def __init__(self, eps):
        super().__init__()
        self.l1, self.l2, self.eps = nn.Linear(3, 4), nn.Linear(4, 2), eps

    def forward(self, x):
        h = self.l1(x)
        return self.l2(h + self.eps * h.roll(1, 0))


def test_a_leak_below_rounding_under_a_huge_sample_leaves_the_route(monkeypatch):
    """The probes cannot see a leak below rounding, and the sample's 10³⁰ inputs made it
    0.71 of another sample's gradient: rows spread over the samples by more than 1/√ε
    take the one-hot route."""
    from deqhess.models import per_sample

    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    x[0] *= 1e30
    model = _RolledLeak(1e-28)
    grads = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)]).per_sample_gradients()
    monkeypatch.setattr(per_sample, "stacked_rows", lambda *a, **k: None)
    want = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)]).per_sample_gradients()
    assert torch.equal(grads[1:], want[1:])
