"""``deqhess analyze``: curvature analyses of a user's DEQ, a report and plots."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..curvature import (
    ParameterBlock,
    diagonal,
    extreme_eigenpairs,
    hutchinson,
    hutchpp,
    operator_accuracy,
    spectral_density,
)
from ..curvature.density import check_density
from ..curvature.diagonal import check_diagonal
from ..curvature.eigen import check_k
from ..curvature.trace import check_hutchinson, check_hutchpp
from ..errors import InputError
from ..implicit import DatasetEquilibrium
from ..models import ModelCurvature
from ..options import available_device, integer
from .output import check_out
from .plots import plot_densities, plot_diagonal, plot_top_eigenvalues
from .problem import AnalysisProblem, ModelProblem
from .reference import measure_against_float64

__all__ = ["check_request", "run_analysis"]

#: What each error figure of the report bounds or estimates (also written to report.json).
ERROR_NOTES = {
    "residuals": "Lanczos residuals ‖Hv − λv‖: some eigenvalue of the operator as computed "
    "(its dtype, its inexact fixed point and solves) lies within this of λ",
    "float64_residuals": "‖H₆₄v − λv‖ with the problem rebuilt in float64: some float64 "
    "eigenvalue lies within this of λ",
    "std_error": "standard error of the stochastic estimator for the operator as computed",
    "accuracy": "relative error of the operator itself vs the exact one: measured against "
    "float64 on probes when available, else estimated (see deqhess.curvature.accuracy)",
}


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
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    options: dict[str, Any] | None = None,
    float64_probes: int = 4,
) -> dict[str, Any]:
    """Run the chosen analyses on each part, print a report, write plots and ``report.json``.

    Under ``torch.distributed`` every rank computes and only rank 0 reports and writes.

    Args:
        problem: the factory's problem: a function, a data set and a loss, or a model.
        out: the directory for the plots and ``report.json``.
        parts: the operators to analyse; default every part the problem defines.
        top_k: largest eigenvalues per part (0: none).
        bottom_k: smallest eigenvalues per part (0: none).
        trace: ``"hutch++"``, ``"hutchinson"`` or None (no trace).
        trace_hvps: products for the trace.
        density: estimate the spectral density by SLQ.
        density_probes: SLQ probes.
        density_steps: Lanczos steps per SLQ probe.
        diagonal_probes: Hutchinson probes for the Hessian's diagonal (0: none).
        blocks: top eigenvalues of each parameter's block.
        seed: seed of the random probes and starting vectors.
        progress: progress bars; None shows them only on a terminal and prints a plain
            line per finished analysis otherwise.
        print_fn: where the report's lines go.
        dtype: cast passed to :meth:`AnalysisProblem.equilibria`.
        device: device passed to :meth:`AnalysisProblem.equilibria`.
        options: solver options passed to :meth:`AnalysisProblem.equilibria`, overriding
            the factory's.
        float64_probes: when the analysis runs below float64, rebuild the problem in
            float64 and measure each part's error on this many probes, and each
            eigenpair's residual against it (0: skip; the cheap estimate remains). The
            float64 problem solves to float64's own tolerance, not the options'. Where
            it cannot be built or fails, the report says why in one line and keeps the
            estimate; the analysis is written as usual.

    Returns:
        The report as written to ``report.json``: the problem's size, the solve's
        summary, each part's eigenvalues (ascending), trace, density and accuracy, the
        products used and the files written.

    Raises:
        InputError: before any batch is solved: what :func:`check_request` refuses, an
            unknown part, or a ``top_k`` or ``bottom_k`` not below ``P``.
    """
    check_request(out, parts, top_k, bottom_k, trace, trace_hvps, density, density_probes,
                  density_steps, diagonal_probes, float64_probes, device)  # fmt: skip
    parts = problem.parts if parts is None else parts
    for part in parts:
        if part not in problem.parts:
            raise InputError(f"unknown part {part!r}; use some of {list(problem.parts)}.")
    size = problem.num_parameters(dtype)
    for name, k in (("top_k", top_k), ("bottom_k", bottom_k)):
        if k:
            check_k(k, size, name)
    leader = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if not leader:  # under torch.distributed only rank 0 reports and writes files
        progress, print_fn = False, _silent
    bars = sys.stderr.isatty() if progress is None else progress
    stage = _Stages(print_fn if leader and not bars else _silent)
    out = Path(out)
    start = time.perf_counter()
    options = options or {}
    data: DatasetEquilibrium | ModelCurvature = problem.equilibria(
        bars, dtype=dtype, device=device, **options
    )
    batches = data.num_batches
    stage.done(f"solved {batches} batch{'' if batches == 1 else 'es'}", start)
    report: dict[str, Any] = {
        "parameters": data.num_parameters,
        "batches": batches,
        "samples": data.num_samples,
        "excluded_samples": getattr(data, "excluded_samples", 0),
        "dtype": str(data.layout.dtype).removeprefix("torch."),
        "solve": _solve_summary(data, time.perf_counter() - start),
        "error_notes": ERROR_NOTES,
        "parts": {},
        "files": [],
    }
    densities, eigenpairs = {}, {}
    check_float64 = float64_probes > 0 and data.layout.dtype != torch.float64
    for part in parts:
        op = data.hessian_operator(part)
        entry: dict[str, Any] = {}
        tic = time.perf_counter()
        hvps = 0
        for which, k in (("top", top_k), ("bottom", bottom_k)):
            if k:
                mark = time.perf_counter()
                order = "largest" if which == "top" else "smallest"
                pairs = extreme_eigenpairs(op, k, order, seed=seed, progress=bars)
                eigenpairs[part, which] = pairs
                entry[which] = pairs.eigenvalues.tolist()
                entry[f"{which}_residuals"] = pairs.residuals.tolist()
                hvps += pairs.num_hvps
                stage.done(f"{part}: {which}-{k} eigenvalues, {pairs.num_hvps} HVPs", mark)
        if trace is not None:
            mark = time.perf_counter()
            estimator = hutchpp if trace == "hutch++" else hutchinson
            traced = estimator(op, trace_hvps, seed=seed, progress=bars)
            entry["trace"] = {"estimate": traced.estimate, "std_error": traced.std_error,
                              "method": traced.method}  # fmt: skip
            hvps += traced.num_hvps
            stage.done(f"{part}: trace ({trace}), {traced.num_hvps} HVPs", mark)
        if density:
            mark = time.perf_counter()
            densities[part] = spectral_density(
                op, density_probes, density_steps, seed=seed, progress=bars
            )
            entry["density"] = _density_entry(densities[part])
            hvps += densities[part].num_hvps
            stage.done(f"{part}: spectral density, {densities[part].num_hvps} HVPs", mark)
        entry["hvps"] = hvps
        if not check_float64:  # else measured against float64 below
            _estimate_accuracy(data, part, entry, seed, bars, stage)
        entry["seconds"] = time.perf_counter() - tic
        report["parts"][part] = entry
    if check_float64:
        mark = time.perf_counter()
        check = measure_against_float64(data, problem, parts, eigenpairs, float64_probes, seed,
                                        bars, options, device)  # fmt: skip
        report["float64_check"] = {"measured": check.skipped is None, "reason": check.skipped}
        if check.skipped is None:
            stage.done("measured against the problem in float64", mark)
        for part, entry in report["parts"].items():
            if part in check.parts:
                measured = check.parts[part]
                entry["accuracy"] = _accuracy_entry(measured.accuracy)
                entry["hvps"] += measured.accuracy.num_hvps
                for which, bounds in measured.residuals.items():
                    entry[f"{which}_float64_residuals"] = bounds.tolist()
            else:  # the check did not run: the estimate, as without it
                _estimate_accuracy(data, part, entry, seed, bars, stage)
    layout = data.layout
    if diagonal_probes:
        mark = time.perf_counter()
        diag = diagonal(data.hessian_operator("total"), diagonal_probes, seed=seed, progress=bars)
        groups, errors = diag.by_parameter(layout), diag.std_error_by_parameter(layout)
        report["diagonal"] = {
            name: {
                "sum": float(groups[name].sum()),
                "abs_mean": float(groups[name].abs().mean()),
                "std_error": float(errors[name].mean()),
            }
            for name in groups
        }
        stage.done(f"diagonal, {diag.num_hvps} HVPs", mark)
    if blocks and layout.names is not None and top_k:
        op = data.hessian_operator("total")
        report["blocks"] = {}
        for name, size in zip(layout.names, layout.numels, strict=True):
            k = min(top_k, size - 1)
            if k >= 1:
                block = ParameterBlock(op, layout, [name])
                values = extreme_eigenpairs(block, k, seed=seed, progress=bars).eigenvalues
                report["blocks"][name] = values.tolist()  # ascending, as everywhere
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
    report["files"].append(str(out / "report.json"))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for line in _lines(report):
        print_fn(line)
    return report


def check_request(
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
    float64_probes: int = 4,
    device: torch.device | str | None = None,
) -> None:
    """Refuse, before any work, what :func:`run_analysis` could refuse only later.

    Each analysis' own check of its counts is called here (one set of rules and words),
    so that a bad request ends before the factory runs and the batches are solved, not
    after the analyses before it. What needs ``P`` (``top_k``, ``bottom_k`` below it)
    or the problem (the parts it defines) :func:`run_analysis` checks once it has the
    problem, still before any solve.

    Args:
        out: the folder for the plots and ``report.json``: new, or an existing folder.
        parts: the parts to analyse (None: all); not empty.
        top_k: at least 0.
        bottom_k: at least 0.
        trace: ``"hutch++"``, ``"hutchinson"`` or None.
        trace_hvps: the trace estimator's products (see :func:`deqhess.curvature.hutchpp`
            and :func:`deqhess.curvature.hutchinson`).
        density: whether the density's counts are used.
        density_probes: see :func:`deqhess.curvature.spectral_density`.
        density_steps: see :func:`deqhess.curvature.spectral_density`.
        diagonal_probes: 0, or see :func:`deqhess.curvature.diagonal`.
        float64_probes: 0 or at least 2.
        device: a device available here, or None.

    Raises:
        InputError: any of these out of range; ``out`` a file or under one, or a folder
            that cannot be made or written (:func:`~deqhess.cli.output.check_out`); a device
            torch does not know or this machine does not have.
    """
    check_out(Path(out))
    if parts is not None and len(parts) == 0:
        raise InputError(
            "parts is empty (--parts named none); name at least one part, or leave it out "
            "for every part the problem defines."
        )
    integer(top_k, "top_k", minimum=0)
    integer(bottom_k, "bottom_k", minimum=0)
    if trace not in (None, "hutch++", "hutchinson"):
        raise InputError(f"unknown trace estimator {trace!r}; use 'hutch++' or 'hutchinson'.")
    if trace is not None:
        (check_hutchpp if trace == "hutch++" else check_hutchinson)(trace_hvps, "trace_hvps")
    if density:
        check_density(density_probes, density_steps, ("density_probes", "density_steps"))
    if integer(diagonal_probes, "diagonal_probes", minimum=0):
        check_diagonal(diagonal_probes, "diagonal_probes")
    probes = integer(float64_probes, "float64_probes")
    if probes == 1 or probes < 0:
        raise InputError(f"float64_probes must be 0 (skip) or at least 2; got {float64_probes}.")
    if device is not None:
        available_device(device)


def _density_entry(result) -> dict[str, Any]:
    nodes = torch.cat(result.nodes)
    return {
        "grid": result.grid.tolist(),
        "density": result.density.tolist(),
        "sigma": result.sigma,
        "probes": len(result.nodes),
        "nodes": [t.tolist() for t in result.nodes],
        "weights": [t.tolist() for t in result.weights],
        "node_range": [float(nodes.min()), float(nodes.max())],
    }


def _estimate_accuracy(data, part: str, entry: dict[str, Any], seed, bars, stage) -> None:
    """The part's accuracy estimated without a reference, into its report ``entry``."""
    mark = time.perf_counter()
    op = data.hessian_operator(part)
    accuracy = operator_accuracy(op, _solves(data), seed=seed, progress=bars)
    entry["accuracy"] = _accuracy_entry(accuracy)
    entry["hvps"] += accuracy.num_hvps
    stage.done(f"{part}: operator accuracy, {accuracy.num_hvps} HVPs", mark)


