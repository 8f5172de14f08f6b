"""The cell's module hooks see the layer as the mathematics does.

The ecosystem's curvature tools (BackPACK, curvlinops' KFAC, ASDL, laplace-torch's
backends) observe a model through module hooks: forward (pre-)hooks record each
module's input, backward hooks or tensor hooks on the module's output record the
gradient that reaches it. A DEQ's solver evaluates its cell dozens of times, and the
backward evaluates it again for every Jacobian product; none of those evaluations is a
step of the model. So every such evaluation runs with the observing hooks of the cell
and its submodules set aside (:func:`hooks_set_aside`, decided afresh at each
evaluation, so a hook registered between the forward and the backward is set aside
too), and the layer evaluates the cell once more, visibly, at the fixed point
(:mod:`deqhess.nn.observed`).

Hooks that *define* the map are kept: the legacy ``weight_norm`` and ``spectral_norm``
(their forward pre-hooks compute the weight) and ``torch.nn.utils.prune`` (its pre-hook
applies the mask). Global module hooks are process-wide: global forward (pre-)hooks —
profilers such as ``FlopCounterMode`` — are left alone and see every evaluation; global
backward hooks (``register_module_full_backward_hook`` and the like) cannot run inside
the ``torch.func`` transforms of the derivatives' products, so they are set aside with
the cell's own and see the visible evaluation, as every module's hooks do.

Hooks may observe, not alter. A module backward hook or backward pre-hook of the visible
evaluation that returns a value is refused when it runs (:func:`backward_hooks_checked`):
a new ``grad_input`` (the gradient reaching the state ``h*`` goes on through the
implicit adjoint, where the layer cancels the cell's own ``Jᵀλ``: a changed one would
break that account), or a new ``grad_output`` in a recorded
backward (its second derivatives could not follow the change). A backward pre-hook's
new ``grad_output`` in a plain backward acts as on any module evaluated once.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import InputError

__all__ = [
    "backward_hooks_checked",
    "describe_hooks",
    "has_hooks",
    "hooked_modules",
    "hooks_set_aside",
]

#: the per-module hook registries torch consults in ``Module.__call__``
_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)
#: the process-wide registries set aside with the cell's own (torch.nn.modules.module's)
_GLOBAL = ("_global_backward_pre_hooks", "_global_backward_hooks")
_KINDS = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
    "_global_backward_pre_hooks": "global backward pre-hook",
    "_global_backward_hooks": "global backward hook",
}


def _defines_map(hook: object) -> bool:
    """Whether a forward pre-hook is part of the module's map (not an observer)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))


def _global(name: str) -> OrderedDict:
    return getattr(torch.nn.modules.module, name)


def has_hooks(module: nn.Module, include_global: bool = True) -> bool:
    """Whether the cell is observed.

    Args:
        module: the cell (or any module).
        include_global: whether a global backward hook counts.

    Returns:
        True if ``module`` or a submodule holds an observing hook, or (with
        ``include_global``) a global backward hook is registered.
    """
    if include_global and any(_global(name) for name in _GLOBAL):
        return True
    for m in module.modules():
        for registry in _REGISTRIES:
            hooks = getattr(m, registry, None)
            if hooks and any(not _defines_map(h) for h in hooks.values()):
                return True
    return False


def hooked_modules(modules: list[nn.Module]) -> list[nn.Module]:
    """Those of ``modules`` that hold an observing hook of their own (not a submodule's).

    Returns:
        The modules, in order.
    """
    found = []
    for m in modules:
        own = m.__dict__  # the registries, read at the cost of a dict lookup each
        for registry in _REGISTRIES:
            hooks = own.get(registry)
            if hooks and any(not _defines_map(h) for h in hooks.values()):
                found.append(m)
                break
    return found


def describe_hooks(module: nn.Module, label: str = "cell") -> list[str]:
    """The hooks that observe ``module``, in words, for messages.

    Returns:
        One entry per global backward hook and per observing hook of ``module`` and its
        submodules (``"cell.lin: forward hook <lambda>"``).
    """
    found = [f"{_KINDS[name]} {_name(h)}" for name in _GLOBAL for h in _global(name).values()]
    for name, m in module.named_modules():
        for registry in _REGISTRIES:
            for hook in getattr(m, registry, {}).values():
                if not _defines_map(hook):
                    where = f"{label}.{name}" if name else label
                    found.append(f"{where}: {_KINDS[registry]} {_name(hook)}")
    return found


def _name(hook: object) -> str:
    return getattr(hook, "__qualname__", type(hook).__name__)


@contextlib.contextmanager
def _swapped(entries: list[tuple[Any, str, OrderedDict]]) -> Iterator[None]:
    """Within the block each ``owner.name`` is the given registry; put back afterwards.

    The original dicts are put back (the same objects, so hook handles stay valid).
    """
    saved: list[tuple[Any, str, OrderedDict]] = []
    try:
        for owner, name, replacement in entries:
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, hooks in reversed(saved):
            setattr(owner, name, hooks)


