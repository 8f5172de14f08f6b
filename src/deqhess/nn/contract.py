"""What a cell must be for its fixed point to have exact derivatives, checked up front.

The layer differentiates ``h* = cell(x, h*)`` in the cell's parameters and floating
buffers and in the tensors of ``x``. That needs a *deterministic* map of exactly those
inputs, and a start ``h0`` of the state's kind: every check here turns a way to break
that into an error that says what to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import InputError, UnsupportedDerivativeError, add_note
from .transforms import tracked

__all__ = [
    "InputLayout",
    "BufferLedger",
    "autocast_inputs",
    "buffers_unwritten",
    "saved_tensor_hooks_named",
    "check_deterministic",
    "check_parametrize_cache",
    "check_inputs",
    "check_registered",
    "explaining_first_call",
    "state_arguments",
    "training_hazard",
]


def check_deterministic(cell: nn.Module) -> None:
    """Refuse modules that change the map from one call to the next.

    Args:
        cell: the layer's cell; it and its submodules are inspected, not changed.

    Raises:
        InputError: batch or instance norm with running statistics, dropout, RReLU or a
            spectral norm (its power iteration) in training mode, named by its path in the
            cell.

    A parametrised cell called inside ``torch.nn.utils.parametrize.cached()`` is refused
    too (the cache would keep a weight detached from its parameters).
    """
    check_parametrize_cache(cell)
    for name, module in cell.named_modules():
        label = f"cell.{name}" if name else "cell"
        kind = type(module).__name__
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise InputError(
                f"{label} is a {kind} in training mode: it would update its running statistics "
                "at every solver iteration, and its batch statistics couple the samples. Call "
                ".eval() on it (batch norm with fixed statistics is a per-sample affine map), or "
                "use GroupNorm/LayerNorm."
            )
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise InputError(
                f"{label} is a {kind} with running statistics in training mode: it would "
                "update them at every solver iteration. Call .eval() on it, or build it with "
                "track_running_stats=False (its per-sample statistics are then the map's)."
            )
        if isinstance(module, nn.RReLU):
            raise InputError(
                f"{label} is an RReLU in training mode: it draws random negative slopes at "
                "every call of the cell — at every solver iteration — so the cell is a "
                "different map each time and has no fixed point. Call .eval() on it (its "
                "slope is then fixed), or use LeakyReLU."
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise InputError(
                f"{label} is a {kind} in training mode: it draws a new random mask at every call "
                "of the cell — at every solver iteration — so the cell is a different map each "
                "time and has no fixed point. Call .eval() on it, or draw one mask per forward "
                "and pass it in x (variational dropout, as DEQ models use)."
            )
        if _spectral_norm(module):
            raise InputError(
                f"{label} has a spectral norm in training mode: its power iteration updates the "
                "weight at every call of the cell, so the map moves during the solve. Call "
                ".eval() on it (the normalised weight is then fixed) while solving."
            )


class BufferLedger:
    """What :func:`buffers_unwritten` watches: the cell's buffers, their versions and values.

    :meth:`observed` brackets the layer's visible evaluation, the one where the cell's
    hooks run: a buffer first written there was written by a hook (an activation
    statistic, a quantisation observer), which the refusal then names.
    """

    def __init__(self, cell: nn.Module) -> None:
        self.buffers = dict(cell.named_buffers())
        self.versions = {name: b._version for name, b in self.buffers.items()}
        self.saved = {name: b.detach().clone() for name, b in self.buffers.items()}
        self.by_hooks: set[str] = set()

    def written(self) -> list[str]:
        """The buffers written since they were recorded."""
        return [n for n, b in self.buffers.items() if b._version != self.versions[n]]

    @contextlib.contextmanager
    def observed(self) -> Iterator[None]:
        """Within the block (the visible evaluation), a first write is a hook's."""
        before = set(self.written())
        try:
            yield
        finally:
            self.by_hooks |= set(self.written()) - before


