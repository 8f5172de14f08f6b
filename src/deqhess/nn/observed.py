"""A fixed point whose backward passes through one visible evaluation of its map.

Hook-based tools read, at each module, its input in the forward and the gradient that
reaches its output in the backward. For a DEQ the model's own account is: the cell is
evaluated once, at the fixed point, and the gradient reaching the cell's output is the
adjoint ``λ = (I − J)⁻ᵀ ḡ`` (``ḡ`` the gradient reaching ``h*``), so that the cell's
backward yields ``λᵀ ∂f/∂θ`` and ``λᵀ ∂f/∂x``, the implicit gradient. So the layer returns

    ``y = Observed(b, z, args)``,  ``b = F(sg z, args)`` evaluated with hooks,

where ``z = h*(args)`` is :func:`deqhess.nn.fixed_point`'s output (exact to every order),
``sg`` stops the gradient, and ``Observed`` has the value ``z`` and the rules

* backward: ``ḡ ↦ (λ to b, nothing to z, T to args)``, ``λ`` solved by the fixed point's
  adjoint system (itself differentiable);
* forward mode: ``ẏ = ż``.

First-order gradients flow only through ``b``: every parameter and input gets
``(∂F/∂·)ᵀ λ`` at ``(sg z, args)`` — the implicit gradient — and the hooks inside ``F`` see
``λ``. A recorded backward (``create_graph``, ``torch.func``) must also be exact as a
function of ``args``, so it adds ``T = (∂F/∂args)ᵀλ|_(z, args) − (∂F/∂args)ᵀλ|_(sg z, args)``:
zero in value (the same numbers evaluated twice), and its derivatives restore the
dependence of ``∂F/∂args`` on ``h*`` that ``sg`` cut. The recorded gradient is then, as a
function, ``(∂F/∂args)ᵀ λ`` at ``(h*(args), args)`` — the rule
:mod:`deqhess.nn.implicit` differentiates — so every order stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import add_note
from ..locking import autocast_off, engine
from .implicit import (
    FixedPointSpec,
    _FixedPoint,
    _Nonlinear,
    _refuse_legacy_vmap,
    _System,
    args_pullback,
)

__all__ = ["observed_fixed_point"]


def observed_fixed_point(
    spec: FixedPointSpec,
    z0: Tensor,
    args: tuple[Tensor, ...],
    observe: Callable[[Tensor], Tensor],
) -> Tensor:
    """The fixed point ``z* = spec.fn(z*, *args)``, its gradients passing through ``observe``.

    As :func:`deqhess.nn.fixed_point`, but the gradients pass through ``observe(z*)`` —
    the map evaluated once more at the fixed point, where hooks see it.

    Args:
        spec: the map and how to solve it, as for :func:`deqhess.nn.fixed_point`.
        z0: the start, shaped like the state.
        args: the tensors ``z*`` is differentiated in (the inputs' and the cell's).
        observe: ``h ↦ F(h, *args)`` computed the way the user's model computes it (module
            hooks active); called once, with ``z*`` detached.

    Returns:
        ``z*``, shaped like ``z0``: the value of :func:`deqhess.nn.fixed_point`'s output,
        exact to every order, whose first-order gradient reaches the parameters and
        inputs through ``observe``'s graph (the hooks see the adjoint ``λ`` there).

    Raises:
        ValueError: ``observe(z*)`` is not ``z*`` within the accepted residual: the map
            changed between the solve and this call (a hook that alters the cell's output,
            or a non-deterministic cell). The error is the linearisation's, with a note
            on hooks added.
    """
    system = _Nonlinear(spec, len(args))
    z = _FixedPoint.apply(system, z0, *args)
    seen = z.detach()
    wanted = any(a.requires_grad for a in args)
    if wanted and torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None:
        # as in any model, the state entering the cell requires grad (a full backward
        # hook then sees its gradient, Jᵀλ, which goes no further: sg z is a fresh leaf)
        seen.requires_grad_(True)
    with autocast_off():  # the map the solve used, in the state's dtype
        b = observe(seen)
    jacobian = system.jacobian
    if jacobian is not None and torch._C._functorch.peek_interpreter_stack() is None:
        try:
            jacobian.linearization.certify(spec.rows(b.detach()))
        except ValueError as error:
            add_note(
                error,
                "deqhess: this evaluation of the cell at the fixed point ran with the cell's "
                "module hooks, which the solver's iterations do not run: a hook that changes "
                "a module's input or output changes the map. Hooks may observe, not alter.",
            )
            raise
    return _Observed.apply(system, b, z, *args)


class _Observed(torch.autograd.Function):
    @staticmethod
    def forward(system: _System, b: Tensor, z: Tensor, *args: Tensor) -> Tensor:
        return z.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        system, _, z, *args = inputs
        ctx.system = system
        ctx.save_for_backward(z, *args)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        _refuse_legacy_vmap()
        with engine():
            return _Observed._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple:
        z, *args = ctx.saved_tensors
        system: _System = ctx.system
        grads: list[Tensor | None] = [None] * len(args)
        if not ctx.needs_input_grad[1]:  # b needs no grad: nothing in args does either
            return (None, None, None, *grads)
        adjoint = _FixedPoint.apply(system.adjoint(), grad, grad, z, *args)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        if wanted and torch.is_grad_enabled():  # recorded: restore the dependence on h*
            at_fixed_point = args_pullback(system.spec.fn, z, tuple(args), wanted)[1](adjoint)
            at_stopped = args_pullback(system.spec.fn, z.detach(), tuple(args), wanted)[1](adjoint)
            for i, a, s in zip(wanted, at_fixed_point, at_stopped, strict=True):
                grads[i] = a - s
        return (None, adjoint, None, *grads)

    @staticmethod
    def jvp(ctx: Any, _system: None, _b_dot: Tensor | None, z_dot: Tensor, *_: Any) -> Tensor:
        # z* depends on every tensor b does (the args), so it has a tangent whenever b has
        return z_dot.clone()

    @staticmethod
    def vmap(info: Any, in_dims: tuple, system: _System, b: Tensor, z: Tensor, *args: Tensor):
        _, b_dim, z_dim, *arg_dims = in_dims

        def front(t: Tensor, dim: int | None) -> Tensor:
            return t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)

        args = tuple(
            a if d is None else a.movedim(d, 0) for a, d in zip(args, arg_dims, strict=True)
        )
        batched = system.vmapped(tuple(None if d is None else 0 for d in arg_dims))
        return _Observed.apply(batched, front(b, b_dim), front(z, z_dim), *args), 0
