"""Where ``ModelCurvature``'s time goes on dense forms, and the output-Jacobian GGN route.

Run: ``python benchmarks/model_profile.py [--problems tanh,conv] [--sections
breakdown,jacobian,equilibrium,ops] [--threads 1] [--device cpu] [--blocks 1,8,64] [--data 3x16]
[--linear-solver dense]``.

* ``breakdown`` — one batch of each problem (``curvature_models.py``), as
  ``ModelCurvature`` runs it on a pass after the first (the DEQ warm-started): the
  forward (``BatchGraph`` for the loss alone), the first-order graph the part's
  products differentiate again (``BatchGraph`` for the part, less the forward), and one
  block product of K directions through a fresh graph (``graph.products``, less the
  graph), per direction, for the
  ``total`` Hessian and the ``ggn``; with the layer's linear-solve products and
  iterations per direction (its ``LayerInfo``), and, from these, the dense form's cost:
  ``passes × batches × (forward + first-order graph) + P × batches × (per direction)``
  with ``passes = ⌈P / chunk_size⌉``;
* ``jacobian`` — the GGN from the output's Jacobian instead of P products: per batch,
  ``J`` (``[n·C, P]``) by one vmapped backward of the n·C one-hot cotangents (exact for
  any model: laplace-torch's route), ``∇²ℓ`` at the output (``[n·C, n·C]``, a backward of
  the loss's output gradient along the same one-hot rows) times J, and
  ``G = Jᵀ(∇²ℓ J)`` (one GEMM); and ``J`` per sample
  (``vmap`` over samples of ``jacrev``: C backwards in all, valid when samples are
  independent); each timed, the GGN checked against ``ggn_operator().to_dense()``;
* ``equilibrium`` — the dense Hessian of ``encoder → DEQ → head`` per batch through
  :class:`deqhess.Equilibrium` (``f`` the cell fed by the encoder, ``L(h, θ)`` the head
  and the loss, θ every parameter): ``Z`` formed and the Hessian assembled by GEMMs, the
  route ``Equilibrium.hessian`` takes, against ``ModelCurvature.hessian()``;
* ``ops`` — ``torch.profiler``'s top operators (self CPU time) of one block product of
  the Hessian (K = the largest ``--blocks``).

Times are medians of this process's CPU time with one thread on the CPU (robust to other
processes on a shared machine), of wall time around synchronised calls on a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from common import (
    add_device_argument,
    device_of,
    median_seconds,
    synchronize,
    wall_or_cpu_clock,
)
from curvature_models import Problem, make_problem

import deqhess as dh
from deqhess.models.backward import BlockBackward
from deqhess.models.graph import BatchGraph
from deqhess.nn import warm_starts

#: this process's CPU time on the CPU (one thread: robust to a shared machine), wall time
#: around synchronised calls on a GPU
CLOCK = time.process_time


def _timed(run, device):
    """``run()`` and the seconds it took on :data:`CLOCK`, the device synchronised."""
    synchronize(device)
    tic = CLOCK()
    result = run()
    synchronize(device)
    return result, CLOCK() - tic


def _graph(curvature: dh.ModelCurvature, problem: Problem, part: str | None, store: dict):
    x, y = problem.data[0]
    params = curvature._leaves()
    with warm_starts(store):
        return BatchGraph(
            curvature.model,
            curvature.loss,
            curvature.layout,
            params,
            x,
            y,
            float(x.shape[0]),
            part,
            curvature.split_at,
            curvature.backward,
        )


def _solve_counts(problem: Problem, run) -> tuple[int, int, int]:
    """The layer's linear solves (each over a block of right-hand sides), their products
    with ``I − J`` or its transpose, and the most products one solve took, in ``run``."""
    problem.model.infos = []
    try:
        run()
        stats = [info.linear_solves for info in problem.model.infos]
        return (
            sum(s.solves for s in stats),
            sum(s.products for s in stats),
            max((s.max_iterations for s in stats), default=0),
        )
    finally:
        problem.model.infos = None


def breakdown(problem: Problem, blocks: list[int], device, repeats: int) -> None:
    curvature = dh.ModelCurvature(problem.model, problem.loss_func, problem.data)
    p, chunk = problem.num_parameters, curvature.chunk_size
    print(
        f"  chunk_size {chunk} ({math.ceil(p / chunk)} passes for a dense form); "
        f"backward mode {curvature.backward.mode}"
    )
    store: dict = {}
    _graph(curvature, problem, None, store)  # fills the warm start, as a first pass does
    forward = median_seconds(
        lambda: _graph(curvature, problem, None, store), repeats, CLOCK, device=device
    )
    print(f"    forward (warm DEQ)         {forward * 1e3:9.1f} ms per batch")
    for part in ("total", "ggn"):
        _part_breakdown(
            curvature, problem, part, store, forward, [*blocks, min(chunk, p)], device, repeats
        )


def _part_breakdown(curvature, problem, part, store, forward, blocks, device, repeats) -> None:
    """The first-order graph and the block products of one part, and the dense estimate."""
    p, batches = problem.num_parameters, len(problem.data)
    passes = math.ceil(p / curvature.chunk_size)

    def build():
        return _graph(curvature, problem, part, store)

    built = median_seconds(build, repeats, CLOCK, device=device)
    first = built - forward
    print(f"    {part}: first-order graph {first * 1e3:9.1f} ms per batch")
    per_direction = 0.0
    for k in blocks:
        v = torch.randn(k, p, dtype=torch.float64, device=device)
        # a fresh graph each time, as each pass builds one: products on a graph that already
        # ran them would warm-start the layer's iterative solves from their own answers
        seconds = (
            median_seconds(
                lambda v=v: build().products(v), 1 if k > 64 else repeats, CLOCK, device=device
            )
            - built
        )
        solves, products, most = _solve_counts(problem, lambda v=v: build().products(v))
        per_direction = seconds / k
        print(
            f"      K = {k:5d}: {seconds * 1e3:9.1f} ms, {per_direction * 1e3:8.3f} ms per "
            f"direction; the layer (graph + products): {solves} solves, {products} "
            f"products with I − J or its transpose (each on all K directions), ≤ {most} "
            "per solve"
        )
    dense = passes * batches * (forward + first) + p * batches * per_direction
    print(
        f"      dense {part} ≈ {passes}·{batches}·{(forward + first) * 1e3:.0f} ms + "
        f"{p}·{batches}·{per_direction * 1e3:.2f} ms = {dense:.1f} s"
    )


def jacobian_ggn(problem: Problem, device, check: bool) -> None:
    """The GGN from output Jacobians, timed piece by piece, against ``to_dense``."""
    curvature = dh.ModelCurvature(problem.model, problem.loss_func, problem.data)
    p, c = problem.num_parameters, problem.classes
    total = torch.zeros(p, p, dtype=torch.float64, device=device)
    clock = dict.fromkeys(("graph", "J", "HJ", "GEMM", "J per sample"), 0.0)
    store: dict = {}
    x, y = problem.data[0]
    _batch_ggn(curvature, x, y, store, total.clone(), clock.copy(), device)  # one-off costs
    for x, y in problem.data:
        agree = _batch_ggn(curvature, x, y, store, total, clock, device)
    ggn = total / problem.num_samples
    n = problem.data[0][0].shape[0]
    print(
        f"  n·C = {n}·{c} = {n * c} Jacobian rows per batch, P = {p}; summed over "
        f"{len(problem.data)} batches:"
    )
    print(
        "    "
        + ", ".join(f"{k} {v:.3f} s" for k, v in clock.items())
        + f" (per-sample J equals the generic one to {agree:.1e})"
    )
    route = clock["J"] + clock["HJ"] + clock["GEMM"]
    print(
        f"    Jacobian route (J, ∇²ℓ J, GEMM): {route:.2f} s; with J per sample: "
        f"{route - clock['J'] + clock['J per sample']:.2f} s"
    )
    if check:
        reference, products = _timed(curvature.ggn_operator().to_dense, device)
        diff = float((ggn - reference).abs().max() / reference.abs().max())
        print(
            f"    products route ggn_operator().to_dense(): {products:.2f} s; the two "
            f"agree to {diff:.1e}; products / Jacobian route = {products / route:.1f}"
        )


def _batch_ggn(curvature, x, y, store, total, clock, device) -> float:
    """Adds one batch's ``Jᵀ ∇²ℓ J`` to ``total`` and its stages' seconds to ``clock``;
    returns how far the per-sample Jacobian is from the generic one."""
    backward = BlockBackward("vmap")

    def build():
        with warm_starts(store):
            return BatchGraph(
                curvature.model, curvature.loss, curvature.layout, curvature._leaves(),
                x, y, float(x.shape[0]), "ggn", None, backward,
            )  # fmt: skip

    graph, clock["graph"] = _add(clock["graph"], _timed(build, device))
    (output,) = graph.outputs
    rows = output.numel()
    eye = torch.eye(rows, dtype=output.dtype, device=device).reshape(rows, *output.shape)

    def jacobian():
        return torch.cat([g.reshape(rows, -1) for g in backward([output], graph.params, [eye])], 1)

    def loss_hessian_times_jacobian():
        (hessian,) = backward(graph.out_grad, graph.out_leaves, [eye])  # ∇²ℓ, [rows, rows]
        return hessian.reshape(rows, rows) @ jac

    jac, clock["J"] = _add(clock["J"], _timed(jacobian, device))
    hj, clock["HJ"] = _add(clock["HJ"], _timed(loss_hessian_times_jacobian, device))
    _, clock["GEMM"] = _add(clock["GEMM"], _timed(lambda: total.addmm_(jac.T, hj), device))
    per_sample, clock["J per sample"] = _add(
        clock["J per sample"],
        _timed(lambda: _per_sample_jacobian(curvature.model, curvature, x), device),
    )
    return float((per_sample.reshape(rows, -1) - jac).abs().max() / jac.abs().max())


def _add(seconds: float, timed: tuple) -> tuple:
    result, more = timed
    return result, seconds + more


def _per_sample_jacobian(model, curvature: dh.ModelCurvature, x):
    """``[n, C, P]``: ``vmap`` over samples of ``jacrev`` of one sample's output."""
    names = curvature.layout.names
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}

    def one(sample):
        def out(theta):
            return torch.func.functional_call(model, theta, (sample[None],))[0]

        jac = torch.func.jacrev(out)(params)
        return torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in names], dim=1)

    with warm_starts({}):
        return torch.func.vmap(one)(x)


