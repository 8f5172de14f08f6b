"""The help says what its optional checks cost, not only what they do."""

from __future__ import annotations

import pytest

from deqhess.cli.main import main


def test_the_float64_cross_check_says_what_it_costs(capsys):
    """``--float64-probes`` rebuilds the whole problem in float64: the help names the
    second forward solve of every batch, the memory of its solved batches and the
    products per part, so a user can weigh it against the analysis itself."""
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for piece in (
        "Costs a second forward solve of every batch in float64",
        "its solved batches kept beside the float32 ones",
        "N products of each operator and k float64 products per eigenvalue list",
    ):
        assert piece in text, piece
