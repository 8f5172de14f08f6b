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

__all__ = ["FactorSlot", "KeptFactors", "without_factors"]

S = TypeVar("S")


@dataclass(frozen=True)
class KeptFactors:
    """The factorised solve with ``I − J``, and the blocks of ``J`` it was formed from.

    Attributes:
        jacobian: ``[S, d, d]``, the blocks of ``J``.
        settings: the solver's type and settings (``max_condition``).
        solve: the factorised solve.
    """

    jacobian: Tensor
    settings: tuple
    solve: Any


@dataclass(frozen=True)
class FactorSlot:
    """Where one call of a DEQ layer keeps its factors between passes over a batch.

    Attributes:
        store: the batch's store (its warm starts' dict).
        key: this call's key in it.
        may_add: whether factors may be added where the slot holds none (a store not
            yet charged to the budget); else they only replace factors of the same size.
    """

    store: dict
    key: Any
    may_add: bool

    def factors(self, jacobian: Tensor, settings: tuple, factorise: Callable[[], S]) -> S:
        """The kept solve where it was formed from bitwise these blocks, else a new one.

        Args:
            jacobian: ``[S, d, d]``, the blocks of ``J`` formed now.
            settings: the solver's type and settings.
            factorise: ``() ↦`` a new solve from ``jacobian`` (may raise: then nothing
                is kept).

        Returns:
            The solve, kept in the slot where there is room for it.
        """
        kept = self.store.get(self.key)
        if isinstance(kept, KeptFactors) and kept.settings == settings:
            if _same(kept.jacobian, jacobian):
                return kept.solve
        solve = factorise()
        if kept is None and not self.may_add:
            return solve
        if kept is not None and not _same_layout(kept.jacobian, jacobian):
            self.store.pop(self.key, None)  # another size than the budget was charged for
            return solve
        self.store[self.key] = KeptFactors(jacobian, settings, solve)
        return solve


def without_factors(store: dict) -> dict:
    """``store`` with no kept factors: the warm starts alone.

    Args:
        store: a batch's store.

    Returns:
        A new dict of its other entries.
    """
    return {k: v for k, v in store.items() if not isinstance(v, KeptFactors)}


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are equal entry by entry (NaN equal to nothing)."""
    return _same_layout(a, b) and torch.equal(a, b)
