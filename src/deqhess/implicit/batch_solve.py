"""One batch of a data set as :class:`deqhess.DatasetEquilibrium` holds it.

The user's loss bound to a batch's target (:class:`BatchLoss`), a batch solved for
products (:class:`SolvedBatch`, :class:`ReadyBatch`), and what every batch's forward
solve leaves for the record (:class:`BatchSolve`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..parameters import Parameters
from .equilibrium import Equilibrium, EquilibriumInfo
from .loss import required_positional

__all__ = [
    "BatchLoss",
    "BatchSolve",
    "ReadyBatch",
    "SolvedBatch",
    "loss_uses_theta",
    "sample_count",
]


class BatchLoss:
    """``loss(h, [θ,] y_b)`` as an ``L(h, θ)`` for one batch's equilibrium.

    It wraps the user's loss (``_wrapped_loss``), so what that loss captured is watched
    too.
    """

    def __init__(self, loss: Callable[..., Tensor], uses_theta: bool, target: Any):
        self.loss, self.uses_theta, self.target = loss, uses_theta, target
        self._wrapped_loss = loss

    def __call__(self, h: Tensor, theta: Parameters) -> Tensor:
        """``L(h, θ)``: the batch's loss at state ``h`` (and ``θ``, if it takes it)."""
        return self.of(h, theta, self.target)

    def of(self, h: Tensor, theta: Parameters, target: Any) -> Tensor:
        """The loss at state ``h`` for another ``target`` (a sample's rows of the batch's)."""
        if self.uses_theta:
            return self.loss(h, theta, target)
        return self.loss(h, target)


@dataclass
class SolvedBatch:
    """One batch ready for products.

    Its equilibrium (None if no sample was kept), its loss, and where it stands in the
    first pass.
    """

    key: str
    x: Any
    target: Any
    equilibrium: Equilibrium | None
    loss: BatchLoss | None
    info: EquilibriumInfo
    kept: Tensor | None = None  # the kept samples' indices in the batch (None: all)
    excluded: int = 0
    forward_iterations: int = 0  # the solve over all its samples, the left-out ones included


@dataclass(frozen=True)
class ReadyBatch:
    """A batch that kept samples, as the products see it: its equilibrium and loss."""

    solved: SolvedBatch
    equilibrium: Equilibrium
    loss: BatchLoss


@dataclass(frozen=True)
class BatchSolve:
    """One batch's forward solve, as the first pass saw it (kept for every batch).

    Attributes:
        info: the solve statistics (per-sample residuals and convergence included; the
            condition number of ``I − J`` once a pass has factorised the batch).
        samples: the batch's sample count (after exclusion).
        state_norm: ``‖h*‖₂`` of the batch's fixed point.
        dtype: the state's dtype.
        excluded: unconverged samples left out (``exclude_unconverged``).
        forward_iterations: the iterations of the batch's forward solve over all its
            samples, the left-out ones included (where samples were left out, ``info``
            is the kept samples' re-solve from their fixed points, of no iterations).
    """

    info: EquilibriumInfo
    samples: int
    state_norm: float
    dtype: torch.dtype
    excluded: int = 0
    forward_iterations: int = 0


def loss_uses_theta(loss: Callable[..., Tensor]) -> bool:
    """Whether a data-set loss takes θ, read from its required positional arguments.

    Returns:
        True for ``loss(h, theta, target)`` (3 required positional arguments), False for
        ``loss(h, target)`` (2; also taken for ``*args``).

    Raises:
        InputError: ``loss`` is not callable or requires another number of arguments.
    """
    if not callable(loss):
        raise InputError(f"loss must be callable; got {type(loss).__name__}.")
    required = required_positional(loss)
    if required is None:
        return False
    if required not in (2, 3):
        raise InputError(
            "a data-set loss must take loss(h, target) or loss(h, theta, target); "
            f"{getattr(loss, '__name__', loss)!r} requires {required} positional arguments."
        )
    return required == 3


def sample_count(x: Any, dim: int = 0) -> int:
    """A batch's sample count for its fingerprints: x's first tensor's size along ``dim``.

    Args:
        x: the batch's input.
        dim: the state's sample dimension (``batch_dim``), which x shares: time-major
            data ``[m, B]`` with ``batch_dim=1`` have ``B`` samples.

    Returns:
        The size along ``dim`` of the first tensor of ``x`` (along its first dimension
        where it has fewer dimensions); 1 for a scalar or no tensor.
    """
    tensor = (
        x
        if isinstance(x, Tensor)
        else next(
            (t for t in torch.utils._pytree.tree_flatten(x)[0] if isinstance(t, Tensor)), None
        )
    )
    if not isinstance(tensor, Tensor) or tensor.ndim == 0:
        return 1
    return tensor.shape[dim] if -tensor.ndim <= dim < tensor.ndim else tensor.shape[0]
