"""Per-sample gradients and output Jacobians of a model through its DEQ layer, against
``torch.func`` on the unrolled twin one sample at a time (1e-9 relative: the layer
solves to 1e-13 with contraction ≤ 0.4); their sums against the data-set gradient and
GGN."""

from __future__ import annotations

import pytest
import torch
from models import Classifier, unrolled_twin
from problems import relative_error
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deqhess as dh


def _data(samples=7, m=3, k=2, classes=False):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(samples, m, generator=g)
    y = torch.randint(0, k, (samples,), generator=g) if classes else torch.randn(samples, k)
    return x, y


def _flat_call(model, names, shapes):
    def call(flat, x):
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return torch.func.functional_call(model, values, (x,))

    return call


@pytest.mark.parametrize(
    ("loss", "classes"),
    [(nn.MSELoss(), False), (nn.CrossEntropyLoss(reduction="sum"), True)],
    ids=["mse-mean", "cross-entropy-sum"],
)
def test_per_sample_gradients_and_output_jacobians_equal_the_unrolled_model(loss, classes):
    model = Classifier()
    x, y = _data(classes=classes)
    data = list(zip(x.split([3, 4]), y.split([3, 4]), strict=True))
    curvature = dh.ModelCurvature(model, loss, data, progress=False)
    twin = unrolled_twin(model)
    named = dict(twin.named_parameters())
    names = curvature.layout.names
    call = _flat_call(twin, names, [named[n].shape for n in names])
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    grads = curvature.per_sample_gradients()
    expected = torch.stack(
        [torch.func.grad(lambda f, i=i: loss(call(f, x[i : i + 1]), y[i : i + 1]))(flat)
         for i in range(len(x))]
    )  # fmt: skip
    assert grads.shape == (7, curvature.num_parameters)
    assert relative_error(grads, expected) <= 1e-9
    mean = loss.reduction == "mean"
    total = grads.mean(0) if mean else grads.sum(0)
    assert relative_error(total, curvature.layout.flatten(curvature.grad())) <= 1e-12
    jacobians = curvature.output_jacobians()
    expected = torch.stack([torch.func.jacrev(call)(flat, x[i : i + 1])[0] for i in range(7)])
    assert jacobians.shape == (7, 2, curvature.num_parameters)
    assert relative_error(jacobians, expected) <= 1e-9
    # the GGN from the Jacobians: Σ_i w J_iᵀ ∇²ℓ_i J_i, ℓ_i the loss on sample i alone
    ggn = sum(
        j.T @ torch.func.hessian(lambda o, i=i: loss(o[None], y[i : i + 1]))(out) @ j
        for i, (j, out) in enumerate(zip(jacobians, model(x).detach(), strict=True))
    )
    ggn = ggn / len(x) if mean else ggn
    assert relative_error(curvature.ggn_operator().to_dense(), ggn) <= 1e-10


def test_rows_follow_the_pass_and_leave_excluded_samples_out():
    """A shuffling loader gives the rows in its own order: the same multiset of rows."""
    model = Classifier()
    x, y = _data()
    ordered = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)]).per_sample_gradients()
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
    shuffled = dh.ModelCurvature(model, nn.MSELoss(), loader).per_sample_gradients()
    key = lambda rows: rows[torch.argsort(rows[:, 0])]  # noqa: E731
    assert relative_error(key(shuffled), key(ordered)) <= 1e-12


def test_per_sample_needs_samples_along_the_first_dimension():
    model = nn.Sequential(Classifier(), nn.Flatten(0))  # the batch's outputs in one vector
    x, y = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), [(x, y.reshape(-1))])
    with pytest.raises(dh.InputError, match="hold the batch's 7 samples along their first"):
        curvature.per_sample_gradients()
    with pytest.raises(dh.InputError, match="need every floating tensor of the model's output"):
        curvature.output_jacobians()
    with dh.memory_limit(1000), pytest.raises(dh.DenseMemoryError, match=r"\[N, P\] with N = 7"):
        dh.ModelCurvature(Classifier(), nn.MSELoss(), [(x, y)]).per_sample_gradients()


def test_rows_of_a_loss_that_is_not_a_plain_mean_say_so():
    """Class weights make a cross-entropy's batch loss a weighted mean: each row is still
    its sample's own loss gradient (the loss on a batch of one), but the rows' mean is not
    grad() (57–108% off, measured) — a warning says so instead of the identity failing
    silently."""
    model = Classifier()
    x, y = _data(classes=True)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0]))
    curvature = dh.ModelCurvature(model, weighted, [(x, y)])
    with pytest.warns(RuntimeWarning, match=r"rows do not add up to its gradient .* not the "
                      r"plain mean of its samples' losses"):  # fmt: skip
        rows = curvature.per_sample_gradients()
    twin = unrolled_twin(model)
    named = dict(twin.named_parameters())
    names = curvature.layout.names
    call = _flat_call(twin, names, [named[n].shape for n in names])
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    own = torch.func.grad(lambda f: weighted(call(f, x[:1]), y[:1]))(flat)
    assert relative_error(rows[0], own) <= 1e-9