def equilibrium_route(problem: Problem, device) -> None:
    """The model's dense Hessian per batch by :class:`deqhess.Equilibrium`'s dense assembly
    (``f`` = the cell fed by the encoder, ``L(h, θ)`` = the head and the loss: for
    ``encoder → DEQ → head`` this is the model's loss, and θ all its parameters) against
    ``ModelCurvature.hessian()``."""
    model, loss_func, n_total = problem.model, problem.loss_func, problem.num_samples
    theta = {k: v.detach() for k, v in model.named_parameters()}
    parts = {
        name: {k[len(name) + 1 :]: k for k in theta if k.startswith(name + ".")}
        for name in ("encoder", "deq.cell", "head")
    }

    def call(name: str, t: dict, *args):
        module = model.get_submodule(name)
        return torch.func.functional_call(module, {k: t[full] for k, full in parts[name].items()},
                                          args)  # fmt: skip

    def f(x, h, t):
        return call("deq.cell", t, call("encoder", t, x), h)

    def dense(batches):
        total = 0.0
        for x, y in batches:
            weight = x.shape[0] / n_total

            def loss(h, t, y=y, weight=weight):
                return weight * loss_func(call("head", t, h), y)

            with torch.no_grad():  # start from the layer's fixed point: the same point
                h0 = model.deq(model.encoder(x))
            eq = dh.Equilibrium(f, theta, x, h0, batch_dim=0)
            total = total + eq.hessian(loss)
        return total, eq.info.linear_solver

    dense(problem.data[:1])  # one-off costs (torch.func's first use imports torch._dynamo)
    (total, linear_solver), seconds = _timed(lambda: dense(problem.data), device)
    curvature = dh.ModelCurvature(model, loss_func, problem.data)
    curvature.hvp(torch.ones(problem.num_parameters, dtype=torch.float64, device=device))
    reference, products = _timed(curvature.hessian, device)
    diff = float((total - reference).abs().max() / reference.abs().max())
    print(
        f"  dense Hessian by Equilibrium.hessian per batch (Z formed, GEMM assembly; linear "
        f"solver {linear_solver}): {seconds:.2f} s; ModelCurvature.hessian(): "
        f"{products:.2f} s; agreement {diff:.1e}; ratio {seconds / products:.2f}"
    )


