"""A fixed point whose backward passes through one visible evaluation of its map.

Hook-based tools read, at each module, its input in the forward and the gradient that
reaches its output in the backward. For a DEQ the model's own account is: the cell is
evaluated once, at the fixed point, and the gradient reaching the cell's output is the
adjoint ``λ = (I − J)⁻ᵀ ḡ`` (``ḡ`` the gradient reaching ``h*``), so that the cell's
backward yields ``λᵀ ∂f/∂θ`` and ``λᵀ ∂f/∂x``, the implicit gradient. So the layer returns

    ``y = Observed(b, z, args)``,  ``b = F(z, args)`` evaluated with hooks,

where ``z = h*(args)`` is :func:`deqhess.nn.fixed_point`'s output (exact to every order)
and ``Observed`` has the value ``z`` and the rules

* backward: ``ḡ ↦ (λ to b, −Jᵀλ to z, nothing to args)``, ``λ`` solved by the fixed
  point's adjoint system and ``Jᵀλ`` a VJP of ``F`` in ``z`` at ``(z, args)`` (both
  themselves differentiable);
* forward mode: ``ẏ = ż``.

The cell's backward sends ``(∂F/∂args)ᵀ λ`` to the arguments — the implicit gradient —
and ``Jᵀλ`` to ``z``, which the compensation ``−Jᵀλ`` cancels. What else reaches ``z`` is
the gradient of whatever the user took from the visible evaluation besides ``b`` (a
forward hook's stored activation, an attribute the cell keeps): ``w = (∂G/∂z)ᵀ ḡ_G`` for
such a ``G(z, args)``, which ``z``'s own backward carries through the implicit adjoint,
``(∂F/∂args)ᵀ (I − J)⁻ᵀ w``. Each term is the chain rule through ``h*(args)``, so every
captured tensor is an exact function of ``h*`` too. A recorded backward
(``create_graph``, ``torch.func``) is a function of ``(z, args)`` throughout — the cell's
own backward at ``(h*(args), args)``, the two solves, the compensation — so
differentiating it again is exact: the gradient is the rule :mod:`deqhess.nn.implicit`
differentiates. Where nothing is captured, the compensation cancels the cell's ``Jᵀλ``
to the last bit in a plain backward (the same products), and ``z``'s backward finds a
zero gradient and solves nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, add_note
from ..linear import Linearization
from ..locking import autocast_off, engine
from .implicit import FixedPointFunction, refuse_legacy_vmap
from .pullbacks import pullback
from .spec import FixedPointSpec
from .systems import NonlinearSystem, System
from .transforms import plain_value

__all__ = ["observed_fixed_point"]


def observed_fixed_point(
    spec: FixedPointSpec,
    z0: Tensor,
    args: tuple[Tensor, ...],
    observe: Callable[[Tensor], Tensor],
    describe: Callable[[], list[str]] = list,
) -> Tensor:
    """The fixed point ``z* = spec.fn(z*, *args)``, its gradients passing through ``observe``.

    As :func:`deqhess.nn.fixed_point`, but the gradients pass through ``observe(z*)`` —
    the map evaluated once more at the fixed point, where hooks see it.

    Args:
        spec: the map and how to solve it, as for :func:`deqhess.nn.fixed_point`.
        z0: the start, shaped like the state.
        args: the tensors ``z*`` is differentiated in (the inputs' and the cell's).
        observe: ``h ↦ F(h, *args)`` computed the way the user's model computes it (module
            hooks active); called once, with ``z*`` itself (differentiable: what it
            computes besides its output, a hook's stored activation say, is an exact
            function of ``z*``).
        describe: the hooks ``observe`` runs, in words, for the error below.

    Returns:
        ``z*``, shaped like ``z0``: the value of :func:`deqhess.nn.fixed_point`'s output,
        exact to every order, whose first-order gradient reaches the parameters and
        inputs through ``observe``'s graph (the hooks see the adjoint ``λ`` there).

    Raises:
        InputError: ``observe(z*)`` is not ``z*`` within the accepted residual: the map
            changed between the solve and this call. Where ``spec.fn`` (the map without
            hooks) still reproduces ``z*``, a hook alters a module's input or output:
            named, with the hooks rule; otherwise the cell is not deterministic (the
            linearisation's error).
    """
    system = NonlinearSystem(spec, len(args))
    z = FixedPointFunction.apply(system, z0, *args)
    with autocast_off():  # the map the solve used, in the state's dtype
        # through one node of its own, the cell's gradient to its input arrives at z as
        # one sum, the one the compensation cancels bit for bit (the same products)
        b = observe(z.clone())
    jacobian = system.jacobian
    # under torch.func, the values below the transforms' wrappers (under vmap the batched
    # system's linearisation is not this one's, and the values are per batch entry: none)
    seen, value = plain_value(z), plain_value(b)
    if jacobian is not None and seen is not None and value is not None:
        try:
            # always: an earlier certificate (a tangent's jvp) was of the map without hooks
            jacobian.linearization.certify(spec.rows(value), again=True)
        except InputError as error:
            plain = (plain_value(a) for a in args)
            inputs = tuple(p if p is not None else a for p, a in zip(plain, args, strict=True))
            _blame_hooks(spec, jacobian.linearization, seen, value, inputs, describe, error)
            raise
    return _Observed.apply(system, b, z, *args)


def _blame_hooks(
    spec: FixedPointSpec,
    linearization: Linearization,
    seen: Tensor,
    hooked: Tensor,
    args: tuple[Tensor, ...],
    describe: Callable[[], list[str]],
    error: InputError,
) -> None:
    """Raise an error naming the hooks if the map without them still reproduces ``z*``.

    Called when the visible evaluation moved the fixed point's residual (``error``, the
    linearisation's non-determinism error). One more evaluation, without hooks, tells
    the two causes apart: if it reproduces ``z*``, a hook changed the map.

    Raises:
        InputError: naming the hooks, when they are the cause (else returns, and the
            caller re-raises ``error`` with a note).
    """
    with autocast_off():  # in the visible evaluation's grad mode: only the hooks differ
        plain = spec.rows(spec.fn(seen, *args).detach())
    try:
        linearization.certify(plain)
    except InputError:
        add_note(
            error,
            "deqhess: the cell's module hooks were present, but the cell without them does "
            "not reproduce its fixed point either: the cell itself is not deterministic.",
        )
        return
    point = spec.rows(seen.detach())
    moved = float(torch.linalg.vector_norm(spec.rows(hooked) - point, dim=-1).max())
    kept = float(torch.linalg.vector_norm(plain - point, dim=-1).max())
    hooks = describe()
    listed = "; ".join(hooks[:6]) + (f" (and {len(hooks) - 6} more)" if len(hooks) > 6 else "")
    raise InputError(
        "a module hook on the DEQ layer's cell changes the map: evaluated once more at the "
        f"fixed point h* with its hooks, the cell is {moved:.2e} from h* (largest sample "
        f"residual), without them {kept:.2e}. The hooks: {listed}. The solver's iterations "
        "run without observing hooks and the layer's one visible evaluation with them. "
        "Hooks may observe, not alter: a forward hook or pre-hook must return None (or "
        "its input / output unchanged) and change nothing in place. Put a change to the "
        "map into the cell's forward instead."
    ) from None


class _Observed(torch.autograd.Function):
    @staticmethod
    def forward(system: System, b: Tensor, z: Tensor, *args: Tensor) -> Tensor:
        return z.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        system, _, z, *args = inputs
        ctx.system = system
        ctx.save_for_backward(z, *args)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        refuse_legacy_vmap()
        with engine():
            return _Observed._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple:
        z, *args = ctx.saved_tensors
        system: System = ctx.system
        if not ctx.needs_input_grad[1]:  # b needs no grad: nothing in args does either
            return (None, None, None, *([None] * len(args)))
        adjoint = FixedPointFunction.apply(system.adjoint(), grad, grad, z, *args)
        compensation = None
        if ctx.needs_input_grad[2]:  # cancels the Jᵀλ that b's graph sends to z
            fn, pulled = system.spec.fn, system.recorded_args(tuple(args))
            pull = pullback(lambda zz: fn(zz, *pulled), z)[1]
            compensation = -pull(adjoint)[0]
        return (None, adjoint, compensation, *([None] * len(args)))

    @staticmethod
    def jvp(ctx: Any, _system: None, _b_dot: Tensor | None, z_dot: Tensor, *_: Any) -> Tensor:
        # z* depends on every tensor b does (the args), so it has a tangent whenever b has
        return z_dot.clone()

    @staticmethod
    def vmap(info: Any, in_dims: tuple, system: System, b: Tensor, z: Tensor, *args: Tensor):
        _, b_dim, z_dim, *arg_dims = in_dims

        def front(t: Tensor, dim: int | None) -> Tensor:
            return t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)

        args = tuple(
            a if d is None else a.movedim(d, 0) for a, d in zip(args, arg_dims, strict=True)
        )
        batched = system.vmapped(tuple(None if d is None else 0 for d in arg_dims))
        return _Observed.apply(batched, front(b, b_dim), front(z, z_dim), *args), 0
