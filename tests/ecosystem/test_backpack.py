"""BackPACK on models holding a DEQ layer.

First-order extensions read each module's input (a forward hook) and the gradient at its
output (a full backward hook): with the layer's hooks seeing one evaluation at ``h*``
whose backward carries the adjoint, per-sample gradients and their statistics are those
of the exact model — compared with ``vmap(grad)`` through the unrolled twin to 1e-10
(float64; the fixed point is solved to 1e-13, the references are exact to rounding).

Second-order extensions (DiagGGN, KFAC, KFLR) propagate a matrix through every module by
BackPACK's own per-module rules; the DEQ layer and the operations inside a cell have none,
so BackPACK stops with its own error — never a number. A documented limitation (the
ecosystem page): use curvlinops, ASDL or laplace-torch's Curvlinops/ASDL backends there.
"""

from __future__ import annotations

import pytest
import torch
from problems import relative_error

from .models import build, per_sample_gradients

backpack = pytest.importorskip("backpack")
from backpack import extensions  # noqa: E402

# BackPACK warns about every module it has no rule for that holds parameters (the DEQ
# layer and the user's cell, which it sees only through their submodules)
# layer and the user's cell, which it sees only through their submodules); torch warns
# that the encoder's full backward hook fires at its output (the data needs no grad)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Extension saving to:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

FIRST_ORDER = ["tanh", "conv"]


def _run(setup, *exts):
    model = backpack.extend(setup.model)
    loss_func = backpack.extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    with backpack.backpack(*exts):
        loss_func(model(setup.X), setup.y).backward()
    return dict(setup.model.named_parameters())


@pytest.mark.parametrize("kind", FIRST_ORDER)
def test_first_order_extensions_are_exact(kind):
    setup = build(kind)
    per_sample = per_sample_gradients(setup)  # [N, P] in the model's parameter order
    params = _run(
        setup,
        extensions.BatchGrad(),
        extensions.Variance(),
        extensions.SumGradSquared(),
        extensions.BatchL2Grad(),
    )
    start = 0
    for name, p in params.items():
        g = per_sample[:, start : start + p.numel()].reshape(-1, *p.shape)
        start += p.numel()
        assert relative_error(p.grad_batch, g) <= 1e-10, name
        assert relative_error(p.sum_grad_squared, (g**2).sum(0)) <= 1e-10, name
        assert relative_error(p.batch_l2, (g**2).flatten(1).sum(1)) <= 1e-10, name
        assert relative_error(p.variance, g.var(0, unbiased=False)) <= 1e-9, name
        assert relative_error(p.grad, g.sum(0)) <= 1e-10, name


class _ClosureModel(torch.nn.Module):
    """The tanh setup's encoder, cell and head around ``get_deq``'s closure form."""

    def __init__(self, setup):
        super().__init__()
        from deqhess.nn import get_deq

        self.encoder, self.cell, self.head = setup.model[0], setup.cell, setup.model[2]
        self.deq = get_deq(f_solver="anderson", f_max_iter=200, f_tol=1e-13, f_stop_mode="rel",
                           b_tol=1e-13, b_stop_mode="rel", b_max_iter=200)  # fmt: skip

    def forward(self, X):
        x = self.encoder(X)
        return self.head(self.deq(lambda h: self.cell(x, h), torch.zeros_like(x))[0][-1])


def test_first_order_extensions_through_get_deqs_closure_are_exact():
    """``deqhess.nn.get_deq``'s closure form: BackPACK's hooks on the cell's modules saw
    every solver iteration (an AttributeError from BackPACK); they now see one evaluation
    at the fixed point, as through the layer — per-sample gradients exact."""
    setup = build("tanh")
    setup.model = _ClosureModel(setup)
    per_sample = per_sample_gradients(setup)
    params = _run(setup, extensions.BatchGrad())
    start = 0
    for name, p in params.items():
        g = per_sample[:, start : start + p.numel()].reshape(-1, *p.shape)
        start += p.numel()
        assert relative_error(p.grad_batch, g) <= 1e-10, name


@pytest.mark.parametrize(
    "extension",
    [extensions.DiagGGNExact, extensions.DiagGGNMC, extensions.KFAC, extensions.KFLR],
    ids=lambda e: e.__name__,
)
def test_second_order_extensions_stop_with_an_error(extension):
    setup = build("tanh")
    with pytest.raises(AssertionError, match="expects a backpropagation quantity"):
        _run(setup, extension())
