"""Whole-model operators against unrolled float64 autograd of the same model.

Tolerance 1e-9 relative throughout (the project's exactness bound): the DEQ layers
solve to 1e-13 with ``cond(I − J) ≤ 1/(1 − 0.4)``, so their derivatives carry ~1e-12;
the unrolled references are exact to rounding (see ``models.py``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from models import Classifier, Reference, unrolled_twin
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.curvature import ParameterBlock, extreme_eigenpairs
from deqhess.models import BatchGraph
from deqhess.parameters import ParameterLayout

TOL = 1e-9


def _data(sizes=(3, 4), m=3, k=2, classes=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(sizes), m, generator=g)
    y = (
        torch.randint(0, k, (sum(sizes),), generator=g)
        if classes
        else torch.randn(sum(sizes), k, generator=g)
    )
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


@pytest.mark.parametrize(
    ("loss_func", "classes"),
    [(nn.MSELoss(), False), (nn.CrossEntropyLoss(reduction="sum"), True)],
    ids=["mse-mean", "cross-entropy-sum"],
)
def test_every_operator_equals_unrolled_autograd(loss_func, classes):
    """Hessian, output GGN and the split at the DEQ, dense and as block products, for
    a mean- and a sum-reduced loss; the GGN is PSD, the loss curvature is not."""
    model = Classifier()
    data = _data(classes=classes)
    curvature = dh.ModelCurvature(model, loss_func, data)
    reference = Reference(unrolled_twin(model), loss_func, data, curvature.layout.names,
                          reduction=loss_func.reduction)  # fmt: skip
    total = reference.total()
    loss_part, dynamics_part = reference.split()
    assert relative_error(loss_part + dynamics_part, total) <= 1e-12  # the reference's own split
    block = torch.randn(curvature.num_parameters, 3)
    expected = {"total": total, "ggn": reference.ggn(), "loss_curvature": loss_part,
                "dynamics_curvature": dynamics_part}  # fmt: skip
    for part, matrix in expected.items():
        op = curvature.hessian_operator(part)
        assert relative_error(op @ block, matrix @ block) <= TOL, part
        assert relative_error(op.to_dense(), matrix) <= TOL, part
    assert torch.linalg.eigvalsh(expected["ggn"]).min() >= -1e-12
    split = curvature.hessian_split()
    assert relative_error(split.total, total) <= TOL
    assert relative_error(curvature.hessian(), total) <= TOL
    v = torch.randn(curvature.num_parameters)
    assert relative_error(curvature.hvp(v), total @ v) <= TOL


def test_gradient_and_structured_directions():
    model = Classifier()
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    twin = unrolled_twin(model)
    loss = sum(x.shape[0] / 7 * nn.MSELoss()(twin(x), y) for x, y in data)
    expected = torch.autograd.grad(loss, list(twin.parameters()))
    got = curvature.grad()
    assert list(got) == [n for n, _ in model.named_parameters()]
    for g, e in zip(got.values(), expected, strict=True):
        assert relative_error(g, e) <= TOL
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    structured = curvature.hvp(ones)
    flat = curvature.layout.flatten(structured)
    assert relative_error(flat, curvature.hvp(torch.ones(curvature.num_parameters))) <= 1e-14


def test_chosen_parameters_give_the_principal_block():
    """Parameters by name (or as tensors): the Hessian over them is the principal
    submatrix of the full one, in the order given."""
    model = Classifier()
    data = _data()
    names = ["head.weight", "deq0.cell.W"]
    full = dh.ModelCurvature(model, nn.MSELoss(), data)
    chosen = dh.ModelCurvature(model, nn.MSELoss(), data, theta=names)
    tensors = [model.head.weight, model.deq0.cell.W]
    by_tensor = dh.ModelCurvature(model, nn.MSELoss(), data, theta=tensors)
    assert by_tensor.layout.names == chosen.layout.names == tuple(names)
    dense = full.hessian()
    ranges, start = {}, 0
    for name, size in zip(full.layout.names, full.layout.numels, strict=True):
        ranges[name], start = torch.arange(start, start + size), start + size
    index = torch.cat([ranges[n] for n in names])
    assert relative_error(chosen.hessian(), dense[index][:, index]) <= TOL
    block = ParameterBlock(full.hessian_operator(), full.layout, ["deq0.cell.W"])
    top = extreme_eigenpairs(block, 2, progress=False).eigenvalues
    w = ranges["deq0.cell.W"]
    assert torch.allclose(top, torch.linalg.eigvalsh(dense[w][:, w])[-2:], atol=1e-9)


def test_two_deq_layers_and_the_split_at_either():
    """Stacked DEQs: total and GGN exact; the split needs split_at, and at each layer
    its parts match the reference split there (and sum to the total)."""
    model = Classifier(depth=2)
    data = _data(sizes=(2, 3))
    reference = Reference(unrolled_twin(model), nn.MSELoss(), data,
                          [n for n, _ in model.named_parameters()])  # fmt: skip
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    assert curvature.parts == ("total", "ggn")
    total = reference.total()
    assert relative_error(curvature.hessian(), total) <= TOL
    assert relative_error(curvature.ggn_operator().to_dense(), reference.ggn()) <= TOL
    with pytest.raises(ValueError, match="the model has 2 DEQ layers and no split_at"):
        curvature.hessian_operator("loss_curvature")
    plain = dh.ModelCurvature(nn.Linear(3, 2), nn.MSELoss(), data)
    for part in ("loss_curvature", "dynamics_curvature"):
        with pytest.raises(dh.InputError, match=r"has no DEQ layer .* use 'total'") as caught:
            plain.hessian_operator(part)
        assert "split_at" not in str(caught.value)  # nothing to pass it
    for layer, split_at in [(0, "deq0"), (1, model.deq1)]:
        at = dh.ModelCurvature(model, nn.MSELoss(), data, split_at=split_at)
        loss_part, dynamics_part = reference.split(layer)
        split = at.hessian_split()
        assert relative_error(split.loss_curvature, loss_part) <= TOL, layer
        assert relative_error(split.dynamics_curvature, dynamics_part) <= TOL, layer


def test_streams_the_data_once_per_block_and_shuffled_loaders_agree():
    """A block of K directions is one pass: each DEQ solves once per batch, not once
    per direction; a reshuffling DataLoader gives the same products."""
    model = Classifier()
    data = _data(sizes=(3, 4))
    solves = []
    handle = model.deq0.register_forward_hook(lambda *args: solves.append(1))
    try:
        op = dh.ModelCurvature(model, nn.MSELoss(), data).hessian_operator()
        block = torch.randn(op.shape[0], 5)
        product = op @ block
    finally:
        handle.remove()
    assert len(solves) == 2  # two batches, five directions
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=2, shuffle=True
    )
    shuffled = dh.ModelCurvature(model, nn.MSELoss(), loader).hessian_operator()
    assert relative_error(shuffled @ block, product) <= 1e-12


def test_warm_starts_are_kept_within_their_budget_and_change_no_product():
    """The second pass starts each DEQ from the fixed point the same batch reached on the
    first (the same products to the solves' accuracy); ``cache_bytes=0`` keeps none, and
    a budget that holds one batch's states (3 × 4 float64: 96 bytes, the next 128) keeps
    only the first batch's — without the dense factors of ``I − J``, which a large budget
    keeps too (per sample, ``J``'s and the LU's 4 × 4 float64 blocks and 4 int32 pivots:
    272 bytes)."""
    model = Classifier()
    data = _data(sizes=(3, 4))
    block = torch.randn(dh.ModelCurvature(model, nn.MSELoss(), data).num_parameters, 2)
    products = {}
    for budget in (0, 100, 2**20):
        curvature = dh.ModelCurvature(model, nn.MSELoss(), data, cache_bytes=budget)
        op = curvature.hessian_operator()
        first, second = op @ block, op @ block
        products[budget] = second
        assert curvature.cached_bytes == {0: 0, 100: 96, 2**20: 96 + 128 + 272 * 7}[budget]
        assert relative_error(second, first) <= 1e-10
    assert relative_error(products[2**20], products[0]) <= 1e-10
    with pytest.raises(ValueError, match="cache_bytes must be a non-negative int"):
        dh.ModelCurvature(model, nn.MSELoss(), data, cache_bytes=-1)
    with pytest.warns(DeprecationWarning, match=r"warm_start_bytes=...\) is deprecated"):
        old = dh.ModelCurvature(model, nn.MSELoss(), data, warm_start_bytes=100)
    assert old._stream.store.budget == 100


def test_warm_starts_of_calls_new_on_a_later_pass_are_charged():
    """A forward that calls its DEQ layer more often on a later pass (a plain attribute)
    kept the new calls' fixed points uncharged (21 times the budget); they are kept only
    where they fit, and what the store holds is ``cached_bytes``."""
    from deqhess.batches import held_bytes

    class Repeated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.extra = Classifier(), 0

        def forward(self, x):
            y = self.inner(x)
            for i in range(self.extra):
                y = y + 0.0 * self.inner(x + i + 1)
            return y

    model = Repeated()
    data = _data(sizes=(3, 4))
    v = torch.randn(dh.ModelCurvature(model, nn.MSELoss(), data).num_parameters, 2)
    for budget in (96 + 128, 2**20):
        curvature = dh.ModelCurvature(model, nn.MSELoss(), data, cache_bytes=budget)
        model.extra = 0
        curvature.hvp(v)
        model.extra = 20
        curvature.hvp(v)
        curvature.hvp(v)
        held = sum(held_bytes(e.warm) for e in curvature._stream.store.entries())
        assert held == curvature.cached_bytes <= budget
        assert held > 96 + 128 or budget == 96 + 128


def test_a_model_cast_after_construction_is_named():
    """``model.float()`` after the operator was built on float64 parameters: the next
    product names the parameter and what changed (not torch's raw dtype error of the
    forward); cast back (the weights rounded to float32), a fresh operator's products."""
    model = Classifier()
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters, 2)
    curvature.hvp(v)
    model.float()
    with pytest.raises(
        dh.ModelChangedError,
        match=r"as \(4, 3\) torch.float64 on cpu, and it is now \(4, 3\) torch.float32",
    ):
        curvature.hvp(v)
    model.double()
    fresh = dh.ModelCurvature(model, nn.MSELoss(), data).hvp(v)
    assert relative_error(curvature.hvp(v), fresh) <= 1e-10


