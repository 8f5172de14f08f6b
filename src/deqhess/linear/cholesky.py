"""A pivoted Cholesky factor ``A = RᵀR`` of positive semi-definite blocks, to rounding.

Used for a loss's curvature at a model's output, ``∇²ℓ`` (``C × C`` per sample): with
``A = RᵀR`` of rank ``r``, ``Jᵀ A J = (RJ)ᵀ(RJ)`` is a Gram matrix, formed in half the
arithmetic of ``Jᵀ(AJ)`` (BLAS ``syrk``) from ``r ≤ C`` rows per sample (softmax
cross-entropy: ``r = C − 1``).

Accuracy, entry by entry. The factor is complete-pivoted (the largest remaining
diagonal entry first) and stops only when every remaining diagonal entry is below
``TOLERANCE · w · ε`` times its own starting value ``aᵢᵢ``; what it leaves out (the
Schur complement ``S``, positive semi-definite) is then bounded by
``|Sᵢⱼ| ≤ √(SᵢᵢSⱼⱼ) ≤ TOLERANCE · w · ε · √(aᵢᵢaⱼⱼ)``, and Cholesky's own rounding
satisfies the same kind of bound (``|ΔA| ≤ γ_{w+1}|Rᵀ||R|``, ``(|Rᵀ||R|)ᵢⱼ ≤ √(aᵢᵢaⱼⱼ)``).
That is the bound of the direct product ``Jᵀ(AJ)``'s rounding for a positive
semi-definite ``A`` — so a loss stiff along one output (``aᵢᵢ`` huge) does not smear
error into the directions that output does not touch, as an eigen-factor's
``ε·‖A‖`` error would. A block that is not positive semi-definite to that precision
(a negative starting diagonal entry, or a remainder outside the bound) has no factor:
:func:`pivoted_cholesky` returns None and the caller keeps the direct product.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_WIDTH", "TOLERANCE", "pivoted_cholesky"]

#: the widest blocks factored (the factor takes up to ``w`` steps, each a pass over them)
MAX_WIDTH = 256

#: a remaining diagonal entry below ``TOLERANCE · w · ε · aᵢᵢ`` counts as zero
TOLERANCE = 4.0


def pivoted_cholesky(blocks: Tensor) -> Tensor | None:
    """``R`` with ``Rₖᵀ Rₖ = Aₖ`` to rounding, for positive semi-definite blocks ``Aₖ``.

    Args:
        blocks: ``[B, w, w]``, symmetric blocks ``Aₖ`` (floating point).

    Returns:
        ``[B, r, w]``: each block's factor rows, ``r`` the largest rank found (a block of
        lower rank has zero rows at the end); None when some block is not positive
        semi-definite to rounding (see the module), is not finite, or ``w`` exceeds
        :data:`MAX_WIDTH`.
    """
    count, width = blocks.shape[0], blocks.shape[-1]
    if width > MAX_WIDTH or not bool(torch.isfinite(blocks).all()):
        return None
    start = blocks.diagonal(dim1=1, dim2=2)  # [B, w], the aᵢᵢ
    scale = start.abs().amax(dim=1, keepdim=True)
    eps = torch.finfo(blocks.dtype).eps
    slack = TOLERANCE * width * eps
    if bool((start < -slack * scale).any()):
        return None
    start = start.clamp(min=0)
    floor = slack * start  # below this, a remaining diagonal entry counts as zero
    rest = blocks.clone()  # the Schur complement still to factor
    rows = []
    batch = torch.arange(count, device=blocks.device)
    for _ in range(width):
        diagonal = rest.diagonal(dim1=1, dim2=2)
        live = diagonal > floor
        if not bool(live.any()):
            break
        pivot = torch.where(live, diagonal, -1.0).argmax(dim=1)  # [B]
        value = diagonal[batch, pivot]
        row = rest[batch, pivot] / value.clamp(min=torch.finfo(blocks.dtype).tiny).sqrt()[:, None]
        row = torch.where(live.any(dim=1, keepdim=True), row, 0.0)  # a finished block: none
        rest -= row[:, :, None] * row[:, None, :]
        rows.append(row)
    bound = slack * (start[:, :, None] * start[:, None, :]).sqrt()
    if not bool((rest.abs() <= bound).all()):
        return None  # an indefinite remainder: no Gram factor
    if not rows:
        return blocks.new_zeros(count, 0, width)
    return torch.stack(rows, dim=1)
