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

What is kept is checked on every pass: the batch by its content (its key) and the
versions of its tensors (written in place and back: formed again; a batch holding other
objects, which neither would see into, is not kept), the model's parameters and buffers
by the stream's own check (digests included: a change drops every graph kept), and
the rest by :func:`state_token` — modes, hooks (forward, backward, global), every
module's plain attributes (numbers, strings), and the loss's state (a module loss's, or
the tensors, modules and numbers a loss function closes over or reads as a global). The
first time a kept graph serves again, the model is run forward once more
on its batch and its output checked against the first pass's, as every pass checks a
batch it forms: a forward that changes its own state on every call is refused as it is
without holding. A model that reads other state (a global of its own) is taken to keep
it while the operator is held — nothing the analyses run between
products changes it. Loss-only graphs (a gradient's pass frees its graph) are not kept,
and when a pass finds none of the graphs kept before it (a shuffling loader regroups
the samples), keeping stops for the rest of the block.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..batches import graph_bytes
from ..implicit.loss import referenced
from ..memory import budget_bytes
from ..streaming import Formed
from ..streaming.fingerprint import tensor_digests
from .graph import BatchGraph

__all__ = ["MARGIN", "HeldGraphs", "state_token"]

#: what a kept graph is charged, over :func:`deqhess.batches.graph_bytes`' count of its
#: tensors: the process grew by 1.04–1.16 times that count for each graph kept (16 batch
#: graphs of ``benchmarks/curvature_models.py``'s tanh and conv models, against the same
#: graphs dropped)
MARGIN = 1.5


#: what a kept batch may be made of: what its content key and versions see into
_READABLE = (Tensor, int, float, bool, str, type(None))

#: the plain values a pass's state token holds by value (a module's attributes, a loss's
#: closed-over or global numbers)
_PLAIN = (int, float, complex, bool, str, type(None))

#: the largest tensor in a container a loss reads that the state token digests (a loss
#: reading a global list of data batches is not digested on every pass)
_SMALL = 65536

#: the widest container a loss reads whose contents the state token holds
_WIDE = 4096

#: the hooks a module holds, and torch's global ones, that change what a forward computes
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(f"_global{name}" for name in _HOOKS)


def state_token(model: nn.Module, loss: Any) -> tuple:
    """What a pass computes with besides the model's parameters and buffers, as a token.

    The model's parameters and buffers are the stream's own check (its version token,
    digests included: a change starts the checks afresh and drops what was kept); this
    is the rest: each module's mode, hooks (and torch's global hooks) and plain
    attributes (numbers and strings: a loss's ``label_smoothing``, a cell's scale), and
    the loss's state — a module loss's parameters and buffers, or the tensors, modules
    and numbers a loss function closes over or reads as globals (one level:
    ``lambda o, y: weighted(o, y)``), bit for bit.

    Args:
        model: the model.
        loss: its loss.

    Returns:
        A comparable token.
    """
    held = _loss_state(loss, model)
    modules = [model, *(m for m in held if isinstance(m, nn.Module))]
    tensors = [t for t in held if isinstance(t, Tensor)]
    numbers = tuple(_plain(v) for v in held if not isinstance(v, (Tensor, nn.Module)))
    for module in modules[1:]:
        tensors += [*module.parameters(), *module.buffers()]
    every = [m for module in modules for m in module.modules()]
    for m in every:  # tensors a module keeps as plain attributes (not registered)
        tensors += [t for t in vars(m).values() if isinstance(t, Tensor)]
    layout = tuple(
        (id(m), m.training, *(tuple(getattr(m, h, ())) for h in _HOOKS), _attributes(m))
        for m in every
    )
    hooks = tuple(tuple(getattr(nn.modules.module, h, ())) for h in _GLOBAL_HOOKS)
    return layout, hooks, numbers, tuple(id(t) for t in tensors), tensor_digests(tensors)


def _plain(value: Any) -> Any:
    """``value`` as a comparable token, where it is plain.

    Returns:
        A token for a number (NumPy's too), a string or a tuple of them; else None.
    """
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, np.generic):
        return (type(value), value.tobytes())
    if isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value):
        return (tuple, value)
    return None


