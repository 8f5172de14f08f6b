"""``layer_calls(watch_accuracy=True)``: a layer solved loosely warns with its error bound.

A layer at ``tol=1e-3`` in float64 leaves its derivatives ~1e-3 off; the layer alone stays
silent (a training loop would warn at every step), but inside the block the first
derivative through each call gives a :class:`deqhess.AccuracyWarning` with the figure
``‖(I − J)⁻¹‖ · r_forward`` that :class:`deqhess.Equilibrium` gives. The reference is
autograd through 400 plain iterations of the cell (contraction 0.8: ``400² · 0.8⁴⁰⁰`` is
far below rounding). The figure bounds the fixed point's error (its definition, see
:mod:`deqhess.linear.accuracy`); the gradient's error is of the same scale, not strictly
below it — measured 0.5–1.9× the figure over these seeds and Anderson too — so it is held
within 4×, the factor the accuracy module documents.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from problems import relative_error
from torch import nn
from torch.func import functional_call

import deqhess
from deqhess.nn import DEQ, convergence, layer_calls


class Cell(nn.Module):
    def __init__(self, n: int = 6):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.8 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, x, h):
        return torch.tanh(self.lin(h) + x)


def _setup(seed: int):
    torch.manual_seed(seed)
    cell = Cell()
    return cell, DEQ(cell, solver="picard", tol=1e-3), torch.randn(4, 6)


def _unrolled(cell: Cell, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    params = {k: v.detach() for k, v in cell.named_parameters()}

    def loss(p):
        h = torch.zeros_like(x)
        for _ in range(400):
            h = functional_call(cell, p, (x, h))
        return h.pow(2).sum(), h

    grads, h = torch.func.grad(loss, has_aux=True)(params)
    return h, grads


def _figures(record) -> list[float]:
    pattern = r"relative error of up to ([0-9.e+-]+)"
    return [
        float(re.search(pattern, str(w.message))[1])
        for w in record
        if issubclass(w.category, deqhess.AccuracyWarning)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_loose_layer_warns_inside_the_block_with_a_figure_that_bounds_its_error(seed):
    cell, deq, x = _setup(seed)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with layer_calls(watch_accuracy=True):
            h = deq(x)
        h.pow(2).sum().backward()  # the derivative may come after the block
    (figure,) = _figures(record)
    assert 1e-6 < figure < 1e-2  # float64's threshold, and a loose tolerance's scale
    want_h, want = _unrolled(cell, x)
    assert relative_error(h.detach(), want_h) <= figure
    for name, p in cell.named_parameters():
        assert relative_error(p.grad, want[name]) <= 4 * figure, name


def test_the_layer_is_silent_without_the_switch():
    """Before: the only behaviour — no warning whatever the error."""
    _, deq, x = _setup(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with layer_calls():
            deq(x).pow(2).sum().backward()
        deq(x).pow(2).sum().backward()
    assert _figures(record) == []


def test_a_convergence_block_inside_carries_the_switch():
    _, deq, x = _setup(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with layer_calls(watch_accuracy=True), convergence("best"):
            deq(x).pow(2).sum().backward()
    assert len(_figures(record)) == 1


class _Square(torch.autograd.Function):
    """``x²`` with a backward and no forward-mode rule (no ``jvp``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _SquareCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(4, 4, dtype=torch.float64))

    def forward(self, x, h):
        return torch.tanh(_Square.apply(h) @ self.weight + x)


def test_a_watched_gmres_layer_with_no_forward_mode_op_gives_its_gradient():
    """Watching a GMRES layer's accuracy takes Arnoldi steps from the forward residual to
    estimate ‖(I − J)⁻¹‖ (and the bound's second-order term): with an operation torch
    has no forward-mode derivative for, the steps had raised torch's raw
    NotImplementedError even on a well-conditioned cell (an adversarial round). They take
    (I − J)ᵀ there instead; the gradient matches the dense solver's."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    grads = {}
    for solver in ("gmres", "dense"):
        torch.manual_seed(1)
        layer = DEQ(_SquareCell(), tol=1e-9, linear_solver=solver)
        with layer_calls(watch_accuracy=True), warnings.catch_warnings():
            warnings.simplefilter("ignore", deqhess.AccuracyWarning)
            out = layer(x)
            grads[solver] = torch.autograd.grad(out.square().sum(), layer.cell.weight)[0]
    assert relative_error(grads["gmres"], grads["dense"]) <= 1e-8
