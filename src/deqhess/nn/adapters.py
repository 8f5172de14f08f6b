"""Adapters so other cells fit ``DEQ``'s ``cell(x, h)`` contract.

* :class:`StateFirst` wraps a torchdeq-style cell ``f(z, x)`` (state first).
* :class:`TupleState` wraps a cell whose state is a tuple of tensors ``[B, ...]``,
  presenting it to the solver as one flat ``[B, Σ dᵢ]`` state; :meth:`TupleState.split`
  recovers the tuple from the equilibrium.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["StateFirst", "TupleState"]


class StateFirst(nn.Module):
    """``cell(x, h) = module(h, x)`` for torchdeq-style ``f(z, x)`` cells.

    Parameters are then named ``cell.module.<name>`` inside a :class:`DEQ`.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """The next state ``module(h, x)``, shaped like ``h``."""
        return self.module(h, x)

    def init_state(self, x: Tensor) -> Tensor:
        """A tensor shaped like the state: ``module.init_state(x)`` if defined, else ``x``."""
        init = getattr(self.module, "init_state", None)
        return init(x) if callable(init) else x


class TupleState(nn.Module):
    """A cell ``module(x, (h₁, …, hₖ)) → (h₁', …, hₖ')`` seen as one flat state.

    The state ``[B, Σ dᵢ]`` (``dᵢ`` the number of entries of ``shapes[i]``) is the
    concatenation of the flattened ``hᵢ``; the fixed point and its derivatives are those
    of the tuple map, and :meth:`split` gives the tuple back.

    Args:
        module: the cell with a tuple state.
        shapes: per-sample shape of each state tensor (without the batch dim).

    Raises:
        InputError: ``shapes`` is empty or not a sequence of shapes.
    """

    def __init__(self, module: nn.Module, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(shapes) == 0:
            raise InputError("TupleState needs at least one state shape.")
        self.module = module
        try:
            self.shapes = [tuple(int(n) for n in s) for s in shapes]
        except TypeError:
            raise InputError(
                f"shapes must be a sequence of per-sample shapes, e.g. [(2,), (3, 4)]; got "
                f"{shapes!r}."
            ) from None
        self.sizes = [math.prod(s) for s in self.shapes]

    def split(self, h: Tensor) -> tuple[Tensor, ...]:
        """Flat ``[B, Σ dᵢ]`` → the tuple of ``[B, *shapeᵢ]`` tensors.

        Args:
            h: a flat state, e.g. the layer's fixed point.

        Returns:
            One tensor per declared shape, views of ``h`` (differentiable as ``h`` is).
        """
        pieces = torch.split(h, self.sizes, dim=-1)
        return tuple(p.reshape(*h.shape[:-1], *s) for p, s in zip(pieces, self.shapes, strict=True))

    def join(self, states: Sequence[Tensor]) -> Tensor:
        """The tuple → flat ``[B, Σ dᵢ]``.

        Args:
            states: what the cell returned: the ``k`` state tensors ``[B, *shapeᵢ]``.

        Returns:
            ``[B, Σ dᵢ]``: the flattened tensors, concatenated in order.

        Raises:
            InputError: not a tuple or list of tensors with the declared per-sample shapes
                (states returned out of order would otherwise join into another map).
        """
        if not isinstance(states, (tuple, list)):
            raise InputError(
                f"the cell returned a {type(states).__name__}; a TupleState cell returns a "
                f"tuple of {len(self.shapes)} state tensors."
            )
        if len(states) != len(self.shapes):
            raise InputError(
                f"the cell returned {len(states)} state tensors; expected {len(self.shapes)}."
            )
        for i, (state, shape) in enumerate(zip(states, self.shapes, strict=True)):
            if not isinstance(state, Tensor) or tuple(state.shape[1:]) != shape:
                got = tuple(state.shape[1:]) if isinstance(state, Tensor) else type(state).__name__
                raise InputError(
                    f"state {i} returned by the cell has per-sample shape {got}; declared "
                    f"{shape} (shapes={self.shapes}). Return the states in the declared order."
                )
        return torch.cat([s.reshape(s.shape[0], -1) for s in states], dim=-1)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """The next flat state: ``module`` applied to the tuple ``split(h)``, joined."""
        return self.join(self.module(x, self.split(h)))

    def init_state(self, x: Tensor) -> Tensor:
        """Zeros ``[B, Σ dᵢ]``, ``B = x.shape[0]``, of ``x``'s dtype and device."""
        return x.new_zeros(x.shape[0], sum(self.sizes))
