"""deqhess — exact Hessians of deep equilibrium models.

Solve ``h* = f(x, h*, θ)``, then the adjoint ``(I − J)ᵀλ = ∇L`` and the sensitivity
``(I − J)Z = ∂f/∂θ``, and assemble ``H = Zᵀ∇²L Z + [I; Z]ᵀ ∇²(λᵀf) [I; Z]`` —
densely, or as exact matrix-free Hessian-vector products.
"""

from __future__ import annotations

from . import batches, curvature, distributed, linear, models, nn, solvers, streaming
from .errors import (
    AccuracyWarning,
    AnalysisConvergenceError,
    ArgumentError,
    ConvergenceError,
    DataChangedError,
    DenseMemoryError,
    DeqhessError,
    InputError,
    ModelChangedError,
    NonFiniteError,
    SingularSystemError,
    StaleEquilibriumError,
    UnsupportedDerivativeError,
)
from .implicit import (
    CurvatureOperator,
    DatasetEquilibrium,
    Equilibrium,
    EquilibriumInfo,
    HessianSplit,
    grad,
    hessian,
    hessian_split,
    hvp,
)
from .linear import GMRES, Dense, Neumann
from .memory import memory_limit
from .models import ModelCurvature
from .solvers import Anderson, Convergence, Picard

__version__ = "0.1.0"

__all__ = [
    # the equilibrium and its derivatives
    "Equilibrium",
    "EquilibriumInfo",
    "HessianSplit",
    "grad",
    "hessian",
    "hessian_split",
    "hvp",
    # operators and data sets
    "CurvatureOperator",
    "DatasetEquilibrium",
    "ModelCurvature",
    # forward solvers and the convergence policy
    "Anderson",
    "Convergence",
    "Picard",
    # linear solvers for I − J
    "Dense",
    "GMRES",
    "Neumann",
    # errors (all derive from DeqhessError) and warnings, and the override of the
    # dense-memory check
    "DeqhessError",
    "InputError",
    "ArgumentError",
    "AccuracyWarning",
    "AnalysisConvergenceError",
    "ConvergenceError",
    "DataChangedError",
    "DenseMemoryError",
    "ModelChangedError",
    "NonFiniteError",
    "SingularSystemError",
    "StaleEquilibriumError",
    "UnsupportedDerivativeError",
    "memory_limit",
    # layers
    "batches",
    "curvature",
    "distributed",
    "linear",
    "models",
    "nn",
    "solvers",
    "streaming",
]
