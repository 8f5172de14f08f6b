"""Memory of ``ModelCurvature`` on an MDEQ-style conv model: per direction, and dense.

Run: ``python benchmarks/model_memory.py [--sections directions,dense] [--blocks 1,2,4,8,16]
[--cap-gb 6] [--channels 24] [--threads 1] [--device cpu]`` (on a GPU the memory is that of
torch's CUDA allocator, and the cap is the device's own size).

The model is ``curvature_models.py``'s ``mdeq`` (``examples/mdeq_digits.py``'s
MDEQ-style classifier) with 24 channels: 24 × 8 × 8 = 1,536 state values per sample,
float64, the DEQ's defaults (Anderson; the backward matrix-free, ``NeumannGMRES``), the
Hessian taken in the encoder's, the group norms' and the head's bias parameters
(P = 394; the cell's and the head's weights left out, as the issue's run chose a few
hundred). Every configuration runs in its own process.

* ``directions`` — one batch of 64: the RSS the batch's graph for the ``total`` Hessian
  adds (forward + first-order graph), then the peak RSS of one block product of K
  directions through it above the RSS before it (``graph.products``; the kernel's
  high-water mark reset first), and its time; the slope in K is the memory one
  direction costs, which a chunk size must be divided into;
* ``dense`` — ``ModelCurvature(...).hessian()`` over 4 batches of 64 (the issue's run),
  under a hard address-space cap (``--cap-gb``, ``resource.RLIMIT_AS``) and a time limit:
  whether it finishes, raises ``DenseMemoryError`` before it starts, or runs into the cap
  (the allocator's error), and the ``DenseMemoryError`` estimate's inputs (P × P).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time

import torch
from common import add_device_argument, device_of, in_subprocess, measure_operation
from curvature_models import make_problem

import deqhess as dh
from deqhess.models.graph import BatchGraph
from deqhess.nn import warm_starts

#: the parameters left out of the Hessian (the cell's and the head's weights).
LEFT_OUT = ("deq.cell.conv1.weight", "deq.cell.conv2.weight", "head.weight")


def _held_mb(device: torch.device) -> float:
    """The process's RSS (CPU), or the memory torch's CUDA allocator holds (GPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS")


def _problem(spec: dict):
    """The MDEQ model and its parameter subset; or, with ``--problem tanh|conv``, that
    ``curvature_models.py`` problem (default sizes) with every parameter."""
    name = spec["problem"]
    sizes = (spec["channels"], 8, 10) if name == "mdeq" else None
    problem = make_problem(name, sizes, spec["batches"], spec["batch"], device=spec["device"])
    if spec.get("linear_solver"):
        problem.model.deq.linear_solver = spec["linear_solver"]
    names = [n for n, _ in problem.model.named_parameters() if n not in LEFT_OUT]
    return problem, names


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec.get("cap_gb") and device.type == "cpu":
        cap = int(spec["cap_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    problem, names = _problem(spec)
    curvature = dh.ModelCurvature(problem.model, problem.loss_func, problem.data, theta=names)
    p = curvature.num_parameters
    if spec["kind"] == "dense":
        start = time.perf_counter()

        def stop(signum, frame):
            raise TimeoutError("not finished")

        signal.signal(signal.SIGALRM, stop)
        signal.alarm(int(spec["time_limit"]))
        try:
            curvature.hessian()
            outcome = "finished"
        except dh.DenseMemoryError as error:
            outcome = f"DenseMemoryError: {error}"
        except TimeoutError:
            outcome = "not finished (time limit)"
        except (RuntimeError, MemoryError) as error:  # the allocator's, at the cap
            outcome = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
        signal.alarm(0)
        return dict(
            parameters=p,
            chunk=curvature.chunk_size,
            outcome=outcome,
            seconds=time.perf_counter() - start,
            peak_mb=_peak_mb(device),
        )
    x, y = problem.data[0]
    store: dict = {}
    before = _held_mb(device)

    def graph():
        with warm_starts(store):
            return BatchGraph(
                curvature.model,
                curvature.loss,
                curvature.layout,
                curvature._leaves(),
                x,
                y,
                float(x.shape[0]),
                "total",
                None,
                curvature.backward,
            )

    graph()  # the first pass: cold solve, fills the warm start
    built = graph()
    graph_mb = _held_mb(device) - before
    v = torch.randn(spec["k"], p, dtype=torch.float64, device=device)
    measured = measure_operation(lambda: built.products(v), repeats=1, device=device)
    return dict(parameters=p, chunk=curvature.chunk_size, graph_mb=graph_mb, **measured)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sections", default="directions,dense")
    parser.add_argument("--blocks", default="1,2,4,8,16")
    parser.add_argument("--channels", type=int, default=24)
    parser.add_argument("--problem", default="mdeq", help="mdeq (default), tanh or conv")
    parser.add_argument("--batch", type=int, default=64, help="samples per batch")
    parser.add_argument("--linear-solver", default=None, help="the layer's, instead of auto")
    parser.add_argument("--cap-gb", type=float, default=6.0)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds, dense run")
    parser.add_argument("--threads", type=int, default=1)
    add_device_argument(parser)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    device = device_of(args.device)
    base = dict(
        threads=args.threads, channels=args.channels, device=str(device), problem=args.problem,
        batch=args.batch, linear_solver=args.linear_solver,
    )  # fmt: skip
    sections = args.sections.split(",")
    what = (
        f"MDEQ-style model, {args.channels} × 8 × 8 = {args.channels * 64:,} state values per "
        "sample" if args.problem == "mdeq" else f"the {args.problem} problem"
    )  # fmt: skip
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {device}; {what}, float64, "
        f"batches of {args.batch}; the layer's linear solver {args.linear_solver or 'auto'}"
    )
    if "directions" in sections:
        print(f"directions: one batch of {args.batch}, the total Hessian's graph, then K "
              "directions")  # fmt: skip
        print("      K   graph MB   products peak MB   per direction MB   seconds   s/direction")
        rows = []
        for k in (int(b) for b in args.blocks.split(",")):
            r = in_subprocess(__file__, dict(base, kind="directions", batches=1, k=k))
            rows.append((k, r["op_peak_mb"]))
            print(
                f"  {k:5d}  {r['graph_mb']:9.1f}  {r['op_peak_mb']:17.1f}  "
                f"{r['op_peak_mb'] / k:17.1f}  {r['seconds']:8.2f}  {r['seconds'] / k:11.3f}"
            )
        if len(rows) > 1:
            (k0, m0), (k1, m1) = rows[0], rows[-1]
            print(
                f"  slope: {(m1 - m0) / (k1 - k0):.1f} MB per direction "
                f"(P = {r['parameters']}, default chunk_size {r['chunk']})"
            )
    if "dense" in sections:
        spec = dict(base, kind="dense", batches=4, cap_gb=args.cap_gb, time_limit=args.time_limit)
        r = in_subprocess(__file__, spec)
        print(
            f"dense: hessian() over 4 batches of {args.batch}, P = {r['parameters']}, chunk_size "
            f"{r['chunk']} (the P × P result: {r['parameters'] ** 2 * 8 / 1e6:.1f} MB), "
            f"address space capped at {args.cap_gb:g} GB: {r['outcome']} after "
            f"{r['seconds']:.0f} s, peak RSS {r['peak_mb']:,.0f} MB"
        )


if __name__ == "__main__":
    main()
