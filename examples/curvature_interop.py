"""
Curvature libraries on a model with a DEQ layer
===============================================

Runs curvlinops' ``HessianLinearOperator`` and a plain double-backward HVP on a small
classifier ``readout(DEQ(x))`` and compares their Hessian-vector products with
deqhess's exact Hessian (``DatasetEquilibrium``, readout inside the loss). The same
tools applied to the usual one-step-gradient DEQ (backward through a single cell
application at the detached fixed point) are far off.

Run: ``python examples/curvature_interop.py`` (needs ``curvlinops-for-pytorch``; ``make``
installs it).
"""

from __future__ import annotations

import torch
from torch import nn

import deqhess as dh
from deqhess.nn import DEQ

# %%
# Two models with the same parameters
# -----------------------------------
# A tanh cell (contraction 0.5) inside :class:`deqhess.nn.DEQ`, whose backward is the
# implicit one to every order, and the same cell inside the one-step-gradient shortcut.


class Cell(nn.Module):
    def __init__(self, n: int, m: int, rate: float = 0.5) -> None:
        super().__init__()
        w = torch.randn(n, n)
        self.W = nn.Parameter(rate * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(n, m) / m**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n))
        self.n = n

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x @ self.U.T + self.b)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.n)


class OneStepDEQ(nn.Module):
    """The common shortcut: solve without a graph, backpropagate through one step."""

    def __init__(self, cell: nn.Module, steps: int = 200) -> None:
        super().__init__()
        self.cell, self.steps = cell, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.cell.init_state(x)
            for _ in range(self.steps):
                h = self.cell(x, h)
        return self.cell(x, h.detach())


def build(seed: int = 0, n: int = 6, m: int = 4, k: int = 3, samples: int = 12):
    torch.manual_seed(seed)
    cell = Cell(n, m)
    exact = nn.Sequential(DEQ(cell, tol=1e-13), nn.Linear(n, k))
    shortcut = nn.Sequential(OneStepDEQ(cell), exact[1])  # same parameters
    x, y = torch.randn(samples, m), torch.randn(samples, k)
    data = list(zip(x.split(5), y.split(5), strict=True))
    return exact, shortcut, data


# %%
# Three Hessian-vector products
# -----------------------------
# deqhess's exact ``H v`` from :class:`deqhess.DatasetEquilibrium` (the readout inside
# the loss ``L(h, θ, y)``) is the reference; curvlinops' ``HessianLinearOperator`` and a
# plain double backward run on each model.


def exact_hessian_operator(model: nn.Sequential, data) -> dh.CurvatureOperator:
    """deqhess's exact Hessian of Σ_batches MSE-sum, with the readout inside the loss."""
    theta = {name: p.detach() for name, p in model.named_parameters()}

    def f(x, h, t):
        return torch.tanh(h @ t["0.cell.W"].T + x @ t["0.cell.U"].T + t["0.cell.b"])

    def loss(h, t, y):
        return ((h @ t["1.weight"].T + t["1.bias"] - y) ** 2).sum()

    n = model[0].cell.n
    return dh.DatasetEquilibrium(
        f, theta, data, loss, init_state=lambda x: x.new_zeros(x.shape[0], n),
        reduction="sum", tol=1e-13, progress=False,
    ).hessian_operator()  # fmt: skip


def double_backward_hvp(model: nn.Module, data, v: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    total = sum(((model(x) - y) ** 2).sum() for x, y in data)
    grads = torch.autograd.grad(total, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    hv = torch.autograd.grad(flat @ v, params)
    return torch.cat([h.reshape(-1) for h in hv])


def compare(seed: int = 0) -> dict[str, float]:
    """Relative errors of each tool's ``H v`` against deqhess's exact ``H v``."""
    from curvlinops import HessianLinearOperator

    exact_model, shortcut, data = build(seed)
    exact = exact_hessian_operator(exact_model, data)
    v = torch.randn(exact.shape[0])
    truth = exact @ v

    def rel(a: torch.Tensor) -> float:
        return float((a - truth).norm() / truth.norm())

    loss_func = nn.MSELoss(reduction="sum")
    results = {}
    for label, model in [("deqhess.nn.DEQ", exact_model), ("one-step-gradient DEQ", shortcut)]:
        params = [p for p in model.parameters() if p.requires_grad]
        curvlinops = HessianLinearOperator(
            model, loss_func, params, data, check_deterministic=False
        )
        results[f"curvlinops HessianLinearOperator, {label}"] = rel(curvlinops @ v)
        results[f"double-backward HVP, {label}"] = rel(double_backward_hvp(model, data, v))
    return results


def plot(results: dict[str, float]):
    """The relative errors on a log scale; returns the (open) figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    names = [name.replace(", ", "\n") for name in results]
    values = [max(error, 1e-17) for error in results.values()]
    colors = ["tab:green" if "deqhess" in name else "tab:red" for name in results]
    ax.barh(names, values, color=colors)
    ax.set_xscale("log")
    ax.set_xlabel("relative error of H v against deqhess's exact H v")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


# %%
# Compare
# -------
# Through ``deqhess.nn.DEQ`` both tools agree with the exact product to rounding; through
# the one-step-gradient DEQ they compute the Hessian of a different function.

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    results = compare()
    for name, error in results.items():
        print(f"{name:<62} relative error of H v: {error:.1e}")
    plot(results)
