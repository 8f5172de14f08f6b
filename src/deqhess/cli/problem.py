"""What a ``deqhess analyze`` factory returns, and how the command finds it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..batches import RankShard
from ..distributed import DistributedDatasetEquilibrium
from ..implicit import PARTS, DatasetEquilibrium
from ..models import ModelCurvature
from ..parameters import Parameters

__all__ = ["AnalysisProblem", "ModelProblem", "load_factory"]


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

    #: the operators this problem defines
    parts = PARTS

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


@dataclass
class ModelProblem:
    """A whole model holding DEQ layers, its loss and data, for ``deqhess analyze``.

    Attributes:
        model: the ``nn.Module`` (e.g. encoder → ``deqhess.nn.DEQ`` → head), deterministic
            (``eval()`` mode if it has dropout or batch norm).
        loss: ``loss_func(output, target)`` → 0-dim tensor (e.g. ``nn.CrossEntropyLoss()``).
        data: ``(x, target)`` batches, re-iterable (a list, a DataLoader).
        params: parameter names (None: all that require grad).
        reduction: ``"mean"`` or ``"sum"``; default ``loss.reduction`` or ``"mean"``.
        split_at: the DEQ layer (module or name) splitting the Hessian into loss and
            dynamics curvature; default the model's only DEQ layer.
        batch_size_fn: ``x ↦`` sample count; default ``x.shape[0]``.

    See :class:`deqhess.ModelCurvature` for the operators (``total``, ``ggn``,
    ``loss_curvature``, ``dynamics_curvature``).
    """

    model: nn.Module
    loss: Callable[[Tensor, Any], Tensor]
    data: Iterable[tuple[Any, Any]]
    params: Sequence[str] | None = None
    reduction: str | None = None
    split_at: nn.Module | str | None = None
    batch_size_fn: Callable[[Any], int] | None = None

    def equilibria(self, progress: bool | None = None) -> ModelCurvature:
        """The model's curvature over the data (nothing is solved until a product)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "deqhess analyze runs a ModelProblem in one process; launch it without "
                "torchrun (data-parallel model operators are not available yet)."
            )
        return self._curvature()

    @property
    def parts(self) -> tuple[str, ...]:
        return self._curvature().parts

    def _curvature(self) -> ModelCurvature:
        return ModelCurvature(
            self.model, self.loss, self.data, self.params, reduction=self.reduction,
            split_at=self.split_at, batch_size_fn=self.batch_size_fn,
        )  # fmt: skip


def load_factory(spec: str) -> AnalysisProblem | ModelProblem:
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
        result = (ModelProblem if "model" in result else AnalysisProblem)(**result)
    if not isinstance(result, (AnalysisProblem, ModelProblem)):
        raise ValueError(
            f"the factory {spec!r} returned {type(result).__name__}; return a "
            "deqhess.cli.AnalysisProblem or ModelProblem (or a dict of its fields)."
        )
    return result
