"""The float64 check of ``deqhess analyze``: a float32 analysis measured against float64.

The problem is rebuilt in float64 and solved to float64's own tolerance (see
:meth:`AnalysisProblem.float64_reference`, :meth:`ModelProblem.float64_reference`); each
part's operator is then compared with the reference's on probes, and each eigenpair's
residual taken against it. The check comes after the analysis: when it cannot run — the
data were a generator the analysis read up, or the rebuilt problem fails (a float32
tensor that ``f`` closes over is not cast) — the analysis is kept and reported, with one
line saying why the check did not run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..curvature import operator_accuracy
from ..curvature.accuracy import OperatorAccuracy
from ..implicit import DatasetEquilibrium
from ..models import ModelCurvature
from .problem import AnalysisProblem, ModelProblem

__all__ = ["Float64Check", "PartMeasurement", "measure_against_float64"]


@dataclass(frozen=True)
class PartMeasurement:
    """One part measured against the float64 reference.

    Attributes:
        accuracy: the operator's error on the probes, ``reference_error`` set.
        residuals: ``‖H₆₄v − λv‖`` of each eigenpair list (``"top"``, ``"bottom"``).
    """

    accuracy: OperatorAccuracy
    residuals: dict[str, Tensor]


@dataclass(frozen=True)
class Float64Check:
    """What the float64 check found.

    Attributes:
        parts: each part's measurement (empty when the check did not run).
        skipped: why the check did not run (one line), or None.
    """

    parts: dict[str, PartMeasurement] = field(default_factory=dict)
    skipped: str | None = None


def measure_against_float64(
    data: DatasetEquilibrium | ModelCurvature,
    problem: AnalysisProblem | ModelProblem,
    parts: Sequence[str],
    eigenpairs: dict[tuple[str, str], Any],
    probes: int,
    seed: int,
    progress: bool,
    options: dict[str, Any],
    device: torch.device | str | None,
) -> Float64Check:
    """Measure each part of ``data`` against ``problem`` rebuilt in float64.

    Args:
        data: the finished analysis' equilibria (float32).
        problem: the factory's problem.
        parts: the parts analysed.
        eigenpairs: the eigenpairs found, by ``(part, "top" | "bottom")``.
        probes: the probes per part.
        seed: their seed.
        progress: progress bars.
        options: the analysis' options (over the factory's); the reference tightens
            its tolerances.
        device: where the analysis ran.

    Returns:
        The measurements; or, where the rebuilt problem cannot be built or fails
        (anything it raises but an interrupt), none, and why.
    """
    if isinstance(problem.data, Iterator):
        return Float64Check(
            skipped=f"the factory's data are a one-shot iterator ({type(problem.data).__name__}"
            "), read up by the analysis — give a list or a DataLoader to have it"
        )
    try:
        reference = problem.float64_reference(progress, device=device, **options)
        measured = {}
        for part in parts:
            operator = reference.hessian_operator(part)
            solves = None if isinstance(data, ModelCurvature) else data.batch_solves
            accuracy = operator_accuracy(
                data.hessian_operator(part), solves, reference=operator, num_probes=probes,
                seed=seed, progress=progress,
            )  # fmt: skip
            residuals = {
                which: eigenpairs[part, which].residuals_against(operator)
                for which in ("top", "bottom")
                if (part, which) in eigenpairs
            }
            measured[part] = PartMeasurement(accuracy, residuals)
    except Exception as error:  # the finished analysis is kept, whatever the rebuild raises
        return Float64Check(skipped=_failure(error))
    return Float64Check(measured)


def _failure(error: Exception) -> str:
    """One line: what the rebuilt problem raised, and its likely cause where it is a dtype."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "…"
    line = f"the problem rebuilt in float64 failed ({type(error).__name__}: {text})"
    if any(word in text for word in ("dtype", "Double", "Float", "double", "float")):
        line += (
            " — a tensor outside theta, the parameters and the buffers (one f closes over, "
            "a plain tensor attribute of a module) keeps its float32 when the problem is cast"
        )
    return line
