"""deqhess — exact Hessians of deep equilibrium models.

Solve ``h* = f(x, h*, θ)``, then the adjoint ``(I − J)ᵀλ = ∇L`` and the sensitivity
``(I − J)Z = ∂f/∂θ``, and assemble ``H = Zᵀ∇²L Z + [I; Z]ᵀ ∇²(λᵀf) [I; Z]`` —
densely, or as exact matrix-free Hessian-vector products.
"""

from __future__ import annotations

from . import linear, solvers
from .errors import ConvergenceError, SingularSystemError, StaleEquilibriumError
from .implicit import Equilibrium, EquilibriumInfo, HessianSplit, grad, hessian, hvp
from .solvers import Anderson, Picard

__version__ = "0.1.0"

__all__ = [
    # forward solvers
    "Anderson",
    # errors
    "ConvergenceError",
    # the equilibrium and its derivatives
    "Equilibrium",
    "EquilibriumInfo",
    "HessianSplit",
    "Picard",
    "SingularSystemError",
    "StaleEquilibriumError",
    "grad",
    "hessian",
    "hvp",
    # layers
    "linear",
    "solvers",
]
