"""The solver options an :class:`AnalysisProblem` carries: their names, and the reference's.

A factory's ``options`` go to :class:`deqhess.DatasetEquilibrium` and, through it, to each
batch's :class:`deqhess.Equilibrium`; a misspelled name would surface only at the first
solve, as a ``TypeError`` from deep inside. :func:`check_option_names` refuses it when the
problem is read.

The float64 reference that ``deqhess analyze`` measures a float32 analysis against must be
solved to float64's own tolerance: a factory's ``tol=1e-3`` (or a model's
``DEQ(tol=1e-3)``) is a choice for the analysis, and a reference that inherited it would
be as inexact as the operator it measures — the measured error then reads ~1000× too
small. :func:`reference_options` and :func:`solve_layer_to_reference` tighten the
stopping rules, and never loosen one the user made tighter.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InputError
from ..implicit import DatasetEquilibrium, Equilibrium
from ..linear.base import IterativeSolver
from ..nn import DEQ
from ..solvers import default_tolerance

__all__ = [
    "SOLVER_OPTIONS",
    "check_option_names",
    "reference_options",
    "solve_layer_to_reference",
]

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

#: the forward solve's iteration cap when none is given (Equilibrium's and DEQ's default)
_DEFAULT_MAX_ITER: int = inspect.signature(Equilibrium.__init__).parameters["max_iter"].default


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


def reference_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the float64 reference: the given ones, solved to float64's tolerance.

    ``tol`` becomes float64's default (1e-10) unless the given one is tighter, ``atol``
    at most that; the iteration cap at least the default (1000), so that the tighter
    rule can be met; an iterative linear solver's own tolerance is dropped for its
    float64 default. The rest (solver, convergence policy, …) is kept.

    Args:
        options: the analysis' options (the factory's with the command's over them).

    Returns:
        A new dict, with ``tol``, ``atol`` and ``max_iter`` always set.
    """
    reference = dict(options)
    reference["tol"] = _tighter(options.get("tol"), default_tolerance(torch.float64))
    reference["atol"] = _tighter(options.get("atol"), reference["tol"], keep_none=True)
    reference["max_iter"] = _at_least(options.get("max_iter"), _DEFAULT_MAX_ITER)
    if "linear_solver" in options:
        reference["linear_solver"] = _reference_linear_solver(options["linear_solver"])
    return reference


def solve_layer_to_reference(layer: DEQ) -> None:
    """Set a reference copy's DEQ layer to solve to float64's own tolerance.

    As :func:`reference_options` does for a data set's options: the layer's ``tol``,
    ``atol``, ``max_iter`` and iterative linear solver. Only ever called on a copy of
    the user's model (its layers are changed in place).

    Args:
        layer: a layer of the reference copy.
    """
    layer.tol = _tighter(layer.tol, default_tolerance(torch.float64))
    layer.atol = _tighter(layer.atol, layer.tol, keep_none=True)
    layer.max_iter = _at_least(layer.max_iter, _DEFAULT_MAX_ITER)
    layer.linear_solver = _reference_linear_solver(layer.linear_solver)


def _tighter(given: Any, bound: float | None, keep_none: bool = False) -> Any:
    """``given`` where it is a number below ``bound``, else ``bound`` (None stays if asked)."""
    if given is None:
        return None if keep_none else bound
    if isinstance(given, (int, float)) and (bound is None or given < bound):
        return given
    return bound


def _at_least(given: Any, floor: int) -> Any:
    """``given`` where it is an int above ``floor``, else ``floor``."""
    return given if isinstance(given, int) and given > floor else floor


def _reference_linear_solver(solver: Any) -> Any:
    """An iterative linear solver at its float64 default tolerance (a copy); others as given."""
    if not isinstance(solver, IterativeSolver) or (solver.rtol is None and solver.atol == 0):
        return solver
    reference = copy.copy(solver)
    reference.rtol, reference.atol = None, 0.0
    return reference
