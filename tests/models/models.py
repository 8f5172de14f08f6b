"""Small models holding DEQ layers, their unrolled twins, and references that share no
code with deqhess: ``torch.func`` derivatives of the twin with every DEQ replaced by
``UNROLL`` plain iterations of its cell (contraction ≤ 0.4 in h, so the unrolled state
and its first and second θ-derivatives are off by ``~K² 0.4ᴷ ≈ 2e-21``)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from deqhess.nn import DEQ

UNROLL = 60


class Cell(nn.Module):
    """``tanh(W h + x + b)`` with ``‖W‖₂ = 0.4`` (tanh' ≤ 1): a 0.4-contraction in h."""

    def __init__(self, n: int) -> None:
        super().__init__()
        w = torch.randn(n, n)
        self.W = nn.Parameter(0.4 * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(h @ self.W.T + x + self.b)


class Unrolled(nn.Module):
    """The reference for a DEQ: ``UNROLL`` plain iterations of the same cell from zeros."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor) -> Tensor:
        h = torch.zeros_like(x)
        for _ in range(UNROLL):
            h = self.cell(x, h)
        return h


class Classifier(nn.Module):
    """encoder → DEQ → head (``depth`` DEQ layers in a row), split at ``deq0``."""

    def __init__(self, m: int = 3, n: int = 4, k: int = 2, depth: int = 1) -> None:
        super().__init__()
        self.encoder = nn.Linear(m, n)
        for i in range(depth):
            self.add_module(f"deq{i}", DEQ(Cell(n), tol=1e-13, linear_solver="dense"))
        self.depth = depth
        self.head = nn.Linear(n, k)

    def before(self, x: Tensor, split: int = 0) -> Tensor:
        """Everything up to and including DEQ layer ``split``."""
        h = torch.tanh(self.encoder(x))
        for i in range(split + 1):
            h = getattr(self, f"deq{i}")(h)
        return h

    def after(self, h: Tensor, split: int = 0) -> Tensor:
        """Everything after DEQ layer ``split``."""
        for i in range(split + 1, self.depth):
            h = getattr(self, f"deq{i}")(h)
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.after(self.before(x))


def unrolled_twin(model: Classifier) -> Classifier:
    """A copy with every DEQ replaced by its unrolled cell (same parameter names)."""
    twin = copy.deepcopy(model)
    for i in range(model.depth):
        setattr(twin, f"deq{i}", Unrolled(getattr(model, f"deq{i}").cell))
    return twin


class _Piece(nn.Module):
    """``twin.before`` or ``twin.after`` as a module (parameters named ``twin.<name>``)."""

    def __init__(self, twin: Classifier, method: str, layer: int) -> None:
        super().__init__()
        self.twin, self.method, self.layer = twin, method, layer

    def forward(self, value: Tensor) -> Tensor:
        return getattr(self.twin, self.method)(value, self.layer)


class Reference:
    """Dense curvature matrices of ``Σ_b w_b ℓ(twin(x_b), y_b)`` over ``names``, by
    ``torch.func`` on the unrolled twin with its own flattening."""

    def __init__(self, twin: Classifier, loss_func, data, names, reduction="mean") -> None:
        self.twin, self.loss_func, self.data, self.names = twin, loss_func, data, names
        named = dict(twin.named_parameters())
        self.shapes = [named[n].shape for n in names]
        self.flat = torch.cat([named[n].detach().reshape(-1) for n in names])
        total = sum(x.shape[0] for x, _ in data)
        self.weights = [x.shape[0] / total if reduction == "mean" else 1.0 for x, _ in data]

    def _params(self, flat: Tensor, prefix: str = "") -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            out[prefix + name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return out

    def _run(self, module: nn.Module, flat: Tensor, value: Tensor, prefix: str = "") -> Tensor:
        return torch.func.functional_call(module, self._params(flat, prefix), (value,))

    def total(self) -> Tensor:
        def objective(flat: Tensor) -> Tensor:
            return sum(
                w * self.loss_func(self._run(self.twin, flat, x), y)
                for (x, y), w in zip(self.data, self.weights, strict=True)
            )

        return torch.func.hessian(objective)(self.flat)

    def ggn(self) -> Tensor:
        result = 0.0
        for (x, y), w in zip(self.data, self.weights, strict=True):
            out = self._run(self.twin, self.flat, x)
            jac = torch.func.jacrev(lambda f, x=x: self._run(self.twin, f, x))(self.flat)
            jac = jac.reshape(out.numel(), -1)
            curvature = torch.func.hessian(lambda o, y=y: self.loss_func(o, y))(out)
            curvature = curvature.reshape(out.numel(), out.numel())
            result = result + w * jac.T @ curvature @ jac
        return result

    def split(self, layer: int = 0) -> tuple[Tensor, Tensor]:
        """``([I; Z]ᵀ∇²L[I; Z], Σ (∂L/∂h)ᵢ ∇²h*ᵢ)`` at DEQ layer ``layer``."""
        before = _Piece(self.twin, "before", layer)
        after = _Piece(self.twin, "after", layer)
        p = self.flat.numel()
        loss_part, dynamics_part = 0.0, 0.0
        for (x, y), w in zip(self.data, self.weights, strict=True):

            def state(f: Tensor, x=x) -> Tensor:
                return self._run(before, f, x, "twin.")

            def head_loss(f: Tensor, h: Tensor, y=y, w=w) -> Tensor:
                return w * self.loss_func(self._run(after, f, h, "twin."), y)

            h = state(self.flat)
            z = torch.func.jacrev(state)(self.flat).reshape(h.numel(), p)
            joint = torch.func.hessian(lambda v, h=h: head_loss(v[:p], v[p:].reshape(h.shape)))(
                torch.cat([self.flat, h.reshape(-1)])
            )
            lift = torch.cat([torch.eye(p), z])
            loss_part = loss_part + lift.T @ joint @ lift
            g = torch.func.grad(head_loss, argnums=1)(self.flat, h)
            dynamics_part = dynamics_part + torch.func.hessian(
                lambda f, g=g, state=state: (g * state(f)).sum()
            )(self.flat)
        return loss_part, dynamics_part
