"""Weight normalisation along a dimension: first derivatives exact, second refused.

torch 2.13's double backward of ``torch._weight_norm`` (``dim`` ≠ None) is wrong; through
the layer the Hessian of this file's problem came out 49% off, silently. The layer now
refuses any derivative of its gradient in the normalisation's ``g`` and ``v`` — double
backward, ``jacrev(jacrev)`` — while first derivatives, GGN products (derivatives of the
gradient in its cotangent) and second derivatives in the other parameters stay exact.
(torch itself refuses forward mode through ``_weight_norm`` with its
``NotImplementedError``: ``hessian``, ``jvp(grad)``.)

References: 60 plain iterations of the same cell from zero, autograd through them in
float64 (the cell contracts by ``‖W‖_F = 0.45``, so the unrolled error ``~60²·0.45⁶⁰`` is
far below rounding); their first derivatives and the Hessian blocks in ``x`` and the
bias involve no double backward of ``_weight_norm`` (measured exact to 1e-10 against finite
differences). The layer solves to 1e-12, so 1e-9 relative holds with margin. ``J v``
is checked against central differences of the unrolled map (step 1e-5: truncation
~1e-10, rounding ~1e-11), to 1e-7.
"""

from __future__ import annotations

import pytest
import torch
from problems import relative_error
from torch import nn
from torch.func import functional_call

import deqhess
from deqhess.nn import DEQ
from deqhess.nn.second_order import wrong_double_backward


