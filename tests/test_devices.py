"""The engine on each device (the ``device`` fixture: the CPU, and CUDA where present)
against float64 references computed on the CPU that share no code with deqhess.

The references are autograd through ``UNROLL_STEPS = 60`` plain iterations of maps
with contraction ≤ 0.45 (``problems.py``; error ``~K² cᴷ ≈ 5e-18``); the fixed points
are solved to 1e-14 and ``cond(I − J) < 3``, so deqhess's answer on any device is a few
hundred ulps off. Tolerance 1e-9 relative, as in the exactness tests: it fails on any
missing or doubled term, or on a result computed on another device's copy of the inputs
and silently moved back. Each result must also live on the requested device.
"""

from __future__ import annotations

import pytest
import torch
from problems import UNROLL_STEPS, case, relative_error
from torch import Tensor, nn

import deqhess as dh
from deqhess.nn import DEQ

TOL = 1e-9


def _on(tree, device: torch.device):
    if isinstance(tree, dict):
        return {k: v.to(device) for k, v in tree.items()}
    return tree.to(device)


def _flat(tree) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()]) if isinstance(tree, dict) else tree


@pytest.mark.parametrize("name", ["tanh_batched", "conv_image"])
def test_equilibrium_grad_hvp_hessian_on_device(device, name):
    c = case(name)
    flat = c.flat_theta()
    reference = c.reference_loss()
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(3))
    ref_grad = torch.func.grad(reference)(flat)
    ref_hessian = torch.func.hessian(reference)(flat)
    eq = dh.Equilibrium(
        c.f,
        _on(c.theta, device),
        c.x.to(device),
        c.h0.to(device),
        tol=1e-14,
        atol=1e-15,
        batch_dim=c.batch_dim,
        max_iter=500,
    )
    grad, hessian, hv = _flat(eq.grad(c.loss)), eq.hessian(c.loss), eq.hvp(c.loss, v.to(device))
    for result in (grad, hessian, hv):
        assert result.device.type == device.type
    assert relative_error(grad.cpu(), ref_grad) <= TOL
    assert relative_error(hessian.cpu(), ref_hessian) <= TOL
    assert relative_error(hv.cpu(), ref_hessian @ v) <= TOL


class _Cell(nn.Module):
    """``tanh(W h + x + b)``, ``‖W‖₂ = 0.4``: a 0.4-contraction in h."""

    def __init__(self, n: int) -> None:
        super().__init__()
        w = torch.randn(n, n)
        self.W = nn.Parameter(0.4 * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(h @ self.W.T + x + self.b)


def _unrolled(cell: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.zeros_like(x)
    for _ in range(UNROLL_STEPS):
        h = torch.func.functional_call(cell, params, (x, h))
    return h


def _layer_loss(h: Tensor) -> Tensor:
    return (h - 0.2).pow(2).sum() + torch.log(torch.cosh(2 * h)).sum()


def test_layer_backward_and_double_backward_on_device(device):
    cell = _Cell(5)
    x = torch.randn(3, 5)
    params = {k: p.detach() for k, p in cell.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def reference(p, x):
        return _layer_loss(_unrolled(cell, p, x))

    ref_grad_p, ref_grad_x = torch.func.grad(reference, argnums=(0, 1))(params, x)
    ref_hv = torch.func.jvp(lambda p: torch.func.grad(reference)(p, x), (params,), (v,))[1]

    deq = DEQ(_Cell(5), tol=1e-14, atol=1e-15, max_iter=500).to(device)
    deq.cell.load_state_dict(cell.state_dict())
    x_on = x.to(device).requires_grad_()
    weights = list(deq.cell.parameters())
    *grads, grad_x = torch.autograd.grad(
        _layer_loss(deq(x_on)), [*weights, x_on], create_graph=True
    )
    dot = sum((g * v[k].to(device)).sum() for g, k in zip(grads, params, strict=True))
    hv = torch.autograd.grad(dot, weights)
    assert all(t.device.type == device.type for t in (*grads, grad_x, *hv))
    assert (
        relative_error(
            _flat(dict(zip(params, grads, strict=True))).detach().cpu(), _flat(ref_grad_p)
        )
        <= TOL
    )
    assert relative_error(grad_x.detach().cpu(), ref_grad_x) <= TOL
    assert relative_error(_flat(dict(zip(params, hv, strict=True))).cpu(), _flat(ref_hv)) <= TOL


class _Unrolled(nn.Module):
    """The reference for a DEQ of ``cell``: its parameters keep their names (``cell.W``)."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor) -> Tensor:
        return _unrolled(self.cell, dict(self.cell.named_parameters()), x)


def test_model_curvature_products_on_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), DEQ(_Cell(4), tol=1e-14, atol=1e-15), nn.Linear(4, 2))
    twin = nn.Sequential(model[0], _Unrolled(model[1].cell), model[2])  # same names
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)) for n in (3, 4)
    ]
    shapes = {name: p.shape for name, p in model.named_parameters()}
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def reference(theta: Tensor) -> Tensor:  # the data-set mean loss, the DEQ unrolled
        pieces = theta.split([s.numel() for s in shapes.values()])
        params = {n: t.reshape(s) for (n, s), t in zip(shapes.items(), pieces, strict=True)}
        total = sum(
            x.shape[0] * nn.functional.cross_entropy(torch.func.functional_call(twin, params, x), y)
            for x, y in data
        )
        return total / sum(x.shape[0] for x, _ in data)

    block = torch.randn(flat.numel(), 2, generator=g)
    expected = torch.func.hessian(reference)(flat) @ block
    on_device = [(x.to(device), y.to(device)) for x, y in data]
    curvature = dh.ModelCurvature(model.to(device), nn.CrossEntropyLoss(), on_device)
    product = curvature.hvp(block.to(device))
    assert product.device.type == device.type
    assert relative_error(product.cpu(), expected) <= TOL
