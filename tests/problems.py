"""A registry of DEQ problem families with references that share no code with deqhess.

Every family's map is a contraction in ``h`` with constant ``c ≤ 0.45`` at its θ,
so ``K = 60`` plain iterations from ``h0`` reach the fixed point and its first and
second θ-derivatives with error ``~ K² cᴷ ≤ 3600 · 0.45⁶⁰ ≈ 5e-18`` (float64
rounding, ~1e-16, dominates). The references flatten θ with their own code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deqhess.nn import DEQ
from deqhess.operator import Operator

UNROLL_STEPS = 60


@dataclass
class Case:
    """One problem: dynamics, parameters, input, initial state and two losses."""

    name: str
    f: Callable[[Any, Tensor, Any], Tensor]
    theta: Any
    x: Tensor
    h0: Tensor
    loss: Callable[[Tensor], Tensor]
    loss_theta: Callable[[Tensor, Any], Tensor]
    batch_dim: int | None = None
    closed_form_state: Callable[[Any], Tensor] | None = field(default=None, repr=False)

    # --- independent flattening -------------------------------------------------
    def leaves(self) -> list[tuple[str | None, Tensor]]:
        if isinstance(self.theta, Tensor):
            return [(None, self.theta)]
        return list(self.theta.items())

    def flat_theta(self) -> Tensor:
        return torch.cat([t.reshape(-1) for _, t in self.leaves()])

    def structured(self, flat: Tensor) -> Any:
        out, offset = {}, 0
        for name, t in self.leaves():
            piece = flat[offset : offset + t.numel()].reshape(t.shape)
            offset += t.numel()
            if name is None:
                return piece
            out[name] = piece
        return out

    # --- references -------------------------------------------------------------
    def unrolled_state(self, flat: Tensor, steps: int = UNROLL_STEPS) -> Tensor:
        theta, h = self.structured(flat), self.h0
        for _ in range(steps):
            h = self.f(self.x, h, theta)
        return h

    def reference_state(self, flat: Tensor) -> Tensor:
        if self.closed_form_state is not None:
            return self.closed_form_state(self.structured(flat))
        return self.unrolled_state(flat)

    def reference_loss(self, with_theta: bool = False) -> Callable[[Tensor], Tensor]:
        def objective(flat: Tensor) -> Tensor:
            h = self.reference_state(flat)
            if with_theta:
                return self.loss_theta(h, self.structured(flat))
            return self.loss(h)

        return objective


def _spectral(w: Tensor, norm: float) -> Tensor:
    return norm * w / torch.linalg.matrix_norm(w, ord=2)


def _quadratic_plus(h: Tensor) -> Tensor:
    return 0.5 * (h - 0.3).pow(2).sum() + torch.log(torch.cosh(2 * h)).sum()


def tanh_dense(batch_dim: int | None, seed: int = 1, n: int = 5, m: int = 3, b: int = 3) -> Case:
    g = torch.Generator().manual_seed(seed)
    theta = {
        "W": _spectral(torch.randn(n, n, generator=g), 0.45),
        "U": 0.7 * torch.randn(n, m, generator=g),
        "b": 0.2 * torch.randn(n, generator=g),
    }
    x = torch.randn(b, m, generator=g)

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def loss_theta(h, t):  # a readout inside the loss, coupling samples
        logits = h @ t["W"][:, :2]
        return torch.logsumexp(logits, dim=1).sum() + 0.01 * t["U"].pow(2).sum()

    name = "tanh_batched" if batch_dim is not None else "tanh_coupled"
    return Case(name, f, theta, x, torch.zeros(b, n), _quadratic_plus, loss_theta, batch_dim)


def linear_closed_form(seed: int = 2, n: int = 4, m: int = 3) -> Case:
    """``h = A(θ) h + B(θ) x`` with ``A = 0.4 tanh(Θ_A)/n`` (‖A‖₂ ≤ ‖A‖_F ≤ 0.4)."""
    g = torch.Generator().manual_seed(seed)
    theta = {"A": torch.randn(n, n, generator=g), "B": torch.randn(n, m, generator=g)}
    x = torch.randn(m, generator=g)

    def f(x, h, t):
        return 0.4 * torch.tanh(t["A"]) @ h / n + torch.sin(t["B"]) @ x

    def closed_form(t):
        a = 0.4 * torch.tanh(t["A"]) / n
        return torch.linalg.solve(torch.eye(n) - a, torch.sin(t["B"]) @ x)

    def loss_theta(h, t):
        return (h * t["B"][:, 0]).sum() ** 2 + torch.cos(t["A"]).sum()

    return Case(
        "linear_closed_form",
        f,
        theta,
        x,
        torch.zeros(n),
        _quadratic_plus,
        loss_theta,
        closed_form_state=closed_form,
    )


def conv_image(seed: int = 3, c: int = 2, size: int = 4) -> Case:
    """Image-like state ``[1, C, H, W]``; ``Σ_offsets ‖K[:, :, i, j]‖_F = 0.45`` bounds the
    convolution's operator norm; θ includes a 0-dim gain."""
    g = torch.Generator().manual_seed(seed)
    kernel = torch.randn(c, c, 3, 3, generator=g)
    kernel = 0.45 * kernel / torch.linalg.vector_norm(kernel, dim=(0, 1)).sum()
    theta = {"K": kernel, "b": 0.1 * torch.randn(c, generator=g), "gain": torch.tensor(0.8)}
    x = torch.randn(1, c, size, size, generator=g)

    def f(x, h, t):
        conv = torch.nn.functional.conv2d(h, t["K"], padding=1)
        return torch.tanh(conv + t["gain"] * x + t["b"][None, :, None, None])

    def loss_theta(h, t):
        return (h.mean(dim=(2, 3)) * t["b"]).sum() ** 2 + t["gain"] ** 4

    return Case(
        "conv_image", f, theta, x, torch.zeros(1, c, size, size), _quadratic_plus, loss_theta
    )


