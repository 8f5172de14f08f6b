"""``ModelCurvature``: exact curvature operators of a whole model containing DEQ layers.

For a model ``o = model(x)`` (e.g. encoder → :class:`deqhess.nn.DEQ` → head), a loss
``ℓ(o, y)``, parameters θ (default: all) and data, the data-set loss is
``L(θ) = Σ_b w_b ℓ(model(x_b), y_b)`` with ``w_b = n_b / N`` (``reduction="mean"``:
ℓ a batch mean, the total the data mean) or ``1`` (``"sum"``) — the convention of
curvlinops and of :class:`deqhess.DatasetEquilibrium`. Four operators of it:

=======================  ================================================================
``total``                the Hessian ``∇²L`` — exact through every DEQ layer
``ggn``                  the GGN ``Σ_b Jᵀ∇²ℓJ`` at the model's output (curvlinops' GGN);
                         positive semi-definite for a convex ℓ (MSE, cross-entropy)
``loss_curvature``       ``[I; Z]ᵀ∇²L[I; Z]`` at one DEQ layer's fixed point (everything
                         after it is the loss ``L(h, θ)``): can be indefinite with a head
``dynamics_curvature``   the rest of the Hessian: ``Σ (∂L/∂h)ᵢ ∇²h*ᵢ``
=======================  ================================================================

The split is defined at one DEQ layer (``split_at``; default the model's only one):
the encoder before it enters its dynamics through the input, the head after it its
loss. ``loss_curvature + dynamics_curvature = total``.

Every product is one pass of the streaming engine (:class:`deqhess.streaming.Stream`):
each batch's forward runs once (each DEQ solves once, from the fixed point the same
batch content reached last time if the store kept it) and the K directions of a block
share its graph. Memory: one batch's graph, K-fold in its backward; not the number of
batches. Like curvlinops' operators, these read the model's parameters as they are at
each product. Every pass checks that the data, the model's outputs on them and the
model itself are what the first pass saw.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..batches import held_bytes
from ..chunks import default_chunk_size
from ..deprecation import UNSET, renamed
from ..errors import ConvergenceError, InputError
from ..implicit import CurvatureOperator, HessianSplit
from ..implicit.hessian import split_deprecated
from ..implicit.operators import check_part
from ..memory import check_dense
from ..nn import DEQ, LayerCall, layer_calls
from ..options import integer
from ..parameters import ParameterLayout, Parameters
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
from .arguments import (
    chosen_names,
    deq_layers,
    floating_leaves,
    loss_reduction,
    restricted,
    sample_counter,
    split_layer,
)
from .backward import BlockBackward
from .dense import Blocks, batch_dense, run_block, uses_jacobians
from .graph import BatchGraph, LossFunc
from .info import CurvatureInfo, assembly
from .modes import StateGuard, check_modes, check_second_order
from .per_sample import output_jacobians, sample_gradients
from .symmetric import SymmetricProduct, mirror_upper_

__all__ = ["MODEL_PARTS", "CurvatureInfo", "ModelCurvature"]

#: the operators of a model: the Hessian, the output GGN, and the split at a DEQ layer.
MODEL_PARTS = ("total", "ggn", "loss_curvature", "dynamics_curvature")

_SPLIT_PARTS = ("loss_curvature", "dynamics_curvature")


class ModelCurvature:
    """Exact Hessian, GGN and split operators of a model's data-set loss.

    Args:
        model: an ``nn.Module`` mapping a batch's ``x`` to an output; typically holding
            one or more :class:`deqhess.nn.DEQ` layers. Every pass reruns it, so it must
            be one fixed function: modules that draw random numbers or use batch
            statistics in training mode (dropout, batch norm, …) are refused by name —
            call ``model.eval()`` first. Nothing of the model changes (parameters,
            buffers, random state).
        loss: ``loss(output, target)`` → 0-dim tensor, e.g. ``nn.MSELoss()``.
            (Formerly ``loss_func``.)
        data: ``(x, target)`` batches, iterated once per pass (a list, a DataLoader;
            not a generator). Every pass must read the same samples — in any order and
            grouping — or :class:`deqhess.DataChangedError` says what changed.
        theta: which parameters: None (all that require grad), or names of
            ``model.named_parameters()`` or the parameters themselves (flattened in the
            order given). (Formerly ``params``.)
        reduction: ``"mean"`` or ``"sum"`` over the data; default ``loss.reduction``
            if it has one, else ``"mean"``.
        split_at: the DEQ layer (a module, or its name in ``model``) at whose fixed point
            the Hessian splits into loss and dynamics curvature; default the model's
            only DEQ layer (with several, the split parts need it).
        batch_dim: the dimension of the batch's tensors (inputs, targets, outputs) that
            indexes its samples, default 0 (time-major sequences: 1); None makes every
            batch one sample. It is how a pass tells samples apart to check them
            (shuffling regroups samples freely).
        batch_size_fn: ``x ↦`` the batch's sample count; default ``x.shape[batch_dim]``.
        chunk_size: directions per pass in ``to_dense`` and large blocks; default about
            4M numbers.
        cache_bytes: what is kept between passes, by batch content: each batch's DEQ
            fixed points (states, not graphs), to start its next solves from, until they
            hold this many bytes (the rest start cold; 0 keeps none). Default 1 GiB.
            (Formerly ``warm_start_bytes``.)
        backward: how a block's K directions go through a batch's graph: ``"auto"``
            (default), ``"vmap"``, ``"batched"`` (models without DEQ layers) or
            ``"loop"`` (see :class:`deqhess.models.backward.BlockBackward`).
        exclude_unconverged: leave out, and count in :attr:`excluded_samples`, the
            samples whose forward solve in any DEQ layer missed its tolerance, whatever
            the layers' own policies (the batch is rerun on its converged samples; needs
            tensor ``x`` and ``target`` indexed by sample in their first dimension).
            False (default): such a sample is refused with a
            :class:`deqhess.ConvergenceError` naming the layer — never analysed as if
            it were a fixed point.
        progress: progress bars over batches (None: only on a terminal).

    Raises:
        InputError: a ``model`` that is not an ``nn.Module``, a ``loss`` that is not
            callable, no ``data`` or a one-shot iterator for it; unknown or no parameter
            names, parameters of several dtypes or devices; an unknown reduction,
            backward mode or ``batch_dim``; ``backward="batched"`` with DEQ layers; a
            ``split_at`` that is not a DEQ layer of the model; a module that is not one
            fixed function; an argument given under both its name and its former name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import deqhess as dh
        >>> class Cell(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(4, 4)
        ...     def forward(self, x, h):
        ...         return torch.tanh(0.5 * self.lin(h) + x)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), dh.nn.DEQ(Cell()), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> data = [(x, y)]
        >>> curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
        >>> H = curvature.hessian()  # P = 16 + 20 + 10 parameters
        >>> H.shape
        torch.Size([46, 46])
        >>> v = torch.randn(46, dtype=torch.float64)
        >>> torch.allclose(curvature.hessian_operator() @ v, H @ v)
        True
    """

    _label = "ModelCurvature"

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunc | None = None,
        data: Iterable[tuple[Any, Any]] | None = None,
        theta: Sequence[str] | Sequence[Tensor] | None = None,
        *,
        reduction: str | None = None,
        split_at: nn.Module | str | None = None,
        batch_dim: int | None = 0,
        batch_size_fn: Callable[[Any], int] | None = None,
        chunk_size: int | None = None,
        backward: str = "auto",
        cache_bytes: int | None = None,
        exclude_unconverged: bool = False,
        progress: bool | None = None,
        loss_func: Any = UNSET,
        params: Any = UNSET,
        warm_start_bytes: Any = UNSET,
    ) -> None:
        self._configure(
            model, loss, data, theta, reduction=reduction, split_at=split_at,
            batch_dim=batch_dim, batch_size_fn=batch_size_fn, chunk_size=chunk_size,
            backward=backward,
            cache_bytes=cache_bytes, exclude_unconverged=exclude_unconverged,
            progress=progress, loss_func=loss_func, params=params,
            warm_start_bytes=warm_start_bytes,
        )  # fmt: skip

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
        if data is None:
            raise InputError(f"{where} needs data: the (x, target) batches.")
        self.model, self.loss = model, loss
        self.names = chosen_names(model, theta)
        self.layout = ParameterLayout(dict(zip(self.names, self._values(), strict=True)))
        self.reduction = reduction or loss_reduction(loss)
        check_reduction(self.reduction)
        self.split_at = split_layer(model, split_at)
        if batch_dim is not None and (not isinstance(batch_dim, int) or batch_dim < 0):
            raise InputError(f"batch_dim must be a non-negative int or None; got {batch_dim!r}.")
        self.batch_dim = batch_dim
        self.batch_size_fn = batch_size_fn or sample_counter(batch_dim)
        self.chunk_size = (
            default_chunk_size(2 * self.layout.size)
            if chunk_size is None
            else integer(chunk_size, "chunk_size", minimum=1)
        )
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
        )  # fmt: skip
        if self._stream.data.one_shot:
            raise InputError(
                f"data is a one-shot iterator ({type(data).__name__}); every product reads "
                "the data once, so pass a list or a DataLoader."
            )
        self._layer_names = {id(m): name for name, m in model.named_modules() if isinstance(m, DEQ)}
        self._blocks = Blocks(self.chunk_size)  # the memory one direction takes, once measured
        self._widest_batch = 1
        self._warned_rows = False
        self.info = CurvatureInfo()

    # ------------------------------------------------------------------ set-up seams
    def _values(self) -> list[Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n].detach() for n in self.names]

    def _agree(self) -> None:
        """Nothing to agree on in one process (the distributed form checks its ranks)."""

    def _group(self) -> Any:
        return None

    @property
    def num_parameters(self) -> int:
        """``P``: the entries of the chosen parameters; the operators are ``P × P``."""
        return self.layout.size

    @property
    def parts(self) -> tuple[str, ...]:
        """The operators available: the split parts only with a split layer."""
        return MODEL_PARTS if self.split_at is not None else MODEL_PARTS[:2]

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
        """The bytes of the fixed points kept between passes (at most ``cache_bytes``)."""
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
        self._agree()

    # ------------------------------------------------------------------ one pass
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Around every pass: the model's modes checked before, its state after.

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
                yield
            except Exception as failure:  # named as a write, if it was one (from the failure)
                state.check(self._label, failure)
                raise
            except BaseException:
                state.restore()
                raise
        state.check(self._label)

    def _former(
        self, part: str | None, directions: int | None = None
    ) -> Callable[[Batch, StoredBatch | None], Formed]:
        """How a pass forms one batch: its graph for ``part``.

        Under ``exclude_unconverged`` a batch with unconverged samples is rerun, cold, on
        its converged ones (a :class:`deqhess.ConvergenceError` if they miss again);
        otherwise such a batch is refused with one (see :meth:`_converged`).

        Args:
            part: one of :data:`MODEL_PARTS`, or None for the loss alone (its gradient).
            directions: the directions per derivative pass the DEQ layers are to expect
                (their ``'auto'`` linear solver chooses by it; None: not known).

        Returns:
            ``(batch, stored) ↦`` the batch's :class:`~deqhess.streaming.Formed`: its
            graph, samples and kept indices; no graph when no sample converged.
        """
        params = self._leaves()

        def form(batch: Batch, stored: StoredBatch | None) -> Formed:
            n = len(batch.hashes)
            warm = stored.warm if stored is not None else {}
            graph, calls = self._graph(params, batch.x, batch.target, n, part, warm, directions)
            keep = self._converged(batch, calls, n)
            if keep is None:
                offers = () if stored is not None else (Offer(lambda: held_bytes(warm), warm=warm),)
                return self._formed(graph, calls, n, None, 0, offers)
            if len(keep) == 0:
                return Formed(None, 0, keep, n)
            x, target = restricted(batch.x, batch.target, keep, self.batch_dim)
            # cold: the same samples converge again
            graph, calls = self._graph(params, x, target, len(keep), part, {}, directions)
            if self._converged(batch, calls, len(keep)) is not None:
                raise ConvergenceError(
                    f"{self._label}: rerun on its converged samples, a batch did not converge "
                    "again; the model's DEQ layers are not per-sample (batch_dim=0) maps."
                )
            return self._formed(graph, calls, len(keep), keep, n - len(keep), ())

        return form

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
        return Formed(
            graph, samples, keep, excluded, response=graph.output, response_dim=self.batch_dim,
            tolerance=response_tolerance(rtol, self.layout.dtype), offers=offers,
        )  # fmt: skip

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
    ) -> tuple[BatchGraph, list[LayerCall]]:
        calls: list[LayerCall] = []
        with layer_calls(
            warm=warm, records=calls, keep_best=True, directions=directions, watch_accuracy=True
        ):
            graph = BatchGraph(
                self.model, self.loss, self.layout, params, x, target, 1.0, part,
                self.split_at, self.backward, samples=samples,
            )  # fmt: skip
        return graph, calls

    def _converged(self, batch: Batch, calls: list[LayerCall], n: int) -> Tensor | None:
        """The samples every DEQ call of a batch's forward converged on.

        Args:
            batch: the batch (its index, for the message).
            calls: the DEQ layers' calls in its forward, with their statistics.
            n: the batch's sample count.

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
            )
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
        compute: Callable[[BatchGraph], Tensor | SymmetricProduct],
        empty: Callable[[], Tensor],
        desc: str | None = None,
        directions: int | None = None,
    ) -> Tensor:
        """One pass: ``Σ_b w_b compute(graph of batch b)`` (see :class:`Stream`).

        Refused with :class:`deqhess.InputError` when the data hold no sample, or none
        converged.

        Args:
            part: the graphs' part (None: the loss only).
            compute: ``graph ↦`` the batch's unweighted term (a symmetric product adds to
                the sum's upper triangle only: see :func:`~deqhess.models.symmetric.mirror_upper_`).
            empty: the sum's zero (a rank or a data set without batches).
            desc: the progress bar's label (None: no bar).
            directions: the directions per derivative pass, for the DEQ layers.

        Returns:
            The weighted sum, shaped as ``compute``'s terms.
        """
        total = self._stream.run(
            self._former(part, directions),
            lambda graph: None if graph is None else compute(graph), empty, desc,
        )  # fmt: skip
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

    # ------------------------------------------------------------------ operators
    def hessian_operator(self, part: str = "total") -> CurvatureOperator:
        """One of :attr:`parts` as a ``P × P`` operator of exact products.

        Each block product ``H V`` (``V`` ``[P, K]``) is one pass over the data, the
        block's K directions through each batch's one graph. An unknown part is refused
        (a ``ValueError`` naming the parts), and so, for all but ``"ggn"``, is a model
        whose second derivatives torch gets wrong
        (:class:`deqhess.UnsupportedDerivativeError`, see
        :func:`deqhess.models.modes.check_second_order`).

        Args:
            part: one of :data:`MODEL_PARTS` (the split parts need a split layer).

        Returns:
            The operator; its ``to_dense()`` assembles each batch's ``[P, P]`` the
            cheaper way in one pass (:attr:`info` says how).

        Raises:
            InputError: a split part, but the model has no single DEQ layer and no
                ``split_at`` was given.
        """
        check_part(part, self.parts if part not in _SPLIT_PARTS else MODEL_PARTS)
        if part != "ggn":
            check_second_order(self.model, f"the {part!r} operator")
        if part in _SPLIT_PARTS and self.split_at is None:
            layers = len(deq_layers(self.model))
            if layers == 0:
                raise InputError(
                    f"{part!r} splits the Hessian at a DEQ layer's fixed point, but the model "
                    "has no DEQ layer (deqhess.nn.DEQ), so there is nothing to split at: use "
                    "'total' (the Hessian) or 'ggn'."
                )
            raise InputError(
                f"{part!r} splits the Hessian at a DEQ layer's fixed point, but the model "
                f"has {layers} DEQ layers and no split_at; pass "
                "split_at=<the layer or its name>, or use 'total' or 'ggn'."
            )

        def products(v: Tensor) -> Tensor:
            return self._products(part, v)

        return CurvatureOperator(
            products, self.layout, part, self.chunk_size, dense=lambda: self._dense(part),
            streamed=True,
        )  # fmt: skip

    def _products(self, part: str, v: Tensor) -> Tensor:
        """``(C Vᵀ)ᵀ`` for K directions, ``C`` the part: one pass per block of them.

        The blocks are as wide as the memory a direction was measured to take allows
        (:class:`deqhess.models.dense.Blocks`).

        Args:
            part: the part ``C``.
            v: ``[K, P]``, a direction per row.

        Returns:
            ``[K, P]``: row ``k`` is ``C vₖ``.
        """
        blocks, out, start = self._blocks, [], 0
        device = self.layout.device
        while start < v.shape[0]:
            stop = min(v.shape[0], start + blocks.size(self._widest_batch, device))
            block = v[start:stop]

            def product(graph: BatchGraph, block: Tensor = block) -> Tensor:
                return run_block(
                    blocks, graph, graph.samples, device,
                    lambda a, b: graph.products(block[a:b]), 0, len(block),
                )  # fmt: skip

            out.append(self._sum(part, product, partial(torch.zeros_like, block),
                                 directions=len(block)))  # fmt: skip
            start = stop
        return torch.cat(out) if len(out) != 1 else out[0]

    def _dense(self, part: str) -> Tensor:
        """The ``[P, P]`` matrix of ``part`` in one pass; :attr:`info` says how.

        Each batch's contribution is assembled the cheaper way
        (:func:`deqhess.models.dense.batch_dense`). Refused with
        :class:`deqhess.DenseMemoryError`, before the pass, when the sum, a batch's share
        and its weighted copy (``3·P²`` numbers) would not fit in the memory available,
        and during it when not one direction of a block fits beside them.

        Args:
            part: one of :data:`MODEL_PARTS`.

        Returns:
            ``[P, P]``: the data-set matrix of ``part``.
        """
        p = self.num_parameters
        itemsize = torch.finfo(self.layout.dtype).bits // 8
        check_dense(
            3 * p * p, self.layout.dtype, self.layout.device,
            f"{self._label}: the dense {part!r} matrix, [P, P] with P = {p:,} (the sum, a "
            "batch's share and its weighted copy)",
            "Use the operator's products (hessian_operator(part) with the analyses of "
            "deqhess.curvature), or fewer parameters (theta=...).",
        )  # fmt: skip
        blocks = Blocks(self.chunk_size, reserved=3.0 * p * p * itemsize,
                        per_direction=self._blocks.per_direction)  # fmt: skip
        routes: set[str] = set()
        quiet = None if self._stream.progress is None else not self._stream.progress
        batches = self._stream.num_batches  # known after the first pass (this process's)
        steps = None if batches is None else p * batches
        bar = tqdm(total=steps, desc=f"dense {part}", unit="direction", leave=False, disable=quiet)

        def one(graph: BatchGraph) -> Tensor | SymmetricProduct:
            routes.add("jacobians" if uses_jacobians(graph, p) else "products")
            return batch_dense(graph, graph.samples, blocks, bar.update)

        try:
            # a low-rank term adds only to the upper triangle: the sum is its mirror
            total = mirror_upper_(self._sum(part, one, lambda: self._zeros(p, p), directions=p))
        finally:
            bar.close()
        self._blocks.per_direction = self._blocks.per_direction or blocks.per_direction
        self.info = replace(
            self.info,
            per_direction_bytes=blocks.per_direction,
            assembly={**self.info.assembly, part: assembly(routes, part, p, blocks)},
        )
        return total

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.layout.dtype, device=self.layout.device)

    def ggn_operator(self) -> CurvatureOperator:
        """The GGN ``Jᵀ∇²ℓJ`` at the model's output (= ``hessian_operator("ggn")``)."""
        return self.hessian_operator("ggn")

    @overload
    def hvp(self, v: Tensor) -> Tensor: ...
    @overload
    def hvp(self, v: Mapping[str, Tensor]) -> Mapping[str, Tensor]: ...
    @overload
    def hvp(self, v: list[Tensor]) -> list[Tensor]: ...
    def hvp(self, v: Parameters | list[Tensor]) -> Parameters | list[Tensor]:
        """``H v``, exact, in one pass over the data per block of directions.

        Args:
            v: a flat ``[P]`` vector, a ``[P, K]`` block, a dict of tensors shaped like
                the chosen parameters (by their names), or a list of such tensors in the
                parameters' order (each with an optional trailing ``K``).

        Returns:
            ``H v`` in the form of ``v``.
        """
        return self.hessian_operator() @ v

    def grad(self) -> Parameters:
        """The data-set gradient, a dict of the chosen parameters (one pass)."""

        def first(graph: BatchGraph) -> Tensor:
            grads = torch.autograd.grad(
                graph.loss, graph.params, allow_unused=True, materialize_grads=True
            )
            return torch.cat([g.reshape(-1) for g in grads])

        zeros = lambda: self._zeros(self.num_parameters)  # noqa: E731
        return self.layout.unflatten(self._sum(None, first, zeros, "gradient"))

    # ------------------------------------------------------------------ per sample
    def per_sample_gradients(self) -> Tensor:
        """The gradient of each sample's own loss ``ℓ(model(x_i), y_i)``, exact.

        The loss on a batch of one, exact through every DEQ layer; one pass, each batch's
        forward once and its ``n`` samples' backwards together. For influence scores, the
        empirical Fisher ``Σ gᵢgᵢᵀ``, Laplace.

        Refused with :class:`deqhess.DenseMemoryError` when ``[N, P]`` would not fit,
        and with :class:`deqhess.InputError` when ``batch_dim`` is not 0 or the model's
        output or the target does not hold the batch's samples along its first
        dimension.

        Their mean (``reduction="mean"``) or sum (``"sum"``) is :meth:`grad` when each
        batch's loss is the plain mean (or sum) of its samples' losses; for a loss that is
        not — class weights or ``ignore_index`` in a cross-entropy, a term coupling the
        samples — the rows are still each sample's own loss gradient, and a
        ``RuntimeWarning`` says that they do not add up to the batch's gradient (checked
        on every batch, one backward each).

        Returns:
            ``[N, P]``: rows follow the samples in the order the data give them on this
            pass (a shuffling loader's order is its own), unconverged ones left out under
            ``exclude_unconverged``.
        """
        self._first_pass()
        check_dense(
            self.num_samples * self.num_parameters, self.layout.dtype, self.layout.device,
            f"per_sample_gradients(): [N, P] with N = {self.num_samples:,}, "
            f"P = {self.num_parameters:,}",
            "Take them batch by batch on a subset of the data, or the products of the "
            "empirical Fisher you need through hessian_operator('ggn') instead.",
        )  # fmt: skip
        return self._rows(self._checked_rows, "per-sample gradients")

    def _checked_rows(self, graph: BatchGraph, n: int) -> Tensor:
        """A batch's per-sample gradients, checked against the batch's own gradient.

        Returns:
            ``[n, P]``; a ``RuntimeWarning`` (once) where their mean or sum, by the
            reduction, is not the batch's gradient.
        """
        rows = sample_gradients(graph, n)
        grads = torch.autograd.grad(
            graph.loss, graph.params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        batch = torch.cat([g.reshape(-1) for g in grads])
        total = rows.mean(0) if self.reduction == "mean" else rows.sum(0)
        scale = float(torch.linalg.vector_norm(batch)) + torch.finfo(batch.dtype).tiny
        gap = float(torch.linalg.vector_norm(total - batch)) / scale
        if gap > 1e3 * torch.finfo(batch.dtype).eps and not self._warned_rows:
            self._warned_rows = True
            warnings.warn(
                f"{self._label}.per_sample_gradients(): a batch's rows do not add up to its "
                f"gradient (relative difference {gap:.1e}): its loss is not the plain "
                f"{self.reduction} of its samples' losses (class weights or ignore_index in "
                "a cross-entropy, a term coupling the samples). Each row is still the "
                "gradient of its sample's own loss (the loss on a batch of one), but their "
                f"{self.reduction} is not grad().",
                RuntimeWarning,
                stacklevel=4,
            )
        return rows

    def output_jacobians(self) -> Tensor:
        """Each sample's Jacobian ``Jᵢ`` of the model's output in the chosen parameters.

        Exact through every DEQ layer; one pass, ``n·C`` backwards per batch, together.
        The GGN is ``Σᵢ Jᵢᵀ ∇²ℓᵢ Jᵢ`` with the per-sample loss curvatures ``∇²ℓᵢ``
        (Laplace's Jacobian-based GGN).

        Refused with :class:`deqhess.DenseMemoryError` when ``[N, C, P]`` would not fit
        (checked on the first batch), and with :class:`deqhess.InputError` when
        ``batch_dim`` is not 0 or the output does not hold the batch's samples along its
        first dimension.

        Returns:
            ``[N, C, P]``, ``C`` the numbers of a sample's output (the floating tensors of
            a tuple / list / dict output, flattened and concatenated); rows as in
            :meth:`per_sample_gradients`.
        """
        self._first_pass()

        def rows(graph: BatchGraph, n: int) -> Tensor:
            if not found:
                width = sum(t[0].numel() for t in floating_leaves(graph.output))
                check_dense(
                    self.num_samples * width * self.num_parameters, self.layout.dtype,
                    self.layout.device,
                    f"output_jacobians(): [N, C, P] with N = {self.num_samples:,}, C = "
                    f"{width:,}, P = {self.num_parameters:,}",
                    "Take them on a subset of the data, or use the GGN's products "
                    "(hessian_operator('ggn')).",
                )  # fmt: skip
            found.append(True)
            return output_jacobians(graph, n)

        found: list[bool] = []
        return self._rows(rows, "output Jacobians")

    def _rows(self, compute: Callable[[BatchGraph, int], Tensor], desc: str) -> Tensor:
        """One pass collecting ``compute(graph, n)`` for every batch, stacked in order.

        Args:
            compute: ``(graph, n) ↦`` a batch's rows, ``n`` its sample count.
            desc: what the rows are, for the progress bar and the message.

        Returns:
            The batches' rows concatenated along the first dimension (``[0, P]`` without
            a batch).

        Raises:
            InputError: ``batch_dim`` is not 0.
        """
        if self.batch_dim != 0:
            raise InputError(
                f"{desc} need the samples along the first dimension (batch_dim=0); this "
                f"{self._label} has batch_dim={self.batch_dim}."
            )
        collected: list[Tensor] = []

        def collect(graph: BatchGraph | None) -> None:
            if graph is not None:
                collected.append(compute(graph, graph.samples))

        self._stream.run(self._former(None), collect, desc=desc)
        if not collected:
            return self._zeros(0, self.num_parameters)
        return torch.cat(collected)

    @overload
    def hessian(self, split: Literal[False] = False) -> Tensor: ...

    @overload
    def hessian(self, split: Literal[True]) -> HessianSplit: ...

    def hessian(self, split: bool = False) -> Tensor | HessianSplit:
        """The dense ``[P, P]`` Hessian of the data-set loss, for small models.

        One pass over the data, each batch's ``P`` directions through its graph in blocks
        as wide as memory allows (the DEQ layers factorise ``I − J`` per sample where that
        is cheaper); :attr:`info` says how. Refused with
        :class:`deqhess.DenseMemoryError` when it would not fit.

        Args:
            split: deprecated: use :meth:`hessian_split`, which returns the split.

        Returns:
            ``[P, P]`` (a :class:`~deqhess.HessianSplit` with the deprecated ``split=True``).
        """
        if split:
            split_deprecated(f"{self._label}.hessian", "curvature.hessian_split()")
            return self.hessian_split()
        return self.hessian_operator().to_dense()

    def hessian_split(self) -> HessianSplit:
        """The dense Hessian split at the split layer's fixed point (two passes).

        Each part is its own pass, so a loosely solved layer gives an
        :class:`deqhess.AccuracyWarning` for each (the same figure twice).

        Returns:
            A :class:`~deqhess.HessianSplit`: ``loss_curvature`` and
            ``dynamics_curvature``, each ``[P, P]``, and their sum ``total``.
        """
        loss_part = self.hessian_operator("loss_curvature").to_dense()
        dynamics_part = self.hessian_operator("dynamics_curvature").to_dense()
        return HessianSplit(loss_part, dynamics_part, loss_part + dynamics_part)
