"""``get_deq``: torchdeq's entry point, solved and differentiated by deqhess.

A torchdeq training script switches by changing one import::

    from torchdeq import get_deq        →    from deqhess.nn import get_deq

    deq = get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-3)
    z_out, info = deq(lambda z: cell(z, x), z0)      # unchanged

The call takes a *closure* ``z ↦ f(z)`` whose parameters deqhess cannot see, so its
fixed point has the exact implicit **first** derivative in everything the closure reads
(an adjoint solve with ``(I − J)ᵀ``, ``J`` by autograd through one evaluation of the
closure at ``z*``); a second derivative through it raises
:class:`deqhess.UnsupportedDerivativeError`. The observing hooks of the modules the
closure holds (its cells, bound ``self`` and ``partial`` arguments) are set aside in the
solver's iterations and the adjoint's products, so they see one evaluation at ``z*``
whose backward carries ``λ``, as through :class:`deqhess.nn.DEQ` (a hooked module it
reaches otherwise, through a global, is refused). For derivatives of every order (Hessians,
curvature tools, ``torch.func``), give the cell to :class:`deqhess.nn.DEQ` —
``DEQ(StateFirst(cell))(x)`` — see the migration page.

Policy: the ``"training"`` preset by default — a sample that misses ``f_tol`` keeps its
best iterate and the backward's linear solve returns what it reached; both are marked in
``info`` (``info["converged"]``, ``info["linear_solves"]``), never a lost step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConvergenceError, InputError, UnsupportedDerivativeError
from ..linear import LinearSolveStats, neumann_then_gmres
from ..linear.base import LinearSolveInfo
from ..solvers import Anderson, Picard, Residual, SolveInfo, Tolerance, solve_fixed_point
from .closure_hooks import (
    closure_modules,
    recording_calls,
    refuse_altering_hooks,
    refuse_unreached_hooks,
)
from .hooks import backward_hooks_checked, has_hooks, hooked_modules, hooks_set_aside
from .policy import LayerPolicy

__all__ = ["TorchdeqDEQ", "get_deq"]

#: torchdeq's options and defaults (torchdeq 0.1.0, ``DEQBase`` and ``DEQIndexing``)
DEFAULTS: dict[str, Any] = {
    "core": "sliced", "f_solver": "fixed_point_iter", "b_solver": "fixed_point_iter",
    "no_stat": None, "f_max_iter": 40, "b_max_iter": 40, "f_tol": 1e-3, "b_tol": 1e-6,
    "f_stop_mode": "abs", "b_stop_mode": "abs", "eval_factor": 1.0, "eval_f_max_iter": 0,
    "ift": False, "hook_ift": False, "grad": 1, "tau": 1.0, "sup_gap": -1, "sup_loc": None,
    "n_states": 1, "indexing": None, "convergence": "training",
}  # fmt: skip
_SOLVERS = {
    "anderson": Anderson,
    "broyden": Anderson,  # the same fixed point; deqhess's quasi-Newton solver
    "fixed_point_iter": Picard,
    "simple_fixed_point_iter": Picard,
}


def get_deq(args: Any = None, **kwargs: Any) -> TorchdeqDEQ:
    """A torchdeq-compatible DEQ module: ``get_deq(args=None, **kwargs)``, solved by deqhess.

    The module it returns is called as torchdeq's is, ``z_out, info = deq(func, z_init)``.

    Args:
        args: an ``argparse.Namespace``, a dict or None; torchdeq's keys are read from it
            (others — the rest of a training script's arguments — are ignored).
        kwargs: torchdeq's keys (see :data:`DEFAULTS`), and ``convergence`` (deqhess:
            ``"training"``, ``"best"`` or ``"raise"``).

    The gradient is always the exact implicit one, so torchdeq's choices of gradient
    (``ift``, ``hook_ift``, phantom ``grad`` steps, ``tau``) change nothing.

    Returns:
        A :class:`TorchdeqDEQ` (no parameters of its own) with the merged options.

    Raises:
        InputError: an unknown keyword, ``args`` of another type, or trajectory
            supervision (``n_states > 1``, ``indexing``, ``sup_gap``, ``sup_loc``), which
            differentiates solver iterates rather than the fixed point. An unknown
            ``f_solver`` is refused by the module's constructor, also with an
            :class:`~deqhess.InputError`.
    """
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise InputError(f"get_deq got unknown options {unknown}; known: {sorted(DEFAULTS)}.")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if args is not None and not isinstance(args, Mapping):
        raise InputError(f"args must be an argparse.Namespace, a dict or None; got {args!r}.")
    config = {**DEFAULTS, **{k: v for k, v in (args or {}).items() if k in DEFAULTS}, **kwargs}
    if config["n_states"] > 1 or config["indexing"] or config["sup_gap"] > 0 or config["sup_loc"]:
        raise InputError(
            "trajectory supervision (n_states > 1, indexing, sup_gap, sup_loc) trains on "
            "solver iterates, which have no counterpart here: deqhess differentiates the "
            "fixed point itself. Drop those options (z_out is then [z*])."
        )
    return TorchdeqDEQ(config)


class TorchdeqDEQ(nn.Module):
    """The module :func:`get_deq` returns (no parameters of its own).

    Args:
        config: torchdeq's options merged with their defaults (:data:`DEFAULTS`).

    Raises:
        InputError: an unknown ``f_solver`` or ``convergence``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        name = config["f_solver"]
        if name not in _SOLVERS:
            raise InputError(f"unknown f_solver {name!r}; use one of {sorted(_SOLVERS)}.")
        self.solver = _SOLVERS[name]()
        self.config = config
        self.policy = LayerPolicy.resolve(config["convergence"])
        eval_max = config["eval_f_max_iter"]
        self.eval_f_max_iter = eval_max or int(config["f_max_iter"] * config["eval_factor"])

    def forward(
        self,
        func: Callable[[Any], Any],
        z_init: Tensor | list[Tensor] | tuple[Tensor, ...] | None = None,
        solver_kwargs: dict | None = None,
        sradius_mode: bool = False,
        backward_writer: Callable[[dict], None] | None = None,
        **kwargs: Any,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Solve ``z* = func(z*)`` from ``z_init``; the call of torchdeq's DEQ module.

        Args:
            func: the closure ``z ↦ f(z)``, on a state shaped like ``z_init``.
            z_init: the initial state: a tensor ``[B, ...]`` or a list/tuple of them. It
                may also be passed as ``z_star`` (torchdeq's sliced core).
            solver_kwargs: ``{"f_max_iter": n}`` overrides the iteration cap of this call.
            sradius_mode: in eval mode, estimate each sample's spectral radius of ``J``.
            backward_writer: called with the backward's adjoint-solve statistics.
            kwargs: only ``z_star``.

        Returns:
            ``(z_out, info)``: ``z_out = [z*]`` (a tensor, or a list like ``z_init``),
            with the exact implicit first derivative in everything ``func`` reads, and
            torchdeq's statistics per sample — ``abs_lowest``, ``rel_lowest``, ``nstep``,
            ``abs_trace``/``rel_trace`` (``[B, 1]``: the final residuals; deqhess's
            solvers keep no per-sample history), ``sradius`` (eval mode with
            ``sradius_mode``, else ``[0.]``) — plus ``converged`` (``[B]`` bool) and
            ``linear_solves`` (:class:`deqhess.linear.LinearSolveStats`, filled in by the
            backward).

        Raises:
            InputError: no ``z_init``, unknown arguments, or ``solver_kwargs`` other than
                ``f_max_iter``.
            UnsupportedDerivativeError: called inside a ``torch.func`` transform (the
                closure hides its parameters; use :class:`deqhess.nn.DEQ`).
        """
        if z_init is None and "z_star" in kwargs:
            z_init = kwargs.pop("z_star")
        if z_init is None:
            raise InputError("pass the initial state z_init (a tensor or a list of tensors).")
        if kwargs:
            raise InputError(f"unknown arguments {sorted(kwargs)} for the DEQ call.")
        solver_kwargs = dict(solver_kwargs or {})
        max_iter = solver_kwargs.pop("f_max_iter", None)
        if solver_kwargs:
            raise InputError(
                f"solver_kwargs supports f_max_iter only; got {sorted(solver_kwargs)}."
            )
        if torch._C._functorch.peek_interpreter_stack() is not None:
            raise UnsupportedDerivativeError(
                "torch.func transforms through get_deq's closure form: its parameters are "
                "hidden in the closure. Use deqhess.nn.DEQ(cell), exact to every order."
            )
        if max_iter is None:
            max_iter = self.config["f_max_iter"] if self.training else self.eval_f_max_iter
        state = _FlatState(z_init)
        config = self.config
        # the modules the closure reaches run without their observing hooks, except in the
        # one visible evaluation at z* (whose backward carries λ), as in deqhess.nn.DEQ
        reached, complete = closure_modules(func)
        aside = nn.ModuleList(hooked_modules(reached))
        observed = has_hooks(aside)  # its modules' hooks, or global backward hooks
        called: list[nn.Module] = []

        def visible(rows: Tensor) -> Tensor:
            return state.rows(func(state.unflatten(rows)))

        def step(rows: Tensor) -> Tensor:
            with hooks_set_aside(aside) if observed else contextlib.nullcontext():
                if called:
                    return visible(rows)
                with recording_calls(called):  # the first evaluation: which modules run
                    return visible(rows)

        tolerance = _tolerance(config["f_tol"], config["f_stop_mode"])
        with torch.no_grad():
            rows, solve = solve_fixed_point(
                Residual(step), state.rows(z_init).detach().clone(), self.solver, tolerance,
                int(max_iter), convergence=self.policy.forward,
            )  # fmt: skip
        refuse_unreached_hooks(called, reached, complete)
        stats = LinearSolveStats()
        info = _statistics(step, rows, solve, stats)
        if sradius_mode and not self.training:
            info["sradius"] = _spectral_radius(step, rows)
        else:  # torchdeq's placeholder
            info["sradius"] = torch.zeros(1, dtype=rows.dtype, device=rows.device)
        z = rows
        if observed and not torch.is_grad_enabled():  # no visible evaluation: check the hooks
            with torch.no_grad():
                refuse_altering_hooks(visible(rows), rows, info["abs_lowest"], aside)
        if torch.is_grad_enabled():
            seen = rows.detach().requires_grad_(True)
            checked = backward_hooks_checked(aside, "closure", strict=True)
            with checked if observed else contextlib.nullcontext():
                fz = visible(seen)
            if observed:
                refuse_altering_hooks(fz.detach(), rows, info["abs_lowest"], aside)
            if fz.requires_grad:
                plain = step if observed else None
                backward = _Backward(
                    seen, fz, stats, config, self.policy.linear, backward_writer, plain,
                    aside if observed else None,
                )  # fmt: skip
                z = _ImplicitGradient.apply(fz, rows, backward)
        return [state.unflatten(z)], info


class _Backward:
    """The adjoint solve ``(I − J)ᵀ λ = ḡ`` at ``z*``, by autograd through one evaluation.

    ``Jᵀ v`` is a VJP through ``fz = f(z*)`` (one evaluation, its graph kept until the
    backward); where the closure's modules hold observing hooks, through an evaluation of
    its own made with them set aside (``plain``), so that the hooks see only ``λ``, in
    the backward of the visible one.
    """

    def __init__(self, seen, fz, stats, config, on_failure, writer, plain=None, aside=None) -> None:
        self.seen, self.fz, self.stats, self.writer = seen, fz, stats, writer
        self.plain, self.aside = plain, aside
        self.on_failure = on_failure
        self.rtol, self.atol = _linear_tolerances(config["b_tol"], config["b_stop_mode"])
        self.max_iter = int(config["b_max_iter"])

    def adjoint(self, grad: Tensor) -> Tensor:
        """Solve ``(I − J)ᵀ λ = grad`` (Neumann steps, then GMRES) and record it.

        Args:
            grad: ``ḡ``, the gradient reaching ``z*``, as rows ``[B, d]``.

        Returns:
            ``λ``, shaped like ``grad`` (what the solve reached, under ``"report"``).

        Raises:
            ConvergenceError: the solve missed ``b_tol`` under the ``"raise"`` policy.
        """
        point, fz = self.seen, self.fz
        if self.plain is not None:
            with torch.enable_grad():
                point = self.seen.detach().requires_grad_(True)
                fz = self.plain(point)

        def apply(v: Tensor) -> Tensor:
            (pulled,) = torch.autograd.grad(fz, point, v, retain_graph=True)
            return v - pulled

        rtol = self.rtol if self.rtol is not None else 0.0
        # the products' backward may run the closure again (a checkpoint's recompute):
        # with its hooks set aside, as in the evaluation they differentiate
        hidden = hooks_set_aside(self.aside) if self.aside is not None else contextlib.nullcontext()
        with hidden:
            lam, info = neumann_then_gmres(
                apply, grad, rtol=rtol, atol=self.atol, max_iter=self.max_iter
            )
        self.stats.record(info)
        if not info.converged and self.on_failure == "raise":
            raise ConvergenceError(
                f"the backward's adjoint solve reached a relative residual {info.residual:.2e} "
                f"after {info.iterations} products, above b_tol: raise b_max_iter, or use "
                "convergence='training' to carry on with it marked in info.",
                info=info,
            )
        if self.writer is not None:
            self.writer(_writer_stats(info, grad))
        return lam


class _ImplicitGradient(torch.autograd.Function):
    """Value ``z*``; the gradient reaching it becomes ``λ`` at ``f(z*)``."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, z: Tensor, backward: _Backward) -> Tensor:
        ctx.solver = backward
        return z.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        if torch.is_grad_enabled():
            raise UnsupportedDerivativeError(
                "a second derivative through get_deq's closure form (create_graph=True): "
                "the closure hides its parameters, so only the first derivative is exact. "
                "Use deqhess.nn.DEQ(cell) — e.g. DEQ(StateFirst(cell))(x) — exact to every "
                "order."
            )
        return ctx.solver.adjoint(grad), None, None


class _FlatState:
    """A state tensor, or a list/tuple of ``[B, ...]`` tensors, as rows ``[B, d]``."""

    def __init__(self, z: Tensor | list[Tensor] | tuple[Tensor, ...]) -> None:
        if isinstance(z, Tensor):
            self.kind, self.shapes = None, [tuple(z.shape)]
        elif isinstance(z, (list, tuple)) and z and all(isinstance(t, Tensor) for t in z):
            self.kind, self.shapes = type(z), [tuple(t.shape) for t in z]
        else:
            raise InputError(f"z_init must be a tensor or a list of tensors; got {type(z)}.")
        self.batch = self.shapes[0][0]

    def rows(self, z: Any) -> Tensor:
        """The state (a tensor, or a list/tuple of them) as rows ``[B, d]``."""
        pieces = [z] if self.kind is None else list(z)
        return torch.cat([p.reshape(self.batch, -1) for p in pieces], dim=1)

    def unflatten(self, rows: Tensor) -> Any:
        """Rows ``[B, d]`` → the state's own form (a tensor, or a list/tuple like it)."""
        sizes = [math.prod(s[1:]) for s in self.shapes]
        pieces = [p.reshape(s) for p, s in zip(rows.split(sizes, dim=1), self.shapes, strict=True)]
        return pieces[0] if self.kind is None else self.kind(pieces)


def _tolerance(tol: float, mode: str) -> Tolerance:
    """Return torchdeq's stopping rule ``tol`` in mode ``"abs"`` or ``"rel"`` as a Tolerance.

    Raises:
        InputError: another mode.
    """
    if mode not in ("abs", "rel"):
        raise InputError(f"stop mode must be 'abs' or 'rel'; got {mode!r}.")
    return Tolerance(rtol=tol, atol=0.0) if mode == "rel" else Tolerance(rtol=0.0, atol=tol)


def _linear_tolerances(tol: float, mode: str) -> tuple[float | None, float]:
    """Return ``(rtol, atol)`` of the backward's solve for torchdeq's ``b_tol``, mode."""
    _tolerance(tol, mode)  # checks the mode
    return (tol, 0.0) if mode == "rel" else (None, tol)


def _statistics(step, rows: Tensor, solve: SolveInfo, stats: LinearSolveStats) -> dict:
    """Return torchdeq's ``info`` dict for the solved ``rows`` ``[B, d]``."""
    with torch.no_grad():
        fz = step(rows)
    absolute = torch.linalg.vector_norm(fz - rows, dim=1)
    relative = absolute / (torch.linalg.vector_norm(fz, dim=1) + 1e-8)
    return {
        "abs_lowest": absolute,
        "rel_lowest": relative,
        "abs_trace": absolute[:, None],
        "rel_trace": relative[:, None],
        "nstep": solve.sample_iterations.to(rows.dtype),
        "converged": solve.converged_mask,
        "linear_solves": stats,
    }


def _spectral_radius(step, rows: Tensor, iterations: int = 200) -> Tensor:
    """Per sample, the spectral radius ``ρ(J)``, the largest ``|λ(J)|``, by power iteration.

    The estimate is the geometric mean of the growth ``‖J vₖ‖`` over the second half of
    the steps (``vₖ`` normalised), which tends to ``ρ(J)`` even when the dominant
    eigenvalues are a complex pair or ``±λ`` (where the last step's growth, torchdeq's
    estimate, oscillates).

    Returns:
        ``[B]``: the estimates, detached.
    """
    seen = rows.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = step(seen)
    v = torch.randn(rows.shape, dtype=rows.dtype, device=rows.device,
                    generator=torch.Generator(rows.device).manual_seed(0))  # fmt: skip
    logs = []
    for k in range(iterations):
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300)
        (v,) = torch.autograd.grad(fz, seen, v, retain_graph=True)
        if k >= iterations // 2:
            logs.append(torch.linalg.vector_norm(v, dim=1).clamp_min(1e-300).log())
    return torch.stack(logs).mean(0).exp().detach()


def _writer_stats(info: LinearSolveInfo, grad: Tensor) -> dict:
    """What torchdeq hands its ``backward_writer``: the adjoint solve's residuals, steps."""
    relative = torch.tensor([info.residual])
    return {
        "rel_lowest": relative,
        "abs_lowest": relative * torch.linalg.vector_norm(grad),
        "nstep": torch.tensor([info.iterations]),
    }
