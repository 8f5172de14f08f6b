"""One-shot forms: solve an :class:`Equilibrium` and return one derivative."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

from torch import Tensor

from ..errors import ArgumentError
from ..parameters import ParameterLayout, Parameters
from .equilibrium import Equilibrium
from .hessian import HessianSplit, split_deprecated
from .problem import FixedPointMap

__all__ = ["grad", "hessian", "hessian_split", "hvp"]

LossFn = Callable[..., Tensor]


def grad(
    f: FixedPointMap, loss: LossFn, theta: Parameters, x: Any, h0: Tensor | None = None, **opts: Any
) -> Parameters:
    """The gradient ``dL(h*)/dθ`` at the fixed point ``h* = f(x, h*, θ)``.

    Solves the fixed point and one adjoint system ``(I − J)ᵀ λ = ∇ₕL``; the same as
    ``Equilibrium(f, theta, x, h0, **opts).grad(loss)``.

    Args:
        f: the DEQ map ``f(x, h, θ)``, returning a tensor shaped like ``h``.
        loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
        theta: θ, a tensor or a dict of tensors.
        x: the input (a tensor, or any structure ``f`` reads).
        h0: the initial state, which fixes the state's shape and dtype; default zeros
            shaped like ``x`` (then ``x`` must be a tensor).
        **opts: keywords of :class:`Equilibrium` (``solver``, ``tol``, ``batch_dim``, …).

    Returns:
        ``dL/dθ`` with θ's structure.
    """
    return Equilibrium(f, theta, x, h0, **opts).grad(loss)


@overload
def hessian(
    f: FixedPointMap,
    loss: LossFn,
    theta: Parameters,
    x: Any,
    h0: Tensor | None = None,
    split: Literal[False] = False,
    **opts: Any,
) -> Tensor: ...
@overload
def hessian(
    f: FixedPointMap,
    loss: LossFn,
    theta: Parameters,
    x: Any,
    h0: Tensor | None = None,
    *,
    split: Literal[True],
    **opts: Any,
) -> HessianSplit: ...
def hessian(
    f: FixedPointMap,
    loss: LossFn,
    theta: Parameters,
    x: Any,
    h0: Tensor | None = None,
    split: bool = False,
    **opts: Any,
) -> Tensor | HessianSplit:
    """The exact dense Hessian ``d²L(h*)/dθ²`` ``[P, P]``, θ flattened in order.

    The same as ``Equilibrium(f, theta, x, h0, **opts).hessian(loss)``.

    Args:
        f: the DEQ map ``f(x, h, θ)``, returning a tensor shaped like ``h``.
        loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
        theta: θ, a tensor or a dict of tensors (P numbers in all).
        x: the input (a tensor, or any structure ``f`` reads).
        h0: the initial state, which fixes the state's shape and dtype; default zeros
            shaped like ``x``.
        split: deprecated: ``split=True`` returns what :func:`hessian_split` does.
        **opts: keywords of :class:`Equilibrium` (``solver``, ``tol``, ``batch_dim``, …).

    Returns:
        The Hessian ``[P, P]`` (a :class:`HessianSplit` with the deprecated
        ``split=True``).
    """
    if split:
        split_deprecated("deqhess.hessian", "deqhess.hessian_split(f, loss, theta, x, h0)")
        return hessian_split(f, loss, theta, x, h0, **opts)
    return Equilibrium(f, theta, x, h0, **opts).hessian(loss)


def hessian_split(
    f: FixedPointMap, loss: LossFn, theta: Parameters, x: Any, h0: Tensor | None = None, **opts: Any
) -> HessianSplit:
    """The Hessian's two parts, the loss and the dynamics curvature, each ``[P, P]``.

    The same as ``Equilibrium(f, theta, x, h0, **opts).hessian_split(loss)``.

    Args:
        f: the DEQ map ``f(x, h, θ)``, returning a tensor shaped like ``h``.
        loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
        theta: θ, a tensor or a dict of tensors (P numbers in all).
        x: the input (a tensor, or any structure ``f`` reads).
        h0: the initial state, which fixes the state's shape and dtype; default zeros
            shaped like ``x``.
        **opts: keywords of :class:`Equilibrium` (``solver``, ``tol``, ``batch_dim``, …).

    Returns:
        ``.loss_curvature`` ``[I; Z]ᵀ∇²L[I; Z]``, ``.dynamics_curvature``
        ``[I; Z]ᵀ∇²(λᵀf)[I; Z]`` and their sum ``.total``, the Hessian.
    """
    return Equilibrium(f, theta, x, h0, **opts).hessian_split(loss)


def hvp(
    f: FixedPointMap,
    loss: LossFn,
    theta: Parameters,
    x: Any,
    *positional: Any,
    h0: Tensor | None = None,
    v: Parameters | None = None,
    **opts: Any,
) -> Parameters:
    """``H v``, the exact Hessian-vector product along one direction ``v``.

    Pass ``h0`` and ``v`` by keyword: ``hvp(f, loss, theta, x, h0=h0, v=v)``. The
    contract's positional forms work too — ``hvp(f, loss, theta, x, h0, v)`` in that
    order, and one of them positional beside the other by keyword — when the two cannot
    be confused: a positional ``h0`` that has the form of a direction (θ's structure, a
    flat ``[P]`` tensor or a ``[P, K]`` block) is refused, since a swap would go
    unnoticed; so is a single positional argument with neither keyword.

    Args:
        f: the DEQ map ``f(x, h, θ)``, returning a tensor shaped like ``h``.
        loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
        theta: θ, a tensor or a dict of tensors (P numbers in all).
        x: the input (a tensor, or any structure ``f`` reads).
        *positional: ``h0, v`` in that order; or one of them, the other by keyword; or
            nothing (the keywords instead).
        h0: the initial state, which fixes the state's shape and dtype; default zeros
            shaped like ``x``.
        v: the direction: θ-structured, a flat ``[P]`` tensor or a ``[P, K]`` block.
        **opts: keywords of :class:`Equilibrium` (``solver``, ``tol``, ``batch_dim``, …).

    Returns:
        ``H v`` in the form of ``v``.

    Raises:
        ArgumentError: ``v`` is missing; more than two positional arguments follow
            ``x``, or one with neither keyword; ``h0``/``v`` given both positionally and by
            keyword; a positional ``h0`` that has a direction's form; or an ``h0`` of a
            direction's form beside a ``v`` of none (swapped, by keyword too).
    """
    if positional:
        h0, v = _positional_state_and_direction(theta, positional, h0, v)
    if v is None:
        raise ArgumentError(
            "hvp needs the direction v: hvp(f, loss, theta, x, h0=..., v=...), v with "
            "theta's structure or a flat [P] tensor."
        )
    _check_not_swapped(ParameterLayout(theta), h0, v)
    return Equilibrium(f, theta, x, h0, **opts).hvp(loss, v)


def _positional_state_and_direction(
    theta: Parameters, positional: tuple[Any, ...], h0: Any, v: Any
) -> tuple[Tensor | None, Any]:
    """``(h0, v)`` from the contract's positional forms.

    ``hvp(f, loss, theta, x, h0, v)``, or one of the two positional beside the other by
    keyword (``hvp(..., x, v, h0=h0)``, ``hvp(..., x, h0, v=v)``).

    Returns:
        ``(h0, v)``.

    Raises:
        ArgumentError: more than two, one with neither keyword given, one given both ways,
            or an ``h0`` that could be a direction (the two could be swapped unnoticed).
    """
    keywords = "pass them by keyword: hvp(f, loss, theta, x, h0=..., v=...)"
    if len(positional) > 2:
        raise ArgumentError(
            f"hvp takes h0 and v after x; got {len(positional)} positional arguments after "
            f"x; {keywords}."
        )
    if len(positional) == 2 and (h0 is not None or v is not None):
        raise ArgumentError(
            f"hvp got h0 and v positionally and h0= or v= by keyword as well; {keywords}."
        )
    if len(positional) == 1:
        if (h0 is None) == (v is None):
            raise ArgumentError(
                "hvp got one positional argument after x and "
                + ("h0= and v= by keyword too" if h0 is not None else "neither h0= nor v=")
                + f", so it could be either; {keywords}."
            )
        if h0 is not None:  # the positional one is the direction
            return h0, positional[0]
        positional = (positional[0], v)
    state, direction = positional
    if _direction_form(ParameterLayout(theta), state):
        got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
        raise ArgumentError(
            f"hvp(f, loss, theta, x, h0, v): the h0 given ({got}) has the form of a "
            f"direction, so h0 and v could be swapped unnoticed; {keywords}."
        )
    return state, direction


def _check_not_swapped(layout: ParameterLayout, h0: Any, v: Any) -> None:
    """Refuse an ``h0`` that has a direction's form beside a ``v`` that has none.

    Such a ``v`` would be refused anyway, after the forward solve; with such an ``h0``
    the likelier mistake is the two swapped (by keyword too), and ``f`` would fail on
    the direction as its state first. Both of a direction's form cannot be told apart.

    Raises:
        ArgumentError: ``h0`` has a direction's form and ``v`` does not.
    """
    if h0 is None or not _direction_form(layout, h0) or _direction_form(layout, v):
        return
    h0_got, v_got = (tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (h0, v))
    raise ArgumentError(
        f"hvp got h0 {h0_got}, which has the form of a direction (theta's structure, [P] or "
        f"[P, K] with P = {layout.size}), and v {v_got}, which has not: h0 and v look "
        "swapped; pass h0=<the initial state>, v=<the direction>."
    )


def _direction_form(layout: ParameterLayout, value: Any) -> bool:
    """Whether ``value`` has a form that the Hessian operator takes as a direction.

    Returns:
        True for a θ-structured value, a list or tuple (of tensors, one per parameter), a
        flat ``[P]`` tensor or a ``[P, K]`` block.
    """
    if isinstance(value, (Mapping, list, tuple)) or layout.matches(value):
        return True
    return isinstance(value, Tensor) and value.ndim in (1, 2) and value.shape[0] == layout.size
