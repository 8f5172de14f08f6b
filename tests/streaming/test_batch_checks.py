"""What a pass checks of each batch it reads (:mod:`deqhess.streaming.batch_checks`)."""

from __future__ import annotations

import pytest
import torch

from deqhess.errors import InputError
from deqhess.streaming.batch_checks import checked_count, plain_tensors, refuse_mixed_dtypes


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


def test_a_type_error_on_data_of_another_dtype_is_named_with_both_dtypes():
    x, y = (torch.randn(4, 3, dtype=torch.float32),), torch.randn(4, 2, dtype=torch.float16)
    raw = RuntimeError("mat1 and mat2 must have the same dtype, but got Float and Double")
    with pytest.raises(InputError, match="batch 3 of this pass holds float16 and float32") as e:
        refuse_mixed_dtypes(raw, 2, x, y, torch.float64)
    assert "x.to(torch.float64)" in str(e.value) and e.value.__cause__ is raw
    # another error, or data of the parameters' dtype (integer labels aside): left as it is
    refuse_mixed_dtypes(RuntimeError("shapes cannot be multiplied"), 0, x, y, torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    refuse_mixed_dtypes(raw, 0, x[0].double(), labels, torch.float64)  # (no raise)
