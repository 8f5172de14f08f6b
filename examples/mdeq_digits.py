"""
An MDEQ-style convolutional DEQ on digits, trained, then analysed exactly
=========================================================================

The model is encoder → DEQ → head on the 8×8 digits (shipped offline with
scikit-learn): a 3×3 convolution with group norm injects the image, the DEQ cell is
MDEQ's block ``z ↦ GN(conv₂(relu(GN(conv₁ z))) + x)`` on a 16 × 8 × 8 state (1,024
numbers per sample, so the layer's backward is matrix-free), and the head classifies
the state. A projection after each step keeps the block a contraction.

1. **Training** (float32) with :class:`deqhess.nn.DEQ` and a convergence policy fit
   for training: Anderson, then damped Picard for the samples it leaves unconverged,
   then keep the best iterate; those samples are left out of the loss (the layer's
   ``converged_mask``), and every epoch reports how many there were.
2. **Exact curvature** (float64) of the test loss in the cell's parameters: the top
   eigenvalues of the Hessian, of its loss curvature and of its dynamics curvature, by
   Lanczos on :class:`deqhess.Equilibrium`'s matrix-free HVPs; checked against the
   HVP by double backward through the trained model's own layer (an independent path).
3. **A gradient-norm-penalised step** ``L + β‖∇L‖²``: its gradient by double backward
   through the layer, checked against ``∇L + 2β H ∇L`` from the equilibrium.

Run ``python examples/mdeq_digits.py --out mdeq_digits.png`` (about a minute on a
2-core machine; ``--quick`` for seconds) or ``deqhess analyze
examples/factories.py:mdeq_digits`` for the command-line report. The documentation runs
the ``--quick`` version.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import deqhess as dh
from deqhess.curvature import extreme_eigenpairs
from deqhess.demo import load_digits_split
from deqhess.nn import DEQ, LayerInfo
from deqhess.solvers import Convergence, Picard

# %%
# The model
# ---------
# MDEQ's block as the DEQ cell, an injection of the image before it and a linear head
# after it. The layer's parameters are the cell's (``deq.cell.*``).


class MDEQCell(nn.Module):
    """MDEQ's block on a ``[B, C, 8, 8]`` state, ``x`` the injected image:
    ``z ↦ GN₂(conv₂(relu(GN₁(conv₁ z))) + x)``.

    Group norm makes the block invariant to the scale of ``z``; its last normalisation,
    over the convolution plus the injected image, divides by their spread, so while the
    convolution stays small next to the injection the block is a contraction (MDEQ's
    small initialisation; MDEQ's extra ``z`` skip connection is left out: with it the
    iteration loses stability as training proceeds, and fixed points stop existing).
    """

    def __init__(self, channels: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.bound = 2.0
        self.keep_contractive()

    def keep_contractive(self) -> None:
        """Scale ``conv₂`` so that ``Σᵢⱼ ‖K[:, :, i, j]‖₂`` (which bounds its operator norm)
        is at most ``bound``: the block then stays a contraction as it trains."""
        with torch.no_grad():
            w = self.conv2.weight
            norm = torch.linalg.matrix_norm(w.permute(2, 3, 0, 1), ord=2).sum()
            if norm > self.bound:
                w.mul_(self.bound / norm)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        y = torch.relu(self.norm1(self.conv1(z)))
        return self.norm2(self.conv2(y) + x)


class MDEQDigits(nn.Module):
    """Encoder → DEQ → head for 8×8 images ``[B, 64]`` (flattened, in [0, 1])."""

    def __init__(self, channels: int = 16, **deq_options) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(4, channels)
        )
        self.deq = DEQ(MDEQCell(channels), **deq_options)
        self.head = nn.Linear(channels * 64, 10)

    def injection(self, images: Tensor) -> Tensor:
        return self.encoder(images.reshape(-1, 1, 8, 8))

    def readout(self, z: Tensor) -> Tensor:
        return self.head(z.flatten(1))

    def forward(self, images: Tensor) -> Tensor:
        return self.readout(self.deq(self.injection(images)))

    def logits_and_info(self, images: Tensor) -> tuple[Tensor, LayerInfo]:
        """The logits, and the layer's statistics for this call (``deq.solve``)."""
        solution = self.deq.solve(self.injection(images))
        return self.readout(solution.h), solution.info


# %%
# Training in float32
# -------------------
# The convergence policy keeps training going when a few samples miss the tolerance:
# they are left out of the loss (``info.converged_mask``) and counted.


