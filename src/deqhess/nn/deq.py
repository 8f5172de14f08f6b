"""``deqhess.nn.DEQ``: a deep-equilibrium layer with implicit derivatives exact to every order."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import held_bytes
from ..callers import user_stacklevel
from ..errors import InputError
from ..linear import LinearSolver, LinearSolveStats, check_linear_solver
from ..linear.kept import FactorSlot
from ..options import integer
from ..solvers import (
    Convergence,
    FixedPointSolver,
    SolveInfo,
    Tolerance,
    resolve_solver,
    solve_fixed_point,
)
from ..state import check_state_map
from .attributes import (
    assigned_since,
    attribute_snapshot,
    attributes_kept,
    check_hooks_assign_nothing_read,
)
from .calls import Calls, LayerCall, calls_of, layer_calls, warm_starts
from .contract import (
    InputLayout,
    autocast_inputs,
    buffers_unwritten,
    check_deterministic,
    check_inputs,
    check_registered,
    explaining_first_call,
    saved_tensor_hooks_named,
    state_arguments,
)
from .hooks import backward_hooks_checked, describe_hooks, has_hooks, hooks_set_aside
from .implicit import FixedPointSpec, fixed_point
from .observed import observed_fixed_point
from .policy import LayerPolicy
from .reparametrize import functional_call
from .second_order import RefusedSecondOrder
from .transforms import representative, under_transform

__all__ = ["DEQ", "LayerCall", "LayerInfo", "LayerSolution", "layer_calls", "warm_starts"]


@dataclass(frozen=True)
class LayerInfo(SolveInfo):
    """The statistics of one layer call: its forward solve's, and its derivatives' solves.

    The fields of :class:`deqhess.solvers.SolveInfo` (iterations, residuals, per-sample
    status, ``converged_mask``) describe the forward solve of ``h* = cell(x, h*)``;
    ``linear_solves`` is a live record of the solves with ``I − J`` and ``(I − J)ᵀ`` that
    the backward and forward-mode passes through ``h*`` make.

    Attributes:
        linear_solves: filled as derivatives are taken (solves, products, the largest
            iteration count and relative residual); empty until then.
    """

    linear_solves: LinearSolveStats


@dataclass(frozen=True)
class LayerSolution:
    """What :meth:`DEQ.solve` returns: the fixed point and its solve's statistics.

    Attributes:
        h: the fixed point ``h* = cell(x, h*)``, shaped like the state: the very tensor
            the layer's forward returns for the same call, differentiable in the cell's
            parameters and the tensors of ``x`` to every order.
        info: the :class:`LayerInfo` of the call: the forward solve's statistics, and the
            linear solves with ``I − J`` that derivatives of ``h`` take, recorded as they
            are taken.
    """

    h: Tensor
    info: LayerInfo


class DEQ(nn.Module):
    """``h* = cell(x, h*)``, differentiable in the cell's parameters and ``x`` to every order.

    The backward is the implicit one (an adjoint solve with ``(I − J)ᵀ``; memory does
    not depend on the solver's iterations), and it is itself differentiable:
    ``torch.autograd.grad(..., create_graph=True)``, double and triple backward, and
    ``torch.func.grad / vjp / jvp / hessian`` over ``functional_call(deq, params, (x,))``
    give exact derivatives (see :mod:`deqhess.nn.implicit`).

    Args:
        cell: an ``nn.Module`` with ``forward(x, h)`` returning the next state, shaped
            like ``h`` (the seed's ``f(x, h, θ)``, θ = its parameters, named
            ``cell.<name>`` in this module). It may define ``init_state(x)``.
        solver: ``"anderson"``, ``"picard"`` or a fixed-point solver instance.
        tol, atol, max_iter: the forward solve's stopping rule (see
            :class:`deqhess.Equilibrium`); a solve that misses it raises
            :class:`deqhess.ConvergenceError`.
        batch_dim: ``0`` (default): ``h``'s first dim indexes independent samples;
            ``None``: one coupled system.
        linear_solver: strategy for the adjoint and tangent solves (``"auto"``,
            ``"dense"``, ``"gmres"``, ``"neumann"`` or an instance). ``"auto"`` factorises
            ``I − J`` only for per-sample states of at most 64 numbers (forming ``J`` costs
            one product per state entry) and otherwise solves matrix-free: Neumann steps
            while they converge fast, GMRES once they do not (:class:`deqhess.linear.
            NeumannGMRES`), to a relative residual of 1e-10 in float64, 1e-5 in float32.
        require_convergence: if False, an unconverged forward solve warns and keeps its
            best iterate (for fixed iteration budgets) instead of raising; shorthand
            for ``convergence="best"``.
        convergence: what to do with samples that miss the tolerance: ``"raise"``
            (default), ``"best"`` (keep each one's best iterate, warn; with
            :meth:`solve`, ``info.converged_mask`` marks them so a training loss
            can leave them out), ``"training"`` (the same without warnings, and the
            backward's linear solves report a miss in ``info.linear_solves.unconverged``
            instead of raising: training carries on as with torchdeq, and what missed is
            marked) or a :class:`deqhess.solvers.Convergence` with fallback solvers, e.g.
            ``Convergence("best", fallback=Picard(damping=0.5))``. Inside
            :func:`deqhess.nn.convergence` the block's policy replaces it.

    The backward's linear solves, when ``linear_solver`` is a name, solve to the layer's
    ``tol`` (default by dtype: 1e-10 in float64, 1e-5 in float32), so the gradient is as
    accurate as the fixed point.

    Module hooks on the cell and its submodules (BackPACK, KFAC, ASDL, Captum) see one
    evaluation of the cell at the fixed point, whose backward receives the adjoint
    ``λ = (I − J)⁻ᵀ ḡ``; the solver's iterations and the derivatives' products run
    without them (see :mod:`deqhess.nn.hooks` and :mod:`deqhess.nn.observed`).

    An empty batch (a state with no entries) returns ``cell(x, h0)``, itself empty.

    Example:
        >>> import torch
        >>> from deqhess.nn import DEQ
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 4)
        ...     def forward(self, x, h):
        ...         return torch.tanh(0.5 * self.lin(h) + x)
        >>> _ = torch.manual_seed(0)
        >>> deq = DEQ(Cell())
        >>> solution = deq.solve(torch.randn(2, 4))  # or h = deq(x) for h* alone
        >>> solution.h.shape, solution.info.converged
        (torch.Size([2, 4]), True)
        >>> [name for name, _ in deq.named_parameters()]
        ['cell.lin.weight', 'cell.lin.bias']
    """

    def __init__(
        self,
        cell: nn.Module,
        solver: str | FixedPointSolver = "anderson",
        tol: float | None = None,
        max_iter: int = 1000,
        *,
        atol: float | None = None,
        batch_dim: int | None = 0,
        linear_solver: str | LinearSolver = "auto",
        require_convergence: bool = True,
        convergence: Convergence | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise InputError(
                f"cell must be a torch.nn.Module with forward(x, h); got {type(cell).__name__}."
            )
        if batch_dim not in (0, None):
            raise InputError(
                f"batch_dim must be 0 or None for the DEQ layer; got {batch_dim}. Move the "
                "sample dimension of the state first."
            )
        self.cell = cell
        self.solver = resolve_solver(solver)
        Tolerance.resolve(tol, atol, torch.float64)  # the values, now; the dtype comes with x
        self.tol, self.atol = tol, atol
        self.max_iter = integer(max_iter, "max_iter", minimum=0)
        self.batch_dim = batch_dim
        check_linear_solver(linear_solver)
        self.linear_solver = linear_solver
        self.require_convergence = require_convergence
        self.policy = LayerPolicy.resolve(convergence, require_convergence)
        self.convergence = self.policy.forward
        _eagerly()  # before any torch.compile traces a call

    def initial_state(self, x: Any) -> Tensor:
        """The state a call without ``h0`` starts from (outside :func:`warm_starts`).

        Args:
            x: the input, as for :meth:`forward`.

        Returns:
            Zeros shaped like ``cell.init_state(x)`` if the cell defines it, else like
            ``x`` (and of its dtype and device).

        Raises:
            InputError: the cell defines no ``init_state`` and ``x`` is not a tensor.
        """
        init = getattr(self.cell, "init_state", None)
        if callable(init):
            return torch.zeros_like(init(x))
        if not isinstance(x, Tensor):
            raise InputError(
                f"x is a {type(x).__name__}, so the initial state cannot be zeros like x: pass "
                "h0, or define init_state(x) on the cell."
            )
        if not x.is_floating_point():
            raise InputError(
                f"x is {x.dtype} (token ids, say), so the initial state cannot be zeros like "
                "x — a state is float32 or float64: define init_state(self, x) on the cell, "
                "returning a tensor of the state's shape and dtype, or pass h0."
            )
        return torch.zeros_like(x)

    def _check_initial_shape(self, x: Any, h0: Any) -> None:
        """A given ``h0`` has the state's shape where the cell says it (``init_state``)."""
        init = getattr(self.cell, "init_state", None)
        if not callable(init) or not isinstance(h0, Tensor):
            return
        expected = init(x)
        if isinstance(expected, Tensor) and h0.shape != expected.shape:
            raise InputError(
                f"h0 has shape {tuple(h0.shape)} but the state has shape "
                f"{tuple(expected.shape)} "
                "(cell.init_state(x)); pass h0 shaped like the state, or leave it out."
            )

    def forward(
        self, x: Any, h0: Tensor | None = None, *, return_info: bool = False, _info: bool = False
    ) -> Tensor | tuple[Tensor, LayerInfo]:
        """Solve ``h* = cell(x, h*)`` for each sample, and attach its implicit derivatives.

        Args:
            x: the input: a tensor, or a tuple/list/dict of tensors (and constants); the
                fixed point is differentiable in every tensor of it.
            h0: the initial state, shaped like the state (default
                :meth:`initial_state`: zeros, or the last fixed point of this call inside
                :func:`deqhess.nn.warm_starts`). Only the start changes with it: ``h*``
                is solved to the layer's tolerance.
            return_info: deprecated: also return the solve's :class:`LayerInfo`. Call
                :meth:`solve` instead, which returns both as a :class:`LayerSolution`.
            _info: return ``(h*, info)`` without the deprecation warning (how
                :meth:`solve` calls the module, so that its hooks run as for any call).

        Returns:
            ``h*``, shaped like the state (the cell's output) and of its dtype: the
            solver's result, connected to the cell's parameters and the tensors of ``x``
            by the implicit rules (an adjoint solve with ``(I − J)ᵀ`` in the backward,
            a tangent solve with ``I − J`` in forward mode), so that derivatives of every
            order are exact. With ``return_info=True``, the pair ``(h*, info)``.

        Raises:
            InputError: ``return_info`` is not a bool.

        Bad input is refused with :class:`deqhess.InputError` before anything is solved:
        ``h0`` not a floating tensor of the parameters' dtype or not shaped like the
        state, ``x`` not a tensor when the cell defines no ``init_state``, non-finite
        ``x``, ``h0`` or parameters, a cell that reads an unregistered tensor requiring
        grad or that changes from one call to the next (dropout or batch norm in training
        mode: see :func:`deqhess.nn.contract.check_deterministic`). A sample that misses
        the tolerance under the ``"raise"`` policy raises
        :class:`deqhess.ConvergenceError`, and so does a derivative's linear solve that
        misses its own (unless the policy is ``"training"``).
        """
        if not isinstance(return_info, bool):
            raise InputError(f"return_info must be True or False; got {return_info!r}.")
        if return_info:
            warnings.warn(
                "DEQ.forward(x, h0, return_info=True) is deprecated and will be removed in "
                "deqhess 0.3: call deq.solve(x, h0), which returns a LayerSolution with .h "
                "(the same differentiable fixed point) and .info (its LayerInfo).",
                DeprecationWarning,
                stacklevel=user_stacklevel(),
            )
        h, info = _eagerly()(self, x, h0, with_info=return_info or _info)
        if info is None:
            return h
        return h, info

    def solve(self, x: Any, h0: Tensor | None = None) -> LayerSolution:
        """The fixed point with its solve's statistics: one call of the layer, typed.

        ``deq.solve(x, h0)`` is the call ``deq(x, h0)`` — through ``nn.Module.__call__``,
        so forward hooks and wrappers on the layer itself run as for any call — and
        returns what that call computes: ``.h`` is the same differentiable ``h*``
        (derivatives exact to every order, through autograd and ``torch.func``), and
        ``.info`` the :class:`LayerInfo` whose ``linear_solves`` fill in as derivatives of
        ``h`` are taken.

        Args:
            x: the input, as for :meth:`forward`.
            h0: the initial state, as for :meth:`forward`.

        Returns:
            The :class:`LayerSolution` ``(h, info)``. Its errors are the call's (see
            :meth:`forward`): :class:`deqhess.InputError` for bad input,
            :class:`deqhess.ConvergenceError` for a missed tolerance under ``"raise"``.

        Example:
            >>> import torch
            >>> from deqhess.nn import DEQ
            >>> class Cell(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.lin = torch.nn.Linear(4, 4)
            ...     def forward(self, x, h):
            ...         return torch.tanh(0.5 * self.lin(h) + x)
            >>> _ = torch.manual_seed(0)
            >>> solution = DEQ(Cell()).solve(torch.randn(2, 4))
            >>> solution.h.shape, solution.info.converged, solution.info.linear_solves.solves
            (torch.Size([2, 4]), True, 0)
            >>> solution.h.pow(2).sum().backward()  # the adjoint solve, recorded in info
            >>> solution.info.linear_solves.solves
            1
        """
        h, info = self(x, h0, _info=True)
        return LayerSolution(h, info)

    def _solve(
        self, x: Any, h0: Tensor | None, *, with_info: bool
    ) -> tuple[Tensor, LayerInfo | None]:
        """``h*`` and, if ``with_info``, its :class:`LayerInfo` (else None)."""
        check_deterministic(self.cell)
        # under torch.autocast, x of its lower precision solved in the cell's dtype
        x = autocast_inputs(x, itertools.chain(self.cell.parameters(), self.cell.buffers()))
        inputs = InputLayout(x)
        calls = calls_of(self) if torch._C._functorch.peek_interpreter_stack() is None else None
        warm = self._warm_entry(calls) if h0 is None else None
        given = h0 is not None
        if given:
            self._check_initial_shape(x, h0)
        h0 = self.initial_state(x) if h0 is None else h0
        if warm is not None:
            previous = warm[0].get(warm[1])
            if previous is not None and previous.shape == h0.shape and previous.dtype == h0.dtype:
                h0 = previous
        names, values = state_arguments(self.cell)
        check_inputs(inputs, h0, values)
        if h0.numel() == 0:  # an empty batch: nothing to solve, and an empty answer
            return self._empty(x, h0, with_info)
        cell, count = self.cell, len(inputs.positions)
        snapshot = attribute_snapshot(cell)
        keeps: list[bool] = []  # the cell keeps tensors on itself: found after the solve

        def evaluate(z: Tensor, *args: Tensor) -> Tensor:
            # the solver's iterations and the derivatives' products are no steps of the
            # model: the cell's hooks see one evaluation, at the fixed point (deqhess.nn.
            # observed). Decided at each evaluation: a hook registered after the forward
            # must not run inside the backward's products either. Nor do the products
            # after the solve overwrite the tensors the cell keeps (deqhess.nn.attributes)
            state = args[count:]
            kept = attributes_kept(cell) if keeps else contextlib.nullcontext()
            with hooks_set_aside(cell), kept:
                if not torch.is_grad_enabled() and all(map(_same_data, state, values)):
                    # the cell's own numbers, nothing to differentiate (the forward solve):
                    # calling it is the same map, without functional_call swapping each
                    # tensor in and out at every evaluation
                    out = cell(inputs.rebuild(args[:count]), z)
                else:
                    arguments = dict(zip(names, state, strict=True))
                    with saved_tensor_hooks_named():
                        out = functional_call(cell, arguments, (inputs.rebuild(args[:count]), z))
            check_state_map(out, z, "cell(x, h)")
            return out

        if given:
            step = explaining_first_call(evaluate, x)
        elif not callable(getattr(cell, "init_state", None)):  # zeros like x
            step = explaining_first_call(evaluate, x, given=False)
        else:
            step = evaluate
        infos: list[SolveInfo] = []
        stats = LinearSolveStats()
        policy = self._policy(calls)
        spec = FixedPointSpec(
            fn=step,
            independent_dims=0 if self.batch_dim is None else 1,
            solver=self.solver,
            tol=self.tol,
            atol=self.atol,
            max_iter=self.max_iter,
            linear_solver=self.linear_solver,
            require_convergence=policy.forward.on_failure == "raise",
            check_rows=self.batch_dim == 0,
            check_registered=(
                torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None
            ),
            on_solve=infos.append if with_info or _recording(calls) else None,
            stats=stats if with_info else None,
            convergence=policy.forward,
            linear_on_failure=policy.linear,
            directions=None if calls is None else calls.directions,
            watch_accuracy=calls is not None and calls.watch_accuracy,
            refused_second_order=RefusedSecondOrder.for_cell(cell, names, count),
            kept_factors=(
                FactorSlot(warm[0], (*warm[1], "factors"), calls.factors)
                if warm is not None and calls is not None and calls.factors is not None
                else None
            ),
            names=(
                *(["x"] if count == 1 else [f"tensor {i} of x" for i in range(count)]),
                *(f"cell.{n}" for n in names),
            ),
        )
        args = (*inputs.tensors, *values)
        observed = has_hooks(cell) or (calls is not None and calls.visible)
        with buffers_unwritten(cell) as ledger:
            if under_transform():  # the solve runs below the transforms: it cannot see them
                with torch.enable_grad():
                    read = evaluate(representative(h0), *map(representative, args))
                check_registered(read)
            if observed:  # a fresh output, the fixed point's value, gradients through f(x, h*)

                def observe(z: Tensor) -> Tensor:
                    before = attribute_snapshot(cell)
                    with backward_hooks_checked(cell), ledger.observed():
                        out = cell(x, z)
                    check_hooks_assign_nothing_read(
                        cell, snapshot, before, lambda: evaluate(*_plain(z, args))
                    )
                    return out

                h = observed_fixed_point(spec, h0, args, observe, lambda: describe_hooks(cell))
                solved = h.detach().clone() if warm is not None else h
            else:
                # a copy for the caller: the Function's own output is saved for the
                # backward, so in-place use of what the layer returns (ReLU(inplace=True))
                # must not touch it
                solved = fixed_point(spec, h0, *args)
                h = solved.clone()
        if assigned_since(snapshot):  # the cell keeps tensors on itself (deqhess.nn.attributes)
            if not observed:  # its last evaluation at h* (the visible one is): exact attributes
                with hooks_set_aside(cell):
                    cell(x, solved)
            keeps.append(True)  # which the derivatives' evaluations leave alone
        if warm is not None:
            # the Function's own output, which the caller never sees: in-place use of
            # what is returned must not move the next call's start either
            _keep_warm(warm, solved.detach(), None if calls is None else calls.charge)
        if calls is not None and calls.records is not None:
            calls.records.append(LayerCall(self, infos[-1]))
        if not with_info:
            return h, None
        forward = {f.name: getattr(infos[-1], f.name) for f in fields(SolveInfo)}
        return h, LayerInfo(**forward, linear_solves=stats)

    def _warm_entry(self, calls: Calls | None) -> tuple[dict, tuple[int, int]] | None:
        """``(store, key)`` of this call under :func:`layer_calls` with a store, else None."""
        if calls is None or calls.store is None:
            return None
        calls.counts[id(self)] = count = calls.counts.get(id(self), -1) + 1
        return calls.store, (id(self), count)

    def _policy(self, calls: Calls | None) -> LayerPolicy:
        """The policy this call solves under.

        Args:
            calls: the enclosing :func:`layer_calls` block's controls, or None.

        Returns:
            The layer's own policy; under :func:`deqhess.nn.convergence` the block's;
            under ``layer_calls(keep_best=True)`` the layer's, keeping unconverged
            samples' best iterates without a warning (its fallback solvers still run
            first).
        """
        if calls is not None and calls.policy is not None:
            return calls.policy
        if calls is None or not calls.keep_best:
            return self.policy
        return self.policy.keeping_best()

    def _empty(self, x: Any, h0: Tensor, with_info: bool) -> tuple[Tensor, LayerInfo | None]:
        """The answer for a state with no entries: nothing to solve.

        Returns:
            ``cell(x, h0)`` (empty, and still connected to the parameters), and, if
            ``with_info``, the statistics of a solve with nothing to do (else None).
        """
        h = self.cell(x, h0)
        check_state_map(h, h0, "cell(x, h)")
        if not with_info:
            return h, None
        tolerance = Tolerance.resolve(self.tol, self.atol, h0.dtype)
        rows = h0.detach().reshape(h0.shape[0] if self.batch_dim == 0 else 1, 0)
        _, info = solve_fixed_point(lambda r: r, rows, self.solver, tolerance, 0)
        forward = {f.name: getattr(info, f.name) for f in fields(SolveInfo)}
        return h, LayerInfo(**forward, linear_solves=LinearSolveStats())

    def extra_repr(self) -> str:
        """The solver, tolerance and iteration cap, for ``repr(deq)``."""
        return f"solver={self.solver!r}, tol={self.tol}, max_iter={self.max_iter}"