def scalar_gains(seed: int = 4, n: int = 6) -> Case:
    """θ a single 1-D tensor of three gains; 1-D state; ``|θ₀| ≤ 1`` and ‖M‖₂ = 1."""
    g = torch.Generator().manual_seed(seed)
    orthogonal, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    theta = torch.tensor([0.9, -0.7, 0.3])
    x = torch.randn(n, generator=g)

    def f(x, h, t):
        return 0.45 * torch.tanh(t[0] * (orthogonal.to(h) @ h) + t[1] * x + t[2])

    def loss_theta(h, t):
        return (h.sum() * t[1]) ** 2 + torch.exp(t[2])

    return Case("scalar_gains", f, theta, x, torch.zeros(n), _quadratic_plus, loss_theta)


def sigmoid_single_matrix(seed: int = 5, n: int = 5, m: int = 2) -> Case:
    """θ one matrix ``[n, n + m]``; sigmoid' ≤ 1/4 and ``‖W_h‖₂ = 1.6`` give c = 0.4."""
    g = torch.Generator().manual_seed(seed)
    w_h = _spectral(torch.randn(n, n, generator=g), 1.6)
    theta = torch.cat([w_h, torch.randn(n, m, generator=g)], dim=1)
    x = torch.randn(m, generator=g)

    def f(x, h, t):
        return torch.sigmoid(t[:, :n] @ h + t[:, n:] @ x)

    def loss_theta(h, t):
        return (t[0, :n] @ h) ** 2 + t.pow(2).sum() * 0.05

    return Case("sigmoid_single_matrix", f, theta, x, torch.zeros(n), _quadratic_plus, loss_theta)


def registry() -> list[Case]:
    """All families (built in float64 under the test fixture)."""
    return [
        tanh_dense(None),
        tanh_dense(0),
        linear_closed_form(),
        conv_image(),
        scalar_gains(),
        sigmoid_single_matrix(),
    ]


CASE_NAMES = [
    "tanh_coupled",
    "tanh_batched",
    "linear_closed_form",
    "conv_image",
    "scalar_gains",
    "sigmoid_single_matrix",
]


def case(name: str) -> Case:
    """The registry entry called ``name`` (built freshly, in the current default dtype)."""
    for c in registry():
        if c.name == name:
            return c
    raise KeyError(name)


def relative_error(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class DenseOperator(Operator):
    """A dense matrix as a deqhess operator, saying ``symmetric`` as it is told."""

    def __init__(self, matrix: Tensor, symmetric: bool = True) -> None:
        self.matrix, self.symmetric = matrix, symmetric
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def matmat(self, block: Tensor) -> Tensor:
        return self.matrix @ block


class _StartCell(nn.Module):
    """``tanh(0.4 lin(h) + x)``, ``‖lin.W‖₂ = 1``: a 0.4-contraction in h."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.div_(torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(0.4 * self.lin(h) + x)


class LearnedStart(nn.Module):
    """``head(deq(enc(x), h0 = tanh(init(x))))``, a DEQ started from a learned state; or
    (``unrolled``) the same with 200 plain iterations of its cell from that ``h0``, which
    forget the start to ``0.4²⁰⁰ ≈ 1e-80``."""

    def __init__(self, unrolled: bool = False) -> None:
        super().__init__()
        self.enc, self.init, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.deq = DEQ(_StartCell(), tol=1e-14, atol=1e-15)
        self.unrolled = unrolled

    def forward(self, x: Tensor) -> Tensor:
        u, h = self.enc(x), torch.tanh(self.init(x))
        if not self.unrolled:
            return self.head(self.deq(u, h))
        for _ in range(200):
            h = self.deq.cell(u, h)
        return self.head(h)
