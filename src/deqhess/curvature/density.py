"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017).

For probes ``qᵢ = zᵢ/√P`` (Rademacher ``zᵢ``), ``m`` Lanczos steps give a tridiagonal
``Tᵢ = Yᵢ diag(θᵢ) Yᵢᵀ``; the Gauss quadrature ``Σⱼ τᵢⱼ g(θᵢⱼ)`` with
``τᵢⱼ = (Yᵢ)₁ⱼ²`` is exact for polynomials ``g`` of degree ``< 2m`` and
``E[qᵢᵀ g(H) qᵢ] = tr g(H)/P``. Smoothing with a Gaussian gives the density
``φ(t) ≈ (1/n) Σᵢⱼ τᵢⱼ N(t; θᵢⱼ, σ²)`` of ``(1/P) Σₖ δ(t − λₖ)``. All probes run as one
block (each Lanczos step is one ``[P, n]`` product), with full reorthogonalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..options import integer
from .accuracy import check_symmetric
from .base import Counted, SymmetricOperator, checked_operator, generator, rademacher

__all__ = ["DensityResult", "check_density", "spectral_density"]


@dataclass(frozen=True)
class DensityResult:
    """A smoothed spectral density and the quadrature it came from.

    It is the density of the operator as computed; see
    :func:`deqhess.curvature.operator_accuracy` for the operator's own error.

    Attributes:
        grid: ``[G]`` eigenvalue axis.
        density: ``[G]`` ``φ(grid)``; integrates to about 1.
        nodes: list over probes of Ritz values ``θᵢ`` (``[mᵢ]`` each).
        weights: list over probes of quadrature weights ``τᵢ`` (sum to 1 each).
        sigma: the Gaussian width.
        num_hvps: Hessian-vector products used.
    """

    grid: Tensor
    density: Tensor
    nodes: list[Tensor]
    weights: list[Tensor]
    sigma: float
    num_hvps: int

    def smoothed(self, grid: Tensor, sigma: float) -> Tensor:
        """The density on another grid or with another width, from the same quadrature."""
        return _smooth(self.nodes, self.weights, grid, sigma)


def _smooth(nodes: list[Tensor], weights: list[Tensor], grid: Tensor, sigma: float) -> Tensor:
    total = torch.zeros_like(grid)
    for theta, tau in zip(nodes, weights, strict=True):
        gauss = torch.exp(-0.5 * ((grid[:, None] - theta[None]) / sigma) ** 2)
        total += (gauss * tau[None]).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return total / len(nodes)


def check_density(
    num_probes: object, steps: object, names: tuple[str, str] = ("num_probes", "steps")
) -> tuple[int, int]:
    """:func:`spectral_density`'s counts, checked before any product.

    Args:
        num_probes: what the caller passed as ``num_probes``.
        steps: what the caller passed as ``steps``.
        names: their names, for the message (a caller's own, e.g. ``"density_probes"``).

    Returns:
        ``(num_probes, steps)`` as ints.

    Raises:
        InputError: either is not an int, or is below 1.
    """
    probes, steps = integer(num_probes, names[0]), integer(steps, names[1])
    if probes < 1 or steps < 1:
        raise InputError(
            f"spectral density: need {names[0]} >= 1 and {names[1]} >= 1; got {probes}, {steps}."
        )
    return probes, steps


