"""The solver options an :class:`AnalysisProblem` carries: their names.

A factory's ``options`` go to :class:`deqhess.DatasetEquilibrium` and, through it, to each
batch's :class:`deqhess.Equilibrium`; a misspelled name would surface only at the first
solve, as a ``TypeError`` from deep inside. :func:`check_option_names` refuses it when the
problem is read.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from ..implicit import DatasetEquilibrium, Equilibrium

__all__ = ["SOLVER_OPTIONS", "check_option_names"]

#: the problem's fields (or the command's own flags) that the data set also takes
_FIELDS = {
    "init_state": "set AnalysisProblem.init_state",
    "reduction": "set AnalysisProblem.reduction",
    "batch_dim": "set AnalysisProblem.batch_dim",
    "progress": "the command's --progress sets it",
}


def _keywords(function: Any, leave_out: set[str]) -> set[str]:
    """The parameters of ``function`` that can be passed by keyword, but those named."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind in kinds and p.name not in leave_out}


#: the option names ``AnalysisProblem.options`` may hold: Equilibrium's solver options
#: and DatasetEquilibrium's own (``batches`` is ``data``'s deprecated name)
_ARGUMENTS = {"self", "f", "theta", "x", "h0", "data", "loss", "batches", *_FIELDS}
SOLVER_OPTIONS = tuple(
    sorted(
        _keywords(Equilibrium.__init__, _ARGUMENTS)
        | _keywords(DatasetEquilibrium.__init__, _ARGUMENTS)
    )
)


def check_option_names(options: Any, where: str = "AnalysisProblem.options") -> None:
    """Refuse an option the data set would not take, before anything is solved.

    Args:
        options: the factory's options (a dict).
        where: what holds them, for the message.

    Raises:
        InputError: ``options`` is not a dict, or names an option that is not one of
            :data:`SOLVER_OPTIONS` (the closest name suggested), or one of the problem's
            own fields.
    """
    if not isinstance(options, Mapping):
        raise InputError(
            f"{where} must be a dict of deqhess.Equilibrium options (e.g. {{'tol': 1e-6}}); "
            f"got {type(options).__name__}."
        )
    for key in options:
        if key in _FIELDS:
            raise InputError(
                f"{where} has {key!r}, which is not a solver option: {_FIELDS[key]} instead."
            )
        if key not in SOLVER_OPTIONS:
            close = _closest(str(key))
            hint = f" (did you mean {close!r}?)" if close else ""
            raise InputError(
                f"{where} has an unknown option {key!r}{hint}; the options are "
                f"{', '.join(SOLVER_OPTIONS)} (see deqhess.Equilibrium and "
                "deqhess.DatasetEquilibrium)."
            )


def _closest(key: str) -> str | None:
    """The option ``key`` most likely meant: one it abbreviates or spells out, else difflib's."""
    related = [n for n in SOLVER_OPTIONS if key and (key.startswith(n) or n.startswith(key))]
    if related:
        return max(related, key=len)
    close = difflib.get_close_matches(key, SOLVER_OPTIONS, n=1, cutoff=0.5)
    return close[0] if close else None
