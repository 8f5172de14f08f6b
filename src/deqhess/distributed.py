"""Data-parallel curvature over ``torch.distributed``: one shard of the data per rank.

Each rank solves the equilibria of its own batches (a :class:`DatasetEquilibrium`)
and computes exact partial products; one ``all_reduce`` (sum) per product gives every
rank the full-data result — ``P`` numbers per HVP (``K·P`` for a block). With
``reduction="mean"`` rank ``r``'s shard-mean results are weighted by ``N_r / N`` (its
share of the global sample count, agreed by one ``all_reduce`` at set-up), so the
result is the global mean whatever the sharding.

Failures never hang the group: before each collective the ranks agree (one more tiny
``all_reduce``) on whether any of them failed, and if one did, every rank raises —
:class:`deqhess.ConvergenceError` when a solve did not converge, with the rank named.
Works with any backend: gloo on CPU, NCCL on GPU (tensors then live on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .chunks import default_chunk_size
from .errors import ConvergenceError, SingularSystemError
from .implicit import CurvatureOperator, DatasetEquilibrium, HessianSplit
from .implicit.operators import check_part
from .parameters import ParameterLayout, Parameters

__all__ = ["DistributedDatasetEquilibrium"]

_CODES = {ConvergenceError: 1, SingularSystemError: 2}


def _agree(error: BaseException | None, group: Any, device: torch.device) -> None:
    """All ranks learn whether any failed; then every rank raises (never hangs)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    codes = torch.zeros(world, device=device)
    if error is not None:
        codes[rank] = float(next((c for t, c in _CODES.items() if isinstance(error, t)), 3))
    dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=group)
    failed = torch.nonzero(codes).flatten().tolist()
    if not failed:
        return
    if error is not None:
        raise error
    first = failed[0]
    kind = {1: ConvergenceError, 2: SingularSystemError}.get(int(codes[first]), RuntimeError)
    raise kind(
        f"rank {first} failed (ranks {failed}); this rank stops too instead of waiting. "
        "See that rank's error for the residual and what to try."
    )


class DistributedDatasetEquilibrium:
    """The data-set derivatives of :class:`DatasetEquilibrium`, summed over ranks.

    Args:
        f, theta, loss, init_state, reduction, batch_dim, progress, **options: as for
            :class:`DatasetEquilibrium`; θ must be identical on every rank.
        batches: this rank's shard (a DataLoader with a ``DistributedSampler``, or any
            iterable of ``(x, target)``); it may be empty.
        group: the process group (default: the world).

    Attributes:
        local: this rank's :class:`DatasetEquilibrium` (None for an empty shard).
        num_samples: the global sample count.
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
        self.layout = ParameterLayout(theta)
        batches = list(batches)
        error: BaseException | None = None
        self.local: DatasetEquilibrium | None = None
        try:
            if batches:
                self.local = DatasetEquilibrium(
                    f, theta, batches, loss, init_state=init_state, reduction=reduction,
                    batch_dim=batch_dim, progress=progress, **options,
                )  # fmt: skip
        except (ConvergenceError, SingularSystemError, ValueError, RuntimeError) as caught:
            error = caught
        _agree(error, group, self.layout.device)
        local_count = self.local.num_samples if self.local is not None else 0
        count = torch.tensor([float(local_count)], device=self.layout.device)
        dist.all_reduce(count, group=group)
        self.num_samples = int(count.item())
        self._scale = local_count / self.num_samples if reduction == "mean" else 1.0

    @property
    def num_parameters(self) -> int:
        return self.layout.size

    @property
    def equilibria(self) -> list:
        """This rank's equilibria (for their solve statistics)."""
        return [] if self.local is None else self.local.equilibria

    def _summed(self, compute: Callable[[DatasetEquilibrium], Tensor], shape: tuple) -> Tensor:
        error, value = None, None
        try:
            value = compute(self.local) if self.local is not None else None
        except (ConvergenceError, SingularSystemError, RuntimeError) as caught:
            error = caught
        _agree(error, self.group, self.layout.device)
        if value is None:
            value = torch.zeros(shape, dtype=self.layout.dtype, device=self.layout.device)
        value = (value * self._scale).contiguous()
        dist.all_reduce(value, group=self.group)
        return value

    def grad(self) -> Parameters:
        """The global data-set gradient, in θ's structure, on every rank."""
        flat = self._summed(lambda d: self.layout.flatten(d.grad()), (self.num_parameters,))
        return self.layout.unflatten(flat)

    def hessian(self, split: bool = False) -> Tensor | HessianSplit:
        """The global dense Hessian ``[P, P]`` (or its split), on every rank."""
        p = self.num_parameters
        if not split:
            return self._summed(lambda d: d.hessian(), (p, p))

        def both(d: DatasetEquilibrium) -> Tensor:
            split = d.hessian(split=True)
            return torch.stack([split.loss_curvature, split.dynamics_curvature])

        loss_part, dynamics_part = self._summed(both, (2, p, p))
        return HessianSplit(loss_part, dynamics_part, loss_part + dynamics_part)

    def hessian_operator(self, part: str = "total") -> CurvatureOperator:
        """The global operator: each block product is one all-reduce of ``K·P`` numbers."""
        check_part(part)
        local = self.local.hessian_operator(part) if self.local is not None else None

        def products(v: Tensor) -> Tensor:
            return self._summed(lambda _: local.matmat(v.T).T, tuple(v.shape))

        # every rank must split a block the same way: collectives pair up in order
        chunk = default_chunk_size(self.num_parameters)
        return CurvatureOperator(products, self.layout, part, chunk)

    def hvp(self, v: Parameters) -> Parameters:
        """``H v`` of the global data-set loss; ``v`` θ-structured or flat ``[P]``."""
        return self.hessian_operator() @ v
