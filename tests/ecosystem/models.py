"""Models ``encoder → deqhess.nn.DEQ(cell) → head`` and references that share no code with
deqhess.

Two cells, each a contraction with constant ``c ≤ 0.3`` in ``h`` (``tanh' ≤ 1``; the
linear map's spectral norm, or the conv kernel's ``Σ‖K[:, :, i, j]‖₂``, scaled to 0.3):

* ``tanh``: ``f(x, h) = tanh(lin(h) + x)`` on ``[B, 6]``;
* ``conv``: ``f(x, h) = tanh(conv(h) + x)`` on ``[B, 2, 4, 4]``.

The unrolled twin runs ``K = 60`` plain cell steps from zero on the *same* parameters
(its parameter names are the DEQ model's), so autograd and ``torch.func`` through it give
the exact model's derivatives with error ``~K² cᴷ ≈ 1e-28``, far below float64 rounding.
Kronecker factors are built here from their definition: the layer's input at the fixed
point (``h*``, ``x``) and the gradient at the module's output, which for these cells is
``(1 − f²) ⊙ λ`` with the adjoint ``λ = (I − J)⁻ᵀ v`` (``J`` by ``torch.func.jacrev`` of
one cell step at ``h*``, solved densely).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deqhess.nn import DEQ

UNROLL = 60
CLASSES = 3


class TanhCell(nn.Module):
    def __init__(self, n: int = 6):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.3 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, x, h):
        return torch.tanh(self.lin(h) + x)


class ConvCell(nn.Module):
    def __init__(self, channels: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            w.mul_(0.3 / torch.linalg.vector_norm(w, dim=(0, 1)).sum())

    def forward(self, x, h):
        return torch.tanh(self.conv(h) + x)


class Unrolled(nn.Module):
    """``K`` plain steps of ``cell`` from zero: the reference for ``DEQ(cell)``."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        h = torch.zeros_like(x)
        for _ in range(UNROLL):
            h = self.cell(x, h)
        return h


@dataclass
class Setup:
    """A DEQ model, its unrolled twin (the same parameter objects) and data."""

    model: nn.Sequential
    unrolled: nn.Sequential
    cell: nn.Module
    X: Tensor
    y: Tensor

    @property
    def loader(self):
        data = torch.utils.data.TensorDataset(self.X, self.y)
        return torch.utils.data.DataLoader(data, batch_size=len(self.y) // 2)


def build(kind: str, seed: int = 0, samples: int = 8, **layer) -> Setup:
    """``kind``: ``"tanh"`` or ``"conv"``; ``layer``: options of the DEQ layer."""
    torch.manual_seed(seed)
    if kind == "tanh":
        encoder, cell, head = nn.Linear(4, 6), TanhCell(), nn.Linear(6, CLASSES)
        X = torch.randn(samples, 4)
        tail: list[nn.Module] = [head]
    else:
        encoder, cell = nn.Conv2d(1, 2, 3, padding=1), ConvCell()
        tail = [nn.Flatten(), nn.Linear(2 * 4 * 4, CLASSES)]
        X = torch.randn(samples, 1, 4, 4)
    options = {"tol": 1e-13, **layer}
    model = nn.Sequential(encoder, DEQ(cell, **options), *tail)
    unrolled = nn.Sequential(encoder, Unrolled(cell), *tail)
    return Setup(model, unrolled, cell, X, torch.randint(0, CLASSES, (samples,)))


def flat(setup: Setup) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in setup.unrolled.parameters()])


def _unflatten(setup: Setup, theta: Tensor) -> dict[str, Tensor]:
    named = list(setup.unrolled.named_parameters())
    pieces = theta.split([p.numel() for _, p in named])
    return {n: t.reshape(p.shape) for (n, p), t in zip(named, pieces, strict=True)}


def logits_fn(setup: Setup) -> Callable[[Tensor, Tensor], Tensor]:
    """``(θ, x_n) ↦ logits`` of one sample through the unrolled twin."""

    def logits(theta: Tensor, xn: Tensor) -> Tensor:
        return torch.func.functional_call(setup.unrolled, _unflatten(setup, theta), (xn[None],))[0]

    return logits


def sample_loss(setup: Setup) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    logits = logits_fn(setup)
    return lambda theta, xn, yn: F.cross_entropy(logits(theta, xn)[None], yn[None], reduction="sum")


def per_sample_gradients(setup: Setup) -> Tensor:
    """``[N, P]``: gradients of each sample's cross-entropy."""
    grad = torch.func.vmap(torch.func.grad(sample_loss(setup)), in_dims=(None, 0, 0))
    return grad(flat(setup), setup.X, setup.y)


def loss_hessians(setup: Setup) -> tuple[Tensor, Tensor]:
    """Output Jacobians ``[N, C, P]`` and cross-entropy Hessians in the logits ``[N, C, C]``."""
    logits = logits_fn(setup)
    theta = flat(setup)
    jac = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(theta, setup.X)
    p = torch.softmax(torch.func.vmap(logits, in_dims=(None, 0))(theta, setup.X), -1)
    return jac, torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def ggn(setup: Setup) -> Tensor:
    jac, hess = loss_hessians(setup)
    return torch.einsum("nkp,nkl,nlq->pq", jac, hess, jac)


