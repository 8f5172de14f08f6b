"""A data set as ``(x, target)`` batches, read once per pass, and what its batches hold.

Data-set curvature streams its data: every product block, gradient and dense Hessian
is one pass over the batches (:class:`deqhess.streaming.Stream`), so memory does not
grow with their number. Here are the views of the user's data a pass reads —
:class:`Batches` (checked ``(x, target)`` pairs), :class:`MappedBatches` (cast as
read), :class:`RankShard` (a rank's share) — and the byte counts that budget what a
pass keeps (:func:`held_bytes`, :func:`graph_bytes`, :func:`saved_activation_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "Batches",
    "MappedBatches",
    "RankShard",
    "graph_bytes",
    "held_bytes",
    "saved_activation_bytes",
]


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
            raise InputError(
                f"batches must be an iterable of (x, target) pairs (a list, a DataLoader); "
                f"got {type(data).__name__}."
            )
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(part, Tensor) for part in data)
        ):
            raise InputError(
                "data is one (x, target) pair of tensors, not an iterable of such pairs: "
                "pass [(x, y)] for one batch (or a list of pairs, or a DataLoader)."
            )
        self.data = data
        self.one_shot = isinstance(data, Iterator) or getattr(data, "one_shot", False)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for item in self.data:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InputError(_not_a_pair(item))
            yield item[0], item[1]

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]


def _not_a_pair(item: Any) -> str:
    """Why a batch is not an ``(x, target)`` pair, and how to make it one."""
    said = "each batch must be an (x, target) pair"
    if isinstance(item, Mapping):
        keys = list(item)[:4]
        a, b = [*map(repr, keys), "'x'", "'y'"][:2]
        return (
            f"{said}; got a dict with keys {keys}. Give pairs: a collate_fn or Dataset that "
            f"returns (x, target), or wrap the loader: [(b[{a}], b[{b}]) for b in loader] "
            "(held in memory)."
        )
    if isinstance(item, (tuple, list)):
        return (
            f"{said}; got a {type(item).__name__} of length {len(item)}. Give pairs: a "
            "collate_fn or Dataset that returns (x, target) (e.g. drop an index column), or "
            "wrap the loader: [(b[0], b[1]) for b in loader]; a model of several inputs "
            "takes them as one x: ((x1, x2), target)."
        )
    if isinstance(item, Tensor):
        return (
            f"{said}; got a Tensor of shape {tuple(item.shape)}: are the data one (x, y) "
            "pair rather than a list of them? Pass [(x, y)] for one batch."
        )
    return f"{said}; got {type(item).__name__}: pass a list of (x, target) pairs or a DataLoader."


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


def held_bytes(*objects: Any, depth: int = 3) -> int:
    """Bytes of the distinct tensor storages reachable from ``objects``.

    Args:
        objects: what to count (solved batches, warm starts, …).
        depth: how many levels of tuples, lists, dicts and object attributes to follow.

    Returns:
        The bytes of every storage reached, each counted once (views of one storage
        and tensors reached twice cost nothing more).
    """
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


def graph_bytes(*roots: Tensor, depth: int = 6) -> int:
    """Bytes an autograd graph keeps alive, from the tensors it leads back from.

    Every node reachable from ``roots``' ``grad_fn`` is visited once: the tensors torch's
    own nodes saved for their backward (their ``_saved_*`` attributes), and a custom
    Function's saved tensors and what its context holds (a DEQ layer's system: the fixed
    point's Jacobian blocks and their factors), each storage counted once
    (:func:`held_bytes`), ``roots`` included. An estimate from above of what keeping
    the graph costs: storages the caller holds anyway (a model's parameters, the batch)
    count too.

    Args:
        roots: tensors of the graph (a loss, first-order gradients built with
            ``create_graph``, an output).
        depth: how many levels of a custom Function context's attributes to follow.

    Returns:
        The bytes of every distinct storage found.
    """
    nodes: list[Any] = [r.grad_fn for r in roots if r.grad_fn is not None]
    visited: set[int] = set()
    held: list[Any] = list(roots)
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    held.append(getattr(node, name))
                except RuntimeError:  # freed, or not a tensor torch can give back
                    continue
        if hasattr(node, "saved_tensors"):  # a custom Function's context
            try:
                held.append(tuple(node.saved_tensors))
            except RuntimeError:
                pass
            held.append(_context_state(node))
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return held_bytes(*held, depth=depth)


def _context_state(node: Any) -> dict[str, Any]:
    """What a custom Function's context holds in its own attributes (``ctx.system``)."""
    try:
        return dict(vars(node))
    except TypeError:
        return {}


def saved_activation_bytes(fn: Callable[..., Tensor], *inputs: Tensor) -> int | None:
    """Bytes autograd saves for the backward of one call ``fn(*inputs)`` (plain autograd).

    Args:
        fn: the computation, e.g. a model's forward and loss on one batch.
        inputs: its tensors (detached copies requiring grad are passed).

    Returns:
        The bytes of the tensors saved for the backward (counted as saved, so a tensor
        saved twice counts twice), or None when they cannot be counted (``fn`` uses
        ``torch.func`` inside).
    """
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
