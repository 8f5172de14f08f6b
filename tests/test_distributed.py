"""Data-parallel operators over torch.distributed (gloo, CPU processes on loopback)."""

from __future__ import annotations

import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from distributed_workers import (
    SIZES,
    analyze_first_batch,
    model_problem,
    model_results,
    problem,
    run,
)
from problems import relative_error

import deqhess as dh
from deqhess.curvature import extreme_eigenpairs, hutchpp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, tmp_path, scenario: str) -> list[dict]:
    files = [tmp_path / f"rank{r}.pt" for r in range(world)]
    try:
        mp.spawn(run, args=(world, _free_port(), str(tmp_path), scenario), nprocs=world)
    except mp.ProcessExitedException as error:
        # gloo now and then aborts a process in its own teardown, after every rank has
        # written its result ("terminate called without an active exception"): the
        # results stand; any other exit, or a missing result, is a failure
        if error.exit_code != -signal.SIGABRT or not all(f.exists() for f in files):
            raise
    return [torch.load(f, weights_only=False) for f in files]


@pytest.mark.parametrize(("world", "scenario"), [(3, "results"), (2, "streamed")])
def test_distributed_equals_single_process_on_uneven_shards(world, scenario, tmp_path):
    """Cached (3 ranks) and streamed shards (2 ranks, no cache: every product re-reads
    and re-solves each rank's batches) give the single process's results."""
    results = _spawn(world, tmp_path, scenario)
    f, theta, batches, loss, options = problem()
    single = dh.DatasetEquilibrium(f, theta, batches, loss, **options)
    v = torch.arange(single.num_parameters, dtype=torch.float64).sin()
    op = single.hessian_operator()
    hessian = single.hessian()
    expected = {
        "grad": single.layout.flatten(single.grad()),
        "hessian": hessian,
        "ggn": single.hessian_split().loss_curvature,
        "hvp": hessian @ v,
        "block": hessian @ torch.stack([v, v.cos()], dim=1),
    }
    for r in results:
        assert r["samples"] == sum(SIZES)
        for key, value in expected.items():
            assert relative_error(r[key], value) <= 1e-12, key
    if scenario == "streamed":
        return
    top = extreme_eigenpairs(op, 2, dense_below=0, progress=False).eigenvalues
    trace = hutchpp(op, 12, seed=3, progress=False).estimate
    for r in results:  # identical probes on every rank: identical analyses
        assert torch.allclose(r["top"], top, rtol=1e-10)
        assert abs(r["trace"] - trace) <= 1e-10 * abs(trace)
        assert torch.equal(r["top"], results[0]["top"]) and r["trace"] == results[0]["trace"]


@pytest.mark.parametrize(("world", "scenario"), [(3, "model"), (2, "model_empty")])
def test_distributed_model_curvature_equals_one_process(world, scenario, tmp_path):
    """A whole model over uneven shards (3 ranks) and over one batch with an empty shard
    (2 ranks): every operator, the gradient and the top eigenvalues equal one process's
    to 1e-12."""
    results = _spawn(world, tmp_path, scenario)
    model, loss, batches = model_problem()
    data = batches if scenario == "model" else batches[:1]
    expected = model_results(dh.ModelCurvature(model, loss, data, progress=False))
    for r in results:
        assert r["samples"] == expected["samples"] and r["batches"] == expected["batches"]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert relative_error(r[key], value) <= 1e-12, key


def test_a_rank_whose_data_change_makes_every_rank_raise(tmp_path):
    other, own = (r["error"] for r in _spawn(2, tmp_path, "model_data_changes"))
    assert own[0] == "DataChangedError" and "never read" in own[1]
    assert other[0] == "RankFailedError" and "rank 1 failed with DataChangedError" in other[1]


def test_a_model_cast_on_one_rank_or_all_makes_every_rank_raise(tmp_path):
    """Cast on one rank: the ranks disagree on θ's dtype, and both say so; on every rank:
    each names the parameter as built and as it is; a parameter gone on one rank (a
    parametrization): that rank names it, the other stops with it — none waits."""
    first, second = (r["error"] for r in _spawn(2, tmp_path, "model_cast"))
    for one, every, _ in (first, second):
        assert one[0] == "InputError" and "θ's dtype: rank 0 has 'torch.float64'" in one[1]
        assert every[0] == "ModelChangedError" and "it is now (4, 3) torch.float32" in every[1]
    assert second[2][0] == "ModelChangedError" and "['2.weight']" in second[2][1]
    assert (
        first[2][0] == "RankFailedError" and "rank 1 failed with ModelChangedError" in first[2][1]
    )


