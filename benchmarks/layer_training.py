"""Training steps of the DEQ layer against torchdeq and against unrolled autograd.

Side by side in one run, one thread (``--threads``), float32, on ``--device`` (``cpu``;
ratios of wall time around synchronised calls on a GPU). The machine is shared, so
the configurations being compared are timed in alternation (ours, theirs, ours, …) and
each figure is the median over ``--repeats`` rounds of the process's CPU time (less
disturbed by other processes than wall time, which is printed too):

* **training step** (forward + ``loss.backward()``): ``deqhess.nn.DEQ`` (Anderson forward,
  its default matrix-free backward) against torchdeq 0.1's implicit backward
  (``get_deq(ift=True)``, Anderson forward, fixed-point-iteration backward), both at the
  same forward tolerance (relative ``‖f(z) − z‖ / ‖f(z)‖``) and backward tolerance
  (relative residual of the adjoint). Each gradient's error is printed against the
  exact one: unrolled float64 autograd from the float64 fixed point (``c^K < 1e-12``).
* **gradient-norm-penalty step** (``L + λ‖∇θL‖²``, double backward): the layer against
  double backward through 30 unrolled cell steps (``unrolled-30``), which is not the
  equilibrium's gradient at all but is the cheap baseline people use.

Problems: (a) ``tanh(W h + U x + b)``, d = 256, B = 64, ``‖W‖₂ = 0.8``, P = 69,888;
(b) ``tanh(conv(h) + x)``, 3 × 32 × 32 state, B = 16 (the issue's conv cell).

torchdeq is an optional benchmark extra (``make bench-extras``), never a dependency of
deqhess; without it the torchdeq columns are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import add_device_argument, device_of, synchronize
from torch import Tensor, nn

from deqhess.linear import NeumannGMRES
from deqhess.nn import DEQ

FORWARD_TOL = 1e-5  # relative, both libraries
BACKWARD_TOL = 1e-6  # relative adjoint residual, both libraries
MAX_ITER = 100
PENALTY = 0.1


class TanhCell(nn.Module):
    def __init__(self, d: int = 256, m: int = 16, norm: float = 0.8):
        super().__init__()
        self.w = nn.Linear(d, d)
        self.u = nn.Linear(m, d, bias=False)
        with torch.no_grad():
            self.w.weight.mul_(norm / torch.linalg.matrix_norm(self.w.weight, ord=2))
            self.w.bias.mul_(0.1)
        self.d = d

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.w(h) + self.u(x))

    def init_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.d)


class ConvCell(nn.Module):
    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.3)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.conv(h) + x)


def problems(seed: int = 0, device: str = "cpu") -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    """The two problems, drawn on the CPU and moved to ``device``."""
    torch.manual_seed(seed)
    tanh = TanhCell()
    x_tanh = torch.randn(64, 16)
    conv = ConvCell()
    x_conv = torch.randn(16, 3, 32, 32)
    drawn = {
        "(a) tanh d=256 B=64": (tanh, x_tanh, torch.randn(64, 256).tanh()),
        "(b) conv 3x32x32 B=16": (conv, x_conv, torch.randn(16, 3, 32, 32).tanh()),
    }
    return {k: tuple(t.to(device) for t in v) for k, v in drawn.items()}


def loss_of(h: Tensor, target: Tensor) -> Tensor:
    return 0.5 * (h - target).pow(2).mean()


def interleaved(
    steps: list[Callable[[], object]], repeats: int, device: torch.device | None = None
) -> list[tuple[float, float]]:
    """``(cpu, wall)`` median seconds of each step, timed in alternation after a warm-up
    (``device`` synchronised around each step)."""
    for step in steps:
        step()
    cpu: list[list[float]] = [[] for _ in steps]
    wall: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            synchronize(device)
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            synchronize(device)
            cpu[i].append(time.process_time() - c0)
            wall[i].append(time.perf_counter() - w0)
    return [(statistics.median(c), statistics.median(w)) for c, w in zip(cpu, wall, strict=True)]


def _ms(pair: tuple[float, float]) -> str:
    return f"{1e3 * pair[0]:7.1f} ms cpu ({1e3 * pair[1]:6.1f} wall)"


def gradient_of(step: Callable[[], object], cell: nn.Module) -> Tensor:
    cell.zero_grad(set_to_none=True)
    step()
    return torch.cat([p.grad.reshape(-1).double() for p in cell.parameters()])


def exact_gradient(cell: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Unrolled float64 autograd from the float64 fixed point: ``K`` steps with ``c^K`` far
    below float32's resolution."""
    cell64 = _double(cell)
    x64, t64 = x.double(), target.double()
    with torch.no_grad():
        h = DEQ(cell64, tol=1e-13, atol=1e-14, max_iter=2000)(x64)
    cell64.zero_grad(set_to_none=True)
    z = h
    for _ in range(150):
        z = cell64(x64, z)
    loss_of(z, t64).backward()
    return torch.cat([p.grad.reshape(-1) for p in cell64.parameters()])


