"""The float64 check of ``deqhess analyze``: a float32 analysis measured against the
problem rebuilt in float64 — at float64's own tolerance, and never at the cost of the
finished analysis."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

import deqhess as dh
from deqhess.cli.main import main

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from deqhess.cli import AnalysisProblem, ModelProblem
    from deqhess.nn import DEQ

    g = torch.Generator().manual_seed(0)

    def randn(*shape):  # a float32 analysis (the tests' default dtype is float64)
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    w = randn(4, 4)
    THETA = {"W": 0.5 * w / torch.linalg.matrix_norm(w, ord=2), "U": randn(4, 3),
             "b": 0.1 * randn(4)}
    X, Y = randn(10, 3), randn(10, 4).tanh()
    P = 0.3 * randn(3, 3)  # outside theta: not cast to float64 with it

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def f_closing_over_p(x, h, t):
        return torch.tanh(h @ t["W"].T + (x @ P) @ t["U"].T + t["b"])

    def loss(h, y):
        return 0.5 * ((h - y) ** 2).sum(1).mean() + (h**3).sum(1).mean()

    def _problem(f=f, data=None, **options):
        return AnalysisProblem(
            f=f, theta=THETA, loss=loss, data=list(zip(X.split(4), Y.split(4))) if data is None
            else data, init_state=lambda x: x.new_zeros(x.shape[0], 4), options=options,
        )

    def loose():
        return _problem(tol=1e-3, solver="picard")

    def closure():
        return _problem(f=f_closing_over_p)

    def generator():
        return _problem(data=(batch for batch in zip(X.split(4), Y.split(4))))

    class Cell(nn.Module):
        def __init__(self, n, plain=False):
            super().__init__()
            w = randn(n, n)
            self.W = nn.Parameter(0.4 * w / torch.linalg.matrix_norm(w, ord=2))
            self.proj = 0.3 * randn(n, n) if plain else None

        def forward(self, x, h):
            x = x if self.proj is None else x @ self.proj  # a plain attribute, not a buffer
            return torch.tanh(h @ self.W.T + x)

    def _model(plain=False, **layer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), DEQ(Cell(4, plain), **layer), nn.Linear(4, 3))
        model = model.float()
        y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(5))
        return ModelProblem(model, nn.CrossEntropyLoss(), list(zip(X.split(4), y.split(4))))

    def model_loose():
        return _model(tol=1e-3, solver="picard")

    def model_plain_attribute():
        return _model(plain=True)
    """
)


@pytest.fixture
def factory(tmp_path, monkeypatch):
    path = tmp_path / "reference_factory.py"
    path.write_text(FACTORY)
    return path


def _analyze(factory, name, out, *flags):
    return main(["analyze", f"{factory}:{name}", "--out", str(out), "--parts", "total",
                 "--top-k", "3", "--trace", "none", "--no-progress", *flags])  # fmt: skip


def _unrolled(step, steps=300):
    """``h*`` by unrolled iteration from zeros (differentiable: the independent reference)."""

    def solve(x, h):
        for _ in range(steps):
            h = step(x, h)
        return h

    return solve


def _unflatten(v, like):
    """The flat ``v`` as a dict shaped like ``like`` (its entries in order)."""
    pieces = v.split([t.numel() for t in like.values()])
    return {name: c.reshape(t.shape) for (name, t), c in zip(like.items(), pieces, strict=True)}


def _check_against_truth(entry, exact):
    """The float64 bounds must hold against the dense truth's eigenvalues ``exact``: some
    exact eigenvalue lies within each ``vs float64`` residual of each computed one, and
    the measured operator error is at least the eigenvalues' error relative to ‖H‖."""
    top = torch.tensor(entry["top"], dtype=torch.float64)
    distance = (top[:, None] - exact[None, :]).abs().min(dim=1).values
    assert (distance <= torch.tensor(entry["top_float64_residuals"]) + 1e-9).all(), (
        distance, entry["top_float64_residuals"])  # fmt: skip
    relative = float(distance.max() / exact.abs().max())
    assert relative > 1e-5  # float32 solved to tol=1e-3: far above float32's rounding
    assert entry["accuracy"]["float64_error"] >= 0.5 * relative


