"""The implicit layer: the equilibrium, its adjoint, sensitivity, Hessian and HVP."""

from __future__ import annotations

from .equilibrium import Equilibrium, EquilibriumInfo
from .functional import grad, hessian, hvp
from .hessian import HessianSplit
from .loss import Loss
from .problem import Problem

__all__ = [
    "Equilibrium",
    "EquilibriumInfo",
    "HessianSplit",
    "Loss",
    "Problem",
    "grad",
    "hessian",
    "hvp",
]
