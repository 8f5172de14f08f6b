"""A user's loss, ``L(h)`` or ``L(h, θ)``, with its arity decided once from its signature."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor

from ..parameters import Parameters

__all__ = ["Loss", "required_positional"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class Loss:
    """Wraps ``loss(h)`` or ``loss(h, theta)`` so both are called as ``L(h, θ)``.

    The arity is the number of required positional parameters of ``fn``: one means
    ``L(h)``, two means ``L(h, θ)`` (θ in the user's structure: a tensor or a dict).
    A callable whose signature cannot be read is taken as ``L(h)``.

    Raises:
        ValueError: ``fn`` is not callable or requires more than two positional
            arguments; or, when called, it returns anything but a 0-dim floating tensor.
    """

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        if not callable(fn):
            raise ValueError(f"loss must be callable; got {type(fn).__name__}.")
        self.fn = fn
        self.uses_theta = _required_positional(fn) == 2

    def __call__(self, h: Tensor, theta: Parameters) -> Tensor:
        value = self.fn(h, theta) if self.uses_theta else self.fn(h)
        if not isinstance(value, Tensor) or value.ndim != 0 or not value.is_floating_point():
            got = (
                f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"loss must return a 0-dim floating tensor (a scalar); got {got}. Reduce it, "
                "e.g. with .sum() or .mean()."
            )
        return value


def required_positional(fn: Callable[..., Tensor]) -> int:
    """The number of required positional parameters of ``fn`` (1 if unreadable or ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 1
    return sum(1 for p in params if p.kind in _POSITIONAL and p.default is p.empty)


def _required_positional(fn: Callable[..., Tensor]) -> int:
    required = required_positional(fn)
    if required not in (1, 2):
        raise ValueError(
            f"loss must take loss(h) or loss(h, theta); {getattr(fn, '__name__', fn)!r} "
            f"requires {required} positional arguments. Bind extra data with "
            "functools.partial or a closure."
        )
    return required