def _accuracy_entry(accuracy) -> dict[str, Any]:
    return {
        "estimate": accuracy.estimate,
        "state_error": accuracy.state_error,
        "condition_known": accuracy.condition_known,
        "asymmetry": accuracy.asymmetry,
        "scale": accuracy.scale,
        "float64_error": accuracy.reference_error,
    }


class _Stages:
    """Plain progress lines, one per finished analysis (when no bars are shown)."""

    def __init__(self, print_fn: Callable[[str], None]) -> None:
        self.print_fn = print_fn

    def done(self, what: str, since: float) -> None:
        self.print_fn(f"  … {what} ({time.perf_counter() - since:.1f} s)")


def _silent(line: str) -> None:
    return None


def _solves(data: DatasetEquilibrium | ModelCurvature) -> list | None:
    """The batches' forward solves, for the state error.

    Returns:
        The data set's batch solves; None for a model, whose DEQ layers solve inside
        each product.
    """
    return None if isinstance(data, ModelCurvature) else data.batch_solves


def _solve_summary(data: DatasetEquilibrium | ModelCurvature, seconds: float) -> dict[str, Any]:
    every = _solves(data) or []
    # a batch whose samples were all left out contributes no state to the operator
    solves = [s for s in every if s.samples > 0]
    if not solves:
        return {"seconds": seconds}
    return {
        "seconds": seconds,
        # the forward solves' own, the left-out samples' included (a batch that left
        # samples out is re-solved from its kept fixed points, in no iterations)
        "max_iterations": max(s.forward_iterations for s in every),
        "max_residual": max(s.info.residual_norm for s in solves),
        "linear_solver": solves[0].info.linear_solver,
    }


