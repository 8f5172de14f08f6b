"""float32 works, to the accuracy the README promises: 1e-4 relative for the Hessian,
gradient and HVP of well-conditioned problems (cond(I − J) < 10) against float64.

Why 1e-4: the state is solved to 1e-5 relative (the float32 default), which moves
first and second derivatives by about cond(I − J) · 1e-5 relative; accumulation in
P-long sums adds ~sqrt(P)·6e-8.
"""

from __future__ import annotations

import pytest
import torch
from problems import CASE_NAMES, case, relative_error

import deqhess as dh


def _to32(tree):
    if isinstance(tree, torch.Tensor):
        return tree.float()
    return {k: v.float() for k, v in tree.items()}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_matches_float64(name):
    c = case(name)
    eq64 = dh.Equilibrium(c.f, c.theta, c.x, c.h0, tol=1e-13, batch_dim=c.batch_dim)
    eq32 = dh.Equilibrium(c.f, _to32(c.theta), c.x.float(), c.h0.float(), batch_dim=c.batch_dim)
    assert eq32.info.tolerance.rtol == 1e-5
    h32 = eq32.hessian(c.loss_theta)
    assert h32.dtype == torch.float32
    assert relative_error(h32.double(), eq64.hessian(c.loss_theta)) <= 1e-4
    v = torch.randn(eq64.num_parameters)
    hv32 = eq32.hvp(c.loss_theta, v.float())
    assert relative_error(hv32.double(), eq64.hvp(c.loss_theta, v)) <= 1e-4
