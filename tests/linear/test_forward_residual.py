"""The relative residual the forward solve left, which the error bound amplifies."""

from __future__ import annotations

import pytest
import torch

from deqhess.linear.accuracy import forward_residual
from deqhess.solvers import Tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_forward_residual_is_relative_to_each_row_of_the_state(dtype):
    """Rows of norm 2, 2e-3 and 2e-8 with ``rtol = atol = 1e-10``: the first meets
    ``rtol·‖h‖``, the others ``atol`` — and keep ``‖r‖/‖h‖`` = 2.5e-11, 4e-8 and 4e-3,
    not ``rtol`` (the bound had said 1e-10 for all three, while the smallest row's
    error was 4e-3 of it)."""
    h = torch.tensor([[2.0, 0.0], [0.0, 2e-3], [2e-8, 0.0]], dtype=dtype)
    tolerance = Tolerance(rtol=1e-10, atol=1e-10)
    expect = [5e-11 / 2.0, 8e-11 / 2e-3, 8e-11 / 2e-8]
    for rows in ([0], [0, 1], [0, 1, 2]):
        accepted = torch.tensor([5e-11, 8e-11, 8e-11], dtype=dtype)[rows]
        got = forward_residual(accepted, h[rows], tolerance)
        assert got == pytest.approx(max(expect[r] for r in rows), rel=1e-6)


def test_an_unconverged_row_counts_its_threshold_and_a_residual_as_large_as_its_row_one():
    """A row the solve left unconverged (its failure is the forward policy's to report)
    counts as its threshold over its norm; a row whose residual is as large as itself (a
    zero state that f moves) counts as 1: no correct digit. A residual of 0 on a zero
    state counts as 0."""
    tolerance = Tolerance(rtol=1e-6, atol=1e-8)
    h = torch.tensor([[3.0, 4.0], [3e-4, 4e-4]], dtype=torch.float64)
    unconverged = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert forward_residual(unconverged, h, tolerance) == pytest.approx(1e-8 / 5e-4)
    zero = torch.zeros(2, 3, dtype=torch.float64)
    assert forward_residual(torch.tensor([1e-9, 0.0], dtype=torch.float64), zero, tolerance) == 1
    assert forward_residual(torch.zeros(2, dtype=torch.float64), zero, tolerance) == 0
    assert forward_residual(torch.zeros(0), torch.zeros(0, 3), tolerance) == 0
