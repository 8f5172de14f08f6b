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

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ..errors import InputError, UnsupportedDerivativeError
from ..finiteness import all_finite
from ..linear import (
    IterativeSolve,
    Linearization,
    LinearSolver,
    LinearSolveStats,
    resolve_linear_solver,
)
from ..linear.base import IterativeSolver
from ..locking import engine
from ..solvers import (
    Convergence,
    FixedPointSolver,
    Residual,
    SolveInfo,
    Tolerance,
    solve_fixed_point,
)
from .contract import check_registered
from .second_order import RefusedSecondOrder

__all__ = ["FixedPointSpec", "fixed_point"]


@dataclass(frozen=True)
class FixedPointSpec:
    """What to solve and how: ``z = fn(z, *args)``.

    Attributes:
        fn: the map; must be traceable by ``torch.func``.
        independent_dims: leading dims of ``z`` indexing independent systems (their
            Jacobian blocks are solved separately; 0 = one coupled system).
        solver, tol, atol, max_iter, require_convergence, convergence: the forward
            solver and its policy (see :func:`deqhess.solvers.solve_fixed_point`).
        linear_solver: strategy for the solves with ``I − J`` (adjoint, tangent and every
            derived system); ``"auto"`` picks it for few solves per fixed point.
        check_rows: the independent rows are declared by the user (``batch_dim``), so
            the linearisation checks them (a few JVPs) before its first solve.
        on_solve: called with the forward solve's statistics (None: ignored).
        stats: where the linear solves are recorded (None: nowhere the caller sees).
        convergence: the forward policy; None follows ``require_convergence``.
        names: the arguments' names, for messages (``"x"``, ``"cell.lin.weight"``, …).
        check_registered: check that ``fn`` reads no tensor needing grad besides its
            arguments (see :func:`deqhess.nn.contract.check_registered`), on the solve's
            first evaluation.
        linear_on_failure: what an iterative linear solve that misses its tolerance
            does: ``"raise"``, or ``"report"`` (returned, recorded in
            ``stats.unconverged``; the training policy).
        directions: directions each derivative pass will push through the fixed point
            (a curvature operator's block; None: a training step's few), for
            ``"auto"``'s choice.
        watch_accuracy: the linearisation warns where the derivatives' error bound is
            high (see :class:`deqhess.linear.Linearization`); off for training.
        refused_second_order: arguments whose second derivatives torch computes wrongly
            (see :mod:`deqhess.nn.second_order`): a recorded backward guards them, so
            that differentiating it in them raises; None: none.
    """

    fn: Callable[..., Tensor]
    independent_dims: int
    solver: FixedPointSolver
    tol: float | None
    atol: float | None
    max_iter: int
    linear_solver: str | LinearSolver
    require_convergence: bool = True
    check_rows: bool = False
    on_solve: Callable[[SolveInfo], None] | None = None
    stats: LinearSolveStats | None = None
    convergence: Convergence | None = None
    names: tuple[str, ...] = ()
    check_registered: bool = False
    linear_on_failure: str = "raise"
    directions: int | None = None
    watch_accuracy: bool = False
    refused_second_order: RefusedSecondOrder | None = None

    def rows(self, z: Tensor) -> Tensor:
        """Return ``z`` as rows ``[S, d]``: ``S`` over the leading independent dims."""
        samples = math.prod(z.shape[: self.independent_dims])
        return z.reshape(samples, -1)

    def linearization(
        self,
        fn_rows: Callable[[Tensor], Tensor],
        rows: Tensor,
        accepted: Tensor | None = None,
        tolerance: Tolerance | None = None,
    ) -> Linearization:
        """The linearisation ``I − J`` of the rows map at ``rows``.

        Args:
            fn_rows: the map on rows ``[S, d]``.
            rows: the point ``[S, d]`` (the fixed point, or zeros for an affine map).
            accepted: for a solved fixed point, the residuals ``[S]`` the solve
                accepted (what a later evaluation there is checked against).
            tolerance: for a solved fixed point, its stopping rule.

        Returns:
            The :class:`deqhess.linear.Linearization` with this spec's linear solver —
            a named strategy solving to the layer's tolerance (not below the dtype's ε),
            wrapped to report rather than raise a miss under ``linear_on_failure=
            "report"`` — checking the declared independent rows before its first solve.
        """
        strategy = resolve_linear_solver(
            self.linear_solver, rows.shape[0], rows.shape[1], rows.dtype, few_solves=True,
            directions=self.directions, device=rows.device,
        )  # fmt: skip
        if isinstance(self.linear_solver, str) and isinstance(strategy, IterativeSolver):
            # a strategy chosen by name solves to the layer's tolerance when one is given
            # (the derivatives are then as accurate as the fixed point they differentiate),
            # but not below the dtype's ε, where a residual is rounding
            if self.tol is not None and 0 < self.tol < 1:
                strategy.rtol = max(self.tol, torch.finfo(rows.dtype).eps)
        if self.linear_on_failure == "report":
            strategy = _Reporting(strategy)
        return Linearization(
            Residual(fn_rows),
            rows,
            strategy,
            independent_rows=self.check_rows,
            declared=(
                "the cell couples the samples of the batch (the state's first dim)",
                "use DEQ(..., batch_dim=None) for one coupled system",
            ),
            stats=self.stats,
            accepted=accepted,
            tolerance=tolerance,
            # every solve of the layer runs inside _FixedPoint.forward, where
            # torch.func.linearize returns zeros: its trace would cost a tracing pass per
            # backward only to be rejected, so JVPs are plain from the start
            trace_tangent=False,
            watch_accuracy=self.watch_accuracy,
        )


