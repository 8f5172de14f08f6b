"""The state a factory's problem starts from, checked on the first batch.

``deqhess analyze`` users never pass ``h0``: the state starts at
``AnalysisProblem.init_state(x)`` (or the cell's), else at zeros like x. A start of
another dtype than θ, or of a shape ``f`` cannot take, is named here in those words —
the data's dtype, ``init_state``, ``--dtype`` — rather than in the library's (``h0``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..errors import InputError, add_note
from ..implicit.problem import check_first_call
from ..parameters import ParameterLayout, Parameters

__all__ = ["check_default_state", "checked_init"]


def check_default_state(f: Callable[..., Tensor], theta: Parameters, data: Iterable[Any]):
    """Try ``f`` once on the first batch from the default state, zeros shaped like x.

    With no ``init_state`` a state of another shape is then reported as such. Nothing is
    consumed: a one-shot iterator is re-chained, anything else read afresh.

    Returns:
        The data, to be read from the start.

    Raises:
        InputError: ``f`` fails on the default state or returns another shape (see
            :func:`deqhess.implicit.problem.check_first_call`).
    """  # noqa: DOC502 (raised by check_first_call)
    batches = iter(data)
    try:
        first = next(batches)
    except StopIteration:
        return []
    chained = itertools.chain([first], batches) if isinstance(data, Iterator) else data
    x = first[0] if isinstance(first, (tuple, list)) and len(first) == 2 else None
    if not isinstance(x, Tensor):
        return chained
    advice = (
        "the factory gave no init_state, so the state starts as zeros shaped like x, "
        f"{tuple(x.shape)}; if the state has another shape, set AnalysisProblem.init_state "
        "(e.g. lambda x: x.new_zeros(x.shape[0], n)) or give the cell an init_state(x) method"
    )
    h0 = torch.zeros_like(x)
    _check_state(x, h0, ParameterLayout(theta), "zeros like x, as the factory gave no init_state")
    check_first_call(f, x, h0, theta, state_advice=advice)
    return chained


def checked_init(
    init: Callable[[Any], Any], source: str, f: Callable[..., Tensor], theta: Parameters
) -> Callable[[Any], Any]:
    """``init``, its states checked against θ, and ``f`` tried once on the first.

    Returns:
        ``x ↦ init(x)``, refusing a state of another dtype or device than θ
        (:func:`_check_state`); on the first call, ``f`` is evaluated once at the state,
        and whatever it raises carries a note naming ``source``: a state of the wrong
        shape usually surfaces as ``f``'s own shape error.
    """
    first, layout = True, ParameterLayout(theta)

    def checked(x: Any) -> Any:
        nonlocal first
        h0 = init(x)
        _check_state(x, h0, layout, f"from {source}")
        if first and isinstance(h0, Tensor):
            first = False
            try:
                check_first_call(f, x, h0, theta)
            except Exception as error:
                if not isinstance(error, InputError):
                    add_note(error, _init_note(x, h0, source))
                raise
        return h0

    return checked


def _init_note(x: Any, h0: Tensor, source: str) -> str:
    """What a failure of ``f`` at the state ``source`` gave may mean."""
    shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
    return (
        f"deqhess: f raised this at its first evaluation, from the state {source} "
        f"returned (shape {tuple(h0.shape)}; x: {shape}). If that is not the shape of the "
        f"state f(x, h, theta) returns, fix {source.removesuffix('(x)')} to return one "
        "that is (its values are only the start)."
    )


def _check_state(x: Any, h0: Any, layout: ParameterLayout, source: str) -> None:
    """Refuse a starting state of another dtype or device than θ, naming the remedies.

    Raises:
        InputError: naming the state's, θ's and the data's dtype (device), and the
            factory's fixes or the command's ``--dtype`` (``--device``).
    """
    if not isinstance(h0, Tensor) or (h0.dtype, h0.device) == (layout.dtype, layout.device):
        return
    floating = [t for t in tree_flatten(x)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    data = f"; the data's x is {floating[0].dtype} on {floating[0].device}" if floating else ""
    flags = f"--dtype {str(layout.dtype).removeprefix('torch.')}"
    if h0.device != layout.device:
        flags += f" --device {layout.device}"
    raise InputError(
        f"the state starts as {h0.dtype} on {h0.device} ({source}{data}) but theta is "
        f"{layout.dtype} on {layout.device}: the state, theta and the data must share one "
        "dtype and device. Make them one in the factory (the data, theta and the state "
        f"init_state returns), or have the command cast them all, e.g. {flags}."
    )
