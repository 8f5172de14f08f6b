"""Derivatives of a loss summed over a data set, streaming one batch's equilibrium at a time.

The data-set loss is ``L(θ) = Σ_b w_b ℓ(h*_b(θ), y_b)`` over batches ``(x_b, y_b)``,
with ``w_b = 1`` for ``reduction="sum"`` and ``w_b = n_b / N`` for ``reduction="mean"``
(``ℓ`` then a per-batch mean, ``n_b`` the batch's sample count, ``N`` the total), so
the result does not depend on how the data are cut into batches or ordered. Its
gradient, Hessian and products are sums over batches.

**Streaming.** Every gradient, dense Hessian and product block ``H V`` (``V`` ``[P, K]``)
is one pass over the data: each batch is solved, used for all K directions at once and
dropped, so memory does not grow with the number of batches. A :class:`BatchCache`
keeps solved batches (fixed point, linear-solve set-up, adjoints) between passes up to
``cache_bytes``; when it holds every batch, passes do not read the data again.

**Loss signature for every data-set entry point:** ``loss(h, target)`` or
``loss(h, theta, target)`` (decided from the number of required positional
parameters), where ``target`` is the batch's second element as the loader yields it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..batches import (
    DEFAULT_CACHE_BYTES,
    BatchCache,
    Batches,
    check_same_data,
    held_bytes,
    saved_activation_bytes,
)
from ..chunks import default_chunk_size
from ..errors import StaleEquilibriumError
from ..parameters import ParameterLayout, Parameters
from ..solvers import Convergence
from .equilibrium import Equilibrium, EquilibriumInfo
from .hessian import HessianSplit
from .loss import required_positional
from .operators import CurvatureOperator, check_part

__all__ = ["BatchSolve", "DatasetEquilibrium"]

_REDUCTIONS = ("mean", "sum")

# A cached batch's pullbacks (∂f/∂θ's, and ∇Φ's per operator part) each keep about
# one to two copies of what autograd saves for one call of f: budget six.
_PULLBACK_COPIES = 6


class _BatchLoss:
    """``w_b · loss(h, [θ,] y_b)`` as an ``L(h, θ)`` for one batch's equilibrium."""

    def __init__(self, loss: Callable[..., Tensor], uses_theta: bool, target: Any, weight: float):
        self.loss, self.uses_theta, self.target, self.weight = loss, uses_theta, target, weight

    def __call__(self, h: Tensor, theta: Parameters) -> Tensor:
        if self.uses_theta:
            return self.weight * self.loss(h, theta, self.target)
        return self.weight * self.loss(h, self.target)


@dataclass
class _Solved:
    """One batch ready for products: its equilibrium and its weighted loss."""

    x: Any
    target: Any
    equilibrium: Equilibrium
    loss: _BatchLoss | None = None  # set once the total sample count is known
    cached: bool = False


@dataclass(frozen=True)
class BatchSolve:
    """One batch's forward solve, as the first pass saw it (kept for every batch).

    Attributes:
        info: the solve statistics (per-sample residuals and convergence included; the
            condition number of ``I − J`` once a pass has factorised the batch).
        samples: the batch's sample count (after exclusion).
        state_norm: ``‖h*‖₂`` of the batch's fixed point.
        dtype: the state's dtype.
        excluded: unconverged samples left out (``exclude_unconverged``).
    """

    info: EquilibriumInfo
    samples: int
    state_norm: float
    dtype: torch.dtype
    excluded: int = 0


def _loss_uses_theta(loss: Callable[..., Tensor]) -> bool:
    if not callable(loss):
        raise ValueError(f"loss must be callable; got {type(loss).__name__}.")
    required = required_positional(loss)
    if required not in (2, 3):
        raise ValueError(
            "a data-set loss must take loss(h, target) or loss(h, theta, target); "
            f"{getattr(loss, '__name__', loss)!r} requires {required} positional arguments."
        )
    return required == 3


