"""Analyses of curvature operators, built only on their products.

Every function takes any symmetric operator with ``shape``, ``dtype``, ``device`` and
``matmat`` — a :class:`deqhess.CurvatureOperator` for the Hessian, the loss curvature
or the dynamics curvature, of one equilibrium or a data set — or a
:class:`ParameterBlock` of one. Each returns a small result object with the estimate,
its error estimate where one exists and the number of HVPs used; random probes are
seeded (an int repeats a run exactly; ``seed=None`` draws fresh, unrepeatable probes:
:func:`deqhess.curvature.base.seed_value`). Those error estimates are about the
operator *as computed* (its dtype, its inexact fixed point and solves);
:func:`operator_accuracy` estimates that operator's own error against the exact Hessian.
"""

from __future__ import annotations

from .accuracy import OperatorAccuracy, operator_accuracy, state_error
from .base import Counted, ParameterBlock, SymmetricOperator
from .density import DensityResult, spectral_density
from .diagonal import DiagonalResult, diagonal
from .eigen import EigenResult, default_max_hvps, extreme_eigenpairs
from .inverse import InverseResult, InverseStatus, solve_damped
from .newton import InfluenceResult, influence, newton_step
from .posterior import InverseDiagonalResult, inverse_diagonal
from .trace import TraceResult, hutchinson, hutchpp

__all__ = [
    # spectra
    "EigenResult",
    "extreme_eigenpairs",
    "default_max_hvps",
    "DensityResult",
    "spectral_density",
    # traces and diagonals
    "TraceResult",
    "hutchinson",
    "hutchpp",
    "DiagonalResult",
    "diagonal",
    # inverse products
    "InverseResult",
    "InverseStatus",
    "solve_damped",
    "newton_step",
    "InfluenceResult",
    "influence",
    "InverseDiagonalResult",
    "inverse_diagonal",
    # the operator's own error
    "OperatorAccuracy",
    "operator_accuracy",
    "state_error",
    # operators
    "Counted",
    "ParameterBlock",
    "SymmetricOperator",
]