def _attributes(module: nn.Module) -> tuple:
    """A module's plain attributes, as tokens by name.

    Returns:
        Its numbers and strings, and the numbers and strings in its lists, tuples and
        dicts (one level: ``self.scale[0]`` changed in place).
    """
    tokens = []
    for name, value in vars(module).items():
        token = _plain(value)
        if token is None and isinstance(value, (list, tuple, dict)) and len(value) <= _SMALL:
            items = value.items() if isinstance(value, dict) else enumerate(value)
            inner = tuple((k, _plain(v)) for k, v in items if _plain(v) is not None)
            token = (type(value), inner) if inner else None
        if token is not None:
            tokens.append((name, token))
    return tuple(tokens)


def _loss_state(loss: Any, model: nn.Module) -> list[Any]:
    """The modules, tensors and plain numbers a loss holds.

    Returns:
        The loss itself if a module; else those it closes over, takes as defaults or
        reads as globals (one level; a list, dict or configuration object among them by
        its numbers and small tensors), the model left out (the stream checks it).
    """
    if isinstance(loss, nn.Module):
        return [loss]
    found: list[Any] = []
    for value in referenced(loss):  # cells, defaults, bound self, partial, globals read
        if isinstance(value, Tensor) or (isinstance(value, nn.Module) and value is not model):
            found.append(value)
        elif _plain(value) is not None:
            found.append(value)
        else:  # a container or configuration object: its numbers and small tensors
            found += [
                v
                for v in _contents(value)
                if _plain(v) is not None or (isinstance(v, Tensor) and v.numel() <= _SMALL)
            ]
    return found


def _contents(value: Any) -> list[Any]:
    """What a list, tuple, set, dict or plain object a loss reads holds (one level).

    Returns:
        Its items or attribute values; nothing for functions, classes and modules of
        code, whose state is not the loss's.
    """
    if isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) > _WIDE:
        return []  # a data set, a log: not the loss's configuration
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    if callable(value) or isinstance(value, (type, types.ModuleType)):
        return []
    attributes = getattr(value, "__dict__", None)  # Namespace, dataclass, a config object
    return list(attributes.values()) if isinstance(attributes, dict) else []


@dataclass
class _Kept:
    """One kept batch: as formed, what it is charged, its tensors' versions then."""

    formed: Formed
    nbytes: int
    versions: list[tuple[Tensor, int]]
    verified: bool = False


