"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text(encoding="utf-8")
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    p = scope["eq"].num_parameters
    assert scope["H"].shape == (p, p)
    assert scope["Hv"].shape == (p,)
    assert scope["split"].total.shape == (p, p)


def test_layer_example_runs():
    text = README.read_text(encoding="utf-8")
    block = re.search(
        r"## The DEQ layer: exact derivatives of every order\n\n```python\n(.*?)```", text, re.S
    )
    scope: dict = {}
    exec(compile("import torch\n" + block.group(1), str(README), "exec"), scope)
    assert scope["h"].shape == (4, 8) and scope["info"].converged
    assert [n for n, _ in scope["deq"].named_parameters()] == ["cell.lin.weight", "cell.lin.bias"]


def test_whole_model_example_runs():
    """The whole-model example: its operators are the model's (P = 467) and the
    estimates come with their own error measures."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Whole models on whole data sets\n\n```python\n(.*?)```", text, re.S)
    scope: dict = {}
    exec(compile(block.group(1), str(README), "exec"), scope)
    assert scope["curvature"].num_parameters == 467
    assert scope["top"].eigenvalues.shape == (3,) and scope["top"].num_hvps > 0
    assert float(scope["top"].residuals.max()) < 1e-6 * float(scope["top"].eigenvalues.abs().max())
    assert scope["trace"].num_hvps == 30 and scope["trace"].std_error >= 0
