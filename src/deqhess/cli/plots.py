"""The plots of ``deqhess analyze`` (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["diagonal_figure", "plot_densities", "plot_diagonal", "plot_top_eigenvalues"]

COLORS = {"total": "black", "loss_curvature": "tab:blue", "dynamics_curvature": "tab:red",
          "ggn": "tab:green"}  # fmt: skip
LABELS = {
    "total": "total Hessian",
    "loss_curvature": "loss curvature",
    "dynamics_curvature": "dynamics curvature",
    "ggn": "GGN at the output",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, title: str, path: Path, legend: bool = True) -> Path:
    ax.set_title(title)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_densities(densities: dict, path: Path) -> Path:
    """SLQ spectral densities of the parts, log-density against eigenvalue."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for part, result in densities.items():
        grid, density = result.grid.cpu().numpy(), result.density.cpu().numpy()
        ax.semilogy(
            grid, np.maximum(density, 1e-12), color=COLORS[part], label=LABELS[part], lw=1.5
        )
    ax.set_ylim(bottom=max(1e-8, ax.get_ylim()[0]))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density (log)")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, "Spectral density by stochastic Lanczos quadrature", path)


def plot_top_eigenvalues(eigenvalues: dict[str, list[float]], path: Path) -> Path:
    """The top eigenvalues of each part, by rank."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for part, values in eigenvalues.items():
        ranks = np.arange(1, len(values) + 1)
        ax.plot(ranks, sorted(values, reverse=True), "o-", color=COLORS[part], label=LABELS[part])
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_xticks(np.arange(1, max(len(v) for v in eigenvalues.values()) + 1))
    ax.grid(alpha=0.3)
    return _finish(fig, ax, "Top eigenvalues (Lanczos)", path)


def plot_diagonal(groups: dict[str, dict[str, float]], path: Path) -> Path:
    """Mean |diag(H)| per parameter group, with the estimator's standard error."""
    fig, ax = diagonal_figure(groups)
    return _finish(fig, ax, "Hessian diagonal by parameter group", path, legend=False)


def diagonal_figure(groups: dict[str, dict[str, float]]):
    """The figure of :func:`plot_diagonal`, for a report or a notebook.

    Horizontal bars with the names on the vertical axis, so that long dotted names
    (``cell.block.conv1.weight``) never overlap.

    Args:
        groups: per parameter group, ``abs_mean`` (mean ``|diag(H)|``) and ``std_error``.

    Returns:
        ``(fig, ax)`` of matplotlib.
    """
    plt = _pyplot()
    names = list(groups)
    means = [groups[n]["abs_mean"] for n in names]
    errors = [groups[n]["std_error"] for n in names]
    longest = max(len(n) for n in names)
    fig, ax = plt.subplots(figsize=(6 + 0.07 * longest, 1.5 + 0.35 * len(names)))
    rows = np.arange(len(names))
    ax.barh(rows, means, xerr=errors, color="tab:gray", capsize=3)
    ax.set_yticks(rows, names)
    ax.invert_yaxis()  # θ's order, top to bottom
    ax.set_xscale("log")
    ax.set_xlabel("mean |diag(H)| (Hutchinson)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig, ax
