"""``deqhess analyze`` end to end on a tiny factory: report, plots and numbers vs dense."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

import deqhess as dh
from deqhess.cli.main import main

FACTORY = textwrap.dedent(
    """
    import torch
    from deqhess.cli import AnalysisProblem

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    def make():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(4, 4, generator=g, dtype=torch.float64)
        theta = {
            "W": 0.45 * w / torch.linalg.matrix_norm(w, ord=2),
            "U": torch.randn(4, 3, generator=g, dtype=torch.float64),
            "b": torch.zeros(4, dtype=torch.float64),
        }
        x = torch.randn(6, 3, generator=g, dtype=torch.float64)
        y = torch.randn(6, 4, generator=g, dtype=torch.float64)
        data = [(x[:4], y[:4]), (x[4:], y[4:])]
        return AnalysisProblem(
            f=f, theta=theta, data=data, loss=lambda h, t: ((h - t) ** 2).sum(1).mean(),
            init_state=lambda x: torch.zeros(x.shape[0], 4, dtype=torch.float64),
            options={"tol": 1e-13},
        )

    def not_a_problem():
        return 42

    def incomplete_fields():
        return {"f": lambda x, h, t: h, "colour": "red"}

    def raises_its_own_value_error():
        raise ValueError("the user's own bug")

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.W = torch.nn.Parameter(0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64))
            self.U = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))

        def forward(self, x, h):
            return torch.tanh(h @ self.W.T + x @ self.U.T)

    def _cell_problem(**fields):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(6, 3, generator=g, dtype=torch.float64)
        y = torch.randn(6, 4, generator=g, dtype=torch.float64)
        defaults = dict(
            f=Cell(), data=[(x[:4], y[:4]), (x[4:], y[4:])],
            loss=lambda h, t: ((h - t) ** 2).sum(1).mean(),
            init_state=lambda x: x.new_zeros(x.shape[0], 4),
        )
        return AnalysisProblem(**{**defaults, **fields})

    def cell():
        return _cell_problem()

    def cell_with_readout_theta():
        model = torch.nn.ModuleDict({"deq": Cell(), "head": torch.nn.Linear(4, 2)})
        theta = {n: p.detach() for n, p in model.named_parameters()}
        return _cell_problem(theta=theta)

    def cell_without_init_state():
        return _cell_problem(init_state=None)
    """
)


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "tiny_factory.py"
    path.write_text(FACTORY)
    return path


def test_analyze_writes_report_and_plots(factory, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "analyze", f"{factory}:make", "--out", str(out), "--top-k", "3", "--bottom-k", "2",
        "--trace", "hutch++", "--trace-hvps", "99", "--density", "--density-steps", "20",
        "--diagonal", "50", "--blocks", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    for heading in ("deqhess analyze", "top eigenvalues", "trace (hutch++)", "dynamics_curvature"):
        assert heading in text
    for name in ("top_eigenvalues.png", "spectral_density.png", "diagonal.png", "report.json"):
        assert (out / name).stat().st_size > 1000 or name == "report.json"
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"] == 32 and report["samples"] == 6 and report["batches"] == 2
    # the numbers are the dense truth's: P = 32 ≤ trace_hvps/3 makes Hutch++ exact
    problem = dh.cli.load_factory(f"{factory}:make")
    dense = problem.equilibria(progress=False).hessian_split()
    for part, matrix in [("total", dense.total), ("loss_curvature", dense.loss_curvature),
                         ("dynamics_curvature", dense.dynamics_curvature)]:  # fmt: skip
        exact = torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))
        got = report["parts"][part]
        # both ascending, as extreme_eigenpairs returns them; each with its residuals
        assert torch.allclose(torch.tensor(got["top"]), exact[-3:], atol=1e-8)
        assert torch.allclose(torch.tensor(got["bottom"]), exact[:2], atol=1e-8)
        assert len(got["top_residuals"]) == 3 and len(got["bottom_residuals"]) == 2
        density = got["density"]
        assert len(density["grid"]) == len(density["density"]) == 400
        assert len(density["nodes"]) == len(density["weights"]) == 8
        assert abs(sum(density["weights"][0]) - 1.0) <= 1e-10
        assert got["accuracy"]["float64_error"] is None  # float64: nothing to measure
        assert got["accuracy"]["state_error"] <= 1e-10
        assert abs(got["trace"]["estimate"] - float(torch.trace(matrix))) <= 1e-8
    assert set(report["blocks"]) == {"W", "U", "b"}


def test_analyze_errors(factory, capsys):
    assert main(["analyze", f"{factory}:not_a_problem", "--no-progress"]) == 2
    assert "returned int; return a deqhess.cli.AnalysisProblem" in capsys.readouterr().err
    assert main(["analyze", f"{factory}:incomplete_fields", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "returned a dict for AnalysisProblem without ['data', 'loss'] and with unknown" in err
    assert "Traceback" not in err
    for spec, message in [
        ("no_colon", "must look like 'package.module:function'"),
        ("missing.py:make", "does not exist"),
        ("deqhess_no_such_module:make", "cannot import"),
        (f"{factory}:absent", "has no callable 'absent'"),
    ]:
        assert main(["analyze", spec, "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert main(["analyze", f"{factory}:make", "--parts", "ggn", "--no-progress"]) == 2
    assert "unknown part 'ggn'" in capsys.readouterr().err


def test_progress_bars_on_request(factory, tmp_path, capsys):
    from deqhess.cli.analyze import run_analysis

    problem = dh.cli.load_factory(f"{factory}:make")
    run_analysis(problem, out=tmp_path, parts=["total"], top_k=2, trace="hutchinson",
                 trace_hvps=10, progress=True, print_fn=lambda line: None)  # fmt: skip
    err = capsys.readouterr().err
    assert "Hutchinson" in err and "HVP" in err and "solving batches" in err


def test_analysis_argument_errors(factory, tmp_path):
    from deqhess.cli.analyze import run_analysis

    problem = dh.cli.load_factory(f"{factory}:make")
    with pytest.raises(ValueError, match="unknown trace estimator 'exact'"):
        run_analysis(problem, out=tmp_path, trace="exact", print_fn=lambda line: None)
    with pytest.raises(ValueError, match=r"float64_probes must be 0 \(skip\) or at least 2; got 1"):
        run_analysis(problem, out=tmp_path, float64_probes=1, print_fn=lambda line: None)
    problem.theta = None
    with pytest.raises(ValueError, match="the factory gave no theta"):
        problem.equilibria(progress=False)


@pytest.fixture
def solves(monkeypatch):
    """Each call of a problem's ``equilibria`` (where the batches are solved), recorded."""
    calls = []
    for kind in (dh.cli.AnalysisProblem, dh.cli.ModelProblem):
        original = kind.equilibria

        def counted(self, *args, _original=original, **kwargs):
            calls.append(type(self).__name__)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(kind, "equilibria", counted)
    return calls


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--out", "{file}"], r"out '.*afile' is a file, not a folder; .* pass a new folder"),
        (["--out", "{file}/sub"], r"out '.*afile/sub' lies under '.*afile', which is a file"),
        pytest.param(["--out", "/proc/deqhess-analysis/out"],
                     r"out '/proc/deqhess-analysis/out' cannot be made or written \(.+: "
                     r"/proc/deqhess-analysis\); pass a folder you can create and write",
                     marks=pytest.mark.skipif(not Path("/proc/self").is_dir(),
                                              reason="no /proc file system here")),
        (["--parts", ","], r"parts is empty \(--parts named none\); name at least one part"),
        (["--device", "cuda:99"], r"device 'cuda:99' is not available here; pass "),
        (["--device", "gpu"], r"device 'gpu' is not a device torch knows"),
        (["--top-k", "40"], r"top_k must lie in \[1, P\) = \[1, 32\); got 40\."),
        (["--top-k", "-1"], r"top_k must be an int >= 0; got -1\."),
        (["--bottom-k", "32"], r"bottom_k must lie in \[1, P\) = \[1, 32\); got 32\."),
        (["--diagonal", "1"], r"diagonal needs diagonal_probes >= 2 for an error estimate; got 1"),
        (["--density", "--density-probes", "0"],
         r"spectral density: need density_probes >= 1 and density_steps >= 1; got 0, 60\."),
        (["--trace", "hutchinson", "--trace-hvps", "1"], r"hutchinson needs trace_hvps >= 2 "),
        (["--trace-hvps", "5"], r"hutch\+\+ needs trace_hvps >= 6; got 5\."),
    ],
    ids=["out-file", "out-under-file", "out-unwritable", "parts-empty", "device-absent",
         "device-unknown", "top-k-above-P", "top-k-negative", "bottom-k-P", "diagonal-1",
         "density-probes-0", "hutchinson-1", "hutch++-5"],
)  # fmt: skip
def test_a_bad_request_is_refused_before_any_solve(factory, tmp_path, capsys, solves, flags,
                                                   message):  # fmt: skip
    """Each was refused only after the batches were solved and the analyses before it
    had run — or, for the first five, ended in a raw traceback (FileExistsError after
    every analysis; a PermissionError or FileNotFoundError after every analysis for an
    --out that cannot be made; max() of an empty list in the plots, CUDA's
    AssertionError). Now one message and exit status 2, before anything is solved."""
    (tmp_path / "afile").write_text("not a folder")
    flags = [flag.replace("{file}", str(tmp_path / "afile")) for flag in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "out")]
    assert main(["analyze", f"{factory}:make", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(f"^deqhess analyze: error: {message}", err), err
    assert "Traceback" not in err
    assert solves == []
    assert not (tmp_path / "out").exists()


def test_run_analysis_checks_the_request_before_solving(factory, tmp_path, solves):
    """The library entry point refuses the same requests, with the same words."""
    from deqhess.cli.analyze import run_analysis

    problem = dh.cli.load_factory(f"{factory}:make")
    for kwargs, message in [
        ({"parts": []}, r"parts is empty"),
        ({"top_k": 2.0}, r"top_k must be an int; got 2\.0 \(float\)\. Pass e\.g\. top_k=2\."),
        ({"bottom_k": 40}, r"bottom_k must lie in \[1, P\) = \[1, 32\); got 40\."),
    ]:
        with pytest.raises(dh.InputError, match=message):
            run_analysis(problem, out=tmp_path / "out", print_fn=lambda line: None, **kwargs)
    assert solves == []
