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
residual of about ``ε‖H‖``); that is what ran ARPACK to its ``10·P`` restarts. The
recurrence's residuals only propose a stop: a Rayleigh–Ritz step on the wanted pairs'
span, with a product, confirms it (:func:`rayleigh_ritz`), so that no loss of accuracy
in the recurrence, rounding in the product or inexact operator passes unseen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from .base import Counted

__all__ = ["RitzPairs", "lanczos_extreme", "rayleigh_ritz"]


@dataclass(frozen=True)
class RitzPairs:
    """The wanted Ritz pairs where a run stopped.

    Attributes:
        values: ``[k]`` Ritz values, ascending.
        vectors: ``[P, k]`` orthonormal Ritz vectors.
        residuals: ``[k]`` each pair's ``‖H v − θ v‖``: from a product if ``measured``,
            else as the recurrence gives it (``‖F Bᵀ y‖``).
        scale: the estimate of ``‖H‖`` (largest ``|θ|`` met).
        converged: whether every residual is within ``tol · scale``, from a product.
        measured: whether the residuals come from a product.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    scale: float
    converged: bool
    measured: bool


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

    When the recurrence's residuals of the wanted pairs reach ``tol · ‖H‖``, one
    Rayleigh–Ritz step on their span (``k`` products, :func:`rayleigh_ritz`) confirms them
    or not: confirmed, the refined pairs are returned; not (the product's rounding, an
    inexact operator, or a recurrence that lost accuracy), the run goes on and confirms
    again once the recurrence's residuals are below ``tol · ‖H‖`` by the factor the
    product exceeded them by (and a tenth).

    Args:
        op: the operator, counting its products.
        k: pairs wanted.
        which: ``"largest"``, ``"smallest"`` or ``"magnitude"``.
        tol: stop once every wanted pair has ``‖H v − θ v‖ ≤ tol · ‖H‖``, recomputed
            from a product.
        max_hvps: Lanczos products allowed (a block of ``b`` counts ``b``); the run
            stops before a block would pass it, converged or not. Each confirmation's
            ``k`` products come on top.
        basis_size: ``m``, the most basis vectors kept (``k + b ≤ m ≤ P``).
        start: ``[P, b]`` starting block (``b`` its block size).

    Returns:
        The confirmed pairs; or, where the run stopped short of that, those of its last
        confirmation if one failed (``measured``), else the recurrence's last pairs.
        ``converged`` says which (the caller decides what an unconverged run means).

    Raises:
        InputError: ``max_hvps`` is too few for ``k`` pairs (no Ritz pair formed).
    """
    krylov = _Krylov(start, basis_size, seed=start.shape[0])
    block = krylov.block
    keep = k + (basis_size - block - k) // 2  # the wanted pairs and some neighbours
    ritz: tuple[Tensor, Tensor, Tensor] | None = None  # (θ, Y, residuals) of the last step
    refuted: RitzPairs | None = None  # the last pairs the product did not confirm
    strictness, confirming = 1.0, 0  # products spent confirming come on top of max_hvps
    while op.products - confirming + block <= max_hvps:
        if krylov.j + block > basis_size:
            krylov.restart(keep, which)
        krylov.expand(op)
        if krylov.j < k:
            continue
        ritz = krylov.ritz()
        index = _wanted(ritz[0], k, which)
        estimated = ritz[2][index]
        if not bool((estimated <= strictness * tol * krylov.scale).all()):
            continue
        vectors = krylov.basis[:, : krylov.j] @ ritz[1][:, index].to(krylov.basis)
        refined = rayleigh_ritz(op, vectors, tol * krylov.scale, krylov.scale)
        confirming += k
        if refined.converged:
            return refined
        refuted = refined
        # the product found residuals some factor above the recurrence's: confirm again
        # once the recurrence's are that factor (and a tenth) below tol
        strictness = 0.9 * float(estimated.max()) / float(refined.residuals.max())
    if ritz is None or krylov.j < k:
        raise InputError(f"max_hvps={max_hvps} is too few for {k} Ritz pairs in blocks of {block}.")
    if refuted is not None:
        return refuted
    values, rotations, residuals = ritz
    index = _wanted(values, k, which)
    return RitzPairs(
        values=values[index].to(dtype=op.dtype, device=op.device),
        vectors=krylov.basis[:, : krylov.j] @ rotations[:, index].to(krylov.basis),
        residuals=residuals[index].to(dtype=op.dtype, device=op.device),
        scale=krylov.scale,
        converged=False,
        measured=False,
    )


def rayleigh_ritz(op: Counted, vectors: Tensor, target: float, scale: float) -> RitzPairs:
    """The Rayleigh–Ritz pairs of the span of ``vectors``, with their residuals from a product.

    ``Q`` an orthonormal basis of the span (``[P, k]``), one block product ``H Q``, the
    ``k × k`` eigenproblem ``Qᵀ H Q = Y Θ Yᵀ``: the pairs ``(θᵢ, Q yᵢ)`` are orthonormal
    to rounding whatever the recurrence left, and ``‖H Q yᵢ − θᵢ Q yᵢ‖`` is each one's
    residual from the product, not from the recurrence.

    Args:
        op: the operator (``k`` products).
        vectors: ``[P, k]``, spanning the pairs' space.
        target: the residual each pair must reach to count as converged.
        scale: the estimate of ``‖H‖`` to report.

    Returns:
        The ``k`` pairs, ascending, ``measured``; ``converged`` if every residual is
        within ``target``.
    """
    basis = torch.linalg.qr(vectors).Q
    product = op.matmat(basis)
    projected = (basis.T @ product).double().cpu()
    values, rotations = torch.linalg.eigh(0.5 * (projected + projected.T))
    values = values.to(dtype=op.dtype, device=op.device)
    rotations = rotations.to(dtype=op.dtype, device=op.device)
    refined = basis @ rotations
    residuals = torch.linalg.vector_norm(product @ rotations - refined * values, dim=0)
    converged = bool((residuals <= target).all())
    return RitzPairs(values, refined, residuals, scale, converged, measured=True)


def _orthogonalised(w: Tensor, basis: Tensor) -> Tensor:
    """``w`` minus its components in the span of ``basis``' orthonormal columns, twice."""
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w
