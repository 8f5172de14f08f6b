"""``all_finite`` and ``require_finite``: one sum decides the common case; the entrywise
check decides the rest."""

from __future__ import annotations

import pytest
import torch

import deqhess as dh
from deqhess.finiteness import all_finite
from deqhess.implicit.finite import require_finite


def test_finite_entries_whose_sum_overflows_pass():
    """1e308 + 1e308 overflows to inf though both entries are finite: the sum alone would
    call them non-finite, so the entrywise check must decide."""
    value = torch.tensor([1e308, 1e308, -1.0], dtype=torch.float64)
    assert require_finite(value, "the Hessian") is value


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"]
)
def test_one_non_finite_entry_among_many_is_caught(bad):
    """NaN and ±inf propagate through the sum (inf − inf is NaN), so a single one is
    found however many finite entries surround it, including an opposite infinity."""
    value = torch.ones(300, 7, dtype=torch.float64)
    value[123, 4] = bad
    with pytest.raises(dh.NonFiniteError, match=r"^the Hessian has 1 non-finite entries of 2100"):
        require_finite(value, "the Hessian")
    value[5, 0] = -bad if bad == bad else bad
    with pytest.raises(dh.NonFiniteError, match=r"has 2 non-finite entries of 2100 \(first at "):
        require_finite(value, "the Hessian")


def test_all_finite_on_other_dtypes():
    """Integer and boolean tensors cannot hold NaN; float32 sums overflow sooner (3e38)."""
    assert all_finite(torch.tensor([1, 2, 3])) and all_finite(torch.tensor([True]))
    assert all_finite(torch.full((4,), 3e38, dtype=torch.float32))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float32))
    assert all_finite(torch.empty(0))
