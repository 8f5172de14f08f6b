"""A factory's solver options: names checked when the problem is read, and the float64
reference's options tightened to float64's own tolerance."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

import deqhess as dh
from deqhess.cli.main import main
from deqhess.cli.solver_options import SOLVER_OPTIONS, reference_options
from deqhess.linear import GMRES

FACTORY = textwrap.dedent(
    """
    import torch
    from deqhess.cli import AnalysisProblem

    def make(**options):
        g = torch.Generator().manual_seed(0)
        theta = {"W": 0.4 * torch.eye(4, dtype=torch.float64),
                 "U": torch.randn(4, 3, generator=g, dtype=torch.float64)}
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        y = torch.randn(8, 4, generator=g, dtype=torch.float64)
        return AnalysisProblem(
            f=lambda x, h, t: torch.tanh(h @ t["W"].T + x @ t["U"].T), theta=theta,
            data=list(zip(x.split(4), y.split(4))), loss=lambda h, t: ((h - t) ** 2).mean(),
            init_state=lambda x: x.new_zeros(x.shape[0], 4), options=options,
        )

    def misspelled():
        return make(tolerance=1e-8)

    def loose():
        return make(tol=1e-3, atol=1e-3)

    def a_field():
        return make(batch_dim=1)

    def not_a_dict():
        problem = make()
        problem.options = [("tol", 1e-8)]
        return problem
    """
)


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "options_factory.py"
    path.write_text(FACTORY)
    return path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("misspelled", r"AnalysisProblem\.options of the factory '.*:misspelled' has an unknown "
                       r"option 'tolerance' \(did you mean 'tol'\?\); the options are allow_empty, "
                       r"atol, .*max_iter, .*tol \(see deqhess\.Equilibrium"),
        ("a_field", r"has 'batch_dim', which is not a solver option: set "
                    r"AnalysisProblem\.batch_dim instead\."),
        ("not_a_dict", r"must be a dict of deqhess\.Equilibrium options .*; got list\."),
    ],
    ids=["misspelled", "a-field", "not-a-dict"],
)  # fmt: skip
def test_an_option_the_solver_would_not_take_is_refused_when_read(
    factory, tmp_path, capsys, monkeypatch, name, message
):
    """options={"tolerance": 1e-8} gave a raw TypeError from Equilibrium.__init__ at the
    first solve; now one message naming the key, the likely one and the valid ones,
    before anything is solved."""
    solved = []
    monkeypatch.setattr(dh.DatasetEquilibrium, "_first_pass", lambda *a: solved.append(1))
    code = main(["analyze", f"{factory}:{name}", "--out", str(tmp_path / "out"),
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and solved == [], err
    assert re.search(f"^deqhess analyze: error: .*{message}", err), err


def test_the_library_entry_point_refuses_them_too(factory):
    problem = dh.cli.load_factory(f"{factory}:make")
    problem.options = {"max_iters": 10}
    with pytest.raises(dh.InputError, match=r"unknown option 'max_iters' \(did you mean "):
        problem.equilibria(progress=False)
    problem.options = {}
    with pytest.raises(dh.InputError, match=r"the options given has an unknown option 'slover'"):
        problem.equilibria(progress=False, slover="picard")


def test_every_option_name_is_one_the_data_set_takes():
    """The names come from the signatures: each, with a valid value, is accepted."""
    values = {"allow_empty": False, "atol": 1e-12, "cache_bytes": 0, "chunk_size": 4,
              "convergence": "raise", "exclude_unconverged": False, "linear_solver": "dense",
              "max_condition": 1e12, "max_error_bound": 1e-3, "max_iter": 500,
              "require_convergence": True, "solver": "picard", "tol": 1e-11}  # fmt: skip
    assert set(SOLVER_OPTIONS) == set(values)
    theta = torch.tensor([0.5])
    data = [(torch.ones(2, 1), torch.zeros(2, 1))]
    equilibria = dh.DatasetEquilibrium(lambda x, h, t: t * h + x, theta, data,
                                       lambda h, y: ((h - y) ** 2).mean(), progress=False,
                                       **values)  # fmt: skip
    assert equilibria.num_samples == 2


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"tol": 1e-3, "solver": "picard"},
         {"tol": 1e-10, "atol": None, "max_iter": 1000, "solver": "picard"}),
        ({"tol": 1e-13, "atol": 1e-3, "max_iter": 5000},
         {"tol": 1e-13, "atol": 1e-13, "max_iter": 5000}),
        ({"max_iter": 25, "atol": 1e-14}, {"tol": 1e-10, "atol": 1e-14, "max_iter": 1000}),
    ],
    ids=["loose-tightened", "tighter-kept", "cap-raised"],
)  # fmt: skip
def test_the_reference_solves_to_float64s_own_tolerance(given, expected):
    """Float64's default tol is 1e-10; a tighter one given is kept, a looser one is not."""
    assert reference_options(given) == expected


def test_the_references_iterative_linear_solver_takes_float64s_tolerance():
    loose = GMRES(rtol=1e-3, atol=1e-4)
    reference = reference_options({"linear_solver": loose})["linear_solver"]
    assert isinstance(reference, GMRES) and (reference.rtol, reference.atol) == (None, 0.0)
    assert (loose.rtol, loose.atol) == (1e-3, 1e-4)  # the user's own object is unchanged
    assert reference_options({"linear_solver": "dense"})["linear_solver"] == "dense"


@pytest.mark.parametrize(
    ("flags", "atol"), [(["--tol", "1e-11"], 1e-11), (["--tol", "1e-11", "--atol", "1e-9"], 1e-9)]
)
def test_tol_on_the_command_line_sets_the_absolute_tolerance_too(
    factory, tmp_path, monkeypatch, flags, atol
):
    """A factory's atol=1e-3 stopped the solve at a residual of 9e-4 under --tol 1e-11 (the
    eigenvalues 1e-4 off, and the warning said to tighten tol): --tol sets both, --atol
    its own."""
    seen = []
    original = dh.DatasetEquilibrium.__init__

    def record(self, *args, **kwargs):
        seen.append((kwargs.get("tol"), kwargs.get("atol")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(dh.DatasetEquilibrium, "__init__", record)
    code = main(["analyze", f"{factory}:loose", "--top-k", "1", "--trace", "none",
                 "--out", str(tmp_path / "out"), "--no-progress", *flags])  # fmt: skip
    assert code == 0
    assert seen[0] == (1e-11, atol)
