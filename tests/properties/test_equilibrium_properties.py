"""Equilibrium against unrolled float64 references on random contractive problems, for
every forward solver × linear solver: gradient (both forms), Hessian and its split,
HVP blocks and θ-structured HVPs, and Z. Tolerance: see ``random_cells.TOLERANCE``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from random_cells import EXAMPLES, check, examples, random_deqs

import deqhess as dh

FORWARD = {"picard": dh.Picard, "anderson": dh.Anderson}
LINEAR = ("dense", "gmres", "neumann")


def flat(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values.values()])


@pytest.mark.parametrize("linear", LINEAR)
@pytest.mark.parametrize("forward", sorted(FORWARD))
@examples(short=3, long=100)
@given(problem=random_deqs())
def test_equilibrium_matches_unrolled(problem, forward, linear):
    EXAMPLES[f"Equilibrium[{forward}-{linear}]"] += 1
    loss = problem.loss
    eq = dh.Equilibrium(
        problem.f, problem.theta, problem.x, problem.h0, solver=FORWARD[forward](),
        tol=1e-14, atol=1e-15, batch_dim=problem.batch_dim, linear_solver=linear,
    )  # fmt: skip
    theta = problem.flat()
    gradient = torch.func.grad(problem.objective)(theta)
    hessian = torch.func.hessian(problem.objective)(theta)
    z, loss_curvature = problem.reference_split(theta)

    check("Equilibrium.grad", flat(eq.grad(loss)), gradient, problem)
    check("Equilibrium.grad(sensitivity)", flat(eq.grad(loss, "sensitivity")), gradient, problem)
    split = eq.hessian_split(loss)
    check("Equilibrium.hessian", split.total, hessian, problem)
    check("Equilibrium.hessian loss_curvature", split.loss_curvature, loss_curvature, problem)
    check(
        "Equilibrium.hessian dynamics_curvature",
        split.dynamics_curvature,
        hessian - loss_curvature,
        problem,
    )
    g = torch.Generator().manual_seed(problem.num_parameters)
    block = torch.randn(problem.num_parameters, 3, generator=g, dtype=torch.float64)
    check("Equilibrium HVP block", eq.hessian_operator(loss) @ block, hessian @ block, problem)
    v = block[:, 0]
    check("Equilibrium.hvp(θ-structured)", flat(eq.hvp(loss, problem.structured(v))), hessian @ v,
          problem)  # fmt: skip
    check("Equilibrium.sensitivity", eq.sensitivity().reshape(-1, theta.numel()), z, problem)
