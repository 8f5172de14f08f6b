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

Every product streams the data: one pass per block of K directions, in which each
batch's forward runs once (each DEQ solves once) and the K directions share its graph.
Memory: one batch's graph, K-fold in its backward; not the number of batches. Like
curvlinops' operators, these read the model's parameters as they are at each product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import Batches, check_same_data
from ..chunks import default_chunk_size
from ..implicit import CurvatureOperator, HessianSplit
from ..implicit.operators import check_part
from ..nn import DEQ, warm_starts
from ..options import integer
from ..parameters import ParameterLayout, Parameters
from .backward import BlockBackward
from .graph import BatchGraph, LossFunc

__all__ = ["MODEL_PARTS", "ModelCurvature"]

#: the operators of a model: the Hessian, the output GGN, and the split at a DEQ layer.
MODEL_PARTS = ("total", "ggn", "loss_curvature", "dynamics_curvature")

#: budget for the fixed points kept between passes to start the next pass's solves from.
WARM_START_BYTES = 256 * 1024**2

_SPLIT_PARTS = ("loss_curvature", "dynamics_curvature")


class ModelCurvature:
    """Exact Hessian, GGN and split operators of a model's data-set loss.

    Args:
        model: an ``nn.Module`` mapping a batch's ``x`` to an output; typically holding
            one or more :class:`deqhess.nn.DEQ` layers. It should be deterministic (in
            ``eval()`` mode if it has dropout or batch norm): every pass reruns it.
        loss_func: ``loss_func(output, target)`` → 0-dim tensor, e.g. ``nn.MSELoss()``.
        data: ``(x, target)`` batches, iterated once per pass (a list, a DataLoader;
            not a generator).
        params: which parameters: None (all that require grad), or names of
            ``model.named_parameters()`` or the parameters themselves (flattened in the
            order given).
        reduction: ``"mean"`` or ``"sum"`` over the data; default ``loss_func.reduction``
            if it has one, else ``"mean"``.
        split_at: the DEQ layer (a module, or its name in ``model``) at whose fixed point
            the Hessian splits into loss and dynamics curvature; default the model's
            only DEQ layer (with several, the split parts need it).
        batch_size_fn: ``x ↦`` the batch's sample count; default ``x.shape[0]``.
        chunk_size: directions per pass in ``to_dense`` and large blocks; default about
            4M numbers.
        warm_start_bytes: each batch's DEQ fixed points are kept (states, not graphs)
            to start the next pass's solves from, until they hold this many bytes (the
            rest of the batches start cold; 0 keeps none). Default 256 MB.
        backward: how a block's K directions go through a batch's graph: ``"auto"``
            (default), ``"vmap"``, ``"batched"`` (models without DEQ layers) or ``"loop"`` (see
            :class:`deqhess.models.backward.BlockBackward`).

    Raises:
        ValueError: unknown parameter names, parameters of several dtypes, a one-shot
            iterator for ``data``, an unknown reduction or a ``split_at`` that is not a
            DEQ layer of the model.

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

    def __init__(
        self,
        model: nn.Module,
        loss_func: LossFunc,
        data: Iterable[tuple[Any, Any]],
        params: Sequence[str] | Sequence[Tensor] | None = None,
        *,
        reduction: str | None = None,
        split_at: nn.Module | str | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        chunk_size: int | None = None,
        backward: str = "auto",
        warm_start_bytes: int = WARM_START_BYTES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not callable(loss_func):
            raise ValueError(f"loss_func must be callable; got {type(loss_func).__name__}.")
        self.model, self.loss_func = model, loss_func
        self.names = _chosen_names(model, params)
        named = dict(model.named_parameters())
        self.layout = ParameterLayout({n: named[n].detach() for n in self.names})
        self.reduction = reduction or getattr(loss_func, "reduction", "mean")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"unknown reduction {self.reduction!r}; use 'mean' or 'sum'.")
        self.split_at = _split_layer(model, split_at)
        self._data = Batches(data)
        if self._data.one_shot:
            raise ValueError(
                f"data is a one-shot iterator ({type(data).__name__}); every product reads "
                "the data once, so pass a list or a DataLoader."
            )
        self.batch_size_fn = batch_size_fn or _leading_size
        self.chunk_size = (
            default_chunk_size(2 * self.layout.size)
            if chunk_size is None
            else integer(chunk_size, "chunk_size", minimum=1)
        )
        self._seen: tuple[int, int] | None = None  # samples and batches of the first pass
        self.backward = BlockBackward(backward)
        if backward == "batched" and _deq_layers(model):
            raise ValueError(
                "backward='batched' (torch.autograd.grad with is_grads_batched=True) cannot "
                "go through a deqhess.nn.DEQ layer: torch's legacy batching cannot run its "
                "solves. Use backward='vmap' (what 'auto', the default, picks for DEQ models) "
                "or 'loop'."
            )
        self.warm_start_bytes = integer(warm_start_bytes, "warm_start_bytes", minimum=0)
        # each batch's DEQ fixed points, to start the next pass's solves from (small:
        # states, not graphs), while they fit in warm_start_bytes
        self._warm: dict[int, dict] = {}
        self._warm_bytes = 0

    @property
    def num_parameters(self) -> int:
        return self.layout.size

    @property
    def parts(self) -> tuple[str, ...]:
        """The operators available: the split parts only with a split layer."""
        return MODEL_PARTS if self.split_at is not None else MODEL_PARTS[:2]

    @property
    def num_samples(self) -> int:
        """``N``, counted by the first pass (a pass of its own if none ran yet)."""
        return self._count()[0]

    @property
    def num_batches(self) -> int:
        """The number of batches, counted by the first pass."""
        return self._count()[1]

    def _count(self) -> tuple[int, int]:
        if self._seen is None:
            counts = [self.batch_size_fn(x) for x, _ in self._data]
            self._seen = (sum(counts), len(counts))
        return self._seen

    def _leaves(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().requires_grad_() for n in self.names}

    def _sum_over_batches(
        self, part: str | None, compute: Callable[[BatchGraph], Tensor]
    ) -> Tensor:
        """One pass: ``Σ_b compute(graph of batch b)`` with the reduction's weights."""
        params = self._leaves()
        total, samples, batches = None, 0, 0
        for index, (x, target) in enumerate(self._data):
            n = self.batch_size_fn(x)
            store = self._warm.get(index)
            if store is None and self._warm_bytes < self.warm_start_bytes:
                store = self._warm[index] = {}
            kept = _bytes(store)
            with warm_starts({} if store is None else store):
                graph = BatchGraph(
                    self.model, self.loss_func, self.layout, params, x, target,
                    float(n) if self.reduction == "mean" else 1.0, part, self.split_at,
                    self.backward,
                )  # fmt: skip
            self._warm_bytes += _bytes(store) - kept
            value = compute(graph)
            del graph
            total = value if total is None else total.add_(value)
            samples, batches = samples + n, batches + 1
        if self._seen is None:
            self._seen = (samples, batches)
        check_same_data(samples, batches, *self._seen)
        if total is None:
            raise ValueError("data is empty; pass at least one (x, target) batch.")
        return total / samples if self.reduction == "mean" else total

    # ------------------------------------------------------------------ operators
    def hessian_operator(self, part: str = "total") -> CurvatureOperator:
        """One of :attr:`parts` as a ``P × P`` operator of exact products; each block
        product is one pass over the data."""
        check_part(part, self.parts if part not in _SPLIT_PARTS else MODEL_PARTS)
        if part in _SPLIT_PARTS and self.split_at is None:
            raise ValueError(
                f"{part!r} splits the Hessian at a DEQ layer's fixed point, but the model "
                f"has {len(_deq_layers(self.model))} DEQ layers and no split_at; pass "
                "split_at=<the layer or its name>, or use 'total' or 'ggn'."
            )

        def products(v: Tensor) -> Tensor:
            return self._sum_over_batches(part, lambda graph: graph.products(v))

        return CurvatureOperator(products, self.layout, part, self.chunk_size)

    def ggn_operator(self) -> CurvatureOperator:
        """The GGN ``Jᵀ∇²ℓJ`` at the model's output (= ``hessian_operator("ggn")``)."""
        return self.hessian_operator("ggn")

    def hvp(self, v: Parameters) -> Parameters:
        """``H v``; ``v`` flat ``[P]``, a ``[P, K]`` block, or a dict of the parameters."""
        return self.hessian_operator() @ v

    def grad(self) -> Parameters:
        """The data-set gradient, a dict of the chosen parameters (one pass)."""

        def first(graph: BatchGraph) -> Tensor:
            grads = torch.autograd.grad(
                graph.loss, graph.params, allow_unused=True, materialize_grads=True
            )
            return torch.cat([g.reshape(-1) for g in grads])

        return self.layout.unflatten(self._sum_over_batches(None, first))

    def hessian(self, split: bool = False) -> Tensor | HessianSplit:
        """The dense ``[P, P]`` Hessian (or its :class:`HessianSplit`), for small models:
        ``P`` products in blocks of ``chunk_size`` directions."""
        if not split:
            return self.hessian_operator().to_dense()
        loss_part = self.hessian_operator("loss_curvature").to_dense()
        dynamics_part = self.hessian_operator("dynamics_curvature").to_dense()
        return HessianSplit(loss_part, dynamics_part, loss_part + dynamics_part)