_EAGER: list[Callable[..., tuple[Tensor, LayerInfo | None]]] = []


def _eagerly() -> Callable[..., tuple[Tensor, LayerInfo | None]]:
    """:meth:`DEQ._solve`, run eagerly by ``torch.compile`` (TorchDynamo) wherever called.

    The solve is a loop with data-dependent stopping, and which evaluations run the
    cell's hooks is decided at each evaluation: nothing in it is worth tracing, and a
    trace would keep such decisions in its cache (a second layer's hooks then ran in its
    backward's products). Made once, at the first :class:`DEQ`'s construction, so a
    compiled forward only calls it (torch imports TorchDynamo with ``torch.func`` anyway).

    Returns:
        ``layer._solve`` (called as ``(layer, x, h0, with_info=...)``) wrapped by
        ``torch.compiler.disable``.
    """
    if not _EAGER:
        _EAGER.append(
            torch.compiler.disable(
                _solve,
                reason="deqhess: the fixed-point solve and its implicit derivatives run eagerly",
            )
        )
    return _EAGER[0]


def _solve(layer: DEQ, x: Any, h0: Tensor | None, *, with_info: bool) -> tuple:
    """``layer._solve(x, h0, with_info=with_info)`` (a subclass's own, if it has one)."""
    return layer._solve(x, h0, with_info=with_info)