# tol=1e-3 leaves an error bound above float32's 1e-3: the analysis warns, rightly
@pytest.mark.filterwarnings("ignore::deqhess.AccuracyWarning")
def test_a_loose_factory_tolerance_is_not_inherited_by_the_reference(factory, tmp_path):
    """options={"tol": 1e-3}: the float64 rebuild kept that tolerance, so the report
    claimed "relative error ≈ 4.7e-07 (measured against float64)" for a top eigenvalue
    6.8e-4 off. The reference now solves to float64's own tolerance."""
    assert _analyze(factory, "loose", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dtype"] == "float32" and report["float64_check"]["measured"]
    problem = dh.cli.load_factory(f"{factory}:loose")
    theta = {k: v.double() for k, v in problem.theta.items()}
    flat = torch.cat([v.reshape(-1) for v in theta.values()])

    def total(v):
        t = _unflatten(v, theta)
        solve = _unrolled(lambda x, h: problem.f(x, h, t))
        value = 0
        for x, y in problem.data:
            x = x.double()
            h = solve(x, x.new_zeros(x.shape[0], 4))
            value = value + problem.loss(h, y.double()) * x.shape[0] / 10
        return value

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(total, flat))
    _check_against_truth(report["parts"]["total"], exact)


@pytest.mark.filterwarnings("ignore::deqhess.AccuracyWarning")
def test_a_loose_deq_layer_is_solved_tightly_in_the_reference_copy(factory, tmp_path):
    """DEQ(tol=1e-3) in a ModelProblem: the reference's copy of the layer inherited it
    (1.2e-7 claimed, 1.4e-4 true). Now the copy's layer is tightened; the factory's model
    keeps its own tolerance and dtype."""
    from deqhess.cli.analyze import run_analysis

    problem = dh.cli.load_factory(f"{factory}:model_loose")
    report = run_analysis(problem, out=tmp_path / "out", parts=["total"], top_k=3, trace=None,
                          progress=False, print_fn=lambda line: None)  # fmt: skip
    layer = problem.model[1]
    assert (layer.tol, layer.atol, layer.max_iter) == (1e-3, None, 1000)
    assert all(p.dtype == torch.float32 for p in problem.model.parameters())
    params = {n: p.detach().double() for n, p in problem.model.named_parameters()}
    flat = torch.cat([v.reshape(-1) for v in params.values()])

    def total(v):
        p = _unflatten(v, params)
        solve = _unrolled(lambda z, h: torch.tanh(h @ p["1.cell.W"].T + z))
        value = 0
        for x, y in problem.data:
            z = x.double() @ p["0.weight"].T + p["0.bias"]
            out = solve(z, torch.zeros_like(z)) @ p["2.weight"].T + p["2.bias"]
            value = value + torch.nn.functional.cross_entropy(out, y) * x.shape[0] / 10
        return value

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(total, flat))
    _check_against_truth(report["parts"]["total"], exact)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("closure", r"the problem rebuilt in float64 failed \(RuntimeError: .*dtype.*\) — a "
                    r"tensor outside theta, the parameters and the buffers"),
        ("model_plain_attribute", r"the problem rebuilt in float64 failed \(RuntimeError: "),
        ("generator", r"the factory's data are a one-shot iterator \(generator\), read up by "
                      r"the analysis — give a list or a DataLoader"),
    ],
    ids=["f-closes-over-float32", "model-plain-float32-attribute", "generator-data"],
)  # fmt: skip
def test_a_float64_check_that_cannot_run_never_loses_the_analysis(factory, tmp_path, capsys,
                                                                  name, reason):  # fmt: skip
    """Each crashed after the analysis had finished (exit 1, no report; the generator's
    with a misleading "data is empty"). Now the report is written as usual, with one line
    saying why the float64 check did not run and how to skip it, and the estimate."""
    assert _analyze(factory, name, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "float64 check not run" in line)
    assert line.startswith("  float64 check not run: ")
    assert line.endswith("the operator errors below are estimates (--float64-probes 0 skips "
                         "the check)")  # fmt: skip
    assert re.search(reason, line), line
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["float64_check"]["measured"] is False
    assert report["float64_check"]["reason"] in line
    entry = report["parts"]["total"]
    assert len(entry["top"]) == 3 and "top_float64_residuals" not in entry
    assert entry["accuracy"]["float64_error"] is None and entry["accuracy"]["estimate"] > 0
    assert (tmp_path / "out" / "top_eigenvalues.png").exists()
