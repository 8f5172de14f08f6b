"""The convergence policy: what a fixed-point solve does with samples that miss the tolerance.

Every sample (row) is tested on its own. Training wants a straggler not to stop the
run; an analysis wants to know exactly which samples are fixed points. One small
object states the choice, and the one driver loop
(:func:`deqhess.solvers.solve_fixed_point`) enforces it for ``Equilibrium``, data
sets and the ``nn.DEQ`` layer alike.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..options import integer
from .aliases import resolve_solver
from .anderson import Anderson
from .base import FixedPointSolver
from .picard import Picard
from .tolerance import Tolerance

__all__ = ["Convergence", "Stage", "Status"]

_ON_FAILURE = ("raise", "best")


class Status(enum.IntEnum):
    """How each sample's solve ended (``SolveInfo.sample_status``)."""

    CONVERGED = 0  #: met the tolerance
    MAX_ITER = 1  #: ran out of iterations
    STALLED = 2  #: no new best residual for ``patience`` steps
    DIVERGED = 3  #: f returned non-finite values, or ‖f(h)‖ overflowed


@dataclass(frozen=True)
class Stage:
    """One solver's run within a solve.

    Attributes:
        solver: the solver's description.
        samples: samples it iterated (those unconverged when it started).
        iterations: steps it took (its slowest sample).
        converged: how many of its samples met the tolerance.
    """

    solver: str
    samples: int
    iterations: int
    converged: int


