"""The one driver loop shared by every fixed-point solver.

A solver only says how to take a step (``init`` / ``step``); this loop alone owns
the tolerance test, the iteration cap, non-finite detection, the best iterate and
the statistics, and decides whether to raise. States are held as rows ``[S, d]`` of
independent systems (see :mod:`deqhess.state`); each row is tested on its own and
frozen once it has converged, so a sample's result does not depend on which other
samples share its batch.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConvergenceError
from .residual import Residual

__all__ = [
    "FixedPointSolver",
    "SolveInfo",
    "Tolerance",
    "default_tolerance",
    "solve_fixed_point",
]

_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def default_tolerance(dtype: torch.dtype) -> float:
    """The default relative tolerance for a state of ``dtype``.

    About ``1e-10`` in float64 and ``1e-5`` in float32: a few hundred ulps of the
    state, which is what the second-order quantities need to keep their own accuracy.
    """
    try:
        return _DEFAULT_RTOL[dtype]
    except KeyError:
        raise ValueError(
            f"the state has dtype {dtype}; deqhess supports float32 and float64 states."
        ) from None


@dataclass(frozen=True)
class Tolerance:
    """Stopping rule ``‖f(h) − h‖₂ ≤ max(atol, rtol · ‖f(h)‖₂)``, per sample row.

    Attributes:
        rtol: relative tolerance.
        atol: absolute tolerance (a floor for states near zero).
    """

    rtol: float
    atol: float

    @classmethod
    def resolve(cls, tol: float | None, atol: float | None, dtype: torch.dtype) -> Tolerance:
        """Fill in defaults: ``tol`` by dtype, ``atol`` equal to ``tol`` (unit scale)."""
        rtol = default_tolerance(dtype) if tol is None else float(tol)
        abs_tol = rtol if atol is None else float(atol)
        if not (rtol >= 0 and abs_tol >= 0):
            raise ValueError(f"tol and atol must be >= 0; got tol={tol}, atol={atol}.")
        return cls(rtol=rtol, atol=abs_tol)

    def threshold(self, scale: Tensor) -> Tensor:
        """Per-row residual bound for rows whose ``‖f(h)‖`` is ``scale``."""
        return torch.clamp(self.rtol * scale, min=self.atol)


@dataclass(frozen=True)
class SolveInfo:
    """Statistics of one fixed-point solve.

    Attributes:
        solver: the solver's description.
        iterations: steps taken by the slowest sample.
        residual_norm: largest final ``‖f(h) − h‖₂`` over samples.
        converged: whether every sample met the tolerance.
        residual_history: per iteration, the largest residual over samples still
            iterating.
        sample_iterations: ``[S]`` steps taken by each sample.
        sample_residuals: ``[S]`` final residual of each sample.
        tolerance: the stopping rule used.
    """

    solver: str
    iterations: int
    residual_norm: float
    converged: bool
    residual_history: tuple[float, ...]
    sample_iterations: Tensor
    sample_residuals: Tensor
    tolerance: Tolerance


class FixedPointSolver(abc.ABC):
    """A rule for the next iterate of ``h = f(h)`` on rows ``[S, d]``.

    Subclasses implement :meth:`init` (their memory for a first iterate) and
    :meth:`step` (the next iterate from ``h`` and ``f(h)``). They never test
    convergence, count iterations or raise: the driver does.
    """

    @abc.abstractmethod
    def init(self, h: Tensor) -> Any:
        """Memory for a solve starting at rows ``h`` ``[S, d]``."""

    @abc.abstractmethod
    def step(self, memory: Any, h: Tensor, fh: Tensor) -> tuple[Tensor, Any]:
        """Next iterate ``[S, d]`` from ``h`` and ``fh = f(h)``, and updated memory."""


def _row_norms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dim=1)


def solve_fixed_point(
    fn: Callable[[Tensor], Tensor] | Residual,
    h0: Tensor,
    solver: FixedPointSolver,
    tolerance: Tolerance,
    max_iter: int,
    require_convergence: bool = True,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``h = fn(h)`` row-wise from ``h0`` ``[S, d]``, stopping on its :class:`Residual`.

    Returns:
        ``(h, info)``: the converged rows ``[S, d]`` (each the iterate whose residual
        met the tolerance) and the statistics.

    Raises:
        ConvergenceError: ``fn`` produced non-finite values, or a row did not meet the
            tolerance within ``max_iter`` steps (unless ``require_convergence=False``,
            which warns and returns each row's best iterate).
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0; got {max_iter}.")
    residual_map = fn if isinstance(fn, Residual) else Residual(fn)
    samples = h0.shape[0]
    h = h0
    memory = solver.init(h)
    done = torch.zeros(samples, dtype=torch.bool, device=h.device)
    best_h = h0.clone()
    best_res = torch.full((samples,), float("inf"), dtype=h.dtype, device=h.device)
    last_res = best_res.clone()
    iters = torch.zeros(samples, dtype=torch.long, device=h.device)
    history: list[float] = []
    for k in range(max_iter + 1):
        fh, g = residual_map.evaluate(h)
        finite = torch.isfinite(fh).all(dim=1)
        if not bool(finite[~done].all()):
            bad = int(torch.nonzero(~finite & ~done)[0, 0])
            raise ConvergenceError(
                f"{solver!r} diverged: f returned non-finite values at iteration {k} "
                f"(sample {bad}). Try a damped or smaller step (Picard(damping=0.5), "
                "Anderson(damping=0.5)), a better h0, or check that f is a contraction "
                "in h (spectral norm of ∂f/∂h below 1).",
                info=_info(solver, iters, best_res, done, history, tolerance),
            )
        residual = _row_norms(g)
        active = ~done
        history.append(float(residual[active].max()))
        last_res = torch.where(active, residual, last_res)
        better = active & (residual < best_res)
        best_res = torch.where(better, residual, best_res)
        best_h = torch.where(better[:, None], h, best_h)
        met = (residual <= tolerance.threshold(_row_norms(fh))) & torch.isfinite(residual)
        done = done | (active & met)
        iters = torch.where(active, torch.full_like(iters, k), iters)
        if bool(done.all()) or k == max_iter:
            break
        h_next, memory = solver.step(memory, h, fh)
        h = torch.where(done[:, None], h, h_next)
    if bool(done.all()):
        return h, _info(solver, iters, last_res, done, history, tolerance)
    info = _info(solver, iters, best_res, done, history, tolerance)
    worst = int(torch.argmax(torch.where(done, torch.zeros_like(best_res), best_res)))
    eps = torch.finfo(h.dtype).eps
    resolution = (
        f" rtol={tolerance.rtol:g} is below what {h.dtype} can resolve (ε = {eps:.1e}): use "
        "tol=None (chosen by dtype) or float64."
        if tolerance.rtol < 10 * eps
        else ""
    )
    message = (
        f"{solver!r} did not converge in max_iter={max_iter} iterations: best residual "
        f"‖f(h) − h‖ = {float(best_res[worst]):.3e} (sample {worst}) against rtol="
        f"{tolerance.rtol:g}, atol={tolerance.atol:g}; "
        f"{int((~done).sum())} of {samples} samples unconverged. Try a larger "
        "max_iter, solver='anderson', a looser tol, or check that f is a contraction "
        "in h (spectral norm of ∂f/∂h below 1)." + resolution
    )
    if require_convergence:
        raise ConvergenceError(message, info=info)
    warnings.warn(message + " Returning the best iterate.", RuntimeWarning, stacklevel=3)
    return torch.where(done[:, None], h, best_h), info


def _info(
    solver: FixedPointSolver,
    iters: Tensor,
    best_res: Tensor,
    done: Tensor,
    history: list[float],
    tolerance: Tolerance,
) -> SolveInfo:
    return SolveInfo(
        solver=repr(solver),
        iterations=int(iters.max()) if iters.numel() else 0,
        residual_norm=float(best_res.max()),
        converged=bool(done.all()),
        residual_history=tuple(history),
        sample_iterations=iters.cpu(),
        sample_residuals=best_res.cpu(),
        tolerance=tolerance,
    )
