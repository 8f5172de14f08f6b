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

An exhausted Krylov space: where the basis spans an invariant subspace (``‖F‖ ≤
tol·‖H‖``; after about as many steps as ``H`` has distinct eigenvalues, a few for a
low-rank operator), every Ritz pair is an eigenpair within ``tol`` and the residuals no
longer single out the wanted ones: Lanczos returned [−244.65, −3.31, 0, 0.33, 55.24] as
the 5 largest of a DEQ Hessian of rank 4 (P = 306) whose 5 largest are [0, 0, 0, 0.33,
55.24]. As ARPACK's ``getv0`` does, the run then goes on from ``b`` random directions
orthogonal to the basis (seeded), uncoupled from it (``F`` dropped, at most
``tol·‖H‖``): a *probe* of the rest of the space, whose Ritz pairs are kept apart from
the invariant part's. A stop then also needs (``_Krylov.explored``) the probe's pair
nearest the wanted end within ``tol`` — its Ritz values tend to the extremes of what
lies outside the invariant part — and, where the probe is itself exhausted, none of its
values beyond the least wanted one: what it leaves outside are, with probability 1 over
its random start, further copies of its own values. Only a basis of ``P`` vectors
spans everything. What remains is any Krylov method's: a space that never becomes
invariant still holds at most ``b`` copies of an eigenvalue per start (copies beyond
that are found only where a probe starts), and a Ritz pair within ``tol`` far from the
wanted end may yet be overtaken by one that has not converged.

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
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import InputError
from .base import Counted, generator

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


class Ritz(NamedTuple):
    """The Rayleigh–Ritz pairs ``(θᵢ, V yᵢ)`` of a basis of ``j`` vectors, ascending.

    Attributes:
        values: ``[j]`` ``θ``, float64.
        rotations: ``[j, j]`` ``Y``, float64.
        residuals: ``[j]`` ``‖F Bᵀ yᵢ‖``, the recurrence's residuals.
        probe: ``[j]`` whether each pair belongs to the probe (not to the invariant part).
    """

    values: Tensor
    rotations: Tensor
    residuals: Tensor
    probe: Tensor


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


def _probe_ends(ritz: Ritz, which: str) -> Tensor:
    """Indices of the probe's Ritz pairs at the wanted end (both ends for ``"magnitude"``)."""
    probe = torch.nonzero(ritz.probe).flatten()
    ends = {"largest": [-1], "smallest": [0], "magnitude": [0, -1]}[which]
    return probe[ends].unique()