def test_model_ranks_that_differ_or_fail_at_construction_all_raise(tmp_path):
    """A buffer or the loss differing on one rank summed two problems with no error (42%
    off); dropout refused on one rank alone killed the other's collective; a padded
    DistributedSampler counted a sample twice. Every rank now raises, within seconds."""
    first, second = (r["error"] for r in _spawn(2, tmp_path, "model_setups_differ"))
    buffer, loss, dropout, padded = zip(first, second, strict=True)
    for kind, message in buffer:
        assert kind == "InputError" and "the model's parameters or buffers differ" in message
    for kind, message in loss:
        assert kind == "InputError" and "loss: rank 0 has 'MSELoss" in message
    assert dropout[1][0] == "InputError" and "dropout in training mode" in dropout[1][1]
    assert dropout[0][0] == "RankFailedError" and "rank 1 failed with InputError" in dropout[0][1]
    for kind, message in padded:
        assert kind == "InputError" and "repeats 1 samples to give every rank" in message


def test_a_failing_rank_makes_every_rank_raise(tmp_path):
    """The failing rank raises its own error; the other names it, its type and message."""
    other, own = (r["error"] for r in _spawn(2, tmp_path, "failure"))
    assert own[0] == "ConvergenceError" and "did not converge in max_iter=1" in own[1]
    assert other[0] == "RankFailedError"
    assert other[1].startswith("rank 1 failed with ConvergenceError: ")
    assert "did not converge in max_iter=1" in other[1]


def test_ranks_that_disagree_on_the_problem_all_refuse(tmp_path):
    """θ's key order, one value (1e-12 off), the reduction or the dtype differing on one
    rank made the sum a mixture of two problems (gradients 20–70% off) or aborted gloo:
    every rank now raises the same ValueError naming the difference."""
    first, second = (r["error"] for r in _spawn(2, tmp_path, "disagree"))
    assert first == second
    expected = ["θ's keys: rank 0 has ('W', 'U', 'b'), rank 1 has ('b', 'U', 'W')",
                "θ's values differ between rank 0 and rank 1",
                "reduction: rank 0 has 'mean', rank 1 has 'sum'",
                "θ's dtype: rank 0 has 'torch.float64', rank 1 has 'torch.float32'"]  # fmt: skip
    for (kind, message), text in zip(first, expected, strict=True):
        assert kind == "InputError" and "the ranks disagree on the problem" in message
        assert text in message


def test_an_error_raised_lazily_on_one_rank_reaches_every_rank(tmp_path):
    """A ValueError from the loss at rank 1's first product: rank 0 raises at once
    (a RankFailedError with rank 1's message) instead of waiting in all_reduce until
    the 60 s timeout — or the test would fail on gloo's timeout message."""
    other, own = (r["error"] for r in _spawn(2, tmp_path, "lazy_failure"))
    assert own == ("ValueError", "target has the wrong scale")
    assert other == (
        "RankFailedError",
        "rank 1 failed with ValueError: target has the wrong scale; this rank stops too "
        "instead of waiting for it.",
    )


def test_analyze_with_an_empty_shard_reports_as_one_process(tmp_path):
    """One batch on two ranks: rank 1's shard is empty, and the report is the single
    process's (eigenvalues to 1e-10: the same products, summed with zeros)."""
    results = _spawn(2, tmp_path, "empty_shard")
    single = analyze_first_batch(str(tmp_path / "single"))
    for r in results:
        report = r["report"]
        assert report["processes"] == 2 and report["batches"] == 1
        assert report["samples"] == single["samples"] == SIZES[0]
        top = torch.tensor(report["parts"]["total"]["top"])
        assert torch.allclose(top, torch.tensor(single["parts"]["total"]["top"]), rtol=1e-10)


def test_requires_an_initialised_group():
    f, theta, batches, loss, options = problem()
    with pytest.raises(ValueError, match=r"torch.distributed is not initialised"):
        dh.distributed.DistributedDatasetEquilibrium(f, theta, batches, loss, **options)


@pytest.mark.parametrize("factory", ["tanh_deq_tiny", "classifier_tiny"])
def test_analyze_under_torchrun_reports_as_one_process(factory, tmp_path):
    """The README's launch line on 2 processes gives the single-process report, for a
    DEQ and its loss (AnalysisProblem) and for a whole model (ModelProblem)."""
    import json
    import subprocess
    import sys

    from deqhess.cli.main import main

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    factory = f"{root / 'examples' / 'factories.py'}:{factory}"
    args = ["--top-k", "3", "--trace-hvps", "99", "--no-progress"]
    main(["analyze", factory, "--out", str(tmp_path / "one"), *args])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "deqhess", "analyze", factory,
               "--out", str(tmp_path / "two"), *args]  # fmt: skip
    run = subprocess.run(command, cwd=root, capture_output=True, timeout=300, text=True)
    # torchrun's own account, if it failed: each rank's error lines, then the end of it
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert run.returncode == 0, "\n".join([*errors[:20], "…", run.stderr[-3000:]])
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["samples"] == one["samples"] == 10
    for part, entry in one["parts"].items():
        assert torch.allclose(torch.tensor(two["parts"][part]["top"]), torch.tensor(entry["top"]))
        assert abs(two["parts"][part]["trace"]["estimate"] - entry["trace"]["estimate"]) <= 1e-10
