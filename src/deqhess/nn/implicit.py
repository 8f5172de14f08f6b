"""A fixed point ``z* = F(z*, *args)`` differentiable to every order, in autograd and torch.func.

:func:`fixed_point` solves with no graph and attaches the implicit derivatives through
one ``torch.autograd.Function`` whose rules are themselves fixed points of linear maps,
solved by the same Function — so they are again differentiable:

* backward: ``μ = ḡ + (∂F/∂z)ᵀ μ`` (the adjoint), then ``ḡ_args = (∂F/∂args)ᵀ μ``;
* forward mode: ``ż = (∂F/∂args)·ȧrgs + (∂F/∂z) ż`` (the tangent);
* vmap: the vmapped dimension becomes one more dimension of independent systems.

Each rule is built from differentiable pieces only (``torch.func`` products at the saved
output, which stays connected to the Function), so ``create_graph=True``, third
derivatives, ``torch.func.grad/vjp/jvp/hessian`` are exact. No solver iteration is ever
recorded: memory does not grow with iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..linear import LinearSolver, ResidualOperator, resolve_linear_solver
from ..solvers import Convergence, FixedPointSolver, SolveInfo, Tolerance, solve_fixed_point

__all__ = ["FixedPointSpec", "fixed_point"]


@dataclass(frozen=True)
class FixedPointSpec:
    """What to solve and how: ``z = fn(z, *args)``.

    Attributes:
        fn: the map; must be traceable by ``torch.func``.
        independent_dims: leading dims of ``z`` indexing independent systems (their
            Jacobian blocks are solved separately; 0 = one coupled system).
        linear: ``fn`` is affine in ``z``: solve ``(I − ∂fn/∂z) z = fn(0)`` directly.
        solver, tol, atol, max_iter, require_convergence: the forward solver for a
            nonlinear ``fn`` (see :func:`deqhess.solvers.solve_fixed_point`).
        linear_solver: strategy for linear ``fn`` (adjoint and tangent systems).
        check_rows: after a nonlinear solve, probe that ``fn`` does not couple the
            independent rows (one JVP; raises ``ValueError`` if it does).
        on_solve: called with the forward solve's statistics (None: ignored); the
            derived adjoint/tangent problems never call it.
    """

    fn: Callable[..., Tensor]
    independent_dims: int
    linear: bool
    solver: FixedPointSolver
    tol: float | None
    atol: float | None
    max_iter: int
    linear_solver: str | LinearSolver
    require_convergence: bool = True
    check_rows: bool = False
    on_solve: Callable[[SolveInfo], None] | None = None
    convergence: Convergence | None = None  # the policy; None follows require_convergence

    def rows(self, z: Tensor) -> Tensor:
        samples = math.prod(z.shape[: self.independent_dims])
        return z.reshape(samples, -1)

    def solve(self, z0: Tensor, args: tuple[Tensor, ...]) -> Tensor:
        """The fixed point, with no autograd graph."""
        shape = z0.shape

        def step(rows: Tensor) -> Tensor:
            return self.rows(self.fn(rows.reshape(shape), *args))

        with torch.no_grad():
            if not self.linear:
                tolerance = Tolerance.resolve(self.tol, self.atol, z0.dtype)
                rows, info = solve_fixed_point(
                    step,
                    self.rows(z0).clone(),
                    self.solver,
                    tolerance,
                    self.max_iter,
                    self.require_convergence,
                    convergence=self.convergence,
                )
                if self.on_solve is not None:
                    self.on_solve(info)
                if self.check_rows and ResidualOperator(step, rows).row_coupling() > 1e-10:
                    raise ValueError(
                        "the cell couples the samples of the batch (its first state dim), but "
                        "batch_dim=0 declares them independent; use DEQ(..., batch_dim=None)."
                    )
                return rows.reshape(shape)
            zero = torch.zeros_like(self.rows(z0))
            constant = step(zero)
            strategy = resolve_linear_solver(
                self.linear_solver, zero.shape[0], zero.shape[1], zero.dtype
            )
            return strategy.prepare(ResidualOperator(step, zero)).solve(constant).reshape(shape)

    def adjoint(self) -> FixedPointSpec:
        """``μ ↦ ḡ + (∂fn/∂z)ᵀ μ`` at ``(z, args)``: called as ``fn(μ, ḡ, z, *args)``."""
        fn = self.fn

        def adjoint_map(mu: Tensor, g: Tensor, z: Tensor, *args: Tensor) -> Tensor:
            _, pullback = torch.func.vjp(lambda zz: fn(zz, *args), z)
            return g + pullback(mu)[0]

        return replace(self, fn=adjoint_map, linear=True, on_solve=None, check_rows=False)

    def tangent(self) -> FixedPointSpec:
        """``ż ↦ (∂fn/∂z) ż + (∂fn/∂args)·ȧ``: called as ``fn(ż, z, *args, *ȧ)``."""
        fn = self.fn

        def tangent_map(w: Tensor, z: Tensor, *rest: Tensor) -> Tensor:
            half = len(rest) // 2
            return torch.func.jvp(fn, (z, *rest[:half]), (w, *rest[half:]))[1]

        return replace(self, fn=tangent_map, linear=True, on_solve=None, check_rows=False)

    def vmapped(self, arg_dims: tuple[int | None, ...]) -> FixedPointSpec:
        """The same problem for a leading vmapped dim of ``z`` (and of args where batched)."""
        batched = torch.func.vmap(self.fn, in_dims=(0, *arg_dims))
        return replace(
            self,
            fn=batched,
            independent_dims=self.independent_dims + 1,
            on_solve=None,
            check_rows=False,
        )


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(spec: FixedPointSpec, z0: Tensor, *args: Tensor) -> Tensor:
        return spec.solve(z0, args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        spec, _, *args = inputs
        ctx.spec = spec
        ctx.save_for_backward(output, *args)
        ctx.save_for_forward(output, *args)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        z, *args = ctx.saved_tensors
        spec: FixedPointSpec = ctx.spec
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads: list[Tensor | None] = [None] * len(args)
        if wanted:  # h* does not depend on z0; no adjoint solve when nothing is wanted
            mu = _FixedPoint.apply(spec.adjoint(), grad, grad, z, *args)

            def of_wanted(*chosen: Tensor) -> Tensor:
                full = list(args)
                for i, t in zip(wanted, chosen, strict=True):
                    full[i] = t
                return spec.fn(z, *full)

            _, pullback = torch.func.vjp(of_wanted, *(args[i] for i in wanted))
            for i, g in zip(wanted, pullback(mu), strict=True):
                grads[i] = g
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx: Any, _spec: None, _z0: Tensor | None, *arg_tangents: Tensor | None) -> Tensor:
        z, *args = ctx.saved_tensors
        tangents = [
            torch.zeros_like(a) if t is None else t for a, t in zip(args, arg_tangents, strict=True)
        ]
        return _FixedPoint.apply(ctx.spec.tangent(), torch.zeros_like(z), z, *args, *tangents)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, spec: FixedPointSpec, z0: Tensor, *args: Tensor):
        _, z0_dim, *arg_dims = in_dims
        if z0_dim is None:
            z0 = z0.expand(info.batch_size, *z0.shape)
        else:
            z0 = z0.movedim(z0_dim, 0)
        args = tuple(
            a if d is None else a.movedim(d, 0) for a, d in zip(args, arg_dims, strict=True)
        )
        batched = spec.vmapped(tuple(None if d is None else 0 for d in arg_dims))
        return _FixedPoint.apply(batched, z0, *args), 0


def fixed_point(spec: FixedPointSpec, z0: Tensor, *args: Tensor) -> Tensor:
    """``z*`` with ``z* = spec.fn(z*, *args)``, differentiable in ``args`` to every order."""
    return _FixedPoint.apply(spec, z0, *args)
