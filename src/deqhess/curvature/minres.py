"""MINRES on ``(H + δI) d = r``, stopping on the residual relative to ``‖b‖`` asked for.

Paige and Saunders' MINRES (SIAM J. Numer. Anal. 12, 1975) for a symmetric, possibly
indefinite or singular ``A = H + δI``: Lanczos builds ``A V_k = V_{k+1} T_k``, a QR of
the tridiagonal ``T_k`` by plane rotations gives the ``x_k`` minimising ``‖b − A x_k‖``
over the Krylov space, and ``φ_k = ‖b − A x_k‖`` is carried along without a product.

Written here rather than calling ``scipy.sparse.linalg.minres`` because SciPy stops on
two tests relative to its own estimate of ``‖A‖`` (the Frobenius norm of ``T_k``, which
grows with ``k``): ``‖r‖ ≤ rtol ‖A‖‖x‖`` stopped 10–100× above ``‖r‖ ≤ tol ‖b‖``, and
restarting on the residual with a looser ``rtol`` made its least-squares test
``‖A r‖ ≤ rtol ‖A‖‖r‖`` fire at once wherever the residual sat on the small eigenvalues —
every solve of a diagonal system of condition 10³ was then reported singular.

Here the run stops when ``φ_k ≤ threshold`` (converged), or when
``‖A r_k‖ ≤ max(tol, √ε) · ‖A‖ · ‖r_k‖`` with ``φ_k`` still above it (singular): what is
left of the residual lies where ``A`` is below that fraction of ``‖A‖``, i.e. in its null
space (``b`` is not in the range) or on eigenvalues too small for ``tol`` in this dtype.
On a system of condition ``κ``, ``‖A r‖ ≥ ‖r‖ ‖A‖ / κ``, so this never fires while
``κ < 1 / max(tol, √ε)``. The ``√ε`` (1.5e-8 in float64, 3.5e-4 in float32) is where
Lanczos without reorthogonalisation loses semi-orthogonality: below it, on a singular
system, the iterate was measured growing to 1e11 while ``φ_k`` stood still. ``‖A‖`` is
estimated from below by the largest column of ``T_k`` (as in MINRES-QLP), so the test
errs towards going on. On a singular system the iterate is then a least-squares
solution, not the minimum-norm one: rounding leaves components in the null space
(measured: as large as the solution itself).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SymmetricOperator

__all__ = ["MinresOutcome", "MinresRun", "minres"]


class MinresOutcome(enum.Enum):
    """How one MINRES run ended."""

    CONVERGED = "converged"  # φ_k ≤ threshold (the running residual, not a recomputed one)
    SINGULAR = "singular"  # ‖A r_k‖ ≤ max(tol, √ε) ‖A‖ ‖r_k‖, φ_k above the threshold
    MAX_ITER = "max_iter"  # out of products


@dataclass(frozen=True)
class MinresRun:
    """One MINRES run on ``A d = r``.

    Attributes:
        solution: ``d`` ``[P]``.
        residual: ``φ_k``, its running estimate of ``‖r − A d‖`` (not recomputed).
        outcome: how it ended.
        products: products of ``H`` used.
    """

    solution: Tensor
    residual: float
    outcome: MinresOutcome
    products: int


def minres(
    op: SymmetricOperator,
    rhs: Tensor,
    damping: float,
    threshold: float,
    tol: float,
    max_products: int,
) -> MinresRun:
    """Solve ``(H + δI) d = rhs`` by MINRES until ``‖rhs − (H + δI) d‖ ≤ threshold``.

    Args:
        op: the symmetric operator ``H`` (``P × P``).
        rhs: ``[P]``, nonzero.
        damping: ``δ``.
        threshold: the residual norm to reach (absolute).
        tol: the relative residual asked for; ``‖A r‖ / (‖A‖‖r‖)`` below
            ``max(tol, √ε)`` means a singular system.
        max_products: the most products of ``H`` to use (at least 1).

    Returns:
        A :class:`MinresRun`.
    """

    def apply(v: Tensor) -> Tensor:
        return op.matmat(v[:, None])[:, 0] + damping * v

    floor = max(tol, math.sqrt(torch.finfo(rhs.dtype).eps))
    beta1 = float(torch.linalg.vector_norm(rhs))
    x = torch.zeros_like(rhs)
    w = w1 = w2 = torch.zeros_like(rhs)
    r1 = r2 = y = rhs
    beta, old_beta = beta1, 0.0
    cs, sn, dbar, epsln = -1.0, 0.0, 0.0, 0.0
    phibar, norm_a = beta1, 0.0
    for k in range(1, max_products + 1):
        # Lanczos: A v_k = β_k v_{k−1} + α_k v_k + β_{k+1} v_{k+1}
        v = y / beta
        y = apply(v)
        if k >= 2:
            y = y - (beta / old_beta) * r1
        alfa = float(v @ y)
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, float(torch.linalg.vector_norm(y))
        below = old_beta if k >= 2 else 0.0  # β_1 = ‖rhs‖ is no entry of T_k
        norm_a = max(norm_a, math.sqrt(below**2 + alfa**2 + beta**2))
        # apply the previous rotation, then the one eliminating β_{k+1}
        old_eps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        root = math.hypot(gbar, dbar)  # ‖A r_{k−1}‖ / ‖r_{k−1}‖
        gamma = math.hypot(gbar, beta)
        if gamma == 0:  # an invariant Krylov space on which A is singular: x_{k−1} is final
            return MinresRun(x, phibar, MinresOutcome.SINGULAR, k)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - old_eps * w1 - delta * w2) / gamma
        x = x + phi * w
        if phibar <= threshold:
            return MinresRun(x, phibar, MinresOutcome.CONVERGED, k)
        if root <= floor * norm_a:  # r_{k−1}, above the threshold, is (nearly) in A's null space
            return MinresRun(x, phibar, MinresOutcome.SINGULAR, k)
    return MinresRun(x, phibar, MinresOutcome.MAX_ITER, max_products)
