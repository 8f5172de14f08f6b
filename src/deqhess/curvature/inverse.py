"""Inverse-Hessian-vector products: damped CG / MINRES, Newton steps, influence scores.

``(H + δI) x = b`` is solved by ``scipy.sparse.linalg`` on the operator. The DEQ
Hessian is often **indefinite** (the dynamics curvature has negative eigenvalues):

* ``method="minres"`` (default) handles any symmetric ``H + δI``; for singular systems it
  returns a least-squares solution;
* ``method="cg"`` needs ``H + δI`` positive definite — choose ``δ > −λ_min`` (get λ_min
  from :func:`extreme_eigenpairs` with ``which="smallest"``), or use the GGN operator,
  which is positive semi-definite for losses convex in (θ, h).

A Newton step with an indefinite H may point uphill; damping with ``δ > −λ_min`` makes it
a descent direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg, minres
from torch import Tensor

from .base import Counted, SymmetricOperator

__all__ = ["InfluenceResult", "InverseResult", "influence", "newton_step", "solve_damped"]


@dataclass(frozen=True)
class InverseResult:
    """A solution of ``(H + δI) x = b``.

    Attributes:
        solution: ``[P]``.
        residual: ``‖(H + δI) x − b‖ / ‖b‖``, recomputed with one extra product.
        converged: whether the recomputed relative residual is within ``10 · tol``
            (MINRES also stops on singular systems, with a least-squares solution).
        num_hvps: Hessian-vector products used (including the residual check).
        method: ``"cg"`` or ``"minres"``.
    """

    solution: Tensor
    residual: float
    converged: bool
    num_hvps: int
    method: str


def solve_damped(
    op: SymmetricOperator,
    b: Tensor,
    damping: float = 0.0,
    method: str = "minres",
    tol: float = 1e-8,
    max_iter: int | None = None,
    progress: bool | None = None,
) -> InverseResult:
    """Solve ``(H + δI) x = b`` for ``b`` ``[P]`` (see the module docstring on indefinite H)."""
    if method not in ("cg", "minres"):
        raise ValueError(f"unknown method {method!r}; use 'minres' (indefinite) or 'cg'.")
    counted = Counted(op, max_iter, progress, method.upper())
    np_dtype = np.float64 if op.dtype == torch.float64 else np.float32
    base = counted.to_scipy()

    def damped(a: np.ndarray) -> np.ndarray:
        return base.matvec(a) + damping * np.asarray(a).reshape(-1)

    rhs = b.detach().cpu().numpy().astype(np_dtype)
    if method == "cg":
        shape = op.shape
        system = LinearOperator(shape, matvec=damped, rmatvec=damped, dtype=np_dtype)
        x, info = cg(system, rhs, rtol=tol, maxiter=max_iter)
    else:
        x, info = minres(base, rhs, rtol=tol, shift=-damping, maxiter=max_iter)
    counted.close()
    solution = torch.as_tensor(x, dtype=op.dtype, device=op.device)
    applied = op.matmat(solution[:, None])[:, 0] + damping * solution
    residual = float(torch.linalg.vector_norm(applied - b) / torch.linalg.vector_norm(b))
    converged = info == 0 and residual <= 10 * tol
    return InverseResult(solution, residual, converged, counted.products + 1, method)


def newton_step(
    op: SymmetricOperator, gradient: Tensor, damping: float = 0.0, **options
) -> InverseResult:
    """The (damped) Newton step ``−(H + δI)⁻¹ ∇L``."""
    return solve_damped(op, -gradient, damping, **options)


@dataclass(frozen=True)
class InfluenceResult:
    """Influence of training points on a test loss (Koh & Liang 2017).

    Attributes:
        scores: ``[N]`` ``−∇L_trainᵢᵀ (H + δI)⁻¹ ∇L_test``: the first-order change of the
            test loss when training point i is up-weighted by ε, divided by ε.
        inverse: the solve ``(H + δI)⁻¹ ∇L_test`` it rests on.
    """

    scores: Tensor
    inverse: InverseResult


def influence(
    op: SymmetricOperator,
    test_gradient: Tensor,
    train_gradients: Tensor,
    damping: float = 0.0,
    **options,
) -> InfluenceResult:
    """Influence scores of ``N`` training gradients ``[N, P]`` on one test gradient ``[P]``."""
    inverse = solve_damped(op, test_gradient, damping, **options)
    return InfluenceResult(scores=-(train_gradients @ inverse.solution), inverse=inverse)
