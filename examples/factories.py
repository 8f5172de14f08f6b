"""Factories for ``deqhess analyze`` (each returns a ``deqhess.cli.AnalysisProblem``, or a
``deqhess.cli.ModelProblem`` for a whole model).

deqhess analyze examples/factories.py:tanh_deq_100k --top-k 5 --trace hutch++
deqhess analyze examples/factories.py:digits_classifier --top-k 5 --trace hutch++
torchrun --standalone --nproc-per-node=2 -m deqhess analyze examples/factories.py:classifier_tiny
deqhess analyze examples/factories.py:mdeq_digits --top-k 5 --trace hutch++
"""

from __future__ import annotations

import torch
from torch import nn

from deqhess.cli import AnalysisProblem, ModelProblem
from deqhess.nn import DEQ


class TanhCell(nn.Module):
    """``tanh(W h + U x + b)`` with ``‖W‖₂ = 0.5``."""

    def __init__(self, n: int, m: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, n, generator=g)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(n, m, generator=g) / m**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=g))
        self.n = n

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x @ self.U.T + self.b)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.n)


def _regression(n: int, m: int, samples: int, batch: int, seed: int = 0) -> AnalysisProblem:
    torch.set_default_dtype(torch.float64)
    cell = TanhCell(n, m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(samples, m, generator=g)
    y = torch.randn(samples, n, generator=g).tanh()

    def loss(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (h - target).pow(2).sum(1).mean() + torch.log(torch.cosh(h)).sum(1).mean()

    return AnalysisProblem(
        f=cell, data=list(zip(x.split(batch), y.split(batch), strict=True)), loss=loss
    )


def tanh_deq_100k() -> AnalysisProblem:
    """n = 300, m = 64: P = 109,500 parameters; 128 samples in two batches of 64."""
    return _regression(300, 64, 128, 64)


def tanh_deq_tiny() -> AnalysisProblem:
    """n = 4, m = 3: P = 32; for trying the command in a second."""
    return _regression(4, 3, 10, 4)


class InputCell(nn.Module):
    """``tanh(W h + x + b)``, ``‖W‖₂ = 0.5``: the input already mapped to the state's width."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, n, generator=g)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=g))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.W.T + x + self.b)


def digits_classifier() -> ModelProblem:
    """``Linear(64, 32) → DEQ → Linear(32, 10)`` on the 1,797 digits (P = 3,466), float64:
    every parameter, encoder and head included; the output GGN beside the Hessian."""
    from sklearn.datasets import load_digits

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 32), DEQ(InputCell(32)), nn.Linear(32, 10))
    data = list(zip(x.split(600), y.split(600), strict=True))
    return ModelProblem(model, nn.CrossEntropyLoss(), data)


def classifier_tiny() -> ModelProblem:
    """``Linear(3, 4) → DEQ → Linear(4, 3)`` on 10 samples in batches of 4 (P = 51),
    float64: a whole model to try the command (or ``torchrun``) in seconds."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), DEQ(InputCell(4), tol=1e-13), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
    return ModelProblem(
        model, nn.CrossEntropyLoss(), list(zip(x.split(4), y.split(4), strict=True))
    )


def mdeq_digits() -> ModelProblem:
    """The MDEQ-style conv DEQ of ``examples/mdeq_digits.py``, trained there (float32,
    ~10 s), analysed on the 360 test images over all its parameters — encoder, DEQ cell,
    head — with the split at its DEQ layer. In float32, as trained (CPU convolutions in
    float64 are ~5× slower): ``deqhess analyze`` measures each operator's error against
    float64 on a few probes; ``--dtype float64`` analyses it in float64."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).with_name("mdeq_digits.py")
    spec = importlib.util.spec_from_file_location("mdeq_digits", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules["mdeq_digits"] = example
    spec.loader.exec_module(example)
    model, _, (_, _, x_test, y_test) = example.train(log=lambda line: None)
    model.deq.tol, model.deq.atol, model.deq.max_iter = None, None, 2000  # tol by dtype
    data = list(zip(x_test.split(120), y_test.split(120), strict=True))
    return ModelProblem(model, nn.CrossEntropyLoss(), data)
