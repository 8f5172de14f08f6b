"""``deqhess`` — the command line: ``deqhess demo`` and ``deqhess analyze``.

Errors: deqhess's own (every :class:`deqhess.DeqhessError`) are printed as one message
with exit status 2 (bad input, a ``ValueError``) or 1 (a numerical failure); any other
exception — from the user's factory, cell or loss — propagates with its traceback, since
that is where its cause lies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import AnalysisConvergenceError, ConvergenceError, DeqhessError

__all__ = ["main"]

_DTYPES = ("float32", "float64")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text; descriptions kept as written.

    A default of None or False, or one the help text already names, is not repeated.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action) or text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqhess",
        description="Exact Hessians of deep equilibrium models.",
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a DEQ on the digits data and report its exact Hessian",
        description="Train a DEQ classifier on the digits data, report its exact Hessian "
        "(checks, spectra, the share of the dynamics curvature) and write plots.",
        formatter_class=_Formatter,
    )
    demo.add_argument("--out", default="deqhess-demo", help="folder for the plots")
    demo.add_argument("--steps", type=int, default=150, help="training steps")
    demo.add_argument("--batch", type=int, default=128, help="samples in the Hessian's loss")
    demo.add_argument("--state", type=int, default=32, help="DEQ state width n")
    demo.add_argument("--seed", type=int, default=0, help="seed of data split and training")
    demo.add_argument(
        "--large-state", type=int, default=192,
        help="state width of the demo's matrix-free section (0 skips it)",
    )  # fmt: skip
    demo.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; the demo's tensors are small, and more threads only wait "
        "on each other (10× slower on a busy 2-core machine)",
    )  # fmt: skip
    _progress_flag(demo)

    analyze = commands.add_parser(
        "analyze",
        help="curvature analyses of your DEQ from a factory",
        description="Run curvature analyses on the data-set loss of the DEQ a factory returns "
        "(a deqhess.cli.AnalysisProblem); print a report, write plots and report.json.\n"
        "Solver flags override the factory's options.",
        formatter_class=_Formatter,
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
    analyze.add_argument("--density-probes", type=int, default=8, help="SLQ probes")
    analyze.add_argument("--density-steps", type=int, default=60, help="Lanczos steps per probe")
    analyze.add_argument(
        "--diagonal", type=int, default=0, metavar="PROBES",
        help="estimate diag(H) with this many probes (0: skip)",
    )  # fmt: skip
    analyze.add_argument(
        "--blocks", action="store_true", help="top eigenvalues of each parameter's block"
    )
    analyze.add_argument(
        "--float64-probes", type=int, default=4, metavar="N",
        help="for analyses below float64: rebuild the problem in float64 and measure the "
        "operator's error on N probe products and the eigenpairs' residuals (0: skip). "
        "Costs a second forward solve of every batch in float64 (to float64's tolerance, its "
        "solved batches kept beside the float32 ones), then per part N products of each "
        "operator and k float64 products per eigenvalue list",
    )  # fmt: skip
    analyze.add_argument("--seed", type=int, default=0, help="seed of the random probes")
    solve = analyze.add_argument_group("solver options (each default: the factory's)")
    solve.add_argument("--solver", help="forward solver: anderson or picard")
    solve.add_argument(
        "--tol", type=float,
        help="forward tolerance, relative (the factory's, else by dtype); with it, the "
        "absolute one is the same unless --atol says otherwise (a factory's looser atol "
        "would stop the solve first)",
    )  # fmt: skip
    solve.add_argument("--atol", type=float, help="forward tolerance, absolute")
    solve.add_argument("--max-iter", type=int, help="forward iterations cap")
    solve.add_argument("--linear-solver", help="auto, dense, gmres, neumann or neumann-gmres")
    solve.add_argument(
        "--exclude-unconverged", action="store_true",
        help="leave out (and count) the samples whose forward solve misses the tolerance, "
        "instead of stopping at the first (keeps each one's best iterate only to drop it)",
    )  # fmt: skip
    solve.add_argument("--dtype", choices=_DTYPES, help="cast θ, the cell and the data")
    solve.add_argument("--device", help="move θ, the cell and the data, e.g. cuda:0")
    analyze.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    _progress_flag(analyze)
    return parser


def _progress_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bars (default: only on a terminal; otherwise plain lines)",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deqhess`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1; got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "demo":
            _demo(args)
        else:
            _analyze(args)
    except DeqhessError as error:  # deqhess's own: reported; the user's code's: its traceback
        return _report_error(args.command, error)
    return 0


def _demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(
        out=args.out,
        steps=args.steps,
        hessian_batch=args.batch,
        state=args.state,
        large_state=args.large_state,
        seed=args.seed,
        progress=args.progress,
    )


def _analyze(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    joined = _join_torchrun_group()
    # the group is left here, not at the interpreter's exit (which aborted a rank now and
    # then with gloo's threads still up: "terminate called without an active exception");
    # after a barrier, so that no rank closes its connections while another still reads
    try:
        _analyze_in_group(args)
    except BaseException:
        if joined:
            dist.destroy_process_group()
        raise
    if joined:
        dist.barrier()
        dist.destroy_process_group()


def _analyze_in_group(args: argparse.Namespace) -> None:
    import torch

    from .analyze import check_request, run_analysis
    from .factory import load_factory

    overrides = {
        "solver": args.solver,
        "tol": args.tol,
        # --tol alone: its own absolute tolerance too (a factory's atol=1e-3 kept the
        # residual at 9e-4 under --tol 1e-11, and the warning said to tighten tol)
        "atol": args.tol if args.atol is None else args.atol,
        "max_iter": args.max_iter,
        "linear_solver": args.linear_solver,
    }
    if args.exclude_unconverged:
        overrides.update(exclude_unconverged=True, convergence="best")
    request = dict(
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
        float64_probes=args.float64_probes,
        device=args.device,
    )
    check_request(**request)  # before the factory runs: it may take long
    problem = load_factory(args.factory)
    run_analysis(
        problem,
        **request,
        blocks=args.blocks,
        seed=args.seed,
        progress=args.progress,
        dtype=None if args.dtype is None else getattr(torch, args.dtype),
        options={k: v for k, v in overrides.items() if v is not None},
    )


def _report_error(command: str, error: BaseException) -> int:
    kind = "" if isinstance(error, ValueError) else f"{type(error).__name__}: "
    lines = [f"deqhess {command}: error: {kind}{error}"]
    cause = error.__cause__
    if cause is not None:
        lines.append(f"  caused by {type(cause).__name__}: {cause}")
    if (  # a fixed point's solve, not an analysis at its cap
        command == "analyze"
        and isinstance(error, ConvergenceError)
        and not isinstance(error, AnalysisConvergenceError)
    ):
        lines.append(
            "  (deqhess analyze --exclude-unconverged leaves such samples out and counts them)"
        )
    print("\n".join(lines), file=sys.stderr)
    return 2 if isinstance(error, ValueError) else 1


def _join_torchrun_group() -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group.

    Gloo on CPU, NCCL when CUDA is available; a 5-minute timeout so that a lost rank
    cannot hang the rest.

    Returns:
        Whether this call joined it (the command then leaves it at its end).
    """
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
        return True
    return False
