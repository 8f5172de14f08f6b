"""The named errors of deqhess.

Errors are part of the API: each says what went wrong, the figures that show it,
and what to try. Every error deqhess raises derives from :class:`DeqhessError`, so one
``except deqhess.DeqhessError`` catches them all, and each also derives from the
builtin a caller would expect (``ValueError`` for bad input, ``RuntimeError`` for a
numerical failure, ``MemoryError``, ``NotImplementedError``), so code that catches the
builtin keeps working.
"""

from __future__ import annotations

import sys

__all__ = [
    "DeqhessError",
    "InputError",
    "ArgumentError",
    "AccuracyWarning",
    "AnalysisConvergenceError",
    "ConvergenceError",
    "DataChangedError",
    "DenseMemoryError",
    "ModelChangedError",
    "NonFiniteError",
    "SingularSystemError",
    "StaleEquilibriumError",
    "UnsupportedDerivativeError",
]


class DeqhessError(Exception):
    """The root of every error deqhess raises.

    Example:
        >>> import torch, deqhess as dh
        >>> try:
        ...     dh.Equilibrium(lambda x, h, theta: h, {}, None, torch.zeros(2))
        ... except dh.DeqhessError as error:
        ...     print(f"{type(error).__name__} (a ValueError: {isinstance(error, ValueError)})")
        InputError (a ValueError: True)
    """


class InputError(DeqhessError, ValueError):
    """An argument deqhess was given is invalid.

    The message names the argument, shows what was received and says what to try. A
    ``ValueError``, so code written to catch ``ValueError`` keeps working.
    """


class ArgumentError(InputError, TypeError):
    """A call's arguments do not bind as given.

    One is missing, repeated or one too many, or two were given where they could be
    confused (and a swap would pass unnoticed). Python raises ``TypeError`` for a call
    that does not fit a signature, so this is one (code that caught the ``TypeError``
    deqhess raised there before keeps working), and an :class:`InputError` too, so
    ``except InputError`` catches all bad input — as numpy's ``AxisError`` is both a
    ``ValueError`` and an ``IndexError``.
    """


class ConvergenceError(DeqhessError, RuntimeError):
    """A fixed-point or linear solver did not reach its tolerance.

    Attributes:
        info: the solver statistics at the point of failure (a
            :class:`deqhess.solvers.SolveInfo` or a linear-solve record), so a
            caller can inspect the residual history.
    """

    def __init__(self, message: str, info: object | None = None) -> None:
        super().__init__(message)
        self.info = info


class SingularSystemError(DeqhessError, RuntimeError):
    """``I − J`` at the fixed point is singular or too ill-conditioned to trust.

    Attributes:
        condition_number: the estimated condition number (``inf`` if exactly
            singular).
    """

    def __init__(self, message: str, condition_number: float = float("inf")) -> None:
        super().__init__(message)
        self.condition_number = condition_number


class StaleEquilibriumError(DeqhessError, RuntimeError):
    """θ or a tensor of x was modified in place after the equilibrium was solved."""


class NonFiniteError(DeqhessError, RuntimeError):
    """A quantity deqhess computed at the fixed point has NaN or inf entries.

    The inputs were finite, so the loss or ``f`` is not differentiable (or overflows)
    at the fixed point; the message names the quantity and what to check.

    Attributes:
        quantity: what went non-finite (e.g. ``"the adjoint λ"``).
    """

    def __init__(self, message: str, quantity: str) -> None:
        super().__init__(message)
        self.quantity = quantity


class DenseMemoryError(DeqhessError, MemoryError):
    """A dense result would not fit in the memory available; refused before allocating.

    Attributes:
        required: estimated bytes the request would allocate.
        available: bytes available (or the limit set with
            :func:`deqhess.memory_limit`).
    """

    def __init__(self, message: str, required: float, available: float) -> None:
        super().__init__(message)
        self.required = required
        self.available = available


