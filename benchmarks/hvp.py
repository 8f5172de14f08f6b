"""Cached gradient vs cached HVP vs unrolled and finite-difference HVPs, time and memory.

Run: ``python benchmarks/hvp.py`` (add ``--sizes 82k`` or ``--sizes 1M`` for one;
``--device cuda`` on a GPU, where the memory is the peak of torch's CUDA allocator).
Each timed configuration runs in its own subprocess; its memory is the peak RSS of
the operation alone (the kernel's high-water mark is reset just before it,
``/proc/self/clear_refs``) above the RSS it started from, and the peak of the whole
process. "Cached" means the fixed point and the linear solver's set-up are reused
while every call does its own solves: the gradient redoes ∇ₕL, its adjoint solve and
its VJP (a fresh loss object each call defeats the adjoint cache); the HVP its two
solves and AD passes. Iteration caps run the forward solver with ``tol=0`` for exactly
``max_iter`` steps, so the caps bind.
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings

import torch
from common import (
    add_device_argument,
    device_of,
    flatten,
    in_subprocess,
    measure_operation,
    relative,
    tanh_deq,
    unflatten,
    unrolled_loss,
)

import deqhess as dh

CONFIGS = {
    "82k": dict(n=256, m=64, batch=64, dtype="float64"),
    "1M": dict(n=1024, m=64, batch=64, dtype="float32"),
}
TOL = {"float64": 1e-13, "float32": None}  # float64: solve the state to ~1e-13
REFERENCE_STEPS = 150
STEP = {"float64": 1e-5, "float32": 1e-2}


def _problem(cfg, device: str = "cpu"):
    dtype = getattr(torch, cfg["dtype"])
    f, loss, theta, x, h0 = tanh_deq(cfg["n"], cfg["m"], cfg["batch"], dtype=dtype, device=device)
    v = torch.randn(
        flatten(theta).numel(), generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    return f, loss, theta, x, h0, (v / v.norm()).to(dtype=dtype, device=device)


def _unrolled_hvp(f, loss, theta, x, h0, steps):
    gradient = torch.func.grad(unrolled_loss(f, loss, theta, x, h0, steps))
    flat = flatten(theta)
    return lambda v: torch.func.jvp(gradient, (flat,), (v,))[1]


def child(spec: dict) -> dict:
    """One configuration: set up, reset the high-water mark, run the operation."""
    torch.set_num_threads(spec.get("threads", 1))
    torch.manual_seed(0)
    device = spec.get("device", "cpu")
    f, loss, theta, x, h0, v = _problem(CONFIGS[spec["size"]], device)
    kind, repeats = spec["kind"], spec.get("repeats", 5)
    opts = dict(
        batch_dim=0,
        linear_solver=spec.get("linear", "auto"),
        tol=TOL[CONFIGS[spec["size"]]["dtype"]],
    )
    if "max_iter" in spec:
        opts.update(tol=0.0, atol=0.0, max_iter=spec["max_iter"], require_convergence=False)
    warnings.simplefilter("ignore", RuntimeWarning)  # the forced caps do not converge

    def setup_and(op):
        eq = dh.Equilibrium(f, theta, x, h0, **opts)
        _ = (eq.linearization, eq.parameter_products)  # one-time set-up: LU, pullback
        eq.grad(loss)  # λ for the HVP's loss
        return lambda: op(eq)

    if kind == "grad":
        run = setup_and(lambda eq: eq.grad(functools.partial(loss)))
    elif kind == "hvp":
        run = setup_and(lambda eq: eq.hvp(loss, v))
    elif kind == "solve+hvp":

        def run():
            return dh.Equilibrium(f, theta, x, h0, **opts).hvp(loss, v)
    elif kind == "unrolled":
        run = _unrolled_hvp(f, loss, theta, x, h0, spec["steps"])
        run = functools.partial(run, v)
    elif kind == "fd":
        step = STEP[CONFIGS[spec["size"]]["dtype"]]

        def gradient(t):
            eq = dh.Equilibrium(f, unflatten(t, theta), x, h0, **opts)
            return flatten(eq.grad(loss))

        flat = flatten(theta)

        def run():
            return (gradient(flat + step * v) - gradient(flat - step * v)) / (2 * step)
    else:
        raise ValueError(kind)
    return measure_operation(run, repeats, device=device)


THREADS, DEVICE = 1, "cpu"


def measure(**spec) -> dict:
    return in_subprocess(__file__, {"threads": THREADS, "device": DEVICE, **spec})


def accuracy(size: str) -> tuple[float, int, float]:
    """deqhess HVP error vs a K=150 float64 unrolled reference; K matching it; FD error."""
    cfg = CONFIGS[size]
    f, loss, theta, x, h0, v = _problem(cfg, DEVICE)
    f64 = _problem({**cfg, "dtype": "float64"}, DEVICE)
    reference = _unrolled_hvp(*f64[:5], REFERENCE_STEPS)(f64[5])
    tol = TOL[cfg["dtype"]]
    eq = dh.Equilibrium(f, theta, x, h0, batch_dim=0, tol=tol)
    err = relative(eq.hvp(loss, v).double(), reference)
    floor = max(err, 1e-14)
    for steps in range(5, REFERENCE_STEPS, 5):
        approx = _unrolled_hvp(f, loss, theta, x, h0, steps)(v).double()
        if relative(approx, reference) <= floor:
            break
    step = STEP[cfg["dtype"]]
    flat = flatten(theta)

    def gradient(t):
        eq = dh.Equilibrium(f, unflatten(t, theta), x, h0, batch_dim=0, tol=tol)
        return flatten(eq.grad(loss))

    fd = (gradient(flat + step * v) - gradient(flat - step * v)) / (2 * step)
    return err, steps, relative(fd.double(), reference)


def report(size: str) -> None:
    cfg = CONFIGS[size]
    p = cfg["n"] ** 2 + cfg["n"] * cfg["m"] + cfg["n"]
    print(f"\n== tanh DEQ n={cfg['n']} m={cfg['m']} B={cfg['batch']}, {cfg['dtype']}: P = {p:,} ==")
    err, steps, fd_err = accuracy(size)
    print(
        f"HVP error vs K={REFERENCE_STEPS} unrolled float64: {err:.1e}; unrolled K for that "
        f"accuracy: {steps}; FD HVP error: {fd_err:.1e}"
    )
    header = f"{'operation':<46}{'seconds':>9}{'ratio':>9}{'op peak MB':>12}{'process MB':>12}"
    for linear in ["dense", "gmres"]:
        print(f"-- linear solver: {linear}")
        print(header)
        grad = measure(size=size, kind="grad", linear=linear)
        rows = [
            ("cached gradient (∇L, adjoint solve, VJP)", grad),
            ("cached HVP (2 solves + AD)", measure(size=size, kind="hvp", linear=linear)),
            (f"unrolled forward-over-reverse HVP, K={steps}",
             measure(size=size, kind="unrolled", steps=steps, repeats=3)),
            ("FD HVP (2 implicit gradients, fresh solves)",
             measure(size=size, kind="fd", linear=linear, repeats=1)),
        ]  # fmt: skip
        for name, r in rows:
            print(
                f"{name:<46}{r['seconds']:>9.3f}{r['seconds'] / grad['seconds']:>8.2f}×"
                f"{r['op_peak_mb']:>12.1f}{r['process_peak_mb']:>12.1f}"
            )
        hvp = rows[1][1]["seconds"]
        print(
            f"   HVP / gradient = {hvp / grad['seconds']:.2f}×; "
            f"unrolled / HVP = {rows[2][1]['seconds'] / hvp:.1f}×; "
            f"FD / HVP = {rows[3][1]['seconds'] / hvp:.1f}×"
        )
        if size == "1M":
            break  # auto = dense for these blocks; GMRES shown at 82k
    print("-- forward-solver iteration caps (tol = 0): peak memory")
    print(f"{'':<46}{'cap 50':>12}{'cap 500':>12}")
    for name, kind in [
        ("solve + set-up + HVP, op peak", "solve+hvp"),
        ("cached HVP, op peak", "hvp"),
    ]:
        a = measure(size=size, kind=kind, max_iter=50, repeats=1)
        b = measure(size=size, kind=kind, max_iter=500, repeats=1)
        key = "op_peak_mb"
        print(f"{name:<46}{a[key]:>10.1f}MB{b[key]:>10.1f}MB  {_change(a[key], b[key])}")
    a = measure(size=size, kind="unrolled", steps=50, repeats=1)
    b = measure(size=size, kind="unrolled", steps=500, repeats=1)
    print(
        f"{'unrolled HVP, op peak (for contrast)':<46}{a['op_peak_mb']:>10.1f}MB"
        f"{b['op_peak_mb']:>10.1f}MB  {_change(a['op_peak_mb'], b['op_peak_mb'])}"
    )


def _change(a: float, b: float) -> str:
    """``a`` → ``b`` as a percentage, or in MB when ``a`` is under 1 MB (a percentage of
    almost nothing is noise)."""
    return f"({b - a:+.1f} MB)" if a < 1.0 else f"({100 * (b / a - 1):+.0f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="82k,1M")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    global THREADS, DEVICE
    THREADS, DEVICE = args.threads, str(device_of(args.device))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {DEVICE}")
    for size in args.sizes.split(","):
        report(size)


if __name__ == "__main__":
    main()
