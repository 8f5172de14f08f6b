"""The views of the data a pass reads, and the byte counts that budget what it keeps."""

from __future__ import annotations

import pytest
import torch

from deqhess.batches import Batches, RankShard, held_bytes, saved_activation_bytes


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


def test_rank_shard_and_pair_check():
    data = [(i, None) for i in range(5)]
    assert [x for x, _ in RankShard(data, 1, 2)] == [1, 3]
    assert [x for x, _ in RankShard(data, 1, 2)] == [1, 3]  # re-iterable
    with pytest.raises(ValueError, match=r"pair; got int: pass a list of \(x, target\) pairs"):
        list(Batches([1]))
