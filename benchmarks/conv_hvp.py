"""Matrix-free HVPs of a conv DEQ at scale: one HVP, a block of K, the gradient, page faults.

Run: ``python benchmarks/conv_hvp.py [--threads 1] [--block 10] [--device cpu]``.

The cell is ``h ↦ tanh(conv₂(tanh(conv₁(h))) + inject(x))`` (Conv2d 64 → 96 → 64 channels,
3 × 3, and a 3 → 64 injection): 64 × 8 × 8 = 4,096 state values per sample, B = 64,
P = 112,544, float64, GMRES (restart 30, relative residual 1e-12) through
:class:`deqhess.Equilibrium` with ``batch_dim=0``; the loss is the cross-entropy of a fixed
linear readout. For the gradient (``eq.forget(loss)`` first, so its adjoint solve is redone),
one HVP and a ``[P, K]`` block it prints wall time, user and kernel CPU time and minor page
faults (``resource.getrusage``: allocation churn shows as faults and kernel time), and the
GMRES products. Then the floors: the cost of one product with ``J`` (a traced JVP, for
the solve with ``I − J``) and with ``Jᵀ`` (a VJP, for the transposed solve), from which an
HVP (one solve of each) and a gradient (one transposed solve) cannot be cheaper; and, on
one sample of the same cell at 4 × 4 (``J`` formed densely, 1,024 wide), how many block
iterations block GMRES needs for 1 and for K right-hand sides sharing one block Krylov
space — whether sharing the Krylov work can make K HVPs cheaper than K single ones.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch
from common import add_device_argument, device_of, median_seconds, synchronize
from torch import Tensor, nn

import deqhess as dh
from deqhess.tangents import linearize

CHANNELS, HIDDEN, SIDE, BATCH = 64, 96, 8, 64


class ConvCell(nn.Module):
    def __init__(self, channels: int = CHANNELS, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.inject = nn.Conv2d(3, channels, 3, padding=1)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.conv2(torch.tanh(self.conv1(h))) + self.inject(x))


def problem(side: int = SIDE, batch: int = BATCH, device: torch.device | str = "cpu"):
    """``(f, loss, theta, x, h0)`` with a seeded cell, inputs and labels (float64), drawn
    on the CPU and moved to ``device``."""
    torch.manual_seed(0)
    cell = ConvCell().double().to(device)
    theta = {k: v.detach().clone() for k, v in cell.named_parameters()}
    x = torch.randn(batch, 3, side, side, dtype=torch.float64).to(device)
    labels = torch.randint(0, 10, (batch,)).to(device)
    width = CHANNELS * side * side
    readout = (torch.randn(10, width, dtype=torch.float64) / width**0.5).to(device)

    def f(x, h, t):
        return torch.func.functional_call(cell, t, (x, h))

    def loss(h):
        return nn.functional.cross_entropy(h.reshape(h.shape[0], -1) @ readout.T, labels)

    h0 = torch.zeros(batch, CHANNELS, side, side, dtype=torch.float64, device=device)
    return f, loss, theta, x, h0


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def measure(name: str, run: Callable[[], object], repeats: int, eq: dh.Equilibrium) -> float:
    """Median wall time of ``repeats`` calls after a warm-up (the device synchronised
    around each); prints CPU, faults, products."""
    device = eq.h.device
    run()
    walls, before, products = [], _usage(), eq.info.linear_solves.products
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        walls.append(time.perf_counter() - start)
    after = _usage()
    user, system, faults = ((b - a) / repeats for a, b in zip(before[1:], after[1:], strict=True))
    per_call = (eq.info.linear_solves.products - products) / repeats
    wall = sorted(walls)[len(walls) // 2]
    print(
        f"{name:<26}{wall:>8.3f} s{user:>9.3f} s{system:>9.3f} s{faults:>12,.0f}{per_call:>10.0f}",
        flush=True,
    )
    return wall


def product_costs(eq: dh.Equilibrium, repeats: int = 5) -> tuple[float, float]:
    """Seconds of one product with ``J`` (traced JVP) and with ``Jᵀ`` (cached VJP)."""
    h = eq.linearization.h
    fn = eq.linearization.residual.fn
    jvp = linearize(fn, h)
    _, pullback = torch.func.vjp(fn, h)
    v = torch.randn_like(h)
    return (
        median_seconds(lambda: jvp(v), repeats, device=h.device),
        median_seconds(lambda: pullback(v), repeats, device=h.device),
    )


def block_krylov_iterations(block: int, rtol: float = 1e-12, limit: int = 60) -> dict[int, int]:
    """Block iterations of (minimal-residual) block GMRES on one sample's ``I − J``, 4 × 4."""
    f, _, theta, x, h0 = problem(side=4, batch=1)
    eq = dh.Equilibrium(f, theta, x, h0)
    h = eq.h.reshape(-1)
    jac = torch.func.jacrev(lambda r: f(x, r.reshape(h0.shape), theta).reshape(-1))(h)
    a = torch.eye(h.numel(), dtype=h.dtype) - jac.detach()
    found = {}
    for k in (1, block):
        b = torch.randn(h.numel(), k, dtype=h.dtype, generator=torch.Generator().manual_seed(k))
        basis = [torch.linalg.qr(b)[0]]
        for steps in range(1, limit + 1):
            v = torch.cat(basis, dim=1)
            av = a @ v
            y = torch.linalg.lstsq(av, b).solution
            residual = torch.linalg.vector_norm(b - av @ y, dim=0) / torch.linalg.vector_norm(
                b, dim=0
            )
            if float(residual.max()) <= rtol:
                found[k] = steps
                break
            w = a @ basis[-1]
            for _ in range(2):
                w = w - v @ (v.T @ w)
            basis.append(torch.linalg.qr(w)[0])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    args = parser.parse_args()
    device = device_of(args.device)
    torch.set_num_threads(args.threads)
    f, loss, theta, x, h0 = problem(device=device)
    start = time.perf_counter()
    eq = dh.Equilibrium(f, theta, x, h0, batch_dim=0, linear_solver="gmres")
    p = eq.num_parameters
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; conv DEQ "
        f"B={BATCH}, "
        f"{CHANNELS}×{SIDE}×{SIDE} state, P = {p:,}, float64, {eq.info.linear_solver}"
    )
    print(
        f"forward solve: {time.perf_counter() - start:.2f} s, {eq.info.iterations} Anderson "
        "iterations"
    )
    print("products: GMRES products with I − J or its transpose (a block's cover its K directions)")
    print(f"{'per call':<26}{'wall':>10}{'user':>11}{'kernel':>11}{'minor faults':>13}"
          f"{'products':>10}")  # fmt: skip
    op = eq.hessian_operator(loss)
    v = torch.randn(p, args.block, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = v.to(device)
    grad = measure("gradient (cached)", lambda: (eq.forget(loss), eq.grad(loss)), args.repeats, eq)
    one = measure("one HVP", lambda: op @ v[:, 0], args.repeats, eq)
    block = measure(f"block of {args.block} HVPs", lambda: op @ v, 1, eq)
    single = torch.stack([op @ v[:, k] for k in range(args.block)], dim=1)
    agreement = float((op @ v - single).norm() / single.norm())
    print(f"HVP / gradient = {one / grad:.2f} (goal ≤ 1.5)")
    print(
        f"block of {args.block} / one HVP = {block / one:.2f} (goal ≤ 4); block vs "
        f"{args.block} single HVPs: relative difference {agreement:.1e}"
    )
    jvp, vjp = product_costs(eq)
    print(
        f"floors: a product with J (traced JVP) {jvp * 1e3:.1f} ms, with Jᵀ (VJP) "
        f"{vjp * 1e3:.1f} ms; with n products per solve an HVP needs n·(JVP + VJP), a "
        f"gradient n·VJP: HVP / gradient ≥ {(jvp + vjp) / vjp:.2f} from the solves alone"
    )
    iterations = block_krylov_iterations(args.block)
    print(
        f"block GMRES on one sample's I − J (4 × 4 copy, 1,024 wide, rtol 1e-12): "
        f"{iterations.get(1)} block iterations for 1 right-hand side, "
        f"{iterations.get(args.block)} for {args.block} sharing one block Krylov space"
    )


if __name__ == "__main__":
    main()
