"""One process-wide lock around deqhess's derivative computations.

``torch.func``'s forward-mode AD keeps its dual levels in process-wide state, so two
threads taking JVPs at once corrupt each other's tangents: HVPs come back wrong, or
fail with "no level exists". Every derivative computation of :class:`Equilibrium`
holds this re-entrant lock; threads then take turns (no speed-up from threads, but
exact answers). Code outside deqhess that runs ``torch.func`` in other threads at
the same time is beyond its reach (see the README, "What deqhess checks").
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["ENGINE_LOCK", "serialized"]

#: held while a derivative is computed; re-entrant, so nested calls do not deadlock.
ENGINE_LOCK = threading.RLock()

T = TypeVar("T", bound=Callable)


def serialized(fn: T) -> T:
    """``fn`` run while holding :data:`ENGINE_LOCK`."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with ENGINE_LOCK:
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]
