"""Whether every entry of a tensor is finite, in one pass over it.

``torch.isfinite(t).all()`` makes two temporaries as large as ``t`` (its ``abs`` and a
mask): 0.4 s on a 6,208² Hessian, 0.5 ms on each HVP's input at P = 82k. A sum is
finite only if every entry is — NaN and ±inf propagate through it, and ``inf − inf``
is NaN — so one reduction settles the common case; a sum that overflows from finite
entries falls through to the entrywise check, so the answer is always exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]


def all_finite(t: Tensor) -> bool:
    """True if no entry of ``t`` is NaN or ±inf (integer and boolean tensors: always)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
