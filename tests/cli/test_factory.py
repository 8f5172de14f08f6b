"""How ``deqhess analyze`` loads a factory: a file runs as ``python path/to/file.py``
would, its own folder first on ``sys.path``."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import deqhess as dh
from deqhess.cli.main import main

HELPERS = "deqhess_test_factory_helpers"

FACTORY = textwrap.dedent(
    f"""
    import torch
    from deqhess.cli import AnalysisProblem
    from {HELPERS} import f  # a module beside this file

    def make():
        g = torch.Generator().manual_seed(0)
        theta = {{"W": 0.4 * torch.eye(4, dtype=torch.float64),
                  "U": torch.randn(4, 3, generator=g, dtype=torch.float64)}}
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        y = torch.randn(8, 4, generator=g, dtype=torch.float64)
        return AnalysisProblem(
            f=f, theta=theta, data=list(zip(x.split(4), y.split(4))),
            loss=lambda h, t: ((h - t) ** 2).sum(1).mean(),
            init_state=lambda x: x.new_zeros(x.shape[0], 4),
        )
    """
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """``proj/fac.py`` importing ``proj/<HELPERS>.py``, run from another folder."""
    folder = tmp_path / "my project"
    folder.mkdir()
    (folder / "fac.py").write_text(FACTORY)
    (folder / f"{HELPERS}.py").write_text(
        "import torch\n\n\ndef f(x, h, t):\n    return torch.tanh(h @ t['W'].T + x @ t['U'].T)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    yield folder
    sys.modules.pop(HELPERS, None)


def test_a_factory_file_imports_the_modules_beside_it(project, tmp_path):
    """``from helpers import f`` in the factory failed with ModuleNotFoundError unless the
    command ran from the factory's folder."""
    path_before = list(sys.path)
    assert main(["analyze", f"{project / 'fac.py'}:make", "--out", str(tmp_path / "out"),
                 "--top-k", "2", "--trace", "none", "--no-progress"]) == 0  # fmt: skip
    assert sys.path == path_before  # the folder was taken off again
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["parameters"] == 28 and report["samples"] == 8
    assert sys.modules[HELPERS].__file__ == str(project / f"{HELPERS}.py")


def test_a_relative_factory_path_resolves_its_folder(project, monkeypatch):
    monkeypatch.chdir(project.parent)
    problem = dh.cli.load_factory(f"{project.name}/fac.py:make")
    assert isinstance(problem, dh.cli.AnalysisProblem) and problem.f.__module__ == HELPERS


def test_a_factory_that_needs_arguments_is_named_before_it_runs(tmp_path, capsys):
    """def make(width): … gave a raw TypeError traceback from inside the loader."""
    path = tmp_path / "needs.py"
    path.write_text("def make(width, depth=2):\n    raise AssertionError('not to be run')\n")
    code = main(["analyze", f"{path}:make", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "requires ['width'] but is called with no arguments" in err
