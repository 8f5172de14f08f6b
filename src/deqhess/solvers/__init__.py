"""Fixed-point solvers for ``h = f(h)``; they know nothing of derivatives.

One driver loop (:func:`solve_fixed_point`) runs every solver under a
:class:`Convergence` policy: per-sample stopping, fallback solvers, and the choice
between raising and keeping the best iterate.
"""

from __future__ import annotations

from .aliases import resolve_solver
from .anderson import Anderson
from .base import FixedPointSolver
from .convergence import Convergence, Stage, Status
from .driver import SolveInfo, solve_fixed_point
from .picard import Picard
from .residual import Residual
from .tolerance import Tolerance, default_tolerance

__all__ = [
    # solvers
    "Anderson",
    "FixedPointSolver",
    "Picard",
    "Residual",
    "resolve_solver",
    # the driver and its policy
    "Convergence",
    "SolveInfo",
    "Stage",
    "Status",
    "Tolerance",
    "default_tolerance",
    "solve_fixed_point",
]
