"""Block thick-restart Lanczos: extreme Ritz pairs of a symmetric operator within a budget.

A Krylov basis ``V`` ``[P, j]`` of at most ``m`` orthonormal columns is kept with the
projected matrix ``T = Vᵀ H V`` and the relation ``H V = V T + F Bᵀ`` (``F`` ``[P, b]``
orthogonal to ``V``). Each step is one block product ``H Q`` ``[P, b]``: ``Q`` an
orthonormal basis of ``F``'s numerical range (from its SVD, orthogonalised against ``V``
once more, completed by random directions where ``F`` has no rank), ``T`` extended by
``B Rᵀ`` (``F ≈ Q R``) and ``Qᵀ H Q``, and ``H Q`` orthogonalised against the whole basis
twice (full reorthogonalisation, CGS2).
After each step the Ritz pairs ``(θᵢ, V yᵢ)`` of ``T = Y Θ Yᵀ`` have residuals
``‖H V y − θ V y‖ = ‖F Bᵀ y‖``, known without a product — as long as ``V`` stays
orthonormal. ``F`` loses rank where the Krylov space of a rank-``r`` operator is full
(after about ``(r + b) / b`` steps): an unpivoted QR of ``F`` then normalised rounding
noise into columns of ``Q`` far from orthogonal to ``V``, and the random directions
that replaced them were orthogonalised against those columns; ``V`` lost orthogonality
(1e-5), and the estimates passed pairs whose true residuals were 5e4·tol, negative
eigenvalues of a PSD operator among them. When the basis is full, the ``keep`` Ritz
vectors nearest the wanted end replace it (``V ← V Y_keep``, ``T ← Θ_keep``,
``B ← Y_keepᵀ B``): the relation still holds, so Lanczos continues from ``F`` (Wu &
Simon's thick restart; ARPACK's implicit restart keeps the same space).

Why a block: a Krylov space grown from ``b`` vectors holds at most ``b`` independent
eigenvectors of one eigenvalue. One vector finds one copy of a repeated eigenvalue —
and the loss curvature or a GGN of a model with fewer outputs than parameters has 0 as
an eigenvalue of multiplicity ``P − rank``: single-vector Lanczos then returned genuine
eigenpairs with tiny residuals that were not the smallest. deqhess's operators apply a
``[P, b]`` block for much less than ``b`` single products (the solves are shared).

The stopping test is ``‖H v − θ v‖ ≤ tol · ‖H‖``, ``‖H‖`` estimated by the largest
``|θ|`` met (a lower bound of ``‖H‖₂`` that the extreme Ritz values reach first). A
test relative to each eigenvalue, as ARPACK's, cannot be met by eigenvalues near zero
of an operator whose spectrum spans many orders of magnitude (rounding alone leaves a
residual of about ``ε‖H‖``); that is what ran ARPACK to its ``10·P`` restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from .base import Counted

__all__ = ["RitzPairs", "lanczos_extreme"]


@dataclass(frozen=True)
class RitzPairs:
    """The wanted Ritz pairs where a run stopped.

    Attributes:
        values: ``[k]`` Ritz values, ascending.
        vectors: ``[P, k]`` orthonormal Ritz vectors.
        residuals: ``[k]`` ``‖F Bᵀ y‖``, each pair's residual as the recurrence gives it.
        scale: the estimate of ``‖H‖`` (largest ``|θ|`` met).
        converged: whether every residual is within ``tol · scale``.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    scale: float
    converged: bool


def _wanted(values: Tensor, count: int, which: str) -> Tensor:
    """The ``count`` Ritz values at the wanted end of ``values`` (ascending).

    Returns:
        Their indices, in ascending order of value.
    """
    if which == "largest":
        return torch.arange(len(values) - count, len(values))
    if which == "smallest":
        return torch.arange(count)
    index = torch.argsort(values.abs(), stable=True)[len(values) - count :]
    return index.sort().values


