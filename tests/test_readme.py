"""The README's quick start runs as written: its Python blocks, in order, in one namespace
(as a reader would paste them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _sections() -> dict[str, str]:
    """``### heading`` → the Python block under it, for the quick start's sections."""
    text = README.read_text(encoding="utf-8")
    return dict(re.findall(r"^### (.+?)\n\n```python\n(.*?)^```", text, re.S | re.M))


@pytest.fixture(scope="module")
def scope() -> dict:
    names = list(_sections())
    assert names == [
        "The functional form: `Equilibrium`",
        "The layer: `deqhess.nn.DEQ`",
        "Whole models on whole data sets: `ModelCurvature`",
    ]
    namespace: dict = {}
    for name, code in _sections().items():
        exec(compile(code, f"{README} ({name})", "exec"), namespace)
    return namespace


def test_functional_form(scope):
    p = scope["eq"].num_parameters
    assert scope["split"].total.shape == (p, p)
    assert scope["Hv"].shape == (p,)


def test_layer(scope):
    assert scope["h"].shape == (4, 8) and scope["info"].converged
    assert [n for n, _ in scope["deq"].named_parameters()] == ["cell.lin.weight", "cell.lin.bias"]
    assert all(p.grad is not None for p in scope["deq"].parameters())  # the double backward


def test_whole_model(scope):
    """The whole-model example: its operators are the model's (P = 467) and the estimates
    come with their own error measures."""
    assert scope["curvature"].num_parameters == 467
    top = scope["top"]
    assert top.eigenvalues.shape == (3,) and top.num_hvps > 0
    assert float(top.residuals.max()) < 1e-6 * float(top.eigenvalues.abs().max())
    assert scope["trace"].num_hvps == 30 and scope["trace"].std_error >= 0
