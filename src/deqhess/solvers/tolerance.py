"""The stopping rule of a fixed-point solve, and its defaults by dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor

from ..options import real, supported_dtype

__all__ = ["Tolerance", "default_tolerance"]

_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def default_tolerance(dtype: torch.dtype) -> float:
    """The default relative tolerance for a state of ``dtype``.

    About ``1e-10`` in float64 and ``1e-5`` in float32: a few hundred ulps of the
    state, which is what the second-order quantities need to keep their own accuracy.
    Another dtype is refused (:class:`~deqhess.InputError`).

    Args:
        dtype: the state's dtype, float32 or float64.

    Returns:
        The relative tolerance.
    """
    return _DEFAULT_RTOL[supported_dtype(dtype, "the state")]


@dataclass(frozen=True)
class Tolerance:
    """Stopping rule ``‖f(h) − h‖₂ ≤ max(atol, rtol · ‖f(h)‖₂)``, per sample row.

    A row is accepted only where ``‖f(h)‖₂`` and the residual are finite: a state
    whose norm overflows has diverged, however large ``rtol · ‖f(h)‖₂`` becomes.

    Attributes:
        rtol: relative tolerance, in ``[0, 1)``.
        atol: absolute tolerance (a floor for states near zero), finite and ``>= 0``.
    """

    rtol: float
    atol: float

    @classmethod
    def resolve(cls, tol: float | None, atol: float | None, dtype: torch.dtype) -> Tolerance:
        """Fill in defaults: ``tol`` by dtype, ``atol`` equal to ``tol`` (unit scale).

        Refused (:class:`~deqhess.InputError`): a dtype other than float32/float64,
        ``tol`` outside ``[0, 1)``, ``atol`` negative, NaN or infinite (``tol=inf`` would
        accept ``h0``).

        Args:
            tol: the relative tolerance, or ``None`` for the dtype's default.
            atol: the absolute tolerance, or ``None`` for ``tol``.
            dtype: the state's dtype.

        Returns:
            The rule.
        """
        supported_dtype(dtype, "the state")
        rtol = default_tolerance(dtype) if tol is None else tol
        rtol = real(
            rtol,
            "tol",
            minimum=0.0,
            below=1.0,
            meaning="It is relative to ‖f(h)‖ (tol >= 1 accepts any iterate); tol=None "
            "picks 1e-10 in float64, 1e-5 in float32.",
        )
        abs_tol = real(
            rtol if atol is None else atol,
            "atol",
            minimum=0.0,
            meaning="It bounds ‖f(h) − h‖ for states near zero; atol=None uses tol.",
        )
        return cls(rtol=rtol, atol=abs_tol)

    @overload
    def threshold(self, scale: Tensor) -> Tensor: ...
    @overload
    def threshold(self, scale: np.ndarray) -> np.ndarray: ...
    def threshold(self, scale: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Per-row residual bound ``max(atol, rtol · scale)``.

        Args:
            scale: ``‖f(h)‖`` per row, a tensor or a NumPy array.

        Returns:
            The bound per row, of ``scale``'s kind.
        """
        if isinstance(scale, np.ndarray):
            return np.maximum(self.rtol * scale, scale.dtype.type(self.atol))
        return torch.clamp(self.rtol * scale, min=self.atol)

    def met(self, residual: Tensor, scale: Tensor) -> Tensor:
        """Rows ``[S]`` whose residual meets the bound, both finite."""
        finite = torch.isfinite(residual) & torch.isfinite(scale)
        return finite & (residual <= self.threshold(scale))