def test_a_module_cast_apart_from_the_chosen_parameters_is_named():
    """``theta`` the encoder alone, the head cast to float32: the forward's raw dtype error
    becomes an InputError naming the head's parameters — on a later product and on a
    fresh operator alike."""
    model = Classifier()
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, theta=["encoder.weight"])
    v = torch.randn(curvature.num_parameters)
    curvature.hvp(v)
    model.head.float()
    for operator in (
        curvature,
        dh.ModelCurvature(model, nn.MSELoss(), data, theta=["encoder.weight"]),
    ):
        with pytest.raises(
            dh.InputError, match=r"but head.weight \(float32\), head.bias \(float32\) are not"
        ):
            operator.hvp(v)


def test_model_errors():
    model = Classifier()
    data = _data()
    mse = nn.MSELoss()
    with pytest.raises(ValueError, match=r"unknown parameter names \['nope'\]"):
        dh.ModelCurvature(model, mse, data, theta=["nope"])
    with pytest.raises(ValueError, match="theta is empty: name the parameters"):
        dh.ModelCurvature(model, mse, data, theta=[])
    with pytest.raises(ValueError, match="one-shot iterator"):
        dh.ModelCurvature(model, mse, (b for b in data))
    with pytest.raises(ValueError, match=r"split_at must be one of the model's deqhess\.nn\.DEQ"):
        dh.ModelCurvature(model, mse, data, split_at=model.head)
    with pytest.raises(ValueError, match="split_at='nothing' is not a submodule"):
        dh.ModelCurvature(model, mse, data, split_at="nothing")
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        dh.ModelCurvature(model, mse, data, reduction="max")
    with pytest.raises(ValueError, match="unknown curvature part 'fisher'"):
        dh.ModelCurvature(model, mse, data).hessian_operator("fisher")
    with pytest.raises(ValueError, match=r"0-dim floating tensor; got a torch.float\d+ tensor of"):
        dh.ModelCurvature(model, nn.MSELoss(reduction="none"), data, reduction="sum").grad()
    with pytest.raises(ValueError, match=r"got a torch.int64 tensor of shape \(\)\. .*floating"):
        dh.ModelCurvature(model, lambda o, y: (o > y).sum(), data).grad()
    with pytest.raises(ValueError, match="GaussianNLLLoss requires 3 positional arguments"):
        dh.ModelCurvature(model, nn.GaussianNLLLoss(), data)
    with pytest.raises(ValueError, match="takes 1 positional arguments"):
        dh.ModelCurvature(model, lambda o: o.sum(), data)
    dh.ModelCurvature(model, lambda o, y=None, *, w=1.0: mse(o, y) * w, data).grad()

    def weighted(o, y, w):
        return mse(o, y) * w

    @functools.wraps(weighted)
    def wrapper(o, y):  # a decorator supplying the third argument: its own signature counts
        return weighted(o, y, 2.0)

    dh.ModelCurvature(model, wrapper, data).grad()
    with pytest.raises(ValueError, match="pass batch_size_fn"):
        dh.ModelCurvature(model, mse, [((x,), y) for x, y in data]).grad()
    with pytest.raises(ValueError, match="data is empty"):
        dh.ModelCurvature(model, mse, []).grad()
    with pytest.raises(ValueError, match=r"theta names \['head.bias'\] more than once"):
        dh.ModelCurvature(model, mse, data, theta=["head.bias", "head.weight", "head.bias"])
    with pytest.raises(ValueError, match=r"theta names .* more than once"):
        dh.ModelCurvature(model, mse, data, theta=[model.head.bias, model.head.bias])
    with pytest.raises(ValueError, match="batch_dim must be a non-negative int or None; got True"):
        dh.ModelCurvature(model, mse, data, batch_dim=True)

    class Twice(nn.Module):  # the same DEQ twice in one forward: no single fixed point
        def __init__(self):
            super().__init__()
            self.inner = Classifier()

        def forward(self, x):
            h = self.inner.deq0(torch.tanh(self.inner.encoder(x)))
            return self.inner.head(self.inner.deq0(h))

    twice = dh.ModelCurvature(Twice(), mse, data).hessian_operator("dynamics_curvature")
    with pytest.raises(ValueError, match="ran 2 times in one forward"):
        twice @ torch.randn(twice.shape[0])


