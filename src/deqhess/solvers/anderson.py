"""Anderson acceleration (type II, Walker & Ni 2011), one set of coefficients per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..options import integer
from .base import FixedPointSolver

__all__ = ["Anderson"]


@dataclass
class _History:
    """Anderson's memory: ``m`` consecutive differences kept in ring buffers.

    Slot ``count mod m`` is written next: the least squares ignore their order.

    Attributes:
        h, g: the previous iterate and its residual ``[S, d]`` (None before the first).
        dg: ``[S, m, d]`` residual differences ``Δg``.
        dx: ``[S, m, d]`` the mixing directions ``Δh + β Δg``.
        gram: ``[S, m, m]`` ``ΔGᵀΔG``, one row and column updated per step.
        count: differences stored so far.
    """

    h: Tensor | None
    g: Tensor | None
    dg: Tensor
    dx: Tensor
    gram: Tensor
    count: int


class Anderson(FixedPointSolver):
    """Anderson acceleration of ``h = f(h)`` (type II, Walker & Ni 2011).

    With residual ``g = f(h) − h`` and the consecutive differences ``ΔH``, ``ΔG`` of the
    last ``m + 1`` iterates and residuals, each row solves the regularised
    least-squares problem ``γ = argmin ‖g_k − ΔG γ‖² + δ·tr(ΔGᵀΔG)/m ‖γ‖²`` and steps
    ``h ← h_k + β g_k − (ΔH + β ΔG) γ``. Rows (samples) get their own ``γ``; a row whose
    least squares cannot be solved takes the plain damped step ``h_k + β g_k``. The Gram
    matrix ``ΔGᵀΔG`` is updated by one row per step, so a step costs three passes over
    the ``[S, m, d]`` history.

    Args:
        memory: m, the number of past differences mixed (≥ 1).
        damping: β in ``(0, 1]``.
        regularization: δ, relative Tikhonov regularisation of the least squares
            (at least ``10 ε`` of the dtype).
    """

    def __init__(self, memory: int = 5, damping: float = 1.0, regularization: float = 1e-10):
        memory = integer(memory, "Anderson memory", minimum=1)
        if not 0.0 < damping <= 1.0:
            raise InputError(f"Anderson damping must lie in (0, 1]; got {damping}.")
        if regularization < 0:
            raise InputError(f"Anderson regularization must be >= 0; got {regularization}.")
        self.memory = memory
        self.damping = float(damping)
        self.regularization = float(regularization)

    def __repr__(self) -> str:
        return f"Anderson(memory={self.memory}, damping={self.damping:g})"

    def init(self, h: Tensor) -> _History:
        """Empty differences ``[S, m, d]`` for rows ``h`` ``[S, d]``."""
        samples, width, m = h.shape[0], h.shape[1], self.memory
        return _History(
            h=None,
            g=None,
            dg=h.new_zeros(samples, m, width),
            dx=h.new_zeros(samples, m, width),
            gram=h.new_zeros(samples, m, m),
            count=0,
        )

    def step(self, memory: _History, h: Tensor, fh: Tensor) -> tuple[Tensor, _History]:
        """The mixed iterate ``[S, d]`` from ``h`` and ``fh = f(h)``, and the updated memory."""
        beta = self.damping
        g = fh - h
        h_next = fh if beta == 1.0 else torch.add(h, g, alpha=beta)
        if memory.h is not None and memory.g is not None:
            slot = memory.count % self.memory
            delta_g = torch.sub(g, memory.g, out=memory.dg[:, slot])
            # ΔH + βΔG (from h and g, which the driver owns: f may reuse its output buffer)
            torch.add(h - memory.h, delta_g, alpha=beta, out=memory.dx[:, slot])
            memory.count += 1
            k = min(memory.count, self.memory)
            dg = memory.dg[:, :k]
            # products with [S, k, d] histories as row-vector × matrix: batched gemv with the
            # history transposed is several times faster than with it upright
            row = torch.bmm(delta_g[:, None, :], dg.transpose(1, 2))[:, 0]  # [S, k]
            memory.gram[:, slot, :k] = row
            memory.gram[:, :k, slot] = row
            gram = memory.gram[:, :k, :k].clone()
            finfo = torch.finfo(h.dtype)
            # δ below the dtype's resolution would leave the Gram matrix singular
            relative = max(self.regularization, 10 * finfo.eps)
            diagonal = torch.diagonal(gram, dim1=1, dim2=2)
            diagonal.add_(relative * diagonal.mean(dim=1, keepdim=True) + finfo.tiny)
            rhs = torch.bmm(g[:, None, :], dg.transpose(1, 2)).transpose(1, 2)  # [S, k, 1]
            gamma, failed = torch.linalg.solve_ex(gram, rhs)
            mixed = h_next - torch.bmm(gamma.transpose(1, 2), memory.dx[:, :k])[:, 0]
            # a row whose mixing failed takes the plain damped step instead (a sum is NaN
            # or inf exactly when an entry is, barring overflow of the sum itself: then
            # the rows are checked one by one)
            if bool(failed.eq(0).all()) and bool(torch.isfinite(mixed.sum())):
                h_next = mixed
            else:
                ok = (failed == 0) & torch.isfinite(mixed.sum(dim=1))
                h_next = torch.where(ok[:, None], mixed, h_next)
        memory.h, memory.g = h, g
        return h_next, memory
