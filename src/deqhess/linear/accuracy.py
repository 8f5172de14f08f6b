"""The derivatives' own error bound at a fixed point, and what deqhess does with it.

Every derivative at ``h*`` solves with ``A = I − J``. The forward solve leaves a residual
``r = f(h) − h`` in ``h*``, which the fixed point's error carries amplified by ``A⁻¹``
(``δh = A⁻¹ r`` to first order); an iterative linear solve leaves its own residual,
amplified alike. So the derivatives' relative error is about

    ``‖(I − J)⁻¹‖ · max(r_forward, r_linear, ε)``,

``r_forward`` the relative residual the forward solve left (``‖r‖ / ‖h‖`` per row, the
residual capped at its row's threshold ``max(atol, rtol·‖h‖)``: ``rtol`` or less where
``rtol`` stopped the solve, and more where ``atol`` did — a state of norm 1e-8 stopped by
``atol = 1e-10`` keeps 1e-2 of it, which had been reported as ``rtol``) and ``r_linear``
the largest relative residual of the iterative solves. ``‖(I − J)⁻¹‖`` comes
from the dense LU (LAPACK ``gecon``) or, matrix-free, from GMRES's Hessenberg matrices (a
lower bound: GMRES's solves, and ten Arnoldi steps from the forward residual, where the
fixed point's own error lies) or a Neumann series' contraction rate (``1/(1 − ρ)``, an
estimate); before a solve has estimated it there is no bound — which the
:class:`ErrorBound` says rather than inventing one. Above :func:`warning_threshold`
(1e-6 relative in float64, 1e-3 in float32) an :class:`deqhess.AccuracyWarning` gives the
figure; above ``max_error_bound`` (default :data:`DEFAULT_MAX_ERROR_BOUND` = 0.1: no
correct digit left) the solve is refused with :class:`deqhess.SingularSystemError`.

Near a fold — a fixed point where ``I − J`` is (nearly) singular at ``h*`` itself, so that
the derivatives stop existing there — that first-order account fails: ``I − J`` changes
between the point solved and ``h*`` by as much as it is, and a finite answer carries no
correct digit. So wherever accuracy is watched (:class:`deqhess.Equilibrium`,
:class:`deqhess.ModelCurvature`, ``layer_calls(watch_accuracy=True)``), the bound adds
the second-order term

    ``q = ‖(I − J)⁻¹ (J(h + δ) − J(h)) δ‖ / ‖δ‖``,  ``δ = (I − J)⁻¹ r`` (one Newton step),

how much ``I − J`` changes, relative to itself, along the way to ``h*`` (largest over the
rows declared independent; one JVP and two solves, once per factorisation — one kept
between passes keeps it). A map linear in ``h`` gives ``q = 0``; a fold gives ``q`` near
0.5 or more whatever its sharpness, and the solve is refused. A gate on
``‖(I − J)⁻¹‖² · r`` had missed sharp folds: that figure is ``1/(4a‖h‖)`` at a fold of
curvature ``a``. Not measured inside ``torch.func`` transforms (nor is the first-order
bound's forward residual), nor for an ``f`` without forward-mode derivatives solved
iteratively.

It bounds the state's error; the derivatives' is of the same scale but not strictly
below it — the state's error enters ``∇L``, ``∂f/∂θ`` and ``J`` at once, and
``‖(I − J)⁻¹‖`` is itself estimated (``gecon`` and GMRES from below). On the linear DEQs
of tests/implicit/test_error_bound.py the gradient's and the HVP's errors were 1.8–4×
the figure; the thresholds leave room for that. ``r_forward`` is the largest over the
rows, so the bound holds for a loss that reads only the sample of smallest norm; a loss
reading the larger ones sees it above its error (20–80× on a batch whose rows differ 8×
in norm, each stopped by ``atol``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..callers import user_stacklevel
from ..errors import AccuracyWarning, SingularSystemError
from ..options import real
from ..solvers import Tolerance

__all__ = [
    "DEFAULT_MAX_ERROR_BOUND",
    "ErrorBound",
    "check_max_error_bound",
    "forward_residual",
    "warning_threshold",
]

#: above this relative error bound the derivatives keep no correct digit: refused.
DEFAULT_MAX_ERROR_BOUND = 0.1
#: a second-order term this large (``I − J`` changing by a tenth of itself on the way to
#: ``h*``) is named a fold in the messages
FOLD = 0.1
_WARN_ABOVE = {torch.float64: 1e-6, torch.float32: 1e-3}


def warning_threshold(dtype: torch.dtype) -> float:
    """The error bound above which an :class:`deqhess.AccuracyWarning` is given.

    Returns:
        1e-6 in float64, 1e-3 in float32 (about ``10⁴`` ulps: ordinary conditioning
        stays below).
    """
    return _WARN_ABOVE.get(dtype, 1e-3)


def check_max_error_bound(value: object) -> float:
    """``max_error_bound`` checked: a number ``>= 0`` (``inf`` turns the refusal off).

    Refused with :class:`deqhess.InputError` when it is not a number, NaN or negative.

    Returns:
        The bound as a float.
    """
    return real(
        value,
        "max_error_bound",
        minimum=0.0,
        allow_inf=True,
        meaning="It is the largest relative error bound ‖(I − J)⁻¹‖·(residual left) "
        "accepted before a solve is refused; default 0.1, inf never refuses.",
    )


def forward_residual(accepted: Tensor, h: Tensor, tolerance: Tolerance) -> float:
    """``r_forward``, the relative residual the forward solve left.

    Each row's residual relative to that row's norm, as the bound is relative: where
    ``atol`` stopped the solve (a state of small norm), that is above ``rtol``. A row the
    solve could not converge counts as its threshold ``max(atol, rtol·‖h‖)`` (its own
    failure is reported by the forward solve's policy, not here), and a residual as large
    as its row counts as 1 (no correct digit).

    Args:
        accepted: each row's residual norm ``‖f(h) − h‖`` when the solve stopped ``[S]``.
        h: the fixed point's rows ``[S, d]``.
        tolerance: the forward solve's stopping rule.

    Returns:
        ``min(‖r_row‖, threshold_row) / max(‖h_row‖, that)``, largest over the rows (0 for
        none).
    """
    if not accepted.numel():
        return 0.0
    scale = torch.linalg.vector_norm(h, dim=-1)  # ‖f(h)‖ up to the residual itself
    left = torch.minimum(accepted.to(scale), tolerance.threshold(scale))
    relative = left / torch.maximum(scale, left).clamp_min(torch.finfo(h.dtype).tiny)
    return float(relative.max())


@dataclass(frozen=True)
class ErrorBound:
    """The derivatives' relative error bound at one fixed point.

    Attributes:
        value: ``‖(I − J)⁻¹‖ · max(r_forward, r_linear, ε)``, plus ``curvature``; None
            where ``‖(I − J)⁻¹‖`` is not known (see ``source``).
        inverse_norm: the ``‖(I − J)⁻¹‖`` used, or None.
        residual: ``max(r_forward, r_linear, ε)``, the relative residual amplified.
        source: where ``‖(I − J)⁻¹‖`` came from, or why there is no bound.
        refusable: whether a bound above ``max_error_bound`` refuses (False for an
            estimate that can lie above ``‖(I − J)⁻¹‖``, a Neumann series': it warns).
        curvature: the second-order term ``q`` (see the module), 0 where not measured.
        curvature_row: the row (sample) where ``q`` is largest (-1: one system).
    """

    value: float | None
    inverse_norm: float | None
    residual: float
    source: str
    refusable: bool = True
    curvature: float = 0.0
    curvature_row: int = 0

    def with_curvature(self, curvature: float, row: int = 0) -> ErrorBound:
        """This bound with the second-order term ``q`` (largest in row ``row``) added."""
        if self.value is None or not curvature:
            return self
        return dataclasses.replace(
            self, value=self.value + curvature, curvature=curvature, curvature_row=row
        )

    def enforce(self, limit: float, dtype: torch.dtype, warned: bool) -> bool:
        """Refuse the bound above ``limit``; warn above :func:`warning_threshold`.

        Args:
            limit: ``max_error_bound``.
            dtype: the state's dtype (sets the warning threshold).
            warned: whether the warning was already given (it is given once).

        Returns:
            Whether a warning has now been given.

        Warns:
            AccuracyWarning: the bound is above the threshold (first time only).

        Raises:
            SingularSystemError: ``value > limit`` (a refusable bound).
        """
        if self.value is None:
            return warned
        what = (
            f"‖(I − J)⁻¹‖ ≈ {self.inverse_norm:.2e} ({self.source}) amplifies the residual "
            f"left in h* and in the linear solves ({self.residual:.1e} relative)"
        )
        if self.curvature > self.value - self.curvature:  # named where it dominates
            what += (
                f", and I − J itself changes by a relative {self.curvature:.1e} along the "
                "Newton step to the exact fixed point (‖(I − J)⁻¹ ΔJ δ‖ / ‖δ‖, "
                + (f"largest for sample {self.curvature_row}, " if self.curvature_row >= 0 else "")
                + "a second-order effect"
            )
            if self.curvature >= FOLD:
                what += (
                    ": the fixed point lies near a fold, where I − J turns singular and the "
                    "derivatives stop existing"
                )
            what += "): together"
        else:
            what += " into"
        what += f" a relative error of up to {self.value:.1e} in the derivatives"
        if self.value > limit and self.refusable:
            raise SingularSystemError(
                f"I − ∂f/∂h is too ill-conditioned for the fixed point's accuracy: {what}, "
                f"above max_error_bound={limit:g}. "
                + (
                    "Tighten tol and see whether the term shrinks: near a fold it does, as the "
                    "solve comes closer to h*; at a fold itself it stays at 0.5 or more "
                    "whatever the tolerance, and only moving the parameters or the input off "
                    "it (or changing f so that I − ∂f/∂h stays invertible there) helps; "
                    if self.curvature >= FOLD
                    else "Tighten tol (float64 allows ~1e-13 relative), use float64, or make f "
                    "more contractive in h at its fixed point; "
                )
                + "or raise max_error_bound to accept derivatives this inexact.",
                condition_number=math.inf if self.inverse_norm is None else self.inverse_norm,
            )
        threshold = warning_threshold(dtype)
        if self.value > threshold and not warned:
            message = (
                f"{what}, above the {threshold:.0e} that {dtype} keeps unremarked. Tighten "
                "tol, use float64, or make f more contractive in h; silence this with "
                "warnings.filterwarnings('ignore', category=deqhess.AccuracyWarning)."
            )
            warnings.warn(
                AccuracyWarning(message, error_bound=self.value), stacklevel=user_stacklevel()
            )
            return True
        return warned
