"""The warnings of a pass: each batch's accuracy warning summed up into one.

Every batch of a pass solves its own equilibrium, and each may warn that its
derivatives' error bound is high (:class:`deqhess.AccuracyWarning`): a thousand
batches would print a thousand lines. :func:`summarised` records the warnings raised
in a pass and gives them again at its end — every other warning as it was, and the
accuracy warnings as one that says in how many batches, and the worst figure.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from ..errors import AccuracyWarning

__all__ = ["summarised"]


@contextlib.contextmanager
def summarised(label: str, batches: list[int]) -> Iterator[None]:
    """Record the warnings of a block; after it, give them again, the accuracy ones as one.

    Every warning other than :class:`deqhess.AccuracyWarning` is given again as it was;
    the accuracy warnings become one, saying in how many batch solves and the first
    figure.

    Args:
        label: the front end's name, for the message (e.g. ``"ModelCurvature"``).
        batches: the pass's batch count, filled in by the caller before the block ends
            (a list, so that it can be read when the block ends).

    Yields:
        Nothing: the warnings of the block are held until it ends.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    accuracy = [w for w in caught if issubclass(w.category, AccuracyWarning)]
    for w in caught:
        if not issubclass(w.category, AccuracyWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if not accuracy:
        return
    messages = sorted({str(w.message) for w in accuracy})
    total = batches[0] if batches else "?"
    warnings.warn(
        f"{label}: the derivatives of {len(accuracy)} batch solve(s) of {total} batches carry "
        f"a high error bound; the first: {messages[0]}"
        + (f" ({len(messages) - 1} more different figures)" if len(messages) > 1 else ""),
        AccuracyWarning,
        stacklevel=4,
    )
