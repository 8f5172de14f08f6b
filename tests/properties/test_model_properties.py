"""ModelCurvature against unrolled float64 autograd of random models over random loaders.

A model is ``encoder → deqhess.nn.DEQ(random contractive cell) → head`` (the encoder
and head random linear maps, the head's width random), the loss mean-squared error or
cross-entropy, mean or sum; the data random batches, given as a list in a random order
or as a shuffling ``DataLoader`` of a random batch size. Every pass must give the
Hessian, GGN and loss/dynamics split of ``Σ_b w_b ℓ(model(x_b), y_b)`` whatever the
order and grouping. The reference replaces the DEQ by ``K`` plain iterations of its
cell (``random_cells.unroll_steps``) and differentiates with ``torch.func``.
Tolerance: see ``random_cells.TOLERANCE``.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from random_cells import (
    EXAMPLES,
    ProblemCell,
    check,
    examples,
    random_deqs,
    unroll_steps,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deqhess as dh
from deqhess.nn import DEQ


class Unrolled(nn.Module):
    def __init__(self, cell: ProblemCell, steps: int) -> None:
        super().__init__()
        self.cell, self.steps = cell, steps

    def forward(self, x):
        h = self.cell.init_state(x)
        for _ in range(self.steps):
            h = self.cell(x, h)
        return h


@examples(short=3, long=40)
@given(
    problem=random_deqs(batch_dims=("first",), max_rank=2),
    classes=st.integers(2, 3),
    cross_entropy=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    loader=st.sampled_from(["list", "shuffled"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_model_curvature_matches_unrolled(
    problem, classes, cross_entropy, reduction, sizes, loader, seed
):
    EXAMPLES[f"ModelCurvature[{loader}]"] += 1
    g = torch.Generator().manual_seed(seed)
    total, m = sum(sizes), problem.x.shape[1]
    torch.manual_seed(seed)
    deq = DEQ(
        ProblemCell(problem, batched_start=True), tol=1e-14, atol=1e-15, linear_solver="dense"
    )
    model = nn.Sequential(nn.Linear(2, m), deq, nn.Linear(problem.width, classes))
    x = torch.randn(total, 2, generator=g, dtype=torch.float64)
    if cross_entropy:
        y, loss = torch.randint(0, classes, (total,), generator=g), nn.CrossEntropyLoss
    else:
        y, loss = torch.randn(total, classes, generator=g, dtype=torch.float64), nn.MSELoss
    loss = loss(reduction=reduction)
    batches = list(zip(x.split(sizes), y.split(sizes), strict=True))
    if loader == "list":
        order = torch.randperm(len(batches), generator=g).tolist()
        data = [batches[i] for i in order]
    else:
        data = DataLoader(TensorDataset(x, y), batch_size=sizes[0], shuffle=True, generator=g)
    curvature = dh.ModelCurvature(model, loss, data)
    twin = copy.deepcopy(model)
    twin[1] = Unrolled(twin[1].cell, unroll_steps(problem.contraction))
    names = curvature.layout.names
    params = dict(twin.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    weights = [len(xb) / total if reduction == "mean" else 1.0 for xb, _ in batches]

    def values(f):
        out, offset = {}, 0
        for n in names:
            out[n] = f[offset : offset + params[n].numel()].reshape(params[n].shape)
            offset += params[n].numel()
        return out

    def objective(f):
        return sum(
            w * loss(torch.func.functional_call(twin, values(f), (xb,)), yb)
            for (xb, yb), w in zip(batches, weights, strict=True)
        )

    hessian = torch.func.hessian(objective)(flat)
    ggn = 0.0
    for (xb, yb), w in zip(batches, weights, strict=True):
        out = torch.func.functional_call(twin, values(flat), (xb,))
        jac = torch.func.jacrev(lambda f, xb=xb: torch.func.functional_call(twin, values(f), (xb,)))
        j = jac(flat).reshape(out.numel(), -1)
        curv = torch.func.hessian(lambda o, yb=yb: loss(o, yb))(out).reshape(out.numel(), -1)
        ggn = ggn + w * j.T @ curv @ j
    check("ModelCurvature.grad", curvature.layout.flatten(curvature.grad()),
          torch.func.grad(objective)(flat), problem)  # fmt: skip
    check("ModelCurvature.hessian", curvature.hessian(), hessian, problem)
    check("ModelCurvature ggn", curvature.ggn_operator().to_dense(), ggn, problem)
    split = curvature.hessian_split()
    check("ModelCurvature split total", split.total, hessian, problem)
    block = torch.randn(curvature.num_parameters, 2, generator=g, dtype=torch.float64)
    op = curvature.hessian_operator("dynamics_curvature")
    check("ModelCurvature dynamics block", op @ block, split.dynamics_curvature @ block, problem)
