"""A data set as ``(x, target)`` batches, read once per pass, and a cache of solved batches.

Data-set curvature streams its data: every product block, gradient and dense Hessian
is one pass over the batches, so memory does not grow with their number. What a pass
needs from the data:

* :class:`Batches` — the user's iterable, checked to be ``(x, target)`` pairs and to
  be re-iterable (a list, a ``DataLoader``; a generator can be read only once);
* :func:`check_same_data` — every pass must see the samples the first one saw;
* :class:`BatchCache` — solved batches kept between passes under a byte budget, and
  reused only for a batch equal to the one they were solved for, so a loader that
  shuffles or changes its batches gives correct (if uncached) results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "BatchCache",
    "Batches",
    "MappedBatches",
    "RankShard",
    "check_same_data",
    "held_bytes",
    "same_batch",
    "saved_activation_bytes",
]

#: the default budget of :class:`BatchCache`: 1 GiB.
DEFAULT_CACHE_BYTES = 1 << 30


class Batches:
    """The user's batches, iterated once per pass.

    Args:
        data: an iterable of ``(x, target)`` pairs — a list, or a ``DataLoader``
            (workers are fine; ``persistent_workers=True`` spares restarting them on
            every pass). It must give the same samples on every pass; the order and
            the grouping into batches may change (e.g. ``shuffle=True``) when the loss
            is a per-sample mean or sum. A one-shot iterator (a generator) is read
            once: :attr:`one_shot` tells, and its owner must cache every batch.
    """

    def __init__(self, data: Iterable[tuple[Any, Any]]) -> None:
        if not isinstance(data, Iterable):
            raise ValueError(
                f"batches must be an iterable of (x, target) pairs (a list, a DataLoader); "
                f"got {type(data).__name__}."
            )
        self.data = data
        self.one_shot = isinstance(data, Iterator) or getattr(data, "one_shot", False)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for item in self.data:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(
                    f"each batch must be an (x, target) pair; got {type(item).__name__}"
                    + (f" of length {len(item)}." if hasattr(item, "__len__") else ".")
                )
            yield item[0], item[1]

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]


class MappedBatches:
    """``fn(batch)`` for every batch of ``data``, as it is read: re-iterable and lazy."""

    def __init__(self, data: Iterable[Any], fn: Callable[[Any], Any]) -> None:
        self.data, self.fn = data, fn
        self.one_shot = isinstance(data, Iterator) or getattr(data, "one_shot", False)

    def __iter__(self) -> Iterator[Any]:
        for item in self.data:
            yield self.fn(item)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]


class RankShard:
    """Batches ``rank, rank + world, …`` of ``data``: a rank's shard, re-iterable and lazy."""

    def __init__(self, data: Iterable[Any], rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world
        self.one_shot = isinstance(data, Iterator) or getattr(data, "one_shot", False)

    def __iter__(self) -> Iterator[Any]:
        for index, item in enumerate(self.data):
            if index % self.world == self.rank:
                yield item


def check_same_data(samples: int, batches: int, expected_samples: int, expected_batches: int):
    """Raise ``ValueError`` unless a pass saw as many samples as the first pass."""
    if samples != expected_samples:
        raise ValueError(
            f"the data gave {samples} samples in {batches} batches on this pass but "
            f"{expected_samples} in {expected_batches} on the first: the batches must give "
            "the same samples every time they are iterated (pass a list or a DataLoader, "
            "not a generator or a stream that changes)."
        )


def same_batch(a: Any, b: Any) -> bool:
    """Whether two batches (tensors, and tuples, lists or dicts of them) are equal."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and (a is b or bool(torch.equal(a, b)))
        )
    if isinstance(a, (tuple, list)):
        return (
            isinstance(b, (tuple, list))
            and len(a) == len(b)
            and all(same_batch(p, q) for p, q in zip(a, b, strict=True))
        )
    if isinstance(a, Mapping):
        return (
            isinstance(b, Mapping) and list(a) == list(b) and all(same_batch(a[k], b[k]) for k in a)
        )
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # an object without a truthy equality: never assume equal
        return False


def held_bytes(*objects: Any, depth: int = 3) -> int:
    """Bytes of the distinct tensor storages reachable from ``objects`` through
    tuples, lists, dicts and object attributes (``depth`` levels), each counted once."""
    seen: set[int] = set()

    def walk(obj: Any, level: int) -> int:
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if level == 0:
            return 0
        if isinstance(obj, Mapping):
            return sum(walk(v, level - 1) for v in obj.values())
        if isinstance(obj, (tuple, list)):
            return sum(walk(v, level - 1) for v in obj)
        if hasattr(obj, "__dict__") and not callable(obj):
            return sum(walk(v, level - 1) for v in vars(obj).values())
        return 0

    return sum(walk(obj, depth) for obj in objects)


def saved_activation_bytes(fn: Callable[..., Tensor], *inputs: Tensor) -> int | None:
    """Bytes autograd saves for the backward of one call ``fn(*inputs)`` (plain autograd),
    or None when they cannot be counted (``fn`` uses ``torch.func`` inside)."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    leaves = [t.detach().requires_grad_() for t in inputs]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*leaves)
    except RuntimeError:
        return None
    return total


@dataclass
class _Entry:
    x: Any
    target: Any
    value: Any


class BatchCache:
    """Solved batches kept between passes, by position, up to ``budget`` bytes.

    The cache holds a prefix of the data: batches are offered in order and the first
    one that does not fit closes it. A cached value is returned only for a batch equal
    (:func:`same_batch`) to the one it was solved for.

    Args:
        budget: bytes the cached values may take (their owner's estimates); 0 disables.
    """

    def __init__(self, budget: int) -> None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(
                f"cache_bytes must be a non-negative int (bytes; 0 disables the cache); "
                f"got {budget!r}."
            )
        self.budget = budget
        self.used = 0
        self.closed = budget == 0
        self._entries: dict[int, _Entry] = {}
        self.complete = False

    def offer(self, index: int, x: Any, target: Any, value: Any, size: Callable[[], int]) -> bool:
        """Keep ``value`` for batch ``index`` if its ``size()`` fits; returns whether kept."""
        if self.closed:
            return False
        nbytes = size()
        if self.used + nbytes > self.budget:
            self.closed = True
            return False
        self._entries[index] = _Entry(x, target, value)
        self.used += nbytes
        return True

    def seal(self, batches: int) -> None:
        """End of the first pass over ``batches`` batches: record whether all are cached."""
        self.complete = len(self._entries) == batches

    def get(self, index: int, x: Any, target: Any) -> Any | None:
        """The value cached for batch ``index`` if that batch equals ``(x, target)``."""
        entry = self._entries.get(index)
        if entry is None or not same_batch((entry.x, entry.target), (x, target)):
            return None
        return entry.value

    def values(self) -> Iterator[Any]:
        """The cached values, in data order."""
        for _, value in self.items():
            yield value

    def items(self) -> Iterator[tuple[int, Any]]:
        """``(batch index, cached value)``, in data order."""
        for index in sorted(self._entries):
            yield index, self._entries[index].value

    def __len__(self) -> int:
        return len(self._entries)
