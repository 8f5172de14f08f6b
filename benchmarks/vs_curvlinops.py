"""deqhess vs curvlinops, laplace-torch, PyHessian and hessian-eigenthings on whole DEQ models.

Run: ``python benchmarks/vs_curvlinops.py [--problems tanh,conv] [--forms
hessian,ggn,hvp,eigen] [--threads 1] [--repeats 3] [--device cpu] [--tanh 16,32,10]
[--tanh-data 4x32] [--conv 4,6,10] [--conv-data 3x16]`` (about 10 minutes here with the defaults;
``make bench-extras`` installs the other tools, and a tool that is missing is skipped).

The problems are ``curvature_models.py``'s ``encoder → deqhess.nn.DEQ(cell) → head``
classifiers in float64 (the cells: a tanh cell, and a conv cell whose per-sample state
is solved matrix-free), every tool running through the same deqhess layer; deqhess
is :class:`deqhess.ModelCurvature` with its defaults. The forms:

* ``hessian`` — the dense data-set Hessian: ``ModelCurvature.hessian()`` against
  curvlinops' ``HessianLinearOperator @ I``;
* ``ggn`` — the dense GGN: ``ggn_operator().to_dense()`` against curvlinops'
  ``GGNLinearOperator @ I`` and laplace-torch's GGN (its Jacobian route and backends);
* ``hvp`` — a block of 10 HVPs: ``hvp(V)`` (one pass) against curvlinops' ``op @ V``,
  and 10 single HVPs of PyHessian and of hessian-eigenthings;
* ``eigen`` — the top-5 Hessian eigenvalues: ``extreme_eigenpairs`` (thick-restart
  Lanczos on deqhess's HVPs, by default in blocks of max(2k, 8): every product is a pass over
  the data; and with one vector per step) against SciPy's ``eigsh`` on curvlinops'
  operator (same tolerance and start),
  PyHessian's power iteration (its defaults) and hessian-eigenthings' ``lanczos``.

Agreement is the largest entry of the difference over the largest entry of deqhess's
result (eigenvalues: against the eigenvalues of the dense Hessian curvlinops formed, when
the ``hessian`` form ran, else deqhess's). Times are this process's CPU time with
``--threads 1`` on the CPU (robust to other processes on a shared machine), wall time
around synchronised calls on a GPU: the median of ``--repeats`` calls after a warm-up
for the block of HVPs; for the dense forms and the eigenvalues one call (every tool was
warmed up by one product before), or, where that call took under :data:`QUICK` seconds,
the median of ``--repeats`` calls (that first one included). Every tool's calls are
repeated, where short, until they take about :data:`SHORT_TOTAL` seconds in all (at most
:data:`MOST_CALLS` calls), and a form's tools are timed interleaved: after each tool's
first call, the rest run in ``--repeats`` rounds that call every tool in turn, so every
median comes from the same stretch of the shared machine's time (:class:`Timer`). The
ratio is deqhess's time over the tool's; the goal of issue 20 is ≤ 0.5 against the
fastest other tool in every form (the summary also names the fastest tool that agrees
with deqhess to 1e-8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from common import (
    add_device_argument,
    device_of,
    synchronize,
    wall_or_cpu_clock,
)
from curvature_models import Problem, make_problem
from curvature_tools import (
    EigenthingsTool,
    PyHessianTool,
    curvlinops_dense,
    curvlinops_operator,
    curvlinops_top,
    installed,
    laplace_backends,
)

import deqhess as dh
from deqhess.curvature import extreme_eigenpairs

FORMS = ("hessian", "ggn", "hvp", "eigen")
TOP_K, BLOCK = 5, 10
#: hessian-eigenthings' Lanczos steps: its default (2k = 10) stops far from 1e-8
LANCZOS_STEPS = 60
#: the summary's ratio is against the fastest other tool that agrees with deqhess this well
EQUAL_ACCURACY = 1e-8
#: a dense form or eigensolve shorter than this (seconds) is timed as the median of
#: --repeats calls: one sub-second call moved 15% between runs
QUICK = 2.0
#: calls shorter than that are repeated until they took about this long in all (at most
#: MOST_CALLS): the median of three 35 ms HVP blocks moved 20% between runs
SHORT_TOTAL, MOST_CALLS = 2.0, 51


@dataclass
class Row:
    tool: str
    seconds: float | None = None
    result: Any = None
    agreement: float | None = None
    note: str = ""


@dataclass
class Entry:
    """A tool's call to time; ``once``: seconds long, so its first call counts (no warm-up)."""

    tool: str
    run: Callable[[], Any]
    once: bool = False


