"""One-shot forms: solve an :class:`Equilibrium` and return one derivative."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..parameters import Parameters
from .equilibrium import Equilibrium
from .hessian import HessianSplit

__all__ = ["grad", "hessian", "hvp"]

Dynamics = Callable[[Any, Tensor, Parameters], Tensor]
LossFn = Callable[..., Tensor]


def grad(
    f: Dynamics, loss: LossFn, theta: Parameters, x: Any, h0: Tensor | None = None, **opts: Any
) -> Parameters:
    """``dL(h*)/dθ`` in θ's structure; ``opts`` go to :class:`Equilibrium`."""
    return Equilibrium(f, theta, x, h0, **opts).grad(loss)


def hessian(
    f: Dynamics,
    loss: LossFn,
    theta: Parameters,
    x: Any,
    h0: Tensor | None = None,
    split: bool = False,
    **opts: Any,
) -> Tensor | HessianSplit:
    """The exact dense Hessian ``[P, P]`` (or its split); ``opts`` go to :class:`Equilibrium`."""
    return Equilibrium(f, theta, x, h0, **opts).hessian(loss, split=split)


def hvp(
    f: Dynamics,
    loss: LossFn,
    theta: Parameters,
    x: Any,
    *args: Any,
    h0: Tensor | None = None,
    v: Parameters | None = None,
    **opts: Any,
) -> Parameters:
    """``H v`` for one direction: ``hvp(f, loss, theta, x, h0, v)`` or with keywords.

    ``h0`` and ``v`` may be given positionally (in that order) or as keywords; a
    single extra positional argument is ``v`` when ``h0`` is given by keyword and
    ``h0`` when ``v`` is.
    """
    if len(args) == 2:
        if h0 is not None or v is not None:
            raise TypeError("hvp got h0/v both positionally and by keyword.")
        h0, v = args
    elif len(args) == 1:
        if v is None and h0 is not None:
            v = args[0]
        elif h0 is None and v is not None:
            h0 = args[0]
        else:
            raise TypeError(
                "hvp(f, loss, theta, x, h0, v): one positional argument after x is "
                "ambiguous; pass h0=... and v=... as keywords."
            )
    elif len(args) > 2:
        raise TypeError(f"hvp takes at most h0 and v after x; got {len(args)} extra arguments.")
    if v is None:
        raise TypeError("hvp needs the direction v (theta's structure or a flat [P] tensor).")
    return Equilibrium(f, theta, x, h0, **opts).hvp(loss, v)