class DatasetEquilibrium:
    """The derivatives of a loss summed over a data set, one batch's equilibrium at a time.

    Construction makes one pass: it solves every batch (so a solve that fails raises
    here), records its statistics and sample count, and fills the cache.

    Args:
        f: dynamics ``f(x, h, theta)``.
        theta: parameters (tensor or dict of tensors).
        batches: ``(x, target)`` pairs, iterated once per pass — a list or a
            ``DataLoader`` (see :class:`deqhess.batches.Batches`). A generator is
            accepted only if the cache holds every batch.
        loss: ``loss(h, target)`` or ``loss(h, theta, target)`` for one batch.
        init_state: ``x ↦ h0`` for a batch; default zeros like ``x``.
        reduction: ``"mean"`` (``loss`` is a batch mean; the total is the data mean)
            or ``"sum"`` (``loss`` is a batch sum; the total is the data sum).
        batch_dim: the sample dimension of the state (default 0), which also counts
            the samples of a batch; None makes every batch one sample.
        progress: show a progress bar over batches (None: only on a terminal).
        cache_bytes: budget for solved batches kept between passes (default 1 GiB;
            0 streams every pass). A batch is counted as its inputs, fixed point and
            linear-solve factors, θ-sized gradients, and its pullbacks estimated from
            what autograd saves for one call of ``f``.
        allow_empty: accept data with no batch (a rank's empty shard); every
            derivative is then zero.
        exclude_unconverged: leave out, explicitly, the samples whose forward solve
            missed the tolerance (the policy defaults to ``convergence="best"``, keeping
            each unconverged sample's best iterate to leave out; an explicit ``"raise"``
            still stops at the first): each such batch is rebuilt on
            its converged samples from their fixed points, and the loss, the weights
            and ``num_samples`` count only those. Needs tensor ``x`` and ``target``
            whose first dimension indexes the samples. ``excluded_samples`` says how
            many were left out.
        **options: passed to every :class:`Equilibrium` (solver, tol, linear_solver,
            convergence…).

    Attributes:
        batch_solves: each batch's :class:`BatchSolve` (statistics, samples, ‖h*‖), in
            the order of the first pass; ``batch_infos`` their statistics alone.
        num_samples: the total sample count ``N`` (of the samples kept).
        excluded_samples: samples left out as unconverged (``exclude_unconverged``).
        layout: θ's layout (names, shapes, flattening order).
    """

    def __init__(
        self,
        f: Callable[[Any, Tensor, Parameters], Tensor],
        theta: Parameters,
        batches: Iterable[tuple[Any, Any]],
        loss: Callable[..., Tensor],
        *,
        init_state: Callable[[Any], Tensor] | None = None,
        reduction: str = "mean",
        batch_dim: int | None = 0,
        progress: bool | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        allow_empty: bool = False,
        exclude_unconverged: bool = False,
        **options: Any,
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'sum'.")
        self._uses_theta = _loss_uses_theta(loss)
        self.layout = ParameterLayout(theta)
        self.f, self.theta, self.loss = f, theta, loss
        self._versions = [t._version for t in self.layout.tensors(theta)]
        self.init_state, self.reduction, self.batch_dim = init_state, reduction, batch_dim
        self.exclude_unconverged = exclude_unconverged
        if exclude_unconverged:  # the data set reports what it leaves out: no warnings
            chosen = "convergence" in options or "require_convergence" in options
            policy = copy.copy(
                Convergence.resolve(
                    options.pop("convergence", None if chosen else "best"),
                    options.pop("require_convergence", True),
                )
            )
            policy.warn = False
            options["convergence"] = policy
        self.options = options
        self.progress = progress
        self._data = Batches(batches)
        self._cache = BatchCache(cache_bytes)
        self._activations: int | None = None
        self.batch_solves: list[BatchSolve] = []
        self._widest = 0
        samples = 0
        for index, (x, target) in enumerate(self._bar(self._data, "solving batches", leave=True)):
            full = self._solve(x)
            info, keep = full.info, self._converged(full)
            solved = self._restricted(x, target, full, keep)
            excluded = info.converged_mask.numel() - (len(keep) if keep is not None else 0)
            if solved is None:  # no sample of this batch converged
                self.batch_solves.append(
                    BatchSolve(info, 0, 0.0, full.problem.state.dtype, excluded)
                )
                continue
            eq = solved.equilibrium
            samples += eq.problem.state.samples
            self._widest = max(self._widest, eq.problem.state.size)
            solved.cached = self._cache.offer(  # keyed by the batch as the data give it
                index, x, target, solved, partial(self._cached_bytes, solved)
            )
            state_norm = float(torch.linalg.vector_norm(eq.h.double()))
            self.batch_solves.append(
                BatchSolve(
                    info if keep is None else eq.info,
                    eq.problem.state.samples,
                    state_norm,
                    eq.problem.state.dtype,
                    0 if keep is None else excluded,
                )
            )  # cond(I − J) joins the record once a pass has factorised the batch
            del eq, solved, full
        if not self.batch_solves and not allow_empty:
            raise ValueError("batches is empty; pass at least one (x, target) batch.")
        self.num_samples = samples
        self.excluded_samples = sum(solve.excluded for solve in self.batch_solves)
        if self.batch_solves and samples == 0:
            raise ValueError(
                f"no sample converged: all {self.excluded_samples} were excluded as "
                "unconverged. Loosen tol, raise max_iter or add a fallback solver."
            )
        self._cache.seal(self.num_batches)
        if self._data.one_shot and not self._cache.complete:
            raise ValueError(
                f"batches is a one-shot iterator ({type(batches).__name__}), but products "
                "read the data once per pass and the cache holds only "
                f"{len(self._cache)} of {self.num_batches} batches (cache_bytes="
                f"{self._cache.budget:,}). Pass a list or a DataLoader, or a larger cache_bytes."
            )
        for solved in self._cache.values():
            solved.loss = self._batch_loss(solved.target, solved.equilibrium)

    # ------------------------------------------------------------------ the passes
    @property
    def num_parameters(self) -> int:
        return self.layout.size

    @property
    def num_batches(self) -> int:
        return len(self.batch_solves)

    @property
    def batch_infos(self) -> list[EquilibriumInfo]:
        """Each batch's solve statistics, in the order of the first pass."""
        return [solve.info for solve in self.batch_solves]

    @property
    def cached_batches(self) -> int:
        """How many batches the cache holds (a prefix of the data)."""
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        """The estimated bytes of the cached batches (at most ``cache_bytes``)."""
        return self._cache.used

    def _solve(self, x: Any, h0: Tensor | None = None) -> Equilibrium:
        """One batch's equilibrium (the seam for per-batch options and policies)."""
        if h0 is None and self.init_state is not None:
            h0 = self.init_state(x)
        return Equilibrium(self.f, self.theta, x, h0, batch_dim=self.batch_dim, **self.options)

    def _converged(self, eq: Equilibrium) -> Tensor | None:
        """The samples to keep (indices), or None to keep the whole batch."""
        mask = eq.info.converged_mask
        if not self.exclude_unconverged or bool(mask.all()):
            return None
        return torch.nonzero(mask).flatten()

    def _restricted(
        self, x: Any, target: Any, eq: Equilibrium, keep: Tensor | None
    ) -> _Solved | None:
        """The batch on the samples in ``keep`` (all when None), rebuilt from their fixed
        points so that it needs no further iteration; None if no sample is kept."""
        if keep is None:
            return _Solved(x, target, eq)
        if len(keep) == 0:
            return None
        if not (isinstance(x, Tensor) and isinstance(target, Tensor)):
            raise ValueError(
                "exclude_unconverged needs tensor inputs and targets whose first dimension "
                f"indexes the samples; got x of type {type(x).__name__} and target of type "
                f"{type(target).__name__}."
            )
        batch_dim = eq.problem.state.batch_dim
        kept_x, kept_target = x.index_select(0, keep), target.index_select(0, keep)
        h0 = eq.h.index_select(0 if batch_dim is None else batch_dim, keep.to(eq.h.device))
        return _Solved(kept_x, kept_target, self._solve(kept_x, h0=h0))

    def _batch_loss(self, target: Any, eq: Equilibrium) -> _BatchLoss:
        n = eq.problem.state.samples
        weight = n / self.num_samples if self.reduction == "mean" else 1.0
        return _BatchLoss(self.loss, self._uses_theta, target, weight)

    def _each_batch(self, visit: Callable[[_Solved], None], desc: str | None = None) -> None:
        """One pass: ``visit`` every batch, solved (or taken from the cache) with its
        weighted loss; a streamed batch is dropped before the next one is solved."""
        if [t._version for t in self.layout.tensors(self.theta)] != self._versions:
            raise StaleEquilibriumError(
                "theta was modified in place after the DatasetEquilibrium was built, so its "
                "batches' statistics and cached solves are stale. Build a new one after "
                "changing theta (or pass copies: theta.clone())."
            )
        if self._cache.complete:
            for index, solved in self._bar(self._cache.items(), desc):
                visit(solved)
                self._record_condition(index, solved.equilibrium)
            return
        samples = batches = 0
        for index, (x, target) in enumerate(self._bar(self._data, desc)):
            batches += 1
            solved = self._cache.get(index, x, target)
            if solved is None:
                # per-sample stopping: which samples converge does not depend on the batching
                full = self._solve(x)
                solved = self._restricted(x, target, full, self._converged(full))
                del full
                if solved is None:  # every sample of this batch was excluded
                    continue
                solved.loss = self._batch_loss(solved.target, solved.equilibrium)
            samples += solved.equilibrium.problem.state.samples
            visit(solved)
            self._record_condition(index, solved.equilibrium)
            del solved
        check_same_data(samples, batches, self.num_samples, self.num_batches)

    def _record_condition(self, index: int, eq: Equilibrium) -> None:
        """A batch factorised during a pass gives its :class:`BatchSolve` ``cond(I − J)``
        (the first pass solved only its fixed point), for the state error."""
        record = self.batch_solves[index] if index < len(self.batch_solves) else None
        if record is None or record.info.condition_number is not None:
            return
        if eq.info.condition_number is not None:
            self.batch_solves[index] = replace(record, info=eq.info)

    def _bar(self, items: Iterable, desc: str | None, leave: bool = False) -> Iterable:
        if desc is None:
            return items
        total = self.num_batches or None
        if total is None:
            try:
                total = len(self._data.data)  # type: ignore[arg-type]
            except TypeError:  # a generator, or a view of one
                total = None
        disable = None if self.progress is None else not self.progress
        return tqdm(items, desc=desc, total=total, disable=disable, leave=leave)

    def _cached_bytes(self, solved: _Solved) -> int:
        """Estimated bytes a batch holds once cached and used for products."""
        eq = solved.equilibrium
        itemsize = torch.finfo(self.layout.dtype).bits // 8
        if self._activations is None:
            theta = self.layout.flatten(self.theta).detach()
            self._activations = saved_activation_bytes(
                lambda t, h: self.f(solved.x, h, self.layout.unflatten(t)), theta, eq.h
            )
        state = eq.problem.state.size * itemsize
        activations = self._activations if self._activations is not None else 8 * state
        return (
            held_bytes(solved.x, solved.target, eq.linearization.prepared)
            + 4 * state
            + 4 * self.num_parameters * itemsize
            + _PULLBACK_COPIES * activations
        )

    # ------------------------------------------------------------------ derivatives
    def grad(self) -> Parameters:
        """The data-set gradient, in θ's structure (one pass)."""
        total = self._zeros(self.num_parameters)

        def add(solved: _Solved) -> None:
            total.add_(self.layout.flatten(solved.equilibrium.grad(solved.loss)))

        self._each_batch(add, "gradient")
        return self.layout.unflatten(total)

    def hessian(self, split: bool = False) -> Tensor | HessianSplit:
        """The data-set Hessian ``[P, P]`` (or its :class:`HessianSplit`), in one pass.

        Each batch's Hessian is added in place into one ``[P, P]`` sum (two with
        ``split``) and dropped with the batch's sensitivity Z ``[S, d, P]``; a cached
        batch is solved afresh from its fixed point for this, so no Z stays cached.
        """
        p = self.num_parameters
        sums = [self._zeros(p, p) for _ in range(2 if split else 1)]

        def add(solved: _Solved) -> None:
            eq = solved.equilibrium
            if solved.cached:
                eq = self._solve(solved.x, h0=eq.h)
            hessian = eq.hessian(solved.loss, split=split)
            if split:
                sums[0].add_(hessian.loss_curvature)
                sums[1].add_(hessian.dynamics_curvature)
            else:
                sums[0].add_(hessian)

        self._each_batch(add, "Hessian")
        if not split:
            return sums[0]
        return HessianSplit(sums[0], sums[1], sums[0] + sums[1])

    def hessian_operator(self, part: str = "total") -> CurvatureOperator:
        """The data-set Hessian (or one part) as an operator; each block product is one
        pass, every batch's solves shared by the block's K directions."""
        check_part(part)

        def products(v: Tensor) -> Tensor:
            total = torch.zeros_like(v)

            def add(solved: _Solved) -> None:
                total.add_(solved.equilibrium.block_products(solved.loss, part)(v))

            self._each_batch(add)
            return total

        chunk = default_chunk_size(self.num_parameters + self._widest)
        return CurvatureOperator(products, self.layout, part, chunk)

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.layout.dtype, device=self.layout.device)

    def hvp(self, v: Parameters) -> Parameters:
        """``H v`` of the data-set loss; ``v`` θ-structured or flat ``[P]``."""
        return self.hessian_operator() @ v
