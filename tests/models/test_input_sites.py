"""The dense Hessian's rows of layers on the data, from each sample's curvature at their
output (``deqhess.models.input_sites``).

References: the unrolled float64 twin of the DEQ models (``models.py``, 1e-9 relative),
``torch.func.hessian`` of the data-set loss for models without DEQ layers (1e-12), and
the same operator with every row from one-hot product directions (1e-12).
"""

from __future__ import annotations

import pytest
import torch
from models import Classifier, Reference, unrolled_twin
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.models import dense


def _data(sizes=(3, 4, 1), m=3, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(sum(sizes), m, generator=g), torch.randn(sum(sizes), k, generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def _by_products(monkeypatch, model, loss, data, **options) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(dense, "find_input_sites", lambda *args: [])
        return dh.ModelCurvature(model, loss, data, **options).hessian()


def _said(curvature: dh.ModelCurvature) -> str:
    return curvature.info.assembly["total"]


@pytest.mark.parametrize("order", ["forward", "reversed", "encoder last"])
def test_an_encoders_rows_from_each_samples_curvature_are_the_unrolled_hessian(order):
    """An encoder ``Linear`` on the data: its rows from the curvature at its output and
    the gradients reaching it from the other rows — the unrolled model's Hessian, with
    the encoder's parameters anywhere in the layout (their columns left of other rows
    are added at the mirror image)."""
    model = Classifier(m=3, n=4, k=2)
    data = _data()
    names = [n for n, _ in model.named_parameters()]
    names = {"forward": names, "reversed": names[::-1], "encoder last": names[2:] + names[:2]}[
        order
    ]
    for loss in (nn.MSELoss(), nn.MSELoss(reduction="sum")):
        curvature = dh.ModelCurvature(model, loss, data, theta=names)
        reference = Reference(unrolled_twin(model), loss, data, names, reduction=loss.reduction)
        got = curvature.hessian()
        assert relative_error(got, reference.total()) <= 1e-9
        assert torch.equal(got, got.T)
        assert "from each sample's curvature" in _said(curvature)


@pytest.mark.parametrize("left_out", ["encoder.weight", "encoder.bias"])
def test_an_encoders_weight_or_bias_alone(monkeypatch, left_out):
    """θ holding the encoder's weight without its bias: the site holds what is chosen;
    the bias alone: its ``o`` rows take no more directions than the route's ``o`` and
    probes, so they are one-hot rows. The Hessian is the one-hot rows' one either way."""
    model = Classifier(m=3, n=4, k=2)
    data = _data()
    names = [n for n, _ in model.named_parameters() if n != left_out]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, theta=names)
    got = curvature.hessian()
    want = _by_products(monkeypatch, model, nn.MSELoss(), data, theta=names)
    assert relative_error(got, want) <= 1e-12
    routed = "from each sample's curvature" in _said(curvature)
    assert routed == (left_out == "encoder.bias")


class _Plain(nn.Module):
    """``head(tanh(A x) ⊕ tanh(B x))``, or with the samples centred after ``A`` (coupled),
    or ``A`` applied twice (tied): no DEQ layer, a reference by ``torch.func.hessian``."""

    def __init__(self, kind: str = "two") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.kind = kind
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        u = self.a(x)
        if self.kind == "coupled":  # every sample's row moves with the others'
            u = u - u.mean(dim=0, keepdim=True)
        if self.kind == "tied":  # A once on the data, once on its own output: no site
            u = self.a(torch.tanh(u[:, :3]))
        return self.head(torch.cat([torch.tanh(u), torch.tanh(self.b(x))], dim=1))


def _func_hessian(model, loss, data) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    total = sum(x.shape[0] for x, _ in data)

    def value(theta):
        params, at = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[at : at + shape.numel()].reshape(shape)
            at += shape.numel()
        return sum(
            x.shape[0] / total * loss(torch.func.functional_call(model, params, (x,)), y)
            for x, y in data
        )

    return torch.func.hessian(value)(flat)


@pytest.mark.parametrize("kind", ["two", "coupled", "tied"])
def test_sites_where_they_hold_and_the_one_hot_rows_where_not(kind):
    """Two layers on the data (their block between them from the same stacked
    directions); a layer whose samples are coupled downstream (centred over the batch:
    the probes find it, and the one-hot rows take over); a layer used twice (not a
    site, beside one that is). Each is the exact Hessian."""
    model = _Plain(kind).double()
    data = [(x.double(), y.double()) for x, y in _data(sizes=(5, 3))]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    got = curvature.hessian()
    assert relative_error(got, _func_hessian(model, nn.MSELoss(), data)) <= 1e-12
    assert ("from each sample's curvature" in _said(curvature)) == (kind != "coupled")


def test_a_coupled_batch_stops_the_route_for_the_pass(monkeypatch):
    """A batch whose samples the model couples at the site's output ends the route: the
    later batches take the one-hot rows without trying it (the stacked directions are
    not run again)."""
    model = _Plain("coupled").double()
    data = [(x.double(), y.double()) for x, y in _data(sizes=(5, 3, 4))]
    tried = []
    found = dense.find_input_sites

    def counting(*args):
        tried.append(1)
        return found(*args)

    monkeypatch.setattr(dense, "find_input_sites", counting)
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    curvature.hessian()
    assert len(tried) == 1


def test_a_loss_linear_in_the_sites_output_has_no_curvature_there():
    """A loss linear in the layer's output (``∂ℓ/∂u`` with no graph): the sites' block is
    zero, and the Hessian exact."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    data = [(x.double(), y.double()) for x, y in _data(sizes=(4, 2))]

    def loss(out, y):
        return (out * y).mean()

    curvature = dh.ModelCurvature(model, loss, data)
    assert relative_error(curvature.hessian(), _func_hessian(model, loss, data)) <= 1e-12


def test_small_blocks_and_assembly_chunks_give_the_same_hessian(monkeypatch):
    """The stacked directions in blocks of one (``chunk_size=1``: the probes in blocks
    of their own too) and the sites' block assembled a row at a time: the same Hessian."""
    model = Classifier(m=3, n=4, k=2)
    data = _data()
    whole = dh.ModelCurvature(model, nn.MSELoss(), data).hessian()
    monkeypatch.setattr("deqhess.models.input_sites.BUDGET", 1)
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, chunk_size=1)
    assert relative_error(curvature.hessian(), whole) <= 1e-12
    assert "from each sample's curvature" in _said(curvature)


def test_samples_coupled_under_a_tiny_loss_are_still_seen():
    """A loss scaled by 1e-160 over a layer whose samples are centred over the batch:
    the probes' products are ~1e-160, whose norms underflow; compared entry by entry
    the coupling is seen and the one-hot rows give the exact Hessian (the encoder's
    block had been 68% off, found by an adversarial round)."""
    model = _Plain("coupled").double()
    data = [(x.double(), y.double()) for x, y in _data(sizes=(4, 3, 2))]

    def loss(out, y):
        return 1e-160 * nn.functional.mse_loss(out, y)

    curvature = dh.ModelCurvature(model, loss, data)
    got = curvature.hessian()
    assert relative_error(got, _func_hessian(model, loss, data)) <= 1e-12
    assert "from each sample's curvature" not in _said(curvature)
