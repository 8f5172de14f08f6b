"""The demo's report: train, then the exact Hessian at the trained parameters."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from ..parameters import ParameterLayout
from .digits import DigitsDEQ, load_digits_split, train

__all__ = ["run_demo"]


class _Clock:
    """Named wall-clock timings, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        return result


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def run_demo(
    out: str | Path = "deqhess-demo",
    steps: int = 150,
    hessian_batch: int = 128,
    state: int = 32,
    fd_directions: int = 3,
    large_state: int = 192,
    large_steps: int = 40,
    seed: int = 0,
    progress: bool | None = None,
    print_fn=print,
) -> dict[str, Any]:
    """Train the digits DEQ, compute its exact Hessian, print a report, write a PNG.

    With ``large_state > 0`` a second section trains a wider DEQ whose dense Hessian
    would not fit in memory and analyses it matrix-free (``deqhess analyze``'s engine).

    Args:
        out: the directory for the plot.
        steps: training steps of the small DEQ.
        hessian_batch: test samples whose loss the Hessian is of.
        state: the small DEQ's state width.
        fd_directions: directions of the finite-difference check of the gradient.
        large_state: the wider DEQ's state width (0: no second section).
        large_steps: training steps of the wider DEQ.
        seed: seed of the data split, the training and the probes.
        progress: tqdm bars; None shows them only when stderr is a terminal, and prints
            plain progress lines otherwise.
        print_fn: where the report's lines go.

    Returns:
        The figures of the report (also used by the tests): sizes, accuracy, the checks'
        relative errors, eigenvalue ranges, the dynamics curvature's share, timings and
        the plot's path (and ``"large"``, the second section's report).
    """
    progress = sys.stderr.isatty() if progress is None else progress
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    model = DigitsDEQ(state=state)
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    theta, losses = clock.time(
        "training", train, model, x_train, y_train, steps=steps, seed=seed, progress=progress,
        log=print_fn,
    )  # fmt: skip
    x, y = x_test[:hessian_batch], y_test[:hessian_batch]
    objective = model.loss(y)
    layout = ParameterLayout(theta)
    eq = clock.time("forward solve", model.equilibrium, theta, x, tol=1e-12)
    clock.time("factorise I − J", lambda: eq.linearization)
    grad_adjoint = layout.flatten(clock.time("gradient (adjoint)", eq.grad, objective))
    clock.time("sensitivity Z", eq.sensitivity)
    grad_sensitivity = layout.flatten(eq.grad(objective, method="sensitivity"))
    split = clock.time("dense Hessian (split)", eq.hessian_split, objective)
    total = split.total
    p = total.shape[0]
    probe = torch.randn(p, dtype=total.dtype)
    hvp = clock.time("one HVP (cached)", eq.hvp, objective, probe)

    def exact_gradient(flat: torch.Tensor) -> torch.Tensor:
        shifted = cast(dict[str, torch.Tensor], layout.unflatten(flat))  # θ is a dict
        return layout.flatten(model.equilibrium(shifted, x, tol=1e-13).grad(objective))

    def finite_differences() -> list[float]:
        errors, base, step = [], layout.flatten(theta), 1e-5
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(fd_directions):
            v = torch.randn(p, generator=g, dtype=total.dtype)
            v /= v.norm()
            fd = (exact_gradient(base + step * v) - exact_gradient(base - step * v)) / (2 * step)
            errors.append(_relative(fd, total @ v))
        return errors

    fd_errors = clock.time("finite differences", finite_differences)
    parts = {
        "total": total,
        "loss": split.loss_curvature,
        "dynamics": split.dynamics_curvature,
    }
    eig = clock.time(
        "eigenvalues (3 × eigh)",
        lambda: {k: torch.linalg.eigvalsh(0.5 * (m + m.T)) for k, m in parts.items()},
    )
    figures = {
        "parameters": p,
        "state": tuple(eq.h.shape),
        "test_accuracy": model.accuracy(theta, x_test, y_test),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "iterations": eq.info.iterations,
        "residual": eq.info.residual_norm,
        "condition_number": eq.info.condition_number,
        "gradient_forms_relative_difference": _relative(grad_sensitivity, grad_adjoint),
        "symmetry": _relative(total.T, total),
        "hvp_vs_dense": _relative(hvp, total @ probe),
        "fd_errors": fd_errors,
        "eigenvalues": {k: (float(v[0]), float(v[-1])) for k, v in eig.items()},
        "dynamics_share": float(split.dynamics_curvature.norm() / total.norm()),
        "timings": clock.seconds,
    }
    figures["plot"] = str(_plot(out, eig, total, theta))
    for line in _report_lines(figures):
        print_fn(line)
    if large_state:
        figures["large"] = _large_section(
            out, large_state, large_steps, hessian_batch, seed, progress, print_fn
        )
    return figures


