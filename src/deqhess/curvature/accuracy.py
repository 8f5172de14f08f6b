"""How far an operator, as computed, may be from the exact Hessian (or one of its parts).

Every error estimate of the analyses — a Lanczos residual, a trace's standard error, a
solve's residual — is about the operator **as computed**: in its dtype, at the fixed
point the forward solver reached, with its linear solves. They do not see that operator's
own error, which in float32 is usually the larger one (the fixed point is solved to 1e-5
by default). :func:`operator_accuracy` estimates it, cheaply, from three sources:

* **state error** — the fixed point is inexact: ``δh ≈ (I − J)⁻¹ (f(h) − h)``, so
  ``‖δh‖/‖h‖ ≲ ‖(I − J)⁻¹‖ · ‖f(h) − h‖ / ‖h‖`` (the inverse's norm, not the condition
  number: a sample with ``J`` near 1 amplifies its residual 1/(1 − J)-fold though its
  scalar system has condition 1); derivatives at ``h`` move by about as much, relative.
  Not so for what scales with the adjoint λ (the dynamics curvature)
  when ``∇ₕL`` is small (near a minimum of the loss in h): λ's relative error is then larger,
  and so is that part's. No products needed. This error leaves the operator symmetric
  (it is the exact Hessian at a nearby point), so nothing computed from the operator
  alone can see it.
* **asymmetry** — ``|uᵀHv − vᵀHu|`` on random probes, zero for the exact symmetric
  operator: it sees rounding and linear-solve errors (not symmetric), from ``k``
  products for ``k(k−1)/2`` pairs.
* **reference error** — when the same operator is available in higher precision
  (the problem rebuilt in float64): ``‖(H − H_ref) u‖`` on the probes, a measurement of
  the whole error rather than an estimate.

On the test problems in float32 (tests/curvature/test_accuracy.py) the asymmetry was
70–1,400× below the true error, the state error 1.2–1.9× of it (0.6× on a linear DEQ's
Hessian) — except 30× below on the dynamics curvature of a linear DEQ near a minimum of
its loss in h — and the float64 reference 1.0–2.7×. So the
estimate without a reference is an order of magnitude, not a bound; ``deqhess analyze``
measures against float64 for float32 analyses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import InputError
from ..implicit.dataset import BatchSolve
from ..linear.accuracy import warning_threshold
from .base import Counted, SymmetricOperator, checked_operator, count, generator

if TYPE_CHECKING:
    from ..implicit import Equilibrium

__all__ = [
    "OperatorAccuracy",
    "check_symmetric",
    "operator_accuracy",
    "relative_asymmetry",
    "require_symmetric",
    "require_symmetric_matrix",
    "state_error",
]


@dataclass(frozen=True)
class OperatorAccuracy:
    """Estimates of an operator's relative error ``‖H_computed − H_exact‖ / ‖H‖``.

    Attributes:
        scale: ``max ‖H u‖ / ‖u‖`` over the probes, the ``‖H‖`` the relative figures
            divide by (at most ``‖H‖₂``, so they err on the large side).
        asymmetry: ``max |uᵢᵀHuⱼ − uⱼᵀHuᵢ| / (‖uᵢ‖‖uⱼ‖ · scale)`` over probe pairs.
        state_error: ``‖(I − J)⁻¹‖ · ‖f(h) − h‖ / ‖h‖``, largest over the equilibria,
            or None when none were given.
        condition_known: whether ``state_error`` used ``‖(I − J)⁻¹‖`` — from a dense
            LU once formed, or GMRES's estimate once it has solved (a lower bound);
            without it (Neumann solves) the figure is ``‖f(h) − h‖ / ‖h‖``, an
            underestimate.
        reference_error: ``max ‖(H − H_ref) u‖ / (‖u‖ · scale)`` against a reference
            operator, or None.
        num_hvps: products of the operator used; ``reference_hvps`` of the reference.
    """

    scale: float
    asymmetry: float
    state_error: float | None
    condition_known: bool
    reference_error: float | None
    num_hvps: int
    reference_hvps: int = 0

    @property
    def estimate(self) -> float:
        """The relative error to quote.

        The measured reference error when there is one, else the larger of the state
        error and the asymmetry.
        """
        if self.reference_error is not None:
            return self.reference_error
        return max(self.asymmetry, self.state_error or 0.0)

    def describe(self) -> str:
        """One line for a report.

        With neither a state error nor a reference, only the asymmetry is known, which
        does not see the fixed points' own error (in float32 usually the larger, up to
        1,400× the asymmetry): the line says so, and what to pass.

        Returns:
            The figures known, in words.
        """
        if self.state_error is None and self.reference_error is None:
            return (
                f"asymmetry {self.asymmetry:.1e}: a lower bound only — it does not see the "
                "fixed points' own error (in float32 usually far larger); pass "
                "equilibria= for the state error, or a float64 reference= to measure it"
            )
        parts = [f"relative error ≈ {self.estimate:.1e}"]
        if self.state_error is not None:
            how = "‖(I − J)⁻¹‖·‖f(h) − h‖/‖h‖" if self.condition_known else "‖f(h) − h‖/‖h‖"
            parts.append(f"state {self.state_error:.1e} ({how})")
        parts.append(f"asymmetry {self.asymmetry:.1e}")
        if self.reference_error is not None:
            parts.append(f"measured against float64 {self.reference_error:.1e}")
        return "; ".join(parts)


def state_error(equilibria: Sequence[Equilibrium | BatchSolve]) -> tuple[float, bool]:
    """The relative error of the fixed points, amplified by ``‖(I − J)⁻¹‖``.

    ``‖(I − J)⁻¹‖`` comes from a dense LU once formed, else the estimate GMRES made
    during its solves (``info.linear_solves.inverse_norm``, a lower bound); where neither
    is known the factor 1 is used.

    Args:
        equilibria: the equilibria, or a data set's ``batch_solves`` (a batch whose
            samples were all left out has no state in the operator and is skipped).

    Returns:
        ``(error, known)``: ``max ‖(I − J)⁻¹‖ · ‖f(h) − h‖₂ / ‖h‖₂`` over the equilibria,
        and whether every ``‖(I − J)⁻¹‖`` was known.
    """
    worst, known = 0.0, True
    for eq in equilibria:
        if isinstance(eq, BatchSolve) and eq.samples == 0:  # every sample left out
            continue
        info = eq.info
        residual = float(torch.linalg.vector_norm(info.sample_residuals.double()))
        if isinstance(eq, BatchSolve):
            norm, dtype = eq.state_norm, eq.dtype
        else:
            norm, dtype = float(torch.linalg.vector_norm(eq.h.double())), eq.h.dtype
        amplification = info.inverse_norm
        if amplification is None and info.linear_solves is not None:
            amplification = info.linear_solves.inverse_norm  # GMRES's estimate
        finite = amplification is not None and math.isfinite(amplification)
        known = known and finite
        factor = amplification if amplification is not None and finite else 1.0
        worst = max(worst, factor * residual / max(norm, torch.finfo(dtype).tiny))
    return worst, known


def relative_asymmetry(gram: Tensor, norms: Tensor, scale: float) -> float:
    """``max |uᵢᵀHuⱼ − uⱼᵀHuᵢ| / (‖uᵢ‖‖uⱼ‖ · scale)``: zero for a symmetric operator.

    Args:
        gram: ``[n, n]`` ``uᵢᵀ H uⱼ`` (with the unit vectors for probes: ``H`` itself).
        norms: ``[n]`` ``‖uᵢ‖``.
        scale: the operator's scale (e.g. ``max ‖H uᵢ‖ / ‖uᵢ‖``).

    Returns:
        The largest asymmetry over the pairs, relative to ``scale``.
    """
    return float(((gram - gram.T).abs() / (norms[:, None] * norms[None])).max()) / scale


def operator_accuracy(
    op: SymmetricOperator,
    equilibria: Sequence[Equilibrium | BatchSolve] | None = None,
    reference: SymmetricOperator | None = None,
    num_probes: int = 4,
    seed: int | None = 0,
    progress: bool | None = None,
) -> OperatorAccuracy:
    """Estimate how far ``op`` (as computed) is from the exact operator.

    Args:
        op: the operator, e.g. ``data.hessian_operator(part)`` in float32.
        equilibria: the equilibria it was built on (``[eq]``, or a data set's
            ``batch_solves``), for the state error.
        reference: the same operator computed more accurately (the problem rebuilt in
            float64); its products are compared on the probes.
        num_probes: Gaussian probes (``≥ 2``): exactly ``num_probes`` products of ``op``
            (and of ``reference``), as one block — the whole cost; no iteration.
        seed: the probes' random seed (an int); None draws fresh, unrepeatable probes.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        The asymmetry ``|uᵢᵀ H uⱼ − uⱼᵀ H uᵢ|`` over the probes, the state error (with
        ``equilibria``) and the error against ``reference`` (with one), each relative to
        the operator's scale, and the products used.

    Raises:
        InputError: ``num_probes`` not an int or below 2, or ``reference`` of another
            shape.
    """
    checked_operator(op, "operator_accuracy", symmetric=False)
    num_probes = count(num_probes, "num_probes", 2, "operator_accuracy", " (pairs)")
    if reference is not None and reference.shape != op.shape:
        raise InputError(f"the reference operator has shape {reference.shape}; op has {op.shape}.")
    g = generator(seed)
    probes = torch.randn(op.shape[0], num_probes, generator=g, dtype=torch.float64)
    with Counted(op, num_probes, progress, "operator accuracy", hold=False) as counted:
        products = counted.matmat(probes.to(op.dtype).to(op.device)).double().cpu()
    norms = torch.linalg.vector_norm(probes, dim=0)
    scale = float((torch.linalg.vector_norm(products, dim=0) / norms).max())
    scale = scale if scale > 0 else 1.0
    asymmetry = relative_asymmetry(probes.T @ products, norms, scale)
    reference_error, reference_hvps = None, 0
    if reference is not None:
        exact = reference.matmat(probes.to(reference.dtype).to(reference.device)).double().cpu()
        reference_error = float((torch.linalg.vector_norm(products - exact, dim=0) / norms).max())
        reference_error /= scale
        reference_hvps = num_probes
    state, known = (None, False) if equilibria is None else state_error(equilibria)
    return OperatorAccuracy(
        scale=scale,
        asymmetry=asymmetry,
        state_error=state,
        condition_known=known,
        reference_error=reference_error,
        num_hvps=counted.products,
        reference_hvps=reference_hvps,
    )


def require_symmetric(asymmetry: float, dtype: torch.dtype, name: str, why: str) -> None:
    """Refuse an operator whose asymmetry is above what its dtype's rounding explains.

    Args:
        asymmetry: :func:`relative_asymmetry` of its products.
        dtype: its products' dtype (sets the threshold, :func:`warning_threshold`).
        name: what the message calls it (e.g. ``"G"``).
        why: what a non-symmetric operator breaks, for the message.

    Raises:
        InputError: the asymmetry is above 1e-6 (float64) / 1e-3 (float32).
    """
    threshold = warning_threshold(dtype)
    if asymmetry > threshold:
        raise InputError(
            f"{name} is not symmetric: |uᵀ{name}v − vᵀ{name}u| reaches {asymmetry:.1e}·‖{name}‖·"
            f"‖u‖‖v‖, above the {threshold:.0e} that rounding and solves explain in {dtype}, "
            f"so {why}: pass a symmetric operator (a GGN, Fisher or Hessian; symmetrise your "
            f"own as ({name} + {name}ᵀ)/2). If {name} is symmetric, its products are that "
            "inexact: tighten its solves (see deqhess.curvature.operator_accuracy)."
        )


def require_symmetric_matrix(matrix: Tensor, name: str, why: str) -> None:
    """Refuse a formed ``[P, P]`` operator matrix whose asymmetry is above rounding.

    The asymmetry is measured on every pair of unit vectors (``|Aᵢⱼ − Aⱼᵢ|`` against the
    largest column norm) and refused by :func:`require_symmetric` (an
    :class:`deqhess.InputError`).

    Args:
        matrix: the operator's columns, ``[P, P]``.
        name: what the message calls it (e.g. ``"H"``).
        why: what a non-symmetric operator breaks, for the message.
    """
    wide = matrix.double().cpu()
    scale = float(torch.linalg.vector_norm(wide, dim=0).max())
    units = torch.ones(matrix.shape[0], dtype=torch.float64)
    require_symmetric(relative_asymmetry(wide, units, scale or 1.0), matrix.dtype, name, why)


def check_symmetric(op: SymmetricOperator, name: str, why: str, seed: int = 0) -> int:
    """Refuse an operator measured not to be symmetric.

    One block of two Gaussian probes (:func:`operator_accuracy`): cheap, and enough to
    see an asymmetry above rounding with probability 1; refused by
    :func:`require_symmetric` (an :class:`deqhess.InputError`). An operator that says
    ``symmetric=False`` was refused before, by
    :func:`deqhess.curvature.base.checked_operator`.

    Args:
        op: the operator.
        name: what the message calls it (e.g. ``"H"``).
        why: what a non-symmetric operator breaks, for the message.
        seed: the probes' seed.

    Returns:
        The products used (2).
    """
    measured = operator_accuracy(op, num_probes=2, seed=seed, progress=False)
    require_symmetric(measured.asymmetry, op.dtype, name, why)
    return measured.num_hvps
