"""Dense Hessian and HVP: deqhess against unrolled autodiff and finite differences.

Run: ``python benchmarks/dense_hessian.py [--sizes 400,6k] [--threads 1] [--device cpu]``
(or ``make bench``). For each size it
prints, measured in the same run:

* deqhess's dense Hessian from scratch (solve, factorise, Z, assemble) and its
  cached HVP (the fixed point and LU reused; each call does its two solves);
* the Hessian and a forward-over-reverse HVP through ``K`` unrolled iterations,
  ``K`` the smallest (step 5) that reaches deqhess's accuracy, both measured
  against a ``K = 150`` unrolled reference on a block of columns;
* central finite differences of implicit gradients (2 per direction);
* ratios, the relative error of each, and the dense Hessian's flop rate against
  its floor ``2·P²·N`` (N = B·n) and ``torch.matmul``'s rate on the same shapes.

The finite-difference Hessian at P ≈ 6k (12k implicit gradients, ~10 min) is timed
on a block of columns and scaled to P; its line says so.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    SIZES,
    add_device_argument,
    best_time,
    device_of,
    flatten,
    matmul_rate,
    relative,
    tanh_deq,
    unflatten,
    unrolled_loss,
)

import deqhess as dh

REFERENCE_STEPS = 150
COLUMNS = 48
STEP = 1e-5  # central-difference step: truncation ~ε², rounding ~1e-16/ε


def unrolled_columns(objective, flat, columns):
    """Columns ``H[:, columns]`` by forward-over-reverse through the unrolled loop."""
    basis = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)[columns]
    gradient = torch.func.grad(objective)
    return torch.func.vmap(lambda v: torch.func.jvp(gradient, (flat,), (v,))[1])(basis).T


def unrolled_hessian(objective, flat, full_vmap):
    """The whole unrolled Hessian: ``torch.func.hessian``, or in vmap chunks of 512."""
    if full_vmap:
        return torch.func.hessian(objective)(flat)
    chunks = torch.arange(flat.numel()).split(512)
    return torch.cat([unrolled_columns(objective, flat, c) for c in chunks], dim=1)


def matching_steps(f, loss, theta, x, h0, exact_columns, columns, target):
    """Smallest K (step 5) whose unrolled columns are within ``target`` of the reference."""
    flat = flatten(theta)
    for steps in range(10, REFERENCE_STEPS, 5):
        approx = unrolled_columns(unrolled_loss(f, loss, theta, x, h0, steps), flat, columns)
        if relative(approx, exact_columns) <= target:
            return steps
    return REFERENCE_STEPS


def run(label: str, device: torch.device) -> None:
    n, m, batch = SIZES[label]
    small = label == "400"
    f, loss, theta, x, h0 = tanh_deq(n, m, batch, device=device)
    flat = flatten(theta)
    p, size = flat.numel(), batch * n
    print(f"\n== tanh DEQ n={n} m={m} B={batch}: P = {p}, N = {size} (float64) ==")

    def deq_hessian():
        return dh.Equilibrium(f, theta, x, h0, tol=1e-15).hessian(loss)

    t_dense, hessian = best_time(deq_hessian, repeats=5 if small else 1, device=device)
    eq = dh.Equilibrium(f, theta, x, h0, tol=1e-15)
    eq.hessian(loss)  # fills the caches
    v = torch.randn(p, dtype=flat.dtype).to(device)
    t_hvp, hv = best_time(lambda: eq.hvp(loss, v), repeats=20, device=device)

    columns = torch.randperm(p, generator=torch.Generator().manual_seed(1))[:COLUMNS].to(device)
    reference = unrolled_loss(f, loss, theta, x, h0, REFERENCE_STEPS)
    reference_cols = unrolled_columns(reference, flat, columns)
    reference_hv = torch.func.jvp(torch.func.grad(reference), (flat,), (v,))[1]
    err_dense = relative(hessian[:, columns], reference_cols)
    steps = matching_steps(f, loss, theta, x, h0, reference_cols, columns, max(err_dense, 1e-14))
    objective = unrolled_loss(f, loss, theta, x, h0, steps)
    t_unrolled, unrolled = best_time(
        lambda: unrolled_hessian(objective, flat, full_vmap=small),
        repeats=5 if small else 1,
        device=device,
    )
    gradient = torch.func.grad(objective)
    t_unrolled_hvp, unrolled_hv = best_time(
        lambda: torch.func.jvp(gradient, (flat,), (v,))[1], repeats=5, device=device
    )

    def implicit_gradient(t):
        return flatten(dh.Equilibrium(f, unflatten(t, theta), x, h0, tol=1e-15).grad(loss))

    def fd_product(direction):
        plus = implicit_gradient(flat + STEP * direction)
        minus = implicit_gradient(flat - STEP * direction)
        return (plus - minus) / (2 * STEP)

    basis = torch.eye(p, dtype=flat.dtype, device=device)
    fd_index = torch.arange(p) if small else columns
    t_fd_part, fd_cols = best_time(
        lambda: torch.stack([fd_product(basis[i]) for i in fd_index], dim=1),
        repeats=1,
        device=device,
    )
    t_fd = t_fd_part * p / len(fd_index)
    err_fd = relative(fd_cols[:, columns] if small else fd_cols, reference_cols)
    t_fd_hvp, fd_hv = best_time(lambda: fd_product(v), repeats=5, device=device)

    flops = 2.0 * p * p * size
    rate = flops / t_dense
    peak = matmul_rate(p, size, p, device=device)
    how = "torch.func.hessian" if small else "all columns, vmap chunks of 512"
    fd_how = "all columns" if small else f"{COLUMNS} columns, scaled to P"
    print(f"accuracy: deqhess dense Hessian vs K={REFERENCE_STEPS} unrolled = {err_dense:.1e}")
    print(f"unrolled steps needed for that accuracy: K = {steps}")
    print(
        f"deqhess forward solve: {eq.info.iterations} Anderson iterations, "
        f"cond(I − J) ≈ {eq.info.condition_number:.2f}"
    )
    print(f"{'method':<56}{'seconds':>10}{'× deqhess':>11}{'rel. error':>12}")
    rows = [
        ("deqhess dense Hessian (solve + Z + assemble)", t_dense, t_dense, err_dense),
        (f"unrolled Hessian, K={steps} ({how})", t_unrolled, t_dense,
         relative(unrolled[:, columns], reference_cols)),
        (f"central FD of implicit gradients ({fd_how})", t_fd, t_dense, err_fd),
        ("deqhess HVP (cached: 2 solves + AD)", t_hvp, t_hvp, relative(hv, reference_hv)),
        (f"unrolled forward-over-reverse HVP, K={steps}", t_unrolled_hvp, t_hvp,
         relative(unrolled_hv, reference_hv)),
        ("central FD HVP (2 implicit gradients)", t_fd_hvp, t_hvp, relative(fd_hv, reference_hv)),
    ]  # fmt: skip
    for name, seconds, base, error in rows:
        print(f"{name:<56}{seconds:>10.4f}{seconds / base:>10.1f}×{error:>12.1e}")
    print(
        f"dense Hessian floor 2·P²·N = {flops / 1e9:.2f} GFLOP: achieved {rate / 1e9:.1f} "
        f"GFLOP/s vs torch.matmul [P,N]@[N,P] {peak / 1e9:.1f} GFLOP/s "
        f"({100 * rate / peak:.0f}% of it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="400,6k", help="comma list of: 400, 6k")
    parser.add_argument("--threads", type=int, default=1)
    add_device_argument(parser)
    args = parser.parse_args()
    device = device_of(args.device)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    for label in args.sizes.split(","):
        run(label, device)


if __name__ == "__main__":
    main()
