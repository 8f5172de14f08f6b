"""The whole-model problems of ``vs_curvlinops.py`` and ``model_profile.py``.

Three classifiers ``encoder → deqhess.nn.DEQ(cell) → head`` with cross-entropy, float64,
on seeded Gaussian inputs and uniform labels, split into equal batches:

* ``tanh`` — ``Linear(m, n) → DEQ(tanh(W h + x + b), ‖W‖₂ = 0.5) → Linear(n, C)``;
  with (m, n, C) = (16, 32, 10), P = 1,930;
* ``conv`` — ``Conv2d(1 → 3) → DEQ(tanh(conv₂(tanh(conv₁ h)) + inject(x))) →
  Linear(c·s·s, C)``, the cell of ``conv_hvp.py`` with ``c`` channels and ``c`` hidden
  channels on an ``s × s`` image (c·s·s state values per sample, so the layer's backward
  is matrix-free); with (c, s, C) = (8, 8, 10), P = 6,552;
* ``mdeq`` — ``examples/mdeq_digits.py``'s MDEQ-style model (conv + group norm
  injection, the block ``z ↦ GN(conv₂(relu(GN(conv₁ z))) + x)``) with ``c`` channels on
  8 × 8 images: 24 channels give the issue's 1,536 state values per sample.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from conv_hvp import ConvCell
from dataset_scale import TanhCell
from torch import Tensor, nn

from deqhess.nn import DEQ

#: the problems' default sizes: (input or channels, width or side, classes).
DEFAULTS = {"tanh": (16, 32, 10), "conv": (8, 8, 10), "mdeq": (24, 8, 10)}


@dataclass
class Problem:
    """A model, its loss and its batches (``N = batches × batch`` samples)."""

    name: str
    model: nn.Module
    loss_func: nn.Module
    data: list[tuple[Tensor, Tensor]]
    classes: int

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_samples(self) -> int:
        return sum(x.shape[0] for x, _ in self.data)

    def describe(self) -> str:
        x = self.data[0][0]
        return (
            f"{self.name}: P = {self.num_parameters:,}, {len(self.data)} batches of "
            f"{x.shape[0]} (N = {self.num_samples}), input {tuple(x.shape[1:])}, "
            f"C = {self.classes}, {x.dtype}"
        )


class Classifier(nn.Module):
    """``head(deq(encoder(x)))``; while :attr:`infos` is a list, each forward appends the
    layer's :class:`deqhess.nn.LayerInfo` to it (whose ``linear_solves`` fill in as the
    derivatives are taken) — the profile's counter, off by default."""

    def __init__(self, encoder: nn.Module, deq: DEQ, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.deq, self.head = encoder, deq, head
        self.infos: list | None = None

    def forward(self, x: Tensor) -> Tensor:
        u = self.encoder(x)
        if self.infos is None:
            return self.head(self.deq(u))
        solution = self.deq.solve(u)
        self.infos.append(solution.info)
        return self.head(solution.h)


class StateConvCell(ConvCell):
    """``conv_hvp.py``'s cell with ``c`` channels (and ``c`` hidden), its state shaped by
    ``init_state`` (so the layer starts from zeros, or warm)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels)
        self.channels = channels

    def init_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])


def mdeq_model(channels: int) -> nn.Module:
    """``examples/mdeq_digits.py``'s ``MDEQDigits`` (loaded from its file, read-only)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "mdeq_digits.py"
    spec = importlib.util.spec_from_file_location("mdeq_digits", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mdeq_digits", example)
    spec.loader.exec_module(example)
    return example.MDEQDigits(channels)


def make_problem(
    name: str,
    sizes: tuple[int, int, int] | None = None,
    batches: int = 4,
    batch: int = 32,
    device: str = "cpu",
    seed: int = 0,
) -> Problem:
    """The seeded problem ``name`` (``tanh``, ``conv``, ``mdeq``) in float64 on ``device``."""
    a, b, classes = sizes or DEFAULTS[name]
    torch.manual_seed(seed)
    if name == "tanh":
        model = Classifier(nn.Linear(a, b), DEQ(TanhCell(b)), nn.Linear(b, classes))
        shape = (a,)
    elif name == "conv":
        encoder, head = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(a * b * b, classes)
        model = Classifier(encoder, DEQ(StateConvCell(a)), nn.Sequential(nn.Flatten(), head))
        shape = (1, b, b)
    elif name == "mdeq":
        model, shape = mdeq_model(a), (64,)
    else:
        raise ValueError(f"unknown problem {name!r}; use one of {sorted(DEFAULTS)}.")
    model = model.double().to(device).eval()
    g = torch.Generator().manual_seed(seed + 1)
    data = [
        (
            torch.randn(batch, *shape, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, classes, (batch,), generator=g).to(device),
        )
        for _ in range(batches)
    ]
    return Problem(name, model, nn.CrossEntropyLoss(), data, classes)