def _recording(calls: Calls | None) -> bool:
    """Whether the enclosing :func:`layer_calls` block records the calls."""
    return calls is not None and calls.records is not None


def _plain(z: Tensor, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``(z, *args)`` as plain detached tensors (:func:`~deqhess.nn.transforms.representative`)."""
    return tuple(representative(t) for t in (z, *args))


def _same_data(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` is ``b`` or a view of the same numbers (e.g. ``b.detach()``).

    Returns:
        True for ``b`` itself, or a plain (not functorch-wrapped) strided tensor with
        ``b``'s storage, offset, shape, strides and dtype.
    """
    if a is b:
        return True
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if wrapped(a) or wrapped(b) or a.layout != torch.strided or b.layout != torch.strided:
        return False
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _keep_warm(
    warm: tuple[dict, tuple[int, int]], solved: Tensor, charge: Callable[[int], bool] | None
) -> None:
    """Keep ``solved`` to start the same call from next time, in the store's budget.

    Args:
        warm: ``(store, key)`` of the call.
        solved: its fixed point (its own storage).
        charge: where the store is already charged to a budget, what charges more bytes
            (negative: gives them back); None: kept as is.
    """
    store, key = warm
    if charge is None:
        store[key] = solved
        return
    old = store.get(key)
    before = 0 if old is None else held_bytes(old)  # as the store counts what it holds
    if charge(held_bytes(solved) - before):
        store[key] = solved
    elif old is not None:  # no room for a larger one: neither is kept
        del store[key]
        charge(-before)