@contextlib.contextmanager
def buffers_unwritten(cell: nn.Module) -> Iterator[BufferLedger]:
    """Refuse a cell that writes its own buffers in place while it is solved.

    A call counter (``self.calls += 1``) or a statistic updated in ``forward`` makes the
    cell another map at every evaluation (its fixed point and derivatives are not
    defined), and torch's transforms, which the derivatives run under, refuse the write
    with an error that names neither the module nor the buffer. Writes are seen by the
    buffers' version counters (not ``.data`` writes). A write made only in the visible
    evaluation (:meth:`BufferLedger.observed`) is a hook's, and named so.

    Args:
        cell: the layer's cell; its buffers are put back as they were if refused.

    Yields:
        The :class:`BufferLedger`: the solve runs inside; after it, or after an error it
        raised, written buffers are put back and refused.

    Raises:
        InputError: the cell (or a hook on it) wrote buffers in place, named by their
            paths in the cell.
    """
    ledger = BufferLedger(cell)
    failure: BaseException | None = None
    try:
        yield ledger
    except RuntimeError as error:  # torch's transforms refusing the write, or another
        failure = error
    written = ledger.written()
    if not written:
        if failure is not None:
            raise failure
        return
    with torch.no_grad():
        for name in written:
            ledger.buffers[name].copy_(ledger.saved[name])
    listed = ", ".join(f"cell.{name}" for name in written)
    if set(written) <= ledger.by_hooks:
        raise InputError(
            f"a hook on the DEQ layer's cell writes its buffer(s) {listed} in place (in the "
            "layer's one visible evaluation, where hooks run): every floating buffer of the "
            "cell is an argument of the fixed point, kept for its derivatives, so it cannot "
            "change during the call. deqhess put them back as they were. Keep the hook's "
            "record outside the cell (a buffer of another module, a dict or a list)."
        ) from failure
    raise InputError(
        f"the cell writes its buffer(s) {listed} in place when called (a call counter, a "
        "statistic updated in forward): the map then changes at every solver iteration, "
        "so it has no fixed point to differentiate. deqhess put them back as they were. "
        "Keep such state outside the cell (update it after the layer, from its output), "
        "or compute it without writing a buffer."
    ) from failure


def training_hazard(module: nn.Module) -> str | None:
    """Why ``module`` is not one fixed function in its current mode, if it is not.

    Used for whole models (:class:`deqhess.ModelCurvature`); a cell has its own, stricter
    check (:func:`check_deterministic`).

    Args:
        module: the module alone (its children are not looked at).

    Returns:
        The reason, in words — it draws random numbers (dropout, RReLU), or uses and
        updates batch statistics (batch norm, instance norm with running statistics, a
        spectral norm's power iteration) in training mode — or None when it is fixed.
    """
    if not module.training:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            "batch norm in training mode: it normalises by each batch's statistics (so a "
            "sample's output depends on its batch) and updates its running statistics on "
            "every call"
        )
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return (
            "instance norm with running statistics in training mode: it updates them on every call"
        )
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        return "dropout in training mode: it draws a new random mask on every call"
    if isinstance(module, nn.RReLU):
        return "RReLU in training mode: it draws a random slope on every call"
    if _spectral_norm(module):
        return (
            "a spectral norm in training mode: its power iteration updates the weight on every call"
        )
    return None


def check_parametrize_cache(module: nn.Module, owner: str = "cell") -> None:
    """Refuse parametrised modules evaluated inside ``parametrize.cached()``.

    Inside ``parametrize.cached()`` a parametrised weight is computed once and kept; the
    layer evaluates its cell, and an analysis the whole model, with the parameters swapped
    for substituted copies, so the cache would keep a weight cut off from its parameters —
    their gradients came back exactly zero (weight_norm in a cell, measured), a model's
    Hessian 62% off.

    Args:
        module: the cell, or a whole model.
        owner: what ``module`` is, for the message (``"cell"`` or ``"model"``).

    Raises:
        InputError: some module of ``module`` is parametrised and the cache is on.
    """
    from torch.nn.utils import parametrize

    if not parametrize._cache_enabled:
        return
    names = [
        f"{owner}.{name}" if name else owner
        for name, m in module.named_modules()
        if parametrize.is_parametrized(m)
    ]
    if names:
        where = "the DEQ layer" if owner == "cell" else "the analysis"
        raise InputError(
            f"the {owner}'s parametrised module(s) {names} are evaluated inside "
            "torch.nn.utils.parametrize.cached(): deqhess evaluates them with their "
            "parameters substituted, and the cache would keep a weight detached from them "
            f"(their derivatives would be zero). Run {where} outside the cached() block."
        )


