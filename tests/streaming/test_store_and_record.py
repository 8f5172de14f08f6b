"""The store's budget and keys, and the pass record's diagnoses."""

from __future__ import annotations

import pytest
import torch

import deqhess as dh
from deqhess.streaming import BatchStore, Offer, PassCheck


def test_the_store_keeps_the_first_offer_that_fits_by_content_key():
    store = BatchStore(250)
    h = torch.zeros(2, dtype=torch.int64)
    heavy, light = Offer(lambda: 200, solved="solve"), Offer(lambda: 40, warm={"h": 1})
    assert store.offer("a", h, [heavy, light]).solved == "solve"
    assert store.offer("b", h, [heavy, light]).warm == {"h": 1}  # the heavy one no longer fits
    assert store.offer("c", h, [heavy]) is None
    assert store.used == 240 and len(store) == 2 and store.solved_count() == 1
    assert store.offer("a", h, [light]).solved == "solve"  # kept as first stored
    assert store.get("c") is None and [e.solved for e in store.entries()] == ["solve", None]
    with pytest.raises(ValueError, match="cache_bytes must be a non-negative int"):
        BatchStore(1.5)
    empty = BatchStore(0)
    assert empty.offer("a", h, [Offer(lambda: 0, warm={})]) is None


def _first(hashes_per_batch, kept_sketches=None):
    check = PassCheck(None, "X")
    for i, hashes in enumerate(hashes_per_batch):
        check.read(hashes)
        sketch = None if kept_sketches is None else kept_sketches[i]
        check.responded(hashes, sketch, 1e-7, f"k{i}")
    return check.finish()


def test_a_stored_entry_grows_within_the_budget_and_what_may_give_way_does():
    """``grow`` charges an entry more where it fits (the bytes lent elsewhere counted),
    gives bytes back, and where they do not fit drops the values that may give way, the
    entry's own first, until they do — or charges nothing."""
    store = BatchStore(100)
    a = store.offer("a", torch.zeros(1), [Offer(lambda: 10, warm={"h": 1})])
    b = store.offer("b", torch.zeros(1), [Offer(lambda: 10, warm={"h": 2})])
    assert store.grow(a, 30) and store.used == 50 and a.nbytes == 40
    a.warm["f"] = ("factors", 30)
    assert store.grow(b, 40) and store.used == 90
    b.warm["f"] = ("factors", 40)
    store.lent = lambda: 5
    assert not store.grow(a, 6) and store.used == 90  # 90 + 5 lent + 6 > 100
    assert store.grow(a, 5)
    store.lent = lambda: 0

    def give_way(value):
        return value[1] if isinstance(value, tuple) else None

    assert not store.grow(a, 200, give_way) and store.used == 25  # all given up, no room
    assert "f" not in a.warm and "f" not in b.warm and a.warm == {"h": 1}
    b.warm["f"] = ("factors", 40)
    assert store.grow(b, 40) and store.grow(a, -15) and store.used == 50
    assert store.grow(a, 60, give_way) and "f" not in b.warm and store.used == 70


def test_the_record_names_what_changed():
    batches = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    record = _first(batches)
    again = PassCheck(record, "X")  # the same samples, regrouped
    for hashes in (torch.tensor([5, 1]), torch.tensor([3, 2, 4])):
        again.read(hashes)
        again.responded(hashes, None, 1e-7, "")
    assert again.finish() is None
    with pytest.raises(dh.DataChangedError, match="every sample differs") as caught:
        PassCheck(record, "X").read(torch.tensor([7, 8]))
    assert caught.value.changed == 2 and caught.value.expected == 5
    with pytest.raises(dh.DataChangedError, match="some samples differ: a loader that draws"):
        PassCheck(record, "X").read(torch.tensor([1, 9]))
    fewer = PassCheck(record, "X")
    fewer.read(torch.tensor([1, 2, 3]))
    with pytest.raises(dh.DataChangedError, match="read 3 samples in 1 batches, the first read 5"):
        fewer.finish()
    repeated = PassCheck(record, "X")  # a sampler with replacement: 1 twice, 5 never
    repeated.read(torch.tensor([1, 1, 2, 3, 4]))
    with pytest.raises(dh.DataChangedError, match="the same 5 samples as the first pass but "
                       r"not as often each \(2 of them are read more or fewer times"):  # fmt: skip
        repeated.finish()
    unsplit = PassCheck(record, "X")
    with pytest.raises(dh.DataChangedError, match=r"could not be told apart.*pass batch_dim="):
        unsplit.read(torch.tensor([9, 9]), told_apart=False)


def test_responses_are_compared_per_sample_within_tolerance():
    hashes = torch.tensor([10, 20])
    sketch = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.1, 1.0]], dtype=torch.float64)
    record = _first([hashes], [sketch])
    close = PassCheck(record, "X")
    close.read(hashes.flip(0))
    close.responded(hashes.flip(0), sketch.flip(0) * (1 + 1e-9), 1e-7, "")
    assert close.finish() is None
    moved = PassCheck(record, "X")
    moved.read(hashes)
    shifted = sketch + torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0]])
    with pytest.raises(dh.ModelChangedError, match=r"1 samples moved, by up to 2\.00e-01") as err:
        moved.responded(hashes, shifted, 1e-7, "")
    assert err.value.samples == 1
