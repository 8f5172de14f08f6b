"""Shared pieces of the benchmarks: the tanh DEQ of DESIGN.md, timing, flattening.

The benchmark problem is ``f(x, h, θ) = tanh(h Wᵀ + x Uᵀ + b)`` with ``‖W‖₂ = 0.5``
and a smooth non-convex loss. Sizes (n, m, B): (16, 8, 4) → P = 400;
(64, 32, 16) → P = 6,208; (256, 64, 64) → P = 82,176.
"""

from __future__ import annotations

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


def tanh_deq(n: int, m: int, batch: int, seed: int = 0, dtype=torch.float64):
    """``(f, loss, theta, x, h0)`` for the benchmark DEQ.

    Drawn in float64 and then cast, so a float32 problem is the float64 one rounded.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    theta = {
        "W": 0.5 * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(n, m, generator=g, dtype=torch.float64) / m**0.5,
        "b": 0.1 * torch.randn(n, generator=g, dtype=torch.float64),
    }
    theta = {k: t.to(dtype) for k, t in theta.items()}
    x = torch.randn(batch, m, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randn(batch, n, generator=g, dtype=torch.float64).tanh().to(dtype)

    def f(x: Tensor, h: Tensor, t: dict[str, Tensor]) -> Tensor:
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def loss(h: Tensor) -> Tensor:
        return 0.5 * (h - target).pow(2).sum() + torch.log(torch.cosh(h)).sum()

    return f, loss, theta, x, torch.zeros(batch, n, dtype=dtype)


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


def best_time(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls (after one warm-up) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def relative(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def matmul_rate(m: int, k: int, n: int, dtype=torch.float64) -> float:
    """This machine's ``torch.matmul`` rate (flop/s) on an ``[m, k] @ [k, n]`` product."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    seconds, _ = best_time(lambda: a @ b)
    return 2.0 * m * k * n / seconds


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def median_seconds(
    run: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median of ``repeats`` timed calls of ``run`` after an untimed warm-up call, on
    ``clock`` (wall time by default; ``time.process_time`` for this process's CPU time)."""
    run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def measure_operation(run: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median time of ``repeats`` calls after a first one, and the operation's peak memory.

    The kernel's high-water mark is reset (``/proc/self/clear_refs``) just before the
    first call, so ``op_peak_mb`` is the peak RSS during the calls above the RSS they
    started from; ``process_peak_mb`` is that peak in absolute terms.
    """
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