def test_a_batch_graph_of_a_split_part_needs_its_split_layer():
    """BatchGraph is public: a split part built without the layer to split at is refused
    before any forward (ModelCurvature itself refuses it earlier, naming its layers)."""
    model = Classifier()
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    layout = ParameterLayout(params)
    (x, y), *_ = _data()
    for part in ("loss_curvature", "dynamics_curvature"):
        with pytest.raises(dh.InputError, match=rf"the '{part}' part splits .* pass split_at="):
            BatchGraph(model, nn.MSELoss(), layout, params, x, y, 1.0, part)
    graph = BatchGraph(model, nn.MSELoss(), layout, params, x, y, 1.0, "loss_curvature", model.deq0)
    assert graph.samples == 1 and graph.params == [params[n] for n in layout.names]


def test_curvlinops_agrees_on_the_same_model():
    """curvlinops' Hessian and GGN operators, through the layer's exact autograd, give
    the same products (≤ 1e-9: both exact, the DEQ solved to 1e-13)."""
    curvlinops = pytest.importorskip("curvlinops")
    model = Classifier()
    data = _data()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(ours.num_parameters)
    for theirs, part in [(curvlinops.HessianLinearOperator, "total"),
                         (curvlinops.GGNLinearOperator, "ggn")]:  # fmt: skip
        op = theirs(model, nn.MSELoss(), params, data, check_deterministic=False)
        assert relative_error(op @ v, ours.hessian_operator(part) @ v) <= TOL, part