def operators(problem: Problem, k: int, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    curvature = dh.ModelCurvature(problem.model, problem.loss_func, problem.data)
    store: dict = {}
    _graph(curvature, problem, None, store)
    graph = _graph(curvature, problem, "total", store)
    v = torch.randn(k, problem.num_parameters, dtype=torch.float64, device=device)
    graph.products(v)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        graph.products(v)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    print("\n".join("    " + line for line in table.splitlines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="tanh,conv", help="comma list of: tanh, conv, mdeq")
    parser.add_argument("--sections", default="breakdown,jacobian,equilibrium,ops")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", default="1,8,64", help="block sizes K to time")
    parser.add_argument("--tanh", default="16,32,10")
    parser.add_argument("--conv", default="4,6,10")
    parser.add_argument("--mdeq", default="24,8,10")
    parser.add_argument("--data", default="3x16", help="batches x batch size")
    parser.add_argument("--no-check", action="store_true", help="skip the dense GGN check")
    parser.add_argument(
        "--linear-solver", default=None,
        help="set the DEQ layer's linear_solver (e.g. dense: an LU per sample) instead of auto",
    )  # fmt: skip
    add_device_argument(parser)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    device = device_of(args.device)
    global CLOCK
    CLOCK = wall_or_cpu_clock(device)
    torch.set_num_threads(args.threads)
    batches, batch = (int(s) for s in args.data.split("x"))
    blocks = [int(k) for k in args.blocks.split(",")]
    sections = args.sections.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device}")
    for name in args.problems.split(","):
        sizes = tuple(int(s) for s in getattr(args, name).split(","))
        problem = make_problem(name, sizes, batches, batch, str(device))
        if args.linear_solver is not None:
            problem.model.deq.linear_solver = args.linear_solver
        print(f"{problem.describe()}; the layer's linear_solver {problem.model.deq.linear_solver}")
        if "breakdown" in sections:
            breakdown(problem, blocks, device, args.repeats)
        if "jacobian" in sections:
            jacobian_ggn(problem, device, not args.no_check)
        if "equilibrium" in sections:
            equilibrium_route(problem, device)
        if "ops" in sections:
            operators(problem, max(blocks), device)


if __name__ == "__main__":
    main()