class HeldGraphs:
    """The batches a held operator's passes formed, by part and content, within a budget.

    A graph is kept while the graphs kept, each charged :data:`MARGIN` times its
    tensors' bytes, fit in ``budget`` and in half the memory available on its device
    (:func:`deqhess.memory.budget_bytes`).

    Args:
        budget: the bytes the kept graphs may take, or ``() ↦`` them (what a store
            sharing the budget leaves now).
        state: the token of the model's state when holding began (its parameters' and
            buffers' digest, modes and hooks).
        products: the products the holder will take at most (None: not known).
    """

    def __init__(
        self, budget: int | Callable[[], int], state: tuple, products: int | None = None
    ) -> None:
        self.budget, self.state, self.products = budget, state, products
        self.used = 0
        self.full = False  # a graph was not kept for want of room, or keeping stopped
        self._kept: dict[tuple[str | None, str], _Kept] = {}
        self._part: str | None = None  # the part of the pass under way
        self._hits = 0  # graphs it served again
        self._kept_before = False  # graphs of its part were kept before it

    def new_pass(self, part: str | None, state: tuple) -> None:
        """A pass for ``part`` begins with the model in ``state``.

        A state other than the last pass's drops every graph kept. So does a pass of
        the same part before it that found none of the graphs kept before it (their
        batches did not recur: a shuffling loader), and then nothing more is kept.

        Args:
            part: the part the pass forms its batches for.
            state: the model's state token now.
        """
        if state != self.state:
            self.clear()
            self.state = state
        elif part == self._part and self._kept_before and not self._hits:
            self.clear()
            self.full = True
        self._part, self._hits = part, 0
        self._kept_before = any(kept_part == part for kept_part, _ in self._kept)

    def ended(self, state: tuple) -> None:
        """A pass ended with the model in ``state``: what the next pass's is compared with.

        So a forward that changes its own plain state on every call (a call counter)
        does not drop the graphs kept: only a change between passes does (and a kept
        graph's first reuse still checks the model's output).

        Args:
            state: the model's state token after the pass.
        """
        self.state = state

    def expected(self, directions: int | None) -> int | None:
        """The directions a graph formed now will see: all the holder's products.

        Once a graph is no longer kept (:attr:`full`), only the pass's own.

        Args:
            directions: those of the pass forming it (None: not known).

        Returns:
            The larger of the two (None where neither is known).
        """
        if self.full:  # what is formed now is not kept: it serves this pass alone
            return directions
        known = [d for d in (directions, self.products) if d is not None]
        return max(known) if known else None

    def get(self, part: str | None, key: str, verify: Callable[[Formed], Any]) -> Formed | None:
        """The batch with content ``key`` as formed for ``part``, if kept and unwritten.

        Args:
            part: the part asked for.
            key: the batch's content key.
            verify: ``formed ↦`` the model's output on the kept batch now, run the first
                time it serves again (returned as the formed batch's response, for the
                pass to check against the first pass's).

        Returns:
            The kept batch (with the response to check, the first time), or None: not
            kept, or a tensor it saved was written since (dropped; form it again).
        """
        kept = self._kept.get((part, key)) if key else None
        if kept is None:
            return None
        if any(t._version != version for t, version in kept.versions):
            self._drop((part, key))
            return None
        self._hits += 1
        if kept.verified:
            return kept.formed
        kept.verified = True
        return replace(kept.formed, response=verify(kept.formed))

    def offer(self, part: str | None, key: str, formed: Formed, batch: Any) -> None:
        """Keep ``formed`` for the next pass, if its graph fits in what the budget leaves.

        What is kept is the formed batch without what only a first formation carries:
        nothing for the store to keep (it has its warm starts), no response to check
        again (the same graph), no grouping to record.

        Args:
            part: the part its graph was formed for.
            key: the batch's content key (empty: not kept).
            formed: the formed batch; its term a :class:`~deqhess.models.graph.BatchGraph`
                of a part (a loss-only graph is not kept: its pass's backward frees it).
            batch: the batch's ``(x, target)``, whose tensors' versions are kept with it
                (a batch holding other objects than tensors and plain values is not
                kept: its key and versions would not see a write into them).
        """
        graph = formed.term
        if self.full or part is None or not key or not isinstance(graph, BatchGraph):
            return  # a loss-only graph: its pass's backward frees it
        leaves = tree_flatten(batch)[0]
        if (part, key) in self._kept or not all(isinstance(t, _READABLE) for t in leaves):
            return  # a batch holding objects its key and versions cannot see into
        nbytes = int(MARGIN * graph_bytes(*graph.roots()))
        available = budget_bytes(graph.params[0].device)
        budget = self.budget() if callable(self.budget) else self.budget
        room = budget if available is None else min(budget, 0.5 * available)
        if self.used + nbytes > room:
            self.full = True
            return
        versions = [(t, t._version) for t in leaves if isinstance(t, Tensor)]
        kept = replace(formed, response=None, offers=(), coupled=None, sized=None)
        self._kept[(part, key)] = _Kept(kept, nbytes, versions)
        self.used += nbytes

    def _drop(self, where: tuple[str | None, str]) -> None:
        self.used -= self._kept.pop(where).nbytes

    def clear(self) -> None:
        """Drop every kept graph."""
        self._kept.clear()
        self.used, self.full = 0, False
