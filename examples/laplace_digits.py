"""
Laplace-approximated DEQ classifier on the digits
=================================================

A deep equilibrium classifier ``encoder → deqhess.nn.DEQ(cell) → head`` is trained on the
8 × 8 digits (MAP), then turned into a Bayesian one by a Laplace approximation with
laplace-torch: the posterior ``N(θ_MAP, (G + δI)⁻¹)`` with ``G`` the *exact* generalised
Gauss–Newton matrix of the whole model — every parameter, the DEQ's included — and the
prior precision ``δ`` chosen by the marginal likelihood. Predictions use the linearised
(GLM) predictive with the probit approximation.

laplace-torch needs nothing special: its Curvlinops backend differentiates the model by
autograd, and deqhess's layer gives exact derivatives of every order. The same pipeline
on torchdeq's layer (if installed) runs too, but its curvature is not the model's: its
implicit backward is exact only to first order, so ``G`` — a product of first derivatives
formed by double backward — comes out wrong, and the posterior with it.

Run: ``python examples/laplace_digits.py --out docs/guide/laplace_digits.png`` (about a
minute on one CPU thread; needs scikit-learn, matplotlib and laplace-torch).
"""

# %%
# Data, model and MAP training
# ----------------------------
# The cell is ``tanh(W h + x)`` on a 16-wide state; ``‖W‖₂ ≤ 0.7`` is kept after each
# step, so the cell stays a contraction and every fixed point exists.

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from deqhess.demo import load_digits_split
from deqhess.nn import DEQ

STATE = 16
CONTRACTION = 0.7


class Cell(nn.Module):
    def __init__(self, n: int = STATE) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h) + x)


def build(seed: int = 0, state: int = STATE) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, state), DEQ(Cell(state), tol=1e-10), nn.Linear(state, 10))


