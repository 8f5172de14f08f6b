"""The context every derivative computation of the engine runs in: one lock, autograd on.

``torch.func``'s forward-mode AD keeps its dual levels in process-wide state, so two
threads taking JVPs at once corrupt each other's tangents: HVPs come back wrong, or
fail with "no level exists". Every derivative computation of :class:`Equilibrium`
holds this re-entrant lock; threads then take turns (no speed-up from threads, but
exact answers). Code outside deqhess that runs ``torch.func`` in other threads at
the same time is beyond its reach (see the README, "What deqhess checks").

Under ``torch.inference_mode`` ``torch.func.linearize`` silently returns zeros and
autograd records nothing, so the same context leaves inference mode for the
computation (tensors made in inference mode are fine as inputs there).

Under ``torch.autocast`` a map evaluated in bfloat16 at one call and float32 at another
is two maps: the forward solve's iterates, the backward's re-evaluation of ``f(h*)``
and the solvers' own products (``bmm`` is on autocast's list) would disagree in dtype
and value (measured: a raw dtype error in Anderson; a "non-deterministic map" error when
only the backward ran under autocast). An equilibrium is solved and differentiated in
one precision — its tensors' dtype — so the context turns autocast off inside.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

__all__ = ["ENGINE_LOCK", "autocast_off", "engine", "lock_of", "modules_locked", "serialized"]

#: held while a derivative is computed; re-entrant, so nested calls do not deadlock.
ENGINE_LOCK = threading.RLock()


#: one re-entrant lock per object that asked for one (:func:`lock_of`), while it lives
_OBJECT_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OBJECT_LOCKS_GUARD = threading.Lock()


def lock_of(obj: object) -> threading.RLock:
    """A re-entrant lock of ``obj``'s own: the same lock for the same object.

    Each module's, held by a pass over a model that contains it (:func:`modules_locked`).

    Args:
        obj: a weakly referable object (a module).

    Returns:
        Its lock.
    """
    with _OBJECT_LOCKS_GUARD:
        lock = _OBJECT_LOCKS.get(obj)
        if lock is None:
            lock = _OBJECT_LOCKS[obj] = threading.RLock()
        return lock


@contextlib.contextmanager
def modules_locked(model: torch.nn.Module) -> Iterator[None]:
    """Hold the lock (:func:`lock_of`) of every module of ``model``, itself included.

    What a pass over a model holds while it swaps the parameters of the model's modules
    for leaves of its own: passes over one model take turns, and so do passes over two
    models that share a module (one DEQ layer under two heads, say) — with the model's
    lock alone, the second saw the first's swapped parameters as its forward writing
    its own state. The locks are taken in one order (the modules' ``id``), so passes
    over overlapping models cannot deadlock; the engine's lock stays free for what the
    model's forward runs in other threads (a thread pool, a loader's producer).

    Args:
        model: the module whose modules (as ``model.modules()`` lists them now) are held.

    Yields:
        Nothing: the block runs holding the locks.
    """
    modules = sorted({id(m): m for m in model.modules()}.items())
    with contextlib.ExitStack() as stack:
        for _, module in modules:
            stack.enter_context(lock_of(module))
        yield


#: device types whose autocast the engine turns off inside
_AUTOCAST_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def engine() -> Iterator[None]:
    """Hold :data:`ENGINE_LOCK`, outside inference mode and autocast.

    Grad mode is left as it is, except that leaving inference mode turns grad mode on:
    callers that want none say so.

    Yields:
        Nothing: the block runs holding the lock.
    """
    with ENGINE_LOCK, contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(autocast_off())
        yield


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Autocast off (on the devices it knows) within the block, all else as it was."""
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


T = TypeVar("T", bound=Callable)


def serialized(fn: T) -> T:
    """``fn`` run in :func:`engine`."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with engine():
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]
