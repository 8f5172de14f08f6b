"""Batch graphs kept from one pass for the next while an analysis holds its operator.

Every product of a model's curvature is a pass over the data, and every pass forms each
batch's graph again: the forward (each DEQ layer's fixed-point solve) and the
first-order gradients the products differentiate, with each layer's ``I − J`` formed and
factorised — about half of a pass of 10 directions on the tanh classifier of
``benchmarks/vs_curvlinops.py``. An analysis that takes many products of one operator
(Lanczos, conjugate gradients, Hutch++, the spectral density) holds it
(:meth:`deqhess.operator.Operator.holding`): while it does, a batch whose content recurs
is not formed again but taken from the graph its first pass left, within the cache's
budget. The graph is the same function of the directions, so the products are the same
numbers (to the order of summation).

What is kept is checked on every pass: the batch by its content (its key), the model by
the digest of its parameters and buffers (and a module loss's), its modules' modes and
hooks (a change drops every graph kept); a model that reads other state (a plain tensor
attribute, a global) is taken to keep it while the operator is held — nothing the
analyses run between products changes it.
"""

from __future__ import annotations

from dataclasses import replace

from ..batches import graph_bytes
from ..memory import budget_bytes
from ..streaming import Formed
from .graph import BatchGraph

__all__ = ["MARGIN", "HeldGraphs"]

#: what a kept graph is charged, over :func:`deqhess.batches.graph_bytes`' count of its
#: tensors: the process grew by 1.04–1.16 times that count for each graph kept (16 batch
#: graphs of ``benchmarks/curvature_models.py``'s tanh and conv models, against the same
#: graphs dropped)
MARGIN = 1.5


class HeldGraphs:
    """The batches a held operator's passes formed, by part and content, within a budget.

    A graph is kept while the graphs kept, each charged :data:`MARGIN` times its
    tensors' bytes, fit in ``budget`` and in half the memory available on its device
    (:func:`deqhess.memory.budget_bytes`).

    Args:
        budget: the bytes the kept graphs may take.
        state: the token of the model's state when holding began (its parameters' and
            buffers' digest, modes and hooks).
        products: the products the holder will take at most (None: not known).
    """

    def __init__(self, budget: int, state: tuple, products: int | None = None) -> None:
        self.budget, self.state, self.products = budget, state, products
        self.used = 0
        self.full = False  # a graph was not kept for want of room
        self._formed: dict[tuple[str | None, str], Formed] = {}

    def expected(self, directions: int | None) -> int | None:
        """The directions a graph formed now will see: all the holder's products.

        Once a graph did not fit (:attr:`full`), only the pass's own.

        Args:
            directions: those of the pass forming it (None: not known).

        Returns:
            The larger of the two (None where neither is known).
        """
        if self.full:  # what is formed now is not kept: it serves this pass alone
            return directions
        known = [d for d in (directions, self.products) if d is not None]
        return max(known) if known else None

    def get(self, part: str | None, key: str) -> Formed | None:
        """The batch with content ``key`` as formed for ``part``, if kept."""
        return self._formed.get((part, key)) if key else None

    def offer(self, part: str | None, key: str, formed: Formed) -> None:
        """Keep ``formed`` for the next pass, if its graph fits in what the budget leaves.

        What is kept is the formed batch without what only a first formation carries:
        nothing for the store to keep (it has its warm starts), no response to check
        again (the same graph), no grouping to record.

        Args:
            part: the part its graph was formed for.
            key: the batch's content key (empty: not kept).
            formed: the formed batch; its term a :class:`~deqhess.models.graph.BatchGraph`.
        """
        graph = formed.term
        if not key or not isinstance(graph, BatchGraph) or (part, key) in self._formed:
            return
        nbytes = int(MARGIN * graph_bytes(*graph.roots()))
        available = budget_bytes(graph.params[0].device)
        room = self.budget if available is None else min(self.budget, 0.5 * available)
        if self.used + nbytes > room:
            self.full = True
            return
        self._formed[(part, key)] = replace(formed, response=None, offers=(), coupled=None)
        self.used += nbytes

    def clear(self) -> None:
        """Drop every kept graph."""
        self._formed.clear()
        self.used, self.full = 0, False
