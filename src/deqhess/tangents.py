"""Reusable linearisations: JVPs traced once and replayed, for products taken many times."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["linearize"]


def linearize(fn: Callable[..., Any], *primals: Any) -> Callable[..., Any]:
    """The JVP of ``fn`` at ``primals`` as a function of the tangents.

    ``torch.func.linearize`` traces the tangent computation once, so each call replays
    only it (about 6× cheaper than a fresh ``torch.func.jvp`` for a DEQ cell). Where
    ``fn`` cannot be traced (data-dependent Python control flow), the result computes
    ``torch.func.jvp`` on each call instead — the same values, at the plain cost.
    """
    try:
        with warnings.catch_warnings():
            # torch's own tracing warnings (constants folded into the traced graph)
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
            _, jvp_fn = torch.func.linearize(fn, *primals)
    except Exception:  # untraceable fn: fall back to plain JVPs, same results

        def jvp_fn(*tangents: Any) -> Any:
            return torch.func.jvp(fn, primals, tangents)[1]

    return jvp_fn
