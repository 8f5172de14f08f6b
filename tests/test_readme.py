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