class _Krylov:
    """The basis ``V``, ``T = VᵀHV`` and the residual block ``F`` with its coupling ``B``."""

    def __init__(self, start: Tensor, basis_size: int, tol: float, seed: int) -> None:
        size, self.block = start.shape
        self.tol = tol
        self.basis = start.new_empty(size, basis_size)
        self.projected = torch.zeros(basis_size, basis_size, dtype=torch.float64)  # CPU
        self.residual = start  # F
        self.coupling = torch.zeros(0, self.block, dtype=torch.float64)  # B
        self.j = 0
        self.probe = 0  # the first column of the probe: V[:, :probe] spans an invariant subspace
        self.scale = 0.0
        self.norm = 0.0  # the largest ‖H q‖ met: the floor's scale before any Ritz value
        self.generator = generator(seed)

    def expand(self, op: Counted) -> None:
        """One block step: ``b`` products.

        Where the basis spans an invariant subspace (:meth:`invariant`), the block is
        ``b`` random directions orthogonal to it, uncoupled (``T``'s new columns above it
        exactly 0, ``F`` dropped: at most ``tol·‖H‖``), and starts a new probe.
        """
        j, b = self.j, self.block
        if j > 0 and self.invariant():
            self.probe = j
            q = self._random(self.residual.new_zeros(self.residual.shape[0], 0))
            r = torch.zeros(b, b, dtype=torch.float64)
        else:
            q, r = self._orthonormal_residual()
        self.basis[:, j : j + b] = q
        self.projected[:j, j : j + b] = self.coupling @ r.T
        self.projected[j : j + b, :j] = self.projected[:j, j : j + b].T
        w = op.matmat(q)
        self.norm = max(self.norm, float(torch.linalg.vector_norm(w, dim=0).max()))
        middle = (q.T @ w).double().cpu()
        self.projected[j : j + b, j : j + b] = 0.5 * (middle + middle.T)
        self.j = j + b
        self.residual = _orthogonalised(w, self.basis[:, : self.j])
        self.coupling = torch.zeros(self.j, b, dtype=torch.float64)
        self.coupling[j:] = torch.eye(b, dtype=torch.float64)

    def floor(self) -> float:
        """``1e3·ε·‖H‖``: singular values of ``F`` below it are rounding, not rank."""
        scale = max(self.scale, self.norm, 1e-300)
        return 1e3 * torch.finfo(self.residual.dtype).eps * scale

    def invariant(self) -> bool:
        """Whether the basis spans an invariant subspace to within ``tol``.

        ``‖F‖₂ ≤ tol·‖H‖`` (or the floor): every Ritz pair's residual is then within
        ``tol·‖H‖`` — the residuals no longer tell the wanted pairs from the others.

        Returns:
            Whether ``‖F‖₂ ≤ max(tol·‖H‖, floor)``.
        """
        bound = max(self.floor(), self.tol * self.scale)
        return float(torch.linalg.matrix_norm(self.residual, ord=2)) <= bound

    def _orthonormal_residual(self) -> tuple[Tensor, Tensor]:
        """The next block of the basis, from the residual block ``F``.

        ``Q`` spans ``F``'s directions of singular value above a floor of
        ``1e3·ε·‖H‖`` (:meth:`floor`; an SVD reveals rank where an unpivoted QR does not),
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
        q = torch.linalg.qr(_orthogonalised(directions[:, strengths > self.floor()], basis)).Q
        q = self._random(q)
        return q, (q.T @ f).double().cpu()

    def _random(self, q: Tensor) -> Tensor:
        """``q`` completed by random directions (the run's seeded generator).

        Returns:
            ``[P, b]``: ``q`` ``[P, c]`` (orthonormal, orthogonal to ``V``) and ``b − c``
            random directions, the whole orthonormal and orthogonal to ``V``.
        """
        basis = self.basis[:, : self.j]
        while q.shape[1] < self.block:
            fresh = torch.randn(q.shape[0], 1, generator=self.generator, dtype=torch.float64)
            fresh = _orthogonalised(fresh.to(q), torch.cat([basis, q], dim=1))
            q = torch.cat([q, fresh / torch.linalg.vector_norm(fresh)], dim=1)
        return q

    def ritz(self) -> Ritz:
        """The Rayleigh–Ritz pairs of the current basis.

        ``T`` is block diagonal, the invariant part ``V[:, :probe]`` apart from the probe
        ``V[:, probe:]``: each block is diagonalised alone, so that every pair belongs to
        one of them even where both hold an eigenvalue (a 0 of high multiplicity).

        Returns:
            The pairs (:class:`Ritz`), ascending.
        """
        j, s = self.j, self.probe
        values = torch.zeros(j, dtype=torch.float64)
        rotations = torch.zeros(j, j, dtype=torch.float64)
        for part in (slice(0, s), slice(s, j)):
            values[part], rotations[part, part] = torch.linalg.eigh(self.projected[part, part])
        order = torch.argsort(values, stable=True)
        values, rotations = values[order], rotations[:, order]
        self.scale = max(self.scale, float(values.abs().max()))
        gram = (self.residual.T @ self.residual).double().cpu()  # FᵀF
        c = self.coupling.T @ rotations  # Bᵀ y for every y
        residuals = ((c * (gram @ c)).sum(0).clamp_min(0.0)).sqrt()
        return Ritz(values, rotations, residuals, order >= s)

    def restart(self, keep: int, which: str, k: int) -> None:
        """Keep the ``keep`` Ritz vectors nearest the wanted end (no products).

        Those of the invariant part come first and stay apart from the probe's (their
        coupling ``B`` is 0). The probe's extreme pairs (:meth:`explored` waits for them)
        are kept too — beyond ``keep`` while the basis has room for a block after them,
        else in place of the farthest of the others beyond the ``k`` wanted: behind
        invariant pairs nearer the wanted end, they would be dropped at every restart
        and never converge.
        """
        ritz = self.ritz()
        index = _wanted(ritz.values, keep, which)
        if self.probe > 0:
            ends = _probe_ends(ritz, which)
            missing = ends[~torch.isin(ends, index)]
            if keep + len(missing) + self.block <= self.basis.shape[1]:
                index = torch.cat([index, missing])
            elif keep - len(missing) >= k:
                others = torch.ones(self.j, dtype=torch.bool)
                others[missing] = False
                nearest = torch.nonzero(others).flatten()
                nearest = nearest[_wanted(ritz.values[nearest], keep - len(missing), which)]
                index = torch.cat([nearest, missing])
            index = index.sort().values
        index = torch.cat([index[~ritz.probe[index]], index[ritz.probe[index]]])
        kept, size = ritz.rotations[:, index], len(index)
        self.basis[:, :size] = self.basis[:, : self.j] @ kept.to(self.basis)
        self.projected.zero_()
        self.projected[:size, :size] = torch.diag(ritz.values[index])
        self.coupling = kept.T @ self.coupling
        self.j = size
        self.probe = int((~ritz.probe[index]).sum())

    def explored(self, ritz: Ritz, index: Tensor, target: float, margin: float, which: str) -> bool:
        """Whether the space orthogonal to the basis can hold no eigenvalue beyond the wanted.

        Residuals alone cannot say so once the basis is invariant: every Ritz pair is then
        exact, the wanted ``index`` among them, whatever lies outside. Outside the
        invariant part ``V[:, :probe]`` the probe, grown from random vectors, has Ritz
        values tending to the outside's extremes: its extreme ones (both ends for
        ``"magnitude"``) must be within ``target``. Where the probe is itself invariant,
        what it leaves outside are (with probability 1 over its random start) further
        copies of its Ritz values: none may lie beyond the least wanted value by more
        than ``margin``, unless the basis spans the whole space.

        Returns:
            Whether ``ritz``'s wanted pairs ``index`` may be taken for the wanted end.
        """
        if self.j == self.basis.shape[0]:
            return True
        if self.probe > 0 and not bool((ritz.residuals[_probe_ends(ritz, which)] <= target).all()):
            return False
        values = ritz.values[ritz.probe]
        if not self.invariant():
            return True
        wanted = ritz.values[index]
        if which == "largest":
            return float(values.max()) <= float(wanted.min()) + margin
        if which == "smallest":
            return float(values.min()) >= float(wanted.max()) - margin
        return float(values.abs().max()) <= float(wanted.abs().min()) + margin


def lanczos_extreme(
    op: Counted,
    k: int,
    which: str,
    tol: float,
    max_hvps: int,
    basis_size: int,
    start: Tensor,
    seed: int = 0,
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
        seed: seeds the random directions that continue the run where the basis spans
            an invariant subspace.

    Returns:
        The confirmed pairs; or, where the run stopped short of that, those of its last
        confirmation if one failed (``measured``), else the recurrence's last pairs.
        ``converged`` says which (the caller decides what an unconverged run means).

    Raises:
        InputError: ``max_hvps`` is too few for ``k`` pairs (no Ritz pair formed).
    """
    krylov = _Krylov(start, basis_size, tol, seed)
    block = krylov.block
    keep = k + (basis_size - block - k) // 2  # the wanted pairs and some neighbours
    ritz: Ritz | None = None  # of the last step
    refuted: RitzPairs | None = None  # the last pairs the product did not confirm
    strictness, confirming = 1.0, 0  # products spent confirming come on top of max_hvps
    while op.products - confirming + block <= max_hvps:
        if krylov.j + block > basis_size:
            krylov.restart(keep, which, k)
        krylov.expand(op)
        if krylov.j < k:
            continue
        ritz = krylov.ritz()
        index = _wanted(ritz.values, k, which)
        estimated = ritz.residuals[index]
        target = strictness * tol * krylov.scale
        if not bool((estimated <= target).all()):
            continue
        if not krylov.explored(ritz, index, target, tol * krylov.scale, which):
            continue
        vectors = krylov.basis[:, : krylov.j] @ ritz.rotations[:, index].to(krylov.basis)
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
    values, rotations, residuals, _ = ritz
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
