"""What a ``deqhess analyze`` factory returns, and how the command finds it."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..batches import RankShard
from ..deprecation import UNSET, renamed
from ..distributed import DistributedDatasetEquilibrium, DistributedModelCurvature
from ..errors import InputError
from ..implicit import PARTS, DatasetEquilibrium
from ..models import ModelCurvature
from ..models.arguments import deq_layers
from ..nn.reparametrize import functional_call
from ..parameters import ParameterLayout, Parameters
from .cast import Cast
from .initial_state import check_default_state, checked_init
from .solver_options import check_option_names, reference_options, solve_layer_to_reference

__all__ = ["AnalysisProblem", "ModelProblem"]


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
        options: further :class:`deqhess.Equilibrium` options (solver, tol, linear_solver…);
            the command line's ``--solver``, ``--tol``… override them.
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

    def equilibria(
        self,
        progress: bool | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> DatasetEquilibrium:
        """Solve every batch: the data set's equilibria, ready for products.

        Args:
            progress: progress bars (None: only on a terminal).
            dtype: cast θ, the cell (a copy) and the floating tensors of every batch
                (targets too) to it — the loss must then work in that dtype.
            device: move them there.
            **overrides: :class:`deqhess.Equilibrium` options replacing ``options``'.

        Returns:
            A :class:`deqhess.DatasetEquilibrium`; under ``torch.distributed`` with
            several ranks, this rank's shard of a
            :class:`deqhess.distributed.DistributedDatasetEquilibrium`.

        Raises:
            InputError: an unknown option; no θ, a θ that is not the cell's named
                parameters; a state of another dtype or device than θ; or an ``f``
                that fails on (or changes the shape of) the default initial state.
        """  # noqa: DOC502 (raised by _theta and the checks)
        check_option_names(self.options)
        check_option_names(overrides, "the options given")
        f, init, source = self.f, self.init_state, "AnalysisProblem.init_state(x)"
        cast = Cast(dtype, device)
        if isinstance(f, nn.Module):
            cell = cast.module(f)
            theta = self._theta(cell)
            _check_cell_theta(cell, _state_names(cell), theta)
            cell_init = getattr(cell, "init_state", None)
            if init is None and callable(cell_init):
                init = lambda x: torch.zeros_like(cell_init(x))  # noqa: E731
                source = f"the cell {type(cell).__name__}'s init_state(x)"

            def f(x, h, t):
                return functional_call(cell, t, (x, h))

        else:
            theta = self._theta(None)
        theta = cast.tree(theta)
        if init is not None and cast.active:
            user_init = init
            init = lambda x: cast.tree(user_init(x))  # noqa: E731
        data = cast.batches(self.data)
        sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if sharded and not self.sharded:
            rank, world = dist.get_rank(), dist.get_world_size()
            data = RankShard(data, rank, world)
        if init is None:
            data = check_default_state(f, theta, data)
        else:
            init = checked_init(init, source, f, theta)
        kwargs = dict(
            init_state=init, reduction=self.reduction, batch_dim=self.batch_dim,
            progress=progress, **{**self.options, **overrides},
        )  # fmt: skip
        if sharded:
            return DistributedDatasetEquilibrium(f, theta, data, self.loss, **kwargs)
        return DatasetEquilibrium(f, theta, data, self.loss, **kwargs)

    def float64_reference(
        self,
        progress: bool | None = None,
        *,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> DatasetEquilibrium:
        """The problem rebuilt in float64, solved to float64's own tolerance.

        What a float32 analysis is measured against: θ, the cell and the data cast to
        float64, the options (``options`` with ``overrides`` over them) tightened by
        :func:`~deqhess.cli.solver_options.reference_options` — a loose ``tol`` of the
        factory or the command is not inherited.

        Args:
            progress: progress bars (None: only on a terminal).
            device: move θ, the cell and the data there.
            **overrides: the analysis' own options over the factory's.

        Returns:
            As :meth:`equilibria`, in float64.

        Raises:
            InputError: as :meth:`equilibria`.
        """  # noqa: DOC502 (raised by equilibria)
        options = reference_options({**self.options, **overrides})
        return self.equilibria(progress, dtype=torch.float64, device=device, **options)

    def num_parameters(self, dtype: torch.dtype | None = None) -> int:
        """P, the number of θ's entries, known before any batch is solved.

        Args:
            dtype: the dtype the analysis casts θ to (θ is checked as it will be used).

        Returns:
            The length of flattened θ: the factory's θ, else the cell's parameters.

        Raises:
            InputError: no θ, or a θ deqhess cannot take (see :class:`deqhess.Equilibrium`).
        """  # noqa: DOC502 (raised by _theta and ParameterLayout)
        cell = self.f if isinstance(self.f, nn.Module) else None
        return ParameterLayout(Cast(dtype, None).tree(self._theta(cell))).size

    def _theta(self, cell: nn.Module | None) -> Parameters:
        """θ: the factory's, else (with a cell) the cell's named parameters, detached."""
        if self.theta is not None:
            return self.theta
        if cell is None:
            raise InputError("the factory gave no theta; set AnalysisProblem.theta.")
        return {n: p.detach() for n, p in cell.named_parameters()}


def _state_names(cell: nn.Module) -> list[str]:
    return [n for n, _ in cell.named_parameters()] + [n for n, _ in cell.named_buffers()]


def _check_cell_theta(cell: nn.Module, names: list[str], theta: Parameters) -> None:
    """With a cell, θ must be a dict of the cell's own parameters (or buffers)."""
    kind = type(cell).__name__
    if not isinstance(theta, Mapping):
        raise InputError(
            f"with f = the cell {kind}, theta must be a dict of its named parameters; got "
            f"{type(theta).__name__}. Leave theta=None to take all of them."
        )
    unknown = [n for n in theta if n not in names]
    if unknown:
        raise InputError(
            f"theta has parameters the cell {kind} does not have: {unknown} (its own: "
            f"{names[:8]}{' …' if len(names) > 8 else ''}). With an nn.Module cell, theta "
            "may hold only the cell's parameters (theta=None takes all of them). To "
            "differentiate also with respect to parameters outside the cell, e.g. a "
            "readout used in the loss, give f as a function f(x, h, theta) that calls "
            "torch.func.functional_call(cell, <the cell's entries of theta>, (x, h)), and "
            "read the other entries in loss(h, theta, target)."
        )


