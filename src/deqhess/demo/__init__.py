"""The ``deqhess demo``: a DEQ classifier on handwritten digits and its exact Hessian."""

from __future__ import annotations

from .digits import DigitsDEQ, load_digits_split, train
from .report import run_demo

__all__ = ["DigitsDEQ", "load_digits_split", "run_demo", "train"]
