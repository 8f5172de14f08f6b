"""Content fingerprints: of each sample of a batch, of a whole batch, and of a response.

A data-set operator is a fixed linear operator only if every pass sees the same samples
and the model returns the same thing on them. Both are checked from fingerprints that
cost a few integer operations per input byte:

* :func:`sample_hashes` — one 64-bit hash per sample of a batch's inputs and targets
  (bitwise: any change of a sample's bytes changes its hash, up to a 2⁻⁶⁴ chance). A
  pass's hashes form a multiset, so the order and grouping of batches do not matter.
* :func:`batch_key` — the batch as a whole, samples in order: the key under which a
  solved batch or its warm starts are stored, so a stored batch is reused only for
  the same content.
* :func:`tensor_digests` — one 64-bit hash of each of a few tensors' bytes (a model's
  parameters and buffers between passes: a write through ``.data`` leaves no version).
* :func:`response_sketch` — per sample, two fixed random projections and the norm of
  what the model returns (float64), compared with a tolerance because a re-solved
  fixed point agrees with the first only to the solver's tolerance.

The sample hash is ``Σⱼ mix(wⱼ ⊕ kⱼ) mod 2⁶⁴`` over the sample's 64-bit words ``wⱼ``,
with fixed random keys ``kⱼ`` (a different key sequence per leaf of the batch) and
``mix`` two rounds of SplitMix64's mixing (:func:`_mix_`), plus a hash of what is shared by the
batch (leaves without a sample dimension, dtypes and shapes). It runs on the batch's
own device. The mixing is what makes it a hash of the bytes: a sum ``Σⱼ wⱼ kⱼ`` linear
in the words had changed by ``2⁶³`` for each flipped sign bit, so an even number of sign
flips in a sample (``y.neg_()`` on a 2-d target; a random-sign augmentation) left it
unchanged.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = [
    "batch_key",
    "response_sketch",
    "sample_hashes",
    "tensor_digests",
    "told_apart",
    "unmatched_target",
]

_SEED = 0x5EED_DEC5


#: SplitMix64's multipliers, as signed 64-bit integers
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64


def _mix_(z: Tensor) -> Tensor:
    """Mix int64 words in place: two rounds of SplitMix64's ``z ^= z >>> s; z *= M``.

    Wrapping arithmetic; the logical shifts bring high bits down, the odd multipliers
    spread them up, so every input bit reaches the low bits of the result and no set of
    bit flips cancels in a sum of mixed words (up to a ``2⁻⁶⁴``-scale chance). In place,
    with one temporary: a few passes over the words.

    Returns:
        ``z``, mixed.
    """
    high = torch.bitwise_right_shift(z, 30)
    high &= (1 << 34) - 1  # torch's >> is arithmetic: keep the logical shift's bits
    z ^= high
    z *= _M1
    torch.bitwise_right_shift(z, 27, out=high)
    high &= (1 << 37) - 1
    z ^= high
    z *= _M2
    return z


@lru_cache(maxsize=64)
def _keys(words: int, leaf: int) -> Tensor:
    """``[words]`` fixed random int64 keys for leaf number ``leaf`` (CPU)."""
    generator = torch.Generator().manual_seed(_SEED + 1_000_003 * leaf + words)
    return torch.randint(-(2**63), 2**63 - 1, (words,), generator=generator, dtype=torch.int64)


#: words mixed at once: the mixing's passes over them stay in cache (256 KB)
_CHUNK = 2**15


def _keyed_sum(words: Tensor, keys: Tensor) -> Tensor:
    """``Σⱼ mix(wⱼ ⊕ kⱼ) mod 2⁶⁴`` along the last dimension of ``words`` (:func:`_mix_`).

    Args:
        words: ``[..., w]`` int64.
        keys: ``[w]`` int64.

    Returns:
        ``[...]``: the sums, taken over blocks of leading rows of about :data:`_CHUNK`
        words each (so the passes run in cache).
    """
    if words.ndim < 2:
        return _mix_(words ^ keys).sum(dim=-1)
    step = max(1, _CHUNK // max(words.shape[-1], 1))
    return torch.cat([_mix_(block ^ keys).sum(dim=-1) for block in words.split(step)])


def _words(rows: Tensor) -> Tensor:
    """``[n, w]`` int64 words of the bytes of ``rows`` ``[n, m]`` (zero-padded)."""
    # flattened first: a contiguous tensor may keep any stride along a dimension of size
    # 1 (a time-major [1, B] target moved sample-first), which view(uint8) refuses
    flat = rows.contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # one element per row, strided: contiguous
        flat = flat.clone(memory_format=torch.contiguous_format)
    raw = flat.view(torch.uint8).reshape(rows.shape[0], -1)
    pad = -raw.shape[1] % 8
    if pad:
        raw = torch.nn.functional.pad(raw, (0, pad))
    return raw.view(torch.int64)


def _digest(*parts: Any) -> int:
    """A signed 64-bit hash of ``parts``: tensors by their bytes, the rest by ``repr``."""
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().cpu().contiguous()
            hasher.update(repr((t.dtype, tuple(t.shape))).encode())
            hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            hasher.update(repr(part).encode())
    return int.from_bytes(hasher.digest()[:8], "little", signed=True)


def _sample_dim(leaf: Any, samples: int, dim: int) -> int | None:
    """The dimension of ``leaf`` that indexes the batch's samples.

    Returns:
        ``dim`` where ``leaf``'s size there is the sample count, else 0 where that is
        (the targets of time-major inputs are often sample-first), else None (not a
        tensor, or shared by the batch).
    """
    if not isinstance(leaf, Tensor):
        return None
    if leaf.ndim > dim and leaf.shape[dim] == samples:
        return dim
    if leaf.ndim > 0 and leaf.shape[0] == samples:
        return 0
    return None


def sample_hashes(batch: Any, samples: int, dim: int | None = 0) -> Tensor:
    """One 64-bit hash per sample of ``batch`` (e.g. ``(x, target)``).

    Args:
        batch: tensors, or tuples / lists / dicts of them and other values.
        samples: the batch's sample count ``n``.
        dim: the sample dimension of its tensors (None: the batch is one sample); a
            tensor whose size along ``dim`` is not ``n`` but whose first dimension is
            indexes its samples along that one. A tensor with neither, and every
            non-tensor, is shared by the batch: it enters every sample's hash.

    Returns:
        ``[samples]`` int64 on the CPU (``[1]`` when ``dim`` is None): a sample's hash
        depends on its own bytes and what the batch shares, not on the batch's size or
        the sample's position, so a pass's hashes form a multiset.
    """
    leaves, spec = tree_flatten(batch)
    per_sample = dim is not None
    # nothing that depends on the batch's size: a sample hashes alike in any batch
    shared: list[Any] = [repr(spec)] if per_sample else [repr(spec), samples]
    total: Tensor | None = None
    for index, leaf in enumerate(leaves):
        along = _sample_dim(leaf, samples, dim) if dim is not None and samples > 0 else None
        if along is not None:
            rows = leaf.detach().movedim(along, 0).reshape(samples, -1)
            shared.append(("rows", index, rows.dtype, tuple(leaf.movedim(along, 0).shape[1:])))
            if rows.shape[1] == 0:
                continue
            words = _words(rows)
            value = _keyed_sum(words, _keys(words.shape[1], index).to(words.device))
            total = value if total is None else total + value
        else:
            shared.append(("shared", index, leaf))
    context = _digest(*shared)
    count = samples if per_sample else 1
    device = next((t.device for t in leaves if isinstance(t, Tensor)), torch.device("cpu"))
    if total is None:
        total = torch.zeros(count, dtype=torch.int64, device=device)
    return (total + context).cpu()


def told_apart(batch: Any, samples: int, dim: int | None = 0) -> bool:
    """Whether :func:`sample_hashes` tells the samples of ``batch`` apart.

    Returns:
        True when some tensor has the samples along ``dim`` (or its first dimension),
        and no tensor that has a dimension of ``samples`` entries elsewhere is left
        shared by the batch (its samples would then be hashed together); True also for
        one sample or ``dim=None``.
    """
    if dim is None or samples <= 1:
        return True
    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
    split = [_sample_dim(t, samples, dim) is not None for t in tensors]
    unsplit = any(not s and samples in t.shape for t, s in zip(tensors, split, strict=True))
    return any(split) and not unsplit


def unmatched_target(x: Any, target: Any, samples: int, dim: int | None) -> int | None:
    """The target's sample count where it plainly differs from the input's.

    Checked only where both are tensors of the same number of dimensions (targets laid
    out otherwise — class indices, a shared target, sample-first targets of time-major
    inputs — are left to the loss): the target's size along ``dim`` is then neither the
    input's sample count, nor 1 (broadcast), nor is its first dimension the count.

    Args:
        x: the batch's input.
        target: the batch's target.
        samples: the input's sample count along ``dim``.
        dim: the sample dimension (None: nothing is checked).

    Returns:
        The target's size along ``dim`` where it disagrees, else None.
    """
    if dim is None or not isinstance(x, Tensor) or not isinstance(target, Tensor):
        return None
    if target.ndim != x.ndim or target.ndim <= dim or target.shape[dim] == 1:
        return None
    return None if _sample_dim(target, samples, dim) is not None else int(target.shape[dim])


#: words of the key block :func:`tensor_digests` cycles through (each cycle scaled by
#: its own odd factor, so no word shares another's key)
_CYCLE = 4096


def tensor_digests(tensors: list[Tensor]) -> tuple[int, ...]:
    """A 64-bit hash of each tensor's bytes, computed where it lives, read back at once.

    Its 64-bit words in cycles of :data:`_CYCLE`: ``Σⱼ mix(wⱼ ⊕ kⱼ)`` within each cycle
    (:func:`_mix_`, one fixed random block of keys), the cycles' sums weighted by
    ``2c + 1`` for cycle ``c``: any change of the bytes changes the hash up to a
    ``2⁻⁶⁴``-scale chance (``p.data.neg_()`` flips an even number of sign bits, which a
    sum linear in the words missed). A few integer passes over each tensor, in place on
    one copy of its words. An empty tensor's digest is 0.

    Args:
        tensors: any tensors (any dtype, shape or device).

    Returns:
        One int per tensor, in order.
    """
    if not tensors:
        return ()
    values = []
    for t in tensors:
        if t.numel() == 0:
            values.append(torch.zeros((), dtype=torch.int64))
            continue
        words = _words(t.detach().reshape(1, -1))[0]  # [w] int64
        full = len(words) - len(words) % _CYCLE
        keys = _keys(_CYCLE, -1).to(words.device)
        cycles = _keyed_sum(words[:full].reshape(-1, _CYCLE), keys)  # [c]
        scale = 2 * torch.arange(len(cycles), device=words.device, dtype=torch.int64) + 1
        tail = _keyed_sum(words[full:], keys[: len(words) - full]) * (2 * len(cycles) + 1)
        values.append(((cycles * scale).sum() + tail).cpu())
    return tuple(int(v) for v in torch.stack(values))


def batch_key(hashes: Tensor) -> str:
    """Return the batch's content key: a digest of its ``[n]`` sample hashes, in order."""
    return hashlib.sha256(hashes.numpy().tobytes() + str(len(hashes)).encode()).hexdigest()


