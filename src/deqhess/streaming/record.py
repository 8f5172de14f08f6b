"""What the first pass over the data saw, and the check that every later pass sees it too.

The first pass records the multiset of its sample hashes (every sample read) and, for
the samples it kept, a sketch of what the model returned on each
(:mod:`deqhess.streaming.fingerprint`). A later pass is checked batch by batch — a
sample the first pass never read stops it at once — and at its end — the same
multiset of samples. A kept sample whose response moved by more than the batch's
tolerance means the model is not the same function on every pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import DataChangedError, ModelChangedError
from .fingerprint import batch_key

__all__ = ["PassCheck", "PassRecord", "response_tolerance"]

_FIX = (
    "Pass data that give the same samples on every read: a list of batches, or a "
    "DataLoader with shuffle=False (or drop_last=False) and no random transforms "
    "(augment once, before building the operator; a fixed torch.utils.data.Subset for a "
    "subset). After changing the data, build a new operator."
)

_MODEL_FIX = (
    "The model must be the same function on every pass: no module that draws random "
    "numbers (dropout, noise) or uses batch statistics (put them in eval() mode), no "
    "state the forward updates, and, if it couples the samples of a batch, batches that "
    "are the same on every pass (shuffle=False). A change made on purpose between calls "
    "(a plain attribute of a module, a function the forward calls) makes another model: "
    "build a new operator for it."
)


#: why a regrouping is another operator: a loss that couples the samples
_COUPLED = (
    "the loss is not the plain sum (or mean) of its samples' own losses (class weights or "
    "ignore_index in a cross-entropy, a term coupling the samples, or a tensor of the "
    "model's output without sample rows — a batch statistic, or a penalty returned beside "
    "the per-sample output: checked on the first pass), so the data set's loss "
    "Σ_b w_b ℓ_b depends on the grouping and this pass is another operator. Batch the "
    "data the same way on every pass (shuffle=False, or a list of batches), or use a loss "
    "that is a plain mean of per-sample losses (a weight penalty belongs in the loss "
    "function, not the model's output)."
)

#: ... or one that weighs each sample by its batch's size (the first pass's sizes)
_SIZED = (
    "the loss weighs each sample by its batch's size — each batch's loss is the mean of "
    "its samples' own while the data set adds the batches (reduction='sum'), or their sum "
    "while it averages them ('mean') — and the first pass's batches held {} samples: "
    "regrouped into batches of other sizes, the data set's loss is another operator. Match "
    "the reductions (reduction='mean' with a mean-reduced loss, or 'sum' with a sum-reduced "
    "one), or batch the data the same way on every pass."
)


#: ... or batches of one on the first pass, where no coupling could show
_ONES = (
    "the first pass's batches held one sample each: what the loss makes of a batch of "
    "several (a mean or a sum of its samples' losses, a term coupling them) could not be "
    "checked there, and the data set's loss depends on it. Batch the data the same way on "
    "every pass (one sample a batch, or the same batches)."
)


@dataclass
class PassRecord:
    """The first pass: its samples (sorted hashes), and its kept samples' responses.

    Attributes:
        hashes: ``[N]`` sorted int64 hashes of every sample read.
        batches: the number of batches read.
        kept: ``[M]`` sorted hashes of the samples kept (not excluded).
        sketches: ``[M, 3]`` their response sketches (NaN where none was taken).
        whole: response sketches of batches that could not be told apart per sample,
            by batch key.
        groups: the keys of its batches' sample sets (kept samples, any order).
        sequences: the keys of its batches' kept samples in their order.
        coupled: whether some batch's term was not the plain sum (or mean) of its
            samples' own (:attr:`deqhess.streaming.Formed.coupled`).
        ordered: whether some batch's term depended on the order of its samples
            (:attr:`deqhess.streaming.Formed.ordered`).
        sized: whether some batch's term weighed its samples by the batch's size
            (:attr:`deqhess.streaming.Formed.sized`).
        sizes: the sizes of its batches (kept samples).
    """

    hashes: Tensor
    batches: int
    kept: Tensor
    sketches: Tensor
    whole: dict[str, tuple[Tensor, float]] = field(default_factory=dict)
    groups: frozenset[str] = frozenset()
    sequences: frozenset[str] = frozenset()
    coupled: bool = False
    ordered: bool = False
    sized: bool = False
    sizes: frozenset[int] = frozenset()

    @property
    def samples(self) -> int:
        """The number of samples the first pass read."""
        return len(self.hashes)


class PassCheck:
    """One pass's check against ``record`` (None: this is the first pass, which records).

    Args:
        record: the first pass's :class:`PassRecord`, or None.
        label: what the data feed (for messages), e.g. ``"ModelCurvature"``.
    """

    def __init__(self, record: PassRecord | None, label: str) -> None:
        self.record, self.label = record, label
        self.seen: list[Tensor] = []
        self.kept: list[Tensor] = []
        self.sketches: list[Tensor] = []
        self.whole: dict[str, tuple[Tensor, float]] = {}
        self.groups: set[str] = set()
        self.sequences: set[str] = set()
        self.coupled = False
        self.ordered = False
        self.sized = False
        self.sizes: set[int] = set()
        self.batches = 0
        self.unsplit = 0  # batches whose samples could not be told apart

    @property
    def samples(self) -> int:
        """The number of samples this pass has read so far."""
        return sum(len(h) for h in self.seen)

    def read(self, hashes: Tensor, told_apart: bool = True) -> None:
        """Note a batch read, checking its samples against the first pass's at once.

        Args:
            hashes: its ``[n]`` sample hashes.
            told_apart: whether they are each sample's own, or the whole batch's
                repeated (then a regrouped batch counts as changed; the message says so).

        Raises:
            DataChangedError: a sample the first pass did not read.
        """
        self.seen.append(hashes)
        self.batches += 1
        self.unsplit += not told_apart
        if self.record is None or len(hashes) == 0:
            return
        new = int((~_member(hashes, self.record.hashes)).sum())
        if new:
            raise DataChangedError(
                f"batch {self.batches} of this pass over the data of {self.label} holds "
                f"{new} of its {len(hashes)} samples that the first pass never read, so "
                "the data are not the same on every pass"
                f"{_cause(new, len(hashes))}.{self._hint()} {_FIX}",
                self.samples,
                self.record.samples,
                new,
            )

    def responded(self, hashes: Tensor, sketch: Tensor | None, tolerance: float, key: str) -> None:
        """Note what the model returned on a batch, checking it against the first pass.

        Args:
            hashes: the batch's kept samples ``[m]``.
            sketch: ``[m, 3]`` the sketch of what the model returned on them
                (:func:`~deqhess.streaming.fingerprint.response_sketch`), one row for the
                whole batch when its samples cannot be told apart, or None (nothing to
                compare).
            tolerance: how far a sketch may move, relative (see
                :func:`response_tolerance`).
            key: the batch's content key (whole-batch sketches are compared by it).

        Raises:
            ModelChangedError: a kept sample was left out as unconverged on the first
                pass (or the reverse), or a sketch moved past ``tolerance``.
        """
        self.kept.append(hashes)
        whole = False
        if sketch is not None and len(sketch) != len(hashes):  # one row for the batch
            whole = True
            self.whole[key] = (sketch, tolerance)
            sketch = None
        if sketch is None:
            sketch_rows = torch.full((len(hashes), 3), float("nan"), dtype=torch.float64)
        else:
            sketch_rows = sketch
        self.sketches.append(sketch_rows)
        if self.record is None:
            return
        if whole:
            previous = self.record.whole.get(key)
            if previous is not None:
                _compare(self.whole[key][0], previous[0], tolerance, self.label)
            return
        if sketch is None or len(hashes) == 0:
            return
        kept = self.record.kept.numpy()
        where = np.minimum(np.searchsorted(kept, hashes.numpy()), max(len(kept) - 1, 0))
        found = kept[where] == hashes.numpy() if len(kept) else np.zeros(len(hashes), bool)
        if not found.all():
            raise ModelChangedError(
                f"{int((~found).sum())} samples of {self.label}'s data were kept on this pass "
                "but left out as unconverged on the first (or the reverse): the model's "
                f"fixed points are not the same on every pass. {_MODEL_FIX}",
                int((~found).sum()),
            )
        _compare(sketch, self.record.sketches[torch.from_numpy(where)], tolerance, self.label)

    def grouped(
        self, hashes: Tensor, coupled: bool | None, ordered: bool | None = None,
        sized: bool | None = None,
    ) -> None:  # fmt: skip
        """Note the samples a batch's term groups, checking the grouping where it matters.

        Args:
            hashes: the batch's kept samples ``[m]``, in the batch's order.
            coupled: whether its term is not the plain sum (or mean) of its samples' own
                (None: not known).
            ordered: whether its term depends on the order of its samples (None: not
                known).
            sized: whether its term weighs its samples by the batch's size (None: not
                known).

        Raises:
            DataChangedError: the first pass found such a term and this batch groups
                samples no batch of the first pass grouped (a shuffling loader) — for a
                term weighed by size, unless every batch, of both passes, holds as many
                samples — or, for a term that depends on the order, orders them
                otherwise: the data-set sum then depends on it, and is another operator.
                Also a batch of several where every batch of the first pass held one (no
                coupling could show there).
        """
        record = self.record
        # every batch of the first pass held one sample: no coupling could show there
        ones = record is not None and record.sizes == {1} and len(hashes) != 1
        if record is not None and not (record.coupled or record.sized or ones):
            return  # any grouping is the same operator: nothing to compare
        key = batch_key(torch.sort(hashes).values)
        sequence = batch_key(hashes)
        if record is None:
            self.groups.add(key)
            self.sequences.add(sequence)
            self.sizes.add(len(hashes))
            self.coupled |= bool(coupled)
            self.ordered |= bool(ordered)
            self.sized |= bool(sized)
            return
        regrouped = key not in record.groups
        if ones:
            why = _ONES
        elif regrouped and record.coupled:
            why = _COUPLED
        elif regrouped and record.sized and record.sizes != {len(hashes)}:
            # weighed by size alone, batches all of the first pass's one size are the same
            why = _SIZED.format(sorted(record.sizes))
        else:
            why = None
        if why is not None:
            raise DataChangedError(
                f"batch {self.batches} of this pass over the data of {self.label} groups "
                f"its {len(hashes)} samples otherwise than any batch of the first pass, and " + why,
                self.samples,
                record.samples,
                -1,
            )
        if record.ordered and sequence not in record.sequences:
            raise DataChangedError(
                f"batch {self.batches} of this pass over the data of {self.label} holds "
                f"the samples of a batch of the first pass in another order, and the loss "
                "depends on the order of the samples within a batch (checked on the first "
                "pass: a term over consecutive samples, weights by position), so this pass "
                "is another operator. Feed the samples in the same order on every pass "
                "(shuffle=False, or a list of batches).",
                self.samples,
                record.samples,
                -1,
            )

    def _hint(self) -> str:
        if not self.unsplit:
            return ""
        return (
            f" ({self.unsplit} batches could not be told apart sample by sample: no tensor "
            "has as many entries as the batch has samples along the sample dimension, so "
            "regrouped batches count as changed; pass batch_dim= for the dimension that "
            "indexes the samples.)"
        )

    def finish(self) -> PassRecord | None:
        """End the pass: check it read what the first pass read.

        Returns:
            The first pass's :class:`PassRecord` when this is the first pass, else None.

        Raises:
            DataChangedError: another multiset of samples than the first pass's (new
                samples, or the same read more or fewer times).
            ModelChangedError: another set of samples kept as converged.
        """
        seen = torch.sort(torch.cat(self.seen) if self.seen else _empty()).values
        kept = torch.cat(self.kept) if self.kept else _empty()
        order = torch.argsort(kept)
        if self.record is None:
            return PassRecord(
                hashes=seen,
                batches=self.batches,
                kept=kept[order],
                sketches=torch.cat(self.sketches)[order] if self.sketches else _empty(0, 3),
                whole=self.whole,
                groups=frozenset(self.groups),
                sequences=frozenset(self.sequences),
                coupled=self.coupled,
                ordered=self.ordered,
                sized=self.sized,
                sizes=frozenset(self.sizes),
            )
        expected = self.record.hashes
        if len(seen) != len(expected) or not torch.equal(seen, expected):
            changed = int((~_member(seen, expected)).sum()) if len(expected) else len(seen)
            if len(seen) == len(expected) and not changed:
                how = (
                    f"the same {len(seen)} samples as the first pass but not as often each "
                    f"({_recounted(seen, expected)} of them are read more or fewer times: a "
                    "sampler with replacement?)"
                )
            else:
                how = (
                    f"{len(seen)} samples in {self.batches} batches, the first read "
                    f"{len(expected)} in {self.record.batches}"
                    + (f" ({changed} of this pass's samples are new)" if changed else "")
                )
            raise DataChangedError(
                f"this pass over the data of {self.label} read {how}, so the data are not the "
                f"same on every pass{_cause(changed, len(seen))}.{self._hint()} " + _FIX,
                len(seen),
                len(expected),
                changed,
            )
        if not torch.equal(torch.sort(kept).values, self.record.kept):
            raise ModelChangedError(
                f"this pass kept {len(kept)} of {self.label}'s samples as converged, the "
                f"first kept {len(self.record.kept)}: the model's fixed points are not the "
                f"same on every pass. {_MODEL_FIX}"
            )
        return None


def _recounted(seen: Tensor, expected: Tensor) -> int:
    """Return how many distinct samples occur a different number of times in the two."""
    now, first = (
        dict(zip(*(a.tolist() for a in np.unique(t.numpy(), return_counts=True)), strict=True))
        for t in (seen, expected)
    )
    return sum(1 for h in now.keys() | first.keys() if now.get(h) != first.get(h))


def _empty(*shape: int) -> Tensor:
    """Return an empty int64 hash vector, or (with ``shape``) zero float64 sketches."""
    if not shape:
        return torch.zeros(0, dtype=torch.int64)
    return torch.zeros(shape, dtype=torch.float64)


def _member(query: Tensor, sorted_: Tensor) -> np.ndarray:
    """``[len(query)]`` bool: whether each hash is in the sorted ``sorted_``."""
    if len(sorted_) == 0:
        return np.zeros(len(query), dtype=bool)
    values = sorted_.numpy()
    where = np.minimum(np.searchsorted(values, query.numpy()), len(values) - 1)
    return values[where] == query.numpy()


def _cause(changed: int, samples: int) -> str:
    """Return the likely cause of ``changed`` new samples among ``samples``, in words."""
    if changed and changed == samples:
        return (
            " — every sample differs: a random transform (augmentation) applied on every "
            "read, or data replaced after the operator was built"
        )
    if changed:
        return (
            " — some samples differ: a loader that draws another subset each pass "
            "(shuffle=True with drop_last=True, a random sampler), or data changed after "
            "the operator was built"
        )
    return ""


def _compare(now: Tensor, first: Tensor, tolerance: float, label: str) -> None:
    """Raise :class:`ModelChangedError` where a response sketch moved past tolerance."""
    now_, first_ = now.numpy(), first.numpy()
    valid = ~(np.isnan(now_).any(axis=1) | np.isnan(first_).any(axis=1))
    if not valid.any():
        return
    now_, first_ = now_[valid], first_[valid]
    scale = np.maximum(now_[:, 2], first_[:, 2])
    floor = 1e-3 * float(scale.mean()) + np.finfo(np.float64).tiny
    change = np.abs(now_ - first_).max(axis=1) / (scale + floor)
    moved = change > tolerance
    if moved.any():
        worst = float(change.max())
        raise ModelChangedError(
            f"the model returned other values on the same samples of {label}'s data than "
            f"on the first pass: {int(moved.sum())} samples moved, by up to {worst:.2e} "
            f"relative (more than the solves' tolerance allows, {tolerance:.0e}). " + _MODEL_FIX,
            int(moved.sum()),
            worst,
        )


def response_tolerance(rtol: float, dtype: torch.dtype) -> float:
    """How far a re-solved response may move from the first pass's, relative.

    A fixed point re-solved from another start agrees with the first to about
    ``‖(I − J)⁻¹‖`` times the solve's tolerance; dropout or batch statistics move a
    response by far more.

    Args:
        rtol: the solves' relative tolerance.
        dtype: the responses' dtype.

    Returns:
        A thousand times ``rtol``, and no less than 1e-9 (float64) or 1e-4 (float32),
        rounding.
    """
    floor = 1e-9 if dtype == torch.float64 else 1e-4
    return max(floor, 1e3 * rtol)
