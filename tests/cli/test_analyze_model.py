"""``deqhess analyze`` on a whole model (a ModelProblem factory): report, plots, logs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from deqhess.cli import ModelProblem, load_factory

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from deqhess.cli import ModelProblem
    from deqhess.nn import DEQ

    class Cell(nn.Module):
        def __init__(self, n):
            super().__init__()
            w = torch.randn(n, n, dtype=torch.float64)
            self.W = nn.Parameter(0.4 * w / torch.linalg.matrix_norm(w, ord=2))

        def forward(self, x, h):
            return torch.tanh(h @ self.W.T + x)

    def make():
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float64)
        model = nn.Sequential(nn.Linear(3, 4), DEQ(Cell(4), tol=1e-13, linear_solver="dense"),
                              nn.Linear(4, 3))
        x, y = torch.randn(7, 3), torch.randint(0, 3, (7,))
        return ModelProblem(model, nn.CrossEntropyLoss(), list(zip(x.split(4), y.split(4))))
    """
)


def test_analyze_a_model_factory_in_a_log(tmp_path):
    """Run as a user would with output to a log file: every part (the output GGN
    included) is reported with the dense truth's eigenvalues and traces (P = 47 ≤
    trace_hvps/3 makes Hutch++ exact), and the log holds no carriage return."""
    factory = tmp_path / "model_factory.py"
    factory.write_text(FACTORY)
    out = tmp_path / "out"
    options = ["--top-k", "3", "--trace-hvps", "150", "--density", "--density-probes", "2",
               "--density-steps", "10"]  # fmt: skip
    command = [sys.executable, "-m", "deqhess", "analyze", f"{factory}:make", "--out", str(out)]
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"}
    log = subprocess.run(
        command + options, capture_output=True, text=True, check=True, env=env, timeout=300
    )
    assert "\r" not in log.stdout + log.stderr
    assert "ggn (" in log.stdout and "dynamics_curvature (" in log.stdout
    # float64, no reference: the figure is the asymmetry alone, and the report says so
    assert "not the operator's error: the DEQ layers' own solve error" in log.stdout
    assert "relative error ≈" not in log.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"] == 47 and report["samples"] == 7 and report["batches"] == 2
    assert set(report["parts"]) == {"total", "ggn", "loss_curvature", "dynamics_curvature"}
    for name in ("top_eigenvalues.png", "spectral_density.png"):
        assert (out / name).stat().st_size > 1000
    problem = load_factory(f"{factory}:make")
    curvature = problem.equilibria()
    for part, entry in report["parts"].items():
        matrix = curvature.hessian_operator(part).to_dense()
        exact = torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))
        assert torch.allclose(torch.tensor(entry["top"]), exact[-3:], atol=1e-8), part
        assert abs(entry["trace"]["estimate"] - float(torch.trace(matrix))) <= 1e-8, part


def test_a_float32_model_is_measured_against_its_float64_copy(tmp_path):
    """The float32 analysis rebuilds a float64 copy of the model (the split layer found
    by name in the copy) and reports each part's error against it; the factory's model
    stays float32."""
    from deqhess.cli.analyze import run_analysis

    factory = tmp_path / "model_factory.py"
    factory.write_text(FACTORY.replace("torch.float64", "torch.float32").replace("1e-13", "None"))
    problem = load_factory(f"{factory}:make")
    report = run_analysis(problem, out=tmp_path / "out", parts=["total", "loss_curvature"],
                          top_k=2, trace=None, float64_probes=2, progress=False,
                          print_fn=lambda line: None)  # fmt: skip
    assert report["dtype"] == "float32"
    for entry in report["parts"].values():
        assert entry["accuracy"]["float64_error"] <= 1e-3  # float32 solves to 1e-5
        assert max(entry["top_float64_residuals"]) <= 1e-3
    assert all(p.dtype == torch.float32 for p in problem.model.parameters())


def test_a_model_with_dropout_in_training_mode_is_refused_by_name(tmp_path, capsys):
    """The issue's run printed "operator: relative error ≈ 4.9e-17" for a model whose
    dropout drew a new mask on every pass; the command now names the module."""
    from deqhess.cli.main import main

    factory = tmp_path / "model_factory.py"
    factory.write_text(FACTORY.replace("nn.Linear(4, 3))", "nn.Dropout(0.3), nn.Linear(4, 3))"))
    code = main(["analyze", f"{factory}:make", "--out", str(tmp_path / "out"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2
    assert "model.2 is dropout in training mode" in error and "model.eval()" in error
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_k_above_the_models_parameters_is_refused_before_any_product(
    tmp_path, capsys, monkeypatch
):
    """P of a ModelProblem (47 here) is known without a product: --top-k 47 ends at once."""
    from deqhess.cli.main import main

    factory = tmp_path / "model_factory.py"
    factory.write_text(FACTORY)
    calls = []
    original = ModelProblem.equilibria

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ModelProblem, "equilibria", counted)
    code = main(["analyze", f"{factory}:make", "--top-k", "47", "--out", str(tmp_path / "o"),
                 "--no-progress"])  # fmt: skip
    assert code == 2 and calls == []
    assert "top_k must lie in [1, P) = [1, 47); got 47." in capsys.readouterr().err
