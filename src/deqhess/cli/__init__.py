"""The ``deqhess`` command line: ``deqhess demo`` and ``deqhess analyze``."""

from __future__ import annotations

from .problem import AnalysisProblem, load_factory

__all__ = ["AnalysisProblem", "load_factory"]
