"""Command-line details: help with defaults, solver flags, clear errors for common factory
mistakes, one error policy, float32 accuracy in the report, plots and progress."""

from __future__ import annotations

import json

import pytest
import torch
from test_analyze import FACTORY

import deqhess as dh
from deqhess.cli.main import main
from deqhess.curvature import extreme_eigenpairs


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "detail_factory.py"
    path.write_text(FACTORY)
    return path


def test_help_shows_defaults(capsys):
    for command, expected in [
        ("analyze", ["(default: 5)", "(default: hutch++)", "(default: 4)", "--linear-solver"]),
        ("demo", ["(default: 150)", "(default: 1)", "only on a terminal"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for piece in expected:
            assert piece in text, (command, piece)


def test_solver_flags_override_the_factory_options(factory, tmp_path, capsys):
    """The factory sets tol=1e-13; the flags replace solver, tolerance and linear solver."""
    code = main([
        "analyze", f"{factory}:make", "--out", str(tmp_path), "--parts", "total",
        "--top-k", "2", "--trace", "none", "--no-progress", "--solver", "picard",
        "--tol", "1e-9", "--max-iter", "500", "--linear-solver", "gmres",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["solve"]["linear_solver"].startswith("GMRES")
    assert report["solve"]["max_residual"] <= 1e-8  # the 1e-9 relative tolerance, |f| ≤ 2
    capsys.readouterr()
    # a cap too small to converge: deqhess's ConvergenceError, one message, status 1
    code = main([
        "analyze", f"{factory}:make", "--out", str(tmp_path), "--max-iter", "2",
        "--no-progress",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("deqhess analyze: error: ConvergenceError: ")
    assert "Traceback" not in err


def test_float32_report_carries_the_operator_accuracy(factory, tmp_path, capsys):
    """--dtype float32 casts θ and the data; the report then measures each part against
    the problem rebuilt in float64 (the float32 state is solved to 1e-5, so the operator's
    relative error is around 1e-5 — far above its Lanczos residuals)."""
    code = main([
        "analyze", f"{factory}:make", "--out", str(tmp_path), "--top-k", "2",
        "--bottom-k", "1", "--trace", "none", "--no-progress", "--dtype", "float32",
        "--tol", "1e-5",
    ])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dtype"] == "float32"
    for part, entry in report["parts"].items():
        accuracy = entry["accuracy"]
        assert 1e-8 <= accuracy["float64_error"] == accuracy["estimate"] <= 1e-3, part
        assert len(entry["top_float64_residuals"]) == 2 and len(entry["bottom_float64_residuals"])
    assert "vs float64 ≤" in text and "measured against float64" in text
    assert "bounds the distance to an eigenvalue of the operator as computed" in text


def test_eigenvalues_printed_ascending_as_the_api_returns_them(factory, tmp_path, capsys):
    """One order everywhere: a user comparing the printed top-3 with
    ``extreme_eigenpairs(...).eigenvalues`` was off by 2.3 until sorting."""
    main([
        "analyze", f"{factory}:make", "--out", str(tmp_path), "--parts", "total",
        "--top-k", "3", "--bottom-k", "2", "--trace", "none", "--no-progress",
    ])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    report = json.loads((tmp_path / "report.json").read_text())
    top, bottom = report["parts"]["total"]["top"], report["parts"]["total"]["bottom"]
    assert top == sorted(top) and bottom == sorted(bottom)
    problem = dh.cli.load_factory(f"{factory}:make")
    op = problem.equilibria(progress=False).hessian_operator("total")
    assert torch.allclose(torch.tensor(top), extreme_eigenpairs(op, 3).eigenvalues, atol=1e-8)
    top_line = next(line for line in lines if "top eigenvalues (ascending)" in line)
    bottom_line = next(line for line in lines if "bottom eigenvalues (ascending)" in line)
    assert top_line.split(":", 1)[1].strip().startswith(f"{top[0]:+.4e}")
    assert "residual ≤" in bottom_line and f"{bottom[0]:+.4e}" in bottom_line


def test_theta_with_parameters_outside_the_cell_is_explained(factory, capsys):
    assert main(["analyze", f"{factory}:cell_with_readout_theta", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "theta has parameters the cell Cell does not have: ['deq.W', 'deq.U', " in err
    assert "'head.weight', 'head.bias']" in err and "give f as a function" in err


def test_wrong_default_initial_state_is_explained(factory, capsys):
    """The cell's state is 4 wide and x 3 wide: zeros like x cannot be the state."""
    assert main(["analyze", f"{factory}:cell_without_init_state", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "f failed on the initial state: the factory gave no init_state" in err
    assert "zeros shaped like x, (4, 3)" in err and "caused by RuntimeError" in err


def test_errors_from_user_code_keep_their_traceback(factory, tmp_path):
    """deqhess's own errors are one message (tested above); an exception raised in the
    user's factory is theirs to debug and propagates untouched."""
    with pytest.raises(ValueError, match="the user's own bug"):
        main(["analyze", f"{factory}:raises_its_own_value_error", "--no-progress"])
    code = main(["analyze", f"{factory}:cell", "--out", str(tmp_path), "--top-k", "1",
                 "--trace", "none", "--parts", "total", "--no-progress"])  # fmt: skip
    assert code == 0


def test_threads_flag(factory, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", f"{factory}:make", "--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads must be at least 1; got 0" in capsys.readouterr().err


def test_diagonal_labels_do_not_overlap():
    """Long dotted names, many groups: every tick label's box is disjoint from the others
    (measured on the rendered figure)."""
    from deqhess.cli.plots import diagonal_figure

    names = [f"deq.cell.block{i}.conv.weight" for i in range(12)] + ["head.weight", "head.b"]
    groups = {n: {"abs_mean": 10.0 ** -i, "std_error": 0.1 * 10.0**-i} for i, n in
              enumerate(names)}  # fmt: skip
    fig, ax = diagonal_figure(groups)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in ax.get_yticklabels()]
    assert [label.get_text() for label in ax.get_yticklabels()] == names
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    assert all(fig.bbox.contains(box.x0, box.y0) for box in boxes)  # none cut off
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_tuple_state_points_to_tuple_state():
    with pytest.raises(
        ValueError, match=r"got tuple\. For a tuple state .*deqhess\.nn\.TupleState"
    ):
        dh.Equilibrium(lambda x, h, t: h, torch.ones(2), torch.ones(2), (torch.zeros(2),))


def test_casting_a_cell_problem_leaves_the_factory_untouched(factory):
    """--dtype/--device cast a copy of the cell, θ and the data; the factory's own cell
    stays float64 (inputs are never modified)."""
    problem = dh.cli.load_factory(f"{factory}:cell")
    data = problem.equilibria(progress=False, dtype=torch.float32)
    assert data.layout.dtype == torch.float32 and data.batch_solves[0].dtype == torch.float32
    assert all(p.dtype == torch.float64 for p in problem.f.parameters())
    problem.theta = torch.zeros(3)
    with pytest.raises(ValueError, match="with f = the cell Cell, theta must be a dict"):
        problem.equilibria(progress=False)


def test_an_analysis_at_its_cap_gets_no_hint_about_unconverged_samples(capsys):
    """The hint for a fixed point's solve (--exclude-unconverged) was appended to
    Lanczos at its cap too, a ConvergenceError as well: unrelated there."""
    from deqhess.cli.main import _report_error

    _report_error("analyze", dh.AnalysisConvergenceError("Lanczos reached its cap", None, 9, 9))
    assert "exclude-unconverged" not in capsys.readouterr().err
    _report_error("analyze", dh.ConvergenceError("the fixed point did not converge"))
    assert "exclude-unconverged" in capsys.readouterr().err
