"""The code of the Laplace and torchdeq-migration pages runs as written (each page in one
namespace), and says what the pages say."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[2] / "docs" / "guide"


def run_page(page: str) -> dict:
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks, f"{page} has no python block"
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # laplace-torch's own deprecation notes
        for block in blocks:
            exec(compile(block, str(DOCS / page), "exec"), scope)
    return scope


def test_laplace_page(capsys):
    pytest.importorskip("laplace")
    scope = run_page("laplace.md")
    assert scope["probs"].shape == (32, 3)
    assert 0 < scope["record"].unconverged < scope["kept"].numel()  # some were left out
    assert torch.allclose(scope["probs_nn"].sum(-1), torch.ones(len(scope["probs_nn"])))
    exact = scope["la"].posterior_covariance.diagonal()
    assert float((scope["variance"].estimate - exact).abs().max()) <= 1e-10 * float(exact.max())
    capsys.readouterr()


def test_torchdeq_migration_page(capsys):
    scope = run_page("torchdeq-migration.md")
    assert bool(scope["info"]["converged"].all())
    assert len(scope["hvp"]) == 2
    capsys.readouterr()