@contextlib.contextmanager
def hooks_set_aside(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module`` and its submodules run without their observing hooks.

    Decided when the block is entered (call it at each evaluation): each non-empty
    registry is replaced by a copy holding only the map-defining hooks, and the global
    backward hooks by empty ones; all are put back afterwards. Nothing is done where no
    hook is registered, the usual case. The registries are the modules' own and the
    process's, so another thread calling the same modules (or, for global backward
    hooks, any module) meanwhile would not see them either (the layer's derivative
    computations hold :data:`deqhess.locking.ENGINE_LOCK`; a bare forward solve does
    not).
    """
    entries: list[tuple[Any, str, OrderedDict]] = [
        (torch.nn.modules.module, name, OrderedDict()) for name in _GLOBAL if _global(name)
    ]
    for m in module.modules():
        own = m.__dict__  # the registries, read at the cost of a dict lookup each
        for registry in _REGISTRIES:
            hooks = own.get(registry)
            if not hooks:
                continue
            kept = OrderedDict((k, h) for k, h in hooks.items() if _defines_map(h))
            if len(kept) != len(hooks):
                entries.append((m, registry, kept))
    if not entries:
        yield
        return
    with _swapped(entries):
        yield


@contextlib.contextmanager
def backward_hooks_checked(
    module: nn.Module, label: str = "cell", strict: bool = False
) -> Iterator[None]:
    """Within the block, the backward hooks a call of ``module`` sets up refuse to alter.

    ``Module.__call__`` takes each module's (and the global) backward hooks and pre-hooks
    when it runs, so the hooks of the calls made in the block are wrappers that run the
    user's hook and raise if it returns a replacement: always for a backward hook (a new
    ``grad_input``), in a recorded backward (``create_graph``, ``torch.func``) for a
    backward pre-hook (a new ``grad_output``) — or, ``strict``, in any backward (where the
    evaluation's input is a detached fixed point, as in ``get_deq``'s closure form, the
    part of a changed gradient that flows back through it is lost). The registries are
    put back afterwards.
    """
    entries: list[tuple[Any, str, OrderedDict]] = []
    for name in _GLOBAL:
        if _global(name):
            where = f"a {_KINDS[name]}"
            entries.append((torch.nn.modules.module, name, _checked(_global(name), name, where)))
    for name, m in module.named_modules():
        for registry in ("_backward_pre_hooks", "_backward_hooks"):
            hooks = getattr(m, registry, None)
            if hooks:
                where = f"a {_KINDS[registry]} of {f'{label}.{name}' if name else label}"
                entries.append((m, registry, _checked(hooks, registry, where, strict)))
    if not entries:
        yield
        return
    with _swapped(entries):
        yield


def _checked(hooks: OrderedDict, registry: str, where: str, strict: bool = False) -> OrderedDict:
    """A copy of ``hooks`` whose hooks raise if they return a replacement gradient."""
    check: Callable[[str, Callable], None] = _refuse_hook_result
    if "pre" in registry:
        check = _refuse_pre_hook_always if strict else _refuse_pre_hook_result
    return OrderedDict((k, _checking(h, where, check)) for k, h in hooks.items())


def _checking(hook: Callable, where: str, check: Callable[[str, Callable], None]) -> Callable:
    """``hook``, its result checked by ``check`` when it returns one."""

    def checked(*args: Any) -> Any:
        result = hook(*args)
        if result is not None and not _unchanged(result, args[1]):
            check(where, hook)
        return result

    return checked


def _unchanged(result: Any, given: Any) -> bool:
    """Whether a hook returned the gradients it was given.

    Returns:
        True where ``result`` is ``given`` — the ``grad_input`` of a backward hook, the
        ``grad_output`` of a backward pre-hook (each its second argument) — or holds the
        same tensors.
    """
    if result is given:
        return True
    if isinstance(result, (tuple, list)) and isinstance(given, (tuple, list)):
        return len(result) == len(given) and all(a is b for a, b in zip(result, given, strict=True))
    return False


def _refuse_hook_result(where: str, hook: Callable) -> None:
    raise InputError(
        f"{where} ({_name(hook)}) returned a new grad_input inside the DEQ layer's cell. "
        "Hooks on the cell see its one evaluation at the fixed point, whose input state h* "
        "is the solution of the fixed-point equation: a replaced gradient there has no "
        "meaning the layer could give it. Hooks may observe, not alter: return None from "
        "the hook (change the loss, or the gradients after backward(), instead)."
    )


def _refuse_pre_hook_always(where: str, hook: Callable) -> None:
    raise InputError(
        f"{where} ({_name(hook)}) returned a new grad_output in get_deq's closure, whose "
        "one visible evaluation takes the fixed point as a detached input: the part of a "
        "changed gradient that flows back through z* would be lost. Hooks may observe, not "
        "alter: return None from the hook (scale the loss, or the gradients after "
        "backward(), instead), or use deqhess.nn.DEQ(StateFirst(cell)), which follows it."
    )


def _refuse_pre_hook_result(where: str, hook: Callable) -> None:
    if not torch.is_grad_enabled():  # a plain backward: as on any module evaluated once
        return
    raise InputError(
        f"{where} ({_name(hook)}) returned a new grad_output inside the DEQ layer's cell "
        "while the backward is recorded (create_graph=True, or a torch.func transform): "
        "the layer's second derivatives could not follow the change. Hooks may observe, "
        "not alter, for derivatives beyond the first: return None from the hook there."
    )
