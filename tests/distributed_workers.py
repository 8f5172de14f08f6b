"""Worker processes for the torch.distributed tests (imported by spawned children)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from deqhess.curvature import extreme_eigenpairs, hutchpp
from deqhess.distributed import DistributedDatasetEquilibrium

SIZES = [4, 2, 5, 3, 1]  # uneven batches: shards differ in size and count


def problem(seed: int = 0, n: int = 5, m: int = 3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    theta = {
        "W": 0.45 * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(n, m, generator=g, dtype=torch.float64),
        "b": 0.1 * torch.randn(n, generator=g, dtype=torch.float64),
    }
    x = torch.randn(sum(SIZES), m, generator=g, dtype=torch.float64)
    y = torch.randn(sum(SIZES), n, generator=g, dtype=torch.float64)

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def loss(h, target):
        return ((h - target) ** 2).sum(dim=1).mean() + torch.log(torch.cosh(h)).sum(dim=1).mean()

    batches = list(zip(x.split(SIZES), y.split(SIZES), strict=True))
    options = dict(init_state=lambda xb: torch.zeros(xb.shape[0], n, dtype=torch.float64),
                   tol=1e-14, atol=1e-15, progress=False)  # fmt: skip
    return f, theta, batches, loss, options


def _error_of(call) -> tuple[str, str] | None:
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return None


def _fails_to_converge(rank, f, theta, shard, loss, options):
    if rank == 1:
        options["max_iter"] = 1  # this rank's solve cannot converge
    return _error_of(lambda: DistributedDatasetEquilibrium(f, theta, shard, loss, **options))


def _loss_raises_lazily(rank, f, theta, shard, loss, options):
    """Rank 1's loss raises on first use (its first product), after a clean set-up."""

    def strict(h, target):
        if rank == 1:
            raise ValueError("target has the wrong scale")
        return loss(h, target)

    data = DistributedDatasetEquilibrium(f, theta, shard, strict, **options)
    return _error_of(lambda: data.hvp(torch.ones(data.num_parameters, dtype=torch.float64)))


def analyze_first_batch(out: str) -> dict:
    """``deqhess analyze``'s run on the first batch only: with two ranks, rank 1's shard
    (the command's own sharding) is empty."""
    from deqhess.cli import AnalysisProblem
    from deqhess.cli.analyze import run_analysis

    f, theta, batches, loss, options = problem()
    init = options.pop("init_state")
    options.pop("progress")
    first = AnalysisProblem(f, batches[:1], loss, theta=theta, init_state=init, options=options)
    return run_analysis(
        first, out=out, parts=["total"], top_k=2, trace_hvps=30, progress=False,
        print_fn=lambda line: None,
    )  # fmt: skip


def _ranks_disagree(rank, f, theta, shard, loss, options):
    """Rank 1 differs in one thing per check: θ's key order, one value, the reduction,
    the dtype; every rank must refuse, none may sum a mixture."""
    errors = []
    for change in ("order", "value", "reduction", "dtype"):
        t, opts = dict(theta), dict(options)
        if rank == 1 and change == "order":
            t = dict(reversed(list(t.items())))
        elif rank == 1 and change == "value":
            t["b"] = t["b"] + 1e-12
        elif rank == 1 and change == "reduction":
            opts["reduction"] = "sum"
        elif rank == 1 and change == "dtype":
            t = {k: v.float() for k, v in t.items()}
        errors.append(_error_of(lambda t=t, o=opts: DistributedDatasetEquilibrium(
            f, t, shard, loss, **o)))  # fmt: skip
    return errors


def model_problem():
    """A whole model (encoder → DEQ → head) and uneven batches, float64."""
    from torch import nn

    from deqhess.nn import DEQ

    class Cell(nn.Module):
        def __init__(self, n):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            w = torch.randn(n, n, generator=g, dtype=torch.float64)
            self.W = nn.Parameter(0.4 * w / torch.linalg.matrix_norm(w, ord=2))

        def forward(self, x, h):
            return torch.tanh(h @ self.W.T + x)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the same initial values in every process
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), DEQ(Cell(4), tol=1e-13, linear_solver="dense"),
                          nn.Linear(4, 2))  # fmt: skip
    torch.set_default_dtype(previous)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(SIZES), 3, generator=g, dtype=torch.float64)
    y = torch.randn(sum(SIZES), 2, generator=g, dtype=torch.float64)
    return model, nn.MSELoss(), list(zip(x.split(SIZES), y.split(SIZES), strict=True))


def model_results(curvature) -> dict:
    """What the model tests compare with one process."""
    v = torch.arange(curvature.num_parameters, dtype=torch.float64).sin()
    op = curvature.hessian_operator()
    return {
        "samples": curvature.num_samples,
        "batches": curvature.num_batches,
        "grad": curvature.layout.flatten(curvature.grad()),
        "hessian": curvature.hessian(),
        "ggn": curvature.ggn_operator().to_dense(),
        "split": curvature.hessian_split().loss_curvature,
        "block": op @ torch.stack([v, v.cos()], dim=1),
        "top": extreme_eigenpairs(op, 2, dense_below=0, progress=False).eigenvalues,
    }


