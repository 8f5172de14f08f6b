"""Derivatives of a loss summed over a data set, streaming one batch's equilibrium at a time.

The data-set loss is ``L(θ) = Σ_b w_b ℓ(h*_b(θ), y_b)`` over batches ``(x_b, y_b)``,
with ``w_b = 1`` for ``reduction="sum"`` and ``w_b = n_b / N`` for ``reduction="mean"``
(``ℓ`` then a per-batch mean, ``n_b`` the batch's sample count, ``N`` the total), so
the result does not depend on how the data are cut into batches or ordered. Its
gradient, Hessian and products are sums over batches, each one pass of the streaming
engine (:class:`deqhess.streaming.Stream`): every pass is checked to read the same
samples as the first, and a batch is solved (or its solve taken from the store of the
same content), used for all directions of a block at once, and dropped.

**Loss signature for every data-set entry point:** ``loss(h, target)`` or
``loss(h, theta, target)`` (decided from the number of required positional
parameters), where ``target`` is the batch's second element as the loader yields it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor

from ..batches import held_bytes, saved_activation_bytes
from ..chunks import default_chunk_size
from ..deprecation import UNSET, renamed
from ..errors import DeqhessError, InputError, StaleEquilibriumError
from ..options import integer
from ..parameters import ParameterLayout, Parameters
from ..solvers import Convergence
from ..streaming import (
    DEFAULT_CACHE_BYTES,
    Batch,
    Formed,
    Offer,
    StoredBatch,
    Stream,
    check_reduction,
    response_tolerance,
)
from ..streaming.grouping import LossAtOutput, grouping_of
from .batch_solve import (
    BatchLoss,
    BatchSolve,
    ReadyBatch,
    SolvedBatch,
    loss_uses_theta,
    sample_count,
)
from .equilibrium import Equilibrium, EquilibriumInfo
from .hessian import HessianSplit, split_deprecated
from .operators import CurvatureOperator, check_part
from .problem import FixedPointMap

__all__ = ["BatchSolve", "DatasetEquilibrium"]

# A cached batch's pullbacks (∂f/∂θ's, and ∇Φ's per operator part) each keep about
# one to two copies of what autograd saves for one call of f: budget six.
_PULLBACK_COPIES = 6


class DatasetEquilibrium:
    """The derivatives of a loss summed over a data set, one batch's equilibrium at a time.

    Construction makes the first pass: it solves every batch (so a solve that fails
    raises here), records its statistics and sample count and fingerprints its samples,
    and fills the store. Every later pass must read the same samples (in any order and
    grouping), or :class:`deqhess.DataChangedError` says what changed.

    Args:
        f: dynamics ``f(x, h, theta)``.
        theta: parameters (tensor or dict of tensors).
        data: ``(x, target)`` pairs, iterated once per pass — a list or a
            ``DataLoader`` (see :class:`deqhess.batches.Batches`). A generator is
            accepted only if the store holds every solved batch. (Formerly ``batches``.)
        loss: ``loss(h, target)`` or ``loss(h, theta, target)`` for one batch.
        init_state: ``x ↦ h0`` for a batch; default zeros like ``x``.
        reduction: ``"mean"`` (``loss`` is a batch mean; the total is the data mean)
            or ``"sum"`` (``loss`` is a batch sum; the total is the data sum).
        batch_dim: the sample dimension of the state (default 0) and of x, along
            which a batch's samples are counted and the target's matched (time-major
            data ``[m, B]`` take ``batch_dim=1``; a target ``[B, …]`` is read as
            sample-first); None makes every batch one sample.
        progress: show a progress bar over batches (None: only on a terminal).
        cache_bytes: budget for what is kept between passes, by batch content
            (default 1 GiB; 0 streams every pass from a cold start): solved batches —
            counted as their inputs, fixed point and linear-solve factors, θ-sized
            gradients, and their pullbacks estimated from what autograd saves for one
            call of ``f`` — or, where those do not fit, their fixed points alone to
            start the next solve from.
        allow_empty: accept data with no batch (a rank's empty shard); every
            derivative is then zero.
        exclude_unconverged: leave out, explicitly, the samples whose forward solve
            missed the tolerance (the policy defaults to ``convergence="best"``, keeping
            each unconverged sample's best iterate to leave out; an explicit ``"raise"``
            still stops at the first): each such batch is rebuilt on its converged
            samples from their fixed points, and the loss, the weights and
            ``num_samples`` count only those. Needs tensor ``x`` and ``target`` whose
            first dimension indexes the samples. ``excluded_samples`` says how many
            were left out.
        **options: passed to every :class:`Equilibrium` (solver, tol, linear_solver,
            convergence…).

    Attributes:
        batch_solves: each batch's :class:`BatchSolve` (statistics, samples, ‖h*‖), in
            the order of the first pass; ``batch_infos`` their statistics alone.
        num_samples: the total sample count ``N`` (of the samples kept).
        excluded_samples: samples left out as unconverged (``exclude_unconverged``).
        layout: θ's layout (names, shapes, flattening order).

    Raises:
        DataChangedError: a pass read other samples than the first (augmentation, a
            reshuffled subset, data changed after the first pass).
    """

    _label = "DatasetEquilibrium"

    def __init__(
        self,
        f: FixedPointMap,
        theta: Parameters,
        data: Iterable[tuple[Any, Any]] | None = None,
        loss: Callable[..., Tensor] | None = None,
        *,
        init_state: Callable[[Any], Tensor] | None = None,
        reduction: str = "mean",
        batch_dim: int | None = 0,
        progress: bool | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        allow_empty: bool = False,
        exclude_unconverged: bool = False,
        batches: Any = UNSET,
        **options: Any,
    ) -> None:
        self._configure(
            f, theta, data, loss, init_state=init_state, reduction=reduction,
            batch_dim=batch_dim, progress=progress, cache_bytes=cache_bytes,
            exclude_unconverged=exclude_unconverged, batches=batches, **options,
        )  # fmt: skip
        self._first_pass(allow_empty)

    def _configure(
        self,
        f: FixedPointMap,
        theta: Parameters,
        data: Iterable[tuple[Any, Any]] | None,
        loss: Callable[..., Tensor] | None,
        *,
        init_state: Callable[[Any], Tensor] | None = None,
        reduction: str = "mean",
        batch_dim: int | None = 0,
        progress: bool | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        exclude_unconverged: bool = False,
        batches: Any = UNSET,
        **options: Any,
    ) -> None:
        """The arguments checked and kept; this process alone (no collective)."""
        data = renamed(data, batches, old="batches", new="data", where=self._label)
        if data is None or loss is None:
            raise InputError(f"{self._label} needs data (the (x, target) batches) and loss.")
        self._uses_theta = loss_uses_theta(loss)
        check_reduction(reduction)
        self.layout = ParameterLayout(theta)
        self.f, self.theta, self.loss = f, theta, loss
        self._versions = [t._version for t in self.layout.tensors(theta)]
        if batch_dim is not None:
            batch_dim = integer(batch_dim, "batch_dim")
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
        self._stream = Stream(
            data, label=self._label, evaluated="f", reduction=reduction,
            count=partial(sample_count, dim=batch_dim or 0), sample_dim=batch_dim,
            cache_bytes=cache_bytes,
            progress=progress, group=self._group(), device=self.layout.device,
        )  # fmt: skip
        self._activations: int | None = None
        self._solves: list[BatchSolve] = []  # this process's batches, first pass order
        self._first: dict[str, int] = {}  # batch key → its place in batch_solves
        self._widest = 0

    # ------------------------------------------------------------------ set-up seams
    def _group(self) -> Any:
        return None

    def _first_pass(self, allow_empty: bool) -> None:
        """Solve every batch once (the first pass).

        Raises:
            InputError: the data have no batch (unless ``allow_empty``), or no sample
                converged (all excluded as unconverged).
        """
        self._stream.run(self._form, self._record_first, desc="solving batches")
        if not self._solves and not allow_empty:
            raise InputError("data is empty; pass at least one (x, target) batch.")
        if self._solves and self.num_samples == 0:
            raise InputError(
                f"no sample converged: all {self.excluded_samples} were excluded as "
                "unconverged. Loosen tol, raise max_iter or add a fallback solver."
            )

    # ------------------------------------------------------------------ the passes
    @property
    def num_parameters(self) -> int:
        """P, the number of scalar parameters in θ."""
        return self.layout.size

    @property
    def batch_solves(self) -> list[BatchSolve]:
        """Each batch's :class:`BatchSolve`, in the order of the first pass."""
        return self._solves

    @property
    def num_batches(self) -> int:
        """The number of batches the first pass read (on this rank)."""
        return len(self.batch_solves)

    @property
    def num_samples(self) -> int:
        """``N``: the samples the sums count (those kept), over every rank."""
        return self._stream.num_samples or 0

    @property
    def excluded_samples(self) -> int:
        """Samples left out as unconverged (``exclude_unconverged``)."""
        return sum(solve.excluded for solve in self.batch_solves)

    @property
    def batch_infos(self) -> list[EquilibriumInfo]:
        """Each batch's solve statistics, in the order of the first pass."""
        return [solve.info for solve in self.batch_solves]

    @property
    def cached_batches(self) -> int:
        """How many solved batches the store holds."""
        return self._stream.store.solved_count()

    @property
    def cached_bytes(self) -> int:
        """The estimated bytes of what the store holds (at most ``cache_bytes``)."""
        return self._stream.store.used

    def _solve(self, x: Any, h0: Tensor | None = None) -> Equilibrium:
        """One batch's equilibrium (the seam for per-batch options and policies)."""
        if h0 is None and self.init_state is not None:
            h0 = self.init_state(x)
        return Equilibrium(self.f, self.theta, x, h0, batch_dim=self.batch_dim, **self.options)

    def _form(self, batch: Batch, stored: StoredBatch | None) -> Formed:
        """The batch solved, restricted to its converged samples under ``exclude_unconverged``.

        The solve is taken from the store if it holds this content's solve, else started
        from the stored fixed point of the same content, or cold.

        Returns:
            What the stream needs of the batch: the solved batch, its kept samples and
            response (the fixed point), and what it offers to the store.
        """
        if stored is not None and stored.solved is not None:
            solved = stored.solved
            samples = 0 if solved.equilibrium is None else solved.equilibrium.problem.state.samples
            return Formed(solved, samples, solved.kept, solved.excluded)
        full = self._solve(batch.x, None if stored is None else stored.warm.get("h"))
        mask = full.info.converged_mask
        keep = None if not self.exclude_unconverged or bool(mask.all()) else mask.nonzero()[:, 0]
        solved = self._restricted(batch, full, keep)
        eq = solved.equilibrium
        samples = 0 if eq is None else eq.problem.state.samples
        offers = [Offer(partial(self._cached_bytes, solved, eq), solved=solved)] if eq else []
        if keep is None:  # a batch that left samples out starts cold: the same ones again
            offers.append(Offer(partial(held_bytes, full.h), warm={"h": full.h}))
        coupled = sized = ordered = None
        if eq is not None and self._stream.record is None and self.batch_dim == 0:
            coupled, sized, ordered = self._grouping(eq, cast(BatchLoss, solved.loss), samples)
        return Formed(
            solved, samples, keep, solved.excluded,
            response=None if eq is None else eq.h, response_dim=full.problem.state.batch_dim,
            tolerance=response_tolerance(full.info.tolerance.rtol, full.h.dtype),
            offers=tuple(offers), coupled=coupled, sized=sized, ordered=ordered,
        )  # fmt: skip

    def _grouping(
        self, eq: Equilibrium, loss: BatchLoss, samples: int
    ) -> tuple[bool | None, bool | None, bool | None]:
        """What the loss makes of the batch's grouping and order, on the first pass.

        Returns:
            :func:`~deqhess.streaming.grouping.grouping_of`'s flags at the fixed point;
            None each where the loss cannot be evaluated there (its error is the
            products' to raise, as it would without the check).

        Raises:
            DeqhessError: as the loss's own checks raise it.
        """
        with torch.no_grad():
            try:
                value = loss(eq.h, self.theta)
            except DeqhessError:
                raise
            except Exception:
                return None, None, None
        at_state = LossAtOutput(
            eq.h, loss.target, value, lambda h, target: loss.of(h, self.theta, target), self.loss
        )
        return grouping_of(at_state, samples, self.reduction)

    def _restricted(self, batch: Batch, eq: Equilibrium, keep: Tensor | None) -> SolvedBatch:
        """The batch on the samples in ``keep`` (all when None).

        Returns:
            The batch restricted to the kept samples, its equilibrium rebuilt from their
            fixed points (so that it needs no further iteration); None as equilibrium
            when no sample is kept.

        Raises:
            InputError: samples are to be left out but ``x`` or the target is not a
                tensor (indexed by sample along ``batch_dim``, else its first dimension).
        """
        x, target = batch.x, batch.target
        if keep is None:
            return SolvedBatch(
                batch.key, x, target, eq, self._batch_loss(target), eq.info,
                forward_iterations=eq.info.iterations,
            )  # fmt: skip
        excluded = eq.info.converged_mask.numel() - len(keep)
        if len(keep) == 0:
            return SolvedBatch(
                batch.key, x, target, None, None, eq.info, keep, excluded, eq.info.iterations
            )
        if not (isinstance(x, Tensor) and isinstance(target, Tensor)):
            raise InputError(
                "exclude_unconverged needs tensor inputs and targets indexed by sample along "
                f"batch_dim (or their first dimension); got x of type {type(x).__name__} and "
                f"target of type {type(target).__name__}."
            )
        batch_dim = eq.problem.state.batch_dim
        dim, samples = 0 if batch_dim is None else batch_dim, eq.info.converged_mask.numel()
        kept_x = x.index_select(_sample_dim(x, dim, samples), keep.to(x.device))
        kept_target = target.index_select(_sample_dim(target, dim, samples), keep.to(target.device))
        h0 = eq.h.index_select(dim, keep.to(eq.h.device))
        restricted = self._solve(kept_x, h0=h0)
        loss = self._batch_loss(kept_target)
        return SolvedBatch(
            batch.key, kept_x, kept_target, restricted, loss, restricted.info, keep, excluded,
            eq.info.iterations,
        )  # fmt: skip

    def _batch_loss(self, target: Any) -> BatchLoss:
        return BatchLoss(self.loss, self._uses_theta, target)

    def _record_first(self, solved: SolvedBatch) -> None:
        """The first pass: each batch's :class:`BatchSolve`."""
        eq = solved.equilibrium
        self._first[solved.key] = len(self._solves)
        if eq is None:
            dtype = self.layout.dtype
            self._solves.append(
                BatchSolve(solved.info, 0, 0.0, dtype, solved.excluded, solved.forward_iterations)
            )
            return
        self._widest = max(self._widest, eq.problem.state.size)
        norm = float(torch.linalg.vector_norm(eq.h.double()))
        state, iterations = eq.problem.state, solved.forward_iterations
        self._solves.append(  # cond(I − J) joins the record once a pass has factorised it
            BatchSolve(solved.info, state.samples, norm, state.dtype, solved.excluded, iterations)
        )

    def _each(
        self,
        compute: Callable[[ReadyBatch], Any],
        empty: Callable[[], Any],
        desc: str | None = None,
    ) -> Any:
        """One pass of ``compute`` over the batches with samples, θ checked first."""
        if [t._version for t in self.layout.tensors(self.theta)] != self._versions:
            raise StaleEquilibriumError(
                "theta was modified in place after the DatasetEquilibrium was built, so its "
                "batches' statistics and stored solves are stale. Build a new one after "
                "changing theta (or pass copies: theta.clone())."
            )

        def visit(solved: SolvedBatch) -> Any:
            eq, loss = solved.equilibrium, solved.loss
            if eq is None or loss is None:  # every sample of this batch was excluded
                return None
            value = compute(ReadyBatch(solved, eq, loss))
            self._record_condition(solved)
            return value

        return self._stream.run(self._form, visit, empty, desc)

    def _record_condition(self, solved: SolvedBatch) -> None:
        """Give a batch's :class:`BatchSolve` the ``cond(I − J)`` of a pass that factorised it.

        The first pass solved only its fixed point; the state error needs the condition.
        """
        index = self._first.get(solved.key)
        eq = solved.equilibrium
        if index is None or eq is None:
            return
        record = self._solves[index]
        if record.info.condition_number is None and eq.info.condition_number is not None:
            self._solves[index] = replace(record, info=eq.info)

    def _cached_bytes(self, solved: SolvedBatch, eq: Equilibrium) -> int:
        """Estimated bytes a batch holds once stored and used for products."""
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

    def _stored(self, solved: SolvedBatch) -> bool:
        entry = self._stream.store.get(solved.key)
        return entry is not None and entry.solved is solved

    # ------------------------------------------------------------------ derivatives
    def grad(self) -> Parameters:
        """The data-set gradient, in θ's structure (one pass)."""
        total = self._each(
            lambda batch: self.layout.flatten(batch.equilibrium.grad(batch.loss)),
            lambda: self._zeros(self.num_parameters),
            "gradient",
        )
        return self.layout.unflatten(total)

    @overload
    def hessian(self, split: Literal[False] = False) -> Tensor: ...
    @overload
    def hessian(self, split: Literal[True]) -> HessianSplit: ...
    def hessian(self, split: bool = False) -> Tensor | HessianSplit:
        """The data-set Hessian ``[P, P]``, dense, in one pass over the batches.

        Each batch's Hessian is added in place into one ``[P, P]`` sum and dropped with
        the batch's sensitivity Z ``[S, d, P]``; a stored batch is solved afresh from its
        fixed point for this, so no Z stays stored.

        Args:
            split: deprecated: ``split=True`` returns what :meth:`hessian_split` does.

        Returns:
            The Hessian of the data-set loss ``[P, P]`` (a :class:`HessianSplit` with the
            deprecated ``split=True``).
        """
        if split:
            split_deprecated("DatasetEquilibrium.hessian", "data.hessian_split()")
            return self.hessian_split()
        p = self.num_parameters
        return self._each(
            lambda batch: self._fresh(batch).hessian(batch.loss),
            lambda: self._zeros(p, p),
            "Hessian",
        )

    def hessian_split(self) -> HessianSplit:
        """The data-set Hessian's two parts, dense, in one pass over the batches.

        As :meth:`hessian`, with two ``[P, P]`` sums: the loss curvature
        ``Σ [I; Z]ᵀ∇²L[I; Z]`` and the dynamics curvature ``Σ [I; Z]ᵀ∇²(λᵀf)[I; Z]``
        over the batches.

        Returns:
            ``.loss_curvature``, ``.dynamics_curvature`` and their sum ``.total``, each
            ``[P, P]``.
        """
        p = self.num_parameters

        def one(batch: ReadyBatch) -> tuple[Tensor, Tensor]:
            parts = self._fresh(batch).hessian_split(batch.loss)
            return parts.loss_curvature, parts.dynamics_curvature

        loss_part, dynamics_part = self._each(
            one, lambda: (self._zeros(p, p), self._zeros(p, p)), "Hessian"
        )
        return HessianSplit(loss_part, dynamics_part, loss_part + dynamics_part)

    def _fresh(self, batch: ReadyBatch) -> Equilibrium:
        """The batch's equilibrium, for a dense form whose Z must not stay stored.

        Returns:
            The batch's equilibrium, solved afresh from its fixed point if the store
            holds it (so that the sensitivity Z the dense form builds is dropped with it).
        """
        eq = batch.equilibrium
        return self._solve(batch.solved.x, h0=eq.h) if self._stored(batch.solved) else eq

    def hessian_operator(self, part: str = "total") -> CurvatureOperator:
        """The data-set Hessian, or one part of it, as a ``P × P`` operator.

        Each block product ``H V`` (``V`` ``[P, K]``) is one pass over the data, every
        batch's solves shared by the block's K directions.

        Args:
            part: ``"total"``, ``"loss_curvature"`` or ``"dynamics_curvature"``.

        Returns:
            The operator of exact products.
        """
        check_part(part)

        def products(v: Tensor) -> Tensor:
            return self._each(
                lambda batch: batch.equilibrium.block_products(batch.loss, part)(v),
                lambda: torch.zeros_like(v),
            )

        # every rank must split a block the same way: collectives pair up in order
        chunk = default_chunk_size(self.num_parameters + self._chunk_width())
        return CurvatureOperator(products, self.layout, part, chunk, streamed=True)

    def _chunk_width(self) -> int:
        return self._widest

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.layout.dtype, device=self.layout.device)

    def hvp(self, v: Parameters) -> Parameters:
        """``H v`` of the data-set loss; ``v`` θ-structured or flat ``[P]``."""
        return self.hessian_operator() @ v


def _sample_dim(t: Tensor, dim: int, samples: int) -> int:
    """The dimension of a batch's tensor that indexes its samples.

    Returns:
        ``dim`` (the state's ``batch_dim``) where ``t`` has the samples there, else 0 (a
        sample-first target of time-major inputs).
    """
    return dim if -t.ndim <= dim < t.ndim and t.shape[dim] == samples else 0
