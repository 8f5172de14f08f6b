"""The data-pass helpers: batch equality, byte counts and the budgeted cache."""

from __future__ import annotations

import pytest
import torch

from deqhess.batches import (
    BatchCache,
    Batches,
    RankShard,
    held_bytes,
    same_batch,
    saved_activation_bytes,
)


def test_same_batch_compares_structures_exactly():
    a = torch.arange(6.0).reshape(2, 3)
    assert same_batch((a, {"y": a + 1, "n": None}), (a.clone(), {"y": a + 1, "n": None}))
    assert not same_batch(a, a + 1e-12)
    assert not same_batch(a, a.float().to(torch.float32))
    assert not same_batch((a, a), [a])
    assert not same_batch({"y": a}, {"z": a})
    assert not same_batch(a, "a")

    class Odd:  # equality that is not a bool: never taken as equal
        def __eq__(self, other):
            raise TypeError("no")

    assert not same_batch(Odd(), Odd())


def test_held_bytes_counts_each_storage_once():
    a = torch.zeros(100, dtype=torch.float64)

    class Holder:
        def __init__(self):
            self.view, self.full, self.more = a[:10], a, [torch.zeros(5, dtype=torch.float32)]

    assert held_bytes(Holder(), (a,)) == 800 + 20


def test_saved_activation_bytes():
    x = torch.randn(4, 3, dtype=torch.float64)
    assert saved_activation_bytes(lambda t: torch.tanh(t @ t.T), x) >= 2 * 4 * 3 * 8

    def uses_torch_func(t):
        return torch.func.grad(lambda u: u.pow(3).sum())(t)

    assert saved_activation_bytes(uses_torch_func, x) is None


def test_cache_keeps_a_prefix_within_its_budget():
    cache = BatchCache(250)
    x = torch.ones(3)
    assert cache.offer(0, x, None, "a", lambda: 100) and cache.offer(1, x, None, "b", lambda: 100)
    assert not cache.offer(2, x, None, "c", lambda: 100)
    assert not cache.offer(3, x, None, "d", lambda: 1)  # closed: a prefix only
    cache.seal(4)
    assert not cache.complete and len(cache) == 2 and cache.used == 200
    assert cache.get(1, x.clone(), None) == "b" and cache.get(1, x + 1, None) is None
    assert list(cache.values()) == ["a", "b"]
    with pytest.raises(ValueError, match="cache_bytes must be a non-negative int"):
        BatchCache(1.5)


def test_rank_shard_and_pair_check():
    data = [(i, None) for i in range(5)]
    assert [x for x, _ in RankShard(data, 1, 2)] == [1, 3]
    assert [x for x, _ in RankShard(data, 1, 2)] == [1, 3]  # re-iterable
    with pytest.raises(ValueError, match=r"\(x, target\) pair; got int\."):
        list(Batches([1]))