def _model_data_changes(rank, *args):
    """Rank 1's data change after the first product: it raises DataChangedError, every
    other rank RankFailedError."""
    from deqhess.distributed import DistributedModelCurvature

    model, loss, batches = model_problem()
    shard = batches[rank::2]
    curvature = DistributedModelCurvature(model, loss, shard, progress=False)
    curvature.grad()
    if rank == 1:
        shard[0] = (shard[0][0] * 2, shard[0][1])
    return _error_of(curvature.grad)


def _model_cast(rank, *args):
    """After a product, rank 1 alone casts its model to float32, then every rank, then
    rank 1 alone registers a parametrization (a chosen parameter gone): each must raise,
    within seconds (the checks of the model as built ran before the ranks' agreement on
    one rank only, and the other waited out the group's timeout)."""
    from torch import nn
    from torch.nn.utils import parametrize

    from deqhess.distributed import DistributedModelCurvature

    class Same(nn.Module):
        def forward(self, weight):
            return weight

    errors = []
    for who, change in (((1,), "cast"), ((0, 1), "cast"), ((1,), "parametrize")):
        model, loss, batches = model_problem()
        curvature = DistributedModelCurvature(model, loss, batches[rank::2], progress=False)
        curvature.grad()
        if rank in who and change == "cast":
            model.float()
        elif rank in who:
            parametrize.register_parametrization(model[2], "weight", Same())
        errors.append(_error_of(curvature.grad))
    return errors


def _model_setups_differ(rank, *args):
    """Rank 1 differs in what the analysis does not differentiate (a frozen buffer, the
    loss) or fails a construction check alone (dropout in training mode); a padded
    DistributedSampler on both: every rank must raise, none may hang or sum a mixture."""
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from deqhess.distributed import DistributedModelCurvature

    errors = []
    for change in ("buffer", "loss", "dropout", "padded"):
        model, loss, batches = model_problem()
        shard = batches[rank::2]
        if rank == 1 and change == "buffer":
            model.register_buffer("offset", torch.ones(1, dtype=torch.float64))
        elif rank == 0 and change == "buffer":
            model.register_buffer("offset", torch.zeros(1, dtype=torch.float64))
        elif rank == 1 and change == "loss":
            loss = nn.HuberLoss()
        elif rank == 1 and change == "dropout":
            model = nn.Sequential(model, nn.Dropout(0.1))
        elif change == "padded":
            x = torch.cat([b[0] for b in batches])[:7]
            y = torch.cat([b[1] for b in batches])[:7]
            dataset = TensorDataset(x, y)
            sampler = DistributedSampler(dataset, shuffle=False)
            shard = DataLoader(dataset, batch_size=2, sampler=sampler)
        errors.append(_error_of(lambda m=model, lo=loss, sh=shard: DistributedModelCurvature(
            m, lo, sh, progress=False)))  # fmt: skip
    return errors


FAILURES = {
    "failure": _fails_to_converge,
    "lazy_failure": _loss_raises_lazily,
    "disagree": _ranks_disagree,
    "model_data_changes": _model_data_changes,
    "model_setups_differ": _model_setups_differ,
    "model_cast": _model_cast,
}


def run(rank: int, world: int, port: int, out_dir: str, scenario: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        f, theta, batches, loss, options = problem()
        shard = batches[rank::world]
        result: dict = {}
        if scenario in FAILURES:
            result["error"] = FAILURES[scenario](rank, f, theta, shard, loss, options)
        elif scenario.startswith("model"):  # model_<world size used of the group>
            from deqhess.distributed import DistributedModelCurvature

            model, loss, batches = model_problem()
            shard = batches[rank::world] if scenario == "model" else batches[:1] * (rank == 0)
            curvature = DistributedModelCurvature(model, loss, shard, progress=False)
            result = model_results(curvature)
        elif scenario == "empty_shard":
            result = {"report": analyze_first_batch(os.path.join(out_dir, "report"))}
        else:
            if scenario == "streamed":
                options["cache_bytes"] = 0  # every product re-reads and re-solves the shard
            data = DistributedDatasetEquilibrium(f, theta, shard, loss, **options)
            v = torch.arange(data.num_parameters, dtype=torch.float64).sin()
            op = data.hessian_operator()
            result = {
                "samples": data.num_samples,
                "grad": data.layout.flatten(data.grad()),
                "hessian": data.hessian(),
                "ggn": data.hessian_split().loss_curvature,
                "hvp": data.hvp(v),
                "block": op @ torch.stack([v, v.cos()], dim=1),
            }
            if scenario == "results":  # the analyses' collectives (streaming adds nothing)
                result["top"] = extreme_eigenpairs(op, 2, dense_below=0, progress=False).eigenvalues
                result["trace"] = hutchpp(op, 12, seed=3, progress=False).estimate
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
