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
from collections.abc import Iterator
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
    "convergence",
    "layer_calls",
    "warm_starts",
]


@dataclass(frozen=True)
class LayerCall:
    """One call of a :class:`DEQ` recorded by :func:`layer_calls`: the layer and its
    forward solve's statistics (``info.converged_mask`` marks the samples that met the
    tolerance)."""

    layer: DEQ
    info: SolveInfo


@dataclass
class Calls:
    """What :func:`layer_calls` asks of the DEQ calls in its block."""

    store: dict | None
    records: list[LayerCall] | None
    keep_best: bool
    counts: dict[int, int] = field(default_factory=dict)
    #: a policy replacing every layer's own (:func:`convergence`), or None
    policy: LayerPolicy | None = None
    #: directions each derivative pass pushes through the layers (a curvature operator's
    #: block), for their ``"auto"`` linear solver; None: a training step's few
    directions: int | None = None


CALLS: ContextVar[Calls | None] = ContextVar("deqhess_layer_calls", default=None)


@contextlib.contextmanager
def layer_calls(
    *,
    warm: dict | None = None,
    records: list[LayerCall] | None = None,
    keep_best: bool = False,
    directions: int | None = None,
) -> Iterator[None]:
    """Within the block, every :class:`DEQ` call (outside ``torch.func`` transforms):

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
    """
    token = CALLS.set(Calls(warm, records, keep_best, directions=directions))
    try:
        yield
    finally:
        CALLS.reset(token)


@contextlib.contextmanager
def warm_starts(store: dict) -> Iterator[None]:
    """:func:`layer_calls` with ``warm=store`` alone: within the block, a :class:`DEQ`
    called without ``h0`` starts from the fixed point it reached on the same call in
    ``store`` last time, and records the new one there. Meant for re-running the same
    forward many times (a curvature operator's passes over the data, one ``store`` per
    batch)."""
    with layer_calls(warm=store):
        yield


@dataclass
class ConvergenceRecord:
    """The calls made inside a :func:`convergence` block, in order."""

    calls: list[LayerCall] = field(default_factory=list)

    def converged_mask(self) -> Tensor:
        """``[calls, S]``: per call, which samples' forward solves met the tolerance —
        with one layer called once per sampled weight, row ``s`` is sample ``s``'s.

        Raises:
            ValueError: no call, or calls of different batch sizes (read ``calls``).
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
    """Within the block every :class:`~deqhess.nn.DEQ` layer solves with ``policy`` instead
    of its own, and each call's per-sample outcome is recorded (warm starts of an
    enclosing :func:`layer_calls` block carry on).

    Args:
        policy: ``"best"`` (default: keep each sample's best iterate and mark it),
            ``"raise"``, ``"training"`` (``"best"``, and the backward's linear solves
            report their misses), or a :class:`deqhess.solvers.Convergence` (e.g. with
            fallback solvers).
        warn: with ``"best"``, also warn per call that missed (the record says it anyway).

    Yields:
        a :class:`ConvergenceRecord`: ``record.converged_mask()`` is ``[calls, S]``.

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
    token = CALLS.set(Calls(store, record.calls, False, counts, layer_policy))
    try:
        yield record
    finally:
        CALLS.reset(token)