class Timer:
    """Times the tools of one form on the benchmark's clock, their calls interleaved.

    Every tool's first call comes first (a warm-up, timed to size its repeats; for a
    ``once`` entry the first timed call). The calls that follow run in --repeats rounds,
    each round calling every tool in turn (the order rotating from round to round), so
    each tool's median comes from the same stretch of the shared machine's time as the
    others' — a machine that slows down halfway slows every tool's calls alike. A failing
    tool becomes a row with its error.
    """

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats
        self.clock = wall_or_cpu_clock(device)

    def _timed(self, call: Callable[[], None]) -> float:
        synchronize(self.device)
        start = self.clock()
        call()
        synchronize(self.device)
        return self.clock() - start

    def _calls(self, seconds: float) -> int:
        """Calls to time for one that took ``seconds``: --repeats, or as many as make
        about :data:`SHORT_TOTAL` seconds (at most :data:`MOST_CALLS`)."""
        wanted = int(SHORT_TOTAL / max(seconds, 1e-9))
        return max(self.repeats, min(wanted, MOST_CALLS))

    def __call__(self, entries: list[Entry | Row]) -> list[Row]:
        """One row per entry (a :class:`Row` given as it is: a tool that could not be set up)."""
        rows: list[Row] = [e if isinstance(e, Row) else Row(e.tool) for e in entries]
        kept: dict[int, list[Any]] = {}
        times: dict[int, list[float]] = {}
        left: dict[int, int] = {}  # calls still to time, per entry
        calls: dict[int, Callable[[], None]] = {}

        def guarded(i: int, action: Callable[[], Any]) -> None:
            try:
                action()
            except Exception as error:  # a tool's own failure on this model is a result
                message = " ".join(str(error).split())[:110]
                rows[i] = Row(rows[i].tool, note=f"failed: {type(error).__name__}: {message}")
                left.pop(i, None)

        for i, entry in enumerate(entries):
            if isinstance(entry, Row):
                continue
            kept[i], times[i] = [None], []  # the last call's result

            def call(run: Callable[[], Any] = entry.run, out: list[Any] = kept[i]) -> None:
                out[0] = run()

            calls[i] = call

            def first(i: int = i, entry: Entry = entry) -> None:
                seconds = self._timed(calls[i])
                if entry.once:  # counted; repeated only where short
                    times[i].append(seconds)
                    left[i] = self._calls(seconds) - 1 if seconds < QUICK else 0
                else:  # the warm-up
                    left[i] = self._calls(seconds)

            guarded(i, first)
        rounds = self.repeats
        for r in range(rounds):
            order = list(left)
            order = order[r % len(order) :] + order[: r % len(order)] if order else order
            for i in order:
                if i not in left:
                    continue  # failed in an earlier round
                share = left[i] // (rounds - r) + (1 if left[i] % (rounds - r) else 0)
                left[i] -= share

                def timed(i: int = i, share: int = share) -> None:
                    times[i].extend(self._timed(calls[i]) for _ in range(share))

                guarded(i, timed)
        for i, seconds in times.items():
            if not rows[i].note.startswith("failed") and seconds:
                rows[i] = Row(rows[i].tool, statistics.median(seconds), kept[i][0])
        return rows


def difference(a: Any, b: Any) -> float:
    a, b = (
        torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t) for t in (a, b)
    )
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max())


def hessian_rows(problem: Problem, curvature: dh.ModelCurvature, time: Timer) -> list[Row]:
    entries: list[Entry | Row] = [
        Entry("deqhess ModelCurvature.hessian()", curvature.hessian, once=True)
    ]
    if installed("curvlinops"):
        op = curvlinops_operator(problem, "hessian")
        entries.append(
            Entry("curvlinops HessianLinearOperator @ I", lambda: curvlinops_dense(op), once=True)
        )
    return time(entries)


