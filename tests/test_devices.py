"""``Equilibrium`` on each device (the ``device`` fixture: the CPU, and CUDA where
present) against float64 references computed on the CPU that share no code with deqhess
(the layer and ``ModelCurvature`` on each device: ``tests/models/test_model_devices.py``).

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
from problems import case, relative_error
from torch import Tensor

import deqhess as dh

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
