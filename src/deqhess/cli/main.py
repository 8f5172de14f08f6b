"""``deqhess`` — the command line: ``deqhess demo``."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deqhess`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ..demo import run_demo

        run_demo(
            out=args.out,
            steps=args.steps,
            hessian_batch=args.batch,
            state=args.state,
            seed=args.seed,
            progress=not args.no_progress,
        )
    return 0
