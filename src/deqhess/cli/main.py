"""``deqhess`` — the command line: ``deqhess demo`` and ``deqhess analyze``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqhess", description="Exact Hessians of deep equilibrium models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a DEQ on the digits data and report its exact Hessian"
    )
    demo.add_argument("--out", default="deqhess-demo", help="folder for the plot")
    demo.add_argument("--steps", type=int, default=150, help="training steps")
    demo.add_argument("--batch", type=int, default=128, help="samples in the Hessian's loss")
    demo.add_argument("--state", type=int, default=32, help="DEQ state width n")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument(
        "--large-state", type=int, default=192,
        help="state width of the demo's matrix-free section (0 skips it)",
    )  # fmt: skip

    analyze = commands.add_parser(
        "analyze",
        help="curvature analyses of your DEQ from a factory",
        description="Run curvature analyses on the data-set loss of the DEQ a factory returns "
        "(a deqhess.cli.AnalysisProblem); print a report, write plots and report.json.",
    )
    analyze.add_argument("factory", help="package.module:function or path/to/file.py:function")
    analyze.add_argument("--out", default="deqhess-analysis", help="folder for plots and report")
    analyze.add_argument(
        "--parts", default=None,
        help="comma list of: total, loss_curvature, dynamics_curvature, and ggn (the GGN "
        "at a model's output, for a ModelProblem); default: every part the problem defines",
    )  # fmt: skip
    analyze.add_argument("--top-k", type=int, default=5, help="top eigenvalues (0: none)")
    analyze.add_argument("--bottom-k", type=int, default=0, help="bottom eigenvalues")
    analyze.add_argument(
        "--trace", default="hutch++", choices=["hutch++", "hutchinson", "none"],
        help="trace estimator",
    )  # fmt: skip
    analyze.add_argument("--trace-hvps", type=int, default=60, help="HVPs for the trace")
    analyze.add_argument("--density", action="store_true", help="spectral density by SLQ")
    analyze.add_argument("--density-probes", type=int, default=8)
    analyze.add_argument("--density-steps", type=int, default=60)
    analyze.add_argument(
        "--diagonal", type=int, default=0, metavar="PROBES",
        help="estimate diag(H) with this many probes (0: skip)",
    )  # fmt: skip
    analyze.add_argument(
        "--blocks", action="store_true", help="top eigenvalues of each parameter's block"
    )
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deqhess`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ..demo import run_demo

        run_demo(
            out=args.out,
            steps=args.steps,
            hessian_batch=args.batch,
            state=args.state,
            large_state=args.large_state,
            seed=args.seed,
            progress=not args.no_progress,
        )
        return 0
    from .analyze import run_analysis
    from .problem import load_factory

    _join_torchrun_group()
    try:
        problem = load_factory(args.factory)
        run_analysis(
            problem,
            out=args.out,
            parts=None
            if args.parts is None
            else [p.strip() for p in args.parts.split(",") if p.strip()],
            top_k=args.top_k,
            bottom_k=args.bottom_k,
            trace=None if args.trace == "none" else args.trace,
            trace_hvps=args.trace_hvps,
            density=args.density,
            density_probes=args.density_probes,
            density_steps=args.density_steps,
            diagonal_probes=args.diagonal,
            blocks=args.blocks,
            seed=args.seed,
            # bars only on a terminal: logs stay line-oriented (no carriage returns)
            progress=None if not args.no_progress and sys.stdout.isatty() else False,
        )
    except ValueError as error:
        parser.exit(2, f"deqhess analyze: error: {error}\n")
    return 0


def _join_torchrun_group() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group: gloo on CPU,
    NCCL when CUDA is available; a 5-minute timeout so a lost rank cannot hang the rest."""
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
