"""One budgeted store of what a pass over the data may keep for the next, by content.

What a pass keeps is solved batches and warm starts. An entry is keyed by
:func:`deqhess.streaming.fingerprint.batch_key` — the batch's samples in order, bitwise
— so it is reused only for a batch with the same content: a loader that shuffles meets
its own entries only where a batch recurs, and never starts a sample from another
sample's fixed point. What an entry holds is the front
end's choice, offered in order of preference (a solved batch, ready for products; or
only its fixed points, to start the next solve from), and kept while the estimated
bytes of all entries fit in one budget. A stored entry may grow later, where the budget
has room (:meth:`BatchStore.grow`: a DEQ layer's dense factors beside its fixed point),
and the budget may be shared meanwhile (:attr:`BatchStore.lent`: a held operator's
graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import InputError

__all__ = ["DEFAULT_CACHE_BYTES", "BatchStore", "Offer", "StoredBatch"]

#: the default budget of a :class:`BatchStore`: 1 GiB.
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class StoredBatch:
    """What the store keeps of one batch.

    Attributes:
        hashes: ``[n]`` its sample hashes (the data check of a pass that reads no data).
        solved: the front end's solved batch, reused as is (None: not kept).
        warm: fixed points to start the batch's next solve from (the front end's keys).
        nbytes: the estimate charged to the budget.
    """

    hashes: Tensor
    solved: Any = None
    warm: dict = field(default_factory=dict)
    nbytes: int = 0


@dataclass(frozen=True)
class Offer:
    """What a front end would keep of a batch.

    Attributes:
        size: ``() ↦`` its estimated bytes (called only if the store has room to
            consider it).
        solved: the solved batch, reused as is; or
        warm: only its fixed points, to start the next solve from.
    """

    size: Callable[[], int]
    solved: Any = None
    warm: dict | None = None


class BatchStore:
    """Entries by batch key, within ``budget`` bytes in all.

    Args:
        budget: bytes the entries may take (their front ends' estimates); 0 keeps none.
    """

    def __init__(self, budget: int) -> None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise InputError(
                f"cache_bytes must be a non-negative int (bytes; 0 keeps nothing between "
                f"passes); got {budget!r}."
            )
        self.budget = budget
        self.used = 0
        #: ``() ↦`` bytes of the budget held elsewhere meanwhile (a held operator's graphs)
        self.lent: Callable[[], int] = lambda: 0
        self._entries: dict[str, StoredBatch] = {}

    def _fits(self, nbytes: int) -> bool:
        return self.used + self.lent() + nbytes <= self.budget

    def get(self, key: str) -> StoredBatch | None:
        """Return the entry of the batch with content ``key``, or None."""
        return self._entries.get(key)

    def offer(self, key: str, hashes: Tensor, offers: Sequence[Offer]) -> StoredBatch | None:
        """Keep the first of ``offers`` that fits, for a batch not stored yet.

        Args:
            key: the batch's content key.
            hashes: its ``[n]`` sample hashes.
            offers: what the front end would keep, in order of preference.

        Returns:
            The batch's entry (the one stored before, if any), or None when nothing
            fits in the budget left.
        """
        if key in self._entries or not self._fits(1):
            return self._entries.get(key)
        for offer in offers:
            nbytes = offer.size()
            if self._fits(nbytes):
                entry = StoredBatch(hashes, offer.solved, offer.warm or {}, nbytes)
                self._entries[key] = entry
                self.used += nbytes
                return entry
        return None

    def grow(
        self, entry: StoredBatch, nbytes: int, give_way: Callable[[Any], int | None] | None = None
    ) -> bool:
        """Charge ``nbytes`` more to a stored entry where they fit in the budget.

        Args:
            entry: an entry of this store (what it holds grows by ``nbytes``).
            nbytes: the bytes to add (negative: what it holds shrank, given back).
            give_way: ``value ↦`` the bytes charged for a value of an entry's ``warm``
                that may be given up to make room (None: it may not); where the bytes do
                not fit, such values are dropped, ``entry``'s own first, until they do.

        Returns:
            True where they were charged; False (nothing charged) where they do not fit.
        """
        if nbytes <= 0 or self._fits(nbytes):
            entry.nbytes += nbytes
            self.used += nbytes
            return True
        if give_way is None:
            return False
        others = [e for e in self._entries.values() if e is not entry]
        for owner in (entry, *others):
            for key, value in list(owner.warm.items()):
                charged = give_way(value)
                if charged is None:
                    continue
                del owner.warm[key]
                self.grow(owner, -charged)
                if self._fits(nbytes):
                    return self.grow(entry, nbytes)
        return False

    def solved_count(self) -> int:
        """How many entries hold a solved batch."""
        return sum(entry.solved is not None for entry in self._entries.values())

    def entries(self) -> Iterator[StoredBatch]:
        """The entries, in the order they were stored."""
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
