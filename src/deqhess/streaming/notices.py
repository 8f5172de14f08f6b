"""The warnings of a pass: each batch's accuracy warning summed up into one.

Every batch of a pass solves its own equilibrium, and each may warn that its
derivatives' error bound is high (:class:`deqhess.AccuracyWarning`): a thousand
batches would print a thousand lines. :func:`summarised` records the warnings raised
in a pass and gives them again at its end — every other warning as it was, and the
accuracy warnings as one that says in how many batches, and quotes the worst figure.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from ..callers import user_stacklevel
from ..errors import AccuracyWarning

__all__ = ["summarised"]


@contextlib.contextmanager
def summarised(label: str, batches: list[int]) -> Iterator[None]:
    """Record the warnings of a block; after it, give them again, the accuracy ones as one.

    Every warning other than :class:`deqhess.AccuracyWarning` is given again as it was;
    the accuracy warnings become one, saying in how many batch solves, and quoting the
    worst of them: the largest ``error_bound`` (the data-set quantity is a weighted sum
    of the batches', so the worst batch's relative bound is the one that covers it).
    Warnings without a figure count only where none has one.

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
    figures = [_figure(w.message) for w in accuracy]
    known = [f for f in figures if f is not None]
    worst = max(known) if known else None
    quoted = str(accuracy[figures.index(worst)].message) if known else str(accuracy[0].message)
    others = len({str(w.message) for w in accuracy}) - 1
    total = batches[0] if batches else "?"
    message = (
        f"{label}: the derivatives of {len(accuracy)} batch solve(s) of {total} batches carry "
        f"a high error bound; the worst: {quoted}"
        + (f" ({others} more batch(es) with other figures, none larger)" if others else "")
    )
    warnings.warn(AccuracyWarning(message, error_bound=worst), stacklevel=user_stacklevel())


def _figure(message: Warning | str) -> float | None:
    """The error bound an accuracy warning carries (None: it quotes none)."""
    return getattr(message, "error_bound", None)
