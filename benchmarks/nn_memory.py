"""Memory of the DEQ layer's backward and double-backward HVP vs the solver's iterations.

Run: ``python benchmarks/nn_memory.py [--device cpu]`` (on a GPU the memory is the peak
of torch's CUDA allocator instead of RSS). The layer runs its forward solver for exactly
50 and 500 iterations (``tol = 0``, the cap binds), then ``loss.backward()`` or a
double-backward HVP (``grad(create_graph=True)`` then ``grad(g·v)``); each
configuration in its own process, its memory the peak RSS of forward + backward above
the RSS it started from. Autograd through the same number of unrolled iterations is
shown for contrast. Problem: the tanh DEQ with n = 256, m = 64, B = 64 (P = 82,176),
float64.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from common import add_device_argument, device_of, in_subprocess, measure_operation, tanh_deq
from torch import nn

from deqhess.nn import DEQ


class TanhCell(nn.Module):
    def __init__(self, theta: dict[str, torch.Tensor], n: int) -> None:
        super().__init__()
        self.W, self.U, self.b = (nn.Parameter(theta[k].clone()) for k in ("W", "U", "b"))
        self.n = n

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x @ self.U.T + self.b)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.n)


class Unrolled(nn.Module):
    def __init__(self, cell: nn.Module, steps: int) -> None:
        super().__init__()
        self.cell, self.steps = cell, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cell.init_state(x)
        for _ in range(self.steps):
            h = self.cell(x, h)
        return h


def child(spec: dict) -> dict:
    warnings.simplefilter("ignore", RuntimeWarning)  # the forced caps do not converge
    device = torch.device(spec.get("device", "cpu"))
    _, loss, theta, x, _ = tanh_deq(256, 64, 64, device=device)
    cell = TanhCell(theta, 256)
    if spec["model"] == "deq":
        model = DEQ(cell, tol=0.0, atol=0.0, max_iter=spec["steps"], require_convergence=False)
    else:
        model = Unrolled(cell, spec["steps"])
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def backward() -> None:
        loss(model(x)).backward()

    def double_backward() -> None:
        grads = torch.autograd.grad(loss(model(x)), params, create_graph=True)
        torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v, strict=True)), params)

    run = backward if spec["op"] == "backward" else double_backward
    return measure_operation(run, repeats=1, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    device = device_of(args.device)
    memory = "peak RSS" if device.type == "cpu" else "peak CUDA memory allocated"
    print(
        f"torch {torch.__version__}, {device} ({memory}); tanh DEQ n=256 m=64 B=64 "
        "(P = 82,176), float64"
    )
    print(f"{'forward + …':<44}{'50 iterations':>16}{'500 iterations':>16}{'change':>9}")
    for model in ["deq", "unrolled"]:
        for op in ["backward", "double_backward"]:
            spec = dict(model=model, op=op, device=str(device))
            a = in_subprocess(__file__, dict(spec, steps=50))
            b = in_subprocess(__file__, dict(spec, steps=500))
            label = ("deqhess.nn.DEQ, " if model == "deq" else "unrolled autograd, ") + op
            change = 100 * (b["op_peak_mb"] / a["op_peak_mb"] - 1)
            print(
                f"{label:<44}{a['op_peak_mb']:>10.1f} MB {a['seconds']:>4.2f}s"
                f"{b['op_peak_mb']:>9.1f} MB {b['seconds']:>4.2f}s{change:>+8.0f}%"
            )


if __name__ == "__main__":
    main()