class _TwoOutputs(Classifier):
    """The classifier returning its logits and the DEQ's state, as a dict or a tuple."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        h = self.before(x)
        y = self.after(h)
        return {"y": y, "h": h} if self.kind == "dict" else (y, h)


def _two_output_loss(out, target):
    y, h = (out["y"], out["h"]) if isinstance(out, dict) else out
    return ((y - target) ** 2).mean() + 0.3 * (h**4).mean()


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_ggn_of_a_model_with_several_outputs(kind):
    """The GGN at an output made of several tensors is ``Jᵀ∇²ℓJ`` with ``J`` stacking
    their Jacobians: against the unrolled twin's, built on the concatenated output."""
    model = _TwoOutputs(kind)
    data = _data()
    curvature = dh.ModelCurvature(model, _two_output_loss, data)
    twin = unrolled_twin(model)
    names = curvature.layout.names
    named = dict(twin.named_parameters())
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    shapes = [named[n].shape for n in names]

    def stacked(f, x):
        params = dict(zip(names, (t.reshape(s) for t, s in zip(
            f.split([s.numel() for s in shapes]), shapes, strict=True)), strict=True))  # fmt: skip
        y, h = torch.func.functional_call(twin, params, (x,)).values() if kind == "dict" else (
            torch.func.functional_call(twin, params, (x,)))  # fmt: skip
        return torch.cat([y.reshape(-1), h.reshape(-1)])

    expected = 0.0
    total = sum(x.shape[0] for x, _ in data)
    for x, y in data:
        out = stacked(flat, x)
        jac = torch.func.jacrev(stacked)(flat, x)
        cut = y.numel()

        def loss_of(o, y=y, x=x, cut=cut):
            return _two_output_loss((o[:cut].reshape(y.shape), o[cut:].reshape(x.shape[0], -1)), y)

        expected = expected + x.shape[0] / total * jac.T @ torch.func.hessian(loss_of)(out) @ jac
    got = curvature.ggn_operator().to_dense()
    assert relative_error(got, expected) <= TOL
    assert relative_error(curvature.hessian(), dh.ModelCurvature(
        twin, _two_output_loss, data).hessian()) <= TOL  # fmt: skip


