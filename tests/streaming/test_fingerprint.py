"""The fingerprints a pass is checked by: bitwise per sample, independent of the batch a
sample sits in, and a batch key that depends on the samples and their order."""

from __future__ import annotations

import torch

from deqhess.streaming import batch_key, response_sketch, sample_hashes
from deqhess.streaming.fingerprint import tensor_digests


def test_a_sample_hashes_alike_in_any_batch_and_differs_on_any_bit():
    x = torch.randn(6, 3, 2)
    y = torch.arange(6)
    whole = sample_hashes((x, y), 6)
    parts = torch.cat([sample_hashes((x[:4], y[:4]), 4), sample_hashes((x[4:], y[4:]), 2)])
    assert torch.equal(whole, parts)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(sample_hashes((x[order], y[order]), 6), whole[order])
    assert len(set(whole.tolist())) == 6
    nudged = x.clone()
    nudged[2, 1, 0] = torch.nextafter(nudged[2, 1, 0], torch.tensor(1.0))  # one ulp
    changed = sample_hashes((nudged, y), 6) != whole
    assert changed.tolist() == [False, False, True, False, False, False]
    assert not torch.equal(sample_hashes((x, y + 1), 6), whole)  # the target counts
    assert not torch.equal(sample_hashes((x.float(), y), 6), whole)  # so does the dtype


def test_shared_leaves_and_whole_batches():
    x, mask = torch.randn(4, 3), torch.ones(3)
    hashes = sample_hashes(((x, mask, "tag"), None), 4)
    assert not torch.equal(hashes, sample_hashes(((x, mask, "other"), None), 4))
    assert not torch.equal(hashes, sample_hashes(((x, 2 * mask, "tag"), None), 4))
    one = sample_hashes((x, None), 4, dim=None)  # the batch is one sample
    assert one.shape == (1,)
    assert not torch.equal(one, sample_hashes((x[[1, 0, 2, 3]], None), 4, dim=None))


def test_the_batch_key_holds_the_samples_in_order():
    hashes = sample_hashes(torch.randn(5, 2), 5)
    assert batch_key(hashes) == batch_key(hashes.clone())
    assert batch_key(hashes) != batch_key(hashes.flip(0))
    assert batch_key(hashes) != batch_key(hashes[:4])


def test_response_sketches():
    out = (torch.randn(4, 3), {"aux": torch.randn(4, 2, 2)})
    sketch = response_sketch(out, 4)
    assert sketch.shape == (4, 3) and sketch.dtype == torch.float64
    norms = torch.cat([out[0], out[1]["aux"].reshape(4, -1)], 1).double().norm(dim=1)
    assert torch.allclose(sketch[:, 2], norms)
    assert torch.equal(response_sketch(out, 4), sketch)  # fixed projections
    assert response_sketch((torch.randn(4, 3), torch.randn(3)), 4) is None  # no sample dim
    assert response_sketch(torch.arange(4), 4) is None  # nothing floating
    assert response_sketch(torch.randn(2, 5), 7, dim=None).shape == (1, 3)


def test_an_even_number_of_sign_flips_changes_the_hash():
    """A hash linear in the 64-bit words changed by 2⁶³ per flipped sign bit: two flips in
    a sample (``y.neg_()`` on a 2-d target, a float32 pair in the high halves of two
    words), or ``p.data.neg_()`` on a parameter, left it unchanged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g)
    y = torch.randn(5, 2, dtype=torch.float64, generator=g)
    whole = sample_hashes((x, y), 5)
    flip = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    for changed in ((x, -y), (x * flip, y)):
        assert (sample_hashes(changed, 5) != whole).all()
    single = x.float()
    pair = single * torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert (sample_hashes((pair, y), 5) != sample_hashes((single, y), 5)).all()
    p = torch.randn(1000, 3, dtype=torch.float64, generator=g)
    assert tensor_digests([p]) == tensor_digests([p.clone()])
    assert tensor_digests([-p])[0] != tensor_digests([p])[0]
    swapped = p.flatten().clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same words at other places
    assert tensor_digests([swapped])[0] != tensor_digests([p.flatten()])[0]


def test_a_strided_column_of_one_sample_hashes_as_its_copy():
    """A target column sliced from a table, ``Y[:, 0]`` of a batch of one (stride 5, which
    ``contiguous()`` keeps for a single element), was torch's "view Long as Byte" error."""
    table = torch.arange(10).reshape(2, 5)
    column = table[:1, 0]
    assert column.stride(0) == 5
    assert torch.equal(sample_hashes((column,), 1, 0), sample_hashes((column.clone(),), 1, 0))
