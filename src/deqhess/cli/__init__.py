"""The ``deqhess`` command line: ``deqhess demo`` and ``deqhess analyze``."""

from __future__ import annotations

from .problem import AnalysisProblem, ModelProblem, load_factory

__all__ = ["AnalysisProblem", "ModelProblem", "load_factory"]
