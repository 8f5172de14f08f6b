"""The modules a closure reaches, and what their hooks may see (``get_deq``'s closure form).

A closure ``z ↦ f(z)`` hides its modules; their observing hooks must see one evaluation
at the fixed point — whose backward carries the adjoint — not the solver's iterations
or the adjoint's products. :func:`closure_modules` finds the modules the closure
reaches (so their hooks can be set aside there), :func:`recording_calls` records the
modules one evaluation calls, and the two refusals name hooks out of the search's reach
and hooks that alter what the closure computes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedDerivativeError
from ..implicit.loss import referenced
from .hooks import describe_hooks, hooked_modules

__all__ = [
    "closure_modules",
    "recording_calls",
    "refuse_altering_hooks",
    "refuse_unreached_hooks",
]


def closure_modules(func: Any, budget: int = 2000) -> tuple[list[nn.Module], bool]:
    """The modules a closure reaches, each with its submodules (see :func:`_search`).

    An object the search cannot look into as expected (a compiled function's internals,
    a property that raises) ends it early rather than the user's forward.

    Returns:
        ``(modules, complete)``: the modules, each once; whether the search ended within
        its budget, without such an object.
    """
    found: dict[int, nn.Module] = {}
    try:
        return _search(func, budget, found)
    except Exception:
        return list(found.values()), False


def _search(func: Any, budget: int, found: dict[int, nn.Module]) -> tuple[list[nn.Module], bool]:
    """The modules a closure reaches, each with its submodules.

    Breadth first through its cells, defaults, bound ``self``, ``functools.partial``
    arguments, the globals its code names (or quotes: ``globals()["cell"]``), weak
    references, lists, tuples and dicts (none wider than :data:`_WIDE`) — and, of the
    objects, classes and modules of code it meets, the attributes its code names
    (``self.cell``, ``holder.cell``), not the rest (a trainer's log is not walked): at
    most ``budget`` objects looked into.

    Returns:
        ``(modules, complete)``: the modules, each once; whether the search ended within
        its budget.
    """
    seen: set[int] = set()
    names: set[str] = set()  # the attribute and global names the code reached mentions
    namespaces: list[Any] = []  # objects, classes, modules of code: looked up by those names
    looked: set[tuple[int, str]] = set()
    pending: collections.deque = collections.deque([func])
    while True:
        if not pending:  # look the names met so far up in the namespaces met so far
            for namespace in namespaces:
                for name in names - {n for i, n in looked if i == id(namespace)}:
                    looked.add((id(namespace), name))
                    with contextlib.suppress(Exception):  # a property may raise
                        pending.append(getattr(namespace, name, None))
            if not pending:
                return list(found.values()), True
        if budget == 0:
            return list(found.values()), False
        value = pending.popleft()
        if value is None or id(value) in seen or isinstance(value, _DATA):
            continue
        seen.add(id(value))
        budget -= 1
        if isinstance(value, nn.Module):  # with its submodules, without generators
            stack = [value]
            while stack:
                module = stack.pop()
                if id(module) not in found:
                    found[id(module)] = module
                    stack += [m for m in module._modules.values() if m is not None]
        else:
            held = _held_by(value, names)
            if held is None:  # an object, class or module of code: by the names met
                namespaces.append(value)
                if callable(value) and not isinstance(value, type):  # its __call__'s code
                    with contextlib.suppress(Exception):  # a compiled function's is builtin
                        pending.append(value.__call__)
            else:
                pending.extend(held)


#: data a closure's search does not look into
_DATA = (Tensor, str, bytes, int, float, complex, bool, np.generic, np.ndarray)

#: the widest container a closure's search looks into
_WIDE = 256


def _held_by(value: Any, names: set[str]) -> list[Any] | None:
    """What ``value`` holds that may lead to a module (see :func:`closure_modules`).

    The names a function's code mentions are added to ``names``.

    Returns:
        Its items, cells, defaults, globals named or referent; None for an object, class
        or module of code, whose attributes are looked up by the names met.
    """
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if len(value) > _WIDE:
            return []
        return list(value.values()) if isinstance(value, dict) else list(value)
    if isinstance(value, functools.partial):
        return [value.func, *value.args, *value.keywords.values()]
    if isinstance(value, weakref.ref):
        return [value()]
    inner = getattr(value, "__func__", value)
    code = getattr(inner, "__code__", None)
    if callable(value) and code is not None and not isinstance(value, type):
        quoted = {c for c in code.co_consts if isinstance(c, str)}  # globals()["cell"]
        names |= {*code.co_names, *quoted}  # the attributes it may look up
        names |= {n for c in code.co_consts if hasattr(c, "co_names") for n in c.co_names}
        namespace = getattr(inner, "__globals__", {})
        # its cells, defaults, bound self and the globals it reads, as Captured sees them
        return referenced(value) + [namespace[name] for name in quoted if name in namespace]
    if callable(value) and hasattr(value, "__self__") and not hasattr(value, "__dict__"):
        return [value.__self__]  # a builtin bound method
    return None


@contextlib.contextmanager
def recording_calls(called: list[nn.Module]) -> Iterator[None]:
    """Within the block, every module this thread calls is appended to ``called`` (once)."""
    thread = threading.get_ident()

    def record(module: nn.Module, args: Any) -> None:
        if threading.get_ident() == thread and all(m is not module for m in called):
            called.append(module)

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield
    finally:
        handle.remove()


def refuse_unreached_hooks(
    called: list[nn.Module], reached: list[nn.Module], complete: bool
) -> None:
    """Refuse observing hooks on modules the closure runs but the search did not reach.

    Raises:
        UnsupportedDerivativeError: such a module held an observing hook of its own, which
            then saw every solver iteration (global backward hooks are set aside whatever
            the module); the message says whether the search ran out of its budget.
    """
    held = {id(m) for m in reached}
    hooked = [type(m).__name__ for m in hooked_modules(called) if id(m) not in held]
    if not hooked:
        return
    why = (
        "deqhess's search of what the closure holds stopped at its budget of objects (a "
        "large object graph around it)"
        if not complete
        else "deqhess cannot find them from it (through its cells, defaults, globals, "
        "bound self, partial arguments, and the attributes its code names)"
    )
    raise UnsupportedDerivativeError(
        f"get_deq's closure runs modules with hooks ({', '.join(hooked)}) that {why}, "
        "so their hooks saw every solver iteration and Jacobian product, not one "
        "evaluation at the fixed point. Make the closure hold them directly (lambda z: "
        "cell(z, x)), or use deqhess.nn.DEQ(StateFirst(cell)), whose hooks see the model "
        "as the mathematics does."
    )


def refuse_altering_hooks(
    visible: Tensor, rows: Tensor, plain_residuals: Tensor, aside: nn.ModuleList
) -> None:
    """Refuse hooks that change what the closure computes.

    The solve runs with the closure's hooks set aside; the visible evaluation at ``z*``
    runs them. Where they only observe, both evaluate the same map (the same residual);
    a hook returning another value makes the visible evaluation another map, whose
    fixed point this is not.

    Raises:
        InputError: a sample's residual with the hooks exceeds the solve's (without them)
            beyond rounding, naming both and the hooks.
    """
    residuals = torch.linalg.vector_norm(visible - rows, dim=1)
    scale = 1.0 + torch.linalg.vector_norm(rows, dim=1)
    slack = 1e3 * torch.finfo(rows.dtype).eps * scale
    worse = residuals > 10.0 * plain_residuals + slack
    if bool(worse.any()):
        i = int(torch.nonzero(worse)[0, 0])
        raise InputError(
            f"a module hook of get_deq's closure changes what it computes: at the fixed "
            f"point found without the hooks (residual {float(plain_residuals[i]):.2e} on "
            f"sample {i}), the closure with them has residual {float(residuals[i]):.2e}. "
            f"Hooks ({'; '.join(_hook_names(aside))}) may observe, not alter: compute the "
            "change in the cell's forward instead."
        )


def _hook_names(aside: nn.ModuleList) -> list[str]:
    """The hooks of the closure's hooked modules, each named by its module's type."""
    names: list[str] = []
    for module in aside:
        for entry in describe_hooks(module, type(module).__name__):
            if entry not in names:
                names.append(entry)
    return names
