"""The GGN's Gram matrix from each sample's rows kept as outer products
(:mod:`deqhess.models.sample_gram`), against the rows' Gram matrix formed directly."""

from __future__ import annotations

import pytest
import torch
from problems import relative_error

from deqhess.models import sample_gram
from deqhess.models.sample_gram import SampleGram
from deqhess.models.sample_sites import SampleRows, Stacking
from deqhess.models.symmetric import mirror_upper_

#: a weight, its bias, a weight whose rows are given as rows, a bias, and a weight
SHAPES = (torch.Size([3, 4]), torch.Size([3]), torch.Size([2, 3]), torch.Size([2]),
          torch.Size([4, 2]))  # fmt: skip


def _batch(samples: int, rank: int, seed: int, outer: tuple[int, ...] = (0, 4)):
    """Random shares: outer products for ``outer``, two sites' rows for the 2-D rest."""
    g = torch.Generator().manual_seed(seed)
    factors, explicit = [], []
    for i, shape in enumerate(SHAPES):
        if i in outer:
            o, k = shape
            share = (
                torch.randn(samples, rank, o, generator=g),
                torch.randn(samples, k, generator=g),
            )
            rows = (share[0][:, :, :, None] * share[1][:, None, None, :]).reshape(
                samples * rank, -1
            )
            factors.append([share])
        else:
            first = torch.randn(samples, rank, shape.numel(), generator=g)
            second = torch.randn(samples, rank, shape.numel(), generator=g)
            rows = (first + second).reshape(samples * rank, -1)
            factors.append([first, second] if len(shape) == 2 else [first + second])
        explicit.append(rows)
    return SampleRows(factors, samples, rank), torch.cat(explicit, dim=1)


def _offsets():
    sizes = [s.numel() for s in SHAPES]
    return tuple(int(sum(sizes[:i])) for i in range(len(sizes) + 1))


@pytest.mark.parametrize("keep, budget", [(True, 1 << 22), (True, 30), (False, 1 << 22)])
def test_the_gram_of_outer_products_is_the_rows_gram(monkeypatch, keep, budget):
    """Batches of 3, 5 and 2 samples with 2, 3 and 1 rows each, weights 0.5, 1, 2; kept to
    the end, assembled early (a tiny budget), or batch by batch (``keep=False``); one
    batch's first weight arrives as rows (its blocks then from rows)."""
    monkeypatch.setattr(sample_gram, "BUDGET", budget)
    offsets = _offsets()
    p = offsets[-1]
    gram = SampleGram(offsets, SHAPES, Stacking(), keep=keep)
    total, expected = torch.zeros(p, p), torch.zeros(p, p)
    deferred = keep and budget > 1000  # the kept blocks are scaled when assembled
    mask = torch.zeros(p, p, dtype=torch.bool)
    for i in (0, 4):
        for j in (0, 4):
            mask[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = True
    for (samples, rank, weight, outer), seed in zip(
        [(3, 2, 0.5, (0, 4)), (5, 3, 1.0, (0, 4)), (2, 1, 2.0, (4,))], range(3), strict=True
    ):
        rows, explicit = _batch(samples, rank, seed, outer)
        gram.add(total, rows, weight)
        term = weight * explicit.T @ explicit
        if deferred and outer == (0, 4):
            term = torch.where(mask, 0.25 * term, term)
        expected += term
    gram.assemble(total, 0.25)  # the sum divided after the kept batches were added
    assert relative_error(mirror_upper_(total), expected) <= 1e-14
