"""Forward solvers on the layer benchmark's cells: is a quasi-Newton (Broyden) solver worth adding?

For each problem of ``benchmarks/layer_training.py`` (and a harder tanh cell with
``‖W‖₂ = 0.97``), float32, one thread, relative tolerance 1e-5, on ``--device`` (``cpu``
by default): iterations and CPU time (wall time around synchronised calls on a GPU;
median of ``--repeats``) of deqhess's Anderson, Picard, and torchdeq 0.1's Anderson and
Broyden solvers (the latter two only when torchdeq is installed: ``make bench-extras``).
"""

from __future__ import annotations

import argparse

import torch
from common import add_device_argument, device_of, median_seconds, wall_or_cpu_clock
from layer_training import TanhCell, problems

from deqhess.solvers import Anderson, Picard, Tolerance, solve_fixed_point

TOL = 1e-5


def report(label: str, iterations: int, seconds: float) -> None:
    print(f"  {label:<18} {iterations:4d} iterations  {1e3 * seconds:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    add_device_argument(parser)
    args = parser.parse_args()
    device = device_of(args.device)
    clock = wall_or_cpu_clock(device)
    torch.set_num_threads(args.threads)
    cases = {name: (cell, x) for name, (cell, x, _) in problems(device=str(device)).items()}
    torch.manual_seed(3)
    hard = (TanhCell(norm=0.97).to(device), torch.randn(64, 16).to(device))
    cases["(c) tanh d=256 B=64 ‖W‖=0.97"] = hard
    try:
        from torchdeq.solver.anderson import anderson_solver
        from torchdeq.solver.broyden import broyden_solver

        theirs = {"torchdeq Anderson": anderson_solver, "torchdeq Broyden": broyden_solver}
    except ImportError:
        theirs = {}
        print("torchdeq not installed (make bench-extras): its solvers are skipped")
    what = "CPU-time" if device.type == "cpu" else "synchronised wall-time"
    print(
        f"threads={args.threads}, {device}, float32, rtol {TOL:g}, {what} median of {args.repeats}"
    )
    for name, (cell, x) in cases.items():
        init = getattr(cell, "init_state", None)
        z0 = torch.zeros_like(init(x) if callable(init) else x)
        rows = z0.reshape(z0.shape[0], -1)

        def step(r: torch.Tensor, cell=cell, x=x, z0=z0) -> torch.Tensor:
            return cell(x, r.reshape(z0.shape)).reshape(r.shape)

        print(f"\n{name}")
        with torch.no_grad():
            for label, solver in (("deqhess Anderson", Anderson()), ("deqhess Picard", Picard())):

                def run(solver=solver, step=step, rows=rows):
                    return solve_fixed_point(step, rows, solver, Tolerance(TOL, 0.0), 500)

                seconds = median_seconds(run, args.repeats, clock, device=device)
                report(label, run()[1].iterations, seconds)
            for label, solve in theirs.items():

                def run(solve=solve, cell=cell, x=x, z0=z0):
                    return solve(lambda z: cell(x, z), z0, max_iter=500, tol=TOL, stop_mode="rel")

                seconds = median_seconds(run, args.repeats, clock, device=device)
                report(label, int(run()[2]["nstep"].max()), seconds)


if __name__ == "__main__":
    main()
