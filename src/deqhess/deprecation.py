"""Renamed keywords: the old name keeps working, with a ``DeprecationWarning``, for one release."""

from __future__ import annotations

import warnings
from typing import Any

from .callers import user_stacklevel
from .errors import InputError

__all__ = ["UNSET", "renamed"]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


#: the default of a deprecated keyword: "not passed".
UNSET: Any = _Unset()


def renamed(new_value: Any, old_value: Any, *, old: str, new: str, where: str) -> Any:
    """The value of keyword ``new``, taken from its deprecated name ``old`` if given.

    Args:
        new_value: what was passed as ``new`` (``UNSET`` or None: not passed).
        old_value: what was passed as ``old`` (``UNSET``: not passed).
        old: the deprecated name.
        new: the name to use.
        where: the callable's name, for the messages.

    Returns:
        ``old_value`` if it was passed (with a ``DeprecationWarning`` pointing at the
        user's line: :func:`deqhess.callers.user_stacklevel`), else ``new_value``.

    Raises:
        InputError: both names were passed.
    """
    if old_value is UNSET:
        return new_value
    if new_value is not UNSET and new_value is not None:
        raise InputError(f"{where} got both {new}= and its deprecated name {old}=; pass {new}=.")
    warnings.warn(
        f"{where}({old}=...) is deprecated and will be removed in deqhess 0.3; use {new}=.",
        DeprecationWarning,
        stacklevel=user_stacklevel(),
    )
    return old_value