def _double(cell: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(cell).double()


def relative_error(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def deqhess_step(cell, x, target, tol=FORWARD_TOL):
    backward = NeumannGMRES(rtol=BACKWARD_TOL)  # the default's method, torchdeq's tolerance
    deq = DEQ(cell, tol=tol, atol=0.0, max_iter=MAX_ITER, linear_solver=backward)

    def step():
        loss_of(deq(x), target).backward()

    return step


def torchdeq_step(cell, x, target):
    from torchdeq import get_deq

    deq = get_deq(
        f_solver="anderson", f_max_iter=MAX_ITER, f_tol=FORWARD_TOL, f_stop_mode="rel",
        ift=True, b_solver="fixed_point_iter", b_max_iter=4 * MAX_ITER, b_tol=BACKWARD_TOL,
        b_stop_mode="rel",
    )  # fmt: skip
    init = getattr(cell, "init_state", None)
    z0 = torch.zeros_like(init(x) if callable(init) else x)

    def step():
        z_out, _ = deq(lambda z: cell(x, z), z0)
        loss_of(z_out[-1], target).backward()

    return step


def penalty_steps(cell, x, target):
    params = list(cell.parameters())
    backward = NeumannGMRES(rtol=BACKWARD_TOL)
    deq = DEQ(cell, tol=FORWARD_TOL, atol=0.0, max_iter=MAX_ITER, linear_solver=backward)
    init = getattr(cell, "init_state", None)
    z0 = torch.zeros_like(init(x) if callable(init) else x)

    def penalised(h):
        loss = loss_of(h, target)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        (loss + PENALTY * sum(g.pow(2).sum() for g in grads)).backward()

    def layer():
        penalised(deq(x))

    def unrolled():
        z = z0
        for _ in range(30):
            z = cell(x, z)
        penalised(z)

    return layer, unrolled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    add_device_argument(parser)
    args = parser.parse_args()
    device = device_of(args.device)
    torch.set_num_threads(args.threads)
    clock = 0 if device.type == "cpu" else 1  # ratios of CPU time here, of wall time on a GPU
    try:
        import torchdeq  # noqa: F401

        have_torchdeq = True
    except ImportError:
        have_torchdeq = False
        print("torchdeq not installed (make bench-extras): its columns are skipped")
    print(f"threads={args.threads}, {device}, float32, median of {args.repeats}; forward rtol "
          f"{FORWARD_TOL:g}, backward rtol {BACKWARD_TOL:g}")  # fmt: skip
    for name, (cell, x, target) in problems(device=str(device)).items():
        exact = exact_gradient(cell, x, target)
        ours = deqhess_step(cell, x, target)
        print(f"\n{name}: P = {sum(p.numel() for p in cell.parameters()):,}")
        # torchdeq returns f of its last iterate and applies f once more for the graph, so
        # at one tolerance its state is ~c² closer; deqhess at an 8× tighter tolerance
        # matches that accuracy (errors printed)
        tight = deqhess_step(cell, x, target, tol=FORWARD_TOL / 8)
        steps = [ours, tight] + ([torchdeq_step(cell, x, target)] if have_torchdeq else [])
        times = interleaved(steps, args.repeats, device)
        e_ours = relative_error(gradient_of(ours, cell), exact)
        e_tight = relative_error(gradient_of(tight, cell), exact)
        print(f"  training step  deqhess.nn.DEQ  {_ms(times[0])}   grad err {e_ours:.1e}")
        print(f"        tol {FORWARD_TOL / 8:g}           {_ms(times[1])}   grad err {e_tight:.1e}")
        if have_torchdeq:
            e_theirs = relative_error(gradient_of(steps[2], cell), exact)
            print(
                f"                 torchdeq (ift)  {_ms(times[2])}   grad err {e_theirs:.1e}"
                f"   deqhess/torchdeq = {times[0][clock] / times[2][clock]:.2f} (same tol), "
                f"{times[1][clock] / times[2][clock]:.2f} (tol/8)"
            )
        layer, unrolled = penalty_steps(cell, x, target)
        t_layer, t_unrolled = interleaved([layer, unrolled], args.repeats, device)
        print(
            f"  penalty step   deqhess.nn.DEQ  {_ms(t_layer)}\n"
            f"                 unrolled-30     {_ms(t_unrolled)}   "
            f"deqhess/unrolled-30 = {t_layer[clock] / t_unrolled[clock]:.2f}"
        )


if __name__ == "__main__":
    main()