class _Krylov:
    """The basis ``V``, ``T = VᵀHV`` and the residual block ``F`` with its coupling ``B``."""

    def __init__(self, start: Tensor, basis_size: int, seed: int) -> None:
        size, self.block = start.shape
        self.basis = start.new_empty(size, basis_size)
        self.projected = torch.zeros(basis_size, basis_size, dtype=torch.float64)  # CPU
        self.residual = start  # F
        self.coupling = torch.zeros(0, self.block, dtype=torch.float64)  # B
        self.j = 0
        self.scale = 0.0
        self.generator = torch.Generator().manual_seed(seed)

    def expand(self, op: Counted) -> None:
        """One block step: ``b`` products."""
        j, b = self.j, self.block
        q, r = self._orthonormal_residual()
        self.basis[:, j : j + b] = q
        self.projected[:j, j : j + b] = self.coupling @ r.T
        self.projected[j : j + b, :j] = self.projected[:j, j : j + b].T
        w = op.matmat(q)
        middle = (q.T @ w).double().cpu()
        self.projected[j : j + b, j : j + b] = 0.5 * (middle + middle.T)
        self.j = j + b
        self.residual = _orthogonalised(w, self.basis[:, : self.j])
        self.coupling = torch.zeros(self.j, b, dtype=torch.float64)
        self.coupling[j:] = torch.eye(b, dtype=torch.float64)

    def _orthonormal_residual(self) -> tuple[Tensor, Tensor]:
        """The next block of the basis, from the residual block ``F``.

        ``Q`` spans ``F``'s directions of singular value above a floor of
        ``1e3·ε·‖H‖`` (an SVD, which reveals rank where an unpivoted QR does not),
        orthogonalised against ``V`` once more: ``F`` is orthogonal to ``V`` only to
        about ``ε‖H Q‖``, and normalising a weak direction of ``F`` magnifies that by
        ``‖H‖ / σ`` (1e-5 of orthogonality lost at rank deficiency, before this pass).
        Directions where ``F`` has (numerically) no rank — the basis spans an invariant
        subspace there — are fresh random ones, uncoupled (``R``'s rows for them are
        ``Qᵀ F ≈ 0``). What ``Q`` leaves out of ``F`` is below the floor.

        Returns:
            ``(Q, R)``: ``Q`` ``[P, b]`` orthonormal and orthogonal to ``V``, with
            ``F ≈ Q R``; ``R`` ``[b, b]`` in float64 on the CPU.
        """
        f, basis = self.residual, self.basis[:, : self.j]
        directions, strengths, _ = torch.linalg.svd(f, full_matrices=False)
        floor = 1e3 * torch.finfo(f.dtype).eps * max(self.scale, 1e-300)
        q = torch.linalg.qr(_orthogonalised(directions[:, strengths > floor], basis)).Q
        while q.shape[1] < self.block:
            fresh = torch.randn(f.shape[0], 1, generator=self.generator, dtype=torch.float64)
            fresh = _orthogonalised(fresh.to(f), torch.cat([basis, q], dim=1))
            q = torch.cat([q, fresh / torch.linalg.vector_norm(fresh)], dim=1)
        return q, (q.T @ f).double().cpu()

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(θ, Y, residuals)`` of the Rayleigh–Ritz pairs of the current basis."""
        values, rotations = torch.linalg.eigh(self.projected[: self.j, : self.j])
        self.scale = max(self.scale, float(values.abs().max()))
        gram = (self.residual.T @ self.residual).double().cpu()  # FᵀF
        c = self.coupling.T @ rotations  # Bᵀ y for every y
        residuals = ((c * (gram @ c)).sum(0).clamp_min(0.0)).sqrt()
        return values, rotations, residuals

    def restart(self, keep: int, which: str) -> None:
        """Keep the ``keep`` Ritz vectors nearest the wanted end (no products)."""
        values, rotations, _ = self.ritz()
        index = _wanted(values, keep, which)
        kept = rotations[:, index]
        self.basis[:, :keep] = self.basis[:, : self.j] @ kept.to(self.basis)
        self.projected.zero_()
        self.projected[:keep, :keep] = torch.diag(values[index])
        self.coupling = kept.T @ self.coupling
        self.j = keep


def lanczos_extreme(
    op: Counted,
    k: int,
    which: str,
    tol: float,
    max_hvps: int,
    basis_size: int,
    start: Tensor,
) -> RitzPairs:
    """The ``k`` wanted Ritz pairs of the symmetric ``op`` within ``max_hvps`` products.

    Args:
        op: the operator, counting its products.
        k: pairs wanted.
        which: ``"largest"``, ``"smallest"`` or ``"magnitude"``.
        tol: stop once every wanted pair has ``‖H v − θ v‖ ≤ tol · ‖H‖``.
        max_hvps: products allowed (a block of ``b`` counts ``b``); the run stops before
            a block would pass it, converged or not.
        basis_size: ``m``, the most basis vectors kept (``k + b ≤ m ≤ P``).
        start: ``[P, b]`` starting block (``b`` its block size).

    Returns:
        The wanted pairs where the run stopped; ``converged`` says whether they met
        ``tol`` (the caller decides what an unconverged run means).

    Raises:
        InputError: ``max_hvps`` is too few for ``k`` pairs (no Ritz pair formed).
    """
    krylov = _Krylov(start, basis_size, seed=start.shape[0])
    block = krylov.block
    keep = k + (basis_size - block - k) // 2  # the wanted pairs and some neighbours
    ritz: tuple[Tensor, Tensor, Tensor] | None = None  # (θ, Y, residuals) of the last step
    while op.products + block <= max_hvps:
        if krylov.j + block > basis_size:
            krylov.restart(keep, which)
        krylov.expand(op)
        if krylov.j < k:
            continue
        ritz = krylov.ritz()
        index = _wanted(ritz[0], k, which)
        if bool((ritz[2][index] <= tol * krylov.scale).all()):
            break
    if ritz is None or krylov.j < k:
        raise InputError(f"max_hvps={max_hvps} is too few for {k} Ritz pairs in blocks of {block}.")
    values, rotations, residuals = ritz
    index = _wanted(values, k, which)
    converged = bool((residuals[index] <= tol * krylov.scale).all())
    return RitzPairs(
        values=values[index].to(dtype=op.dtype, device=op.device),
        vectors=krylov.basis[:, : krylov.j] @ rotations[:, index].to(krylov.basis),
        residuals=residuals[index].to(dtype=op.dtype, device=op.device),
        scale=krylov.scale,
        converged=converged,
    )


def _orthogonalised(w: Tensor, basis: Tensor) -> Tensor:
    """``w`` minus its components in the span of ``basis``' orthonormal columns, twice."""
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w