def ggn_rows(problem: Problem, curvature: dh.ModelCurvature, time: Timer) -> list[Row]:
    ggn = curvature.ggn_operator()
    entries: list[Entry | Row] = [
        Entry("deqhess ggn_operator().to_dense()", ggn.to_dense, once=True)
    ]
    if installed("curvlinops"):
        op = curvlinops_operator(problem, "ggn")
        entries.append(
            Entry("curvlinops GGNLinearOperator @ I", lambda: curvlinops_dense(op), once=True)
        )
    for label, run in laplace_backends().items():
        entries.append(Entry(label, lambda run=run: run(problem), once=True))
    return time(entries)


def hvp_rows(problem: Problem, curvature: dh.ModelCurvature, time: Timer) -> list[Row]:
    p, device = problem.num_parameters, time.device
    g = torch.Generator().manual_seed(2)
    block = torch.randn(p, BLOCK, generator=g, dtype=torch.float64).to(device)
    entries: list[Entry | Row] = [
        Entry(f"deqhess hvp([P, {BLOCK}]), one pass", lambda: curvature.hvp(block))
    ]
    if installed("curvlinops"):
        op = curvlinops_operator(problem, "hessian")
        entries.append(Entry(f"curvlinops op @ [P, {BLOCK}]", lambda: op @ block))
    singles = []
    if installed("pyhessian"):
        singles.append(("PyHessian", PyHessianTool))
    if installed("hessian_eigenthings"):
        singles.append(("hessian-eigenthings", EigenthingsTool))
    for label, make in singles:
        try:
            tool = make(problem)
        except Exception as error:
            entries.append(Row(label, note=f"failed: {type(error).__name__}: {error}"[:120]))
            continue
        entries.append(
            Entry(
                f"{label}, {BLOCK} single HVPs",
                lambda tool=tool: torch.stack([tool.hvp(v) for v in block.T], dim=1),
            )
        )
    return time(entries)


def eigen_rows(
    problem: Problem, curvature: dh.ModelCurvature, time: Timer, tol: float
) -> list[Row]:
    p = problem.num_parameters
    start = np.random.default_rng(0).standard_normal(p)
    op = curvature.hessian_operator()

    def ours(block: int | None = None):
        result = extreme_eigenpairs(op, k=TOP_K, tol=tol, block_size=block, progress=False)
        return np.sort(result.eigenvalues), result.num_hvps

    # the default: a streamed operator's blocks of max(2k, 8) (every product is a pass)
    entries: list[Entry | Row] = [
        Entry(f"deqhess extreme_eigenpairs (tol {tol:g})", ours, once=True),
        Entry("deqhess extreme_eigenpairs, block_size=1", lambda: ours(1), once=True),
    ]
    if installed("curvlinops"):
        linop = curvlinops_operator(problem, "hessian")
        entries.append(
            Entry(
                f"curvlinops + scipy eigsh (tol {tol:g})",
                lambda: curvlinops_top(linop, TOP_K, tol, start),
                once=True,
            )
        )
    if installed("pyhessian"):
        pyhessian = PyHessianTool(problem)
        entries.append(
            Entry(
                "PyHessian eigenvalues (power iteration, tol 1e-3)",
                lambda: pyhessian.top(TOP_K),
                once=True,
            )
        )
    if installed("hessian_eigenthings"):
        eigenthings = EigenthingsTool(problem)
        entries.append(
            Entry(
                f"hessian-eigenthings lanczos ({LANCZOS_STEPS} steps, tol {tol:g})",
                lambda: eigenthings.top(TOP_K, LANCZOS_STEPS, tol),
                once=True,
            )
        )
    rows = time(entries)
    for row in rows:
        if row.result is not None:
            row.result, hvps = row.result
            row.note = f"{hvps} HVPs; " + ", ".join(f"{v:.6g}" for v in row.result[::-1])
    return rows


