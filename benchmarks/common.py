"""Shared pieces of the benchmarks: the tanh DEQ of DESIGN.md, timing, flattening.

The benchmark problem is ``f(x, h, θ) = tanh(h Wᵀ + x Uᵀ + b)`` with ``‖W‖₂ = 0.5``
and a smooth non-convex loss. Sizes (n, m, B): (16, 8, 4) → P = 400;
(64, 32, 16) → P = 6,208; (256, 64, 64) → P = 82,176.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

SIZES = {"400": (16, 8, 4), "6k": (64, 32, 16), "82k": (256, 64, 64)}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the benchmark's tensors live (``cpu``, the default, or ``cuda``)."""
    parser.add_argument(
        "--device", default="cpu",
        help="cpu (default) or cuda[:index]; timings synchronise the device around each call",
    )  # fmt: skip


def device_of(name: str) -> torch.device:
    """The ``--device`` argument as a device, refused with a message if it is not present."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device here.")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: use cpu or cuda[:index].")
    return device


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU), so a clock read after it
    counts the work launched before it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall_or_cpu_clock(device: torch.device | str) -> Callable[[], float]:
    """This process's CPU time on the CPU (robust to other processes on a shared machine
    when torch runs one thread), wall time on a GPU (whose work is not this process's)."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


def tanh_deq(
    n: int, m: int, batch: int, seed: int = 0, dtype=torch.float64, device: str | None = None
):
    """``(f, loss, theta, x, h0)`` for the benchmark DEQ, on ``device`` (default the CPU).

    Drawn in float64 on the CPU and then cast and moved, so a float32 or GPU problem is
    the float64 CPU one rounded.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    theta = {
        "W": 0.5 * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(n, m, generator=g, dtype=torch.float64) / m**0.5,
        "b": 0.1 * torch.randn(n, generator=g, dtype=torch.float64),
    }
    theta = {k: t.to(dtype=dtype, device=device) for k, t in theta.items()}
    x = torch.randn(batch, m, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    target = torch.randn(batch, n, generator=g, dtype=torch.float64).tanh()
    target = target.to(dtype=dtype, device=device)

    def f(x: Tensor, h: Tensor, t: dict[str, Tensor]) -> Tensor:
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def loss(h: Tensor) -> Tensor:
        return 0.5 * (h - target).pow(2).sum() + torch.log(torch.cosh(h)).sum()

    return f, loss, theta, x, torch.zeros(batch, n, dtype=dtype, device=device)


def flatten(theta: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in theta.values()])


def unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    pieces = torch.split(flat, [t.numel() for t in like.values()])
    return {k: p.reshape(t.shape) for (k, t), p in zip(like.items(), pieces, strict=True)}


def unrolled_loss(f, loss, theta, x, h0, steps: int) -> Callable[[Tensor], Tensor]:
    """``θ_flat ↦ L(h_K)`` through ``steps`` plain iterations from ``h0`` (the baseline)."""

    def objective(flat: Tensor) -> Tensor:
        t, h = unflatten(flat, theta), h0
        for _ in range(steps):
            h = f(x, h, t)
        return loss(h)

    return objective


def best_time(
    fn: Callable[[], Any], repeats: int = 3, device: torch.device | str | None = None
) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls (after one warm-up) and the last result
    (``device`` synchronised around each call)."""
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def relative(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def matmul_rate(m: int, k: int, n: int, dtype=torch.float64, device=None) -> float:
    """This machine's ``torch.matmul`` rate (flop/s) on an ``[m, k] @ [k, n]`` product."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    seconds, _ = best_time(lambda: a @ b, device=device)
    return 2.0 * m * k * n / seconds


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def median_seconds(
    run: Callable[[], Any],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    *,
    warmup: bool = True,
    device: torch.device | str | None = None,
) -> float:
    """Median of ``repeats`` timed calls of ``run`` after an untimed warm-up call (unless
    ``warmup=False``: for calls so long that their one-off costs do not matter), on
    ``clock`` (wall time by default; ``time.process_time`` for this process's CPU time),
    ``device`` synchronised before and after each timed call."""
    if warmup:
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        run()
        synchronize(device)
        times.append(clock() - start)
    return statistics.median(times)


def measure_operation(
    run: Callable[[], Any], repeats: int, device: torch.device | str | None = None
) -> dict[str, float]:
    """Median time of ``repeats`` calls after a first one, and the operation's peak memory.

    On the CPU the kernel's high-water mark is reset (``/proc/self/clear_refs``) just
    before the first call, so ``op_peak_mb`` is the peak RSS during the calls above the
    RSS they started from; ``process_peak_mb`` is that peak in absolute terms. On a CUDA
    device both are the device memory torch's allocator held (``max_memory_allocated``,
    reset first): above the start, and in all.
    """
    if device is not None and torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        seconds = median_seconds(run, repeats, device=device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(
            seconds=seconds, op_peak_mb=(peak - start) / 2**20, process_peak_mb=peak / 2**20
        )
    start_rss = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    seconds = median_seconds(run, repeats)
    return dict(
        seconds=seconds,
        op_peak_mb=(_rss_kb("VmHWM") - start_rss) / 1024,
        process_peak_mb=_rss_kb("VmHWM") / 1024,
    )


def in_subprocess(script: str, spec: dict) -> dict:
    """Run ``script --child SPEC`` in a fresh process and parse its last JSON line."""
    out = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])