class _Reporting(LinearSolver):
    """``strategy``, its iterative misses returned and recorded instead of raised.

    An iterative solve that misses its tolerance returns what it reached, counted in
    the stats as unconverged (the ``"training"`` policy).
    """

    def __init__(self, strategy: LinearSolver) -> None:
        self.strategy = strategy

    def init(self, operator: Any) -> Any:
        """The strategy's prepared solve, its iterative misses reported, not raised."""
        solve = self.strategy.init(operator)
        if isinstance(solve, IterativeSolve):
            solve.on_failure = "report"
        return solve


@dataclass
class _Jacobian:
    """The Jacobian of a system's map in its unknown: ``J`` (or ``Jᵀ``) of ``linearization``."""

    linearization: Linearization
    transposed: bool


class _System:
    """One system ``z = fn(z, *args)`` solved by the Function; its Jacobian once solved."""

    spec: FixedPointSpec
    #: argument positions the Jacobian in ``z`` depends on (besides ``z`` itself).
    point: frozenset[int]
    #: the Jacobian in the unknown, set by the forward solve (None: not solved here).
    jacobian: _Jacobian | None = None

    def solve(self, z0: Tensor, args: tuple[Tensor, ...]) -> Tensor:
        """Solve the system from ``z0`` at ``args``; its Jacobian is then set.

        Args:
            z0: the start, shaped like the solution.
            args: the map's other arguments (detached copies, inside the Function).

        Returns:
            The solution, shaped like ``z0``.
        """
        raise NotImplementedError

    def adjoint(self) -> _Linear:
        """``μ = ḡ + (∂fn/∂z)ᵀ μ`` at ``(z, args)``: called as ``(ḡ, z, *args)``."""
        fn = self.spec.fn

        def adjoint_map(mu: Tensor, g: Tensor, z: Tensor, *args: Tensor) -> Tensor:
            return g + _pullback(lambda zz: fn(zz, *args), z)[1](mu)[0]

        jacobian = self.jacobian
        parent = None
        if jacobian is not None:
            parent = _Jacobian(jacobian.linearization, not jacobian.transposed)
        point = self._shifted(2) | self._solution_at(1)
        return _Linear(replace(self.spec, fn=adjoint_map), point, parent, constant=_first)

    def tangent(self, moving: tuple[bool, ...]) -> _Linear:
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

            primals = (z, *(args[i] for i in where))
            return torch.func.jvp(of_moving, primals, (w, *tangents))[1]

        point = self._shifted(1) | self._solution_at(0)
        return _Linear(replace(self.spec, fn=tangent_map), point, self.jacobian)

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

    def vmapped(self, arg_dims: tuple[int | None, ...]) -> _System:
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
        )


