"""A fixed point's dense factors of ``I − J``, kept between passes over the same batch.

A curvature operator's passes over a data set solve each batch's DEQ layers again,
warm-started from the fixed points the last pass reached. Where nothing changed the
solve stops at its start — bitwise the same point (every batch of every pass of
``benchmarks/vs_curvlinops.py``'s tanh classifier) — and forming and factorising each
batch's ``I − J`` again (the ``d`` VJPs of its Jacobian blocks, the coupling probes, the
LU and its condition number: 1.8 ms of the ~10 ms a 10-direction block spends on a
batch) would give the same factors. They are kept beside the warm starts and taken
again (:meth:`deqhess.linear.Linearization.adopt`) where

* the point and every argument of the map are bitwise the same (copies are kept),
* the linear solver is the same dense LU (:class:`deqhess.linear.Dense`, same settings),
* and one product checks the map itself: the kept factors' solution of
  ``(I − J)ᵀ x = v`` for a fixed random ``v`` satisfies the map's own VJP at the point
  to rounding, row by row — a map changed outside its tensors (a Python attribute of the
  cell) would not, and is factorised afresh.

Anything else forms the factors as always, and keeps them for the next pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Solve
from .dense import Dense
from .linearization import Linearization

__all__ = ["KeptFactors", "keep_factors"]

#: the spot check's allowance, in units of ``d·ε`` times the row's sizes
_ROUNDING = 1e3


@dataclass(frozen=True)
class KeptFactors:
    """The dense factors of ``I − J`` at a point, and what they were formed at.

    Attributes:
        point: ``h*`` as rows ``[S, d]`` (a copy).
        arguments: the map's arguments (copies, detached).
        solver: the strategy's type and settings.
        prepared: the factorised solve.
    """

    point: Tensor
    arguments: tuple[Tensor, ...]
    solver: tuple[type, dict]
    prepared: Solve


def keep_factors(lin: Linearization, slot: tuple[dict, Any], arguments: tuple[Tensor, ...]) -> None:
    """Take the factors kept in ``slot`` if they hold for ``lin``, else keep ``lin``'s.

    Args:
        lin: a fixed point's linearisation, not yet set up.
        slot: ``(store, key)``: where the factors of this call are kept between passes.
        arguments: the map's arguments at the fixed point (besides the state).
    """
    store, key = slot
    if not isinstance(lin.solver, Dense) or lin.is_prepared:
        store.pop(key, None)
        return
    settings = (type(lin.solver), dict(vars(lin.solver)))
    kept = store.get(key)
    if kept is not None and _same(kept, lin.h, arguments, settings) and _checks(kept, lin):
        lin.adopt(kept.prepared)
        return
    store.pop(key, None)
    point = lin.h.detach().clone()
    copies = tuple(a.detach().clone() for a in arguments)

    def keep(prepared: Solve) -> None:
        store[key] = KeptFactors(point, copies, settings, prepared)

    lin.on_prepared = keep


def _same(kept: KeptFactors, point: Tensor, arguments: tuple[Tensor, ...], settings: tuple) -> bool:
    """Whether the point, every argument and the solver are those the factors were formed at."""
    if kept.solver[0] is not settings[0] or kept.solver[1] != settings[1]:
        return False
    if len(kept.arguments) != len(arguments):
        return False
    pairs = [(kept.point, point), *zip(kept.arguments, arguments, strict=True)]
    return all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in pairs
    )


def _checks(kept: KeptFactors, lin: Linearization) -> bool:
    """Whether the kept factors solve ``(I − J)ᵀ x = v`` for the map's own ``J`` now.

    Returns:
        True where, in every row, ``‖x − Jᵀx − v‖ ≤ 1e3·d·ε·(‖x‖ + ‖Jᵀx‖ + ‖v‖)``.
    """
    h = lin.h
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device)
    x, _ = kept.prepared.transpose().compute(v)
    pullback = torch.func.vjp(lin.residual.fn, h)[1]  # Jᵀ of the map F at h*
    pulled = pullback(x)[0]
    gap = torch.linalg.vector_norm(x - pulled - v, dim=-1)
    sizes = sum(torch.linalg.vector_norm(t, dim=-1) for t in (x, pulled, v))
    allowed = _ROUNDING * h.shape[-1] * torch.finfo(h.dtype).eps * sizes
    return bool(torch.isfinite(gap).all()) and bool((gap <= allowed).all())
