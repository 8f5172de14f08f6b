"""Extreme eigenpairs by Lanczos: ARPACK's implicitly restarted Lanczos via ``eigsh``.

``scipy.sparse.linalg.eigsh`` is used rather than a hand-written Lanczos: it restarts
implicitly (bounded memory of ``ncv`` vectors), keeps the basis orthogonal, and stops
on a residual test — everything a from-scratch Lanczos with full reorthogonalisation
would do, well kept and widely trusted. Each eigenpair's residual ``‖H v − λ v‖`` is
recomputed afterwards (one block product) as its error bound — a bound against the
eigenvalues of the operator *as computed* (its dtype, its inexact fixed point and
solves), not of the exact Hessian: add the operator's own error
(:func:`deqhess.curvature.operator_accuracy`), or bound against a float64 reference
with :meth:`EigenResult.residuals_against`. Operators of at most
``dense_below`` rows (ARPACK is unreliable when ``P`` is close to ``k``) are formed
densely with ``P`` products and diagonalised exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import Tensor

from ..errors import ConvergenceError
from .base import Counted, SymmetricOperator

__all__ = ["EigenResult", "extreme_eigenpairs"]

_WHICH = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs, ascending.

    Attributes:
        eigenvalues: ``[k]``.
        eigenvectors: ``[P, k]``, orthonormal columns.
        residuals: ``[k]`` ``‖H v − λ v‖`` with ``H`` the operator as computed: some
            eigenvalue of that operator lies within it of ``λ``. It says nothing of how
            far that operator is from the exact Hessian (in float32 usually much
            further: see :func:`deqhess.curvature.operator_accuracy`).
        num_hvps: Hessian-vector products used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_hvps: int

    def residuals_against(self, reference: SymmetricOperator) -> Tensor:
        """``[k]`` ``‖H_ref v − λ v‖`` (float64): some eigenvalue of ``reference`` — the
        same operator computed more accurately, e.g. the problem rebuilt in float64 —
        lies within it of ``λ``. ``k`` products of ``reference``."""
        vectors = self.eigenvectors.to(reference.dtype).to(reference.device)
        values = self.eigenvalues.to(reference.dtype).to(reference.device)
        residual = reference.matmat(vectors) - vectors * values
        return torch.linalg.vector_norm(residual.double(), dim=0).cpu()


def extreme_eigenpairs(
    op: SymmetricOperator,
    k: int = 5,
    which: str = "largest",
    tol: float = 1e-10,
    max_iter: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    dense_below: int = 256,
) -> EigenResult:
    """The ``k`` largest, smallest or largest-magnitude eigenpairs of a symmetric operator.

    Args:
        which: ``"largest"`` (top), ``"smallest"`` (bottom; H may be indefinite) or
            ``"magnitude"``.
        tol: ARPACK's relative accuracy for the Ritz values.
        max_iter: cap on restarts (ARPACK's ``maxiter``).
        seed: seeds the starting vector.
        dense_below: form the matrix and use ``eigh`` when ``P`` is at most this.

    Raises:
        ConvergenceError: ARPACK did not converge (raise ``max_iter`` or ``tol``).
    """
    if which not in _WHICH:
        raise ValueError(f"unknown which={which!r}; use one of {sorted(_WHICH)}.")
    size = op.shape[0]
    if not 1 <= k < size:
        raise ValueError(f"k must lie in [1, P) = [1, {size}); got {k}.")
    if size <= dense_below:
        counted = Counted(op, size, progress, "dense eigh")
        eye = torch.eye(size, dtype=op.dtype, device=op.device)
        matrix = counted.matmat(eye)
        counted.close()
        all_values, all_vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
        pick = {
            "largest": torch.arange(size - k, size),
            "smallest": torch.arange(k),
            "magnitude": torch.argsort(all_values.abs())[-k:],
        }[which]
        values, vectors = all_values[pick].cpu().numpy(), all_vectors[:, pick].cpu().numpy()
    else:
        counted = Counted(op, None, progress, f"Lanczos ({which} {k})")
        start = np.random.default_rng(seed).standard_normal(size)
        try:
            values, vectors = eigsh(
                counted.to_scipy(), k=k, which=_WHICH[which], tol=tol, maxiter=max_iter, v0=start
            )
        except ArpackNoConvergence as error:
            raise ConvergenceError(
                f"Lanczos (ARPACK) found {len(error.eigenvalues)} of {k} eigenvalues after "
                f"{counted.products} HVPs; raise max_iter or loosen tol."
            ) from error
        finally:
            counted.close()
    order = np.argsort(values)
    eigenvalues = torch.as_tensor(values[order], dtype=op.dtype, device=op.device)
    eigenvectors = torch.as_tensor(vectors[:, order], dtype=op.dtype, device=op.device)
    residual = op.matmat(eigenvectors) - eigenvectors * eigenvalues
    return EigenResult(
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        residuals=torch.linalg.vector_norm(residual, dim=0),
        num_hvps=counted.products + k,
    )