def training_policy() -> Convergence:
    """Anderson, then damped Picard on what it leaves, then the best iterate (masked)."""
    return Convergence("best", fallback=Picard(damping=0.5), fallback_max_iter=100, warn=False)


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    unconverged: list[int] = field(default_factory=list)
    forward_iterations: list[float] = field(default_factory=list)
    backward_products: list[float] = field(default_factory=list)


def train(
    epochs: int = 8, batch: int = 64, steps: int | None = None, seed: int = 0, log=print
) -> tuple[MDEQDigits, History, tuple[Tensor, ...]]:
    """Train in float32; returns the model, per-epoch history and the data split."""
    data = load_digits_split(seed=seed, dtype=torch.float32)
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = MDEQDigits(tol=1e-4, max_iter=60, convergence=training_policy()).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = History()
    generator = torch.Generator().manual_seed(seed)
    per_epoch = (len(y_train) + batch - 1) // batch
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=generator)
        losses, skipped, iterations, products = [], 0, [], []
        for step in range(per_epoch if steps is None else steps):
            idx = order[step * batch : (step + 1) * batch]
            logits, info = model.logits_and_info(x_train[idx])
            keep = info.converged_mask.to(logits.device)
            skipped += int((~keep).sum())
            loss = nn.functional.cross_entropy(logits[keep], y_train[idx][keep])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.deq.cell.keep_contractive()
            losses.append(loss.item())
            iterations.append(float(info.sample_iterations.float().mean()))
            products.append(info.linear_solves.products)
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        history.loss.append(sum(losses) / len(losses))
        history.test_accuracy.append(accuracy)
        history.unconverged.append(skipped)
        history.forward_iterations.append(sum(iterations) / len(iterations))
        history.backward_products.append(sum(products) / len(products))
        log(
            f"epoch {epoch + 1}: loss {history.loss[-1]:.3f}, test accuracy "
            f"{100 * accuracy:.1f}%, {skipped} unconverged samples left out, forward "
            f"{history.forward_iterations[-1]:.1f} iterations, backward "
            f"{history.backward_products[-1]:.1f} products per step"
        )
    return model, history, data


# %%
# Exact curvature in float64
# --------------------------
# The trained model, copied to float64, gives the equilibrium's ``f`` and loss; Lanczos
# on :class:`deqhess.Equilibrium`'s HVPs finds the top eigenvalues of the Hessian and of
# its two parts, and two independent paths are compared: the HVP by double backward
# through the layer, and the gradient of a gradient-norm penalty.


@dataclass
class Curvature:
    top: dict[str, Tensor]
    residuals: dict[str, Tensor]
    layer_vs_equilibrium_hvp: float
    penalty_gradient_error: float
    penalised_step: tuple[float, float, float, float]  # loss, penalty before; after
    seconds: float


