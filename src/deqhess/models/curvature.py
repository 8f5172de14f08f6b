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

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..callers import user_stacklevel
from ..deprecation import UNSET
from ..errors import InputError
from ..implicit import CurvatureOperator, HessianSplit
from ..implicit.hessian import split_deprecated
from ..implicit.operators import check_part
from ..memory import check_dense
from ..parameters import Parameters
from .arguments import deq_layers
from .dense import CPU_DENSE_BLOCK, Blocks, SampleTerm, batch_dense, run_block
from .graph import BatchGraph, LossFunc
from .info import CurvatureInfo, assembly
from .input_sites import InputSiteTerm
from .modes import check_second_order
from .passes import ModelPasses
from .per_sample import output_jacobians, sample_gradients, sample_outputs
from .sample_gram import SampleGram
from .sample_sites import Stacking
from .symmetric import SymmetricProduct, UpperRows, mirror_upper_

__all__ = ["MODEL_PARTS", "CurvatureInfo", "ModelCurvature"]

#: the operators of a model: the Hessian, the output GGN, and the split at a DEQ layer.
MODEL_PARTS = ("total", "ggn", "loss_curvature", "dynamics_curvature")

_SPLIT_PARTS = ("loss_curvature", "dynamics_curvature")


class ModelCurvature(ModelPasses):
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
            fixed points, to start its next solves from, until they hold this many bytes
            (the rest start cold; 0 keeps none), with their dense factors of ``I − J``
            where those fit too (taken again where ``J`` comes out bitwise the same,
            :mod:`deqhess.linear.kept`); and, while an analysis holds an
            operator (:meth:`deqhess.operator.Operator.holding`), each batch's graph in
            what the fixed points leave. Default 1 GiB. (Formerly ``warm_start_bytes``.)
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

    @property
    def parts(self) -> tuple[str, ...]:
        """The operators available: the split parts only with a split layer."""
        return MODEL_PARTS if self.split_at is not None else MODEL_PARTS[:2]

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
            check_second_order(self.model, f"the {part!r} operator", self.names)
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
            streamed=True, held=self.holding,
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
        limit = self.chunk_size
        if not self._chunk_chosen and self.layout.device.type == "cpu":
            limit = min(limit, CPU_DENSE_BLOCK)
        blocks = Blocks(limit, reserved=3.0 * p * p * itemsize,
                        per_direction=self._blocks.per_direction)  # fmt: skip
        routes: set[str] = set()
        quiet = None if self._stream.progress is None else not self._stream.progress
        batches = self._stream.num_batches  # known after the first pass (this process's)
        steps = None if batches is None else p * batches
        bar = tqdm(total=steps, desc=f"dense {part}", unit="direction", leave=False, disable=quiet)

        # the GGN's rows per sample from stacked cotangents where the graph shows them: its
        # DEQ layers' cells evaluated once more, visibly; kept outer products assembled
        # at the end (on each batch when ranks add their sums)
        gram, stacking = None, self._stacking["ggn"]
        if part == "ggn" and stacking.promising:
            gram = SampleGram(self.layout.offsets, self.layout.shapes, stacking,
                              keep=self._stream.group is None)  # fmt: skip

        sites = self._stacking["total"] if part == "total" else None

        def one(graph: BatchGraph) -> UpperRows | SymmetricProduct | SampleTerm | InputSiteTerm:
            term = batch_dense(graph, graph.samples, blocks, bar.update, gram, sites)
            if isinstance(term, SampleTerm):
                routes.add("sample sites")
            elif isinstance(term, InputSiteTerm):
                routes.add("input sites")
            elif not isinstance(term, SymmetricProduct):
                routes.add("products")
            else:
                routes.add("jacobians" if term.right is not None else "factored jacobians")
            return term

        try:
            total = self._sum(
                part, one, lambda: self._zeros(p, p), directions=p,
                visible=None if gram is None else lambda: stacking.promising,
            )  # fmt: skip
            if gram is not None:  # after the sum's division by N ("mean")
                count = self._stream.num_samples
                mean = self._stream.reduction == "mean"
                gram.assemble(total, 1.0 / count if mean and count else 1.0)
            # every term adds only to the upper triangle: the sum is its mirror
            total = mirror_upper_(total)
        finally:
            bar.close()
        self._blocks.per_direction = self._blocks.per_direction or blocks.per_direction
        self.info = replace(
            self.info,
            per_direction_bytes=blocks.per_direction,
            assembly={**self.info.assembly, part: assembly(routes, part, p, blocks)},
        )
        return total

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
        empirical Fisher ``Σ gᵢgᵢᵀ``, Laplace. (Each row is sample ``i``'s loss through
        its batch's forward: for a model whose forward mixes a batch's samples — batch
        statistics without running ones, a centring — that is its gradient within the
        batch, not on a batch of one; DEQ layers are checked not to mix them.)

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
        stacking = self._stacking["rows"]
        return self._rows(partial(self._checked_rows, stacking=stacking),
                          "per-sample gradients", stacking)  # fmt: skip

    def _checked_rows(self, graph: BatchGraph, n: int, stacking: Stacking) -> Tensor:
        """A batch's per-sample gradients, checked against the batch's own gradient.

        Returns:
            ``[n, P]``; a ``RuntimeWarning`` (once) where their mean or sum, by the
            reduction, is not the batch's gradient.
        """
        rows = sample_gradients(graph, n, stacking)
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
                stacklevel=user_stacklevel(),
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
                width = sum(t[0].numel() for t in sample_outputs(graph, n))
                check_dense(
                    self.num_samples * width * self.num_parameters, self.layout.dtype,
                    self.layout.device,
                    f"output_jacobians(): [N, C, P] with N = {self.num_samples:,}, C = "
                    f"{width:,}, P = {self.num_parameters:,}",
                    "Take them on a subset of the data, or use the GGN's products "
                    "(hessian_operator('ggn')).",
                )  # fmt: skip
            found.append(True)
            return output_jacobians(graph, n, stacking)

        found: list[bool] = []
        stacking = self._stacking["rows"]
        return self._rows(rows, "output Jacobians", stacking)

    def _rows(
        self, compute: Callable[[BatchGraph, int], Tensor], desc: str, stacking: Stacking
    ) -> Tensor:
        """One pass collecting ``compute(graph, n)`` for every batch, stacked in order.

        Args:
            compute: ``(graph, n) ↦`` a batch's rows, ``n`` its sample count.
            desc: what the rows are, for the progress bar and the message.
            stacking: whether ``compute``'s stacked route still holds (the graphs are
                then formed with each DEQ layer's cell evaluated once more).

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

        # while the stacked route holds, each DEQ layer's cell is evaluated once more in
        # the graphs, which then show where the parameters meet the samples: the rows from
        # a few stacked cotangents (deqhess.models.per_sample.stacked_rows)
        visible = lambda: stacking.promising  # noqa: E731
        self._stream.run(self._former(None, visible=visible), collect, desc=desc)
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