@lru_cache(maxsize=16)
def _projections(width: int) -> Tensor:
    """``[width, 2]`` fixed random float64 directions, scaled by ``1/√width`` (CPU)."""
    generator = torch.Generator().manual_seed(_SEED + width)
    return torch.randn(width, 2, generator=generator, dtype=torch.float64) / max(width, 1) ** 0.5


def response_sketch(response: Any, samples: int, dim: int | None = 0) -> Tensor | None:
    """A sketch of what the model returned, per sample, to compare between passes.

    Args:
        response: tensors, or tuples / lists / dicts of them (non-floating leaves are
            ignored).
        samples: the sample count ``n``.
        dim: the sample dimension (None: the response is one sample).

    Returns:
        ``[samples, 3]`` float64 on the CPU: per sample, two fixed random projections of
        its rows of every floating tensor in ``response``, and their norm (``[1, 3]``
        when ``dim`` is None); None when a floating tensor of ``response`` has no sample
        dimension of size ``samples`` (then it cannot be told apart per sample) or there
        is none.
    """
    leaves = [t for t in tree_flatten(response)[0] if isinstance(t, Tensor)]
    leaves = [t for t in leaves if t.is_floating_point()]
    if not leaves:
        return None
    if dim is None:
        rows = [t.detach().reshape(1, -1) for t in leaves]
    else:
        along = [a for t in leaves if (a := _sample_dim(t, samples, dim)) is not None]
        if samples == 0 or len(along) < len(leaves):  # some leaf has no sample dimension
            return None
        pairs = zip(leaves, along, strict=True)
        rows = [t.detach().movedim(a, 0).reshape(samples, -1) for t, a in pairs]
    flat = torch.cat([r.to(torch.float64) for r in rows], dim=1)
    projected = flat @ _projections(flat.shape[1]).to(flat.device)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    return torch.cat([projected, norms], dim=1).cpu()
