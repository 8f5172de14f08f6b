"""One root for every error deqhess raises, each still the builtin callers expect."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import deqhess as dh
from deqhess.distributed import RankFailedError

SRC = Path(dh.__file__).resolve().parent

# The builtin each error subclassed before the root existed: a caller catching it must
# keep catching it.
BUILTIN = {
    dh.InputError: ValueError,
    dh.errors.ArgumentError: TypeError,  # and an InputError: a ValueError too
    dh.DataChangedError: ValueError,
    dh.ModelChangedError: RuntimeError,
    dh.AnalysisConvergenceError: RuntimeError,
    dh.ConvergenceError: RuntimeError,
    dh.SingularSystemError: RuntimeError,
    dh.StaleEquilibriumError: RuntimeError,
    dh.NonFiniteError: RuntimeError,
    dh.DenseMemoryError: MemoryError,
    dh.UnsupportedDerivativeError: NotImplementedError,
    RankFailedError: RuntimeError,
}

_PLAIN_RAISE = re.compile(r"\braise\s+(ValueError|TypeError)\b")


def _error_classes() -> set[type]:
    found = set()
    for module_info in pkgutil.walk_packages([str(SRC)], prefix="deqhess."):
        if module_info.name == "deqhess.__main__":
            continue  # running the command is what importing it does
        module = importlib.import_module(module_info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, BaseException)
                and not issubclass(obj, Warning)  # warnings are not errors
                and obj.__module__.startswith("deqhess")
            ):
                found.add(obj)
    return found


def test_every_error_class_has_the_root_and_its_builtin():
    classes = _error_classes() - {dh.DeqhessError}
    assert classes == set(BUILTIN), "a new error class: add it to BUILTIN with its builtin"
    for cls, builtin in BUILTIN.items():
        assert issubclass(cls, dh.DeqhessError) and issubclass(cls, builtin), cls


def test_bad_input_is_caught_by_the_root_and_by_value_error():
    with pytest.raises(dh.DeqhessError, match="Anderson damping must lie in"):
        dh.Anderson(damping=2.0)
    with pytest.raises(ValueError, match="theta is an empty dict"):
        dh.Equilibrium(lambda x, h, t: h, {}, None, torch.zeros(2))


def test_no_module_raises_a_plain_builtin_on_bad_input():
    """Every error deqhess raises has the root, so the command line can tell deqhess's
    refusals (reported) from an error in the user's code (its traceback) by type alone."""
    plain = sorted(
        path.relative_to(SRC).as_posix()
        for path in SRC.rglob("*.py")
        if _PLAIN_RAISE.search(path.read_text(encoding="utf-8"))
    )
    assert not plain, f"raise InputError (deqhess.errors) instead of a plain ValueError in {plain}"
