"""nn.DEQ against unrolled float64 references on random contractive cells, for every
derivative mode × linear solver: ``loss.backward()``, second order by ``create_graph``,
``torch.func.grad``, ``torch.func.jvp`` (forward mode) and ``torch.func.hessian``.
Tolerance: see ``random_cells.TOLERANCE``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from random_cells import EXAMPLES, ProblemCell, RandomDEQ, check, examples, random_deqs

import deqhess as dh
from deqhess.nn import DEQ

FORWARD = {"picard": dh.Picard, "anderson": dh.Anderson}
LINEAR = ("dense", "gmres", "neumann")
MODES = ("backward", "create_graph", "func_grad", "func_jvp", "func_hessian")
CASES = [pytest.param(mode, linear) for mode in MODES for linear in LINEAR]


def _loss(problem: RandomDEQ, h, params):
    theta = {n.removeprefix("cell."): p for n, p in params.items()}
    return problem.loss_value(h, theta if problem.uses_theta else None, problem.target)


@pytest.mark.parametrize(("mode", "linear"), CASES)
@examples(short=2, long=60)
@given(
    problem=random_deqs(batch_dims=("none", "first")),
    forward=st.sampled_from(["picard", "anderson"]),
)
def test_layer_derivatives_match_unrolled(problem, forward, mode, linear):
    EXAMPLES[f"nn.DEQ[{mode}-{linear}]"] += 1
    deq = DEQ(
        ProblemCell(problem), solver=FORWARD[forward](), tol=1e-14, atol=1e-15,
        batch_dim=problem.batch_dim, linear_solver=linear,
    )  # fmt: skip
    names = [n for n, _ in deq.named_parameters()]
    theta = problem.flat()
    quantity = f"nn.DEQ {mode} [{linear}]"

    def params_of(flat_theta):
        return dict(zip(names, problem.structured(flat_theta).values(), strict=True))

    def objective(flat_theta):
        params = params_of(flat_theta)
        h = torch.func.functional_call(deq, params, (problem.x,))
        return _loss(problem, h, params)

    if mode in ("backward", "create_graph"):
        params = dict(deq.named_parameters())
        value = _loss(problem, deq(problem.x), params)
        gradient = torch.func.grad(problem.objective)(theta)
        if mode == "backward":
            value.backward()
            got = torch.cat([p.grad.reshape(-1) for p in params.values()])
            check(quantity, got, gradient, problem)
            return
        grads = torch.autograd.grad(value, list(params.values()), create_graph=True)
        g = torch.cat([t.reshape(-1) for t in grads])
        v = torch.linspace(-1.0, 1.0, theta.numel(), dtype=torch.float64)
        hv = torch.autograd.grad(g @ v, list(params.values()))
        hessian = torch.func.hessian(problem.objective)(theta)
        check(quantity, g, gradient, problem)
        check(quantity, torch.cat([t.reshape(-1) for t in hv]), hessian @ v, problem)
    elif mode == "func_grad":
        gradient = torch.func.grad(problem.objective)(theta)
        check(quantity, torch.func.grad(objective)(theta), gradient, problem)
    elif mode == "func_jvp":
        v = torch.linspace(-1.0, 1.0, theta.numel(), dtype=torch.float64)

        def state(flat_theta):
            return torch.func.functional_call(deq, params_of(flat_theta), (problem.x,))

        _, tangent = torch.func.jvp(state, (theta,), (v,))
        _, expected = torch.func.jvp(problem.unrolled_state, (theta,), (v,))
        check(quantity, tangent, expected, problem)
    else:
        hessian = torch.func.hessian(problem.objective)(theta)
        check(quantity, torch.func.hessian(objective)(theta), hessian, problem)
