"""The ranks of a data-parallel operator: one problem on every rank, failures agreed.

Every rank streams its own shard of the data; one ``all_reduce`` (sum) per product gives
each rank the full-data result. That is right only if the ranks pose the same problem —
checked once at set-up (:func:`check_same_setup`) — and never hangs the group: every
local computation between collectives runs under :func:`agreed`, and before the next
collective the ranks agree (one tiny ``all_reduce``) on whether any failed. If one did,
the failing rank re-raises its own exception and every other rank raises
:class:`RankFailedError` naming the rank and the original exception's type and message
— within seconds, whatever the exception. Any backend works: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import DeqhessError, InputError
from ..parameters import ParameterLayout, Parameters

__all__ = [
    "RankFailedError",
    "agree_on_setup",
    "agreed",
    "callable_identity",
    "check_same_setup",
    "check_unpadded",
    "device_of",
    "state_digest",
]


class RankFailedError(DeqhessError, RuntimeError):
    """Another rank failed, so this one stops too instead of waiting in a collective.

    Args:
        rank: the (first) rank that failed.
        error_type: the name of its exception's type.
        message: its exception's message.
        failed: every rank that failed.

    Attributes:
        rank: the (first) rank that failed.
        error_type: the name of its exception's type.
        message: its exception's message.
    """

    def __init__(self, rank: int, error_type: str, message: str, failed: list[int]) -> None:
        super().__init__(
            f"rank {rank} failed with {error_type}: {message}"
            + (f" (ranks {failed} failed)" if len(failed) > 1 else "")
            + "; this rank stops too instead of waiting for it."
        )
        self.rank, self.error_type, self.message = rank, error_type, message


def agreed(compute: Callable[[], Any], group: Any, device: torch.device) -> Any:
    """Run ``compute()`` on this rank, then agree: every rank returns, or every rank raises.

    Args:
        compute: this rank's local work (no collectives inside).
        group: the process group.
        device: where the agreement's flags live (the backend's device: CPU for gloo,
            the GPU for NCCL).

    Returns:
        What ``compute()`` returned, when no rank failed.

    Raises:
        RankFailedError: on every rank but a failing one, when another rank failed
            (naming the first failing rank, its exception's type and message); a
            failing rank re-raises its own exception.
    """
    error: Exception | None = None
    value = None
    try:
        value = compute()
    except Exception as caught:  # any failure must reach the other ranks
        error = caught
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world, device=device)
    if error is not None:
        flags[rank] = 1.0
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    failed = torch.nonzero(flags).flatten().tolist()
    if not failed:
        return value
    reports: list[Any] = [None] * world
    mine = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(reports, mine, group=group)
    # leave together: a rank that raised and tore the group down while another was still
    # finishing the gather made gloo abort that process now and then (1 run in 10)
    dist.barrier(group=group)
    if error is not None:
        raise error  # this rank's own failure, as it was raised
    first = failed[0]
    error_type, message = reports[first]
    raise RankFailedError(first, error_type, message, failed)


def device_of(theta: Any) -> torch.device:
    """θ's device, for the agreement collectives.

    Returns:
        The device of θ (a tensor, or a dict's first tensor); the CPU when θ is
        malformed (its own error then comes from :func:`agree_on_setup`, agreed across
        ranks, not from here).
    """
    if isinstance(theta, Tensor):
        return theta.device
    first = next(iter(theta.values()), None) if isinstance(theta, dict) else None
    return first.device if isinstance(first, Tensor) else torch.device("cpu")


def _setup(theta: Parameters, settings: dict[str, Any]) -> tuple[ParameterLayout, dict]:
    """θ's layout, and what every rank must agree on, small enough to gather.

    Returns:
        ``(layout, fields)``: θ's :class:`deqhess.parameters.ParameterLayout`, and by
        name the layout's keys, shapes and dtype, a digest of θ's values (exactly equal
        θ, not merely close), and ``settings`` (the reduction, batch_dim …).
    """
    layout = ParameterLayout(theta)
    digest = hashlib.sha256()
    for t in layout.tensors(theta):
        digest.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    shapes = tuple(tuple(s) for s in layout.shapes)
    fields = {
        "θ's keys": layout.names,
        "θ's shapes": shapes,
        "θ's dtype": str(layout.dtype),
        "θ's values": digest.hexdigest(),
        **settings,
    }
    return layout, fields


def check_same_setup(setups: list[dict]) -> None:
    """Refuse ranks that pose different problems, on every rank alike.

    Ranks that differ would sum products of different problems into a silently wrong
    one. Each rank sees every rank's setup, so all raise the same error.

    Args:
        setups: every rank's fields (:func:`agree_on_setup` gathers them), rank 0 first.

    Raises:
        InputError: some field differs from rank 0's; the first four differences are
            named (digests as "differ").
    """
    digests = {"θ's values": "θ's values", "model": "the model's parameters or buffers"}
    differences = [
        f"{field}: rank 0 has {setups[0][field]!r}, rank {rank} has {setup.get(field)!r}"
        if field not in digests
        else f"{digests[field]} differ between rank 0 and rank {rank}"
        for rank, setup in enumerate(setups[1:], start=1)
        for field in setups[0]
        if setups[0][field] != setup.get(field)
    ]
    if differences:
        named = ", ".join(f for f in setups[0] if not f.startswith("θ"))
        raise InputError(
            "the ranks disagree on the problem, so their sum would be no one's derivative: "
            + "; ".join(differences[:4])
            + ". Pass every rank the same θ (same keys in the same order, identical values, "
            f"one dtype) and the same {named} — e.g. load θ from one checkpoint, or "
            "broadcast it from rank 0."
        )


def agree_on_setup(theta: Parameters, group: Any, **settings: Any) -> ParameterLayout:
    """θ's layout, once every rank of ``group`` has checked that all pose the same problem.

    Args:
        theta: this rank's θ.
        group: the process group.
        settings: what else must agree, by name (the reduction, ``batch_dim``, digests
            of the model, ``f`` and the loss).

    Returns:
        θ's :class:`deqhess.parameters.ParameterLayout`. A θ or a setting that differs
        between ranks raises :class:`deqhess.InputError` on every rank (see
        :func:`check_same_setup`); a malformed θ raises its own error on its rank and
        :class:`RankFailedError` on the others.
    """
    layout, mine = agreed(lambda: _setup(theta, settings), group, device_of(theta))
    setups: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(setups, mine, group=group)
    check_same_setup(setups)
    return layout


def state_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer of ``model``, for the ranks to compare.

    Returns:
        The SHA-256 hex digest of each tensor's name, dtype, shape and values — chosen
        or not, trainable or frozen; a shared parameter under each of its names.
    """
    digest = hashlib.sha256()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, tensor in named:
        t = tensor.detach().reshape(-1).cpu().contiguous()
        digest.update(repr((name, str(t.dtype), tuple(tensor.shape))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def callable_identity(fn: Any) -> str:
    """What the ranks can compare of a function or a loss.

    Returns:
        Its module and qualified name; for an ``nn.Module``, its type's name, its
        ``repr`` and a digest of its tensors (a weighted loss's weights).
    """
    if isinstance(fn, nn.Module):
        return f"{type(fn).__qualname__}: {fn!r} ({state_digest(fn)[:16]})"
    kind = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '')}.{kind}"


def check_unpadded(data: Any) -> None:
    """Refuse a shard from a ``DistributedSampler`` that pads.

    With a data set whose length is not a multiple of the ranks and ``drop_last=False``
    such a sampler repeats samples to even the shards, and the analysis would count them
    twice.

    Args:
        data: this rank's data (a ``DataLoader``'s sampler or batch sampler is read).

    Raises:
        InputError: such a sampler.
    """
    from torch.utils.data import DistributedSampler

    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(batch_sampler, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return
    dataset = sampler.dataset
    if not isinstance(dataset, Sized):  # never: the sampler took its len() when built
        return
    size, ranks = len(dataset), sampler.num_replicas
    if size % ranks:
        raise InputError(
            f"this rank's data come from a DistributedSampler over {size:,} samples on "
            f"{ranks} ranks with drop_last=False: it repeats {ranks - size % ranks} samples "
            "to give every rank as many, and the analysis would count them twice. Let "
            "deqhess shard the batches (give every rank all the data as a "
            "deqhess.batches.RankShard, or ModelProblem/AnalysisProblem with "
            "sharded=False), or use a sampler that does not pad."
        )
