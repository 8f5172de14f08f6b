"""What a pass checks of each batch it reads (:mod:`deqhess.streaming.batch_checks`)."""

from __future__ import annotations

import pytest
import torch

from deqhess.errors import InputError
from deqhess.streaming.batch_checks import checked_count, plain_tensors


def test_a_count_is_an_int_the_batch_does_not_contradict():
    x, y = (torch.randn(5, 3), torch.randn(5, 2)), torch.randn(5)
    assert checked_count(0, x, y, 5, 0) == 5
    with pytest.raises(InputError, match=r"=len counts the 2 entries of x \(tuple\), but every"):
        checked_count(0, x, y, len(x), 0, len)  # batch_size_fn=len on a tuple of inputs
    assert checked_count(0, x, y, 2, 0) == 2  # another function's count is the user's
    for bad in (5.0, -1, "5", None):
        with pytest.raises(InputError, match="non-negative int"):
            checked_count(0, x, y, bad, 0)
    assert checked_count(0, x, y, torch.tensor(5), 0) == 5  # a 0-dim integer tensor
    # tensors that disagree among themselves (a graph batch: nodes, edges, graphs) or a
    # broadcast target leave the count to the user
    graph = {"nodes": torch.randn(11, 4), "edges": torch.zeros(2, 20, dtype=torch.long)}
    assert checked_count(0, graph, torch.randn(3), 3, 0) == 3
    points = (torch.randn(14, 3), torch.zeros(14, dtype=torch.long))  # 3 point clouds
    assert checked_count(0, points, torch.randn(14, 2), 3, 0) == 3  # per-point targets
    assert checked_count(0, torch.randn(5, 3), y, len(torch.randn(5, 3)), 0, len) == 5
    assert checked_count(0, torch.randn(1, 3), torch.randn(1, 2), 4, 0) == 4
    assert checked_count(0, ["tokens", "of", "text"], None, 3, 0) == 3


def test_inference_mode_tensors_come_back_plain_and_others_as_they_are():
    with torch.inference_mode():
        frozen = torch.randn(3)
    plain = torch.randn(3)
    out = plain_tensors({"a": frozen, "b": [plain, 2]})
    assert not out["a"].is_inference() and torch.equal(out["a"], frozen)
    assert out["b"][0] is plain and out["b"][1] == 2
    batch = (plain, {"c": plain})
    assert plain_tensors(batch) is batch
