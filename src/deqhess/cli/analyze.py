"""``deqhess analyze``: curvature analyses of a user's DEQ, a report and plots."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..curvature import (
    ParameterBlock,
    diagonal,
    extreme_eigenpairs,
    hutchinson,
    hutchpp,
    spectral_density,
)
from ..implicit import DatasetEquilibrium
from ..models import ModelCurvature
from .plots import plot_densities, plot_diagonal, plot_top_eigenvalues
from .problem import AnalysisProblem, ModelProblem

__all__ = ["run_analysis"]


def run_analysis(
    problem: AnalysisProblem | ModelProblem,
    out: str | Path = "deqhess-analysis",
    parts: Sequence[str] | None = None,
    top_k: int = 5,
    bottom_k: int = 0,
    trace: str | None = "hutch++",
    trace_hvps: int = 60,
    density: bool = False,
    density_probes: int = 8,
    density_steps: int = 60,
    diagonal_probes: int = 0,
    blocks: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen analyses on each part (default: every part the problem defines),
    print a report, write plots and ``report.json``."""
    parts = problem.parts if parts is None else parts
    for part in parts:
        if part not in problem.parts:
            raise ValueError(f"unknown part {part!r}; use some of {list(problem.parts)}.")
    if trace not in (None, "hutch++", "hutchinson"):
        raise ValueError(f"unknown trace estimator {trace!r}; use 'hutch++' or 'hutchinson'.")
    leader = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if not leader:  # under torch.distributed only rank 0 reports and writes files
        progress, print_fn = False, _silent
    out = Path(out)
    start = time.perf_counter()
    data: DatasetEquilibrium | ModelCurvature = problem.equilibria(progress)
    report: dict[str, Any] = {
        "parameters": data.num_parameters,
        "batches": data.num_batches,
        "samples": data.num_samples,
        "solve": _solve_summary(data, time.perf_counter() - start),
        "parts": {},
        "files": [],
    }
    densities = {}
    for part in parts:
        op = data.hessian_operator(part)
        entry: dict[str, Any] = {}
        tic = time.perf_counter()
        hvps = 0
        if top_k:
            top = extreme_eigenpairs(op, top_k, "largest", seed=seed, progress=progress)
            entry["top"] = top.eigenvalues.tolist()
            entry["top_residuals"] = top.residuals.tolist()
            hvps += top.num_hvps
        if bottom_k:
            bottom = extreme_eigenpairs(op, bottom_k, "smallest", seed=seed, progress=progress)
            entry["bottom"] = bottom.eigenvalues.tolist()
            entry["bottom_residuals"] = bottom.residuals.tolist()
            hvps += bottom.num_hvps
        if trace is not None:
            estimator = hutchpp if trace == "hutch++" else hutchinson
            result = estimator(op, trace_hvps, seed=seed, progress=progress)
            entry["trace"] = {"estimate": result.estimate, "std_error": result.std_error,
                              "method": result.method}  # fmt: skip
            hvps += result.num_hvps
        if density:
            densities[part] = spectral_density(
                op, density_probes, density_steps, seed=seed, progress=progress
            )
            hvps += densities[part].num_hvps
        entry["hvps"], entry["seconds"] = hvps, time.perf_counter() - tic
        report["parts"][part] = entry
    layout = data.layout
    if diagonal_probes:
        diag = diagonal(
            data.hessian_operator("total"), diagonal_probes, seed=seed, progress=progress
        )
        groups = layout.unflatten(diag.estimate)
        errors = layout.unflatten(diag.std_error)
        if not isinstance(groups, dict):
            groups, errors = {"theta": groups}, {"theta": errors}
        report["diagonal"] = {
            name: {
                "sum": float(groups[name].sum()),
                "abs_mean": float(groups[name].abs().mean()),
                "std_error": float(errors[name].mean()),
            }
            for name in groups
        }
    if blocks and layout.names is not None and top_k:
        op = data.hessian_operator("total")
        report["blocks"] = {}
        for name, size in zip(layout.names, layout.numels, strict=True):
            k = min(top_k, size - 1)
            if k >= 1:
                block = ParameterBlock(op, layout, [name])
                report["blocks"][name] = extreme_eigenpairs(
                    block, k, seed=seed, progress=progress
                ).eigenvalues.tolist()
    report["seconds"] = time.perf_counter() - start
    report["processes"] = dist.get_world_size() if dist.is_initialized() else 1
    if not leader:
        return report
    out.mkdir(parents=True, exist_ok=True)
    if "diagonal" in report:
        report["files"].append(str(plot_diagonal(report["diagonal"], out / "diagonal.png")))
    if top_k:
        tops = {p: e["top"] for p, e in report["parts"].items()}
        report["files"].append(str(plot_top_eigenvalues(tops, out / "top_eigenvalues.png")))
    if densities:
        report["files"].append(str(plot_densities(densities, out / "spectral_density.png")))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    report["files"].append(str(out / "report.json"))
    for line in _lines(report):
        print_fn(line)
    return report


def _silent(line: str) -> None:
    return None


def _solve_summary(data: DatasetEquilibrium | ModelCurvature, seconds: float) -> dict[str, Any]:
    """The batches' forward solves (a model's DEQ layers solve inside each product)."""
    if isinstance(data, ModelCurvature):
        return {"seconds": seconds}
    infos = data.batch_infos
    return {
        "seconds": seconds,
        "max_iterations": max(info.iterations for info in infos),
        "max_residual": max(info.residual_norm for info in infos),
        "linear_solver": infos[0].linear_solver,
    }


def _lines(r: dict[str, Any]) -> list[str]:
    s = r["solve"]
    lines = [
        "deqhess analyze — curvature of a DEQ's data-set loss",
        f"  P = {r['parameters']:,} parameters; {r['samples']} samples in {r['batches']} batches",
    ]
    if "max_iterations" in s:
        lines.append(
            f"  solve: {s['max_iterations']} iterations max, residual ≤ "
            f"{s['max_residual']:.1e}, {s['linear_solver']}, {s['seconds']:.1f} s"
        )
    for part, e in r["parts"].items():
        lines.append(f"{part} ({e['hvps']} HVPs, {e['seconds']:.1f} s)")
        if "top" in e:
            values = ", ".join(f"{v:+.4e}" for v in reversed(e["top"]))
            lines.append(
                f"  top eigenvalues:    {values}  (residual ≤ {max(e['top_residuals']):.1e})"
            )
        if "bottom" in e:
            values = ", ".join(f"{v:+.4e}" for v in e["bottom"])
            lines.append(f"  bottom eigenvalues: {values}")
        if "trace" in e:
            t = e["trace"]
            lines.append(f"  trace ({t['method']}): {t['estimate']:+.4e} ± {t['std_error']:.1e}")
    if "diagonal" in r:
        lines.append("diagonal of H by parameter (Hutchinson): sum, mean |·|")
        for name, d in r["diagonal"].items():
            lines.append(
                f"  {name:<20} {d['sum']:+.4e}  {d['abs_mean']:.3e} ± {d['std_error']:.1e}"
            )
    if "blocks" in r:
        lines.append("top eigenvalues of each parameter's diagonal block of H")
        for name, values in r["blocks"].items():
            lines.append(f"  {name:<20} " + ", ".join(f"{v:+.3e}" for v in reversed(values)))
    lines.append(f"total {r['seconds']:.1f} s; files: " + ", ".join(r["files"]))
    return lines