class _Nonlinear(_System):
    """The DEQ itself, solved by the forward solver; its Jacobian depends on everything."""

    def __init__(self, spec: FixedPointSpec, num_args: int) -> None:
        self.spec = spec
        self.point = frozenset(range(num_args))

    def _solution_at(self, index: int) -> frozenset[int]:
        return frozenset({index})

    def recorded_args(self, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        refused = self.spec.refused_second_order
        if refused is None or not torch.is_grad_enabled():
            return args
        return refused.guard(args)

    def solve(self, z0: Tensor, args: tuple[Tensor, ...]) -> Tensor:
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
        rows, info = solve_fixed_point(
            Residual(step),
            spec.rows(z0).clone(),
            spec.solver,
            tolerance,
            spec.max_iter,
            spec.require_convergence,
            convergence=spec.convergence,
        )
        if spec.on_solve is not None:
            spec.on_solve(info)
        lin = spec.linearization(step, rows, info.sample_residuals, tolerance)
        self.jacobian = _Jacobian(lin, transposed=False)
        return rows.reshape(shape)

    def vmapped(self, arg_dims: tuple[int | None, ...]) -> _System:
        return _Nonlinear(self._batched_spec(arg_dims), len(arg_dims))


class _Linear(_System):
    """``w = fn(w, *args)`` with ``fn`` affine in ``w``.

    Its Jacobian in ``w`` is ``parent`` — ``J`` or ``Jᵀ`` of a solved fixed point at the
    same point — when known, else (a batched point) a linearisation built here.
    ``constant(*args)`` is ``fn(0, *args)`` when cheaper than evaluating ``fn``.
    """

    def __init__(
        self,
        spec: FixedPointSpec,
        point: frozenset[int],
        parent: _Jacobian | None,
        constant: Callable[..., Tensor] | None = None,
    ) -> None:
        self.spec, self.point, self.parent, self.constant = spec, point, parent, constant

    def solve(self, z0: Tensor, args: tuple[Tensor, ...]) -> Tensor:
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
        self.jacobian = _Jacobian(lin, transposed=False)
        return lin.solve(spec.rows(constant)).reshape(shape)

    def vmapped(self, arg_dims: tuple[int | None, ...]) -> _System:
        batched_point = any(arg_dims[i] is not None for i in self.point)
        constant = self.constant
        if constant is not None and any(d is not None for d in arg_dims):
            constant = torch.func.vmap(constant, in_dims=arg_dims)
        return _Linear(
            self._batched_spec(arg_dims),
            self.point,
            None if batched_point else self.parent,
            constant,
        )


def _first(g: Tensor, *rest: Tensor) -> Tensor:
    """The constant of an adjoint system: its cotangent argument."""
    return g


def _pullback(fn: Callable[[Any], Tensor], primal: Any) -> tuple[Tensor, Callable]:
    """``fn(primal)`` and the VJP of ``fn`` there, forward-differentiable.

    Where an operator's backward has no forward-AD formula
    (``native_group_norm_backward``, ...) the VJP is taken as the transpose of the JVP
    instead (reverse over forward: the same values).

    Returns:
        ``(fn(primal), pullback)``, ``pullback(cotangent)`` a tuple like ``primal``'s.
    """
    primal_out = torch.func.vjp(fn, primal)  # (value, pullback): no auxiliary output
    value, pullback = primal_out[0], primal_out[1]

    def apply(cotangent: Tensor) -> tuple:
        try:
            return pullback(cotangent)
        except NotImplementedError as error:
            if "forward AD" not in str(error):
                raise
        transposed = torch.func.vjp(
            lambda t: torch.func.jvp(fn, (primal,), (t,))[1], tree_map(torch.zeros_like, primal)
        )[1]
        return transposed(cotangent)

    return value, apply


def args_pullback(
    fn: Callable[..., Tensor], z: Tensor, args: tuple[Tensor, ...], wanted: list[int]
) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    """``fn(z, *args)`` and its pullback in the arguments ``wanted``, at ``(z, args)``.

    Args:
        fn: the map ``(z, *args) ↦ F``.
        z: the state.
        args: the other arguments.
        wanted: the indices of the arguments to pull back to.

    Returns:
        ``(fn(z, *args), pull)``, ``pull(μ) = ((∂fn/∂args_i)ᵀ μ for i in wanted)``.
    """

    def of_wanted(chosen: tuple[Tensor, ...]) -> Tensor:
        full = list(args)
        for i, t in zip(wanted, chosen, strict=True):
            full[i] = t
        return fn(z, *full)

    value, pull = _pullback(of_wanted, tuple(args[i] for i in wanted))
    return value, lambda mu: pull(mu)[0]


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


def _refuse_legacy_vmap() -> None:
    """Refuse a backward run under torch's legacy vmap.

    ``is_grads_batched=True`` (and ``torch.autograd.functional``'s ``vectorize=True``)
    run the backward under torch's legacy vmap, which does not call this Function's
    ``vmap`` rule: the solves' data-dependent loops cannot run there.

    Raises:
        UnsupportedDerivativeError: inside the legacy vmap, naming the supported way.
    """
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


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(system: _System, z0: Tensor, *args: Tensor) -> Tensor:
        with engine(), torch.no_grad():
            out = system.solve(z0, args)
        # not a view of the solver's rows (a view output would be marked as one)
        return out if out._base is None else out.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        system, _, *args = inputs
        ctx.system = system
        ctx.save_for_backward(output, *args)
        ctx.save_for_forward(output, *args)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        _refuse_legacy_vmap()
        with engine():
            return _FixedPoint._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple:
        z, *args = ctx.saved_tensors
        system: _System = ctx.system
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads: list[Tensor | None] = [None] * len(args)
        if wanted and _exactly_zero(grad):  # the gradient is linear in grad: zero
            return (None, None, *grads)
        if wanted:  # h* does not depend on z0; no adjoint solve when nothing is wanted
            pulled = system.recorded_args(tuple(args))
            value, pull = args_pullback(system.spec.fn, z, pulled, wanted)
            jacobian = system.jacobian
            if (  # F(h*) comes with the VJP: the determinism check needs no evaluation of its own
                isinstance(system, _Nonlinear)
                and jacobian is not None
                and torch._C._functorch.peek_interpreter_stack() is None
            ):
                jacobian.linearization.certify(system.spec.rows(value.detach()))
            mu = _FixedPoint.apply(system.adjoint(), grad, grad, z, *args)
            for i, g in zip(wanted, pull(mu), strict=True):
                grads[i] = g
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx: Any, _system: None, _z0: Tensor | None, *arg_tangents: Tensor | None) -> Tensor:
        _refuse_legacy_vmap()
        z, *args = ctx.saved_tensors
        moving = tuple(t is not None for t in arg_tangents)
        tangents = [t for t in arg_tangents if t is not None]
        with engine():
            system = ctx.system.tangent(moving)
            try:
                return _FixedPoint.apply(system, torch.zeros_like(z), z, *args, *tangents)
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
    def vmap(info: Any, in_dims: tuple, system: _System, z0: Tensor, *args: Tensor):
        _, z0_dim, *arg_dims = in_dims
        if z0_dim is None:
            z0 = z0.expand(info.batch_size, *z0.shape)
        else:
            z0 = z0.movedim(z0_dim, 0)
        args = tuple(
            a if d is None else a.movedim(d, 0) for a, d in zip(args, arg_dims, strict=True)
        )
        batched = system.vmapped(tuple(None if d is None else 0 for d in arg_dims))
        return _FixedPoint.apply(batched, z0, *args), 0


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
    return _FixedPoint.apply(_Nonlinear(spec, len(args)), z0, *args)
