"""The layout of the DEQ state ``h``: its shape, and its view as independent rows.

Internally every state is held as ``rows`` of shape ``[S, d]``: ``S`` independent
systems of ``d`` unknowns each. With ``batch_dim=None`` the whole state is one
coupled system (``S = 1``); with ``batch_dim=k`` the slices along dimension ``k`` are
independent samples (``S`` = that dimension's size), so ``J = ∂f/∂h`` is
block-diagonal with ``S`` blocks of ``d × d``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError
from .options import integer, supported_dtype

__all__ = ["StateLayout", "check_state_map"]


class StateLayout:
    """Shape bookkeeping between a user's state and its ``[S, d]`` rows.

    Args:
        h0: a floating tensor of the state's shape and dtype.
        batch_dim: the dimension whose slices are independent samples, or ``None``.

    Raises:
        ValueError: ``h0`` is not float32/float64, is empty, or ``batch_dim`` is not an
            int in range.
    """

    def __init__(self, h0: Tensor, batch_dim: int | None = None) -> None:
        if not isinstance(h0, Tensor):
            hint = (
                " For a tuple state (h₁, …, hₖ), wrap the cell in deqhess.nn.TupleState(cell, "
                "shapes), which presents it as one flat [B, Σ dᵢ] state (.split(h) gives the "
                "tuple back), or concatenate the parts in f yourself."
                if isinstance(h0, (tuple, list))
                else ""
            )
            raise InputError(f"h0 must be a torch.Tensor; got {type(h0).__name__}.{hint}")
        if not h0.is_floating_point():
            raise InputError(f"h0 has dtype {h0.dtype}; the state must be float32 or float64.")
        supported_dtype(h0.dtype, "h0")
        if h0.numel() == 0:
            raise InputError(f"h0 is empty (shape {tuple(h0.shape)}); the state needs entries.")
        self.shape = h0.shape
        self.dtype = h0.dtype
        self.device = h0.device
        if batch_dim is None:
            self.batch_dim: int | None = None
            self.samples = 1
        else:
            batch_dim = integer(batch_dim, "batch_dim")
            if h0.ndim == 0 or not -h0.ndim <= batch_dim < h0.ndim:
                raise InputError(
                    f"batch_dim={batch_dim} is out of range for a state of shape "
                    f"{tuple(h0.shape)}; use a dimension in [0, {max(h0.ndim - 1, 0)}] or None."
                )
            self.batch_dim = batch_dim % h0.ndim
            self.samples = h0.shape[self.batch_dim]
        self.width = h0.numel() // self.samples

    @property
    def size(self) -> int:
        """N = S·d, the number of scalar unknowns."""
        return self.samples * self.width

    def to_rows(self, h: Tensor) -> Tensor:
        """State-shaped ``h`` (optionally with trailing dims) → ``[S, d, *trailing]``."""
        trailing = h.shape[len(self.shape) :]
        if self.batch_dim is not None:
            h = torch.movedim(h, self.batch_dim, 0)
        return h.reshape((self.samples, self.width, *trailing))

    def from_rows(self, rows: Tensor) -> Tensor:
        """``[S, d, *trailing]`` → state-shaped ``[*shape, *trailing]``."""
        trailing = rows.shape[2:]
        if self.batch_dim is None:
            return rows.reshape((*self.shape, *trailing))
        rest = (s for i, s in enumerate(self.shape) if i != self.batch_dim)
        moved = (self.shape[self.batch_dim], *rest)
        return torch.movedim(rows.reshape((*moved, *trailing)), 0, self.batch_dim)


def check_state_map(out: object, h: Tensor, call: str) -> None:
    """Check that a map of the state returned a state.

    Args:
        out: what ``call`` returned for the state ``h``.
        h: the state it was given.
        call: the map's name, for the message (e.g. ``"f(x, h, theta)"``).

    Raises:
        InputError: ``out`` is not a tensor of ``h``'s shape and dtype.
    """
    if not isinstance(out, Tensor):
        raise InputError(f"{call} must return a tensor shaped like h; got {type(out).__name__}.")
    if out.shape != h.shape or out.dtype != h.dtype:
        raise InputError(
            f"{call} returned shape {tuple(out.shape)} and dtype {out.dtype}, but the state h0 "
            f"has shape {tuple(h.shape)} and dtype {h.dtype}; {call} must map a state to a "
            "state of the same shape and dtype (set h0 accordingly)."
        )