class Cell(nn.Module):
    def __init__(self, legacy: bool, n: int = 4, m: int = 3):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.inj = nn.Linear(m, n)
        if legacy:
            with pytest.warns(FutureWarning, match="weight_norm"):
                nn.utils.weight_norm(self.lin)  # the legacy API, a pre-hook, on purpose
        else:
            nn.utils.parametrizations.weight_norm(self.lin, dim=0)
        with torch.no_grad():  # rows of norm g_i: ‖W‖₂ ≤ ‖W‖_F = 0.45
            for name, p in self.lin.named_parameters():
                if name.endswith(("original0", "weight_g")):
                    p.fill_(0.45 / n**0.5)

    def forward(self, x, h):
        return torch.tanh(self.lin(h) + self.inj(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.lin.out_features)


def _unrolled(cell: Cell, params: dict, x: torch.Tensor) -> torch.Tensor:
    h = cell.init_state(x)
    for _ in range(60):
        h = functional_call(cell, params, (x, h))
    return h


def _setup(legacy: bool):
    torch.manual_seed(0)
    cell = Cell(legacy)
    deq = DEQ(cell, tol=1e-12)
    params = {k: v.detach().clone() for k, v in cell.named_parameters()}
    return cell, deq, params, torch.randn(5, 3)


def _layer(deq: DEQ, params: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(deq, {f"cell.{k}": v for k, v in params.items()}, (x,))


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_weight_norm_first_derivatives_are_exact(legacy):
    cell, deq, params, x = _setup(legacy)

    def loss(model, p, y):
        return model(p, y).pow(3).sum()

    def layer(p, y):
        return _layer(deq, p, y)

    def unrolled(p, y):
        return _unrolled(cell, p, y)

    for got, want in zip(
        torch.func.grad(loss, argnums=(1, 2))(layer, params, x),
        torch.func.grad(loss, argnums=(1, 2))(unrolled, params, x),
        strict=True,
    ):
        for k in want if isinstance(want, dict) else [None]:
            a, b = (got[k], want[k]) if k is not None else (got, want)
            assert relative_error(a, b) <= 1e-9, k


# torch's own notice, from jacrev's vmap over the backward of _weight_norm (no batching rule)
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet")
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "observed"])
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_weight_norm_second_derivatives_in_v_are_refused(legacy, hooked):
    """Before: the Hessian 49% off finite differences of the exact gradient, silently."""
    cell, deq, params, x = _setup(legacy)
    if hooked:  # the visible evaluation's graph carries the gradient: refused as well
        cell.lin.register_forward_hook(lambda m, i, o: None)
    message = r"second derivative through the DEQ layer .*weight normalisation .*cell\.lin"
    h = deq(x)
    grads = torch.autograd.grad(h.pow(3).sum(), list(cell.parameters()), create_graph=True)
    with pytest.raises(deqhess.UnsupportedDerivativeError, match=message):
        torch.autograd.grad(sum(g.pow(2).sum() for g in grads), list(cell.parameters()))

    def loss(p):
        return _layer(deq, p, x).pow(3).sum()

    with pytest.raises(deqhess.UnsupportedDerivativeError, match=message):
        torch.func.jacrev(torch.func.jacrev(loss))(params)
    for transform in (torch.func.hessian, lambda f: torch.func.jacfwd(torch.func.grad(f))):
        with pytest.raises(NotImplementedError):  # torch's, or the layer's (a subclass)
            transform(loss)(params)


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_weight_norm_ggn_products_and_other_second_derivatives_stay_exact(legacy):
    """``J v`` by the double-backward trick (a derivative in the cotangent), and the
    Hessian blocks in ``x`` and ``inj.bias``, as ModelCurvature's GGN and a curvature in
    unnormalised parameters take them."""
    cell, deq, params, x = _setup(legacy)
    params = {k: v.requires_grad_() for k, v in params.items()}
    directions = {k: torch.randn_like(v) for k, v in params.items()}
    h = _layer(deq, params, x)
    probe = torch.zeros_like(h, requires_grad=True)
    transposed = torch.autograd.grad(h, list(params.values()), probe, create_graph=True)
    (jv,) = torch.autograd.grad(transposed, probe, list(directions.values()))
    with torch.no_grad():
        step = 1e-5
        ahead = {k: v + step * directions[k] for k, v in params.items()}
        behind = {k: v - step * directions[k] for k, v in params.items()}
        want = (_unrolled(cell, ahead, x) - _unrolled(cell, behind, x)) / (2 * step)
    assert relative_error(jv, want) <= 1e-7

    def hessian_blocks(model):
        bias = params["inj.bias"].detach().clone().requires_grad_()
        y = x.clone().requires_grad_()
        p = {**{k: v.detach() for k, v in params.items()}, "inj.bias": bias}
        g_bias, g_x = torch.autograd.grad(model(p, y).pow(3).sum(), (bias, y), create_graph=True)
        return torch.autograd.grad(g_bias.pow(2).sum() + g_x.pow(2).sum(), (bias, y))

    got = hessian_blocks(lambda p, y: _layer(deq, p, y))
    want = hessian_blocks(lambda p, y: _unrolled(cell, p, y))
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= 1e-9


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
def test_weight_norm_second_derivatives_in_g_alone_are_exact(legacy):
    """torch's double backward is wrong in ``v`` only: with ``v`` frozen, the Hessian in
    ``g`` through the layer is exact (against the unrolled cell) — it was refused."""
    cell, deq, params, x = _setup(legacy)
    g_name = next(k for k in params if k.endswith(("original0", "weight_g")))

    def blocks(model):
        g = params[g_name].detach().clone().requires_grad_()
        p = {**{k: v.detach() for k, v in params.items()}, g_name: g}
        (grad,) = torch.autograd.grad(model(p, x).pow(3).sum(), g, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), g)[0]

    got = blocks(lambda p, y: _layer(deq, p, y))
    want = blocks(lambda p, y: _unrolled(cell, p, y))
    assert relative_error(got, want) <= 1e-9


def test_weight_norm_along_no_dimension_is_not_refused():
    """``dim=None`` normalises by the whole tensor's norm, by operations whose double
    backward is exact: nothing to refuse."""
    whole = nn.utils.parametrizations.weight_norm(nn.Linear(3, 3), dim=None)
    assert wrong_double_backward(nn.Sequential(whole)) == {}
    rows = nn.utils.parametrizations.weight_norm(nn.Linear(3, 3), dim=0)
    found = wrong_double_backward(nn.Sequential(whole, rows))
    assert found == {
        "1.weight": ("1.parametrizations.weight.original0", "1.parametrizations.weight.original1")
    }