class Convergence:
    """What :func:`~deqhess.solvers.solve_fixed_point` does when samples miss the tolerance.

    The solve runs the main solver for ``max_iter`` steps. Samples still unconverged
    (out of steps, stalled, or diverged to non-finite values) then go to each
    ``fallback`` solver in turn, each restarting from the sample's best iterate (the
    one with the smallest residual so far) while converged samples stay frozen. What
    is still unconverged after the last solver:

    * ``on_failure="raise"`` (default): :class:`deqhess.ConvergenceError`, whose
      message gives the residuals, the samples and what was not tried yet;
    * ``on_failure="best"``: each such sample keeps its best iterate, a
      ``RuntimeWarning`` says how many (unless ``warn=False``), and the statistics'
      ``converged_mask`` marks them. Derivatives there are those of the map at that
      iterate, not of a fixed point: exclude those samples from what you analyse
      (see the README, "What deqhess checks").

    Args:
        on_failure: ``"raise"`` or ``"best"``.
        fallback: a solver (or alias), or a sequence of them, tried in order on the
            unconverged samples; e.g. ``Picard(damping=0.5)`` after Anderson stalls.
        fallback_max_iter: step cap of each fallback (default: the solve's
            ``max_iter``).
        patience: hand a sample on (to the next solver, or to ``on_failure``) once
            its best residual has not improved for this many steps; ``None`` waits
            for ``max_iter``. Saves the steps a stalled sample would waste.
        warn: with ``on_failure="best"``, warn when samples are kept unconverged.

    Example:
        >>> from deqhess.solvers import Anderson, Convergence, Picard
        >>> policy = Convergence("best", fallback=Picard(damping=0.5), patience=50)
        >>> policy
        Convergence(on_failure='best', fallback=(Picard(damping=0.5),), patience=50)
    """

    def __init__(
        self,
        on_failure: str = "raise",
        *,
        fallback: str | FixedPointSolver | Sequence[str | FixedPointSolver] = (),
        fallback_max_iter: int | None = None,
        patience: int | None = None,
        warn: bool = True,
    ) -> None:
        if on_failure not in _ON_FAILURE:
            raise InputError(
                f"unknown on_failure {on_failure!r}; use 'raise' (ConvergenceError) or "
                "'best' (keep each unconverged sample's best iterate, warn, and mark it in "
                "info.converged_mask)."
            )
        fallbacks = [fallback] if isinstance(fallback, (str, FixedPointSolver)) else fallback
        self.on_failure = on_failure
        self.fallback = tuple(resolve_solver(s) for s in fallbacks)
        self.fallback_max_iter = (
            None
            if fallback_max_iter is None
            else integer(fallback_max_iter, "fallback_max_iter", minimum=0)
        )
        self.patience = None if patience is None else integer(patience, "patience", minimum=1)
        self.warn = bool(warn)

    def __repr__(self) -> str:
        parts = [f"on_failure={self.on_failure!r}"]
        if self.fallback:
            parts.append(f"fallback={self.fallback!r}")
        if self.fallback_max_iter is not None:
            parts.append(f"fallback_max_iter={self.fallback_max_iter}")
        if self.patience is not None:
            parts.append(f"patience={self.patience}")
        if not self.warn:
            parts.append("warn=False")
        return f"Convergence({', '.join(parts)})"

    @classmethod
    def resolve(
        cls, policy: Convergence | str | None, require_convergence: bool = True
    ) -> Convergence:
        """A policy from itself, an alias (``"raise"``, ``"best"``) or ``None``.

        Args:
            policy: a :class:`Convergence`, ``"raise"``, ``"best"`` or ``None``, which
                follows the shorthand ``require_convergence``.
            require_convergence: True: ``"raise"``, False: ``"best"``.

        Returns:
            The policy.

        Raises:
            InputError: an unknown alias or object, or ``require_convergence=False``
                together with a policy that raises.
        """
        if not isinstance(require_convergence, bool):
            raise InputError(
                f"require_convergence must be True or False; got {require_convergence!r}."
            )
        if policy is None:
            return cls() if require_convergence else cls("best")
        if isinstance(policy, str):
            policy = cls(policy)
        if not isinstance(policy, Convergence):
            raise InputError(
                f"convergence must be 'raise', 'best' or a deqhess.solvers.Convergence; got "
                f"{policy!r}."
            )
        if not require_convergence and policy.on_failure == "raise":
            raise InputError(
                f"require_convergence=False (keep the best iterate) contradicts convergence="
                f"{policy!r}; pass only convergence=Convergence('best', ...)."
            )
        return policy

    def schedule(
        self, solver: FixedPointSolver, max_iter: int
    ) -> list[tuple[FixedPointSolver, int]]:
        """The solvers to run in order, each with its step cap."""
        cap = max_iter if self.fallback_max_iter is None else self.fallback_max_iter
        return [(solver, max_iter), *((s, cap) for s in self.fallback)]

    def advice(
        self,
        tried: Sequence[FixedPointSolver],
        tolerance: Tolerance,
        dtype: torch.dtype,
        diverged: bool = False,
    ) -> str:
        """What to try next, leaving out what this solve already tried."""
        tips = [] if diverged else ["a larger max_iter"]
        if not any(isinstance(s, Anderson) for s in tried) and not diverged:
            tips.append("solver='anderson'")
        if not any(s.damping < 1 for s in tried):
            tips.append(
                "a damped fallback from the best iterate, convergence=Convergence("
                "fallback=Picard(damping=0.5))"
            )
        elif not any(isinstance(s, Picard) for s in tried):
            tips.append("convergence=Convergence(fallback=Picard(damping=0.5))")
        elif diverged:
            tips.append("a smaller damping")
        if self.on_failure == "raise":
            tips.append(
                "convergence='best' to keep each sample's best iterate (info.converged_mask "
                "marks the samples that missed)"
            )
        tips.append("a better h0" if diverged else "a looser tol")
        text = (
            "Try "
            + ", ".join(tips)
            + ", or check that f is a contraction in h (spectral norm of ∂f/∂h below 1)."
        )
        eps = torch.finfo(dtype).eps
        if 0 < tolerance.rtol < 10 * eps and not diverged:
            text += (
                f" rtol={tolerance.rtol:g} is below what {dtype} can resolve (ε = {eps:.1e}): "
                "use tol=None (chosen by dtype)"
                + (" or float64." if dtype != torch.float64 else ".")
            )
        return text