def analyse(
    model: MDEQDigits, images: Tensor, labels: Tensor, k: int = 5, beta: float = 0.05, log=print
) -> Curvature:
    """Exact curvature of the test loss in the cell's parameters (float64)."""
    start = time.perf_counter()
    model64 = copy.deepcopy(model).double()
    model64.deq.tol, model64.deq.atol = 1e-12, 1e-13
    model64.deq.convergence = Convergence("raise")
    model64.deq.max_iter = 2000
    images, cell = images.double(), model64.deq.cell
    with torch.no_grad():
        injected = model64.injection(images)
    theta = {name: p.detach() for name, p in cell.named_parameters()}

    def f(x: Tensor, h: Tensor, t: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(cell, t, (x, h))

    def loss(h: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model64.readout(h), labels)

    eq = dh.Equilibrium(
        f, theta, injected, torch.zeros_like(injected), batch_dim=0, tol=1e-12, atol=1e-13,
        max_iter=2000, linear_solver="gmres",
    )  # fmt: skip
    top, residuals = {}, {}
    for part in ("total", "loss_curvature", "dynamics_curvature"):
        result = extreme_eigenpairs(eq.hessian_operator(loss, part), k, which="largest")
        top[part], residuals[part] = result.eigenvalues.flip(0), result.residuals.flip(0)
        if part == "total":
            direction = result.eigenvectors[:, -1]
        log(
            f"top {k} eigenvalues, {part}: "
            + ", ".join(f"{v:+.4e}" for v in top[part].tolist())
            + f" (residual ≤ {float(residuals[part].max()):.1e})"
        )
    # the same HVP by double backward through the trained model's own layer
    params = list(cell.parameters())
    layer_loss = nn.functional.cross_entropy(model64(images), labels)
    grads = torch.autograd.grad(layer_loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    layer_hv = torch.cat(
        [
            g.reshape(-1)
            for g in torch.autograd.grad(flat_grad @ direction, params, retain_graph=True)
        ]
    )
    exact_hv = eq.hvp(loss, direction)
    hvp_error = float((layer_hv - exact_hv).norm() / exact_hv.norm())
    log(f"H v by double backward through the layer vs Equilibrium.hvp: {hvp_error:.1e}")
    # a gradient-norm-penalised step: its gradient by double backward, checked against 2βHg
    penalty = flat_grad.pow(2).sum()
    penalised = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(layer_loss + beta * penalty, params)]
    )
    g = torch.cat([t.reshape(-1) for t in eq.grad(loss).values()])
    exact = g + 2 * beta * eq.hvp(loss, g)
    penalty_error = float((penalised - exact).norm() / exact.norm())
    log(f"gradient of L + β‖∇L‖² through the layer vs ∇L + 2βH∇L: {penalty_error:.1e}")
    before = (float(layer_loss.detach()), float(penalty.detach()))
    with torch.no_grad():
        offsets = torch.cumsum(torch.tensor([0] + [p.numel() for p in params]), 0)
        for i, p in enumerate(params):
            p.sub_(0.1 / float(exact.norm()) * exact[offsets[i] : offsets[i + 1]].view_as(p))
    after_loss = nn.functional.cross_entropy(model64(images), labels)
    after_grads = torch.autograd.grad(after_loss, params)
    after = (float(after_loss.detach()), float(sum(t.pow(2).sum() for t in after_grads)))
    log(
        f"penalised step (β = {beta:g}): L {before[0]:.4f} → {after[0]:.4f}, ‖∇L‖² "
        f"{before[1]:.4f} → {after[1]:.4f}"
    )
    return Curvature(
        top, residuals, hvp_error, penalty_error, (*before, *after), time.perf_counter() - start
    )


def plot(history: History, curvature: Curvature):
    """The training curves and the top eigenvalues; returns the (open) figure."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, len(history.loss) + 1)
    left.plot(epochs, history.loss, "o-", color="black", label="training loss")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    twin = left.twinx()
    twin.plot(epochs, [100 * a for a in history.test_accuracy], "s--", color="tab:green",
              label="test accuracy")  # fmt: skip
    twin.set_ylabel("test accuracy (%)")
    left.set_title("MDEQ-style DEQ on digits (float32 training)")
    handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="center right")
    left.set_xticks(list(epochs))
    colors = {"total": "black", "loss_curvature": "tab:blue", "dynamics_curvature": "tab:red"}
    labels = {"total": "Hessian", "loss_curvature": "loss curvature",
              "dynamics_curvature": "dynamics curvature"}  # fmt: skip
    for part, values in curvature.top.items():
        ranks = range(1, len(values) + 1)
        right.plot(ranks, values.tolist(), "o-", color=colors[part], label=labels[part])
    right.set_xlabel("rank")
    right.set_xticks(list(range(1, max(len(v) for v in curvature.top.values()) + 1)))
    right.set_ylabel("eigenvalue")
    right.set_title("Top eigenvalues, cell parameters (exact, Lanczos)")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    return fig


# %%
# Run
# ---
# ``main`` trains, analyses, plots and saves the figure (left open, so that the
# documentation shows it). The full run (8 epochs, top-5 eigenvalues on 64 test samples)
# gives this figure:
#
# .. image:: /mdeq_digits.png
#    :alt: MDEQ on digits: training curves and the exact top eigenvalues
#
# The documentation build runs the ``--quick`` version below (2 short epochs, top 2).


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> Curvature:
    parser = argparse.ArgumentParser(description="An MDEQ-style DEQ on digits, analysed exactly.")
    parser.add_argument("--quick", action="store_true", help="a few steps and samples")
    parser.add_argument("--out", default="mdeq-digits.png", help="the figure's path")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    epochs, steps, samples, k = (2, 3, 16, 2) if args.quick else (8, None, 64, 5)
    model, history, (_, _, x_test, y_test) = train(epochs=epochs, steps=steps, log=log)
    log(f"training: {time.perf_counter() - start:.1f} s")
    curvature = analyse(model, x_test[:samples], y_test[:samples], k=k, log=log)
    log(f"analysis on {samples} test samples: {curvature.seconds:.1f} s")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(history, curvature).savefig(path, dpi=110)
    log(f"figure: {path}")
    return curvature


if __name__ == "__main__":
    main()
