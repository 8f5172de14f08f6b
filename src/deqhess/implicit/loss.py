"""A user's loss, ``L(h)`` or ``L(h, θ)``, and what it captured.

Its arity is decided once from its signature; what it captured is watched, to notice
when a cached adjoint no longer matches it.
"""

from __future__ import annotations

import dis
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree

from ..errors import InputError, add_note
from ..parameters import Parameters
from ..streaming.fingerprint import tensor_digests

__all__ = [
    "Captured",
    "tensor_version",
    "Loss",
    "digests",
    "positional_counts",
    "referenced",
    "required_positional",
]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class Loss:
    """Wraps ``loss(h)`` or ``loss(h, theta)`` so both are called as ``L(h, θ)``.

    The arity is the number of required positional parameters of ``fn`` (of its
    ``forward`` for an ``nn.Module``): one means ``L(h)``, two means ``L(h, θ)`` (θ in
    the user's structure: a tensor or a dict). A callable whose signature cannot be read
    (or that takes ``*args``) is taken as ``L(h)``.

    Raises:
        InputError: ``fn`` is not callable, is one of torch's loss modules (they take a
            target), or requires more than two positional arguments; or, when called, it
            returns anything but a 0-dim floating tensor.
    """

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        if not callable(fn):
            raise InputError(f"loss must be callable; got {type(fn).__name__}.")
        if isinstance(fn, torch.nn.modules.loss._Loss):  # forward(input, target)
            name = type(fn).__name__
            raise InputError(
                f"loss is torch's {name}, which takes (input, target), while Equilibrium "
                "calls loss(h) or loss(h, theta) (two arguments read as h and theta). Bind "
                f"the target: loss=lambda h: {name}()(h, target); DatasetEquilibrium and "
                "ModelCurvature take a loss(output, target) as it is."
            )
        self.fn = fn
        self.uses_theta = _required_positional(fn) == 2

    def __call__(self, h: Tensor, theta: Parameters) -> Tensor:
        """``L(h, θ)``: the user's loss called with the arguments it takes.

        Args:
            h: the state, shaped like the equilibrium's ``h``.
            theta: θ in the user's structure (passed only to ``loss(h, theta)``).

        Returns:
            The loss, a 0-dim floating tensor.

        Raises:
            InputError: the loss returned anything but a 0-dim floating tensor, or,
                called as ``loss(h)``, asked for another positional argument.
            TypeError: the loss's own (re-raised as it is).
        """
        try:
            value = self.fn(h, theta) if self.uses_theta else self.fn(h)
        except TypeError as error:
            if not self.uses_theta and "required positional argument" in str(error):
                raise InputError(
                    "the loss was called as loss(h) — its signature does not say it takes "
                    "theta too (it takes *args, as a decorator without functools.wraps "
                    f"gives) — and asked for another argument: {error}. Write it as "
                    "loss(h, theta) with two named parameters, or decorate the wrapper "
                    "with functools.wraps(loss) so that its signature shows."
                ) from error
            raise
        except Exception as error:
            if torch._C._functorch.peek_interpreter_stack() is not None:
                add_note(
                    error,
                    "deqhess: the loss is called inside torch.func transforms (grad, vmap) "
                    "to differentiate it: it must stay a torch function of h (and theta) "
                    "— .numpy(), .item(), float(...) or an in-place write to h fail there.",
                )
            raise
        if not isinstance(value, Tensor) or value.ndim != 0 or not value.is_floating_point():
            got = (
                f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise InputError(
                f"loss must return a 0-dim floating tensor (a scalar); got {got}. Reduce it, "
                "e.g. with .sum() or .mean()."
            )
        return value


def required_positional(fn: Callable[..., Tensor]) -> int | None:
    """The number of required positional parameters of ``fn``.

    Of its ``forward`` for an ``nn.Module``, whose ``__call__`` takes ``*args``.

    Returns:
        The count, or None if it cannot be read (no signature, or ``*args``).
    """
    counts = positional_counts(fn)
    return None if counts is None else counts[0]


def positional_counts(
    fn: Callable[..., Any], follow_wrapped: bool = True
) -> tuple[int, int] | None:
    """The positional parameters of ``fn``: how many are required, how many there are.

    Of its ``forward`` for an ``nn.Module``, whose ``__call__`` takes ``*args``.

    Args:
        fn: the function (or module).
        follow_wrapped: read the signature of what ``functools.wraps`` says it wraps
            (``inspect.signature``'s default) rather than its own.

    Returns:
        ``(required, positional)``, or None if they cannot be read (no signature, or
        ``*args``).
    """
    if isinstance(fn, torch.nn.Module):
        fn = fn.forward
    try:
        params = inspect.signature(fn, follow_wrapped=follow_wrapped).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    positional = [p for p in params if p.kind in _POSITIONAL]
    return sum(1 for p in positional if p.default is p.empty), len(positional)


def _required_positional(fn: Callable[..., Tensor]) -> int:
    required = required_positional(fn)
    if required is None:  # unreadable: taken as L(h)
        return 1
    if required not in (1, 2):
        raise InputError(
            f"loss must take loss(h) or loss(h, theta); {getattr(fn, '__name__', fn)!r} "
            f"requires {required} positional arguments. Bind extra data with "
            "functools.partial or a closure."
        )
    return required


def tensor_version(t: Tensor) -> int | None:
    """``t._version``; None for an inference tensor, which keeps none (its bytes tell)."""
    return None if t.is_inference() else t._version


class Captured:
    """What a loss reads besides its arguments, as far as Python shows it, one level deep.

    The objects in its closure cells, its defaults, ``functools.partial`` arguments,
    the instance of a bound method or callable object (and, through ``__wrapped__`` or
    ``_wrapped_loss``, what such an object wraps), and the tensors, numbers and
    containers among the globals it names; and the ``_version`` and the content digest
    (:func:`~deqhess.streaming.fingerprint.tensor_digests`) of every tensor among them
    (also inside lists, tuples, dicts, ``nn.Module`` parameters and buffers, and an
    instance's attributes). :meth:`changed` tells whether any was rebound or modified
    in place since — through the tensor, or through ``.data``, ``.numpy()`` or another
    view of its memory, which leave its version as it was.

    Not seen: state reached through other functions or objects the loss calls,
    NumPy arrays or Python lists changed in place, files, random state.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._objects = referenced(fn, _WATCHED_GLOBALS)
        tensors = _tensors_in(self._objects)
        self._tensors = [(t, tensor_version(t)) for t in tensors]
        self._digests = digests(tensors)

    def changed(self, contents: bool = True) -> bool:
        """Whether a captured object was rebound or a captured tensor changed in place.

        Args:
            contents: also compare the tensors' bytes (one pass over them), which sees
                a write through ``.data`` or a NumPy view; False compares versions only.

        Returns:
            True when anything it watches differs from what it saw at construction.
        """
        objects = referenced(self.fn, _WATCHED_GLOBALS)
        if len(objects) != len(self._objects) or any(
            a is not b for a, b in zip(objects, self._objects, strict=True)
        ):
            return True
        tensors = _tensors_in(objects)
        if len(tensors) != len(self._tensors) or any(
            t is not u or tensor_version(t) != version
            for t, (u, version) in zip(tensors, self._tensors, strict=True)
        ):
            return True
        return contents and digests(tensors) != self._digests


def digests(tensors: list[Tensor]) -> tuple[int | None, ...]:
    """The content digest of each tensor (None for one with no plain memory to read).

    A write through ``.data``, ``.numpy()`` or another view leaves a tensor's
    ``_version`` as it was; its bytes are what change. A sparse, nested or meta tensor
    has no strided memory to hash: its version alone is watched (and an empty one has
    nothing to change).

    Returns:
        One digest (or None) per tensor, in order.
    """
    readable = [_readable(t) for t in tensors]
    # a conjugate or negative view is read as its values (its bits are the base's)
    hashed = [t.resolve_conj().resolve_neg() for t, r in zip(tensors, readable, strict=True) if r]
    found = iter(tensor_digests(hashed))
    return tuple(next(found) if r else None for r in readable)


def _readable(t: Tensor) -> bool:
    strided = t.layout == torch.strided and not t.is_nested
    return strided and t.device.type != "meta" and t.numel() > 0


_EMPTY_CELL = object()
_MAX_LEAVES = 1024
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


#: the globals :class:`Captured` watches (what a loss reads as data)
_WATCHED_GLOBALS = (Tensor, int, float, complex, list, tuple, dict)


def referenced(fn: Any, globals_of: tuple[type, ...] | None = None) -> list[Any]:
    """What a function reads besides its arguments, as far as Python shows it.

    The arguments of ``functools.partial`` (nested too), the instance of a bound method,
    the contents of its closure cells (a marker for one not yet bound), its defaults and
    keyword defaults, and the globals its code reads (``LOAD_GLOBAL``, nested code
    included, not attribute names); for a callable object, the object and what it wraps
    (``__wrapped__``, ``_wrapped_loss``).

    Args:
        fn: the function (or callable).
        globals_of: keep only globals of these types (None: all).

    Returns:
        The objects, in that order (not deduplicated).
    """
    objects: list[Any] = []
    while isinstance(fn, functools.partial):
        objects += [*fn.args, *fn.keywords.values()]
        fn = fn.func
    if inspect.ismethod(fn):
        objects.append(fn.__self__)
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: its state is its attributes, and what it wraps
        # functools' convention, or deqhess's own wrappers (whose __wrapped__ would make
        # inspect.signature read the wrapped function's arguments)
        wrapped = getattr(fn, "_wrapped_loss", None) or getattr(fn, "__wrapped__", None)
        if wrapped is not None and wrapped is not fn:
            return [*objects, fn, *referenced(wrapped, globals_of)]
        return [*objects, fn]
    for cell in fn.__closure__ or ():
        try:
            objects.append(cell.cell_contents)
        except ValueError:  # a cell not yet bound
            objects.append(_EMPTY_CELL)
    objects += [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    names = fn.__globals__
    for name in _global_names(code):
        value = names.get(name, _EMPTY_CELL)
        if value is not _EMPTY_CELL and (globals_of is None or isinstance(value, globals_of)):
            objects.append(value)
    return objects


@functools.lru_cache(maxsize=256)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The globals ``code`` reads (``LOAD_GLOBAL``/``LOAD_NAME``, nested code included).

    Not ``co_names`` as a whole, which also lists attribute names: ``theta["W"].T``
    would have made any global named ``T`` part of what the function reads.

    Returns:
        The names, each once, in the order first read.
    """
    found: list[str] = []
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            found.append(instruction.argval)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            found += _global_names(constant)
    return tuple(dict.fromkeys(found))


def _tensors_in(objects: list[Any]) -> list[Tensor]:
    found: list[Tensor] = []
    for obj in objects:
        if isinstance(obj, Tensor):
            found.append(obj)
        elif isinstance(obj, torch.nn.Module):
            found += [*obj.parameters(), *obj.buffers()]
            for module in obj.modules():  # plain tensor attributes (a target set as self.y)
                found += [t for t in vars(module).values() if isinstance(t, Tensor)]
        elif isinstance(obj, (list, tuple, dict)):
            leaves = _pytree.tree_leaves(obj)
            found += [t for t in leaves[:_MAX_LEAVES] if isinstance(t, Tensor)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, _OPAQUE):
            found += [t for t in vars(obj).values() if isinstance(t, Tensor)]
    return found
