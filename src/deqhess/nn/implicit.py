"""A fixed point ``z* = F(z*, *args)`` differentiable to every order, in autograd and torch.func.

:func:`fixed_point` solves with no graph and attaches the implicit derivatives through
one ``torch.autograd.Function``. Its rules are solves with the fixed point's
:class:`deqhess.linear.Linearization`, applied through the same Function so that they
are differentiable again:

* backward: ``(I − J)ᵀ μ = ḡ`` (the adjoint), then ``ḡ_args = (∂F/∂args)ᵀ μ``;
* forward mode: ``(I − J) ż = (∂F/∂args)·ȧrgs`` (the tangent);
* vmap: the vmapped dimension becomes one more dimension of independent systems.

Every system derived this way — the adjoint, the tangent, and their own adjoints and
tangents at any order — is affine in its unknown with Jacobian ``J`` or ``Jᵀ`` of the
original fixed point, taken at the same point. So they all solve with the original
linearisation: a double-backward HVP prepares ``I − J`` once. Only when ``vmap`` batches
the point itself (per-sample gradients over a batched input, say) is a linearisation of
the batched system built. Each rule is made of differentiable pieces only
(``torch.func`` products at the saved output, which stays connected to the Function),
so ``create_graph=True``, third derivatives and ``torch.func.grad/vjp/jvp/hessian`` are
exact. No solver iteration is ever recorded: memory does not grow with iterations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import UnsupportedDerivativeError
from ..locking import engine
from .pullbacks import args_pullback
from .spec import FixedPointSpec
from .systems import NonlinearSystem, System

__all__ = ["FixedPointFunction", "fixed_point", "refuse_legacy_vmap"]


def _exactly_zero(grad: Tensor) -> bool:
    """Whether a plain backward brings ``grad = 0`` exactly (then its solve is skipped).

    Only in a backward that is not recorded, outside ``torch.func``: a recorded one must
    keep the gradient as a function (zero here, its derivatives need not be), and a
    transform's tensors have no value to test. The case it serves: a visible
    evaluation's compensation cancelling the cell's ``Jᵀλ`` (:mod:`deqhess.nn.observed`).

    Returns:
        True if ``grad`` holds only zeros and the backward is plain.
    """
    if torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return not bool(grad.any())


def refuse_legacy_vmap() -> None:
    """Refuse a backward run under torch's legacy vmap.

    ``is_grads_batched=True`` (and ``torch.autograd.functional``'s ``vectorize=True``)
    run the backward under torch's legacy vmap, which does not call this Function's
    ``vmap`` rule: the solves' data-dependent loops cannot run there.

    Raises:
        UnsupportedDerivativeError: inside the legacy vmap, naming the supported way.
    """
    if torch.compiler.is_compiling():
        # TorchDynamo tracing the Function's rules (a compiled training step): its legacy
        # vmap cannot be active there, and the probe below, split by a graph break, would
        # leave torch's vmap nesting raised for the whole process
        return
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    if level > 1:
        raise UnsupportedDerivativeError(
            "torch.autograd.grad(..., is_grads_batched=True) (or torch.autograd.functional's "
            "vectorize=True) runs the backward under torch's legacy vmap, which cannot run "
            "the fixed point's data-dependent solves. Batch the directions with torch.func "
            "instead — torch.func.vmap over torch.func.vjp, or over torch.autograd.grad with "
            "one direction each — which is supported and exact; or loop over the directions."
        )


class FixedPointFunction(torch.autograd.Function):
    """``z* = system(z*, *args)``: solved with no graph; every rule a solve again.

    Applied as ``FixedPointFunction.apply(system, z0, *args)`` (:func:`fixed_point`);
    its backward applies it to ``system.adjoint()``, its ``jvp`` to
    ``system.tangent(...)``, its ``vmap`` to ``system.vmapped(...)`` — systems that
    share the original's linearisation — so each rule is differentiable again.
    """

    @staticmethod
    def forward(system: System, z0: Tensor, *args: Tensor) -> Tensor:
        """Solve ``system`` from ``z0`` at ``args``, with no graph; returns ``z*``."""
        with engine(), torch.no_grad():
            out = system.solve(z0, args)
        # not a view of the solver's rows (a view output would be marked as one)
        return out if out._base is None else out.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        """Keep the system, and ``z*`` and the arguments for both modes' rules."""
        system, _, *args = inputs
        ctx.system = system
        ctx.save_for_backward(output, *args)
        ctx.save_for_forward(output, *args)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        """``(I − J)ᵀ μ = ḡ``, then ``(∂F/∂args)ᵀ μ`` for the arguments that need it."""
        return _eager_backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple:
        z, *args = ctx.saved_tensors
        system: System = ctx.system
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads: list[Tensor | None] = [None] * len(args)
        # z* does not depend on the start: a start with a graph (a learned h0 = init(x))
        # gets zeros, as unrolled iterations give it to rounding — not None, which would
        # leave its parameters out of the graph (torch.autograd.grad: "appears to not
        # have been used"). A derived system's start (the adjoint's: its cotangent) has
        # no such use, and its zeros would only be added in every higher derivative.
        start = None
        if ctx.needs_input_grad[1] and isinstance(system, NonlinearSystem):
            start = torch.zeros_like(grad)  # batched as grad is, under vmap
        if wanted and _exactly_zero(grad):  # the gradient is linear in grad: zero
            # zeros, not None: as autograd's own operations give (an optimizer's
            # momentum still moves a parameter whose gradient is zero, not one without)
            zeros = [torch.zeros_like(args[i]) if i in wanted else None for i in range(len(args))]
            return (None, start, *zeros)
        if wanted:  # h* does not depend on z0; no adjoint solve when nothing is wanted
            pulled = system.recorded_args(tuple(args))
            value, pull = args_pullback(system.spec.fn, z, pulled, wanted)
            jacobian = system.jacobian
            if (  # F(h*) comes with the VJP: the determinism check needs no evaluation of its own
                isinstance(system, NonlinearSystem)
                and jacobian is not None
                and torch._C._functorch.peek_interpreter_stack() is None
            ):
                jacobian.linearization.certify(system.spec.rows(value.detach()))
            mu = FixedPointFunction.apply(system.adjoint(), grad, grad, z, *args)
            for i, g in zip(wanted, pull(mu), strict=True):
                grads[i] = g
        return (None, start, *grads)

    @staticmethod
    def jvp(ctx: Any, _system: None, _z0: Tensor | None, *arg_tangents: Tensor | None) -> Tensor:
        """``(I − J) ż = (∂F/∂args)·ȧrgs`` for the arguments with a tangent."""
        refuse_legacy_vmap()
        z, *args = ctx.saved_tensors
        moving = tuple(t is not None for t in arg_tangents)
        tangents = [t for t in arg_tangents if t is not None]
        with engine():
            system = ctx.system.tangent(moving)
            try:
                return FixedPointFunction.apply(system, torch.zeros_like(z), z, *args, *tangents)
            except RuntimeError as error:
                if "Nested forward mode AD is not supported" not in str(error):
                    raise
                raise UnsupportedDerivativeError(
                    "torch.autograd.forward_ad (make_dual, or gradcheck's check_forward_ad) "
                    "through the layer: its tangent solve takes forward-mode products, which "
                    "torch cannot nest inside autograd's own dual level. Use torch.func.jvp "
                    "(or torch.func.jacfwd), which is supported and exact."
                ) from error

    @staticmethod
    def vmap(info: Any, in_dims: tuple, system: System, z0: Tensor, *args: Tensor):
        """The vmapped dimension, moved first, as one more dimension of systems."""
        _, z0_dim, *arg_dims = in_dims
        if z0_dim is None:
            z0 = z0.expand(info.batch_size, *z0.shape)
        else:
            z0 = z0.movedim(z0_dim, 0)
        args = tuple(
            a if d is None else a.movedim(d, 0) for a, d in zip(args, arg_dims, strict=True)
        )
        batched = system.vmapped(tuple(None if d is None else 0 for d in arg_dims))
        return FixedPointFunction.apply(batched, z0, *args), 0


@torch.compiler.disable
def _eager_backward(ctx: Any, grad: Tensor) -> tuple:
    """The backward's solve, run eagerly even inside a compiled step.

    TorchDynamo traces an ``autograd.Function``'s backward when a compiled function calls
    ``backward()``; the solves' data-dependent loops and ``torch.func`` products cannot
    be traced (``aot_eager`` and ``inductor`` failed with "Cannot access storage of
    TensorWrapper"), so the compiler leaves this part to eager mode.

    Returns:
        The gradients of :meth:`FixedPointFunction.backward`.
    """
    refuse_legacy_vmap()
    with engine():
        return FixedPointFunction._backward(ctx, grad)


def fixed_point(spec: FixedPointSpec, z0: Tensor, *args: Tensor) -> Tensor:
    """The fixed point ``z* = spec.fn(z*, *args)``, differentiable in ``args`` to every order.

    Args:
        spec: the map and how to solve it.
        z0: the start (``z*`` does not depend on it).
        args: the tensors ``z*`` is differentiated in.

    Returns:
        ``z*``, shaped like ``z0``: the output of one ``torch.autograd.Function`` whose
        backward, ``jvp`` and ``vmap`` rules are solves with the same linearisation.
    """
    return FixedPointFunction.apply(NonlinearSystem(spec, len(args)), z0, *args)