def _bytes(store: dict | None) -> int:
    """The bytes of the fixed points a warm-start store holds."""
    return sum(t.numel() * t.element_size() for t in store.values()) if store else 0


def _leading_size(x: Any) -> int:
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise ValueError(
            f"cannot count the samples of a batch whose x is {type(x).__name__}; pass "
            "batch_size_fn=lambda x: ... (the number of samples in x)."
        )
    return x.shape[0]


def _chosen_names(model: nn.Module, params: Sequence[str] | Sequence[Tensor] | None) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        if isinstance(params, (str, Tensor)):
            params = [params]
        by_identity = {id(p): n for n, p in named.items()}
        names = [
            by_identity.get(id(p), "<not a parameter of the model>") if isinstance(p, Tensor) else p
            for p in params
        ]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(named)}.")
    if not names:
        raise ValueError(
            "no parameters chosen: the model has none that require grad."
            if params is None
            else "params is empty: name the parameters to differentiate in, or pass "
            "params=None for all that require grad."
        )
    return names


def _deq_layers(model: nn.Module) -> list[DEQ]:
    return [m for m in model.modules() if isinstance(m, DEQ)]


def _split_layer(model: nn.Module, split_at: nn.Module | str | None) -> DEQ | None:
    layers = _deq_layers(model)
    if split_at is None:
        return layers[0] if len(layers) == 1 else None
    if isinstance(split_at, str):
        try:
            split_at = model.get_submodule(split_at)
        except AttributeError as error:
            raise ValueError(f"split_at={split_at!r} is not a submodule of the model.") from error
    if not any(split_at is layer for layer in layers):
        raise ValueError(
            f"split_at must be one of the model's deqhess.nn.DEQ layers; got "
            f"{type(split_at).__name__}."
        )
    return split_at
