"""DatasetEquilibrium against the unrolled data-set loss ``Σ_b w_b ℓ_b`` on random
contractive problems cut into random batches: gradient, Hessian and its loss part, HVP
blocks. Tolerance: see ``random_cells.TOLERANCE``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from random_cells import EXAMPLES, check, examples, random_deqs

import deqhess as dh

FORWARD = {"picard": dh.Picard, "anderson": dh.Anderson}


def flat(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values.values()])


@pytest.mark.parametrize("linear", ["dense", "gmres", "neumann"])
@examples(short=2, long=50)
@given(
    problem=random_deqs(batch_dims=("first",)),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    reduction=st.sampled_from(["mean", "sum"]),
    forward=st.sampled_from(sorted(FORWARD)),
    seed=st.integers(0, 2**31 - 1),
)
def test_dataset_matches_unrolled(problem, sizes, reduction, forward, seed, linear):
    EXAMPLES[f"DatasetEquilibrium[{linear}]"] += 1
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    m = problem.x.shape[1]
    xs = torch.randn(total, m, generator=g, dtype=torch.float64).split(sizes)
    ys = torch.randn(total, problem.width, generator=g, dtype=torch.float64).split(sizes)
    batches = [
        dataclasses.replace(problem, shape=(n, *problem.shape[1:]), samples=n, x=x, target=y)
        for n, x, y in zip(sizes, xs, ys, strict=True)
    ]
    scale = 1.0 / total if reduction == "mean" else 1.0  # w_b · ℓ_b = scale · loss_value

    def batch_loss(n):
        return 1.0 / n if reduction == "mean" else 1.0  # ℓ_b: a batch mean or sum

    if problem.uses_theta:

        def loss(h, theta, y):
            return batch_loss(h.shape[0]) * problem.loss_value(h, theta, y)
    else:

        def loss(h, y):
            return batch_loss(h.shape[0]) * problem.loss_value(h, None, y)

    data = dh.DatasetEquilibrium(
        problem.f, problem.theta, list(zip(xs, ys, strict=True)), loss,
        init_state=lambda x: torch.zeros(x.shape[0], *problem.shape[1:], dtype=torch.float64),
        reduction=reduction, solver=FORWARD[forward](), tol=1e-14, atol=1e-15,
        linear_solver=linear, progress=False,
    )  # fmt: skip
    theta = problem.flat()

    def objective(t):
        return scale * sum(b.objective(t) for b in batches)

    gradient = torch.func.grad(objective)(theta)
    hessian = torch.func.hessian(objective)(theta)
    loss_curvature = scale * sum(b.reference_split(theta)[1] for b in batches)
    check("DatasetEquilibrium.grad", flat(data.grad()), gradient, problem)
    split = data.hessian_split()
    check("DatasetEquilibrium.hessian", split.total, hessian, problem)
    check("DatasetEquilibrium.hessian loss_curvature", split.loss_curvature, loss_curvature,
          problem)  # fmt: skip
    block = torch.randn(problem.num_parameters, 2, generator=g, dtype=torch.float64)
    check("DatasetEquilibrium HVP block", data.hessian_operator() @ block, hessian @ block,
          problem)  # fmt: skip
