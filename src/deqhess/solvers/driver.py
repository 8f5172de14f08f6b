"""The one driver loop shared by every fixed-point solver.

A solver only says how to take a step (``init`` / ``step``); this loop alone owns
the tolerance test, the iteration cap, non-finite detection, the best iterate, the
fallback solvers and the statistics, and decides — under a
:class:`~deqhess.solvers.Convergence` policy — whether to raise. States are held as
rows ``[S, d]`` of independent systems (see :mod:`deqhess.state`); each row is tested
on its own and frozen once it has converged, so a sample's result does not depend on
which other samples share its batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConvergenceError
from ..options import integer
from .base import FixedPointSolver
from .convergence import Convergence, Stage, Status
from .residual import Residual
from .tolerance import Tolerance

__all__ = ["SolveInfo", "solve_fixed_point"]


@dataclass(frozen=True)
class SolveInfo:
    """Statistics of one fixed-point solve.

    Attributes:
        solver: the (main) solver's description.
        iterations: steps taken by the slowest sample, over all solvers.
        residual_norm: largest final ``‖f(h) − h‖₂`` over samples.
        converged: whether every sample met the tolerance.
        residual_history: per iteration, the largest residual over samples still
            iterating (the solvers' runs one after the other).
        sample_iterations: ``[S]`` steps taken by each sample.
        sample_residuals: ``[S]`` residual of each sample's returned iterate.
        tolerance: the stopping rule used.
        converged_mask: ``[S]`` bool, True where the sample met the tolerance (with
            ``batch_dim``, sample ``s`` is the slice ``s`` along it).
        sample_status: ``[S]`` :class:`~deqhess.solvers.Status` codes (int8).
        stages: each solver's run (:class:`~deqhess.solvers.Stage`), main solver first.
    """

    solver: str
    iterations: int
    residual_norm: float
    converged: bool
    residual_history: tuple[float, ...]
    sample_iterations: Tensor
    sample_residuals: Tensor
    tolerance: Tolerance
    converged_mask: Tensor
    sample_status: Tensor
    stages: tuple[Stage, ...]

    @property
    def unconverged(self) -> int:
        """The number of samples that missed the tolerance."""
        return int((~self.converged_mask).sum())


@dataclass
class _Progress:
    """Per-row state carried from one solver's run to the next."""

    h: Tensor  # current iterate; a converged row holds its accepted iterate
    done: Tensor  # [S] met the tolerance
    status: Tensor  # [S] Status codes
    best_h: Tensor  # [S, d] finite iterate with the smallest residual so far
    best_res: Tensor  # [S]
    accepted_res: Tensor  # [S] residual of the accepted iterate (converged rows)
    iters: Tensor  # [S] steps taken over all runs
    history: list[float]
    start_scale: Tensor | None = None  # [S] max(‖f(h₀)‖, ‖f(h₀) − h₀‖) at the first evaluation
    start_res: Tensor | None = None  # [S] ‖f(h₀) − h₀‖

    @classmethod
    def start(cls, h0: Tensor) -> _Progress:
        samples = h0.shape[0]
        inf = torch.full((samples,), float("inf"), dtype=h0.dtype, device=h0.device)
        return cls(
            h=h0,
            done=torch.zeros(samples, dtype=torch.bool, device=h0.device),
            status=torch.full((samples,), int(Status.MAX_ITER), dtype=torch.int8),
            best_h=h0.clone(),
            best_res=inf,
            accepted_res=inf.clone(),
            iters=torch.zeros(samples, dtype=torch.long, device=h0.device),
            history=[],
        )


def _row_norms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dim=1)