def test_a_tied_parameter_may_be_named_by_either_name():
    """``state_dict()`` lists a tied weight under both modules; ``theta`` by its second
    name had been "unknown". Either name chooses the one tensor; both name it twice."""
    model = nn.Sequential(nn.Linear(3, 3), Classifier(m=3, k=3), nn.Linear(3, 3))
    model[2].weight = model[0].weight
    data = _data(m=3, k=3)
    first = dh.ModelCurvature(model, nn.MSELoss(), data, theta=["0.weight"])
    second = dh.ModelCurvature(model, nn.MSELoss(), data, theta=["2.weight"])
    assert second.names == ["0.weight"]
    assert torch.equal(second.hessian(), first.hessian())
    with pytest.raises(ValueError, match=r"more than once.*under either name"):
        dh.ModelCurvature(model, nn.MSELoss(), data, theta=["0.weight", "2.weight"])


def test_the_ggn_of_an_output_with_class_indices_beside_its_logits():
    """Class indices beside the logits do not depend on θ differentiably: the GGN is taken
    at the logits, the indices constants of the loss — the GGN of the same model returning
    the logits alone (it had been refused, while ``output_jacobians()`` accepted the
    output). An output with no floating tensor at all is refused, saying what it needs."""

    class WithIndices(Classifier):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.argmax(-1)

    class IndicesOnly(Classifier):
        def forward(self, x):
            return super().forward(x).argmax(-1)

    def loss(out, target):
        return ((out[0] - target) ** 2).mean()

    model, data = WithIndices(), _data()
    plain = Classifier()
    plain.load_state_dict(model.state_dict())
    got = dh.ModelCurvature(model, loss, data).ggn_operator()
    want = dh.ModelCurvature(plain, lambda o, t: loss((o,), t), data).ggn_operator()
    eye = torch.eye(got.shape[0])
    assert relative_error(got.to_dense(), want.to_dense()) <= TOL
    assert relative_error(got @ eye, want @ eye) <= TOL
    only = dh.ModelCurvature(IndicesOnly(), lambda o, t: o.float().mean(), data)
    with pytest.raises(ValueError, match=r"must hold a floating tensor.*int64"):
        only.ggn_operator() @ torch.randn(only.num_parameters)


