"""``ParameterProducts``: a single direction's JVP is traced only once it pays.

The trace (``torch.func.linearize``) costs as much as a hundred or more plain JVPs; products
made afresh for each pass over a data set serve one direction each and must never trace
(that made each single HVP of a data-set operator 9× slower). The plain and traced JVPs
are the same linear map: compared against ``torch.func.jvp`` at rounding level.
"""

from __future__ import annotations

import torch

from deqhess.implicit.hvp import TRACE_AFTER, ParameterProducts
from deqhess.tangents import linearize


def test_single_directions_trace_only_after_a_few_and_agree():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    theta = torch.randn(6, dtype=torch.float64, generator=g)

    def of_theta(t):
        return torch.tanh(w * t).sum(dim=1, keepdim=True)

    traces = []

    def trace():
        traces.append(1)
        return linearize(of_theta, theta)

    def jvp(v):
        return torch.func.jvp(of_theta, (theta,), (v,))[1]

    products = ParameterProducts(jvp, lambda mu: mu, traced_jvp=trace)
    directions = torch.randn(TRACE_AFTER + 3, 6, dtype=torch.float64, generator=g)
    for i, v in enumerate(directions):
        got = products.jvps(v[None])[0]
        assert torch.allclose(got, jvp(v), rtol=1e-14, atol=1e-15)
        assert len(traces) == (0 if i < TRACE_AFTER else 1)
    block = products.jvps(directions)  # a block is vmapped, never traced
    assert torch.allclose(block, torch.stack([jvp(v) for v in directions]), atol=1e-15)
    assert len(traces) == 1