def _lines(r: dict[str, Any]) -> list[str]:
    s = r["solve"]
    lines = [
        "deqhess analyze — curvature of a DEQ's data-set loss",
        f"  P = {r['parameters']:,} parameters ({r['dtype']}); {r['samples']} samples in "
        f"{r['batches']} batch{'' if r['batches'] == 1 else 'es'}",
    ]
    if r.get("excluded_samples"):
        lines.append(
            f"  excluded {r['excluded_samples']} samples whose forward solve missed the "
            "tolerance (not in the loss, the weights or the sample count)"
        )
    if "max_iterations" in s:
        left_out = r.get("excluded_samples")
        lines.append(
            f"  solve: {s['max_iterations']} iterations max"
            + (" (the left-out samples' included)" if left_out else "")
            + f", residual ≤ {s['max_residual']:.1e}"
            + (" on the kept samples" if left_out else "")
            + f", {s['linear_solver']}, {s['seconds']:.1f} s"
        )
    lines += [
        "  error figures: residual = Lanczos ‖Hv − λv‖ (bounds the distance to an "
        "eigenvalue of the operator as computed); ± = standard error of the estimator; "
        "operator = that operator's own relative error vs the exact one",
    ]
    check = r.get("float64_check")
    if check is not None and not check["measured"]:
        lines.append(
            f"  float64 check not run: {check['reason']}; the operator errors below are "
            "estimates (--float64-probes 0 skips the check)"
        )
    for part, e in r["parts"].items():
        lines.append(f"{part} ({e['hvps']} HVPs, {e['seconds']:.1f} s)")
        for which in ("top", "bottom"):
            if which in e:
                values = ", ".join(f"{v:+.4e}" for v in e[which])
                line = f"  {which} eigenvalues (ascending):{' ' * (7 - len(which))}{values}"
                line += f"  (residual ≤ {max(e[which + '_residuals']):.1e}"
                if f"{which}_float64_residuals" in e:
                    line += f"; vs float64 ≤ {max(e[which + '_float64_residuals']):.1e}"
                lines.append(line + ")")
        if "trace" in e:
            t = e["trace"]
            lines.append(f"  trace ({t['method']}): {t['estimate']:+.4e} ± {t['std_error']:.1e}")
        if "density" in e:
            low, high = e["density"]["node_range"]
            lines.append(
                f"  spectral density: {e['density']['probes']} probes, Ritz values in "
                f"[{low:+.3e}, {high:+.3e}], σ = {e['density']['sigma']:.1e}"
            )
        lines.append(f"  operator: {_describe_accuracy(e['accuracy'])}")
    if "diagonal" in r:
        lines.append("diagonal of H by parameter (Hutchinson): sum, mean |·|")
        for name, d in r["diagonal"].items():
            lines.append(
                f"  {name:<20} {d['sum']:+.4e}  {d['abs_mean']:.3e} ± {d['std_error']:.1e}"
            )
    if "blocks" in r:
        lines.append("top eigenvalues of each parameter's diagonal block of H")
        for name, values in r["blocks"].items():
            lines.append(f"  {name:<20} " + ", ".join(f"{v:+.3e}" for v in values))
    lines.append(f"total {r['seconds']:.1f} s; files: " + ", ".join(r["files"]))
    return lines


def _describe_accuracy(a: dict[str, Any]) -> str:
    if a["state_error"] is None and a["float64_error"] is None:
        # a model: its DEQ layers solve inside each product, and nothing measured them
        return (
            f"asymmetry ≈ {a['asymmetry']:.1e} — not the operator's error: the DEQ layers' "
            "own solve error, about their tol × ‖(I − J)⁻¹‖ relative, is not estimated for "
            "models (measure it against float64 with --dtype float32 --float64-probes, or "
            "tighten the layers' tol)"
        )
    text = f"relative error ≈ {a['estimate']:.1e}"
    if a["float64_error"] is not None:
        text += " (measured against float64"
    else:
        text += " (estimated"
    if a["state_error"] is None:
        return text + f"; asymmetry {a['asymmetry']:.1e})"
    how = "‖(I − J)⁻¹‖·‖f(h) − h‖/‖h‖" if a["condition_known"] else "‖f(h) − h‖/‖h‖"
    return text + f"; state {a['state_error']:.1e} from {how}, asymmetry {a['asymmetry']:.1e})"