def test_a_shared_submodule_keeps_its_parameters():
    """A module registered under two paths (the cell holds the encoder it shares with the
    model): torch's functional_call puts plain tensors back for one path; the model's
    Parameters must be the same objects after every operator (an optimizer holds them)."""

    class Cell(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.lin, self.encoder = nn.Linear(4, 4), encoder

        def forward(self, x, h):
            return torch.tanh(0.3 * self.lin(h) + x + 0.1 * self.encoder.bias)

    encoder = nn.Linear(3, 4)
    model = nn.Sequential(encoder, dh.nn.DEQ(Cell(encoder), tol=1e-13), nn.Linear(4, 2))
    before = {id(p): p for p in model.parameters()}
    registered = [(m, dict(m._parameters)) for m in model.modules()]
    data = [(torch.randn(5, 3), torch.randn(5, 2))]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters)
    curvature.grad()
    curvature.hessian_operator("ggn") @ v
    curvature.hessian_operator("loss_curvature") @ v
    for module, parameters in registered:
        for name, p in parameters.items():
            assert module._parameters[name] is p and isinstance(p, nn.Parameter), name
    assert {id(p) for p in model.parameters()} == set(before)
    x, y = data[0]
    loss = nn.MSELoss()(model(x), y)  # the layer's exact gradient, by plain autograd
    named = dict(model.named_parameters())
    got = curvature.grad()
    for name, g in zip(got, torch.autograd.grad(loss, [named[n] for n in got]), strict=True):
        assert relative_error(got[name], g) <= TOL, name


def test_model_options_are_checked_at_construction():
    model, data = Classifier(), _data()
    for bad, match in [(0, "an int >= 1; got 0"), (-1, "an int >= 1; got -1"),
                       (2.5, r"an int; got 2\.5"), ("8", "an int; got '8'")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"chunk_size must be {match}"):
            dh.ModelCurvature(model, nn.MSELoss(), data, chunk_size=bad)
    with pytest.raises(ValueError, match=r"backward='batched' .* cannot go through a deqhess"):
        dh.ModelCurvature(model, nn.MSELoss(), data, backward="batched")
    # a model without DEQ layers may batch its backward
    plain = nn.Sequential(nn.Linear(3, 2))
    assert dh.ModelCurvature(plain, nn.MSELoss(), data, backward="batched").hessian().shape == (
        8,
        8,
    )


def test_old_names_work_with_a_deprecation_warning():
    """``loss_func``, ``params`` and ``warm_start_bytes`` became ``loss``, ``theta`` and
    ``cache_bytes`` (the names of every data-set front end); the old ones still work."""
    from deqhess.cli import ModelProblem

    model, data = Classifier(), _data()
    names = ["head.weight", "head.bias"]
    new = dh.ModelCurvature(model, nn.MSELoss(), data, theta=names).hessian()
    with pytest.warns(DeprecationWarning, match=r"ModelCurvature\(loss_func=...\) is deprecated"):
        old = dh.ModelCurvature(model, loss_func=nn.MSELoss(), data=data, theta=names)
    assert torch.equal(old.hessian(), new)
    with pytest.warns(DeprecationWarning, match=r"\(params=...\) is deprecated.*use theta="):
        old = dh.ModelCurvature(model, nn.MSELoss(), data, params=names)
    assert old.names == names
    with pytest.raises(ValueError, match="got both theta= and its deprecated name params="):
        dh.ModelCurvature(model, nn.MSELoss(), data, names, params=names)
    with pytest.warns(DeprecationWarning, match=r"ModelProblem\(params=...\)"):
        assert ModelProblem(model, nn.MSELoss(), data, params=names).theta == names


