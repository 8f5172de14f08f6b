"""The demo end to end at a tiny size, through the command line."""

from __future__ import annotations

import pytest

from deqhess.cli.main import main
from deqhess.demo import run_demo


def test_demo_report_and_plot(tmp_path):
    lines: list[str] = []
    figures = run_demo(
        out=tmp_path,
        steps=5,
        hessian_batch=8,
        state=6,
        fd_directions=1,
        progress=False,
        print_fn=lines.append,
        large_state=7,
        large_steps=2,
    )
    assert (tmp_path / "hessian_spectrum.png").stat().st_size > 10_000
    assert figures["parameters"] == 6 * 6 + 6 * 64 + 6 + 10 * 6 + 10
    assert figures["gradient_forms_relative_difference"] <= 1e-12
    assert figures["hvp_vs_dense"] <= 1e-12
    assert figures["fd_errors"][0] <= 1e-6
    low, high = figures["eigenvalues"]["total"]
    assert low <= high
    text = "\n".join(lines)
    for heading in ("solve", "checks", "curvature", "timings (s)", "‖dynamics‖/‖total‖"):
        assert heading in text
    large = figures["large"]  # the matrix-free section
    assert set(large["parts"]) == {"total", "loss_curvature", "dynamics_curvature"}
    assert (tmp_path / "matrix_free" / "spectral_density.png").exists()
    assert "matrix-free section" in text


def test_command_line_runs_demo(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--batch",
            "4",
            "--state",
            "4",
            "--large-state",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "deqhess demo" in out and "GGN" not in out
    assert (tmp_path / "hessian_spectrum.png").exists()


def test_no_progress_bars_off_a_terminal(tmp_path, capsys):
    """Under pytest stderr is not a terminal: no tqdm output, plain lines instead (a
    redirected log used to get hundreds of bar frames)."""
    lines: list[str] = []
    run_demo(out=tmp_path, steps=20, hessian_batch=4, state=3, fd_directions=1,
             print_fn=lines.append, large_state=4, large_steps=2)  # fmt: skip
    err = capsys.readouterr().err
    assert "training DEQ" not in err and "HVP/s" not in err and "it/s" not in err
    steps = [line for line in lines if line.startswith("  training: step") and "/20," in line]
    assert len(steps) == 10 and steps[-1].startswith("  training: step 20/20, loss")
    assert any(line.startswith("  … total: top-5 eigenvalues") for line in lines)


def test_command_line_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err
