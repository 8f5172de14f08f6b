"""Checks of the values a user passes: option counts and bounds, tensor dtypes, devices.

Each check names the option, shows what was received and says what is expected, so a
wrong option fails at once with an :class:`~deqhess.InputError` (a ``ValueError``)
instead of a ``TypeError`` or an ``IndexError`` deep inside a solver loop.
"""

from __future__ import annotations

import math
import operator
from typing import SupportsFloat, SupportsIndex, TypeGuard, cast

import torch

from .errors import InputError

__all__ = ["SUPPORTED_DTYPES", "available_device", "integer", "real", "supported_dtype"]

#: the floating dtypes deqhess computes in; half precisions cannot resolve the
#: tolerances its solves need (float16 has ε ≈ 1e-3).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def supported_dtype(dtype: torch.dtype, label: str) -> torch.dtype:
    """``dtype`` if it is float32 or float64.

    Args:
        dtype: the dtype to check.
        label: what has it, for the message (e.g. ``"theta['W']"``).

    Returns:
        ``dtype`` itself.

    Raises:
        InputError: another dtype (float16, bfloat16, integers, complex), with what to do.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{label} has dtype {dtype}; deqhess supports float32 and float64 (half "
            "precision cannot resolve the tolerances of the fixed-point and linear solves). "
            "Convert the tensors (and a module's parameters) with .float() or .double()."
        )
    return dtype


def available_device(device: torch.device | str, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, if torch knows it and it is available here.

    Checked by allocating an empty tensor there — torch's own test, for every backend (a
    CPU-only build raises an ``AssertionError`` for CUDA) — and a CUDA index against the
    devices present.

    Args:
        device: the device asked for (e.g. ``"cuda:0"``).
        name: the option's name, for the message.

    Returns:
        The device.

    Raises:
        InputError: an unknown device string, or a device this machine or torch build
            does not have.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(
            f"{name} {device!r} is not a device torch knows ({error}); pass e.g. 'cpu' or 'cuda:0'."
        ) from error
    failure: Exception | None = None
    try:
        torch.empty(0, device=parsed)
    except (AssertionError, RuntimeError) as error:
        failure = error
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if failure is not None or (parsed.type == "cuda" and (parsed.index or 0) >= cuda):
        here = f"one of cuda:0 … cuda:{cuda - 1} or 'cpu'" if cuda else "'cpu' (no CUDA here)"
        raise InputError(
            f"{name} {device!r} is not available here; pass {here}, or run where that device is."
        ) from failure
    return parsed


def integer(value: object, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python ``int`` (ints and NumPy integers; not bools or floats).

    Args:
        value: what the user passed.
        name: the option's name, for the message.
        minimum: the smallest value allowed, if any.

    Returns:
        The integer.

    Raises:
        InputError: ``value`` is not an integer, or is below ``minimum``.
    """
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise InputError(
            f"{name} must be an int; got {value!r} ({type(value).__name__})"
            + (f". Pass e.g. {name}={int(value)}." if _integral_float(value) else ".")
        )
    number = operator.index(cast(SupportsIndex, value))
    if minimum is not None and number < minimum:
        raise InputError(f"{name} must be an int >= {minimum}; got {number}.")
    return number


def real(
    value: object,
    name: str,
    *,
    minimum: float,
    below: float | None = None,
    allow_inf: bool = False,
    meaning: str = "",
) -> float:
    """``value`` as a float in ``[minimum, below)`` (``below=None``: no upper bound).

    NaN is always rejected, ``inf`` unless ``allow_inf``.

    Args:
        value: what the user passed.
        name: the option's name, for the message.
        minimum: the smallest value allowed.
        below: the values allowed lie below this one (``None``: no upper bound).
        allow_inf: whether ``inf`` is allowed (e.g. "no limit").
        meaning: appended to the message: what the option controls, what to pass instead.

    Returns:
        The number as a float.

    Raises:
        InputError: ``value`` is not a real number, is NaN, infinite (unless allowed)
            or out of range.
    """
    numeric = isinstance(value, (int, float)) or hasattr(value, "__float__")
    if isinstance(value, bool) or not numeric:
        raise InputError(f"{name} must be a number; got {value!r} ({type(value).__name__}).")
    number = float(cast(SupportsFloat, value))
    in_range = number >= minimum and (below is None or number < below)
    if math.isnan(number) or (math.isinf(number) and not allow_inf) or not in_range:
        kind = "a number" if allow_inf else "a finite number"
        where = f">= {minimum:g}" if below is None else f"in [{minimum:g}, {below:g})"
        raise InputError(
            f"{name} must be {kind} {where}; got {value!r}." + (f" {meaning}" if meaning else "")
        )
    return number


def _integral_float(value: object) -> TypeGuard[float]:
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()
