"""The ``deqhess`` command line: ``deqhess demo`` and ``deqhess analyze``."""

from __future__ import annotations

from .factory import load_factory
from .problem import AnalysisProblem, ModelProblem

__all__ = ["AnalysisProblem", "ModelProblem", "load_factory"]