def train(model: nn.Sequential, loader, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            with torch.no_grad():  # keep the cell a contraction
                weight = model[1].cell.lin.weight
                norm = torch.linalg.matrix_norm(weight, ord=2)
                weight.mul_(min(1.0, CONTRACTION / float(norm)))


# %%
# The Laplace approximation and the metrics
# -----------------------------------------
# ``hessian_structure="full"`` with the Curvlinops GGN backend: ``G`` is formed exactly
# (checked against deqhess's own ``ModelCurvature`` in the tests). NLL and the expected
# calibration error (15 equal-width confidence bins) on the held-out digits.


def laplace_fit(model: nn.Module, loader, prior_steps: int, structure: str = "full"):
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure=structure, backend=CurvlinopsGGN)  # fmt: skip
    la.fit(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # laplace-torch's own deprecation notes
        la.optimize_prior_precision(method="marglik", n_steps=prior_steps)
    return la


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15):
    """``(confidence, accuracy, count)`` per equal-width bin of the top probability."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    index = torch.bucketize(confidence, edges[1:-1])
    count = torch.bincount(index, minlength=bins).to(probs.dtype)
    mean_conf = torch.bincount(index, confidence, minlength=bins) / count.clamp_min(1)
    accuracy = torch.bincount(index, correct, minlength=bins) / count.clamp_min(1)
    return mean_conf, accuracy, count


def metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    confidence, accuracy, count = calibration(probs, labels)
    ece = float((count * (confidence - accuracy).abs()).sum() / count.sum())
    nll = float(nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels))
    return {"accuracy": float((probs.argmax(1) == labels).double().mean()), "nll": nll,
            "ece": ece}  # fmt: skip


# %%
# torchdeq's layer on the same weights
# ------------------------------------
# The same trained parameters in a model whose DEQ is torchdeq's (implicit backward,
# ``ift=True``, solved to the same tolerance): the same fixed point, the same MAP
# predictions. laplace-torch's full GGN does not run through it (its ``vmap`` over the
# backward fails inside torchdeq's layer), so both layers are compared on the diagonal
# GGN, which does run — and comes out wrong through torchdeq's layer.


class TorchdeqLayer(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.cell = cell
        self.deq = get_deq(f_solver="anderson", f_max_iter=200, f_tol=1e-10,
                           f_stop_mode="rel", b_max_iter=200, b_tol=1e-10, ift=True)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_out, _ = self.deq(lambda z: self.cell(x, z), torch.zeros_like(x))
        return z_out[-1]


def torchdeq_twin(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(model[0], TorchdeqLayer(model[1].cell), model[2])


# %%
# Everything together
# -------------------


@dataclass
class Result:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    prior_precision: dict[str, float] = field(default_factory=dict)
    torchdeq_ggn_error: float | None = None
    seconds: float = 0.0
    laplace: object = None  # the full-GGN Laplace approximation
    batches: list = field(default_factory=list)  # the training data it was fitted on


def main(argv: list[str] | None = None, log=print) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="laplace_digits.png", help="the reliability plot")
    parser.add_argument("--quick", action="store_true", help="a few seconds (tests)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_default_dtype(torch.float64)
    x_train, y_train, x_test, y_test = load_digits_split(0.3)
    # inputs from no class: the digits flipped upside down, and uniform noise
    noise = torch.rand(200, 64, generator=torch.Generator().manual_seed(0))
    x_ood = torch.cat([x_test.reshape(-1, 8, 8).flip(1).reshape(-1, 64), noise])
    state, epochs, prior_steps = (STATE, 40, 50) if not args.quick else (4, 2, 3)
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:120], y_train[:120], x_test[:60], y_test[:60]
    data = torch.utils.data.TensorDataset(x_train, y_train)
    loader = torch.utils.data.DataLoader(data, batch_size=128)
    model = build(state=state)
    train(model, loader, epochs)
    result = Result()
    with torch.no_grad():
        map_probs = torch.softmax(model(x_test), -1)
    la = laplace_fit(model, loader, prior_steps)
    result.laplace, result.batches = la, list(loader)
    result.prior_precision["full (deqhess)"] = float(la.prior_precision)
    glm = {"pred_type": "glm", "link_approx": "probit"}
    probs = {"MAP": map_probs, "Laplace full (deqhess)": la(x_test, **glm)}
    with torch.no_grad():
        ood = {"MAP": torch.softmax(model(x_ood), -1), "Laplace full (deqhess)": la(x_ood, **glm)}
    diagonal = laplace_fit(model, loader, prior_steps, "diag")
    result.prior_precision["diag (deqhess)"] = float(diagonal.prior_precision)
    probs["Laplace diag (deqhess)"] = diagonal(x_test, **glm)
    ood["Laplace diag (deqhess)"] = diagonal(x_ood, **glm)
    if importlib.util.find_spec("torchdeq") is not None:
        twin = laplace_fit(torchdeq_twin(model), loader, prior_steps, "diag")
        error = torch.linalg.norm(twin.H - diagonal.H) / torch.linalg.norm(diagonal.H)
        result.torchdeq_ggn_error = float(error)
        result.prior_precision["diag (torchdeq)"] = float(twin.prior_precision)
        probs["Laplace diag (torchdeq)"] = twin(x_test, **glm)
        ood["Laplace diag (torchdeq)"] = twin(x_ood, **glm)
    for name, p in probs.items():
        result.metrics[name] = metrics(p, y_test)
        result.metrics[name]["ood_confidence"] = float(ood[name].max(1).values.mean())
    result.seconds = time.perf_counter() - start
    for name, values in result.metrics.items():
        log(f"{name:24s} accuracy {values['accuracy']:.4f}  NLL {values['nll']:.4f}  "
            f"ECE {values['ece']:.4f}  off the data {values['ood_confidence']:.3f}")  # fmt: skip
    for name, value in result.prior_precision.items():
        log(f"prior precision by marginal likelihood ({name}): {value:.4g}")
    if result.torchdeq_ggn_error is not None:
        log(
            f"torchdeq's diagonal GGN against the exact one: "
            f"{100 * result.torchdeq_ggn_error:.1f}% off"
        )
    log(f"{result.seconds:.1f} s")
    plot(probs, ood, y_test, result, args.out)
    return result


def plot(probs: dict, ood: dict, labels: torch.Tensor, result: Result, path: str) -> None:
    """Left: the reliability diagram on the test digits; right: the top probability on
    inputs of no class (flipped digits, noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, right) = plt.subplots(1, 2, figsize=(10, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    edges = torch.linspace(0, 1, 21)
    for (name, p), marker in zip(probs.items(), "osD^", strict=False):
        confidence, accuracy, count = calibration(p, labels)
        used = count > 0
        m = result.metrics[name]
        (line,) = ax.plot(confidence[used], accuracy[used], marker=marker, lw=1.2,
                          label=f"{name}: NLL {m['nll']:.3f}, ECE {m['ece']:.3f}")  # fmt: skip
        top = ood[name].max(1).values
        label = f"{name}: mean {float(top.mean()):.2f}"
        right.hist(top.numpy(), bins=edges.numpy(), histtype="step", lw=1.5,
                   color=line.get_color(), label=label)  # fmt: skip
    ax.set_xlabel("confidence (top probability, 15 bins)")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title("test digits: reliability")
    ax.legend(loc="lower right", fontsize=7)
    right.set_xlabel("top probability")
    right.set_ylabel("inputs")
    right.set_title("no class (flipped digits, noise): confidence")
    right.legend(loc="upper left", fontsize=7)
    fig.suptitle("A DEQ on the digits: MAP vs Laplace with the exact GGN")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
