"""The state a factory's problem starts from, named in a command-line user's words: the
data's dtype, ``init_state`` and ``--dtype`` — never an ``h0`` they do not pass."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from deqhess.cli.main import main

FACTORY = textwrap.dedent(
    """
    import torch
    from deqhess.cli import AnalysisProblem

    g = torch.Generator().manual_seed(0)
    THETA = {"W": 0.4 * torch.eye(4, dtype=torch.float64),
             "U": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(8, 4, generator=g, dtype=torch.float64)

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T)

    def _problem(theta=THETA, x=X, width=4, init=True):
        return AnalysisProblem(
            f=f, theta=theta, data=list(zip(x.split(4), Y.split(4))),
            loss=lambda h, t: ((h - t) ** 2).sum(1).mean(),
            init_state=(lambda x: x.new_zeros(x.shape[0], width)) if init else None,
        )

    def data_float32():
        return _problem(x=X.float())

    def theta_float32():
        return _problem(theta={k: v.float() for k, v in THETA.items()})

    def data_float32_no_init_state():
        problem = _problem(x=X.float(), init=False)
        problem.f = lambda x, h, t: torch.tanh(h[:, :3] @ t["U"][:3] + x)  # a state like x
        return problem

    def init_state_too_wide():
        return _problem(width=5)
    """
)


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "state_factory.py"
    path.write_text(FACTORY)
    return path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("data_float32", r"the state starts as torch\.float32 on cpu \(from "
                         r"AnalysisProblem\.init_state\(x\); the data's x is torch\.float32 on "
                         r"cpu\) but theta is torch\.float64 on cpu: .*--dtype float64\."),
        ("theta_float32", r"the state starts as torch\.float64 on cpu \(from AnalysisProblem\."
                          r"init_state\(x\); the data's x is torch\.float64 on cpu\) but theta "
                          r"is torch\.float32 on cpu: .*--dtype float32\."),
        ("data_float32_no_init_state", r"the state starts as torch\.float32 on cpu \(zeros like "
                                       r"x, as the factory gave no init_state; the data's x is "
                                       r"torch\.float32"),
    ],
    ids=["data-float32", "theta-float32", "no-init-state"],
)  # fmt: skip
def test_a_state_of_another_dtype_than_theta_points_at_the_data_and_dtype(
    factory, tmp_path, capsys, name, message
):
    """Was "h0 is torch.float32 … make them match, e.g. h0.to(theta_tensor)"."""
    out = str(tmp_path / "out")
    assert main(["analyze", f"{factory}:{name}", "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"^deqhess analyze: error: {message}", err), err
    assert "h0" not in err and "Traceback" not in err


def test_the_advised_dtype_flag_runs_it(factory, tmp_path, capsys):
    code = main(["analyze", f"{factory}:data_float32", "--out", str(tmp_path / "out"), "--dtype",
                 "float64", "--top-k", "1", "--trace", "none", "--no-progress"])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["samples"] == 8


def test_an_init_state_of_the_wrong_width_is_named_in_a_note(factory, tmp_path):
    """f's own shape error (4x5 and 4x4) said nothing of init_state; it keeps its
    traceback (the user's code raised it), with a note naming the start."""
    with pytest.raises(RuntimeError, match=r"4x5 and 4x4") as raised:
        main(["analyze", f"{factory}:init_state_too_wide", "--out", str(tmp_path / "out"),
              "--no-progress"])  # fmt: skip
    # the CLI's note on init_state (Equilibrium's own, with both shapes, comes first)
    note = raised.value.__notes__[-1]
    assert note.startswith(
        "deqhess: f raised this at its first evaluation, from the state "
        "AnalysisProblem.init_state(x) returned (shape (4, 5); x: (4, 3)). If that is not the "
        "shape of the state f(x, h, theta) returns, fix AnalysisProblem.init_state"
    )
    assert not (tmp_path / "out").exists()
