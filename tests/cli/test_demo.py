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
    assert "deqhess demo" in capsys.readouterr().out
    assert (tmp_path / "hessian_spectrum.png").exists()


def test_command_line_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err