def spectral_density(
    op: SymmetricOperator,
    num_probes: int = 10,
    steps: int = 80,
    num_points: int = 400,
    sigma: float | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
) -> DensityResult:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``φ(λ) ≈ (1/n) Σᵢ Σₖ τᵢₖ 𝒩(λ; θᵢₖ, σ²)`` from the Ritz values ``θᵢₖ`` and weights
    ``τᵢₖ`` of a Lanczos run from each Rademacher probe ``i``.

    Products: at most ``num_probes · min(steps, P)`` (one ``[P, n]`` block per Lanczos
    step; a probe whose Krylov space closes early stops adding nodes), so ``steps``
    caps the work; the progress bar counts them. No tolerance, so nothing to miss. Two
    more measure the operator's asymmetry first (quadrature on a non-symmetric one
    spread its nodes far outside its eigenvalues, silently): an operator that is not
    symmetric, or says so, is refused with :class:`deqhess.InputError`.

    Args:
        op: the symmetric ``P × P`` operator.
        num_probes: independent probes (the estimator's variance falls as 1/n).
        steps: Lanczos steps per probe (``≤ P``); resolves ``~steps`` spectral features.
        num_points: grid size, spanning the Ritz values ± 3σ; its spacing must not
            exceed σ (else the density would not integrate to 1 and is refused).
        sigma: Gaussian width; default 1% of the Ritz-value range.
        seed: the probes' random seed (an int); None draws fresh, unrepeatable probes.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        The density on its grid, with the quadrature (nodes, weights) to smooth it
        again, the width and the products used.

    Raises:
        InputError: a count below its minimum, a non-positive ``sigma``, or a grid
            coarser than ``sigma``.
    """
    size = checked_operator(op, "spectral_density")
    num_probes, steps = check_density(num_probes, steps)
    steps = min(steps, size)
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive width; got {sigma}.")
    num_points = integer(num_points, "num_points")
    if num_points < 2:
        raise InputError(f"num_points must be at least 2; got {num_points}.")
    g = generator(seed)
    with Counted(op, steps * num_probes + 2, progress, "SLQ") as counted:
        # quadrature on H's Lanczos recurrence assumes H = Hᵀ (2 products)
        check_symmetric(counted, "H", "its Lanczos quadrature is not a spectral density")
        q = rademacher(size, num_probes, g, op) / math.sqrt(size)
        basis = [q]
        alphas: list[Tensor] = []
        betas: list[Tensor] = []
        alive = torch.ones(num_probes, dtype=torch.bool, device=op.device)
        lengths = torch.zeros(num_probes, dtype=torch.long)
        scale = None
        for j in range(steps):
            w = counted.matmat(basis[-1])
            alpha = (basis[-1] * w).sum(0)
            w = w - alpha * basis[-1] - (betas[-1] * basis[-2] if j > 0 else 0.0)
            stacked = torch.stack(basis)  # full reorthogonalisation, twice (CGS2)
            for _ in range(2):
                w = w - (stacked * (stacked * w).sum(1, keepdim=True)).sum(0)
            beta = torch.linalg.vector_norm(w, dim=0)
            scale = alpha.abs() if scale is None else torch.maximum(scale, alpha.abs())
            alphas.append(alpha)
            lengths += alive.cpu().long()
            floor = 1e3 * torch.finfo(op.dtype).eps * torch.clamp(scale, min=1e-300)
            alive = alive & (beta > floor)
            if j == steps - 1 or not bool(alive.any()):
                break
            betas.append(beta)
            basis.append(w / torch.where(beta > 0, beta, torch.ones_like(beta)))
    nodes, weights = [], []
    for i in range(num_probes):
        m = int(lengths[i])
        a = torch.stack([al[i] for al in alphas[:m]])
        b = torch.stack([be[i] for be in betas[: m - 1]]) if m > 1 else a.new_zeros(0)
        tri = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, vectors = torch.linalg.eigh(tri)
        nodes.append(theta)
        weights.append(vectors[0] ** 2)
    low = min(float(t.min()) for t in nodes)
    high = max(float(t.max()) for t in nodes)
    width = sigma if sigma is not None else max(0.01 * (high - low), 1e-12 * max(abs(high), 1.0))
    spacing = (high - low + 6 * width) / (num_points - 1)
    if spacing > width:  # the grid would skip over the Gaussians: ∫density ≠ 1
        raise InputError(
            f"sigma={width:.3g} is narrower than the grid's spacing {spacing:.3g} (the Ritz "
            f"values span [{low:.3g}, {high:.3g}] on {num_points} points), so the density "
            f"would not integrate to 1: raise num_points to at least "
            f"{math.ceil((high - low) / width) + 7} or sigma to at least "
            f"{(high - low) / (num_points - 7):.3g}."
        )
    grid = torch.linspace(low - 3 * width, high + 3 * width, num_points, dtype=op.dtype)
    grid = grid.to(op.device)
    return DensityResult(
        grid=grid,
        density=_smooth(nodes, weights, grid, width),
        nodes=nodes,
        weights=weights,
        sigma=width,
        num_hvps=counted.products,
    )
