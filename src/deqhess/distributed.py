"""Data-parallel curvature over ``torch.distributed``: one shard of the data per rank.

Each rank streams its own shard exactly as the single-process front end streams a data
set — the same engine (:class:`deqhess.streaming.Stream`), the same checks — and one
``all_reduce`` (sum) per product gives every rank the full-data result: ``P`` numbers
per HVP, ``K·P`` for a block. With ``reduction="mean"`` the sums are divided by the
global sample count (agreed by one ``all_reduce`` in the first pass), so the result is
the global mean whatever the sharding.

The ranks must pose the same problem — θ (keys, order, shapes, dtype, values) and the
reduction, checked at construction — and never hang each other: a failure on one rank
makes every rank raise (the failing one its own exception, the others
:class:`RankFailedError`), within seconds. Works with any backend: gloo on CPU, NCCL on
GPU (tensors then live on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from .errors import InputError
from .implicit import BatchSolve, DatasetEquilibrium
from .models import ModelCurvature
from .models.graph import LossFunc
from .parameters import Parameters
from .streaming import RankFailedError, agree_on_setup, agreed
from .streaming.ranks import callable_identity, check_unpadded, device_of, state_digest

__all__ = ["DistributedDatasetEquilibrium", "DistributedModelCurvature", "RankFailedError"]


def _require_group() -> None:
    """Refuse to build a distributed operator outside a process group.

    Raises:
        InputError: ``torch.distributed`` is unavailable or not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise InputError(
            "torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (e.g. under torchrun) first."
        )


class DistributedDatasetEquilibrium(DatasetEquilibrium):
    """The data-set derivatives of :class:`DatasetEquilibrium`, summed over ranks.

    Args:
        f, theta, loss, ``**options``: as for :class:`DatasetEquilibrium` (its keywords
            ``init_state``, ``reduction``, ``batch_dim``, ``cache_bytes`` … included); θ
            (keys, order, values, dtype), ``reduction`` and ``batch_dim`` must be
            identical on every rank, and ``f`` and ``loss`` the same functions — checked
            at construction (a :class:`deqhess.InputError` on every rank otherwise).
        data: this rank's shard (a DataLoader with a ``DistributedSampler`` that does not
            pad, a :class:`deqhess.batches.RankShard`, or any re-iterable of
            ``(x, target)``); it may be empty.
        group: the process group (default: the world).

    Attributes:
        num_samples: the global sample count.
        batch_solves: every batch's :class:`deqhess.implicit.BatchSolve`, rank by rank,
            as the first pass saw them (``batch_infos``: their statistics).

    Raises:
        RankFailedError: on every rank but the failing one, when another rank fails
            (the failing rank raises its own exception) — at construction too.
    """

    _label = "DistributedDatasetEquilibrium"

    def __init__(
        self,
        f: Callable[..., Tensor],
        theta: Parameters,
        data: Iterable[tuple[Any, Any]] | None = None,
        loss: Callable[..., Tensor] | None = None,
        *,
        group: Any = None,
        **kwargs: Any,
    ) -> None:
        _require_group()
        self.group = dist.group.WORLD if group is None else group
        kwargs.pop("allow_empty", None)  # a rank's shard may always be empty

        def configure() -> None:
            check_unpadded(data)
            self._configure(f, theta, data, loss, **kwargs)

        agreed(configure, self.group, device_of(theta))
        agree_on_setup(
            theta, self.group, reduction=self.reduction, batch_dim=self.batch_dim,
            f=callable_identity(f), loss=callable_identity(loss),
        )  # fmt: skip
        self._first_pass(allow_empty=True)
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, self._solves, group=self.group)
        self._all_solves = [solve for shard in gathered for solve in shard]

    @property
    def batch_solves(self) -> list[BatchSolve]:
        """Every rank's batches, rank by rank, as the first pass saw them."""
        return getattr(self, "_all_solves", self._solves)

    def _group(self) -> Any:
        return self.group

    def _first_pass(self, allow_empty: bool) -> None:
        self._stream.run(self._form, self._record_first, desc="solving batches")
        if self.num_samples == 0:  # the same on every rank: all raise alike
            raise InputError(
                "every rank's shard is empty, or no sample converged on any rank; pass at "
                "least one (x, target) batch with a converging sample."
            )

    def _chunk_width(self) -> int:
        return 0  # every rank must split a block the same way: collectives pair up in order


class DistributedModelCurvature(ModelCurvature):
    """:class:`deqhess.ModelCurvature` over ``torch.distributed``, one shard per rank.

    Each rank streams its shard of the data through its copy of the model, and one
    ``all_reduce`` per product gives every rank the full-data result.

    Args:
        model, loss, data, theta, ``**kwargs``: as for :class:`deqhess.ModelCurvature`;
            ``data`` is this rank's shard (it may be empty; a ``DistributedSampler`` that
            pads shards with repeated samples is refused). The model — every parameter
            and buffer, chosen or not: names, shapes, dtypes, values — the loss and the
            reduction must be identical on every rank: checked at construction and again
            when the model changes between products (a :class:`deqhess.InputError` on
            every rank otherwise).
        group: the process group (default: the world).

    :meth:`per_sample_gradients` and :meth:`output_jacobians` give this rank's samples.

    Raises:
        RankFailedError: on every rank but the failing one, when another rank fails —
            at construction too.
    """

    _label = "DistributedModelCurvature"

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunc | None = None,
        data: Iterable[tuple[Any, Any]] | None = None,
        theta: Sequence[str] | Sequence[Tensor] | None = None,
        *,
        group: Any = None,
        **kwargs: Any,
    ) -> None:
        _require_group()
        self.group = dist.group.WORLD if group is None else group

        def configure() -> None:
            check_unpadded(data)
            ModelCurvature.__init__(self, model, loss, data, theta, **kwargs)

        device = (
            next((p.device for p in model.parameters()), None)
            if isinstance(model, nn.Module)
            else None
        )
        agreed(configure, self.group, device or device_of(None))
        self._agree()

    def _agree(self) -> None:
        # read where the ranks agree on a failure: a parameter one rank lost (a
        # parametrization registered on it alone) must not leave the others waiting
        values = agreed(self._values, self.group, self.layout.device)
        params = dict(zip(self.names, values, strict=True))
        agree_on_setup(
            params, self.group, reduction=self.reduction, model=state_digest(self.model),
            loss=callable_identity(self.loss),
        )  # fmt: skip

    def _group(self) -> Any:
        return self.group