class _CenteredOutput(nn.Module):
    """The classifier's output minus its batch mean: samples coupled after every site."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out - out.mean(0, keepdim=True)


@pytest.mark.parametrize("coupled", [False, True])
def test_rows_from_stacked_cotangents_where_the_graph_allows_else_one_hot(monkeypatch, coupled):
    """A linear → DEQ → linear model: each sample's rows from one stacked cotangent (the
    per-sample gradients) or C (the Jacobians), the same as the one-hot rows; with the
    output centred over the batch the probes refuse the stacked rows, and the one-hot
    rows (each sample's within the batch) are taken."""
    from deqhess.models import per_sample

    torch.manual_seed(0)
    model = Classifier()
    model = _CenteredOutput(model) if coupled else model
    x, y = _data()
    data = list(zip(x.split([3, 4]), y.split([3, 4]), strict=True))
    answered = []
    stacked = per_sample.stacked_rows

    def spy(*args, **kwargs):
        rows = stacked(*args, **kwargs)
        answered.append(rows is not None)
        return rows

    monkeypatch.setattr(per_sample, "stacked_rows", spy)
    fast = dh.ModelCurvature(model, nn.MSELoss(), data)
    grads, jacobians = fast.per_sample_gradients(), fast.output_jacobians()
    # a failure: one-hot rows after it, for either quantity (the route is remembered)
    assert answered == ([False] if coupled else [True] * 4)
    monkeypatch.setattr(per_sample, "stacked_rows", lambda *a, **k: None)
    plain = dh.ModelCurvature(model, nn.MSELoss(), data)
    assert relative_error(grads, plain.per_sample_gradients()) <= 1e-12
    assert relative_error(jacobians, plain.output_jacobians()) <= 1e-12


def test_rows_of_a_float32_model_whose_output_is_cast_are_in_its_dtype():
    """The stacked rows were made in the output's float64 (twice the memory sized for),
    the one-hot ones in the parameters' float32."""

    class Double(nn.Module):
        def forward(self, x):
            return x.double()

    torch.manual_seed(0)
    inner = Classifier().float()
    inner.deq0.tol = 1e-6
    x, y = _data()
    curvature = dh.ModelCurvature(nn.Sequential(inner, Double()), nn.MSELoss(),
                                  [(x.float(), y.double())])  # fmt: skip
    assert curvature.per_sample_gradients().dtype == torch.float32
    assert curvature.output_jacobians().dtype == torch.float32


def test_a_loss_without_a_value_on_one_sample_is_named_in_per_sample_gradients():
    """A loss that standardises the outputs over the batch (unbiased std: NaN on one
    sample) has no per-sample loss: the solve's "right-hand side is not finite" said
    nothing of it. An ignore_index sample alone is NaN too, but its gradient is zero: its
    row stays (zeros), as before."""
    model = Classifier()
    x, y = _data(classes=True)

    def standardised(out, target):
        return nn.functional.cross_entropy((out - out.mean(0)) / (out.std(0) + 1.0), target)

    curvature = dh.ModelCurvature(model, standardised, [(x, y)])
    with pytest.raises(dh.NonFiniteError, match=r"the loss of sample 0 alone .* is nan"):
        curvature.per_sample_gradients()
    assert torch.isfinite(curvature.hessian_operator() @ torch.ones(curvature.num_parameters)).all()
    ignoring = dh.ModelCurvature(model, nn.CrossEntropyLoss(ignore_index=1), [(x, y)])
    with pytest.warns(RuntimeWarning, match="rows do not add up"):
        rows = ignoring.per_sample_gradients()
    assert torch.isfinite(rows).all() and not bool(rows[y == 1].any())
    assert bool(rows[y == 0].any(dim=1).all())


def test_a_loss_that_fails_on_one_sample_is_named_in_per_sample_gradients():
    """A model returning its samples along the second dimension (logits.T), with a loss
    that transposes back: the loss on one sample's "row" raised torch's raw batch-size
    mismatch from inside the user's loss."""
    model = nn.Sequential(Classifier(k=3), _Transposed())
    x, _ = _data(samples=3)
    y = torch.tensor([0, 2, 1])
    curvature = dh.ModelCurvature(model, lambda out, t: nn.functional.cross_entropy(out.T, t),
                                  [(x, y)])  # fmt: skip
    with pytest.raises(dh.InputError, match=r"evaluate the loss on each sample alone .* "
                       r"loss_func raised ValueError"):  # fmt: skip
        curvature.per_sample_gradients()


class _Transposed(nn.Module):
    def forward(self, out):
        return out.T


class _RootAtZero(nn.Module):
    """``‖W x‖`` by ``sqrt``: its gradient is not finite where ``W x = 0``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.lin(x).pow(2).sum(1, keepdim=True).sqrt()


def test_rows_that_are_not_finite_are_refused_not_returned():
    """Each sample's loss finite, its gradient not (sqrt at 0): the rows came back with
    NaN in them; refused by name."""
    model = _RootAtZero()
    with torch.no_grad():
        model.lin.weight.zero_()
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    curvature = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)])
    with pytest.raises(dh.NonFiniteError, match="a per-sample gradient is not finite"):
        curvature.per_sample_gradients()
