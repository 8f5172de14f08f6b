"""Where a warning deqhess raises should point: the first frame of the user's code.

``warnings.warn``'s ``stacklevel`` counts frames up from the call; a fixed count is
right only for one call path (a keyword deprecated in ``ModelCurvature.__init__`` is
three frames deeper under ``DistributedModelCurvature``, and a warning raised in a
backward is under torch's autograd). Attributed to a frame inside deqhess or torch,
Python's default filters hide a ``DeprecationWarning`` (shown only for ``__main__``) and
group the rest under the library's line; :func:`user_stacklevel` finds the user's line.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

__all__ = ["user_stacklevel"]

#: path prefixes of the frames skipped: deqhess's and torch's packages, and the two
#: standard-library files whose wrappers sit between them and the caller (their
#: directory is the whole standard library)
_INSIDE = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__package__], torch)
    if module.__file__ is not None
) + tuple(
    os.path.abspath(module.__file__)
    for module in (contextlib, functools)
    if module.__file__ is not None
)


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside deqhess, torch and two wrappers.

    The wrappers are ``contextlib``'s and ``functools``' (their files only). Called in the
    function that warns; counts from its caller's frame.

    Returns:
        The level to pass to ``warnings.warn`` from the function that called this one
        (at least 2: that function's caller).
    """
    frame = sys._getframe(2)  # the caller of the function that warns
    level = 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INSIDE
    ):
        frame = frame.f_back
        level += 1
    return level
