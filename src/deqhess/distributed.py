"""Data-parallel curvature over ``torch.distributed``: one shard of the data per rank.

Each rank solves the equilibria of its own batches (a :class:`DatasetEquilibrium`)
and computes exact partial products; one ``all_reduce`` (sum) per product gives every
rank the full-data result — ``P`` numbers per HVP (``K·P`` for a block). With
``reduction="mean"`` rank ``r``'s shard-mean results are weighted by ``N_r / N`` (its
share of the global sample count, agreed by one ``all_reduce`` at set-up), so the
result is the global mean whatever the sharding.

Failures never hang the group: every local computation between collectives runs
under :func:`_agreed`, and before the next collective the ranks agree (one tiny
``all_reduce``) on whether any failed. If one did, the failing rank re-raises its own
exception and every other rank raises :class:`RankFailedError` naming the rank and the
original exception's type and message (shared by one ``all_gather_object``) — within
seconds, whatever the exception. Works with any backend: gloo on CPU, NCCL on GPU
(tensors then live on the GPU).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .chunks import default_chunk_size
from .errors import DeqhessError
from .implicit import (
    BatchSolve,
    CurvatureOperator,
    DatasetEquilibrium,
    EquilibriumInfo,
    HessianSplit,
)
from .implicit.operators import check_part
from .parameters import ParameterLayout, Parameters

__all__ = ["DistributedDatasetEquilibrium", "RankFailedError"]


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


def _agreed(compute: Callable[[], Any], group: Any, device: torch.device) -> Any:
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


_SETUP_FIELDS = ("θ's keys", "θ's shapes", "θ's dtype", "θ's values", "reduction", "batch_dim")


def _device_of(theta: Any) -> torch.device:
    """θ's device for the agreement collectives; CPU when θ is malformed (its own error
    then comes from :func:`_setup`, agreed across ranks, not from here)."""
    if isinstance(theta, Tensor):
        return theta.device
    first = next(iter(theta.values()), None) if isinstance(theta, dict) else None
    return first.device if isinstance(first, Tensor) else torch.device("cpu")


def _setup(
    theta: Parameters, reduction: str, batch_dim: int | None
) -> tuple[ParameterLayout, tuple]:
    """θ's layout, and what every rank must agree on, small enough to gather: the
    layout's names, shapes and dtype, a digest of θ's values (exactly equal θ, not merely
    close), the reduction and batch_dim."""
    layout = ParameterLayout(theta)
    digest = hashlib.sha256()
    for t in layout.tensors(theta):
        digest.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    shapes = tuple(tuple(s) for s in layout.shapes)
    agreed = (layout.names, shapes, str(layout.dtype), digest.hexdigest(), reduction, batch_dim)
    return layout, agreed


def _check_same_setup(setups: list[tuple]) -> None:
    """Raise on every rank alike (each sees every rank's setup) unless all agree: ranks
    that differ would sum products of different problems into a silently wrong one."""
    differences = [
        f"{field}: rank 0 has {a!r}, rank {rank} has {b!r}"
        if field != "θ's values"
        else f"θ's values differ between rank 0 and rank {rank}"
        for rank, setup in enumerate(setups[1:], start=1)
        for field, a, b in zip(_SETUP_FIELDS, setups[0], setup, strict=True)
        if a != b
    ]
    if differences:
        raise ValueError(
            "the ranks disagree on the problem, so their sum would be no one's derivative: "
            + "; ".join(differences[:4])
            + ". Pass every rank the same θ (same keys in the same order, identical values, "
            "one dtype) and the same reduction and batch_dim — e.g. load θ from one "
            "checkpoint, or broadcast it from rank 0."
        )


class DistributedDatasetEquilibrium:
    """The data-set derivatives of :class:`DatasetEquilibrium`, summed over ranks.

    Each rank streams its own shard exactly as :class:`DatasetEquilibrium` streams a
    data set (one pass per product block, a budgeted cache), so a rank's memory does
    not grow with its number of batches.

    Args:
        f, theta, loss, init_state, reduction, batch_dim, progress, ``**options``: as for
            :class:`DatasetEquilibrium` (``cache_bytes`` included); θ (keys, order,
            values, dtype), ``reduction`` and ``batch_dim`` must be identical on every
            rank — checked at construction (a ``ValueError`` on every rank otherwise).
        batches: this rank's shard (a DataLoader with a ``DistributedSampler``, a
            :class:`deqhess.batches.RankShard`, or any re-iterable of ``(x, target)``);
            it may be empty.
        group: the process group (default: the world).

    Attributes:
        local: this rank's :class:`DatasetEquilibrium` (its shard; possibly empty).
        num_samples: the global sample count.
        batch_solves: every batch's :class:`deqhess.implicit.BatchSolve`, rank by rank
            (``batch_infos``: their statistics).

    Raises:
        RankFailedError: on every rank but the failing one, when another rank fails
            (the failing rank raises its own exception).
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        theta: Parameters,
        batches: Iterable[tuple[Any, Any]],
        loss: Callable[..., Tensor],
        *,
        init_state: Callable[[Any], Tensor] | None = None,
        reduction: str = "mean",
        batch_dim: int | None = 0,
        progress: bool | None = None,
        group: Any = None,
        **options: Any,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialised; call "
                "torch.distributed.init_process_group (e.g. under torchrun) first."
            )
        self.group = group
        device = _device_of(theta)
        self.layout, mine = _agreed(lambda: _setup(theta, reduction, batch_dim), group, device)
        setups: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(setups, mine, group=group)
        _check_same_setup(setups)

        def shard() -> DatasetEquilibrium:
            return DatasetEquilibrium(
                f, theta, batches, loss, init_state=init_state, reduction=reduction,
                batch_dim=batch_dim, progress=progress, allow_empty=True, **options,
            )  # fmt: skip

        self.local: DatasetEquilibrium = self._agreed(shard)
        count = torch.tensor([float(self.local.num_samples)], device=self.layout.device)
        dist.all_reduce(count, group=group)
        self.num_samples = int(count.item())
        if self.num_samples == 0:
            raise ValueError("every rank's shard is empty; pass at least one (x, target) batch.")
        self._scale = self.local.num_samples / self.num_samples if reduction == "mean" else 1.0
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, self.local.batch_solves, group=group)
        self.batch_solves: list[BatchSolve] = [solve for shard in gathered for solve in shard]

    @property
    def num_parameters(self) -> int:
        return self.layout.size

    @property
    def num_batches(self) -> int:
        return len(self.batch_solves)

    @property
    def excluded_samples(self) -> int:
        """Samples left out as unconverged on all ranks (``exclude_unconverged``)."""
        return sum(solve.excluded for solve in self.batch_solves)

    @property
    def batch_infos(self) -> list[EquilibriumInfo]:
        return [solve.info for solve in self.batch_solves]

    def _agreed(self, compute: Callable[[], Any]) -> Any:
        return _agreed(compute, self.group, self.layout.device)

    def _summed(self, compute: Callable[[], Tensor]) -> Tensor:
        """This rank's ``compute()`` weighted by its share, all-reduced (sum) in place."""
        value = self._agreed(compute)
        value = (value * self._scale).contiguous()
        dist.all_reduce(value, group=self.group)
        return value

    def grad(self) -> Parameters:
        """The global data-set gradient, in θ's structure, on every rank."""
        return self.layout.unflatten(self._summed(lambda: self.layout.flatten(self.local.grad())))

    def hessian(self, split: bool = False) -> Tensor | HessianSplit:
        """The global dense Hessian ``[P, P]`` (or its split), on every rank."""
        if not split:
            return self._summed(self.local.hessian)
        local = self._agreed(lambda: self.local.hessian(split=True))
        parts = []
        for part in (local.loss_curvature, local.dynamics_curvature):
            part.mul_(self._scale)
            dist.all_reduce(part, group=self.group)
            parts.append(part)
        return HessianSplit(parts[0], parts[1], parts[0] + parts[1])

    def hessian_operator(self, part: str = "total") -> CurvatureOperator:
        """The global operator: each block product is one pass over this rank's shard
        and one all-reduce of ``K·P`` numbers."""
        check_part(part)
        local = self.local.hessian_operator(part)

        def products(v: Tensor) -> Tensor:
            return self._summed(lambda: local.matmat(v.T).T)

        # every rank must split a block the same way: collectives pair up in order
        chunk = default_chunk_size(self.num_parameters)
        return CurvatureOperator(products, self.layout, part, chunk)

    def hvp(self, v: Parameters) -> Parameters:
        """``H v`` of the global data-set loss; ``v`` θ-structured or flat ``[P]``."""
        return self.hessian_operator() @ v
