"""The layer and ``ModelCurvature`` on each device (the ``device`` fixture: the CPU, and
CUDA where present) against ``models.py``'s float64 references on the CPU: autograd
through ``UNROLL = 60`` plain iterations of a 0.4-contraction (``K² 0.4ᴷ ≈ 2e-21``), which
share no code with deqhess. The layers solve to 1e-13 or tighter with
``cond(I − J) ≤ 1/(1 − 0.4)``, so their derivatives carry ~1e-12 on any device; tolerance
1e-9 relative, as in ``test_model_curvature.py``. Each result must also live on the
requested device (a result computed on a CPU copy and moved back would pass the values).
"""

from __future__ import annotations

import torch
from models import Cell, Classifier, Reference, Unrolled, unrolled_twin
from problems import relative_error
from torch import Tensor, nn

import deqhess as dh
from deqhess.nn import DEQ

TOL = 1e-9


def _layer_loss(h: Tensor) -> Tensor:
    return (h - 0.2).pow(2).sum() + torch.log(torch.cosh(2 * h)).sum()


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_layer_backward_and_double_backward_on_device(device):
    cell = Cell(5)
    reference = Unrolled(cell)
    x = torch.randn(3, 5)
    params = {k: p.detach() for k, p in cell.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def objective(p: dict[str, Tensor], x: Tensor) -> Tensor:
        cell_params = {f"cell.{k}": t for k, t in p.items()}
        return _layer_loss(torch.func.functional_call(reference, cell_params, (x,)))

    ref_grad, ref_grad_x = torch.func.grad(objective, argnums=(0, 1))(params, x)
    ref_hv = torch.func.jvp(lambda p: torch.func.grad(objective)(p, x), (params,), (v,))[1]

    deq = DEQ(Cell(5), tol=1e-14, atol=1e-15, max_iter=500).to(device)
    deq.cell.load_state_dict(cell.state_dict())
    x_on = x.to(device).requires_grad_()
    weights = list(deq.cell.parameters())
    *grads, grad_x = torch.autograd.grad(
        _layer_loss(deq(x_on)), [*weights, x_on], create_graph=True
    )
    dot = sum((g * v[k].to(device)).sum() for g, k in zip(grads, params, strict=True))
    hv = torch.autograd.grad(dot, weights)
    assert all(t.device.type == device.type for t in (*grads, grad_x, *hv))
    assert relative_error(_flat(grads).detach().cpu(), _flat(ref_grad.values())) <= TOL
    assert relative_error(grad_x.detach().cpu(), ref_grad_x) <= TOL
    assert relative_error(_flat(hv).cpu(), _flat(ref_hv.values())) <= TOL


def test_model_curvature_products_on_device(device):
    model = Classifier()
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)) for n in (3, 4)
    ]
    names = [n for n, _ in model.named_parameters()]
    reference = Reference(unrolled_twin(model), nn.CrossEntropyLoss(), data, names)
    block = torch.randn(reference.flat.numel(), 2, generator=g)
    expected_total, expected_ggn = reference.total() @ block, reference.ggn() @ block
    on_device = [(x.to(device), y.to(device)) for x, y in data]
    curvature = dh.ModelCurvature(model.to(device), nn.CrossEntropyLoss(), on_device)
    total, ggn = curvature.hvp(block.to(device)), curvature.ggn_operator() @ block.to(device)
    assert total.device.type == ggn.device.type == device.type
    assert relative_error(total.cpu(), expected_total) <= TOL
    assert relative_error(ggn.cpu(), expected_ggn) <= TOL
