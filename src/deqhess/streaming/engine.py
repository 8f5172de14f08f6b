"""The one pass loop of every data-set operator: read, check, form, reduce.

The data-set loss is ``L(θ) = Σ_b w_b ℓ_b(θ)`` over batches ``b``, ``w_b = n_b / N``
for ``reduction="mean"`` (``ℓ_b`` a batch mean over its ``n_b`` samples, ``N`` the
total; so the result does not depend on how the data are cut into batches) and
``w_b = 1`` for ``"sum"``. Its gradient, Hessian and products are the same sums. A
:class:`Stream` computes one such sum per pass:

1. read a batch and fingerprint it (:func:`~deqhess.streaming.fingerprint.sample_hashes`):
   a sample the first pass did not read stops the pass
   (:class:`~deqhess.streaming.record.PassCheck`);
2. let the front end *form* the batch — solve its equilibria or run the model — from
   what the store kept of the same content (:class:`~deqhess.streaming.store.BatchStore`):
   a solved batch reused as is, or fixed points to start from;
3. check what the model returned on its samples against the first pass, and offer
   the store what the front end would keep;
4. add ``w_b · compute(batch)``; drop the batch before the next is read, so memory
   does not grow with the number of batches.

At the end of the pass the samples must be the first pass's (a multiset: order and
grouping are free); under ``torch.distributed`` the local sums are added over the ranks
(failures agreed, :mod:`deqhess.streaming.ranks`). Front ends
(:class:`deqhess.DatasetEquilibrium`, :class:`deqhess.ModelCurvature` and their
distributed forms) only form a batch and say what to compute on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from ..batches import Batches
from ..errors import DeqhessError, InputError, NonFiniteError
from .batch_checks import (
    check_target,
    check_unwritten,
    checked_count,
    note_non_finite_target,
    note_unbatched,
    plain_tensors,
    tensor_versions,
)
from .fingerprint import batch_key, response_sketch, sample_hashes, told_apart
from .notices import summarised
from .randomness import Draws, LoaderStream
from .ranks import agreed
from .record import PassCheck, PassRecord
from .store import BatchStore, Offer, StoredBatch

__all__ = ["REDUCTIONS", "Addend", "Batch", "Formed", "Stream", "check_reduction"]

#: how batches combine: the data mean of batch means, or the plain sum.
REDUCTIONS = ("mean", "sum")

Value = Tensor | tuple[Tensor, ...]


@runtime_checkable
class Addend(Protocol):
    """A batch's term that adds itself to the pass's sum, cheaper than as a tensor.

    E.g. :class:`deqhess.models.symmetric.SymmetricProduct`, a symmetric ``[P, P]`` matrix
    kept as its two ``[M, P]`` factors and added by its upper block triangle.
    """

    def add_to(self, total: Tensor | None, weight: float) -> Tensor:
        """``total + weight · self``, in place where ``total`` exists (None: zero)."""
        ...


def check_reduction(reduction: str) -> str:
    """Check how batches combine.

    Args:
        reduction: ``"mean"`` (the data mean of batch means) or ``"sum"``.

    Returns:
        ``reduction``, checked.

    Raises:
        InputError: another value.
    """
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}; use 'mean' or 'sum'.")
    return reduction


@dataclass(frozen=True)
class Batch:
    """One batch as a pass reads it.

    Attributes:
        index: its position in this pass.
        x, target: as the data give them (None on a pass that reads only the store).
        hashes: ``[n]`` its samples' fingerprints.
        key: its content key in the store.
    """

    index: int
    x: Any
    target: Any
    hashes: Tensor
    key: str


@dataclass
class Formed:
    """A batch formed by a front end, ready for products.

    Attributes:
        term: the front end's object (a solved batch, a batch's graph).
        samples: the samples it counts, ``n_b`` (those kept).
        kept: indices of the kept samples among the batch's (None: all).
        excluded: samples left out as unconverged.
        response: what the model returned on the kept samples (for the check; None:
            nothing to check, e.g. a stored solve reused as is).
        response_dim: the sample dimension of ``response`` (None: one sample).
        tolerance: the relative change of ``response`` that a re-solve may cause.
        offers: what the store may keep of the batch, in order of preference.
        coupled: whether the batch's term is not the plain sum (or mean) of its samples'
            own (a loss with class weights or coupling the samples), so that another
            grouping of the samples is another operator; None: not known (not checked).
        sized: whether the batch's term weighs its samples by the batch's size (their
            mean where the data set adds the batches, their sum where it averages
            them), so that a grouping into batches of other sizes is another operator;
            None: not known (not checked).
        ordered: whether the batch's term depends on the order of its samples (a term
            over consecutive samples), so that another order is another operator; None:
            not known (not checked).
    """

    term: Any
    samples: int
    kept: Tensor | None = None
    excluded: int = 0
    response: Any = None
    response_dim: int | None = 0
    tolerance: float = 0.0
    offers: tuple[Offer, ...] = ()
    coupled: bool | None = None
    sized: bool | None = None
    ordered: bool | None = None


class Stream:
    """One pass per sum over ``data``, every pass checked against the first.

    Args:
        data: ``(x, target)`` batches (see :class:`deqhess.batches.Batches`).
        label: the front end's name, for messages.
        evaluated: what the front end evaluates on a batch, for messages (e.g. "the
            model", "f").
        reduction: ``"mean"`` or ``"sum"``.
        count: ``x ↦`` the batch's sample count, for the fingerprints.
        sample_dim: the sample dimension of the batch's tensors (None: each batch is
            one sample).
        cache_bytes: the store's budget (see :class:`~deqhess.streaming.store.BatchStore`).
        progress: progress bars (None: only on a terminal).
        group: a ``torch.distributed`` process group to sum over (None: this process
            alone); ``data`` is then this rank's shard.
        device: where the reduced sums live (the parameters').
        guard: a context manager entered around every pass (e.g. the model's checks).
        version: ``() ↦`` a token of what is evaluated (e.g. the model's parameters'
            versions); a pass that finds it changed since the first pass starts afresh:
            it becomes the first pass (the checks and the store restart).
        on_restart: called when that happens (before the pass).
        lock: ``() ↦`` a context manager held around every pass (None: none), e.g. the
            model's modules' locks (:func:`deqhess.locking.modules_locked`): passes
            over one model, or over models that share a module, take turns.
    """

    def __init__(
        self,
        data: Iterable[tuple[Any, Any]],
        *,
        label: str,
        evaluated: str = "the model",
        reduction: str,
        count: Callable[[Any], int],
        sample_dim: int | None,
        cache_bytes: int,
        progress: bool | None,
        group: Any = None,
        device: torch.device | None = None,
        guard: Callable[[], contextlib.AbstractContextManager] | None = None,
        version: Callable[[], Any] | None = None,
        on_restart: Callable[[], None] | None = None,
        lock: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.data = Batches(data)
        self.lock = lock if lock is not None else contextlib.nullcontext
        self.label, self.evaluated = label, evaluated
        self.reduction = check_reduction(reduction)
        self.count, self.sample_dim = count, sample_dim
        self.store = BatchStore(cache_bytes)
        self.loader = LoaderStream()  # the loader's draws, apart from the user's
        self.progress, self.group = progress, group
        self.device = device or torch.device("cpu")
        self.guard = guard or contextlib.nullcontext
        self.version, self.on_restart = version, on_restart
        self._token: Any = None
        self.record: PassRecord | None = None
        # over every rank, once the first pass ran: N (samples kept), batches, excluded
        self.num_samples: int | None = None
        self.total_batches: int | None = None
        self.excluded_samples = 0
        self._excluded = 0  # this process's, in the first pass

    def restart(self) -> None:
        """Forget the first pass and everything stored: the next pass is a first pass."""
        self.record, self.num_samples, self.total_batches = None, None, None
        self.excluded_samples = 0
        self.store = BatchStore(self.store.budget)

    def _restart_if_changed(self) -> None:
        """Restart (on every rank alike) if what is evaluated changed since the last pass."""
        if self.version is None:
            return
        token = self.version()
        changed = self.record is not None and token != self._token
        if self.group is not None:
            flag = torch.tensor([float(changed)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            changed = bool(flag.item())
        self._token = token
        if changed:
            self.restart()
            if self.on_restart is not None:
                self.on_restart()

    @property
    def num_batches(self) -> int | None:
        """This process's batches, once the first pass ran."""
        return None if self.record is None else self.record.batches

    def run(
        self,
        form: Callable[[Batch, StoredBatch | None], Formed | None],
        compute: Callable[[Any], Value | Addend | None],
        empty: Callable[[], Value] | None = None,
        desc: str | None = None,
    ) -> Value | None:
        """One pass over the data: ``Σ_b w_b compute(term_b)``, summed over the ranks.

        Every batch is checked against the first pass (its samples as it is read, the
        model's response once formed); a failure on any rank raises on every rank.

        Args:
            form: ``(batch, stored) ↦`` the batch formed (None: every sample excluded).
            compute: ``term ↦`` the batch's unweighted derivative (a tensor, a tuple
                of them, or an :class:`Addend`), or None.
            empty: the zero of the sum, for a rank or a data set without batches.
            desc: the progress bar's label (None: no bar).

        Returns:
            The weighted sum over every batch of every rank (``w_b = n_b / N`` for
            ``"mean"``, 1 for ``"sum"``), shaped like ``compute``'s values; ``empty()``
            where there is no batch; None when ``compute`` returns None (a pass for its
            side effects). Torch's random state is the user's again at its end (the
            loader's draws continue in a stream of their own,
            :class:`~deqhess.streaming.randomness.LoaderStream`).
        """
        # one pass at a time (a model's: its pass swaps its parameters); out of inference
        # mode, whose tensors autograd cannot save (the derivatives' graphs need them)
        with self.lock(), torch.inference_mode(False):
            return self._run(form, compute, empty, desc)

    def _run(
        self,
        form: Callable[[Batch, StoredBatch | None], Formed | None],
        compute: Callable[[Any], Value | Addend | None],
        empty: Callable[[], Value] | None,
        desc: str | None,
    ) -> Value | None:
        self._restart_if_changed()

        def local() -> tuple[Value | None, int]:
            return self._pass(form, compute, desc)

        if self.group is None:
            total, samples = local()
        else:
            total, samples = agreed(local, self.group, self.device)
        if self.num_samples is None:
            assert self.record is not None  # the first pass has just recorded itself
            counts = self._summed_counts(samples, self.record.batches, self._excluded)
            self.num_samples, self.total_batches, self.excluded_samples = counts
        if total is None and empty is not None and (self.group is not None or not samples):
            total = empty()
        if total is None:
            return None
        if self.group is not None:
            total = self._all_reduced(total)
        if self.reduction == "mean" and self.num_samples:
            for part in total if isinstance(total, tuple) else (total,):
                part.div_(self.num_samples)
        return total

    # ------------------------------------------------------------------ one pass
    def _pass(self, form, compute, desc) -> tuple[Value | None, int]:
        check = PassCheck(self.record, self.label)
        total: Value | None = None
        samples = excluded = 0
        read: list[int] = []
        with self.loader.reading(), summarised(self.label, read), self.guard():
            draws = Draws()
            current: Batch | None = None
            try:
                for batch, stored in self._bar(self._batches(check), desc):
                    current = batch
                    if self.sample_dim is not None and len(batch.hashes) == 0:
                        check.responded(batch.hashes, None, 0.0, batch.key)
                        continue  # an empty batch: nothing to add
                    draws.mark()  # the loader may draw (shuffling); the model may not
                    inputs = tensor_versions((batch.x, batch.target))
                    formed = form(batch, stored)
                    draws.check(self.evaluated)
                    check_unwritten(inputs, self.evaluated)
                    if formed is None:
                        check.responded(batch.hashes[:0], None, 0.0, batch.key)
                        excluded += len(batch.hashes)
                        continue
                    self._check_and_store(check, batch, stored, formed)
                    samples += formed.samples
                    excluded += formed.excluded
                    weight = formed.samples if self.reduction == "mean" else 1.0
                    value = compute(formed.term)
                    draws.check(self.evaluated)
                    check_unwritten(inputs, self.evaluated)
                    del formed
                    if value is not None:
                        total = _accumulate(total, value, weight)
            except DeqhessError as error:
                if current is not None:
                    note_unbatched(error, current.index, current.x, current.target, self.sample_dim)
                    if isinstance(error, NonFiniteError):
                        note_non_finite_target(error, current.index, current.target)
                raise
            read.append(check.batches)
        record = check.finish()
        if record is not None:
            self.record, self._excluded = record, excluded
            if self.data.one_shot and self.store.solved_count() < record.batches:
                raise InputError(
                    f"data is a one-shot iterator ({type(self.data.data).__name__}), but every "
                    "pass reads the data once and "
                    f"the cache holds only {self.store.solved_count()} of {record.batches} "
                    f"batches (cache_bytes={self.store.budget:,}). Pass a list or a "
                    "DataLoader, or a larger cache_bytes."
                )
        return total, samples

    def _batches(self, check: PassCheck) -> Iterator[tuple[Batch, StoredBatch | None]]:
        """Each batch of the pass with what the store holds of its content."""
        if self.record is not None and self.data.one_shot:  # the data are gone: the store
            for index, entry in enumerate(self.store.entries()):
                check.read(entry.hashes)
                yield Batch(index, None, None, entry.hashes, ""), entry
            return
        for index, (x, target) in enumerate(self.data):
            x, target = plain_tensors(x), plain_tensors(target)
            dim = self.sample_dim
            samples = (
                checked_count(index, x, target, self.count(x), dim, self.count)
                if dim is not None
                else 1
            )
            check_target(index, x, target, samples, dim)
            hashes = sample_hashes((x, target), samples, dim)
            check.read(hashes, told_apart=told_apart((x, target), samples, dim))
            key = batch_key(hashes)
            yield Batch(index, x, target, hashes, key), self.store.get(key)

    def _check_and_store(
        self, check: PassCheck, batch: Batch, stored: StoredBatch | None, formed: Formed
    ) -> None:
        kept = batch.hashes if formed.kept is None else batch.hashes[formed.kept.cpu()]
        reused = stored is not None and stored.solved is formed.term
        sketch = None
        if not reused and formed.response is not None:
            sketch = response_sketch(formed.response, len(kept), formed.response_dim)
        check.responded(kept, sketch, formed.tolerance, batch.key)
        check.grouped(kept, formed.coupled, formed.ordered, formed.sized)
        if stored is None and formed.offers and batch.key:
            self.store.offer(batch.key, batch.hashes, formed.offers)

    def _bar(self, items: Iterable, desc: str | None) -> Iterable:
        if desc is None:
            return items
        total = self.num_batches
        if total is None:
            try:
                total = len(self.data)
            except TypeError:  # a generator, or a view of one
                total = None
        disable = None if self.progress is None else not self.progress
        return tqdm(items, desc=desc, total=total, disable=disable, leave=False)

    # ------------------------------------------------------------------ ranks
    def _summed_counts(self, *counts: int) -> tuple[int, ...]:
        """``counts`` added over the ranks."""
        if self.group is None:
            return counts
        summed = torch.tensor([float(c) for c in counts], device=self.device)
        dist.all_reduce(summed, group=self.group)
        return tuple(int(c) for c in summed.tolist())

    def _all_reduced(self, total: Value) -> Value:
        parts = total if isinstance(total, tuple) else (total,)
        for part in parts:
            dist.all_reduce(part, group=self.group)
        return total


def _accumulate(total: Value | None, value: Value | Addend, weight: float) -> Value:
    """``total + weight · value``, in place where ``total`` exists (``value`` is dropped)."""
    if isinstance(value, Addend):
        return value.add_to(cast(Tensor | None, total), weight)
    if total is None:
        return tuple(v * weight for v in value) if isinstance(value, tuple) else value * weight
    totals = total if isinstance(total, tuple) else (total,)
    values = value if isinstance(value, tuple) else (value,)
    for t, v in zip(totals, values, strict=True):  # compute's structure, every batch
        t.add_(v, alpha=weight)
    return total