def solve_fixed_point(
    fn: Callable[[Tensor], Tensor] | Residual,
    h0: Tensor,
    solver: FixedPointSolver,
    tolerance: Tolerance,
    max_iter: int,
    require_convergence: bool = True,
    *,
    convergence: Convergence | str | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``h = fn(h)`` row-wise from ``h0`` ``[S, d]`` under a convergence policy.

    Args:
        fn: the map on rows ``[S, d]``, or its :class:`Residual` (the stopping test is on
            the residual's norm).
        h0: the first iterate.
        solver: the main solver; it runs first, for ``max_iter`` steps.
        tolerance: the per-row stopping rule.
        max_iter: step cap of the main solver.
        require_convergence: shorthand for ``convergence`` (False: ``"best"``).
        convergence: the policy (:class:`Convergence`, ``"raise"`` or ``"best"``);
            default from ``require_convergence``.

    Returns:
        ``(h, info)``: rows ``[S, d]`` — each converged row the iterate that met the
        tolerance, each other row (policy ``"best"``) its best iterate — and the
        statistics, with ``info.converged_mask`` marking the converged rows.

    Raises:
        ConvergenceError: a row did not meet the tolerance after every solver of the
            policy, or diverged (``fn`` non-finite, or ``‖fn(h)‖`` overflowing), under
            ``on_failure="raise"``.
    """
    residual_map = fn if isinstance(fn, Residual) else Residual(fn)
    policy = Convergence.resolve(convergence, require_convergence)
    max_iter = integer(max_iter, "max_iter", minimum=0)
    progress = _Progress.start(h0)
    schedule = policy.schedule(solver, max_iter)
    stages: list[Stage] = []
    tried: list[FixedPointSolver] = []
    for index, (stage_solver, cap) in enumerate(schedule):
        if bool(progress.done.all()) and stages:
            break
        last = index == len(schedule) - 1
        tried.append(stage_solver)
        stages.append(
            _run(
                residual_map, stage_solver, cap, progress, tolerance, policy, last, tried, h0.dtype
            )
        )
    info = _info(solver, progress, tolerance, stages)
    if info.converged:
        return progress.h, info
    message = _unconverged_message(info, tried, policy, max_iter, h0.dtype)
    if policy.on_failure == "raise":
        raise ConvergenceError(message, info=info)
    if policy.warn:
        warnings.warn(
            message + " Returning the best iterate of each unconverged sample "
            "(info.converged_mask marks them).",
            RuntimeWarning,
            stacklevel=3,
        )
    return torch.where(progress.done[:, None], progress.h, progress.best_h), info


def _run(
    residual_map: Residual,
    solver: FixedPointSolver,
    cap: int,
    p: _Progress,
    tolerance: Tolerance,
    policy: Convergence,
    last: bool,
    tried: list[FixedPointSolver],
    dtype: torch.dtype,
) -> Stage:
    """One solver's run on the unconverged rows, each from its best iterate."""
    h = torch.where(p.done[:, None], p.h, p.best_h)
    frozen = p.done.clone()  # rows this run does not move
    entering = ~frozen
    start = p.iters.clone()
    since_best = torch.zeros_like(p.iters)
    memory = solver.init(h)
    steps = 0
    for k in range(cap + 1):
        fh, g = residual_map.evaluate(h)
        residual, scale = _row_norms(g), _row_norms(fh)
        # a NaN or inf entry, or an overflowing norm, leaves a norm non-finite
        finite = torch.isfinite(residual) & torch.isfinite(scale)
        ok = finite & (residual <= tolerance.threshold(scale))
        # A row that met the tolerance is frozen; if f couples rows, the others moving can
        # push it off its fixed point again (independent rows stay exactly where they were).
        drifted = p.done & ~ok
        diverged = ~frozen & ~finite
        if bool((drifted | diverged).any()):  # rare: one check for both
            if bool(drifted.any()):
                p.done = p.done & ~drifted
                p.status[drifted.cpu()] = int(Status.MAX_ITER)
                frozen = frozen & ~drifted
                diverged = ~frozen & ~finite
            if bool(diverged.any()):
                if last and policy.on_failure == "raise":
                    raise ConvergenceError(
                        _diverged_message(solver, k, fh, diverged)
                        + " "
                        + policy.advice(tried, tolerance, dtype, diverged=True),
                        info=_info(solver, p, tolerance, []),
                    )
                p.status[diverged.cpu()] = int(Status.DIVERGED)
                frozen = frozen | diverged
                # back to the best (finite) iterate, so that fn stays finite on the batch
                h = torch.where(diverged[:, None], p.best_h, h)
                fh = torch.where(diverged[:, None], h, fh)
        active = ~frozen
        worst = torch.where(active, residual, 0.0).amax() if residual.numel() else None
        p.iters = torch.where(active, start + k, p.iters)
        better = active & (residual < p.best_res)
        p.best_res = torch.where(better, residual, p.best_res)
        p.best_h = torch.where(better[:, None], h, p.best_h)
        if p.start_res is None:
            p.start_res, p.start_scale = residual, torch.maximum(scale, residual)
        met = active & ok
        # A relative tolerance is met as well when ‖f(h)‖ runs off to huge values while
        # the residual stays where it started: no fixed point was found, the scale grew.
        ran_away = met & (residual >= 0.5 * p.start_res) & (scale > _RUNAWAY * p.start_scale)
        if bool(ran_away.any()):
            if last and policy.on_failure == "raise":
                raise ConvergenceError(
                    _ran_away_message(solver, k, residual, scale, p, ran_away)
                    + " "
                    + policy.advice(tried, tolerance, dtype, diverged=True),
                    info=_info(solver, p, tolerance, []),
                )
            p.status[ran_away.cpu()] = int(Status.DIVERGED)
            frozen = frozen | ran_away
            met = met & ~ran_away
        p.done = p.done | met
        p.accepted_res = torch.where(met, residual, p.accepted_res)
        frozen = frozen | met
        if policy.patience is not None:
            since_best = torch.where(better, torch.zeros_like(since_best), since_best + 1)
            stalled = active & ~met & (since_best > policy.patience)
            p.status[stalled.cpu()] = int(Status.STALLED)
            frozen = frozen | stalled
        steps = k
        all_frozen = bool(frozen.all())
        if bool(active.any()):
            p.history.append(float(worst))
        if all_frozen or k == cap:
            break
        h_next, memory = solver.step(memory, h, fh)
        h = torch.where(frozen[:, None], h, h_next) if bool(frozen.any()) else h_next
    p.status[p.done.cpu()] = int(Status.CONVERGED)
    still = (~frozen).cpu()
    p.status[still] = int(Status.MAX_ITER)
    p.h = h
    return Stage(
        solver=repr(solver),
        samples=int(entering.sum()),
        iterations=steps,
        converged=int((entering & p.done).sum()),
    )


def _info(
    solver: FixedPointSolver, p: _Progress, tolerance: Tolerance, stages: list[Stage]
) -> SolveInfo:
    residuals = torch.where(p.done, p.accepted_res, p.best_res)
    return SolveInfo(
        solver=repr(solver),
        iterations=int(p.iters.max()) if p.iters.numel() else 0,
        residual_norm=float(residuals.max()) if residuals.numel() else 0.0,
        converged=bool(p.done.all()),
        residual_history=tuple(p.history),
        sample_iterations=p.iters.cpu(),
        sample_residuals=residuals.cpu(),
        tolerance=tolerance,
        converged_mask=p.done.cpu(),
        sample_status=p.status.clone(),
        stages=tuple(stages),
    )


#: a state whose ‖f(h)‖ grew this many times over its start, its residual not halved,
#: met a relative tolerance by running away rather than converging.
_RUNAWAY = 1e3


def _ran_away_message(
    solver: FixedPointSolver, k: int, residual: Tensor, scale: Tensor, p: _Progress, rows: Tensor
) -> str:
    bad = int(torch.nonzero(rows)[0, 0])
    return (
        f"{solver!r} ran away: at iteration {k} sample {bad} met the relative tolerance only "
        f"because ‖f(h)‖ grew from {float(p.start_scale[bad]):.3e} to {float(scale[bad]):.3e}, "
        f"while its residual ‖f(h) − h‖ = {float(residual[bad]):.3e} did not fall below half "
        f"its start {float(p.start_res[bad]):.3e}: f has no fixed point that this solve reaches."
    )


def _diverged_message(solver: FixedPointSolver, k: int, fh: Tensor, diverged: Tensor) -> str:
    bad = int(torch.nonzero(diverged)[0, 0])
    row = fh[bad]
    if bool(torch.isfinite(row).all()):
        return (
            f"{solver!r} diverged: ‖f(h)‖ overflowed {fh.dtype} at iteration {k} (sample "
            f"{bad}, largest entry {float(row.abs().max()):.3e}): f(h) grows without bound."
        )
    return f"{solver!r} diverged: f returned non-finite values at iteration {k} (sample {bad})."


def _unconverged_message(
    info: SolveInfo,
    tried: list[FixedPointSolver],
    policy: Convergence,
    max_iter: int,
    dtype: torch.dtype,
) -> str:
    status = info.sample_status
    missed = ~info.converged_mask
    worst = int(torch.argmax(torch.where(missed, info.sample_residuals, -1.0)))
    counts = [
        f"{int((status == code).sum())} {label}"
        for code, label in (
            (Status.MAX_ITER, "out of iterations"),
            (Status.STALLED, f"stalled (patience={policy.patience})"),
            (Status.DIVERGED, "diverged"),
        )
        if bool((status == code).any())
    ]
    more = "".join(f", nor did {s.solver} in {s.iterations} more" for s in info.stages[1:])
    return (
        f"{info.solver} did not converge in max_iter={max_iter} iterations{more}: "
        f"{int(missed.sum())} of {missed.numel()} samples unconverged ({', '.join(counts)}); "
        f"best residual ‖f(h) − h‖ = {float(info.sample_residuals[worst]):.3e} (sample "
        f"{worst}) against rtol={info.tolerance.rtol:g}, atol={info.tolerance.atol:g}. "
        + policy.advice(tried, info.tolerance, dtype)
    )
