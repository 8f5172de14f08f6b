"""
Gradient-norm regularisation: double backward through a DEQ in training
=======================================================================

The training loss is ``CE + β ‖∇_θ CE‖²``: each step differentiates the gradient of
the cross-entropy again, through the DEQ layer's implicit backward. Its gradient is
``∇CE + 2β H ∇CE`` with ``H`` the exact Hessian; the script checks the autograd
gradient of the penalty against ``2 H g`` from :class:`deqhess.Equilibrium` (an
independent path: no autograd.Function, a dense LU and a matrix-free HVP).

Run: ``python examples/gradient_norm_digits.py`` (needs scikit-learn).
"""

from __future__ import annotations

import torch
from torch import nn

import deqhess as dh
from deqhess.demo import load_digits_split
from deqhess.nn import DEQ


class Cell(nn.Module):
    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        w = torch.randn(n, n)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(n, m) / m**0.5)
        self.b = nn.Parameter(torch.zeros(n))
        self.n = n

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x @ self.U.T + self.b)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.n)


# %%
# The model and the two penalty gradients
# ---------------------------------------
# The penalty's gradient by double backward through the layer, and the same gradient
# from the exact Hessian of :class:`deqhess.Equilibrium` (the readout inside
# ``L(h, θ)``).


def build(n: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(DEQ(Cell(n, 64), tol=1e-12), nn.Linear(n, 10))


def penalty_gradient(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇_θ ‖∇_θ CE‖²`` by double backward through the layer, flattened."""
    params = list(model.parameters())
    ce = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(ce, params, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(penalty, params)])


def exact_penalty_gradient(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``2 H g`` from :class:`deqhess.Equilibrium` (readout inside ``L(h, θ)``)."""
    theta = {name: p.detach() for name, p in model.named_parameters()}

    def f(x, h, t):
        return torch.tanh(h @ t["0.cell.W"].T + x @ t["0.cell.U"].T + t["0.cell.b"])

    def loss(h, t):
        return nn.functional.cross_entropy(h @ t["1.weight"].T + t["1.bias"], y)

    h0 = x.new_zeros(x.shape[0], model[0].cell.n)
    eq = dh.Equilibrium(f, theta, x, h0, tol=1e-13, batch_dim=0)
    g = torch.cat([t.reshape(-1) for t in eq.grad(loss).values()])
    return 2 * eq.hvp(loss, g)


def verify(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative difference between the autograd and the exact penalty gradients."""
    got, want = penalty_gradient(model, x, y), exact_penalty_gradient(model, x, y)
    return float((got - want).norm() / want.norm())


# %%
# Training
# --------
# Each step differentiates the penalty ``‖∇CE‖²`` once more (``create_graph=True``).


def train(
    steps: int = 60,
    beta: float = 1e-2,
    batch: int = 64,
    seed: int = 0,
    log=print,
    history: dict[str, list[float]] | None = None,
):
    """Train; ``history`` (if given) receives the cross-entropy and penalty per step."""
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    model = build(seed=seed)
    log(f"penalty gradient, autograd vs exact 2·H·g: {verify(model, x_test[:32], y_test[:32]):.1e}")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(y_train), (batch,), generator=g)
        ce = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        grads = torch.autograd.grad(ce, list(model.parameters()), create_graph=True)
        penalty = sum(gr.pow(2).sum() for gr in grads)
        if history is not None:
            history.setdefault("CE", []).append(ce.item())
            history.setdefault("‖∇CE‖²", []).append(float(penalty))
        optimizer.zero_grad()
        (ce + beta * penalty).backward()
        optimizer.step()
        with torch.no_grad():  # keep the cell contractive
            w = model[0].cell.W
            u, s, vh = torch.linalg.svd(w)
            w.copy_(u @ torch.diag(s.clamp(max=0.9)) @ vh)
        if step % 20 == 0 or step == steps - 1:
            log(
                f"step {step:3d}: CE {ce.detach().item():.3f}, ‖∇CE‖² {penalty.detach().item():.4f}"
            )
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    log(f"test accuracy {100 * accuracy:.1f}%")
    log(f"penalty gradient, autograd vs exact 2·H·g: {verify(model, x_test[:32], y_test[:32]):.1e}")
    return model, accuracy


def plot(history: dict[str, list[float]]):
    """The training curves; returns the (open) figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(history), figsize=(9, 3))
    for ax, (name, values) in zip(axes, history.items(), strict=True):
        ax.plot(values, color="black")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


# %%
# Run
# ---
# The first and last lines compare the penalty's gradient by double backward through
# the layer with ``2·H·∇CE`` from the equilibrium.

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    curves: dict[str, list[float]] = {}
    train(history=curves)
    plot(curves)