def empirical_fisher(setup: Setup) -> Tensor:
    g = per_sample_gradients(setup)
    return g.T @ g


def hessian(setup: Setup) -> Tensor:
    loss = sample_loss(setup)
    theta = flat(setup)
    pairs = zip(setup.X, setup.y, strict=True)
    return sum(torch.func.hessian(loss)(theta, xn, yn) for xn, yn in pairs)


# --- Kronecker factors from their definition ---------------------------------------------


def fixed_points(setup: Setup) -> tuple[Tensor, Tensor]:
    """``(x, h*)`` entering the cell, per sample, by plain iteration (detached)."""
    with torch.no_grad():
        x = setup.unrolled[0](setup.X)
        return x, setup.unrolled[1](x)


def cell_output_gradients(setup: Setup, v: Tensor) -> Tensor:
    """The gradient reaching the cell's inner module output (``lin``/``conv``) and the
    encoder's output, for cotangents ``v`` ``[N, *state]`` at ``h*``: ``(1 − f²) ⊙ λ``,
    ``λ_n = (I − J_n)⁻ᵀ v_n``."""
    x, h = fixed_points(setup)
    out = []
    for xn, hn, vn in zip(x, h, v, strict=True):

        def step(s, xn=xn):
            return setup.cell(xn[None], s[None])[0]

        jac = torch.func.jacrev(step)(hn).reshape(hn.numel(), hn.numel()).detach()
        eye = torch.eye(hn.numel(), dtype=hn.dtype)
        adjoint = torch.linalg.solve((eye - jac).T, vn.reshape(-1)).reshape(hn.shape)
        out.append((1 - hn**2) * adjoint)
    return torch.stack(out)


def loss_hessian_roots(setup: Setup) -> Tensor:
    """``[N, C, C]``: ``S_n`` with ``S_n S_nᵀ`` the cross-entropy Hessian in the logits
    (any square root gives the same Kronecker factors; eigh here)."""
    _, hess = loss_hessians(setup)
    values, vectors = torch.linalg.eigh(hess)
    return vectors * values.clamp_min(0).sqrt()[:, None, :]


def state_cotangents(setup: Setup, logit_cotangents: Tensor) -> Tensor:
    """``[N, *state]``: the head's pullback of logit cotangents ``[N, C]`` to ``h*``."""
    _, h = fixed_points(setup)
    head = nn.Sequential(*list(setup.unrolled)[2:])

    def pull(hn, c):
        return torch.func.vjp(lambda s: head(s[None])[0], hn)[1](c)[0]

    return torch.func.vmap(pull)(h, logit_cotangents).detach()


def patches(inputs: Tensor) -> Tensor:
    """``[N · positions, C · 9]``: the 3 × 3 (padding 1) patches a conv sees."""
    cols = F.unfold(inputs, 3, padding=1)  # [N, C·9, positions]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def channels_last(g: Tensor) -> Tensor:
    """``[N, C, ...]`` → ``[N · positions, C]`` (a vector per sample and position)."""
    return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])


def logit_cotangents(setup: Setup, fisher: str) -> Tensor:
    """``[C', N, C]``: the cotangents a KFAC backpropagates from the logits, one backward
    pass each — ``"type-2"``: the columns of the loss Hessian's square root; ``"empirical"``:
    the loss gradient ``softmax − onehot`` (one pass)."""
    if fisher == "type-2":
        return loss_hessian_roots(setup).permute(2, 0, 1)
    logits = logits_fn(setup)
    p = torch.softmax(torch.func.vmap(logits, in_dims=(None, 0))(flat(setup), setup.X), -1)
    return (p - F.one_hot(setup.y, CLASSES).to(p))[None]


def kfac_factors(setup: Setup, fisher: str = "type-2") -> list[tuple[Tensor, Tensor]]:
    """Per layer (encoder, the cell's lin/conv, head) ``(A, G)``: ``A = Σ a aᵀ / (N ·
    positions)`` over the layer's inputs — ``x``, ``h*`` and ``h*`` — and ``G = Σ g gᵀ`` over
    the gradients at its output, ``sum`` reduction, KFAC-expand."""
    _, h = fixed_points(setup)
    cotangents = logit_cotangents(setup, fisher)
    n = h.shape[0]
    # the gradient at the cell's module output, which is also that at the encoder's output
    state = [cell_output_gradients(setup, state_cotangents(setup, c)) for c in cotangents]

    def layer(inputs: Tensor, grads) -> tuple[Tensor, Tensor]:
        a = patches(inputs) if inputs.dim() == 4 else inputs.reshape(n, -1)
        positions = a.shape[0] // n
        g = torch.cat([channels_last(gc) if gc.dim() == 4 else gc for gc in grads])
        return a.T @ a / (n * positions), g.T @ g

    return [layer(setup.X, state), layer(h, state), layer(h.reshape(n, -1), list(cotangents))]


def kfac_matrix(setup: Setup, fisher: str = "type-2") -> Tensor:
    """The dense KFAC matrix: per layer ``G ⊗ A`` for the weight (row-major), ``G`` for
    the bias, block-diagonal in the model's parameter order."""
    blocks = []
    for A, G in kfac_factors(setup, fisher):
        blocks += [torch.kron(G, A), G]
    return torch.block_diag(*blocks)
