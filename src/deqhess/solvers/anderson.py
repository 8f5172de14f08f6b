"""Anderson acceleration (type II, Walker & Ni 2011), one set of coefficients per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import integer
from .base import FixedPointSolver

__all__ = ["Anderson"]


@dataclass
class _History:
    """The last ``m`` iterates and residuals, ``[S, m, d]`` each, newest last."""

    h: Tensor
    g: Tensor
    count: int


class Anderson(FixedPointSolver):
    """Anderson acceleration of ``h = f(h)``.

    With residual ``g = f(h) − h`` and the differences ``ΔH = h_k − h_i``,
    ``ΔG = g_k − g_i`` over the last ``m`` iterates, each row solves the regularised
    least-squares problem ``γ = argmin ‖g_k − ΔG γ‖² + δ·tr(ΔGᵀΔG)/m ‖γ‖²`` and steps
    ``h ← h_k + β g_k − (ΔH + β ΔG) γ``. Rows (samples) get their own ``γ``; a row whose
    least squares cannot be solved takes the plain damped step ``h_k + β g_k``.

    Args:
        memory: m, the number of past iterates mixed (≥ 1).
        damping: β in ``(0, 1]``.
        regularization: δ, relative Tikhonov regularisation of the least squares
            (at least ``10 ε`` of the dtype).
    """

    def __init__(self, memory: int = 5, damping: float = 1.0, regularization: float = 1e-10):
        memory = integer(memory, "Anderson memory", minimum=1)
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"Anderson damping must lie in (0, 1]; got {damping}.")
        if regularization < 0:
            raise ValueError(f"Anderson regularization must be >= 0; got {regularization}.")
        self.memory = memory
        self.damping = float(damping)
        self.regularization = float(regularization)

    def __repr__(self) -> str:
        return f"Anderson(memory={self.memory}, damping={self.damping:g})"

    def init(self, h: Tensor) -> _History:
        shape = (h.shape[0], self.memory, h.shape[1])
        return _History(h=h.new_zeros(shape), g=h.new_zeros(shape), count=0)

    def step(self, memory: _History, h: Tensor, fh: Tensor) -> tuple[Tensor, _History]:
        beta = self.damping
        g = fh - h
        k = min(memory.count, self.memory)
        h_next = h + beta * g
        if k > 0:
            d_h = h[:, None, :] - memory.h[:, -k:, :]  # [S, k, d]
            d_g = g[:, None, :] - memory.g[:, -k:, :]
            gram = d_g @ d_g.transpose(1, 2)  # [S, k, k]
            scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)
            finfo = torch.finfo(h.dtype)
            # δ below the dtype's resolution would leave the Gram matrix singular
            relative = max(self.regularization, 10 * finfo.eps)
            ridge = (relative * scale + finfo.tiny)[:, None, None]
            eye = torch.eye(k, dtype=h.dtype, device=h.device)
            rhs = (d_g @ g[:, :, None])[:, :, 0]  # [S, k]
            gamma, failed = torch.linalg.solve_ex(gram + ridge * eye, rhs)
            mixed = h_next - ((d_h + beta * d_g) * gamma[:, :, None]).sum(dim=1)
            # a row whose mixing failed takes the plain damped step instead
            ok = (failed == 0)[:, None] & torch.isfinite(mixed).all(dim=1, keepdim=True)
            h_next = torch.where(ok, mixed, h_next)
        history = _History(
            h=torch.cat([memory.h[:, 1:], h[:, None]], dim=1),
            g=torch.cat([memory.g[:, 1:], g[:, None]], dim=1),
            count=memory.count + 1,
        )
        return h_next, history
