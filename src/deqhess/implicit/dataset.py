"""Derivatives of a loss summed over a data set: one equilibrium per batch.

The data-set loss is ``L(θ) = Σ_b w_b ℓ(h*_b(θ), y_b)`` over batches ``(x_b, y_b)``,
with ``w_b = 1`` for ``reduction="sum"`` and ``w_b = n_b / N`` for ``reduction="mean"``
(``ℓ`` then a per-batch mean, ``n_b`` the batch's sample count, ``N`` the total), so
the result does not depend on how the data are cut into batches. Its gradient,
Hessian and products are the sums of the batches' — each batch solved once and its
linear solve reused for every product.

**Loss signature for every data-set entry point:** ``loss(h, target)`` or
``loss(h, theta, target)`` (decided from the number of required positional
parameters), where ``target`` is the batch's second element as the loader yields it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from ..chunks import default_chunk_size
from ..parameters import ParameterLayout, Parameters
from .equilibrium import Equilibrium
from .hessian import HessianSplit
from .loss import required_positional
from .operators import CurvatureOperator, check_part

__all__ = ["DatasetEquilibrium"]

_REDUCTIONS = ("mean", "sum")


class _BatchLoss:
    """``w_b · loss(h, [θ,] y_b)`` as an ``L(h, θ)`` for one batch's equilibrium."""

    def __init__(self, loss: Callable[..., Tensor], uses_theta: bool, target: Any, weight: float):
        self.loss, self.uses_theta, self.target, self.weight = loss, uses_theta, target, weight

    def __call__(self, h: Tensor, theta: Parameters) -> Tensor:
        if self.uses_theta:
            return self.weight * self.loss(h, theta, self.target)
        return self.weight * self.loss(h, self.target)


def _loss_uses_theta(loss: Callable[..., Tensor]) -> bool:
    if not callable(loss):
        raise ValueError(f"loss must be callable; got {type(loss).__name__}.")
    required = required_positional(loss)
    if required not in (2, 3):
        raise ValueError(
            "a data-set loss must take loss(h, target) or loss(h, theta, target); "
            f"{getattr(loss, '__name__', loss)!r} requires {required} positional arguments."
        )
    return required == 3


class DatasetEquilibrium:
    """The equilibria of all batches of a data set and the derivatives of their total loss.

    Args:
        f: dynamics ``f(x, h, theta)``.
        theta: parameters (tensor or dict of tensors).
        batches: an iterable of ``(x, target)`` pairs — a ``DataLoader``, a list; it is
            iterated once, at construction.
        loss: ``loss(h, target)`` or ``loss(h, theta, target)`` for one batch.
        init_state: ``x ↦ h0`` for a batch; default zeros like ``x``.
        reduction: ``"mean"`` (``loss`` is a batch mean; the total is the data mean)
            or ``"sum"`` (``loss`` is a batch sum; the total is the data sum).
        batch_dim: the sample dimension of the state (default 0), which also counts
            the samples of a batch; None makes every batch one sample.
        progress: show a progress bar over batches (None: only on a terminal).
        **options: passed to every :class:`Equilibrium` (solver, tol, linear_solver…).
    """

    def __init__(
        self,
        f: Callable[[Any, Tensor, Parameters], Tensor],
        theta: Parameters,
        batches: Iterable[tuple[Any, Any]],
        loss: Callable[..., Tensor],
        *,
        init_state: Callable[[Any], Tensor] | None = None,
        reduction: str = "mean",
        batch_dim: int | None = 0,
        progress: bool | None = None,
        **options: Any,
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'sum'.")
        uses_theta = _loss_uses_theta(loss)
        self.layout = ParameterLayout(theta)
        self.progress = progress
        self.equilibria: list[Equilibrium] = []
        targets, counts = [], []
        for item in tqdm(batches, desc="solving batches", disable=_disabled(progress)):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(
                    f"each batch must be an (x, target) pair; got {type(item).__name__}"
                    + (f" of length {len(item)}." if hasattr(item, "__len__") else ".")
                )
            x, target = item
            h0 = init_state(x) if init_state is not None else None
            eq = Equilibrium(f, theta, x, h0, batch_dim=batch_dim, **options)
            self.equilibria.append(eq)
            targets.append(target)
            counts.append(eq.problem.state.samples)
        if not self.equilibria:
            raise ValueError("batches is empty; pass at least one (x, target) batch.")
        self.num_samples = sum(counts)
        weights = [n / self.num_samples if reduction == "mean" else 1.0 for n in counts]
        self.losses = [
            _BatchLoss(loss, uses_theta, y, w) for y, w in zip(targets, weights, strict=True)
        ]

    @property
    def num_parameters(self) -> int:
        return self.layout.size

    def _batches(self, desc: str):
        pairs = zip(self.equilibria, self.losses, strict=True)
        return tqdm(list(pairs), desc=desc, disable=_disabled(self.progress), leave=False)

    def grad(self) -> Parameters:
        """The data-set gradient, in θ's structure."""
        total = sum(self.layout.flatten(eq.grad(loss)) for eq, loss in self._batches("gradient"))
        return self.layout.unflatten(total)

    def hessian(self, split: bool = False) -> Tensor | HessianSplit:
        """The data-set Hessian ``[P, P]`` (or its :class:`HessianSplit`), batch by batch."""
        parts = [eq.hessian(loss, split=split) for eq, loss in self._batches("Hessian")]
        if not split:
            return sum(parts[1:], parts[0].clone())
        return HessianSplit(
            *(sum((getattr(s, k) for s in parts[1:]), getattr(parts[0], k).clone())
              for k in ("loss_curvature", "dynamics_curvature", "total"))
        )  # fmt: skip

    def hessian_operator(self, part: str = "total") -> CurvatureOperator:
        """The data-set Hessian (or one part) as an operator; each product sums batches."""
        check_part(part)
        per_batch = [
            eq.block_products(loss, part)
            for eq, loss in zip(self.equilibria, self.losses, strict=True)
        ]

        def products(v: Tensor) -> Tensor:
            return sum(product(v) for product in per_batch)

        widest = max(eq.problem.state.size for eq in self.equilibria)
        chunk = default_chunk_size(self.num_parameters + widest)
        return CurvatureOperator(products, self.layout, part, chunk)

    def hvp(self, v: Parameters) -> Parameters:
        """``H v`` of the data-set loss; ``v`` θ-structured or flat ``[P]``."""
        return self.hessian_operator() @ v


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
