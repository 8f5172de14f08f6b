"""A small DEQ classifier for scikit-learn's handwritten digits (shipped offline).

State ``h ∈ R^{B×n}``, ``f(x, h, θ) = tanh(h Wᵀ + x Uᵀ + b)``; the readout ``V, c`` lives
in the loss, ``L(h, θ) = CE(h Vᵀ + c, y) + (κ/2)‖θ‖²``, so the demo exercises the
Lagrangian form ``L(h, θ)``. Training uses deqhess's own implicit gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from ..implicit import Equilibrium

__all__ = ["DigitsDEQ", "load_digits_split", "train"]


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: 8×8 digits as 64 features in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - exercised only without extras
        raise ImportError("the demo needs scikit-learn: pip install 'deqhess[demo]'") from error
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=dtype) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * (1 - test_fraction))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


@dataclass
class DigitsDEQ:
    """The model: sizes, weight decay and the contraction bound kept during training.

    Attributes:
        state: n, the state width.
        features: m, the input width (64 for digits).
        classes: number of classes.
        weight_decay: κ in the loss.
        contraction: bound on ‖W‖₂ enforced after each step (keeps f contractive).
    """

    state: int = 32
    features: int = 64
    classes: int = 10
    weight_decay: float = 1e-4
    contraction: float = 0.9

    def init(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
        """θ = {W, U, b, V, c} with ‖W‖₂ = 0.5."""
        g = torch.Generator().manual_seed(seed)
        n, m, k = self.state, self.features, self.classes
        w = torch.randn(n, n, generator=g, dtype=dtype)
        return {
            "W": 0.5 * w / torch.linalg.matrix_norm(w, ord=2),
            "U": torch.randn(n, m, generator=g, dtype=dtype) / m**0.5,
            "b": torch.zeros(n, dtype=dtype),
            "V": torch.randn(k, n, generator=g, dtype=dtype) / n**0.5,
            "c": torch.zeros(k, dtype=dtype),
        }

    @staticmethod
    def f(x: Tensor, h: Tensor, theta: dict[str, Tensor]) -> Tensor:
        """``tanh(h Wᵀ + x Uᵀ + b)``, row-wise in the batch."""
        return torch.tanh(h @ theta["W"].T + x @ theta["U"].T + theta["b"])

    def loss(self, targets: Tensor):
        """``L(h, θ)``: mean cross-entropy of the readout plus weight decay."""

        def objective(h: Tensor, theta: dict[str, Tensor]) -> Tensor:
            logits = h @ theta["V"].T + theta["c"]
            decay = sum(t.pow(2).sum() for t in theta.values())
            ce = torch.nn.functional.cross_entropy(logits, targets)
            return ce + 0.5 * self.weight_decay * decay

        return objective

    def equilibrium(self, theta: dict[str, Tensor], x: Tensor, **opts) -> Equilibrium:
        """The batch's equilibrium (samples independent: ``batch_dim=0``)."""
        h0 = x.new_zeros(x.shape[0], self.state)
        return Equilibrium(self.f, theta, x, h0, batch_dim=0, **opts)

    def accuracy(self, theta: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
        """The share of samples of ``x`` whose readout's largest logit is their label ``y``."""
        h = self.equilibrium(theta, x).h
        logits = h @ theta["V"].T + theta["c"]
        return float((logits.argmax(dim=1) == y).double().mean())

    def project(self, theta: dict[str, Tensor]) -> None:
        """Clip W's singular values at ``contraction`` (in place on the training copy)."""
        u, s, vh = torch.linalg.svd(theta["W"])
        theta["W"].copy_(u @ torch.diag(s.clamp(max=self.contraction)) @ vh)


def train(
    model: DigitsDEQ,
    x: Tensor,
    y: Tensor,
    steps: int = 150,
    batch: int = 128,
    lr: float = 0.02,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **equilibrium_options: Any,
) -> tuple[dict[str, Tensor], list[float]]:
    """Adam on minibatches with deqhess's implicit gradient, ``W`` kept contractive.

    Args:
        model: the DEQ to train.
        x: training inputs ``[N, 64]``.
        y: training labels ``[N]``.
        steps: optimiser steps.
        batch: samples per minibatch (drawn with replacement).
        lr: Adam's learning rate.
        seed: seed of θ's initialisation and of the minibatches.
        progress: a tqdm bar (for a terminal).
        log: without a bar, receives a plain line every tenth of the steps.
        **equilibrium_options: for each step's :class:`Equilibrium` (e.g.
            ``linear_solver="gmres"``: one adjoint solve per step needs no dense LU).

    Returns:
        ``(theta, losses)``: the trained θ (detached) and each step's minibatch loss.
    """
    from tqdm.auto import tqdm

    theta = model.init(seed, x.dtype)
    params = [t.requires_grad_() for t in theta.values()]
    optimizer = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    every = max(1, steps // 10)
    for step in tqdm(range(steps), desc="training DEQ", disable=not progress, leave=False):
        idx = torch.randint(len(y), (batch,), generator=g)
        snapshot = {k: v.detach().clone() for k, v in theta.items()}
        eq = model.equilibrium(snapshot, x[idx], tol=1e-8, **equilibrium_options)
        objective = model.loss(y[idx])
        gradient = cast(dict[str, Tensor], eq.grad(objective))  # θ's structure: a dict
        for name, t in theta.items():
            t.grad = gradient[name]
        optimizer.step()
        with torch.no_grad():
            model.project(theta)
        with torch.no_grad():
            losses.append(float(objective(eq.h, snapshot)))
        if log is not None and not progress and ((step + 1) % every == 0 or step + 1 == steps):
            log(f"  training: step {step + 1}/{steps}, loss {losses[-1]:.3f}")
    return {k: v.detach().clone() for k, v in theta.items()}, losses
