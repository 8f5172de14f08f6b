"""What a ``deqhess analyze`` factory returns, and how the command finds it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..batches import RankShard
from ..distributed import DistributedDatasetEquilibrium
from ..implicit import DatasetEquilibrium
from ..parameters import Parameters

__all__ = ["AnalysisProblem", "load_factory"]


@dataclass
class AnalysisProblem:
    """A DEQ, its data and its loss, as a factory hands them to ``deqhess analyze``.

    Attributes:
        f: the dynamics ``f(x, h, theta)``, or an ``nn.Module`` cell ``cell(x, h)``
            (then θ defaults to its named parameters).
        data: an iterable of ``(x, target)`` batches (a DataLoader, a list).
        loss: ``loss(h, target)`` or ``loss(h, theta, target)`` (the data-set signature).
        theta: parameters (tensor or dict); None with a cell.
        init_state: ``x ↦ h0`` per batch; default zeros like ``x`` (or ``cell.init_state``).
        reduction: ``"mean"`` or ``"sum"`` over the data.
        batch_dim: the state's sample dimension, or None.
        options: further :class:`deqhess.Equilibrium` options (solver, tol, linear_solver…).
        sharded: under ``torch.distributed``, whether ``data`` is already this rank's
            shard (a ``DistributedSampler``); if False, rank ``r`` of ``W`` takes batches
            ``r, r + W, …``.
    """

    f: Callable[..., Tensor] | nn.Module
    data: Iterable[tuple[Any, Any]]
    loss: Callable[..., Tensor]
    theta: Parameters | None = None
    init_state: Callable[[Any], Tensor] | None = None
    reduction: str = "mean"
    batch_dim: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)
    sharded: bool = False

    def equilibria(self, progress: bool | None = None):
        """Solve every batch (see :class:`deqhess.DatasetEquilibrium`); under
        ``torch.distributed`` with several ranks, this rank's shard of a
        :class:`deqhess.distributed.DistributedDatasetEquilibrium`."""
        f, theta, init = self.f, self.theta, self.init_state
        if isinstance(f, nn.Module):
            cell = f
            if theta is None:
                theta = {n: p.detach() for n, p in cell.named_parameters()}
            if init is None and callable(getattr(cell, "init_state", None)):
                init = lambda x: torch.zeros_like(cell.init_state(x))  # noqa: E731

            def f(x, h, t):
                return torch.func.functional_call(cell, t, (x, h))

        if theta is None:
            raise ValueError("the factory gave no theta; set AnalysisProblem.theta.")
        kwargs = dict(
            init_state=init, reduction=self.reduction, batch_dim=self.batch_dim,
            progress=progress, **self.options,
        )  # fmt: skip
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            data = self.data
            if not self.sharded:
                rank, world = dist.get_rank(), dist.get_world_size()
                data = RankShard(data, rank, world)
            return DistributedDatasetEquilibrium(f, theta, data, self.loss, **kwargs)
        return DatasetEquilibrium(f, theta, self.data, self.loss, **kwargs)


def load_factory(spec: str) -> AnalysisProblem:
    """Call ``package.module:function`` or ``path/to/file.py:function`` and check its result."""
    if ":" not in spec:
        raise ValueError(
            f"factory {spec!r} must look like 'package.module:function' or 'file.py:function'."
        )
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise ValueError(f"factory file {target!r} does not exist.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise ValueError(f"cannot import {target!r} for the factory: {error}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{target!r} has no callable {name!r}.")
    result = factory()
    if isinstance(result, Mapping):
        result = AnalysisProblem(**result)
    if not isinstance(result, AnalysisProblem):
        raise ValueError(
            f"the factory {spec!r} returned {type(result).__name__}; return a "
            "deqhess.cli.AnalysisProblem (or a dict of its fields)."
        )
    return result
