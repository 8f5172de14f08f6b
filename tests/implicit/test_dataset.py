"""Data-set sums equal one equilibrium on the concatenated data (per-sample independence)."""

from __future__ import annotations

import pytest
import torch
from problems import CASE_NAMES, case, relative_error

import deqhess as dh
from deqhess.parameters import ParameterLayout


def _data(seed=0, n=5, m=3, samples=11):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g)
    theta = {
        "W": 0.45 * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(n, m, generator=g),
        "b": 0.1 * torch.randn(n, generator=g),
    }
    x = torch.randn(samples, m, generator=g)
    y = torch.randn(samples, n, generator=g)

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    return f, theta, x, y


def _batches(x, y, sizes):
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def _mean_loss(h, y):
    return ((h - y) ** 2).sum(dim=1).mean() + torch.log(torch.cosh(h)).sum(dim=1).mean()


def _sum_loss_theta(h, theta, y):
    return ((h @ theta["W"] - y) ** 2).sum() + 0.01 * theta["U"].pow(2).sum() * h.shape[0]


OPTS = dict(tol=1e-14, atol=1e-15, progress=False)


@pytest.mark.parametrize("linear", ["dense", "gmres"])
def test_mean_over_uneven_batches_equals_concatenated(linear):
    f, theta, x, y = _data()
    data = dh.DatasetEquilibrium(
        f, theta, _batches(x, y, [4, 2, 5]), _mean_loss,
        init_state=lambda xb: torch.zeros(xb.shape[0], 5), linear_solver=linear, **OPTS,
    )  # fmt: skip
    assert data.num_samples == 11 and len(data.equilibria) == 3
    whole = dh.Equilibrium(f, theta, x, torch.zeros(11, 5), batch_dim=0, tol=1e-14, atol=1e-15)

    def loss(h):
        return _mean_loss(h, y)

    layout = ParameterLayout(theta)
    assert relative_error(layout.flatten(data.grad()), layout.flatten(whole.grad(loss))) <= 1e-12
    dense = whole.hessian(loss)
    assert relative_error(data.hessian(), dense) <= 1e-10
    v = torch.randn(layout.size)
    assert relative_error(data.hvp(v), dense @ v) <= 1e-10
    block = torch.randn(layout.size, 3)
    assert relative_error(data.hessian_operator() @ block, dense @ block) <= 1e-10
    split = data.hessian(split=True)
    assert relative_error(split.total, dense) <= 1e-10
    whole_split = whole.hessian(loss, split=True)
    assert relative_error(split.loss_curvature, whole_split.loss_curvature) <= 1e-10
    ggn = data.hessian_operator("loss_curvature").to_dense()
    assert relative_error(ggn, whole_split.loss_curvature) <= 1e-10


def test_sum_reduction_with_theta_in_loss():
    f, theta, x, y = _data(seed=3, samples=7)
    data = dh.DatasetEquilibrium(
        f, theta, _batches(x, y, [3, 3, 1]), _sum_loss_theta, reduction="sum",
        init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS,
    )  # fmt: skip
    whole = dh.Equilibrium(f, theta, x, torch.zeros(7, 5), batch_dim=0, tol=1e-14, atol=1e-15)
    dense = whole.hessian(lambda h, t: _sum_loss_theta(h, t, y))
    assert relative_error(data.hessian(), dense) <= 1e-10
    structured = data.hvp({k: torch.ones_like(t) for k, t in theta.items()})
    flat = ParameterLayout(theta).flatten(structured)
    assert relative_error(flat, dense @ torch.ones(dense.shape[0])) <= 1e-10


def test_data_set_errors():
    f, theta, x, y = _data()
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5))
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        dh.DatasetEquilibrium(f, theta, _batches(x, y, [11]), _mean_loss, reduction="max")
    with pytest.raises(ValueError, match=r"loss\(h, target\) or loss\(h, theta, target\)"):
        dh.DatasetEquilibrium(f, theta, _batches(x, y, [11]), lambda h: h.sum(), **init)
    with pytest.raises(ValueError, match=r"\(x, target\) pair; got Tensor of length 11"):
        dh.DatasetEquilibrium(f, theta, [x], _mean_loss, **init)
    with pytest.raises(ValueError, match="batches is empty"):
        dh.DatasetEquilibrium(f, theta, [], _mean_loss, **init)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_family_as_a_data_set_of_two_inputs(name):
    """A data set of two inputs (x and x/2) for each family: the sum-reduced data-set
    Hessian is the sum of the two single-equilibrium Hessians (and so is its GGN)."""
    c = case(name)
    xs = [c.x, 0.5 * c.x]
    data = dh.DatasetEquilibrium(
        c.f, c.theta, [(x, None) for x in xs], lambda h, theta, y: c.loss_theta(h, theta),
        init_state=lambda x: c.h0, reduction="sum", batch_dim=c.batch_dim, **OPTS,
    )  # fmt: skip
    singles = [
        dh.Equilibrium(c.f, c.theta, x, c.h0, batch_dim=c.batch_dim, tol=1e-14, atol=1e-15)
        for x in xs
    ]
    expected = sum(eq.hessian(c.loss_theta) for eq in singles)
    assert relative_error(data.hessian(), expected) <= 1e-12
    block = torch.randn(expected.shape[0], 3)
    assert relative_error(data.hessian_operator() @ block, expected @ block) <= 1e-12
    ggn = sum(eq.hessian(c.loss_theta, split=True).loss_curvature for eq in singles)
    assert relative_error(data.hessian_operator("loss_curvature").to_dense(), ggn) <= 1e-12


def test_torch_data_loader_with_progress_bar():
    f, theta, x, y = _data(samples=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    data = dh.DatasetEquilibrium(
        f, theta, loader, _mean_loss, init_state=lambda xb: torch.zeros(xb.shape[0], 5),
        progress=True, tol=1e-14, atol=1e-15,
    )  # fmt: skip
    assert [eq.problem.state.samples for eq in data.equilibria] == [4, 4, 2]
    whole = dh.Equilibrium(f, theta, x, torch.zeros(10, 5), batch_dim=0, tol=1e-14, atol=1e-15)
    assert relative_error(data.hessian(), whole.hessian(lambda h: _mean_loss(h, y))) <= 1e-10
