"""The three ways to push K directions through one graph agree, and "auto" falls back."""

from __future__ import annotations

import pytest
import torch
from models import Classifier
from torch import nn

import deqhess as dh
from deqhess.models.backward import BlockBackward
from deqhess.nn import DEQ


def _data():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(2)]


@pytest.mark.parametrize("part", ["total", "ggn", "loss_curvature"])
def test_vmapped_and_looped_backwards_agree_and_batched_is_refused(part):
    """Same graph, same products, to rounding (1e-12). Autograd's own batching cannot
    batch the data-dependent checks inside the layer's solves: the layer refuses it with
    UnsupportedDerivativeError (which "auto" passes over, see tests/nn for the layer's
    message), and ModelCurvature refuses the option for DEQ models when it is given."""
    model, data = Classifier(), _data()
    block = torch.randn(dh.ModelCurvature(model, nn.MSELoss(), data).num_parameters, 3)

    def product(mode):
        curvature = dh.ModelCurvature(model, nn.MSELoss(), data, backward=mode)
        return curvature.hessian_operator(part) @ block

    loop = product("loop")
    assert torch.allclose(product("vmap"), loop, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"backward='batched' .* Use backward='vmap'"):
        product("batched")


def test_auto_falls_back_when_the_backward_cannot_be_batched():
    """A backward with data-dependent control flow batches under neither vmap: "auto"
    ends with the loop and gives its products."""

    class Branching(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.sin()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            if bool(grad.isfinite().all()):  # data-dependent control flow
                return grad * x.cos()
            raise ValueError("non-finite gradient")

    x = torch.randn(5, requires_grad=True)
    (first,) = torch.autograd.grad(Branching.apply(x).pow(2).sum(), x, create_graph=True)
    directions = torch.randn(3, 5)
    auto = BlockBackward()
    got = auto([first], [x], [directions])[0]
    assert auto.working == "loop"
    assert torch.equal(got, BlockBackward("loop")([first], [x], [directions])[0])


def test_auto_works_with_an_iterative_linear_solver_in_the_layer():
    """A GMRES DEQ's backward has a data-dependent loop: "auto" still runs, with the
    layer's own vmap rule or the loop, and agrees with the loop."""
    torch.manual_seed(0)
    model = Classifier()
    model.deq0 = DEQ(model.deq0.cell, tol=1e-13, linear_solver="gmres")
    data = _data()
    block = torch.randn(dh.ModelCurvature(model, nn.MSELoss(), data).num_parameters, 2)
    auto = dh.ModelCurvature(model, nn.MSELoss(), data).hessian_operator() @ block
    loop = dh.ModelCurvature(model, nn.MSELoss(), data, backward="loop").hessian_operator()
    assert torch.allclose(auto, loop @ block, rtol=1e-10, atol=1e-12)


def test_unknown_backward_mode():
    with pytest.raises(ValueError, match="unknown backward mode 'fast'"):
        BlockBackward("fast")


class _DistanceHead(nn.Module):
    """The classifier's state measured against prototypes by ``torch.cdist``, whose
    backward torch 2.13 batches wrongly under ``vmap``."""

    def __init__(self):
        super().__init__()
        self.inner = Classifier(m=3, n=4, k=3)
        self.prototypes = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        h = self.inner.before(x)
        return -torch.cdist(h, self.prototypes)


def _cdist_batched_wrongly() -> bool:
    a, b = torch.randn(4, 3), torch.randn(2, 3)
    pull = torch.func.vjp(lambda a: torch.cdist(a, b), a)[1]
    cotangents = torch.randn(3, 4, 2)
    batched = torch.func.vmap(pull)(cotangents)[0]
    plain = torch.stack([pull(c)[0] for c in cotangents])
    return not torch.allclose(batched, plain)


@pytest.mark.skipif(not _cdist_batched_wrongly(), reason="this torch batches cdist right")
def test_a_wrong_batching_rule_in_the_models_graph_falls_back_to_the_loop_or_is_named():
    """A cdist head made the dense GGN 10% off, silently: "auto" checks each kind of
    block once against a plain backward and takes the loop; "vmap" by name refuses."""
    torch.manual_seed(0)
    model = _DistanceHead()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g))]
    looped = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data, backward="loop")
    want = looped.ggn_operator().to_dense()
    auto = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data)
    got = auto.ggn_operator().to_dense()
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-12
    vmapped = dh.ModelCurvature(model, nn.CrossEntropyLoss(), data, backward="vmap")
    with pytest.raises(dh.UnsupportedDerivativeError, match="wrong batching rule in torch"):
        vmapped.ggn_operator().to_dense()


class _Shifted(nn.Module):
    """``lin(x + shift)`` on batch-centred inputs: the shift's gradient cancels to
    rounding (Σₙ xₙ ≈ 1e-17)."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(3))
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x + self.shift)


def test_a_gradient_that_cancels_to_rounding_is_no_batching_disagreement():
    """backward="vmap" by name refused this plain model: the check measured the shift's
    rounding-sized gradient against itself. The block's largest terms are the scale."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g)
    data = [(x - x.mean(0), torch.randn(6, 2, generator=g))]
    model = _Shifted()
    want = dh.ModelCurvature(model, nn.MSELoss(), data, backward="loop", chunk_size=2)
    got = dh.ModelCurvature(model, nn.MSELoss(), data, backward="vmap", chunk_size=2)
    assert torch.equal(got.ggn_operator().to_dense(), want.ggn_operator().to_dense())
