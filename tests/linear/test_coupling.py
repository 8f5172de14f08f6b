"""The coupling probes' row checks (``deqhess.linear.coupling``)."""

from __future__ import annotations

import pytest
import torch

from deqhess.linear.coupling import probe_scales, scaled_discrepancy, scales_exactly


@pytest.mark.parametrize(("dtype", "size"), [(torch.float64, 1e-160), (torch.float32, 1e-23)])
def test_a_leak_between_tiny_rows_is_seen_entry_by_entry(dtype, size):
    """Rows of 1e-160 (float64) or 1e-23 (float32): the squares in the rows' norms
    underflow, so the relative discrepancy of a 50% leak reads 0; compared entry by entry
    the leak is plain, and rows kept apart still pass."""
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(5, 3, generator=g, dtype=torch.float64) * size).to(dtype)
    scales = probe_scales(5, dtype, rows.device)  # [L, 5]
    apart = scales[:, :, None] * rows[None]
    assert scales_exactly(rows, apart, scales)
    leaked = apart.clone()
    leaked[:, 1] += 0.5 * apart[:, 0]  # row 1 takes half of row 0's scaled product
    assert not scales_exactly(rows, leaked, scales)
    assert bool((scaled_discrepancy(rows, leaked, scales) == 0).all())  # what norms read


def test_non_finite_products_do_not_scale_exactly():
    rows = torch.ones(3, 2, dtype=torch.float64)
    scales = probe_scales(3, torch.float64, rows.device)
    scaled = scales[:, :, None] * rows[None]
    scaled[0, 0, 0] = float("nan")
    assert not scales_exactly(rows, scaled, scales)
