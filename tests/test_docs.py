"""The code of the documentation's pages runs as written (each page in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

# pages whose ```python blocks run; ```text blocks are signatures, not code
PAGES = [
    "getting-started.md",
    "guide/equilibrium.md",
    "guide/layer.md",
    "guide/models.md",
    "guide/analyses.md",
    "guide/cli.md",
    "contract.md",
]
# pages whose code runs in tests of their own (with laplace-torch's warnings filtered)
RUN_ELSEWHERE = {
    "guide/laplace.md": "tests/ecosystem/test_pages.py",
    "guide/torchdeq-migration.md": "tests/ecosystem/test_pages.py",
}


def run_page(page: str) -> dict:
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks, f"{page} has no python block"
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), scope)
    return scope


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, capsys):
    scope = run_page(page)
    if page == "guide/cli.md":  # the factory builds a problem deqhess analyze accepts
        from deqhess.cli import AnalysisProblem

        assert isinstance(scope["tiny"](), AnalysisProblem)
    if page == "getting-started.md":
        assert scope["H"].shape == (96, 96)
    capsys.readouterr()  # the pages print what they show


def test_every_page_with_python_code_is_run():
    with_code = {
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if "_build" not in p.parts and re.search(r"^```python$", p.read_text("utf-8"), re.M)
    }
    run = set(PAGES) | set(RUN_ELSEWHERE)
    assert with_code <= run, f"add to PAGES (or show as ```text): {with_code - run}"