@dataclass
class ModelProblem:
    """A whole model holding DEQ layers, its loss and data, for ``deqhess analyze``.

    Attributes:
        model: the ``nn.Module`` (e.g. encoder → ``deqhess.nn.DEQ`` → head), one fixed
            function (``eval()`` mode if it has dropout or batch norm).
        loss: ``loss(output, target)`` → 0-dim tensor (e.g. ``nn.CrossEntropyLoss()``).
        data: ``(x, target)`` batches, re-iterable (a list, a DataLoader).
        theta: parameter names (None: all that require grad). (Formerly ``params``.)
        reduction: ``"mean"`` or ``"sum"``; default ``loss.reduction`` or ``"mean"``.
        split_at: the DEQ layer (module or name) splitting the Hessian into loss and
            dynamics curvature; default the model's only DEQ layer.
        batch_size_fn: ``x ↦`` sample count; default ``x.shape[0]``.
        exclude_unconverged: leave out samples a DEQ layer did not converge on (see
            :class:`deqhess.ModelCurvature`); the command's ``--exclude-unconverged``
            sets it.
        sharded: under ``torch.distributed``, whether ``data`` is already this rank's
            shard (a ``DistributedSampler``); if False, rank ``r`` of ``W`` takes batches
            ``r, r + W, …``.

    See :class:`deqhess.ModelCurvature` for the operators (``total``, ``ggn``,
    ``loss_curvature``, ``dynamics_curvature``).
    """

    model: nn.Module
    loss: Callable[[Tensor, Any], Tensor]
    data: Iterable[tuple[Any, Any]]
    theta: Sequence[str] | None = None
    reduction: str | None = None
    split_at: nn.Module | str | None = None
    batch_size_fn: Callable[[Any], int] | None = None
    exclude_unconverged: bool = False
    sharded: bool = False
    params: Any = field(default=UNSET, repr=False)

    def __post_init__(self) -> None:
        self.theta = renamed(
            self.theta, self.params, old="params", new="theta", where="ModelProblem"
        )
        self.params = UNSET

    def equilibria(
        self,
        progress: bool | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> ModelCurvature:
        """The model's curvature over the data (nothing is solved until a product).

        Args:
            progress: progress bars (None: only on a terminal).
            dtype: cast a copy of the model and the floating tensors of every batch.
            device: move them there.
            **overrides: only ``exclude_unconverged`` (and the ``convergence="best"``
                that comes with it): set solver options on the model's DEQ layers.

        Returns:
            A :class:`deqhess.ModelCurvature`; under ``torch.distributed`` with several
            ranks, a :class:`deqhess.distributed.DistributedModelCurvature` over this
            rank's shard.

        Raises:
            InputError: any other solver option (those belong on the model's layers).
        """  # noqa: DOC502 (raised by _built)
        return self._built(progress, Cast(dtype, device), overrides)

    def float64_reference(
        self,
        progress: bool | None = None,
        *,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> ModelCurvature:
        """The model rebuilt in float64, its DEQ layers solving to float64's own tolerance.

        What a float32 analysis is measured against: a float64 copy of the model, whose
        DEQ layers' ``tol``, ``atol``, ``max_iter`` and iterative linear solver are
        tightened as :func:`~deqhess.cli.solver_options.solve_layer_to_reference` says
        (a layer's loose ``tol=1e-3`` is not inherited). The factory's model is left
        as it is.

        Args:
            progress: progress bars (None: only on a terminal).
            device: move the copy and the data there.
            **overrides: as for :meth:`equilibria`.

        Returns:
            As :meth:`equilibria`, in float64.

        Raises:
            InputError: as :meth:`equilibria`.
        """  # noqa: DOC502 (raised by _built)
        return self._built(progress, Cast(torch.float64, device), overrides, reference=True)

    def _built(
        self, progress: bool | None, cast: Cast, overrides: dict[str, Any], reference: bool = False
    ) -> ModelCurvature:
        """The curvature of the model cast by ``cast`` (a reference: its layers tightened)."""
        exclude = bool(overrides.pop("exclude_unconverged", self.exclude_unconverged))
        if overrides.get("convergence") == "best" and exclude:
            overrides.pop("convergence")
        if overrides:
            raise InputError(
                f"solver options {sorted(overrides)} apply to a DEQ layer; for a "
                "ModelProblem set them on the model's deqhess.nn.DEQ layers in the factory."
            )
        data = cast.batches(self.data)
        sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if sharded and not self.sharded:
            data = RankShard(data, dist.get_rank(), dist.get_world_size())
        kind = DistributedModelCurvature if sharded else ModelCurvature
        model = cast.module(self.model)
        if reference:
            model = copy.deepcopy(model) if model is self.model else model  # never the user's
            for layer in deq_layers(model):
                solve_layer_to_reference(layer)
        return self._curvature(model, data, kind, exclude, progress)

    @property
    def parts(self) -> tuple[str, ...]:
        """The operators the model defines (the split ones need one DEQ layer or split_at)."""
        return self._curvature(self.model, self.data, ModelCurvature, False, False).parts

    def num_parameters(self, dtype: torch.dtype | None = None) -> int:
        """P, the number of parameters analysed, known before any product.

        Args:
            dtype: unused (a cast keeps the parameters' number), as for
                :meth:`AnalysisProblem.num_parameters`.

        Returns:
            The length of the flattened parameters ``theta`` names.
        """
        return self._curvature(self.model, self.data, ModelCurvature, False, False).num_parameters

    def _curvature(
        self, model: nn.Module, data: Iterable[Any], kind: type, exclude: bool, progress
    ) -> ModelCurvature:
        split_at = self.split_at
        if isinstance(split_at, nn.Module) and model is not self.model:  # the cast copy's
            split_at = next(n for n, m in self.model.named_modules() if m is split_at)
        return kind(
            model, self.loss, data, self.theta, reduction=self.reduction, split_at=split_at,
            batch_size_fn=self.batch_size_fn, exclude_unconverged=exclude, progress=progress,
        )  # fmt: skip
