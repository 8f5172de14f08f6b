"""A fixed point's dense factors of ``I − J``, kept between passes over the same batch.

A curvature operator's passes over a data set solve each batch's DEQ layers again,
warm-started from the fixed points the last pass reached; where nothing changed, the
blocks of ``J`` at the fixed point come out bitwise the same as the last pass's, and
so would their LU factors and condition number (:class:`deqhess.linear.DenseLU` is a
function of the blocks and its ``max_condition`` alone). The blocks are formed on
every pass (their ``d`` VJPs and the checks that go with them); the factorisation is
taken again from a :class:`FactorSlot` where the blocks are equal entry by entry and
the settings the same. Nothing is assumed about what could have changed — a
parameter, a buffer, a Python attribute of the cell: whatever changes ``J`` changes
the blocks, and the factors are formed afresh. So the kept factors give bitwise the
products a fresh factorisation gives.

What a slot keeps is charged to its owner's budget first (``reserve``): factors that
do not fit are not kept, and new factors in place of kept ones are charged for what
they take beyond them, or give back what they take less (where the new ones do not
fit, neither is kept, and the old ones' bytes are given back).

Measured on ``benchmarks/vs_curvlinops.py``'s tanh classifier (32 samples of 32 state
values a batch, float64, one thread): the LU and its ``gecon`` condition numbers took
0.7 ms of the ~10 ms a block of 10 HVPs spends on a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..batches import held_bytes

__all__ = ["FactorSlot", "KeptFactors"]

S = TypeVar("S")


@dataclass(frozen=True)
class KeptFactors:
    """The factorised solve with ``I − J``, and the blocks of ``J`` it was formed from.

    Attributes:
        jacobian: ``[S, d, d]``, the blocks of ``J``.
        settings: the solver's type and settings (``max_condition``).
        solve: the factorised solve.
        charged: the bytes charged to the budget for this entry.
    """

    jacobian: Tensor
    settings: tuple
    solve: Any
    charged: int


@dataclass(frozen=True)
class FactorSlot:
    """Where one call of a DEQ layer keeps its factors between passes over a batch.

    Attributes:
        store: the batch's store (its warm starts' dict).
        key: this call's key in it.
        reserve: ``bytes ↦`` whether that many more bytes could be charged to the
            budget (charged where True); negative bytes give back what was charged.
    """

    store: dict
    key: Any
    reserve: Callable[[int], bool]

    def factors(self, jacobian: Tensor, settings: tuple, factorise: Callable[[], S]) -> S:
        """The kept solve where it was formed from bitwise these blocks, else a new one.

        Args:
            jacobian: ``[S, d, d]``, the blocks of ``J`` formed now.
            settings: the solver's type and settings.
            factorise: ``() ↦`` a new solve from ``jacobian`` (may raise: then nothing
                is kept).

        Returns:
            The solve: kept in the slot where its bytes are charged to the budget.
        """
        kept = self.store.get(self.key)
        if isinstance(kept, KeptFactors) and kept.settings == settings:
            if _same(kept.jacobian, jacobian):
                return kept.solve
        solve = factorise()
        size = held_bytes(jacobian, solve, depth=1)  # as the store counts what it holds
        charged = kept.charged if isinstance(kept, KeptFactors) else 0
        if not self.reserve(size - charged):  # negative (fewer bytes): always given back
            if self.store.pop(self.key, None) is not None:  # no room for the new ones
                self.reserve(-charged)  # the old ones' bytes given back
            return solve
        self.store[self.key] = KeptFactors(jacobian, settings, solve, size)
        return solve


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are equal entry by entry (NaN equal to nothing)."""
    same_layout = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    return same_layout and torch.equal(a, b)