class UnsupportedDerivativeError(DeqhessError, NotImplementedError):
    """A derivative mode that cannot be computed exactly through the DEQ layer.

    The message names the mode, why, and the supported way to get the same derivative.
    """


class DataChangedError(DeqhessError, ValueError):
    """A pass over the data saw other samples than the first pass did.

    A data-set operator is a fixed matrix only if every pass reads the same samples
    (in any order and grouping). Random augmentation, a loader that draws a different
    subset each pass (``shuffle=True`` with ``drop_last=True``, a sampler with
    replacement) and data changed after the first pass all break that.

    Attributes:
        samples: samples this pass read (so far, if it stopped early).
        expected: samples the first pass read.
        changed: samples of this pass the first pass did not read (or -1 if unknown).
    """

    def __init__(self, message: str, samples: int, expected: int, changed: int) -> None:
        super().__init__(message)
        self.samples, self.expected, self.changed = samples, expected, changed


class ModelChangedError(DeqhessError, RuntimeError):
    """The model was not the same function on every pass over the data.

    It returned another result on the same samples than on the first pass, drew random
    numbers while evaluated, or changed its own parameters or buffers during a pass.

    Attributes:
        samples: how many samples' results changed (0 when the model's state changed).
        change: the largest relative change of a result (0 when the state changed).
    """

    def __init__(self, message: str, samples: int = 0, change: float = 0.0) -> None:
        super().__init__(message)
        self.samples, self.change = samples, change


class AnalysisConvergenceError(ConvergenceError):
    """An iterative analysis (:mod:`deqhess.curvature`) stopped short of its tolerance.

    Its cap on products was reached, or its system could not be solved as asked.

    Attributes:
        result: what it reached, as the analysis' own result type (an
            :class:`deqhess.curvature.EigenResult` of the Ritz pairs so far, an
            :class:`deqhess.curvature.InverseResult` with its status); also ``info``.
        num_hvps: products used.
        max_hvps: the cap on products it ran under.
    """

    def __init__(self, message: str, result: object, num_hvps: int, max_hvps: int) -> None:
        super().__init__(message, info=result)
        self.result = result
        self.num_hvps = num_hvps
        self.max_hvps = max_hvps


class AccuracyWarning(UserWarning):
    """A derivative's own error bound is above what its dtype lets pass unremarked.

    That is 1e-6 relative in float64, 1e-3 in float32.

    The message gives the bound and where it comes from (``‖(I − J)⁻¹‖`` times the
    forward tolerance, or a linear solve's residual); it is also
    ``EquilibriumInfo.error_bound``. Past ``max_error_bound`` (default 0.1) the solve
    is refused with :class:`SingularSystemError` instead.

    Args:
        message: what the bound is and what to do.
        error_bound: the relative error bound the message quotes (None: none quoted).

    Attributes:
        error_bound: the figure, as a number — a data set's per-pass warning quotes the
            largest of its batches'.
    """

    def __init__(self, message: str, error_bound: float | None = None) -> None:
        super().__init__(message)
        self.error_bound = error_bound

    def __reduce__(self) -> tuple[type, tuple[str, float | None]]:
        """Pickle with the figure (``args`` holds only the message)."""
        return type(self), (str(self), self.error_bound)


def add_note(error: BaseException, note: str) -> None:
    """Append ``note`` to the message of ``error``, an exception deqhess passes through.

    On Python 3.11+ this is :meth:`BaseException.add_note` (the traceback prints the note
    under the message). Python 3.10 has no notes: there the note is joined to the
    message, the exception's first argument, when that is a string, and kept in
    ``__notes__`` as 3.11 would.

    Args:
        error: the exception, about to be re-raised; changed in place.
        note: what deqhess knows about the failure that the exception does not say.
    """
    if sys.version_info >= (3, 11):
        error.add_note(note)
        return
    notes = getattr(error, "__notes__", None)
    error.__notes__ = [*(notes or []), note]  # type: ignore[attr-defined]  # 3.11's attribute
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}", *error.args[1:])
