"""The diagonal of a damped inverse, ``diag((G + δI)⁻¹)``: a Laplace posterior's variances.

With ``G`` a curvature matrix (a GGN, a Fisher, a Hessian) and ``δ`` the prior
precision, ``Σ = (G + δI)⁻¹`` is the Laplace approximation's posterior covariance, and its
diagonal the marginal variance of each parameter. Two methods:

* ``"dense"`` — exact: ``G`` formed by ``P`` products (blocks of columns), then
  ``Σ_k v_k² / (λ_k + δ)`` from its eigendecomposition. For small ``P``.
* ``"probes"`` — the stochastic estimator of Bekas, Kokiopoulou and Saad (2007) applied to
  the inverse: ``diag(A⁻¹) ≈ (1/n) Σᵢ zᵢ ⊙ A⁻¹zᵢ`` with Rademacher ``zᵢ`` (unbiased; entry
  ``j``'s variance per probe is ``Σ_{k≠j} (A⁻¹)_jk²``), each ``A⁻¹zᵢ`` by conjugate
  gradients (:func:`solve_damped`). Its error estimate is the per-entry standard error of
  the probes; the solves' residuals are reported beside it.

Both need ``G + δI`` symmetric positive definite (a covariance): an indefinite system is
refused, and so is a non-symmetric ``G`` — its asymmetry ``|uᵀGv − vᵀGu|`` measured on the
formed matrix (dense) or on two probes (2 products), and refused above what rounding and
solves explain (1e-6 of ``‖G‖`` in float64, 1e-3 in float32). The dense method would
otherwise diagonalise ``(G + Gᵀ)/2`` as if it were ``G``, and both would call a
non-symmetric ``G`` "not positive definite". Every product counts against ``max_hvps``;
when the cap runs out within a probe's solve, that probe is dropped and the estimate uses
those done (``num_probes`` says how many).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConvergenceError, InputError
from ..options import integer
from .accuracy import check_symmetric, require_symmetric_matrix
from .base import (
    Counted,
    SymmetricOperator,
    checked_operator,
    generator,
    rademacher,
    seed_value,
    warn_few_probes,
)
from .inverse import InverseStatus, _damped_solution, damping_value

__all__ = ["InverseDiagonalResult", "inverse_diagonal"]

#: ``method="auto"`` forms the matrix up to this size.
DENSE_LIMIT = 1024
#: what a standard error from few probes is worth, measured on a DEQ loss curvature
_MEASURED = (
    "with 2 probes the true variance lay within ±1 standard error in 50% of entries, not "
    "68%, and outside ±3 in 24%"
)


_NO_COVARIANCE = "G + δI is no covariance (nor its inverse's diagonal a variance)"


@dataclass(frozen=True)
class InverseDiagonalResult:
    """An estimate of ``diag((G + δI)⁻¹)``.

    Attributes:
        estimate: ``[P]``.
        std_error: ``[P]`` the probes' per-entry standard error (sampling error of the
            operator as computed); zeros for ``"dense"``, which is exact to rounding.
        method: ``"dense"`` or ``"probes"``.
        num_probes: probes used (0 for ``"dense"``).
        num_hvps: products of the operator used.
        max_residual: the largest relative residual of the probes' solves (0 for dense).
    """

    estimate: Tensor
    std_error: Tensor
    method: str
    num_probes: int
    num_hvps: int
    max_residual: float


def inverse_diagonal(
    op: SymmetricOperator,
    damping: float | Tensor,
    *,
    method: str = "auto",
    num_probes: int = 64,
    tol: float = 1e-6,
    max_hvps: int | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
) -> InverseDiagonalResult:
    """``diag((G + δI)⁻¹)`` for a symmetric operator ``G`` of size ``P``.

    Args:
        op: the operator (e.g. ``curvature.ggn_operator()``).
        damping: ``δ > 0`` (a prior precision): a real number or a 0-dim tensor.
        method: ``"dense"``, ``"probes"`` or ``"auto"`` (dense up to :data:`DENSE_LIMIT`
            and within ``max_hvps``).
        num_probes: Rademacher probes for ``"probes"`` (at least 2; a warning when
            fewer than 4 are behind the standard error, the cap included).
        tol: relative residual of each probe's CG solve.
        max_hvps: cap on products (default: ``P`` for dense; for probes
            ``2 + num_probes · min(2P, 1000)``, the 2 checking symmetry).
        seed: the probes' seed (an int); None draws fresh, unrepeatable probes.
        progress: a progress bar of products (None: only on a terminal).

    Refused with :class:`deqhess.InputError` when ``G`` is not symmetric or ``G + δI``
    not positive definite, and with :class:`deqhess.ConvergenceError` when the cap does
    not allow the dense method or a probe's solve does not reach ``tol`` within it.

    Returns:
        The estimate ``[P]``, its per-entry standard error (zeros for ``"dense"``), the
        method, probes and products used, and the largest residual of the solves.

    Raises:
        InputError: ``damping`` not a real number (a 0-dim tensor is one) or ``≤ 0``, an
            unknown ``method``, ``num_probes < 2``, a non-symmetric ``G`` or an
            indefinite ``G + δI``.
    """
    size = checked_operator(op, "inverse_diagonal")
    damping = damping_value(damping)
    seed = seed_value(seed)
    if not damping > 0:
        raise InputError(f"damping must be > 0 (a prior precision); got {damping!r}.")
    if method not in ("auto", "dense", "probes"):
        raise InputError(f"unknown method {method!r}; use 'auto', 'dense' or 'probes'.")
    if method == "auto":
        method = (
            "dense"
            if size <= DENSE_LIMIT and (max_hvps is None or size <= max_hvps)
            else ("probes")
        )
    if method == "dense":
        return _dense(op, damping, max_hvps, progress)
    if integer(num_probes, "num_probes") < 2:
        raise InputError(f"num_probes must be >= 2 for an error estimate; got {num_probes}.")
    result = _probes(op, damping, num_probes, tol, max_hvps, seed, progress)
    warn_few_probes(result.num_probes, _MEASURED, "use num_probes >= 30 (and max_hvps for them)")
    return result


def _dense(
    op: SymmetricOperator, damping: float, max_hvps: int | None, progress: bool | None
) -> InverseDiagonalResult:
    size = op.shape[0]
    if max_hvps is not None and size > max_hvps:
        raise ConvergenceError(
            f"method='dense' forms G with {size} products, above max_hvps={max_hvps}: raise "
            "the cap or use method='probes'."
        )
    eye = torch.eye(size, dtype=op.dtype, device=op.device)
    with Counted(op, size, progress, "inverse diagonal (dense)") as counted:
        columns = [counted.matmat(eye[:, i : i + 256]) for i in range(0, size, 256)]
    matrix = torch.cat(columns, dim=1)
    require_symmetric_matrix(matrix, "G", _NO_COVARIANCE)
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    shifted = values + damping
    _require_definite(float(shifted.min()), damping)
    estimate = (vectors**2 / shifted).sum(1)
    zeros = torch.zeros_like(estimate)
    return InverseDiagonalResult(estimate, zeros, "dense", 0, counted.products, 0.0)


def _probes(
    op: SymmetricOperator,
    damping: float,
    num_probes: int,
    tol: float,
    max_hvps: int | None,
    seed: int,
    progress: bool | None,
) -> InverseDiagonalResult:
    size = op.shape[0]
    per_solve = min(2 * size, 1000)
    checked = check_symmetric(op, "G", _NO_COVARIANCE, seed)
    budget = checked + num_probes * per_solve if max_hvps is None else max_hvps
    probes = rademacher(size, num_probes, generator(seed), op)
    samples, used, worst = [], checked, 0.0
    for i in range(num_probes):
        left = budget - used
        if left < 2:
            break
        cap = min(per_solve, left - 1)  # one product more checks the residual
        result = _damped_solution(
            op, probes[:, i], damping, "cg", tol, cap, progress, require_convergence=False
        )  # its status is read below; G's symmetry was checked above
        used += result.num_hvps
        if result.status is InverseStatus.NEGATIVE_CURVATURE:
            _require_definite(result.curvature, damping)
        if result.status is InverseStatus.MAX_ITER and cap < per_solve:
            break  # the budget ran out within this probe: keep the probes done
        if not result.converged:
            raise ConvergenceError(
                f"inverse_diagonal: probe {i}'s CG solve ended with relative residual "
                f"{result.residual:.2e} ({result.status.value}) after {result.num_hvps} "
                f"products. {result.status.advice}"
            )
        worst = max(worst, result.residual)
        samples.append(probes[:, i] * result.solution)
    if len(samples) < 2:
        raise ConvergenceError(
            f"inverse_diagonal: max_hvps={max_hvps} allowed fewer than two probes' solves; "
            "raise it."
        )
    stacked = torch.stack(samples, dim=1)
    count = stacked.shape[1]
    return InverseDiagonalResult(
        estimate=stacked.mean(1),
        std_error=stacked.std(1) / count**0.5,
        method="probes",
        num_probes=count,
        num_hvps=used,
        max_residual=worst,
    )


def _require_definite(curvature: float | None, damping: float) -> None:
    if curvature is not None and curvature <= 0:
        raise InputError(
            f"G + δI is not positive definite (a curvature of {curvature:.3e} with δ = "
            f"{damping:g}), so it is no covariance: use a positive semi-definite G (a GGN "
            "or Fisher rather than the Hessian) or a damping above −λ_min(G)."
        )
