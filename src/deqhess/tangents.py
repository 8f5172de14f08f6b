"""Reusable linearisations: JVPs traced once and replayed, for products taken many times."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Linearized", "linearize"]


class Linearized:
    """The JVP ``v ↦ (∂fn/∂h)(primal) v`` as a function of the tangent (see :func:`linearize`).

    Attributes:
        traced: whether calls replay the verified trace (None until the first call with a
            nonzero product has decided; False: each call is a plain ``torch.func.jvp``).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], primal: Tensor, trace: bool = True) -> None:
        self.fn, self.primal = fn, primal
        self._trace: Callable[[Tensor], Tensor] | None = None
        self.traced: bool | None = None if trace else False
        if not trace:
            return
        try:
            with warnings.catch_warnings():
                # torch's own tracing warnings (constants folded into the traced graph)
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
                _, self._trace = torch.func.linearize(fn, primal)
        except Exception:  # untraceable fn: plain JVPs, same results
            self.traced = False

    def plain(self, v: Tensor) -> Tensor:
        """``torch.func.jvp`` afresh (vmappable)."""
        return torch.func.jvp(self.fn, (self.primal,), (v,))[1]

    def __call__(self, v: Tensor) -> Tensor:
        """The JVP ``(∂fn/∂h)(primal) v``, shaped like ``primal``.

        Args:
            v: the tangent, shaped like ``primal``.

        Returns:
            The product: replayed from the trace once the trace has been verified,
            else a plain ``torch.func.jvp``.
        """
        if self.traced is not None:
            return self._trace(v) if self._trace is not None and self.traced else self.plain(v)
        expected = self.plain(v)
        if not bool(expected.any()):  # a zero product cannot tell zeros from a bug
            return expected
        try:
            got = None if self._trace is None else self._trace(v)
        except Exception:
            got = None
        self.traced = got is not None and _agrees(got, expected)
        return expected


def linearize(fn: Callable[[Tensor], Tensor], primal: Tensor, trace: bool = True) -> Linearized:
    """The JVP ``v ↦ (∂fn/∂h)(primal) v`` as a function of the tangent.

    ``torch.func.linearize`` traces the tangent computation once, so each call replays
    only it (about 6× cheaper than a fresh ``torch.func.jvp`` for a DEQ cell). The traced
    product is **verified** against a plain ``torch.func.jvp`` on its first call: inside
    ``autograd.Function.forward`` and under ``inference_mode`` ``linearize`` silently
    returns zeros, and where ``fn`` cannot be traced (data-dependent Python control flow)
    it fails. In either case every call computes ``torch.func.jvp`` instead — the same
    values, at the plain cost.

    Args:
        fn: the map, ``[*shape] → [*shape]``.
        primal: the point ``h`` of the linearisation.
        trace: ``False`` skips the trace where the caller knows it cannot serve (inside
            ``autograd.Function.forward``): plain JVPs from the start.

    Returns:
        The product as a function of the tangent.
    """
    return Linearized(fn, primal, trace)


def _agrees(got: Tensor, expected: Tensor) -> bool:
    """Equal up to rounding (the traced graph runs the same operations)."""
    if got.shape != expected.shape:
        return False
    tolerance = torch.finfo(expected.dtype).eps ** 0.5
    scale = torch.linalg.vector_norm(expected)
    return bool(torch.linalg.vector_norm(got - expected) <= tolerance * scale)
