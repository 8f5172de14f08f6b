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
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DeqhessError, InputError
from ..parameters import ParameterLayout, Parameters

__all__ = ["RankFailedError", "agree_on_setup", "agreed", "check_same_setup", "device_of"]


class RankFailedError(DeqhessError, RuntimeError):
    """Another rank failed, so this one stops too instead of waiting in a collective.

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
    """``compute()`` on this rank, then agreement: every rank returns, or every rank raises."""
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
        raise error
    first = failed[0]
    raise RankFailedError(first, *reports[first], failed)


def device_of(theta: Any) -> torch.device:
    """θ's device for the agreement collectives; CPU when θ is malformed (its own error
    then comes from :func:`agree_on_setup`, agreed across ranks, not from here)."""
    if isinstance(theta, Tensor):
        return theta.device
    first = next(iter(theta.values()), None) if isinstance(theta, dict) else None
    return first.device if isinstance(first, Tensor) else torch.device("cpu")


def _setup(theta: Parameters, settings: dict[str, Any]) -> tuple[ParameterLayout, dict]:
    """θ's layout, and what every rank must agree on, small enough to gather: the
    layout's names, shapes and dtype, a digest of θ's values (exactly equal θ, not merely
    close), and ``settings`` (the reduction, batch_dim …)."""
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
    """Raise on every rank alike (each sees every rank's setup) unless all agree: ranks
    that differ would sum products of different problems into a silently wrong one."""
    differences = [
        f"{field}: rank 0 has {setups[0][field]!r}, rank {rank} has {setup[field]!r}"
        if field != "θ's values"
        else f"θ's values differ between rank 0 and rank {rank}"
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
    """θ's layout, once every rank of ``group`` has checked that all pose the same
    problem (θ and ``settings``); a ``ValueError`` on every rank otherwise."""
    layout, mine = agreed(lambda: _setup(theta, settings), group, device_of(theta))
    setups: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(setups, mine, group=group)
    check_same_setup(setups)
    return layout
