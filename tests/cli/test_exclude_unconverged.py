"""``deqhess analyze --exclude-unconverged``: samples that miss the tolerance are left
out explicitly and counted, instead of stopping the analysis at the first."""

from __future__ import annotations

import json
import textwrap

import pytest

from deqhess.cli.main import main

FACTORY = textwrap.dedent(
    """
    import torch
    from deqhess.cli import AnalysisProblem

    def f(x, h, theta):  # rate x₀ per sample: 0.9 needs ~260 Picard steps, 0.1 about 12
        return theta["a"] * x[:, :1] * h + x[:, 1:]

    def make():
        rate = torch.tensor([0.1, 0.9, 0.1, 0.1, 0.9, 0.1], dtype=torch.float64)
        x = torch.stack([rate, torch.linspace(-1, 1, 6, dtype=torch.float64)], dim=1)
        y = torch.linspace(0, 1, 6, dtype=torch.float64)
        return AnalysisProblem(
            f=f, theta={"a": torch.tensor([1.0], dtype=torch.float64)},
            data=[(x[:3], y[:3]), (x[3:], y[3:])],
            loss=lambda h, t: ((h[:, 0] - t) ** 2).mean(),
            init_state=lambda x: torch.zeros(x.shape[0], 1, dtype=torch.float64),
            options={"solver": "picard", "tol": 1e-12, "atol": 1e-13, "max_iter": 30},
        )
    """
)


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "slow_factory.py"
    path.write_text(FACTORY)
    return f"{path}:make"


def test_unconverged_samples_stop_the_analysis_unless_excluded(factory, tmp_path, capsys):
    arguments = [factory, "--top-k", "0", "--trace", "hutchinson", "--trace-hvps", "4",
                 "--parts", "total", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(["analyze", *arguments]) == 1
    error = capsys.readouterr().err
    assert "did not converge" in error and "--exclude-unconverged leaves such samples out" in error
    assert main(["analyze", *arguments, "--exclude-unconverged"]) == 0
    printed = capsys.readouterr().out
    assert "excluded 2 samples whose forward solve missed the tolerance" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["excluded_samples"] == 2 and report["samples"] == 4


def test_iterations_reported_include_the_left_out_samples(factory, tmp_path, capsys):
    """The left-out samples ran the whole cap of 30 Picard steps; the report said "0
    iterations max" (the kept samples' re-solve from their fixed points). Now the forward
    solves' own count, and the residual said to be the kept samples'."""
    arguments = [factory, "--top-k", "0", "--trace", "none", "--parts", "total",
                 "--float64-probes", "0", "--out", str(tmp_path / "out"), "--no-progress",
                 "--exclude-unconverged"]  # fmt: skip
    assert main(["analyze", *arguments]) == 0
    printed = capsys.readouterr().out
    assert "solve: 30 iterations max (the left-out samples' included), residual ≤ " in printed
    assert " on the kept samples, " in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["solve"]["max_iterations"] == 30
    assert report["solve"]["max_residual"] <= 1e-11  # the kept samples' (tol 1e-12, |f| ≤ 2)
