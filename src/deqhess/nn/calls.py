"""Per-call controls of the DEQ layers inside a block: warm starts, records, policies.

:func:`layer_calls` is the one mechanism: within its block every :class:`DEQ` call
(outside ``torch.func`` transforms) can start from the fixed point the same call reached
last time, append a :class:`LayerCall` to a record, and solve under another convergence
policy than its own. :func:`warm_starts` and :func:`convergence` are its two faces for
users: re-running the same forward many times, and sampling weights (a Laplace
posterior's samples, an ensemble) where a sampled cell that does not contract is a fact
to report and leave out, not an error that stops the loop.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import InputError
from ..solvers import Convergence, SolveInfo
from .policy import LayerPolicy

if TYPE_CHECKING:
    from .deq import DEQ

__all__ = [
    "CALLS",
    "Calls",
    "ConvergenceRecord",
    "LayerCall",
    "calls_of",
    "convergence",
    "layer_calls",
    "warm_starts",
]


@dataclass(frozen=True)
class LayerCall:
    """One call of a :class:`DEQ` recorded by :func:`layer_calls`.

    Attributes:
        layer: the layer called.
        info: its forward solve's statistics (``info.converged_mask`` ``[S]`` marks the
            samples that met the tolerance).
    """

    layer: DEQ
    info: SolveInfo


@dataclass
class Calls:
    """What :func:`layer_calls` asks of the DEQ calls in its block.

    Attributes:
        store: fixed points by ``(id(layer), call number)``, to start from and update
            (None: no warm starts).
        records: where each call appends its :class:`LayerCall` (None: not recorded).
        keep_best: keep unconverged samples' best iterates without a warning.
        counts: per layer, the calls made so far in the block (the call numbers).
        policy: a policy replacing every layer's own (:func:`convergence`), or None.
        directions: directions each derivative pass pushes through the layers (a
            curvature operator's block), for their ``"auto"`` linear solver; None: a
            training step's few.
        watch_accuracy: the layers' linearisations warn
            (:class:`deqhess.AccuracyWarning`, with the figure) when their derivatives'
            error bound is high.
        visible: each call's cell is evaluated once more at its fixed point, in the
            graph (see :func:`layer_calls`).
        charge: for a ``store`` already charged to a budget, ``bytes ↦`` whether that
            many more bytes fit it (charged if so; negative bytes give back); None: a
            store charged whole later, or not at all.
        factors: where calls with a warm start keep their dense factors of ``I − J``
            beside it, ``bytes ↦`` whether they fit the budget (charged if so; see
            :func:`layer_calls`); None: not kept.
    """

    store: dict | None
    records: list[LayerCall] | None
    keep_best: bool
    counts: dict[int, int] = field(default_factory=dict)
    policy: LayerPolicy | None = None
    directions: int | None = None
    watch_accuracy: bool = False
    visible: bool = False
    charge: Callable[[int], bool] | None = None
    factors: Callable[[int], bool] | None = None


CALLS: ContextVar[Calls | None] = ContextVar("deqhess_layer_calls", default=None)


@contextlib.contextmanager
def layer_calls(
    *,
    warm: dict | None = None,
    records: list[LayerCall] | None = None,
    keep_best: bool = False,
    directions: int | None = None,
    watch_accuracy: bool = False,
    visible: bool = False,
    charge: Callable[[int], bool] | None = None,
    factors: Callable[[int], bool] | None = None,
    layers: Iterable[DEQ] = (),
) -> Iterator[None]:
    """Control and record every :class:`DEQ` call in the block (outside ``torch.func``).

    Each call in the block is affected by the arguments given:

    * ``warm`` — called without ``h0``, starts from the fixed point it reached on the
      same call in ``warm`` last time, and records the new one there. Calls are told
      apart by layer and by order within the block (a layer called twice is two
      entries); an entry is used only if its shape and dtype match. The fixed point is
      still solved to the tolerance — only the start changes.
    * ``records`` — appends a :class:`LayerCall` with its solve's statistics.
    * ``keep_best`` — a sample that misses the tolerance keeps its best iterate,
      without a warning, whatever the layer's own policy (its fallback solvers still
      run first): for a caller that reads ``records`` and leaves such samples out.
    * ``directions`` — the number of directions each derivative pass will push through
      the layers (a curvature operator's block of K): a layer whose ``linear_solver`` is
      ``"auto"`` then factorises ``I − J`` per sample wherever that costs fewer products
      than K directions' iterative solves (see
      :func:`deqhess.linear.resolve_linear_solver`).
    * ``watch_accuracy`` — the derivatives of the calls made in the block (taken in it
      or later) watch their own accuracy as :class:`deqhess.Equilibrium`'s do: where the
      error bound ``‖(I − J)⁻¹‖ · (residual left)`` of a call's fixed point is above 1e-6
      (float64) / 1e-3 (float32), the first derivative through it gives a
      :class:`deqhess.AccuracyWarning` with the figure (once per call), and GMRES's
      estimate of ``‖(I − J)⁻¹‖`` is checked as it comes. Off by default: a training
      loop's every step would warn (see :mod:`deqhess.linear.accuracy`).
    * ``visible`` — each call's cell is evaluated once more at the fixed point, in the
      graph, as for a cell with module hooks (:mod:`deqhess.nn.observed`): its
      parameters' gradients then pass through that evaluation's operations, where
      :mod:`deqhess.models.sample_sites` reads each sample's share. The derivatives are
      the same; a backward costs one more product.
    * ``charge`` — with ``warm`` already charged to a budget: what a call adds to it
      (a fixed point under a new key, or a larger one) is kept only where
      ``charge(bytes)`` says it fits (and charges it); what it drops is given back.
    * ``factors`` — with ``warm``: a call whose derivatives factorise ``I − J`` densely
      keeps the factors in ``warm`` beside its fixed point where ``factors(bytes)`` says
      they fit the budget (and charges them), and takes them again on a later call
      where the blocks of ``J`` come out bitwise the same (:mod:`deqhess.linear.kept`).

    Args:
        warm: the warm-start store (a dict the caller keeps), or None.
        records: a list to append each call's :class:`LayerCall` to, or None.
        keep_best: keep unconverged samples' best iterates, without a warning.
        directions: the directions each derivative pass pushes through the layers, or
            None (a training step's few).
        watch_accuracy: warn where a call's derivatives' error bound is high.
        visible: evaluate each call's cell once more at its fixed point, in the graph.
        charge: ``bytes ↦`` whether that many more bytes in ``warm`` fit the caller's
            budget (charged if so; negative: given back), or None.
        factors: ``bytes ↦`` whether that many bytes of the calls' dense factors of
            ``I − J`` fit the caller's budget (charged if so), to keep them in ``warm``;
            or None.
        layers: layers whose calls are controlled and recorded from any thread while the
            block runs — a forward that runs them in a thread pool, whose threads do not
            see the block's context — (the caller keeps other threads' own calls of
            them out meanwhile: a model's pass holds its modules' locks).

    Yields:
        Nothing: the controls hold until the block ends, then the enclosing block's
        (if any) hold again.
    """
    calls = Calls(
        warm, records, keep_best, directions=directions, watch_accuracy=watch_accuracy,
        visible=visible, charge=charge, factors=factors,
    )  # fmt: skip
    token = CALLS.set(calls)
    registered = [layer for layer in layers if layer not in _BY_LAYER]
    with _BY_LAYER_GUARD:
        _BY_LAYER.update((layer, calls) for layer in registered)
    try:
        yield
    finally:
        with _BY_LAYER_GUARD:
            for layer in registered:
                _BY_LAYER.pop(layer, None)
        CALLS.reset(token)


def calls_of(layer: DEQ) -> Calls | None:
    """The controls over ``layer``'s call now: this context's block, else one registering it.

    Args:
        layer: the layer being called.

    Returns:
        The innermost :func:`layer_calls` block of this thread's context, or the block
        that registered ``layer`` (from another thread), or None.
    """
    own = CALLS.get()
    if own is not None:
        return own
    with _BY_LAYER_GUARD:
        return _BY_LAYER.get(layer)


#: layers registered by a :func:`layer_calls` block, with its controls
_BY_LAYER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_LAYER_GUARD = threading.Lock()


@contextlib.contextmanager
def warm_starts(store: dict) -> Iterator[None]:
    """Warm-start every :class:`DEQ` call in the block from its last fixed point.

    :func:`layer_calls` with ``warm=store`` alone: within the block, a :class:`DEQ`
    called without ``h0`` starts from the fixed point it reached on the same call in
    ``store`` last time, and records the new one there. Meant for re-running the same
    forward many times (a curvature operator's passes over the data, one ``store`` per
    batch). The fixed point is still solved to the layer's tolerance.

    Args:
        store: a dict the caller keeps between blocks (empty at first).

    Yields:
        Nothing: the warm starts hold until the block ends.
    """
    with layer_calls(warm=store):
        yield


@dataclass
class ConvergenceRecord:
    """The calls made inside a :func:`convergence` block, in order.

    Attributes:
        calls: one :class:`LayerCall` per layer call, in the order they were made.
    """

    calls: list[LayerCall] = field(default_factory=list)

    def converged_mask(self) -> Tensor:
        """Which samples' forward solves met the tolerance, call by call.

        Returns:
            ``[calls, S]`` bool: row ``c`` is call ``c``'s ``converged_mask``. With one
            layer called once per sampled weight, row ``s`` is sample ``s``'s.

        Raises:
            InputError: no call was made, or the calls had different numbers of samples
                (then read ``calls`` one by one).
        """
        if not self.calls:
            raise InputError("no DEQ layer was called inside the convergence() block.")
        sizes = {tuple(c.info.converged_mask.shape) for c in self.calls}
        if len(sizes) != 1:
            raise InputError(
                f"the calls have different numbers of samples {sorted(sizes)}: read "
                "record.calls one by one."
            )
        return torch.stack([c.info.converged_mask for c in self.calls])

    @property
    def unconverged(self) -> int:
        """Samples, over all calls, whose forward solve missed the tolerance."""
        return sum(c.info.unconverged for c in self.calls)


@contextlib.contextmanager
def convergence(
    policy: Convergence | str = "best", *, warn: bool = False
) -> Iterator[ConvergenceRecord]:
    """Solve every :class:`~deqhess.nn.DEQ` call in the block under ``policy``, recorded.

    Within the block every layer solves with ``policy`` instead of its own, and each
    call's per-sample outcome is recorded (warm starts and ``watch_accuracy`` of an
    enclosing :func:`layer_calls` block carry on).

    Args:
        policy: ``"best"`` (default: keep each sample's best iterate and mark it),
            ``"raise"``, ``"training"`` (``"best"``, and the backward's linear solves
            report their misses), or a :class:`deqhess.solvers.Convergence` (e.g. with
            fallback solvers).
        warn: with ``"best"``, also warn per call that missed (the record says it anyway).

    Yields:
        A :class:`ConvergenceRecord`, filled as the block's calls are made:
        ``record.converged_mask()`` is ``[calls, S]``.

    Example — Laplace sampling with a DEQ (``pred_type="nn"``), leaving out the samples
    whose cell does not converge::

        with deqhess.nn.convergence("best") as record:
            samples = la.predictive_samples(x, pred_type="nn", n_samples=100)  # [S, B, C]
        kept = record.converged_mask()[..., None]                                # [S, B, 1]
        probs = (samples * kept).sum(0) / kept.sum(0)
    """
    layer_policy = LayerPolicy.resolve(policy)
    if policy == "best":
        layer_policy = LayerPolicy(Convergence("best", warn=warn), layer_policy.linear)
    record = ConvergenceRecord()
    outer = CALLS.get()
    store, counts = (None, {}) if outer is None else (outer.store, outer.counts)
    watch = outer is not None and outer.watch_accuracy
    calls = Calls(store, record.calls, False, counts, layer_policy, watch_accuracy=watch)
    token = CALLS.set(calls)
    try:
        yield record
    finally:
        CALLS.reset(token)
