"""One model over one data set: its batches formed and its passes run, checked.

:class:`ModelPasses` is what :class:`deqhess.ModelCurvature`'s operators stand on: the
arguments kept and checked (:mod:`deqhess.models.arguments`), the model's modes checked
before every pass and its state compared bit for bit after it, each batch formed into its
graph (:class:`deqhess.models.graph.BatchGraph`) with every DEQ layer's convergence and
accuracy watched (unconverged samples refused, or left out and the batch rerun on the
others), and one pass of the streaming engine (:class:`deqhess.streaming.Stream`) summing
a term per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..batches import held_bytes
from ..chunks import default_chunk_size
from ..deprecation import renamed
from ..errors import ConvergenceError, DeqhessError, InputError, ModelChangedError
from ..linear.kept import KeptFactors
from ..locking import modules_locked
from ..nn import DEQ, LayerCall, layer_calls
from ..nn.reparametrize import functional_call
from ..options import integer
from ..parameters import ParameterLayout
from ..streaming import (
    DEFAULT_CACHE_BYTES,
    Addend,
    Batch,
    Formed,
    Offer,
    StoredBatch,
    Stream,
    check_reduction,
    response_tolerance,
)
from ..streaming.batch_checks import refuse_mixed_dtypes, refuse_mixed_model
from ..streaming.grouping import LossAtOutput, grouping_of
from .arguments import (
    check_loss_arguments,
    chosen_names,
    deq_layers,
    loss_reduction,
    restricted,
    sample_counter,
    split_layer,
)
from .backward import BlockBackward, reentrant_checkpoint_named
from .dense import Blocks
from .graph import BatchGraph, LossFunc
from .held import HeldGraphs, state_token
from .info import CurvatureInfo
from .modes import (
    StateGuard,
    check_modes,
    check_parameters_read,
    check_second_order_graph,
)
from .sample_sites import Stacking, may_have_sites

__all__ = ["ModelPasses"]

#: the parts whose products differentiate the first-order gradients again
_SECOND_ORDER = ("total", "loss_curvature", "dynamics_curvature")


class ModelPasses:
    """A model, a loss, chosen parameters and data: batches formed, passes run.

    Subclasses (:class:`deqhess.ModelCurvature`) say what to compute on each batch's
    graph; the seams ``_values``, ``_agree`` and ``_group`` let the distributed form
    shard the data and agree across ranks.
    """

    _label = "ModelPasses"

    def _configure(
        self,
        model: nn.Module,
        loss: LossFunc | None,
        data: Iterable[tuple[Any, Any]] | None,
        theta: Sequence[str] | Sequence[Tensor] | None,
        *,
        reduction: str | None,
        split_at: nn.Module | str | None,
        batch_dim: int | None,
        batch_size_fn: Callable[[Any], int] | None,
        chunk_size: int | None,
        backward: str,
        cache_bytes: int | None,
        exclude_unconverged: bool,
        progress: bool | None,
        loss_func: Any,
        params: Any,
        warm_start_bytes: Any,
    ) -> None:
        """The arguments and the model checked and kept; this process alone."""
        where = self._label
        loss = renamed(loss, loss_func, old="loss_func", new="loss", where=where)
        theta = renamed(theta, params, old="params", new="theta", where=where)
        cache_bytes = renamed(
            cache_bytes, warm_start_bytes, old="warm_start_bytes", new="cache_bytes", where=where
        )
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not callable(loss):
            raise InputError(f"loss must be callable; got {type(loss).__name__}.")
        check_loss_arguments(loss)
        if data is None:
            raise InputError(f"{where} needs data: the (x, target) batches.")
        self.model, self.loss = model, loss
        self.names = chosen_names(model, theta)
        self.layout = ParameterLayout(dict(zip(self.names, self._values(), strict=True)))
        self.reduction = reduction or loss_reduction(loss)
        check_reduction(self.reduction)
        self.split_at = split_layer(model, split_at)
        if batch_dim is not None and (
            not isinstance(batch_dim, int) or isinstance(batch_dim, bool) or batch_dim < 0
        ):
            raise InputError(f"batch_dim must be a non-negative int or None; got {batch_dim!r}.")
        self.batch_dim = batch_dim
        self.batch_size_fn = batch_size_fn or sample_counter(batch_dim)
        self.chunk_size = (
            default_chunk_size(2 * self.layout.size)
            if chunk_size is None
            else integer(chunk_size, "chunk_size", minimum=1)
        )
        self._chunk_chosen = chunk_size is not None
        self.backward = BlockBackward(backward)
        if backward == "batched" and deq_layers(model):
            raise InputError(
                "backward='batched' (torch.autograd.grad with is_grads_batched=True) cannot "
                "go through a deqhess.nn.DEQ layer: torch's legacy batching cannot run its "
                "solves. Use backward='vmap' (what 'auto', the default, picks for DEQ models) "
                "or 'loop'."
            )
        self.exclude_unconverged = bool(exclude_unconverged)
        check_modes(model, where)
        self._stream = Stream(
            data, label=where, reduction=self.reduction, count=self.batch_size_fn,
            sample_dim=batch_dim,
            cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes,
            progress=progress, group=self._group(), device=self.layout.device,
            guard=self._guard, version=self._version, on_restart=self._restarted,
            lock=lambda: modules_locked(model),
        )  # fmt: skip
        if self._stream.data.one_shot:
            raise InputError(
                f"data is a one-shot iterator ({type(data).__name__}); every product reads "
                "the data once, so pass a list or a DataLoader."
            )
        self._layer_names = {id(m): name for name, m in model.named_modules() if isinstance(m, DEQ)}
        self._blocks = Blocks(self.chunk_size)  # the memory one direction takes, once measured
        self._held: HeldGraphs | None = None  # batch graphs kept while an operator is held
        self._widest_batch = 1
        # the parts whose batch graphs a whole pass checked (check_second_order_graph)
        self._graph_checked: set[str] = set()
        self._warned_rows = False
        # whether each sample's rows came from stacked cotangents on the last pass that
        # tried (deqhess.models.sample_sites): a model whose graph does not show them is
        # not made to evaluate its DEQ cells visibly on every dense GGN or per-sample pass;
        # and whether the dense Hessian's rows of the layers on the data still come from
        # each sample's curvature (deqhess.models.input_sites: a batch failing it stops it)
        promising = may_have_sites(model, self.names)
        self._stacking = {
            "ggn": Stacking(promising), "rows": Stacking(promising), "total": Stacking(True)
        }  # fmt: skip
        self.info = CurvatureInfo()

    # ------------------------------------------------------------------ set-up seams
    def _values(self) -> list[Tensor]:
        named = dict(self.model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ModelChangedError(
                f"{self._label} was built on the model's parameters {missing[:4]}"
                f"{' …' if len(missing) > 4 else ''}, which it no longer has (a "
                "parametrization registered, weights tied or a module replaced since): its "
                "operators are of the model as it was. Build a new "
                f"{self._label} for the model as it is now."
            )
        return [named[n].detach() for n in self.names]

    def _as_built(self, values: list[Tensor]) -> list[Tensor]:
        """``values``, where each parameter's shape, dtype and device are as built.

        Args:
            values: the chosen parameters now (:meth:`_values`).

        Returns:
            ``values``.

        Raises:
            ModelChangedError: naming the first such parameter, as built and as it is.
        """
        layout = self.layout
        for name, value, shape in zip(self.names, values, layout.shapes, strict=True):
            if value.shape != shape or value.dtype != layout.dtype or value.device != layout.device:
                was = f"{tuple(shape)} {layout.dtype} on {layout.device}"
                now = f"{tuple(value.shape)} {value.dtype} on {value.device}"
                raise ModelChangedError(
                    f"{self._label} was built on the model's parameter {name!r} as {was}, and "
                    f"it is now {now} (model.float(), .to(...) or a resized layer since): its "
                    f"operators are of the model as it was. Build a new {self._label} for the "
                    "model as it is now (with data of its dtype and device)."
                )
        return values

    def _agree(self) -> None:
        """Nothing to agree on in one process (the distributed form checks its ranks)."""

    def _group(self) -> Any:
        return None

    @property
    def num_parameters(self) -> int:
        """``P``: the entries of the chosen parameters; the operators are ``P × P``."""
        return self.layout.size

    @property
    def num_samples(self) -> int:
        """``N``: the samples the sums count (those kept), by the first pass.

        A forward pass of its own runs if none ran yet, refused with
        :class:`deqhess.InputError` when the data hold no sample or none converged.
        """
        self._first_pass()
        return self._stream.num_samples or 0

    @property
    def num_batches(self) -> int:
        """The number of batches (over every rank), by the first pass."""
        self._first_pass()
        return self._stream.total_batches or 0

    @property
    def excluded_samples(self) -> int:
        """Samples left out as unconverged (``exclude_unconverged``), by the first pass."""
        self._first_pass()
        return self._stream.excluded_samples

    @property
    def cached_bytes(self) -> int:
        """The bytes kept between passes (at most ``cache_bytes``).

        The fixed points, and where they fit beside them, the dense factors of ``I − J``.
        """
        return self._stream.store.used

    def _first_pass(self) -> None:
        if self._stream.record is None:
            self._stream.run(self._former(None), lambda graph: None)
            self._check_samples()

    def _version(self) -> tuple:
        """The model's parameters and buffers as they are now.

        Returns:
            :meth:`StateGuard.snapshot`'s token (names, identities, versions): a change
            between products starts the stream's checks and its store afresh.
        """
        return StateGuard.snapshot(self.model)

    def _restarted(self) -> None:
        """The model changed between products: the ranks agree on it again."""
        if self._held is not None:
            self._held.clear()
        self._agree()

    @contextlib.contextmanager
    def holding(self, products: int | None = None) -> Iterator[None]:
        """Within the block, each pass keeps its batches' graphs for the next.

        What an analysis taking many products does through its operator
        (:meth:`deqhess.operator.Operator.holding`; see :mod:`deqhess.models.held`):
        a batch whose content recurs is taken from its graph, within what the cache's
        budget (``cache_bytes``) leaves beside the warm starts; every graph is dropped at
        the end of the block, or when the model's (or a module loss's) parameters,
        buffers, modes or hooks change. Nested blocks hold once.

        Args:
            products: the products the block will take at most (None: not known); the
                DEQ layers of a graph kept for them choose their linear solver for that
                many directions (a factorised ``I − J`` where it pays over them).

        Yields:
            Nothing: the products inside share graphs.
        """
        if self._held is not None:
            yield
            return
        store = self._stream.store
        held = HeldGraphs(
            lambda: max(store.budget - store.used, 0), state_token(self.model, self.loss),
            products,
        )  # fmt: skip
        self._held = held
        store.lent = lambda: held.used  # one budget: the graphs and what the store keeps
        try:
            yield
        finally:
            self._held = None
            store.lent = lambda: 0

    # ------------------------------------------------------------------ one pass
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Around every pass: the model's modes checked before, its state after.

        A reentrant checkpoint that a backward of the pass meets is named
        (:func:`~deqhess.models.backward.reentrant_checkpoint_named`).

        A module that is another function on every call is refused by name
        (:class:`deqhess.InputError`) before the pass; a forward that wrote the model's
        parameters or buffers (in place, through ``.data`` or by rebinding), with
        :class:`deqhess.ModelChangedError` after it — what it wrote put back first, also
        when the pass fails for another reason (then the refusal is raised from that
        failure).

        Yields:
            Nothing: the pass runs inside.
        """
        check_modes(self.model, self._label)
        state = StateGuard(self.model)
        with state.watching():
            try:
                with reentrant_checkpoint_named():
                    yield
            except Exception as failure:  # named as a write, if it was one (from the failure)
                state.check(self._label, failure)
                raise
            except BaseException:
                state.restore()
                raise
        state.check(self._label)

    def _former(
        self,
        part: str | None,
        directions: int | None = None,
        visible: Callable[[], bool] | None = None,
    ) -> Callable[[Batch, StoredBatch | None], Formed]:
        """How a pass forms one batch: its graph for ``part``.

        Under ``exclude_unconverged`` a batch with unconverged samples is rerun, cold, on
        its converged ones (a :class:`deqhess.ConvergenceError` if they miss again);
        otherwise such a batch is refused with one (see :meth:`_converged`).

        Args:
            part: one of :data:`MODEL_PARTS`, or None for the loss alone (its gradient).
            directions: the directions per derivative pass the DEQ layers are to expect
                (their ``'auto'`` linear solver chooses by it; None: not known).
            visible: asked before each batch: its DEQ calls' cells evaluated once more
                in its graph (``layer_calls(visible=True)``); such graphs are neither
                taken from nor kept for a held operator (None: never).

        Returns:
            ``(batch, stored) ↦`` the batch's :class:`~deqhess.streaming.Formed`: its
            graph, samples and kept indices; no graph when no sample converged.
        """
        # the model as built is checked in the pass, where the ranks of the distributed
        # form agree on a failure (one rank's alone, raised here, left the others waiting)
        lost: ModelChangedError | None = None
        try:
            params = self._leaves()
        except ModelChangedError as error:  # a chosen parameter gone
            params, lost = {}, error
        begun: list[bool] = []
        checked: list[bool] = []

        def form(batch: Batch, stored: StoredBatch | None) -> Formed:
            if not checked:
                if lost is not None:
                    raise lost
                self._as_built(list(params.values()))
                checked.append(True)
            try:
                return formed(batch, stored)
            except DeqhessError:
                raise
            except RuntimeError as error:  # torch's raw type error, where the data's dtype differs
                refuse_mixed_dtypes(error, batch.index, batch.x, batch.target, self.layout.dtype)
                refuse_mixed_model(error, self.model, self.layout.dtype, self._label)
                raise

        def formed(batch: Batch, stored: StoredBatch | None) -> Formed:
            held = self._held
            if visible is not None and visible():
                return fresh(batch, stored, True)
            if held is None:
                return fresh(batch, stored)
            if not begun:  # the pass's first batch: what was kept is of this model, or dropped
                begun.append(True)
                held.new_pass(part, state_token(self.model, self.loss))

            def verify(kept: Formed) -> Any:
                return self._response(params, batch, stored, kept.kept)

            found = held.get(part, batch.key, verify)
            if found is not None:
                return found
            formed = fresh(batch, stored)
            held.offer(part, batch.key, formed, (batch.x, batch.target))
            return formed

        def fresh(batch: Batch, stored: StoredBatch | None, visible: bool = False) -> Formed:
            n = len(batch.hashes)
            warm = stored.warm if stored is not None else {}
            # a graph kept for a held operator serves the products of every pass
            hint = directions if self._held is None else self._held.expected(directions)
            calls: list[LayerCall] = []
            try:
                graph, _ = self._graph(
                    params, batch.x, batch.target, n, part, warm, hint, calls, visible,
                    charge=self._charge(stored), factors=self._factors(stored),
                )  # fmt: skip
            except DeqhessError as error:
                # an unconverged sample's last iterate can make its I − J singular (or its J
                # non-finite) for the first-order graph: its samples decide, as below
                keep = self._converged(batch, calls, n, error)
                if keep is None:
                    raise
            else:
                keep = self._converged(batch, calls, n)
                if keep is None:
                    offers = (
                        () if stored is not None else (Offer(lambda: held_bytes(warm), warm=warm),)
                    )
                    return self._formed(graph, calls, n, None, 0, offers)
            if len(keep) == 0:
                return Formed(None, 0, keep, n)
            x, target = restricted(batch.x, batch.target, keep, self.batch_dim)
            # cold: the same samples converge again
            graph, calls = self._graph(
                params, x, target, len(keep), part, {}, hint, visible=visible
            )
            if self._converged(batch, calls, len(keep)) is not None:
                raise ConvergenceError(
                    f"{self._label}: rerun on the samples its DEQ layers converged on, batch "
                    f"{batch.index + 1} of this pass did not converge again, so the layers' "
                    "samples are not the batch's in their order: the model reorders or mixes the "
                    "samples before a DEQ layer (a flip, a shuffle, attention or a norm "
                    "across the batch), or a layer is not a per-sample (batch_dim=0) map. "
                    "exclude_unconverged needs each layer's sample i to be the batch's; "
                    "leave it off and make the layers converge (max_iter, a fallback "
                    "solver, a looser tol)."
                )
            return self._formed(graph, calls, len(keep), keep, n - len(keep), ())

        return form

    def _response(
        self, params: dict[str, Tensor], batch: Batch, stored: StoredBatch | None,
        keep: Tensor | None,
    ) -> Any:  # fmt: skip
        """The model's output on a batch (its kept samples), run forward without a graph.

        What a kept graph's first reuse checks against the first pass's output (see
        :mod:`deqhess.models.held`): the DEQ layers start from the batch's stored fixed
        points.

        Args:
            params: the chosen parameters' leaves.
            batch: the batch.
            stored: what the store holds of it (its warm starts).
            keep: the kept samples' indices (None: all).

        Returns:
            The output, as the formed batch's response.
        """
        x, target = batch.x, batch.target
        if keep is not None:
            x, target = restricted(x, target, keep, self.batch_dim)
        warm: dict = {}
        charge = None
        if stored is not None and keep is None:
            warm, charge = stored.warm, self._charge(stored)
        with torch.no_grad(), layer_calls(
            warm=warm, charge=charge, keep_best=True, layers=self._layers()
        ):  # fmt: skip
            return functional_call(self.model, params, (x,), watch_rebinds=True)

    def _formed(
        self,
        graph: BatchGraph,
        calls: list[LayerCall],
        samples: int,
        keep: Tensor | None,
        excluded: int,
        offers: tuple[Offer, ...],
    ) -> Formed:
        """A formed batch whose model output is checked to the DEQ layers' tolerance."""
        rtol = max((call.info.tolerance.rtol for call in calls), default=0.0)
        self._widest_batch = max(self._widest_batch, samples)
        first = self._stream.record is None  # the first pass checks how the loss groups
        if first:
            check_parameters_read(self.model, self.names, graph.loss)
        if graph.part in _SECOND_ORDER and graph.part not in self._graph_checked:
            # a torch._weight_norm the modules do not declare, on every batch's graph of
            # the part's first pass (a later pass reads the same data through the same
            # model, checked)
            check_second_order_graph(
                graph.first, graph.params, self.names, f"the {graph.part!r} operator"
            )
        coupled = sized = ordered = None
        if first and self.batch_dim == 0:  # what the loss makes of the samples' grouping
            at_output = LossAtOutput(
                graph.output, graph.target, graph.loss, graph._loss_of, graph.loss_func
            )
            coupled, sized, ordered = grouping_of(at_output, samples, self.reduction)
        return Formed(
            graph, samples, keep, excluded, response=graph.output, response_dim=self.batch_dim,
            tolerance=response_tolerance(rtol, self.layout.dtype), offers=offers,
            coupled=coupled, sized=sized, ordered=ordered,
        )  # fmt: skip

    def _charge(self, stored: StoredBatch | None) -> Callable[[int], bool] | None:
        """What charges what a batch's DEQ layers add to its stored warm starts.

        Fixed points come before dense factors: where the budget has no room for one,
        kept factors are given up (the batch's own first) until it has
        (:meth:`~deqhess.streaming.BatchStore.grow`).

        Args:
            stored: what the store holds of the batch, or None (a new entry, charged
                whole when offered to the store).

        Returns:
            ``bytes ↦`` whether they fit (charged if so; negative: given back), or None.
        """
        if stored is None:
            return None
        store = self._stream.store
        return lambda nbytes: store.grow(stored, nbytes, give_way=_factors_charged)

    def _factors(self, stored: StoredBatch | None) -> Callable[[int], bool] | None:
        """What charges a batch's DEQ layers' dense factors of ``I − J``, if they keep them.

        Only in a stored batch's entry, once a whole pass has offered every batch's warm
        starts to the store (a batch recurring in the first pass, or a first pass that
        failed, would otherwise charge its factors before a later batch's fixed
        points); none while an analysis holds graphs, which serve its passes whole.

        Args:
            stored: what the store holds of the batch, or None.

        Returns:
            ``bytes ↦`` whether they fit (charged if so; negative: given back), or None:
            no factors kept.
        """
        if stored is None or self._held is not None or self._stream.record is None:
            return None
        store = self._stream.store
        return lambda nbytes: store.grow(stored, nbytes)

    def _layers(self) -> list[DEQ]:
        """The model's DEQ layers (their calls are recorded from any thread)."""
        return [m for m in self.model.modules() if isinstance(m, DEQ)]

    def _leaves(self) -> dict[str, Tensor]:
        return {n: t.requires_grad_() for n, t in zip(self.names, self._values(), strict=True)}

    def _graph(
        self,
        params: dict[str, Tensor],
        x: Any,
        target: Any,
        samples: int,
        part: str | None,
        warm: dict,
        directions: int | None,
        calls: list[LayerCall] | None = None,
        visible: bool = False,
        charge: Callable[[int], bool] | None = None,
        factors: Callable[[int], bool] | None = None,
    ) -> tuple[BatchGraph, list[LayerCall]]:
        """The batch's graph, and the DEQ layers' calls of its forward (into ``calls``).

        ``charge`` and ``factors``: what charges what the layers add to a stored
        ``warm`` to the budget, and whether they keep their dense factors of ``I − J``
        there (:meth:`_charge`, :meth:`_factors`; see :func:`deqhess.nn.layer_calls`).

        Returns:
            ``(graph, calls)``.
        """
        calls = [] if calls is None else calls
        with layer_calls(
            warm=warm, records=calls, keep_best=True, directions=directions,
            watch_accuracy=True, visible=visible, charge=charge, factors=factors,
            layers=self._layers(),
        ):  # fmt: skip
            graph = BatchGraph(
                self.model, self.loss, self.layout, params, x, target, 1.0, part,
                self.split_at, self.backward, samples=samples,
            )  # fmt: skip
        return graph, calls

    def _converged(
        self, batch: Batch, calls: list[LayerCall], n: int, cause: Exception | None = None
    ) -> Tensor | None:
        """The samples every DEQ call of a batch's forward converged on.

        Args:
            batch: the batch (its index, for the message).
            calls: the DEQ layers' calls in its forward, with their statistics.
            n: the batch's sample count.
            cause: the error the batch's graph met, if any (the refusal is raised from it).

        Returns:
            The indices (``[k]``, ascending) of the samples every call converged on, or
            None if all did.

        Raises:
            ConvergenceError: a sample missed a layer's tolerance and
                ``exclude_unconverged`` is off, or a layer's samples cannot be matched to
                the batch's.
        """
        missed = [call for call in calls if not bool(call.info.converged_mask.all())]
        if not missed:
            return None
        first = missed[0]
        name = self._layer_names.get(id(first.layer), type(first.layer).__name__)
        info = first.info
        if not self.exclude_unconverged:
            raise ConvergenceError(
                f"{self._label}: the DEQ layer model.{name} left {info.unconverged} of "
                f"{info.converged_mask.numel()} samples of batch {batch.index + 1} of this "
                "pass unconverged "
                f"(largest residual {float(info.sample_residuals.max()):.2e}; tolerance "
                f"rtol={info.tolerance.rtol:g}). Their states are not fixed points, so no "
                "derivative there is the model's. Pass exclude_unconverged=True to leave such "
                "samples out (counted in excluded_samples), or make the layer converge "
                "(max_iter, a fallback solver, a looser tol).",
                info,
            ) from cause
        keep = torch.ones(n, dtype=torch.bool)
        for call in missed:
            mask = call.info.converged_mask.cpu()
            if mask.numel() == 1:
                mask = mask.expand(n)
            if mask.numel() != n:
                layer = self._layer_names.get(id(call.layer), "?")
                raise ConvergenceError(
                    f"{self._label}: the DEQ layer model.{layer} solved {mask.numel()} "
                    f"systems for a batch of {n} samples, so its unconverged ones cannot be "
                    "matched to samples to leave out; make it converge instead.",
                    call.info,
                )
            keep &= mask
        return keep.nonzero()[:, 0]

    def _sum(
        self,
        part: str | None,
        compute: Callable[[BatchGraph], Tensor | Addend],
        empty: Callable[[], Tensor],
        desc: str | None = None,
        directions: int | None = None,
        visible: Callable[[], bool] | None = None,
    ) -> Tensor:
        """One pass: ``Σ_b w_b compute(graph of batch b)`` (see :class:`Stream`).

        Refused with :class:`deqhess.InputError` when the data hold no sample, or none
        converged.

        Args:
            part: the graphs' part (None: the loss only).
            compute: ``graph ↦`` the batch's unweighted term (an addend, such as a
                dense form's symmetric term, adds itself, to the sum's upper triangle:
                see :func:`~deqhess.models.symmetric.mirror_upper_`).
            empty: the sum's zero (a rank or a data set without batches).
            desc: the progress bar's label (None: no bar).
            directions: the directions per derivative pass, for the DEQ layers.
            visible: asked before each batch: the DEQ layers' cells evaluated once more
                in its graph (see :meth:`_former`; None: never).

        Returns:
            The weighted sum, shaped as ``compute``'s terms.
        """
        total = self._stream.run(
            self._former(part, directions, visible),
            lambda graph: None if graph is None else compute(graph), empty, desc,
        )  # fmt: skip
        if part is not None:  # a whole pass of the part: each batch's graph was checked
            self._graph_checked.add(part)
        if self._held is not None:  # the next pass is compared with the state it left
            self._held.ended(state_token(self.model, self.loss))
        self._check_samples()
        # a tensor: every term is one, and a pass without a term gives empty()'s zero
        return cast(Tensor, total)

    def _check_samples(self) -> None:
        """Refuse data without a sample to analyse (the same on every rank)."""
        if self._stream.num_samples:
            return
        if self._stream.excluded_samples:
            raise InputError(
                f"no sample converged: all {self._stream.excluded_samples} were excluded as "
                "unconverged. Make the model's DEQ layers converge (max_iter, a fallback "
                "solver, a looser tol)."
            )
        raise InputError("data is empty; pass at least one (x, target) batch.")

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.layout.dtype, device=self.layout.device)


def _factors_charged(value: Any) -> int | None:
    """The bytes charged for kept dense factors, which give way to fixed points."""
    return value.charged if isinstance(value, KeptFactors) else None
