"""The systems a fixed point's rules solve: the DEQ, and every affine system from it.

:class:`NonlinearSystem` is ``z = fn(z, *args)`` solved by the forward solver; its
``adjoint()`` and ``tangent()`` are :class:`LinearSystem` s, affine in their unknown with
the Jacobian ``Jᵀ`` or ``J`` of the original at the same point — so they, and their own
adjoints and tangents at any order, solve with the original linearisation. Under
``vmap`` (``vmapped``) a batched point gets a linearisation of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import ConvergenceError, InputError
from ..finiteness import all_finite
from ..linear import Linearization
from ..solvers import Residual, Tolerance, solve_fixed_point
from .contract import check_registered
from .pullbacks import pullback
from .spec import FixedPointSpec

__all__ = ["LinearSystem", "NonlinearSystem", "System", "SystemJacobian"]


@dataclass
class SystemJacobian:
    """The Jacobian of a system's map in its unknown: ``J`` (or ``Jᵀ``) of ``linearization``."""

    linearization: Linearization
    transposed: bool


class System:
    """One system ``z = fn(z, *args)`` solved by the Function; its Jacobian once solved."""

    spec: FixedPointSpec
    #: argument positions the Jacobian in ``z`` depends on (besides ``z`` itself).
    point: frozenset[int]
    #: the Jacobian in the unknown, set by the forward solve (None: not solved here).
    jacobian: SystemJacobian | None = None

    def solve(self, z0: Tensor, args: tuple[Tensor, ...]) -> Tensor:
        """Solve the system from ``z0`` at ``args``; its Jacobian is then set.

        Args:
            z0: the start, shaped like the solution.
            args: the map's other arguments (detached copies, inside the Function).

        Returns:
            The solution, shaped like ``z0``.
        """
        raise NotImplementedError

    def adjoint(self) -> LinearSystem:
        """``μ = ḡ + (∂fn/∂z)ᵀ μ`` at ``(z, args)``: called as ``(ḡ, z, *args)``."""
        fn = self.spec.fn

        def adjoint_map(mu: Tensor, g: Tensor, z: Tensor, *args: Tensor) -> Tensor:
            return g + pullback(lambda zz: fn(zz, *args), z)[1](mu)[0]

        jacobian = self.jacobian
        parent = None
        if jacobian is not None:
            parent = SystemJacobian(jacobian.linearization, not jacobian.transposed)
        point = self._shifted(2) | self._solution_at(1)
        return LinearSystem(
            replace(self.spec, fn=adjoint_map), point, parent, constant=_cotangent_first
        )

    def tangent(self, moving: tuple[bool, ...]) -> LinearSystem:
        """The tangent system ``ż = (∂fn/∂z) ż + (∂fn/∂args)·ȧ``.

        Args:
            moving: per argument, whether it has a tangent ``ȧ``; the others are
                constants (a zero tangent would still ask for derivatives some arguments
                lack, such as batch norm's running statistics).

        Returns:
            The system, called as ``(z, *args, *ȧ)`` with ``ȧ`` for the moving
            arguments only; its Jacobian in ``ż`` is this system's.
        """
        fn, count = self.spec.fn, len(moving)
        where = [i for i, m in enumerate(moving) if m]

        def tangent_map(w: Tensor, z: Tensor, *rest: Tensor) -> Tensor:
            args, tangents = rest[:count], rest[count:]

            def of_moving(zz: Tensor, *chosen: Tensor) -> Tensor:
                full = list(args)
                for i, t in zip(where, chosen, strict=True):
                    full[i] = t
                return fn(zz, *full)

            # jvp writes each tangent into a copy laid out as its primal: an expanded
            # primal (vmap's unbatched z0, say) overlaps itself, so it is made contiguous
            primals = tuple(p.contiguous() for p in (z, *(args[i] for i in where)))
            return torch.func.jvp(of_moving, primals, (w, *tangents))[1]

        point = self._shifted(1) | self._solution_at(0)
        return LinearSystem(replace(self.spec, fn=tangent_map), point, self.jacobian)

    def recorded_args(self, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``args`` as a backward uses them to pull back to the arguments.

        A derived system's, or where nothing is refused, or where the backward is not
        recorded (then nothing can differentiate it): ``args`` themselves.

        Returns:
            ``args``, or for this (the original) fixed point in a recorded backward,
            ``args`` with the refused ones guarded (:class:`deqhess.nn.second_order.
            RefusedSecondOrder`).
        """
        return args

    def _shifted(self, offset: int) -> frozenset[int]:
        return frozenset(offset + i for i in self.point)

    def _solution_at(self, index: int) -> frozenset[int]:
        return frozenset()

    def vmapped(self, arg_dims: tuple[int | None, ...]) -> System:
        """The system under ``vmap``: the vmapped dimension, first, indexes systems.

        Args:
            arg_dims: per argument, 0 if it is batched (moved to the front), else None.

        Returns:
            The batched system, with one more leading independent dimension.
        """
        raise NotImplementedError

    def _batched_spec(self, arg_dims: tuple[int | None, ...]) -> FixedPointSpec:
        return replace(
            self.spec,
            fn=torch.func.vmap(self.spec.fn, in_dims=(0, *arg_dims)),
            independent_dims=self.spec.independent_dims + 1,
            on_solve=None,
            kept_factors=None,  # the layer's own point's, not a batched one's
        )


class NonlinearSystem(System):
    """The DEQ itself, solved by the forward solver; its Jacobian depends on everything."""

    def __init__(self, spec: FixedPointSpec, num_args: int) -> None:
        self.spec = spec
        self.point = frozenset(range(num_args))

    def _solution_at(self, index: int) -> frozenset[int]:
        return frozenset({index})

    def recorded_args(self, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:  # noqa: D102
        refused = self.spec.refused_second_order
        if refused is None or not torch.is_grad_enabled():
            return args
        return refused.guard(args)

    def solve(self, z0: Tensor, args: tuple[Tensor, ...]) -> Tensor:  # noqa: D102
        spec, shape = self.spec, z0.shape
        names = ("h0", *spec.names) if len(spec.names) == len(args) else ()
        for i, t in enumerate((z0, *args)):
            if not all_finite(t):
                name = names[i] if names else f"argument {i} of the fixed point"
                state = (
                    "; every floating parameter and buffer of the cell is an input the layer "
                    "differentiates in, whether the cell reads it or not: keep a non-finite "
                    "sentinel out of them (a plain attribute, or a non-floating buffer)"
                    if name.startswith("cell.")
                    else ""
                )
                raise InputError(
                    f"{name} contains non-finite values (NaN or inf); pass finite values "
                    f"(check the data and the previous layers or optimisation step){state}."
                )

        plain = tuple(a.detach() for a in args)  # the solve differentiates in h only
        unchecked = [spec.check_registered]

        def step(rows: Tensor) -> Tensor:
            if unchecked and unchecked.pop():  # the first evaluation checks, at no extra cost
                with torch.enable_grad():
                    out = spec.fn(rows.reshape(shape), *plain)
                check_registered(out)
                return spec.rows(out.detach())
            return spec.rows(spec.fn(rows.reshape(shape), *plain))

        tolerance = Tolerance.resolve(spec.tol, spec.atol, z0.dtype)
        try:
            rows, info = solve_fixed_point(
                Residual(step),
                spec.rows(z0).clone(),
                spec.solver,
                tolerance,
                spec.max_iter,
                spec.require_convergence,
                convergence=spec.convergence,
            )
        except ConvergenceError as error:
            _refuse_if_random(step, spec.rows(z0), error)
            raise
        if spec.on_solve is not None:
            spec.on_solve(info)
        lin = spec.linearization(step, rows, info.sample_residuals, tolerance)
        lin.operator.kept_factors = spec.kept_factors
        self.jacobian = SystemJacobian(lin, transposed=False)
        return rows.reshape(shape)

    def vmapped(self, arg_dims: tuple[int | None, ...]) -> System:  # noqa: D102
        return NonlinearSystem(self._batched_spec(arg_dims), len(arg_dims))


def _refuse_if_random(step: Callable[[Tensor], Tensor], rows: Tensor, error: Exception) -> None:
    """Where a solve failed, tell a map that is not one function from a slow one.

    Two evaluations at the same point: a map that draws random numbers (noise, dropout
    by ``F.dropout(..., training=True)``, ``RReLU`` in training mode) differs between
    them, and has no fixed point for any solver to find.

    Raises:
        InputError: the two evaluations differ beyond rounding (from ``error``).
    """
    first, second = step(rows), step(rows)
    gap = float(torch.linalg.vector_norm(first - second))
    scale = float(torch.linalg.vector_norm(first)) + torch.finfo(first.dtype).tiny
    if gap <= 1e3 * torch.finfo(first.dtype).eps * scale:
        return
    raise InputError(
        "the cell is not a deterministic function of the state: evaluated twice at the "
        f"same point it differs by a relative {gap / scale:.1e}, so it has no fixed point "
        "and no solver converges on it. A map that draws random numbers at each call "
        "(noise, F.dropout(..., training=True), RReLU or a dropout in training mode) "
        "changes at every solver iteration: call .eval() on it, or draw the randomness "
        "once per forward and pass it in x."
    ) from error


class LinearSystem(System):
    """``w = fn(w, *args)`` with ``fn`` affine in ``w``.

    Its Jacobian in ``w`` is ``parent`` — ``J`` or ``Jᵀ`` of a solved fixed point at the
    same point — when known, else (a batched point) a linearisation built here.
    ``constant(*args)`` is ``fn(0, *args)`` when cheaper than evaluating ``fn``.
    """

    def __init__(
        self,
        spec: FixedPointSpec,
        point: frozenset[int],
        parent: SystemJacobian | None,
        constant: Callable[..., Tensor] | None = None,
    ) -> None:
        self.spec, self.point, self.parent, self.constant = spec, point, parent, constant

    def solve(self, z0: Tensor, args: tuple[Tensor, ...]) -> Tensor:  # noqa: D102
        spec, shape = self.spec, z0.shape
        if self.constant is not None:
            constant = self.constant(*args).expand(shape)
        else:
            constant = spec.fn(torch.zeros_like(z0), *args)
        if self.parent is not None:
            lin, transposed = self.parent.linearization, self.parent.transposed
            rhs = constant.reshape(-1, *lin.h.shape)
            solution = lin.solve(rhs, transpose=transposed, warm_start=True)
            self.jacobian = self.parent
            return solution.reshape(shape)

        def affine(rows: Tensor) -> Tensor:
            return spec.rows(spec.fn(rows.reshape(shape), *args))

        # the batched system's rows are the vmapped instances' samples: if the cell's samples
        # are declared independent, these rows must be too (checked like the original's)
        lin = spec.linearization(affine, torch.zeros_like(spec.rows(z0)))
        self.jacobian = SystemJacobian(lin, transposed=False)
        return lin.solve(spec.rows(constant)).reshape(shape)

    def vmapped(self, arg_dims: tuple[int | None, ...]) -> System:  # noqa: D102
        batched_point = any(arg_dims[i] is not None for i in self.point)
        constant = self.constant
        # an adjoint's constant is its cotangent, batched first or not (solve expands it):
        # as it is, without a vmap call (~40 µs) in every batched solve
        if (
            constant is not None
            and constant is not _cotangent_first
            and any(d is not None for d in arg_dims)
        ):
            constant = torch.func.vmap(constant, in_dims=arg_dims)
        return LinearSystem(
            self._batched_spec(arg_dims),
            self.point,
            None if batched_point else self.parent,
            constant,
        )


def _cotangent_first(g: Tensor, *rest: Tensor) -> Tensor:
    """The constant of an adjoint system: its cotangent argument."""
    return g
