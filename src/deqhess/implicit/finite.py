"""One check that a derivative computed at the fixed point is finite.

Inputs are checked for NaN/inf at construction, so a non-finite derivative means the
loss or ``f`` is not differentiable (or overflows) at the fixed point. Each result
is checked once, with one ``isfinite`` reduction, where it is computed: ∇L at h*, the
adjoint λ, the gradient, Z, the Hessian, HVP blocks and ``d²h*/dθ²``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..finiteness import all_finite

__all__ = ["require_finite"]

_FIRST_ORDER = (
    "f or the loss is not differentiable at (θ, h*) (sqrt, abs, norms or division at 0) "
    "or overflows there"
)
_ADVICE = {
    "∇L at h*": "The loss or its gradient is NaN/inf at the fixed point: evaluate "
    "loss(eq.h) and look for log, sqrt or division at 0, or overflow (use stable forms "
    "such as logsumexp).",
    "the adjoint λ": "∇L is finite there, so J = ∂f/∂h is not, or I − J is singular: "
    + _FIRST_ORDER
    + "; check torch.func.jacrev of f at eq.h.",
    "the gradient": "λ is finite, so ∂f/∂θ is not: " + _FIRST_ORDER + ".",
    "the sensitivity Z": "∂f/∂θ or J is NaN/inf at the fixed point: " + _FIRST_ORDER + ".",
    "the Hessian": "first derivatives are finite, so a second derivative of f or of the "
    "loss is not (sqrt or abs at 0 have infinite curvature there).",
    "the Hessian-vector products": "first derivatives are finite, so a second derivative "
    "of f or of the loss is not (sqrt or abs at 0 have infinite curvature there).",
    "the loss curvature at the output": "the loss's second derivative in the model's "
    "output is NaN/inf there (sqrt or abs at 0 have infinite curvature): check "
    "torch.func.hessian of the loss at the model's output.",
    "d²h*/dθ²": "a second derivative of f is NaN/inf at the fixed point (sqrt or abs at 0).",
}


def require_finite(value: Tensor, quantity: str) -> Tensor:
    """Refuse a non-finite quantity computed at the fixed point.

    Args:
        value: the quantity.
        quantity: its name, a key of the advice table (e.g. ``"the Hessian"``).

    Returns:
        ``value`` itself, all of its entries finite.

    Raises:
        NonFiniteError: naming ``quantity`` (a key of the advice table), how many
            entries are non-finite, the first one, and what to check.
    """
    if all_finite(value):
        return value
    bad = ~torch.isfinite(value.detach()).reshape(-1)
    first = int(torch.nonzero(bad)[0, 0])
    raise NonFiniteError(
        f"{quantity} has {int(bad.sum())} non-finite entries of {bad.numel()} (first at "
        f"flat index {first}: {float(value.reshape(-1)[first])}). {_ADVICE[quantity]}",
        quantity=quantity,
    )
