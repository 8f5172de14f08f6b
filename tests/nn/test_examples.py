"""The gradient-norm-regularised training example: its double backward is exact."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from problems import relative_error

import deqhess as dh

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
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


def test_mdeq_digits_quick_run_is_exact(tmp_path):
    """The MDEQ example's short run: float32 training with the convergence policy, then
    float64 curvature where two independent paths must agree — the HVP by double backward
    through the trained layer against Equilibrium.hvp, and the gradient of the
    gradient-norm penalty against ∇L + 2βH∇L (both exact up to the 1e-12 solves)."""
    example = _load("mdeq_digits")
    lines = []
    figure = tmp_path / "mdeq.png"
    result = example.main(["--quick", "--out", str(figure)], log=lines.append)
    assert figure.exists()
    assert result.layer_vs_equilibrium_hvp <= 1e-9
    assert result.penalty_gradient_error <= 1e-9
    for part, values in result.top.items():
        assert bool((values[:-1] >= values[1:]).all()), part  # descending
        assert float(result.residuals[part].max()) <= 1e-6 * float(values.abs().max())
    assert any(line.startswith("epoch 2:") for line in lines)


def test_laplace_digits_quick_run_uses_the_exact_ggn(tmp_path):
    """The Laplace example's short run: laplace-torch's full GGN through the layer is
    deqhess's own (ModelCurvature, an independent path: streamed GGN products), and
    torchdeq's layer, where installed, gives a diagonal GGN far from the exact one."""
    pytest.importorskip("laplace")
    example = _load("laplace_digits")
    figure = tmp_path / "laplace.png"
    lines = []
    result = example.main(["--quick", "--out", str(figure)], log=lines.append)
    assert figure.exists()
    la = result.laplace
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    curvature = dh.ModelCurvature(la.model, loss, result.batches)
    operator = curvature.ggn_operator()
    exact = operator.matmat(torch.eye(operator.shape[0], dtype=torch.float64))
    assert relative_error(la.H, exact) <= 1e-9
    assert {"MAP", "Laplace full (deqhess)", "Laplace diag (deqhess)"} <= set(result.metrics)
    if result.torchdeq_ggn_error is not None:
        assert result.torchdeq_ggn_error >= 0.05