def _large_section(out, state, steps, batch, seed, progress, print_fn) -> dict[str, Any]:
    """A wider digits DEQ, analysed only through exact HVPs."""
    from ..cli.analyze import run_analysis
    from ..cli.problem import AnalysisProblem

    model = DigitsDEQ(state=state)
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    n, m, k = state, model.features, model.classes
    p = n * n + n * m + n + k * n + k
    print_fn("")
    print_fn(
        f"matrix-free section: n = {state}, P = {p:,} parameters (a dense Hessian would need "
        f"{p * p * 8 / 1e9:.0f} GB)"
    )
    start = time.perf_counter()
    # one adjoint solve per step: GMRES (to 1e-12) beats forming and factorising J's
    # 128 blocks of 192 × 192 (2× per step, measured)
    theta, _ = train(model, x_train, y_train, steps=steps, seed=seed, progress=progress,
                     log=print_fn, linear_solver="gmres")  # fmt: skip
    seconds = time.perf_counter() - start
    print_fn(
        f"  trained {steps} steps in {seconds:.1f} s, test accuracy "
        f"{100 * model.accuracy(theta, x_test, y_test):.1f}%"
    )
    data = [(x_test[:batch], y_test[:batch])]
    problem = AnalysisProblem(
        f=model.f,
        data=data,
        loss=lambda h, t, y: model.loss(y)(h, t),
        theta=theta,
        init_state=lambda x: x.new_zeros(x.shape[0], state),
        options={"tol": 1e-12},
    )
    return run_analysis(
        problem, out=out / "matrix_free", top_k=5, trace="hutch++", trace_hvps=30,
        density=True, density_probes=4, density_steps=30, progress=progress, print_fn=print_fn,
    )  # fmt: skip


def _report_lines(r: dict[str, Any]) -> list[str]:
    (t_min, t_max), (l_min, l_max) = r["eigenvalues"]["total"], r["eigenvalues"]["loss"]
    d_min, d_max = r["eigenvalues"]["dynamics"]
    lines = [
        "deqhess demo — exact Hessian of a DEQ digits classifier",
        f"  model: f = tanh(h Wᵀ + x Uᵀ + b), readout in the loss; P = {r['parameters']} "
        f"parameters, state {r['state']}",
        f"  training: loss {r['first_loss']:.3f} → {r['final_loss']:.3f}; "
        f"test accuracy {100 * r['test_accuracy']:.1f}%",
        "solve",
        f"  Anderson: {r['iterations']} iterations, residual {r['residual']:.2e}; "
        f"cond(I − J) ≈ {r['condition_number']:.2f}",
        "checks",
        "  gradient, λᵀ∂f/∂θ vs Zᵀ∇L:     relative difference "
        f"{r['gradient_forms_relative_difference']:.1e}",
        f"  Hessian symmetry ‖H − Hᵀ‖/‖H‖:  {r['symmetry']:.1e}",
        f"  matrix-free HVP vs dense H v:    {r['hvp_vs_dense']:.1e}",
        "  central finite differences of the exact gradient (ε = 1e-5), per direction: "
        + ", ".join(f"{e:.1e}" for e in r["fd_errors"]),
        "curvature",
        f"  eigenvalues of H (total):            [{t_min:+.4e}, {t_max:+.4e}]",
        f"  eigenvalues of loss curvature:       [{l_min:+.4e}, {l_max:+.4e}]",
        f"  eigenvalues of dynamics curvature:   [{d_min:+.4e}, {d_max:+.4e}]",
        f"  ‖dynamics‖/‖total‖ = {r['dynamics_share']:.3f}: the share of the curvature from "
        "f's second derivatives, which every Gauss–Newton approximation drops",
        f"  eigenvalue shift from dropping it: λmax {l_max:+.4e} → {t_max:+.4e} "
        f"({100 * (t_max - l_max) / abs(t_max):+.1f}%), λmin {l_min:+.4e} → {t_min:+.4e}",
        "timings (s)",
    ]
    lines += [f"  {name:<24}{seconds:8.3f}" for name, seconds in r["timings"].items()]
    lines.append(f"plot: {r['plot']}")
    return lines


def _plot(out: Path, eig: dict[str, torch.Tensor], total: torch.Tensor, theta) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import SymLogNorm

    fig, (ax_spec, ax_heat) = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = {"total": "black", "loss": "tab:blue", "dynamics": "tab:red"}
    labels = {
        "total": "total H",
        "loss": "loss curvature",
        "dynamics": "dynamics curvature",
    }
    for name, values in eig.items():
        ranks = torch.arange(1, len(values) + 1)
        ax_spec.plot(ranks, values.flip(0).numpy(), color=colors[name], label=labels[name], lw=1.4)
    ax_spec.set_yscale("symlog", linthresh=1e-6)
    ax_spec.set_xscale("log")
    ax_spec.axhline(0, color="grey", lw=0.6)
    ax_spec.set_xlabel("eigenvalue rank (descending)")
    ax_spec.set_ylabel("eigenvalue (symlog)")
    ax_spec.set_title("Eigenvalue spectra of the exact Hessian and its two parts")
    ax_spec.legend()
    scale = float(total.abs().max())
    image = ax_heat.imshow(
        total.numpy(),
        cmap="RdBu_r",
        norm=SymLogNorm(linthresh=scale * 1e-4, vmin=-scale, vmax=scale),
        interpolation="nearest",
    )
    edges, ticks, offset = [], [], 0
    for t in theta.values():
        ticks.append(offset + t.numel() / 2)
        offset += t.numel()
        edges.append(offset)
    for e in edges[:-1]:
        ax_heat.axhline(e - 0.5, color="k", lw=0.4)
        ax_heat.axvline(e - 0.5, color="k", lw=0.4)
    ax_heat.set_xticks(ticks, list(theta))
    ax_heat.set_yticks(ticks, list(theta))
    ax_heat.set_title("Exact Hessian H (symlog colour), blocks by parameter")
    ticks = [-scale, -scale * 1e-2, 0.0, scale * 1e-2, scale]
    bar = fig.colorbar(image, ax=ax_heat, shrink=0.85, ticks=ticks)
    bar.ax.set_yticklabels([f"{t:.1e}" for t in ticks])
    fig.tight_layout()
    path = out / "hessian_spectrum.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
