"""The linearisation of a solved fixed point: one object for every implicit derivative.

At ``h* = F(h*)`` every derivative — the adjoint ``(I − J)ᵀλ = ∇L``, the sensitivity
``(I − J)Z = ∂f/∂θ``, the tangent of forward mode, and every system derived from those
when they are differentiated again — is a solve with ``A = I − J`` or ``Aᵀ`` at the same
point. :class:`Linearization` holds what they share: the residual ``g = F − id``, ``A`` as
a :class:`ResidualOperator`, the check that rows declared independent are, and one
prepared solve (``LinearSolver.init`` once; ``compute`` and ``transpose`` on it), with the
statistics of every solve. :class:`deqhess.Equilibrium` and the :class:`deqhess.nn.DEQ`
layer both hold one, so each fixed point is factorised (or traced) once, whichever path
asks for its derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from ..errors import ConvergenceError, InputError, NonFiniteError
from ..finiteness import all_finite
from ..solvers import Residual, Tolerance
from .accuracy import (
    DEFAULT_MAX_ERROR_BOUND,
    ErrorBound,
    check_max_error_bound,
    forward_residual,
)
from .base import LinearSolveInfo, LinearSolver, LinearSolveStats, Solve
from .coupling import coupling_tolerance, row_coupling
from .gmres import gmres
from .operator import ResidualOperator

#: Arnoldi steps from the forward residual (:meth:`Linearization._estimate_along_forward_gap`)
FORWARD_GAP_STEPS = 10

__all__ = ["Linearization", "coupling_tolerance", "row_coupling"]


def _no_forward_mode(error: Exception) -> bool:
    """Whether torch raised ``error`` for an operation with no forward-mode derivative."""
    return "forward" in str(error).lower()


class Linearization:
    """``I − J`` at a fixed point ``h*`` of ``h = F(h)`` on rows ``[S, d]``, ready to solve.

    Args:
        residual: the residual ``g(h) = F(h) − h`` (or the map ``F``) on rows ``[S, d]``.
        h: the fixed point, rows ``[S, d]``.
        solver: the strategy for solves with ``I − J`` (see :mod:`deqhess.linear`).
        independent_rows: the rows are declared independent systems (``batch_dim``):
            checked by :func:`row_coupling` before a strategy relies on it (a dense
            solve per block or GMRES per row of a coupled ``J`` would be silently wrong;
            a Neumann iteration on the full operator is right either way).
        declared: for the error message, what couples what (e.g. ``"f couples the
            samples along batch_dim=0"``) and what to do instead.
        stats: where every solve is recorded (default: a fresh record).
        accepted: ``[S]`` each row's residual ``‖F(h) − h‖`` as the forward solve measured
            it. Before the first solve ``F`` is evaluated once more at ``h``: a row whose
            residual is now clearly above both that and the tolerance means ``F`` is not a
            deterministic function of ``h`` (dropout, noise, state updated at each call)
            and has no fixed point.
        tolerance: the forward solve's stopping rule. With it (and ``accepted``) the
            derivatives' relative error bound ``‖(I − J)⁻¹‖ · max(r_forward, r_linear, ε)``
            is checked (see :mod:`deqhess.linear.accuracy` and :attr:`error_bound`): once a
            dense LU has given ``‖(I − J)⁻¹‖``, a bound above ``max_error_bound`` is
            refused; with ``watch_accuracy`` also once GMRES has estimated it during its
            solves, and a bound above 1e-6 (float64) / 1e-3 (float32) gives an
            :class:`deqhess.AccuracyWarning` (once per linearisation).
        max_error_bound: the largest relative error bound accepted (default 0.1: beyond
            it no digit is correct); ``inf`` never refuses.
        watch_accuracy: warn above 1e-6 / 1e-3 and check GMRES's estimates too
            (``Equilibrium`` does). Off by default, so that a caller linearising at every
            step — a layer's backward in training — chooses whether and how often to warn
            or refuse beyond what a dense LU shows.
        trace_tangent: trace the JVP of ``F`` once for the solves with ``I − J``
            (verified on its first use); False where the caller knows tracing cannot
            serve (see :class:`ResidualOperator`).

    Raises:
        InputError: (on a solve that relies on it) ``F`` couples rows declared
            independent; ``F`` is not deterministic (see ``accepted``).
        NonFiniteError: ``∂F/∂h`` or a right-hand side is not finite.
        SingularSystemError: ``I − J`` too ill-conditioned for the forward tolerance
            (the error bound above ``max_error_bound``).
    """

    def __init__(
        self,
        residual: Residual | Callable[[Tensor], Tensor],
        h: Tensor,
        solver: LinearSolver,
        *,
        independent_rows: bool = False,
        declared: tuple[str, str] = (
            "the map couples rows declared independent",
            "declare one coupled system instead",
        ),
        stats: LinearSolveStats | None = None,
        accepted: Tensor | None = None,
        tolerance: Tolerance | None = None,
        trace_tangent: bool = True,
        max_error_bound: float = DEFAULT_MAX_ERROR_BOUND,
        watch_accuracy: bool = False,
    ) -> None:
        self.operator = ResidualOperator(
            residual,
            h,
            independent_rows=independent_rows,
            declared=declared,
            trace_tangent=trace_tangent,
        )
        self.solver = solver
        self.stats = LinearSolveStats() if stats is None else stats
        self.accepted, self.tolerance = accepted, tolerance
        self.max_error_bound = check_max_error_bound(max_error_bound)
        self.watch_accuracy = watch_accuracy
        # an AccuracyWarning was given (True from the start when none is wanted)
        self._warned = not watch_accuracy
        self._forward_residual: float | None = None
        self.outer: tuple[int, ...] | None = None  # the callers' row layout, if not h's
        self._certified = accepted is None
        self._forward_gap: Tensor | None = None  # F(h*) − h*, once certified
        # the bound's second-order term and the row where it is largest, once measured
        self._curvature: tuple[float, int] | None = None
        self._prepared: Solve | None = None
        self._previous: dict[bool, Tensor] = {}

    @property
    def h(self) -> Tensor:
        """The fixed point, rows ``[S, d]``."""
        return self.operator.h

    @property
    def residual(self) -> Residual:
        """The residual ``g(h) = F(h) − h`` whose Jacobian is ``J − I``."""
        return self.operator.residual

    @property
    def prepared(self) -> Solve:
        """The solve with ``I − J``, set up once.

        Strategies that rely on independent rows (dense blocks, GMRES per row) check them
        first; the error bound is enforced as soon as it is known.
        """
        if self._prepared is None:
            if not self._certified:
                self.certify(self.residual.fn(self.h))
            prepared = self.solver.init(self.operator)
            self.stats.condition_number = prepared.condition_number
            self._prepared = prepared
            try:
                if self.watch_accuracy and prepared.inverse_norm is None:
                    self._estimate_along_forward_gap()
                self._check_error_bound()
            except Exception:
                self._prepared = None  # refused: every later solve is refused alike
                raise
        return self._prepared

    @property
    def error_bound(self) -> ErrorBound:
        """The derivatives' relative error bound ``‖(I − J)⁻¹‖ · max(r_forward, r_linear, ε)``.

        See :mod:`deqhess.linear.accuracy`. Its ``value`` is None, and its ``source`` says
        why, where ``‖(I − J)⁻¹‖`` is not known or there is no forward solve to bound.
        """
        eps = torch.finfo(self.h.dtype).eps
        residual = max(self._residual_left(), self.stats.max_residual or 0.0, eps)
        if self.tolerance is None or self.accepted is None:
            return ErrorBound(None, None, residual, "none: not a solved fixed point")
        if self._prepared is None:
            return ErrorBound(None, None, residual, "not known yet: I − J is set up by the "
                              "first derivative")  # fmt: skip
        refusable = True
        if self._prepared.inverse_norm is not None:
            norm, source = self._prepared.inverse_norm, "‖·‖₁ from the dense LU, LAPACK gecon"
        elif self.stats.inverse_norm_method == "Neumann":
            # from below or above (a negative dominant eigenvalue): it warns, never refuses
            norm, refusable = cast(float, self.stats.inverse_norm), False
            source = "≈ 1/(1 − ρ), ρ(J) from the Neumann series' contraction rate, an estimate"
        elif self.stats.inverse_norm is not None:
            norm = self.stats.inverse_norm
            source = "‖·‖₂ from GMRES's Hessenberg matrices, a lower bound"
        else:
            return ErrorBound(None, None, residual, (
                f"not available: {self.solver!r} has not estimated ‖(I − J)⁻¹‖ (GMRES and "
                "Neumann do during their solves, after two products; the dense LU at once)"
            ))  # fmt: skip
        return ErrorBound(norm * residual, norm, residual, source, refusable).with_curvature(
            *(self._curvature or (0.0, 0))
        )

    def _residual_left(self) -> float:
        """``r_forward`` (see :func:`deqhess.linear.accuracy.forward_residual`), once."""
        if self._forward_residual is None:
            if self.tolerance is None or self.accepted is None:
                self._forward_residual = 0.0
            else:
                self._forward_residual = forward_residual(self.accepted, self.h, self.tolerance)
        return self._forward_residual

    def _check_error_bound(self) -> None:
        """Warn or refuse on the error bound as now known (see ``tolerance``)."""
        if self.tolerance is None or self.accepted is None:
            return
        bound = self.error_bound
        if self.watch_accuracy and self._curvature is None and bound.value is not None:
            self._curvature = self._change_along_newton_step()
            bound = self.error_bound  # with it (None inside a transform: measured later)
        self._warned = bound.enforce(self.max_error_bound, self.h.dtype, self._warned)

    def _change_along_newton_step(self) -> tuple[float, int] | None:
        """The error bound's second-order term ``q`` (see :mod:`deqhess.linear.accuracy`).

        ``δ = (I − J)⁻¹ r`` from the forward residual ``r = F(h*) − h*``, then
        ``q = ‖(I − J)⁻¹ (J(h* + δ) − J(h*)) δ‖ / ‖δ‖`` from one JVP of ``F`` at ``h* + δ``
        (``J(h*) δ = δ − (I − J) δ = δ − r``) and a second solve:
        per row where rows are independent (the largest), else of the whole state. Once
        per factorisation: one kept between passes (formed from bitwise the same blocks
        of ``J``) keeps it.

        Returns:
            ``(q, row)``: ``q`` and the row where it is largest (-1 for rows not declared
            independent: one system); ``q = 0`` where there is
            nothing to measure (no residual left or no certified evaluation, an iterative
            solve that stops short of its tolerance, or an ``f`` with an operation torch
            has no forward-mode derivative for: the first-order bound stands), inf where a
            step or change is not finite; None inside a ``torch.func`` transform (its
            tensors have no values to measure: a later derivative outside measures it).

        Raises:
            RuntimeError: an error of ``f`` itself (as any evaluation of it would raise).
        """
        gap, prepared = self._forward_gap, self._prepared
        if prepared is not None and prepared.newton_change is not None:
            return prepared.newton_change
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return None
        if gap is None or prepared is None or not bool(gap.any()):
            return 0.0, 0
        try:
            step = prepared.solve(gap)
            with torch.no_grad():
                there = torch.func.jvp(self.residual.fn, (self.h + step,), (step,))[1]
            change = prepared.solve(there - step + gap)  # J(h* + δ)δ − J(h*)δ
        except ConvergenceError:  # an iterative solve short of its tolerance: not measured
            return 0.0, 0
        except (NotImplementedError, RuntimeError) as error:
            if not _no_forward_mode(error):
                raise
            return 0.0, 0  # an operation of f without forward-mode derivatives: not measured
        if not (all_finite(step) and all_finite(change)):
            measured = (math.inf, 0)
        else:
            if self.operator.independent_rows:
                moved = torch.linalg.vector_norm(change.flatten(1), dim=1)
                size = torch.linalg.vector_norm(step.flatten(1), dim=1)
            else:  # one system: no row to name (-1)
                moved = torch.linalg.vector_norm(change).reshape(1)
                size = torch.linalg.vector_norm(step).reshape(1)
            tiny = torch.finfo(size.dtype).tiny
            ratio = torch.where(size > 0, moved / size.clamp_min(tiny), 0.0)
            row = int(torch.argmax(ratio))
            measured = (float(ratio[row]), row if self.operator.independent_rows else -1)
        prepared.newton_change = measured
        return measured

    def _estimate_along_forward_gap(self) -> None:
        """``‖(I − J)⁻¹‖`` from below along the residual the forward solve left.

        An iterative solve estimates ``‖(I − J)⁻¹‖`` only in the directions its
        right-hand sides excite; the fixed point's own error is ``(I − J)⁻¹ r``, ``r =
        F(h*) − h*``, and lies along the directions ``I − J`` shrinks most (the forward
        solve's slowest). :data:`FORWARD_GAP_STEPS` Arnoldi steps of GMRES from ``r``
        bound ``‖(I − J)⁻¹‖`` from below there (a slow mode orthogonal to the loss's
        gradient had left a gradient 4e-4 off under a Neumann bound of 1.2e-10). Rows
        that are not declared independent are one system. Where ``F`` has an operation
        torch has no forward-mode derivative for, the steps take ``(I − J)ᵀ`` (VJPs)
        instead: ``‖(I − J)⁻ᵀ‖₂ = ‖(I − J)⁻¹‖₂``, still bounded from below.

        Raises:
            RuntimeError: an error of ``F`` itself (as any evaluation of it would raise).
        """
        gap = self._forward_gap
        if gap is None or not all_finite(gap) or not bool(gap.any()):
            return
        if self.operator.independent_rows:
            self.operator.require_independent_rows()
        try:
            info = self._arnoldi_from(gap, self.operator.apply)
        except (NotImplementedError, RuntimeError) as error:
            if not _no_forward_mode(error):
                raise
            info = self._arnoldi_from(gap, self.operator.apply_transpose)
        self.stats.products += info.iterations
        self.stats.estimated(info.inverse_norm, info.method)

    def _arnoldi_from(self, gap: Tensor, apply: Callable[[Tensor], Tensor]) -> LinearSolveInfo:
        """:data:`FORWARD_GAP_STEPS` steps of GMRES with ``apply`` from ``gap``.

        Returns:
            The solve's statistics (its ``inverse_norm``: the estimate from below).
        """
        if self.operator.independent_rows:
            rhs, product = gap, apply
        else:
            shape = gap.shape
            rhs = gap.reshape(1, -1)

            def product(v: Tensor) -> Tensor:
                return apply(v.reshape(shape)).reshape(1, -1)

        _, info = gmres(
            product, rhs, rtol=0.0, restart=FORWARD_GAP_STEPS, max_iter=FORWARD_GAP_STEPS
        )
        return info

    def certify(self, value: Tensor, again: bool = False) -> None:
        """Check, once, that ``F`` evaluated again at ``h*`` has the residuals the solve accepted.

        A caller that evaluates ``F`` at ``h*`` anyway (a VJP in ``θ``) passes the value
        here and spares an evaluation.

        Args:
            value: ``F(h*)``, a fresh evaluation, rows ``[S, d]``.
            again: check even if an earlier evaluation was certified (a different
                evaluation of the map: the layer's visible one, with the cell's hooks).

        Raises:
            InputError: ``F`` is not a deterministic function of ``h`` (a residual moved
                beyond twice what the solve accepted, or its tolerance).
        """
        accepted = self.accepted
        if (self._certified and not again) or accepted is None:  # nothing to compare with
            return
        h = self.h
        g = value - h
        self._forward_gap = g.detach()
        now = torch.linalg.vector_norm(g, dim=-1)
        allowed = 2 * accepted.to(now)
        if self.tolerance is not None:  # coupled rows may drift within the tolerance
            allowed = torch.maximum(
                allowed, 2 * self.tolerance.threshold(torch.linalg.vector_norm(value, dim=-1))
            )
        slack = 64 * torch.finfo(h.dtype).eps * torch.linalg.vector_norm(h, dim=-1)
        moved = now > allowed + slack
        if bool(moved.any()):
            row = int(torch.nonzero(moved)[0, 0])
            raise InputError(
                f"f is not a deterministic function of the state: evaluated again at the fixed "
                f"point, sample {row}'s residual ‖f(h) − h‖ is {float(now[row]):.2e} where the "
                f"solve accepted {float(accepted[row]):.2e}. A map that changes between calls "
                "(dropout or noise in training mode, a parametrisation or buffer updated at "
                "each call) has no fixed point to differentiate: make it deterministic (eval "
                "mode, or draw any random mask once and pass it in x). Or a tensor f reads "
                "changed after the forward solved it — a parameter written through .data or "
                "under torch.no_grad() (weight clipping, a manual update) between the "
                "forward and the backward: take the derivatives first, or run the forward "
                "again after the change."
            )
        self._certified = True

    @property
    def is_prepared(self) -> bool:
        """Whether the solve with ``I − J`` has been set up."""
        return self._prepared is not None

    @property
    def condition_number(self) -> float | None:
        """Estimated condition number of ``I − J`` once prepared (dense LU), else None."""
        return None if self._prepared is None else self._prepared.condition_number

    @property
    def inverse_norm(self) -> float | None:
        """Estimated ``‖(I − J)⁻¹‖₁`` (largest over blocks) once prepared by a dense LU.

        How much a residual left in ``h*`` is amplified into its error; else None.
        """
        return None if self._prepared is None else self._prepared.inverse_norm

    def check_independent_rows(self) -> None:
        """Refuse (:class:`deqhess.InputError`) an ``F`` that couples rows declared independent."""
        self.operator.require_independent_rows()

    @classmethod
    def in_blocks(
        cls, residual: Residual, h: Tensor, blocks: tuple[int, int], solver: LinearSolver,
        **options,
    ) -> Linearization:  # fmt: skip
        """The linearisation of one coupled system whose ``J`` is block diagonal.

        Args:
            residual: the residual of the system ``h`` ``[1, N]``.
            h: the fixed point ``[1, N]``.
            blocks: ``(B, n)``, ``B`` diagonal blocks of width ``n`` (``B·n = N``).
            solver: the linear solver of the blocks.
            **options: keywords of :class:`Linearization`.

        Returns:
            The linearisation solved block by block; right-hand sides stay ``[..., 1, N]``
            for the caller.
        """

        def in_rows(r: Tensor) -> Tensor:
            return residual.fn(r.reshape(h.shape)).reshape(blocks)

        lin = cls(in_rows, h.reshape(blocks), solver, **options)
        lin.outer = tuple(h.shape)
        return lin

    def solve(
        self, rhs: Tensor, x0: Tensor | None = None, *, transpose: bool = False,
        warm_start: bool = False,
    ) -> Tensor:  # fmt: skip
        """``(I − J)⁻¹ rhs``, or ``(I − J)⁻ᵀ rhs`` with ``transpose``.

        Args:
            rhs: right-hand sides ``[..., S, d]``.
            x0: initial guess for an iterative solver.
            transpose: solve with ``(I − J)ᵀ`` (the adjoint's system).
            warm_start: without ``x0``, start from the previous solution of the same
                system and shape on this linearisation (kept only where it beats zero).

        Returns:
            The solution, shaped like ``rhs``.

        Raises:
            NonFiniteError: ``rhs`` has NaN or inf entries.
        """
        if not all_finite(rhs):
            raise NonFiniteError(
                "the right-hand side of a solve with I − J is not finite: what reaches the "
                "fixed point — ∇L or a cotangent from the layers after it, ∂f/∂θ along a "
                "direction, or a second derivative of f — is NaN/inf there (the loss or f is "
                "not finite or not differentiable at the fixed point: sqrt, abs or division "
                "at 0, overflow).",
                quantity="the right-hand side of a linear solve",
            )
        shape = rhs.shape
        if self.outer is not None:  # the caller's [..., 1, N] as [..., B, n] blocks
            rhs = rhs.reshape(*shape[:-2], *self.h.shape)
            x0 = None if x0 is None else x0.reshape(rhs.shape)
        prepared = self.prepared.transpose() if transpose else self.prepared
        if x0 is None and warm_start:
            previous = self._previous.get(transpose)
            x0 = previous if previous is not None and previous.shape == rhs.shape else None
        x, info = prepared.compute(rhs, x0)
        self.stats.record(info)
        if self.watch_accuracy and self.prepared.inverse_norm is None:  # GMRES's estimate
            self._check_error_bound()
        if warm_start:
            self._previous[transpose] = x
        return x.reshape(shape)

    def solve_transpose(self, rhs: Tensor, x0: Tensor | None = None) -> Tensor:
        """``(I − J)⁻ᵀ rhs`` for ``rhs`` ``[..., S, d]``."""
        return self.solve(rhs, x0, transpose=True)
