"""Curvature of a whole model on a 60,000-sample data set: time and memory against batches.

The data are the 1,797 scikit-learn digits (8×8, scaled to [0, 1], float32) tiled to
60,000 samples, generated batch by batch (nothing grows with the data set but the
work). The model is ``Linear(64, 32) → deqhess.nn.DEQ(tanh cell, ‖W‖₂ = 0.5) →
Linear(32, 10)`` with cross-entropy (P = 3,466), or, with ``--operator dataset``, the
same DEQ in the functional form (:class:`deqhess.DatasetEquilibrium` with the readout in
``loss(h, θ, y)``, no cache: every product streams).

Sections (each configuration runs in its own subprocess; memory is the peak RSS of the
operation above the RSS it started from, the kernel's high-water mark reset just
before it, and the process's peak):

* ``scan`` — one HVP over 10, 100 and 1,000 batches of 60 samples, the second pass (as
  in an analysis: each DEQ starts from the previous pass's fixed point, kept within
  ``--cache-bytes``; 0 keeps none): its time (linear in the batches: one pass, one
  forward per batch) and peak RSS (flat: one batch at a time), and the warm-start store;
* ``block`` — one block of K = 16 directions over the same batches (one pass: the K
  directions share every batch's forward);
* ``analysis`` — top-5 eigenvalues (``extreme_eigenpairs``, thick-restart Lanczos, tol 1e-4 for
  float32) and a Hutch++ trace (30 HVPs in three blocks) of the whole model's Hessian
  on all 60,000 samples (100 batches of 600);
* ``backward`` — on one batch, the three ways a block's directions go through the
  graph (batched, vmapped, looped; :class:`deqhess.models.backward.BlockBackward`).

Run: ``python benchmarks/dataset_scale.py [--threads 1] [--sections scan,block,analysis,backward]
[--operator model|dataset] [--batches 10,100,1000] [--device cpu]`` (on a GPU the memory
columns are the peak of torch's CUDA allocator).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import (
    add_device_argument,
    device_of,
    in_subprocess,
    measure_operation,
    median_seconds,
)
from torch import nn

import deqhess as dh
from deqhess.curvature import extreme_eigenpairs, hutchpp
from deqhess.nn import DEQ
from deqhess.streaming import DEFAULT_CACHE_BYTES

SAMPLES = 60_000
WIDTH = 32


class TiledDigits:
    """``batches`` batches of ``size`` digits, tiled from the 1,797 images; re-iterable,
    each batch made when it is reached (no sample is stored beyond the 1,797)."""

    def __init__(self, batches: int, size: int, device: str = "cpu") -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.x = (torch.tensor(digits.data, dtype=torch.float32) / 16.0).to(device)
        self.y = torch.tensor(digits.target, dtype=torch.long).to(device)
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for b in range(self.batches):
            index = (torch.arange(b * self.size, (b + 1) * self.size) % len(self.y)).to(
                self.y.device
            )
            yield self.x[index], self.y[index]


class TanhCell(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        w = torch.randn(n, n)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x + self.b)


def model_operator(data, cache_bytes: int) -> dh.ModelCurvature:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, WIDTH), DEQ(TanhCell(WIDTH)), nn.Linear(WIDTH, 10))
    model = model.to(data.x.device)
    return dh.ModelCurvature(model, nn.CrossEntropyLoss(), data, cache_bytes=cache_bytes)


def dataset_operator(data, cache_bytes: int) -> dh.DatasetEquilibrium:
    torch.manual_seed(0)
    w = torch.randn(WIDTH, WIDTH)
    theta = {
        "W": 0.5 * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(WIDTH, 64) / 8.0,
        "b": 0.1 * torch.randn(WIDTH),
        "V": torch.randn(10, WIDTH) / WIDTH**0.5,
        "c": torch.zeros(10),
    }
    theta = {k: t.to(data.x.device) for k, t in theta.items()}

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def loss(h, t, y):
        return nn.functional.cross_entropy(h @ t["V"].T + t["c"], y)

    return dh.DatasetEquilibrium(
        f, theta, data, loss, init_state=lambda x: x.new_zeros(x.shape[0], WIDTH),
        cache_bytes=0, progress=False,
    )  # fmt: skip


OPERATORS = {"model": model_operator, "dataset": dataset_operator}


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    data = TiledDigits(spec["batches"], spec["size"], device)
    if spec["kind"] == "backward":
        return _backward(data)
    start = time.perf_counter()
    curvature = OPERATORS[spec["operator"]](data, spec["cache_bytes"])
    setup = time.perf_counter() - start
    op = curvature.hessian_operator()
    p = op.shape[0]
    g = torch.Generator().manual_seed(1)
    if spec["kind"] == "analysis":
        tic = time.perf_counter()
        top = extreme_eigenpairs(op, 5, tol=1e-4, progress=False)
        eig_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        trace = hutchpp(op, 30, progress=False)
        return dict(
            parameters=p, samples=spec["batches"] * spec["size"], setup_seconds=setup,
            top=top.eigenvalues.tolist(), top_residual=float(top.residuals.max()),
            top_hvps=top.num_hvps, top_seconds=eig_seconds, trace=trace.estimate,
            trace_error=trace.std_error, trace_hvps=trace.num_hvps,
            trace_seconds=time.perf_counter() - tic,
        )  # fmt: skip
    k = spec.get("k", 1)
    block = torch.randn(p, k, generator=g).to(device)
    op @ block  # the first pass (it keeps the fixed points for warm starts)
    measured = measure_operation(lambda: op @ block, repeats=1, device=device)
    kept = curvature.cached_bytes / 2**20  # what the store holds between passes
    return dict(parameters=p, setup_seconds=setup, kept_mb=kept, **measured)


def _backward(data) -> dict:
    """One batch of 60, K = 8 and 32: seconds per block product for each mode."""
    x, y = next(iter(data))
    out = {}
    for mode in ("batched", "vmap", "loop"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, WIDTH), DEQ(TanhCell(WIDTH)), nn.Linear(WIDTH, 10))
        model = model.to(x.device)
        try:
            op = dh.ModelCurvature(model, nn.CrossEntropyLoss(), [(x, y)], backward=mode)
        except ValueError as error:  # ModelCurvature refuses "batched" for DEQ models up front
            for k in (8, 32):
                out[f"{mode}_K{k}"] = f"refused ({str(error).split(':')[0]})"
            continue
        op = op.hessian_operator()
        for k in (8, 32):
            block = torch.randn(op.shape[0], k, device=x.device)
            try:
                op @ block  # warm-up
            except RuntimeError as error:  # autograd's batching refuses data-dependent code
                out[f"{mode}_K{k}"] = f"refused ({str(error).split('.')[0]})"
                continue
            seconds = median_seconds(lambda o=op, b=block: o @ b, 1, warmup=False, device=x.device)
            out[f"{mode}_K{k}"] = f"{seconds:.3f} s"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sections", default="scan,block,analysis,backward")
    parser.add_argument("--operator", default="model", choices=sorted(OPERATORS))
    parser.add_argument("--batches", default="10,100,1000")
    parser.add_argument(
        "--cache-bytes", type=int, default=DEFAULT_CACHE_BYTES,
        help="ModelCurvature's budget for the fixed points kept between passes (0: none)",
    )  # fmt: skip
    add_device_argument(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sections = args.sections.split(",")
    device = str(device_of(args.device))
    common = dict(
        threads=args.threads, operator=args.operator, cache_bytes=args.cache_bytes,
        device=device,
    )  # fmt: skip
    print(
        f"deqhess dataset_scale: {args.operator} operator, float32, {args.threads} thread(s), "
        f"{device}"
    )
    for section, k in (("scan", 1), ("block", 16)):
        if section not in sections:
            continue
        print(f"{section}: one product of K = {k} over B batches of 60 samples (the second "
              "pass; kept: the fixed points held for warm starts)")  # fmt: skip
        print("  batches  samples   s/product  ms/batch  op peak MB  process peak MB  kept MB")
        for batches in (int(b) for b in args.batches.split(",")):
            r = in_subprocess(__file__, dict(common, kind="hvp", batches=batches, size=60, k=k))
            print(f"  {batches:7d}  {batches * 60:7d}  {r['seconds']:10.2f}  "
                  f"{1e3 * r['seconds'] / batches:8.1f}  {r['op_peak_mb']:10.1f}  "
                  f"{r['process_peak_mb']:15.1f}  {r['kept_mb']:7.1f}")  # fmt: skip
    if "analysis" in sections:
        r = in_subprocess(__file__, dict(common, kind="analysis", batches=100, size=600))
        print(f"analysis: the whole model's Hessian on {r['samples']:,} samples (100 batches "
              f"of 600), P = {r['parameters']:,}")  # fmt: skip
        print(f"  top-5 eigenvalues {', '.join(f'{v:.4e}' for v in reversed(r['top']))} "
              f"(residual ≤ {r['top_residual']:.1e}): {r['top_hvps']} HVPs, "
              f"{r['top_seconds']:.0f} s")  # fmt: skip
        print(f"  Hutch++ trace {r['trace']:.4e} ± {r['trace_error']:.1e}: {r['trace_hvps']} "
              f"HVPs in 3 blocks, {r['trace_seconds']:.0f} s")  # fmt: skip
    if "backward" in sections and args.operator == "model":
        r = in_subprocess(__file__, dict(common, kind="backward", batches=1, size=60))
        print("backward: one batch of 60, seconds per block product")
        for k in (8, 32):
            times = ", ".join(f"{m} {r[f'{m}_K{k}']}" for m in ("batched", "vmap", "loop"))
            print(f"  K = {k:2d}: {times}")


if __name__ == "__main__":
    main()
