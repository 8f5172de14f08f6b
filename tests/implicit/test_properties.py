"""Property-based checks: hypothesis draws sizes, seeds, contraction rates and batching."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import relative_error

import deqhess as dh


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 4),
    b=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    rate=st.floats(0.05, 0.5),
    batched=st.booleans(),
    nonlinearity=st.sampled_from(["tanh", "sin", "softplus"]),
)
def test_random_deq_hessian_matches_unrolled(n, m, b, seed, rate, batched, nonlinearity):
    """Contraction ``c = rate ≤ 0.5`` (all three nonlinearities are 1-Lipschitz, and the
    softplus map is scaled by 1): 60 unrolled steps are exact to ``3600·0.5⁶⁰ ≈ 3e-15``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    theta = {
        "W": rate * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(n, m, generator=g, dtype=torch.float64),
        "b": torch.randn(n, generator=g, dtype=torch.float64),
    }
    x = torch.randn(b, m, generator=g, dtype=torch.float64)
    act = {"tanh": torch.tanh, "sin": torch.sin, "softplus": torch.nn.functional.softplus}[
        nonlinearity
    ]

    def f(x, h, t):
        return act(h @ t["W"].T + x @ t["U"].T + t["b"])

    target = torch.randn(b, n, generator=g, dtype=torch.float64)

    def loss(h, t):
        return (h - target).pow(2).sum() + (h.exp() * t["b"]).sum()

    h0 = torch.zeros(b, n, dtype=torch.float64)
    eq = dh.Equilibrium(f, theta, x, h0, tol=1e-14, atol=1e-15, batch_dim=0 if batched else None)
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    sizes = [theta[k].numel() for k in names]

    def unrolled(flat):
        leaves = (p.reshape(s) for p, s in zip(flat.split(sizes), shapes, strict=True))
        pieces = dict(zip(names, leaves, strict=True))
        h = h0
        for _ in range(60):
            h = f(x, h, pieces)
        return loss(h, pieces)

    flat = torch.cat([theta[k].reshape(-1) for k in names])
    reference = torch.func.hessian(unrolled)(flat)
    assert relative_error(eq.hessian(loss), reference) <= 1e-9
    v = torch.randn(flat.numel(), generator=g, dtype=torch.float64)
    assert relative_error(eq.hvp(loss, v), reference @ v) <= 1e-9
