"""The gradient-norm-regularised training example: its double backward is exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_penalty_gradient_through_layer_is_exact():
    example = _load("gradient_norm_digits")
    model = example.build(n=6)
    x, y = torch.rand(9, 64), torch.randint(0, 10, (9,))
    assert example.verify(model, x, y) <= 1e-9


def test_training_runs_and_stays_exact():
    example = _load("gradient_norm_digits")
    lines = []
    _, accuracy = example.train(steps=3, batch=16, log=lines.append)
    assert 0.0 <= accuracy <= 1.0
    first, last = float(lines[0].split()[-1]), float(lines[-1].split()[-1])
    assert first <= 1e-9 and last <= 1e-9
