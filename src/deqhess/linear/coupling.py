"""The batch-independence check: does a linear map couple rows declared independent?"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "coupling_tolerance",
    "probe_scales",
    "row_coupling",
    "scaled_discrepancy",
    "scales_exactly",
]

#: scale factors are powers of two in [2⁻⁸, 2⁷]: one digit of base 16 per probe.
_DIGIT = 16


def coupling_tolerance(dtype: torch.dtype) -> float:
    """Relative cross-row coupling above rounding: ``1000 ε`` of the dtype."""
    return 1e3 * torch.finfo(dtype).eps


def row_coupling(
    products: Callable[[Tensor], Tensor], h: Tensor, seed: int = 0
) -> tuple[float, int]:
    """How much a linear map ``M`` couples different rows of the state.

    ``M`` is given by its ``products``, ``[K, S, d] → [K, S, d]`` (e.g. ``(I − J)ᵀ`` or
    ``J`` at rows ``h``). A random direction ``v`` and copies with row ``s`` scaled by
    ``cₛ``: if rows are independent, ``M(c ⊙ v)ₛ = cₛ (M v)ₛ`` for every row, while a
    coupling ``Mₛₜ ≠ 0`` adds ``Mₛₜ (cₜ − cₛ) vₜ`` — nonzero for almost every ``v``
    whenever ``cₜ ≠ cₛ``. The factors are powers of two (exact in floating point, so
    independent rows give zero up to the order of summation), one base-16 digit of the
    row index per probe, so every pair of rows differs in some probe: ``1 + ⌈log₁₆ S⌉``
    products in one call (3 for ``S ≤ 256``) see any coupling, one-way or not, between
    any rows. ``J`` couples rows exactly when ``(I − J)ᵀ`` does, so the adjoint's cheap
    VJPs serve.

    Returns:
        ``(coupling, row)``: the largest relative discrepancy over rows and probes (0 for
        independent rows; NaN if a product is not finite) and the row where it occurs.
    """
    samples = h.shape[0]
    if samples == 1:
        return 0.0, 0
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device)
    scales = probe_scales(samples, h.dtype, h.device)  # [L, S]
    tangents = torch.cat([v[None], scales[:, :, None] * v[None]])  # [L + 1, S, d]
    out = products(tangents)
    if not bool(torch.isfinite(out[0]).all()):
        return float("nan"), int(torch.nonzero(~torch.isfinite(out[0]).all(-1))[0, 0])
    relative = scaled_discrepancy(out[0], out[1:], scales)
    worst = torch.argmax(torch.nan_to_num(relative, nan=float("inf")).amax(dim=0))
    return float(relative[:, worst].max()), int(worst)


def probe_scales(samples: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The row factors of :func:`row_coupling`'s probes: powers of two, ``[L, S]``.

    ``L = max(1, ⌈log₁₆ S⌉)``; probe ``l`` scales row ``s`` by ``2^(d − 8)``, ``d`` the
    ``l``-th base-16 digit of ``s``: every pair of rows differs in some probe.

    Returns:
        ``[L, S]``, of ``dtype`` on ``device``.
    """
    levels = max(1, math.ceil(math.log(max(samples, 2)) / math.log(_DIGIT)))
    index = torch.arange(samples, device=device)
    return torch.stack(
        [2.0 ** ((index // _DIGIT**level) % _DIGIT - _DIGIT // 2) for level in range(levels)]
    ).to(dtype)


def scaled_discrepancy(base: Tensor, scaled: Tensor, scales: Tensor) -> Tensor:
    """How far ``M(c ⊙ v)`` is from ``c ⊙ M(v)``, row by row, relative to the two.

    Args:
        base: ``[S, ...]``, ``M v``.
        scaled: ``[L, S, ...]``, ``M(cₗ ⊙ v)`` for the probes' factors.
        scales: ``[L, S]``, the factors ``cₗ`` (:func:`probe_scales`).

    Returns:
        ``[L, S]``: each row's relative discrepancy (0 for rows a map keeps apart; NaN
        where a product is not finite).
    """
    expected = scales.reshape(*scales.shape, *([1] * (base.ndim - 1))) * base[None]
    discrepancy = _row_norms(scaled - expected)  # [L, S]
    size = _row_norms(scaled) + _row_norms(expected)
    tiny = torch.finfo(base.dtype).tiny
    relative = torch.where(size > 0, discrepancy / size.clamp_min(tiny), 0.0)
    finite = torch.isfinite(scaled.flatten(2)).all(-1)
    return torch.where(finite, relative, float("nan"))


def scales_exactly(base: Tensor, scaled: Tensor, scales: Tensor) -> bool:
    """Whether ``M(cₗ ⊙ v)`` is ``cₗ ⊙ M(v)`` bit for bit: rows a map keeps apart.

    A map that never mixes rows scales each row's products exactly with power-of-two
    factors, so the stacked routes (:mod:`deqhess.models.sample_sites`,
    :mod:`deqhess.models.input_sites`) accept no discrepancy at all. Compared entry by
    entry — :func:`scaled_discrepancy`'s norms square the entries, which underflow for
    rows below ~1e-154 (float64) or ~1e-19 (float32) and then read a 50% leak as 0.
    A product that underflows into the subnormals when scaled reads as a coupling
    (refused: the caller's exact route instead).

    Args:
        base: ``[S, ...]``, ``M v``.
        scaled: ``[L, S, ...]``, ``M(cₗ ⊙ v)`` for the probes' factors.
        scales: ``[L, S]``, the factors ``cₗ`` (:func:`probe_scales`).

    Returns:
        True where every product is finite and each scaled one equals its factor times
        the base's, exactly.
    """
    expected = scales.reshape(*scales.shape, *([1] * (base.ndim - 1))) * base[None]
    return bool(torch.isfinite(scaled).all()) and torch.equal(scaled, expected)


def _row_norms(t: Tensor) -> Tensor:
    """The norm of each row ``[..., S, *rest] → [..., S]`` (over ``rest``)."""
    return torch.linalg.vector_norm(t.flatten(2) if t.ndim > 2 else t[..., None], dim=-1)