def test_the_split_flag_is_deprecated_for_hessian_split():
    model, data = Classifier(), _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    with pytest.warns(DeprecationWarning, match=r"ModelCurvature\.hessian\(\.\.\., split=True\)"):
        old = curvature.hessian(split=True)
    new = curvature.hessian_split()
    assert torch.equal(old.total, new.total) and torch.equal(old.loss_curvature, new.loss_curvature)


def test_a_loss_without_a_graph_has_zero_derivatives_and_a_detached_one_warns():
    """A loss constant on a batch (by design) adds zero there; one that detached the
    model's output warns that its derivatives are zero; a model whose output depends on
    none of the chosen parameters has zero derivatives (it had reached torch's own error)."""
    model = Classifier()
    data = _data()
    mse = nn.MSELoss()

    with pytest.warns(RuntimeWarning, match="no graph back to the model's output"):
        grads = dh.ModelCurvature(model, lambda out, y: mse(out.detach(), y), data).grad()
    assert all(float(g.abs().max()) == 0 for g in grads.values())
    only = [data[0]]
    partial = dh.ModelCurvature(model, mse, only)
    mixed = dh.ModelCurvature(
        model, lambda out, y: mse(out, y) if len(y) == 3 else torch.zeros(()), data
    )  # batches of 3 and 4: the second's loss is a constant
    with pytest.warns(RuntimeWarning, match="if that is not by design"):
        assert relative_error(mixed.hessian(), partial.hessian() * 3 / 7) <= 1e-12
    frozen = Classifier()
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.extra = nn.Linear(2, 2)  # trainable, not in the forward
    curvature = dh.ModelCurvature(frozen, mse, data)
    assert float(curvature.hessian().abs().max()) == 0
    assert float(curvature.grad()["extra.weight"].abs().max()) == 0


def _in_two_threads(work):
    """``work("A")`` and ``work("B")`` in two threads at once; the errors they raised."""
    import threading

    errors = []

    def run(key):
        try:
            work(key)
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(k,)) for k in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_two_threads_taking_products_take_turns():
    """Two threads taking products of one ModelCurvature at once: each pass runs alone
    (a pass swaps the model's parameters for its leaves), so both get the exact products
    and the model keeps its parameters, in order and as parameters."""

    model = Classifier()
    data = _data(sizes=(3, 3))
    names = [n for n, _ in model.named_parameters()]
    op = dh.ModelCurvature(model, nn.MSELoss(), data).hessian_operator()
    v = torch.randn(op.shape[0], 4)
    expected = Reference(unrolled_twin(model), nn.MSELoss(), data, names).total() @ v
    results = {}

    def work(name):
        results[name] = [op @ v[:, i : i + 1] for i in range(4)]

    assert not _in_two_threads(work)
    for columns in results.values():
        assert relative_error(torch.cat(columns, 1), expected) <= TOL
    assert [n for n, _ in model.named_parameters()] == names
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_two_models_sharing_a_layer_take_turns_in_two_threads():
    """Two models that share their DEQ layer (two heads on one equilibrium), analysed in
    two threads at once: each pass swaps the shared layer's parameters too, so the passes
    take turns by every module's lock. With the model's own lock alone, each saw the
    other's swap as its forward writing its own state (a false ModelChangedError)."""

    first = Classifier()
    second = Classifier()
    second.deq0 = first.deq0
    data = _data(sizes=(3, 3))
    results = {}
    ops = {}
    expected = {}
    for key, model in (("A", first), ("B", second)):
        names = [n for n, _ in model.named_parameters()]
        ops[key] = dh.ModelCurvature(model, nn.MSELoss(), data).hessian_operator()
        reference = Reference(unrolled_twin(model), nn.MSELoss(), data, names).total()
        expected[key] = reference @ torch.eye(reference.shape[0])[:, :3]

    def work(key):
        units = torch.eye(ops[key].shape[0])
        results[key] = [[ops[key] @ units[:, i : i + 1] for i in range(3)] for _ in range(3)]

    assert not _in_two_threads(work)
    for key, rounds in results.items():
        for columns in rounds:
            assert relative_error(torch.cat(columns, 1), expected[key]) <= TOL
    assert all(isinstance(p, nn.Parameter) for p in [*first.parameters(), *second.parameters()])
