"""The implicit layer: the equilibrium, its adjoint, sensitivity, Hessian and HVP."""

from __future__ import annotations

from .dataset import BatchSolve, DatasetEquilibrium
from .equilibrium import Equilibrium, EquilibriumInfo
from .functional import grad, hessian, hessian_split, hvp
from .hessian import HessianSplit
from .loss import Loss
from .operators import PARTS, CurvatureOperator
from .problem import Problem

__all__ = [
    # one equilibrium
    "Equilibrium",
    "EquilibriumInfo",
    "HessianSplit",
    "Loss",
    "Problem",
    # operators and data sets
    "PARTS",
    "CurvatureOperator",
    "DatasetEquilibrium",
    "BatchSolve",
    # one-shot forms
    "grad",
    "hessian",
    "hessian_split",
    "hvp",
]