def report(form: str, rows: list[Row], reference: Any) -> None:
    ours = rows[0]
    for row in rows:
        if row.result is not None and reference is not None:
            row.agreement = difference(row.result, reference)
    print(f"  {form}")
    for row in rows:
        seconds = f"{row.seconds:9.3f} s" if row.seconds is not None else f"{'—':>11}"
        agree = f"{row.agreement:9.1e}" if row.agreement is not None else f"{'—':>9}"
        ratio = (
            f"{ours.seconds / row.seconds:7.2f}"
            if row is not ours and row.seconds and ours.seconds
            else f"{'':7}"
        )
        print(f"    {row.tool:<52}{seconds}  {agree}  {ratio}  {row.note}")
    others = [r for r in rows[1:] if r.seconds and not r.tool.startswith("deqhess")]
    equal = [r for r in others if r.agreement is not None and r.agreement <= EQUAL_ACCURACY]
    for label, candidates in (("", others), (f" agreeing to ≤ {EQUAL_ACCURACY:g}", equal)):
        if ours.seconds and candidates:
            best = min(candidates, key=lambda r: r.seconds)
            print(
                f"    deqhess / fastest other{label} ({best.tool}): "
                f"{ours.seconds / best.seconds:.2f} (goal ≤ 0.5)"
            )


def run_problem(problem: Problem, args, device: torch.device) -> None:
    print(problem.describe())
    curvature = dh.ModelCurvature(problem.model, problem.loss_func, problem.data)
    print(
        "  deqhess: a dense form is one pass, each batch's P directions in blocks sized by "
        f"the memory a direction takes (at most {curvature.chunk_size}; 512 on the CPU)"
    )
    time = Timer(device, args.repeats)
    # warm every tool's one-off costs (tracing, first kernels) with one product
    warm = torch.ones(problem.num_parameters, dtype=torch.float64, device=device)
    curvature.hvp(warm)
    if installed("curvlinops"):
        curvlinops_operator(problem, "hessian") @ warm
    print(f"    {'tool':<52}{'time':>11}  {'agreement':>9}  {'ratio':>7}")
    dense_h = None
    for form in args.forms:
        if form == "hessian":
            rows = hessian_rows(problem, curvature, time)
            dense_h = next((r.result for r in rows[1:] if r.result is not None), rows[0].result)
            report("dense Hessian", rows, rows[0].result)
        elif form == "ggn":
            rows = ggn_rows(problem, curvature, time)
            report("dense GGN", rows, rows[0].result)
        elif form == "hvp":
            rows = hvp_rows(problem, curvature, time)
            report(f"block of {BLOCK} HVPs", rows, rows[0].result)
        elif form == "eigen":
            rows = eigen_rows(problem, curvature, time, args.eig_tol)
            ref = None if dense_h is None else torch.linalg.eigvalsh(dense_h.cpu())[-TOP_K:]
            report(
                f"top-{TOP_K} eigenvalues (agreement against the dense Hessian's)"
                if ref is not None
                else f"top-{TOP_K} eigenvalues",
                rows,
                ref if ref is not None else rows[0].result,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="tanh,conv", help="comma list of: tanh, conv")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma list of: {FORMS}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of products")
    parser.add_argument("--tanh", default="16,32,10", help="input, width, classes")
    parser.add_argument("--tanh-data", default="4x32", help="batches x batch size")
    parser.add_argument("--conv", default="4,6,10", help="channels, side, classes")
    parser.add_argument("--conv-data", default="3x16", help="batches x batch size")
    parser.add_argument("--eig-tol", type=float, default=1e-8)
    add_device_argument(parser)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    args.forms = args.forms.split(",")
    device = device_of(args.device)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device}; "
        "times: " + ("CPU time" if device.type == "cpu" else "wall, synchronised")
    )
    for name in args.problems.split(","):
        sizes = tuple(int(s) for s in getattr(args, name).split(","))
        batches, batch = (int(s) for s in getattr(args, f"{name}_data").split("x"))
        problem = make_problem(name, sizes, batches, batch, str(device))
        run_problem(problem, args, device)


if __name__ == "__main__":
    main()