def _spectral_norm(module: nn.Module) -> bool:
    """Whether ``module`` has a spectral norm (the legacy hook or the parametrisation)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm

    if any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()):
        return True
    container = module.parametrizations if parametrize.is_parametrized(module) else None
    if isinstance(container, nn.ModuleDict):  # what parametrize registers
        for parametrizations in container.values():  # a ParametrizationList per tensor
            if isinstance(parametrizations, nn.ModuleList) and any(
                type(p).__name__ == "_SpectralNorm" for p in parametrizations
            ):
                return True
    return False


def state_arguments(cell: nn.Module) -> tuple[list[str], list[Tensor]]:
    """The tensors the fixed point is differentiated in: the seed's θ for this cell.

    Args:
        cell: the layer's cell.

    Returns:
        ``(names, values)``: the cell's parameters and floating buffers, by their
        ``functional_call`` names — but not the running statistics of normalisation
        layers, which have no derivatives (in eval mode they are constants).
    """
    named: list[tuple[str, Tensor]] = list(cell.named_parameters())
    statistics = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in cell.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        for name, _ in module.named_buffers(recurse=False)
    }
    named += [
        (n, b) for n, b in cell.named_buffers() if b.is_floating_point() and n not in statistics
    ]
    return [name for name, _ in named], [value for _, value in named]


def check_registered(out: Any) -> None:
    """Refuse a cell that reads a tracked tensor besides its arguments.

    Args:
        out: one evaluation of the cell with grad enabled and every argument detached
            (under ``torch.func``: plain, :func:`deqhess.nn.transforms.representative`):
            it needs no grad, and is no transform's wrapper, unless the cell reads another
            tensor that autograd or a transform tracks — a weight shared by reference,
            made by a hypernetwork, or computed from the cell's parameters before the
            call (torchdeq's ``reset_norm``) — whose derivatives the fixed point would
            silently drop.

    Raises:
        InputError: ``out`` is tracked (:func:`deqhess.nn.transforms.tracked`).
    """
    if isinstance(out, Tensor) and tracked(out):
        raise InputError(
            "the cell reads a tensor that requires grad (or that a torch.func transform "
            "tracks) but is neither one of its parameters "
            "or buffers nor part of x (e.g. a weight shared with another module by "
            "reference, or a weight computed from parameters before the call, as torchdeq's "
            "reset_norm or a forward pre-hook does): the fixed point's derivatives would "
            "leave its gradient out. Register it on the cell (nn.Parameter, or "
            "register_buffer), compute it inside the cell's forward (or with "
            "torch.nn.utils.parametrize), or pass it in x."
        )


def check_inputs(inputs: InputLayout, h0: Any, values: list[Tensor]) -> None:
    """Refuse an ``h0`` that is not a floating tensor of the parameters' dtype.

    The values of ``x``, ``h0`` and the parameters are checked finite where the solve
    starts, outside any torch.func transform.

    Raises:
        InputError: ``h0`` is not a tensor, not floating, or not of the dtype of the
            cell's floating parameters and buffers (``values``).
    """
    if not isinstance(h0, Tensor):
        raise InputError(
            f"h0 must be a torch.Tensor shaped like the state; got {type(h0).__name__}."
        )
    if not h0.is_floating_point():
        raise InputError(f"h0 has dtype {h0.dtype}; the state must be float32 or float64.")
    floating = [v for v in values if v.is_floating_point()]
    supported = (torch.float32, torch.float64)
    if floating and floating[0].dtype != h0.dtype:
        dtype = floating[0].dtype
        if dtype in supported and h0.dtype not in supported:
            raise InputError(
                f"the state is {h0.dtype} (h0, or zeros like x or the cell's init_state(x) "
                "when h0 is left out), but the layer solves in float32 or float64: give x "
                f"(and h0) the cell's dtype, x.to({dtype}) — under torch.autocast the layer "
                "does this itself and solves in its parameters' dtype."
            )
        if dtype not in supported:
            raise InputError(
                f"the cell's parameters are {dtype}, but the layer solves in float32 or "
                "float64: keep the DEQ layer in float32 (deq.float()) — under torch.autocast "
                "the modules around it still run in lower precision, and the layer casts "
                "what they hand it."
            )
        raise InputError(
            f"the cell's parameters are {dtype} but the state is {h0.dtype}; cast one "
            f"to the other (e.g. model.to({h0.dtype}), or x and h0 to {dtype})."
        )


def autocast_inputs(x: Any, values: Iterable[Tensor]) -> Any:
    """``x`` as the layer solves with it under ``torch.autocast``: in its parameters' dtype.

    The layer solves and differentiates in its state's dtype, autocast off inside
    (:func:`deqhess.locking.autocast_off`); an encoder before it under autocast hands it
    lower-precision tensors (bfloat16, float16), which are cast to the cell's floating
    parameters' dtype (float32 or float64) — differentiably, as autocast casts.

    Args:
        x: the layer's input.
        values: the cell's parameters and buffers.

    Returns:
        ``x``, its tensors of autocast's dtype cast to the parameters' dtype where
        autocast is on for their device; else ``x`` itself.
    """
    leaves, spec = tree_flatten(x)

    def lowered(t: Any) -> bool:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            return False
        kind = t.device.type
        return torch.is_autocast_enabled(kind) and t.dtype == torch.get_autocast_dtype(kind)

    if not any(lowered(t) for t in leaves):  # autocast off (or x of another dtype): as it is
        return x
    target = next((v.dtype for v in values if v.is_floating_point()), None)
    if target not in (torch.float32, torch.float64):
        return x
    return tree_unflatten([t.to(target) if lowered(t) else t for t in leaves], spec)


def explaining_first_call(
    evaluate: Callable[..., Tensor], x: Any, given: bool = True
) -> Callable[..., Tensor]:
    """``evaluate``, explaining a failure of its first call.

    Args:
        evaluate: the cell's evaluation ``(z, *args) ↦ F``.
        x: the layer's input.
        given: the start is the user's ``h0`` (False: zeros like ``x``, the cell
            defining no ``init_state``).

    Returns:
        A map that calls ``evaluate``; its first call — the cell at the start — adds a
        note about ``h0`` (or the default start) to whatever the cell raises (a wrongly
        shaped start usually surfaces as the cell's own shape error).
    """
    first = True

    def step(z: Tensor, *args: Tensor) -> Tensor:
        nonlocal first
        if not first:
            return evaluate(z, *args)
        first = False
        try:
            return evaluate(z, *args)
        except Exception as error:
            add_note(error, _initial_state_note(x, z, given))
            raise

    return step


def _initial_state_note(x: Any, h0: Tensor, given: bool) -> str:
    """Return what a failure of the cell's first evaluation from its start may mean."""
    shapes = [tuple(t.shape) for t in tree_flatten(x)[0] if isinstance(t, Tensor)]
    described = shapes[0] if len(shapes) == 1 else shapes
    if not given:
        return (
            "deqhess: the cell raised this at its first evaluation, from the default start "
            f"h0 = zeros like x (shape {tuple(h0.shape)}), as the cell defines no "
            "init_state(x). A state of another shape than x needs one: define "
            "init_state(self, x) on the cell returning a tensor of the state's shape (its "
            "values are not used), or pass h0."
        )
    return (
        f"deqhess: the cell raised this at its first evaluation, from the h0 you passed "
        f"(shape {tuple(h0.shape)}; x: {described}). If h0 is not shaped like the state "
        "cell(x, h) returns, pass one that is, or leave h0 out."
    )


class InputLayout:
    """The input ``x`` as the tensors the fixed point is differentiated in, and back.

    Args:
        x: a tensor, or a tuple/list/dict of them; other leaves are kept as constants.

    Attributes:
        leaves: the leaves of ``x`` (``torch.utils._pytree`` order).
        spec: its tree structure.
        positions: indices of the leaves that are tensors.
    """

    def __init__(self, x: Any) -> None:
        leaves, self.spec = tree_flatten(x)
        self.leaves = leaves
        self.positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

    @property
    def tensors(self) -> list[Tensor]:
        """The tensors of ``x``, in leaf order."""
        return [self.leaves[i] for i in self.positions]

    def rebuild(self, tensors: tuple[Tensor, ...]) -> Any:
        """``x`` with its tensors replaced by ``tensors`` (in :attr:`tensors`' order).

        Args:
            tensors: one per tensor of ``x``, e.g. the solve's own copies.

        Returns:
            An input with ``x``'s structure and constants.
        """
        leaves = list(self.leaves)
        for i, t in zip(self.positions, tensors, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)


#: torch.func's message for saved-tensor hooks (non-reentrant checkpointing, offloading)
_SAVED_TENSOR_HOOKS = "don't yet support saved tensor hooks"


@contextlib.contextmanager
def saved_tensor_hooks_named() -> Iterator[None]:
    """Name saved-tensor hooks met by the ``torch.func`` transforms of the cell's derivatives.

    ``torch.utils.checkpoint(..., use_reentrant=False)`` inside the cell (or
    ``torch.autograd.graph.saved_tensors_hooks`` around it: CPU offloading) sets hooks that
    torch.func's ``vjp``/``jvp`` refuse with a bare ``RuntimeError``.

    Yields:
        Nothing: the block evaluates the cell for a derivative.

    Raises:
        UnsupportedDerivativeError: the cell met such hooks; the message says what to do.
        RuntimeError: any other error of the block, as it was.
    """
    try:
        yield
    except RuntimeError as error:
        if _SAVED_TENSOR_HOOKS not in str(error):
            raise
        raise UnsupportedDerivativeError(
            "the cell runs under saved-tensor hooks (torch.utils.checkpoint(..., "
            "use_reentrant=False) inside it, or torch.autograd.graph.saved_tensors_hooks "
            "around it), which torch.func — how the layer differentiates its cell — does "
            "not support. Remove the checkpoint from the cell: the layer keeps no solver "
            "iterations (its memory is one evaluation of the cell), so it would save "
            "nothing there; checkpointing around the layer, or elsewhere in the model, works."
        ) from error
