"""How ``deqhess analyze`` finds the factory a user names, and reads what it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from .problem import AnalysisProblem, ModelProblem
from .solver_options import check_option_names

__all__ = ["load_factory"]


def load_factory(spec: str) -> AnalysisProblem | ModelProblem:
    """Call ``package.module:function`` or ``path/to/file.py:function`` and check its result.

    A file is run as ``python path/to/file.py`` would run it: with its folder first on
    ``sys.path``, so that it can import the modules beside it (``from helpers import
    f``); a module is imported with the current folder first on ``sys.path``. Either is
    taken off again once the factory has returned.

    Args:
        spec: where the factory is, and its name after the last ``:``.

    Returns:
        The factory's problem (a dict of fields made into one), its solver options'
        names checked.

    Raises:
        InputError: a malformed ``spec``, a file or module that cannot be found, no such
            callable, a result that is no problem, or an unknown solver option.
    """
    if ":" not in spec:
        raise InputError(
            f"factory {spec!r} must look like 'package.module:function' or 'file.py:function'."
        )
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise InputError(f"factory file {target!r} does not exist.")
        folder = path.resolve().parent
    else:
        folder = Path.cwd()
    with _first_on_path(folder):
        module = _module(target)
        factory = getattr(module, name, None)
        if not callable(factory):
            raise InputError(f"{target!r} has no callable {name!r}.")
        _check_no_arguments(spec, factory)
        result = factory()
    if isinstance(result, Mapping):
        result = _from_fields(spec, result)
    if not isinstance(result, (AnalysisProblem, ModelProblem)):
        raise InputError(
            f"the factory {spec!r} returned {type(result).__name__}; return a "
            "deqhess.cli.AnalysisProblem or ModelProblem (or a dict of its fields)."
        )
    if isinstance(result, AnalysisProblem):
        check_option_names(result.options, f"AnalysisProblem.options of the factory {spec!r}")
    return result


@contextlib.contextmanager
def _first_on_path(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` within the block; the entry removed after it."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the factory may have taken it off itself
            sys.path.remove(entry)


def _module(target: str) -> Any:
    """The factory's module: the file ``target`` executed, or the module imported."""
    if not target.endswith(".py"):
        try:
            return importlib.import_module(target)
        except ImportError as error:
            raise InputError(f"cannot import {target!r} for the factory: {error}") from error
    path = Path(target)
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    # a path ending in .py always has a spec with a loader (SourceFileLoader)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _from_fields(spec: str, fields_: Mapping[str, Any]) -> AnalysisProblem | ModelProblem:
    """A problem from a factory's dict: ``ModelProblem`` if it names a model."""
    kind = ModelProblem if "model" in fields_ else AnalysisProblem
    known = [f.name for f in dataclasses.fields(kind)]
    required = [
        f.name
        for f in dataclasses.fields(kind)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in fields_]
    unknown = [n for n in fields_ if n not in known]
    if missing or unknown:
        raise InputError(
            f"the factory {spec!r} returned a dict for {kind.__name__} "
            + (f"without {missing}" if missing else "")
            + (" and " if missing and unknown else "")
            + (f"with unknown fields {unknown}" if unknown else "")
            + f"; its fields are {known} (required: {required})."
        )
    return kind(**fields_)


def _check_no_arguments(spec: str, factory: Callable[..., Any]) -> None:
    """Refuse a factory that cannot be called without arguments (as the command calls it).

    Raises:
        InputError: it requires a parameter (named), before it runs.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read: its call will say
        return
    required = [
        p.name for p in signature.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]  # fmt: skip
    if required:
        raise InputError(
            f"the factory {spec!r} requires {required} but is called with no arguments; "
            "give them defaults, or wrap it in a function of none "
            "(def problem(): return make(...))."
        )
