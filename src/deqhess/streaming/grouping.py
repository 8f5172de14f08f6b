"""What a batch's loss makes of how its samples are grouped and ordered.

For every data-set front end (:class:`deqhess.ModelCurvature` at the model's output,
:class:`deqhess.DatasetEquilibrium` at the fixed point): the data set's loss is
``Σ_b w_b ℓ_b``. Where each batch's loss is the plain mean (or
sum) of its samples' own, any grouping of the samples into batches, in any order, is the
same operator, and a shuffling loader is harmless. A loss that is not — a class-weighted
or ``ignore_index`` cross-entropy (a weighted mean), a term coupling the samples — makes
another grouping another operator; one over consecutive samples, or weighting them by
position, makes another order within a batch another operator too. The first pass asks
both of each batch (samples along the first dimension), and the stream then refuses a
pass that regroups or reorders where it matters
(:meth:`deqhess.streaming.record.PassCheck.grouped`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "GROUPINGS",
    "LossAtOutput",
    "grouping_of",
    "loss_grouping",
    "loss_orders_samples",
    "sample_row",
]

#: what a batch's loss makes of the grouping (:func:`loss_grouping`)
GROUPINGS = ("free", "sizes", "coupled")


@dataclass(frozen=True)
class LossAtOutput:
    """A batch's loss as a function of what it reads: the model's output, or a state.

    Attributes:
        output: what the loss reads (a tensor or a tuple / list / dict of them), its
            samples along the first dimension.
        target: the batch's target.
        value: the batch's loss there.
        loss_of: ``(output, target) ↦`` the loss (a 0-dim tensor), for the same output
            and target with their rows taken or reordered.
        loss_func: the user's loss (a class-weighted module is coupled by construction).
    """

    output: Any
    target: Any
    value: Tensor
    loss_of: Callable[[Any, Any], Tensor]
    loss_func: Any = None


def loss_grouping(batch: LossAtOutput, samples: int, reduction: str) -> str | None:
    """What the batch's loss makes of how the samples are grouped into batches.

    Each sample's loss alone (the loss vmapped over the output's rows) against the
    batch's; on a batch of one, the sample twice over (a mean gives its value, a sum
    twice it). With the data set's
    loss ``Σ_b w_b ℓ_b`` (``w_b = n_b/N`` for ``"mean"``, 1 for ``"sum"``):

    * ``"free"`` — ``ℓ_b`` is the mean (``"mean"``) or sum (``"sum"``) of its samples'
      own: every sample weighs the same, whatever the grouping;
    * ``"sizes"`` — the other one (a mean-reduced loss added by ``reduction="sum"``, a
      sum-reduced one averaged by ``"mean"``): a sample weighs as its batch's size says,
      so a grouping into batches of other sizes is another operator (batches all of one
      size: the same);
    * ``"coupled"`` — neither: a class-weighted or ``ignore_index`` cross-entropy (a
      weighted mean; coupled by construction, whatever the batch), or a term coupling
      the samples; another grouping is another operator.

    Args:
        batch: the batch's loss at what it reads.
        samples: the batch's sample count (along the first dimension).
        reduction: the data set's reduction, ``"mean"`` or ``"sum"``.

    Returns:
        One of :data:`GROUPINGS` (``"coupled"`` also where a sample's own loss is not
        finite where the batch's is — an ``ignore_index`` sample alone, 0/0 — or the loss
        cannot be evaluated on one sample); None where the output or the target has no
        sample rows (not known).
    """
    if samples < 1:
        return "free"
    if _class_weighted_mean(batch.loss_func):  # whatever this batch's classes
        return "coupled"
    rows = _sample_rows(batch, samples)
    if rows is None:  # no sample rows to take
        return None
    if not rows:  # an output without sample rows: a batch statistic, regrouped with them
        # (on one sample, a squeezed output is 0-dim too: not known there)
        return "coupled" if samples > 1 else None
    try:
        with warnings.catch_warnings():  # the check's own evaluations: not the user's
            warnings.simplefilter("ignore")
            own = _each_sample(batch, samples)
    except Exception:  # the loss cannot take a batch of one: it couples the samples
        return "coupled"
    value = batch.value.detach()
    if samples == 1:  # mean and sum agree on one sample: its value twice over tells them
        own, value = own.expand(2), _twice(batch)
    if not bool(torch.isfinite(own).all()):  # e.g. an ignored sample's loss alone: 0/0
        return "coupled" if bool(torch.isfinite(value)) else "free"
    eps = torch.finfo(own.dtype).eps

    def equals(total: Tensor, scale: Tensor) -> bool:
        return abs(float(total - value)) <= 1e3 * eps * max(float(scale), float(value.abs()))

    plain, other = (own.mean(), own.sum()) if reduction == "mean" else (own.sum(), own.mean())
    magnitude = own.abs()
    plain_scale, other_scale = (
        (magnitude.mean(), magnitude.sum()) if reduction == "mean"
        else (magnitude.sum(), magnitude.mean())
    )  # fmt: skip
    if equals(plain, plain_scale):
        return "free"
    return "sizes" if equals(other, other_scale) else "coupled"


def grouping_of(
    batch: LossAtOutput, samples: int, reduction: str
) -> tuple[bool | None, bool | None, bool | None]:
    """What a first pass records of a batch (``Formed``'s coupled, sized, ordered).

    Args:
        batch: the batch's loss at what it reads.
        samples: the batch's sample count (along the first dimension).
        reduction: the data set's reduction.

    Returns:
        ``(coupled, sized, ordered)``: :func:`loss_grouping`'s answer as two flags (None
        where not known), and, for a coupled loss, :func:`loss_orders_samples`'.
    """
    grouping = loss_grouping(batch, samples, reduction)
    if grouping is None:
        return None, None, None
    coupled = grouping == "coupled"
    return coupled, grouping == "sizes", loss_orders_samples(batch, samples) if coupled else None


def loss_orders_samples(batch: LossAtOutput, samples: int) -> bool | None:
    """Whether the batch's loss depends on the order of its samples.

    The loss and its gradient at the output, with the output's and the target's sample
    rows in two other orders (shifted by one, and a fixed shuffle), against the batch's
    own: a term over consecutive samples, or weights by position, makes the data set's
    loss depend on the order a loader yields the samples in. Compared at the output moved
    by a fixed random step of its own scale — a generic point, where a loss near its
    minimum (a moment matched to 1e-11) cannot pass rounding off as order — or, where
    the loss is not finite there or refuses it (outputs it takes only in a range, as
    binary cross-entropy's probabilities), at the output.

    Args:
        batch: the batch's loss at what it reads.
        samples: the batch's sample count (along the first dimension).

    Returns:
        True where they differ beyond rounding; None where the loss cannot be
        evaluated so (not known).
    """
    if samples <= 1:
        return False
    flat, spec = tree_flatten(batch.output)
    generator = torch.Generator().manual_seed(1)
    shuffled = torch.randperm(samples, generator=generator)
    orders = (torch.roll(torch.arange(samples), 1), shuffled)

    def moved(t: Tensor) -> Tensor:
        step = torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
        return t + 0.5 * (float(t.abs().mean()) + 1.0) * step

    for point in (moved, lambda t: t):
        try:
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore")  # the check's own evaluations
                leaves = [point(t.detach()).requires_grad_() if _floating(t) else t for t in flat]
                found = _reordered(batch, tree_unflatten(leaves, spec), leaves, samples, orders)
        except Exception:  # off the loss's domain (BCE raises): the next point
            continue
        if found is not None:
            return found
    return None


def _reordered(
    batch: LossAtOutput, output: Any, leaves: list[Any], samples: int, orders: tuple[Tensor, ...]
) -> bool | None:
    """Whether the loss at ``output`` (and its gradient) moves when its rows are reordered.

    Returns:
        True or False; None where the loss or its gradient is not finite there.
    """
    differentiable = [t for t in leaves if _floating(t)]

    def rows(value: Any, order: Tensor) -> Any:
        return tree_map(lambda t: t[order.to(t.device)] if _rows(t, samples) else t, value)

    def loss_and_grads(order: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, target = (output, batch.target) if order is None else (
            rows(output, order), rows(batch.target, order))  # fmt: skip
        value = batch.loss_of(out, target)
        return value.detach(), torch.autograd.grad(
            value, differentiable, allow_unused=True, materialize_grads=True
        )

    value, grads = loss_and_grads(None)
    if not bool(torch.isfinite(value)) or not all(bool(torch.isfinite(g).all()) for g in grads):
        return None
    eps = 1e3 * torch.finfo(value.dtype).eps
    for order in orders:
        other, other_grads = loss_and_grads(order)
        if abs(float(other - value)) > eps * float(value.abs().clamp_min(1e-300)):
            return True
        for g, h in zip(grads, other_grads, strict=True):
            largest = torch.linalg.vector_norm(g, ord=float("inf"))
            if torch.linalg.vector_norm(g - h, ord=float("inf")) > eps * largest:
                return True
    return False


def _class_weighted_mean(loss: Any) -> bool:
    """Whether ``loss`` is a class-weighted mean: it couples the samples by construction.

    Its batch value divides by the batch's sum of class weights; a batch of one class
    only (equal weights) does not show it, and a first pass whose batches happen to be
    so would let a regrouping loader through.

    Returns:
        True for a mean-reduced cross-entropy or NLL loss module with ``weight``.
    """
    return (
        isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss))
        and loss.weight is not None
        and loss.reduction == "mean"
    )


def _floating(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def sample_row(value: Any, i: int, samples: int) -> Any:
    """Sample ``i`` of a batch's tensors (those with ``samples`` rows), as a batch of one.

    Args:
        value: a tensor, or a tuple / list / dict of them (other leaves as they are).
        i: the sample.
        samples: the batch's sample count.

    Returns:
        ``value`` with each tensor of ``samples`` rows cut to its row ``i`` (kept 2-D).
    """
    return tree_map(lambda t: t[i : i + 1] if _rows(t, samples) else t, value)


def _rows(t: Any, samples: int) -> bool:
    """Whether ``t`` is a tensor with one row per sample (along its first dimension)."""
    return isinstance(t, Tensor) and t.ndim > 0 and len(t) == samples


def _sample_rows(batch: LossAtOutput, samples: int) -> bool | None:
    """Whether the output's tensors all hold ``samples`` rows.

    A target's tensors without them (a constant shared by the batch) are passed whole to
    each sample's loss.

    Returns:
        True where every output tensor holds the rows; False where one does not (a batch
        statistic, or a penalty, returned beside the per-sample output); None where no
        tensor of the output or the target holds them (nothing to take per sample).
    """
    outputs = [t for t in tree_flatten(batch.output)[0] if isinstance(t, Tensor)]
    targets = [t for t in tree_flatten(batch.target)[0] if isinstance(t, Tensor)]
    if not any(_rows(t, samples) for t in outputs + targets):
        return None
    return bool(outputs) and all(_rows(t, samples) for t in outputs)


def _each_sample(batch: LossAtOutput, samples: int) -> Tensor:
    """Each sample's loss alone (a batch of one): one vmapped evaluation, else a loop.

    Returns:
        ``[samples]``, detached.
    """

    def dims(value: Any) -> Any:
        return tree_map(lambda t: 0 if _rows(t, samples) else None, value)

    out_spec, target_spec = dims(batch.output), dims(batch.target)

    def alone(value: Any, spec: Any) -> Any:  # a row back to a batch of one, the rest whole
        leaves, tree = tree_flatten(value)
        taken = tree_flatten(spec)[0]
        return tree_unflatten(
            [t[None] if d == 0 else t for t, d in zip(leaves, taken, strict=True)], tree
        )

    with torch.no_grad():
        try:
            return torch.func.vmap(
                lambda o, t: batch.loss_of(alone(o, out_spec), alone(t, target_spec)),
                in_dims=(out_spec, target_spec),
            )(batch.output, batch.target)
        except (RuntimeError, ValueError, TypeError):  # a loss vmap cannot batch
            return torch.stack([
                batch.loss_of(
                    sample_row(batch.output, i, samples), sample_row(batch.target, i, samples)
                ).detach()
                for i in range(samples)
            ])  # fmt: skip


def _twice(batch: LossAtOutput) -> Tensor:
    """The loss of a batch of one sample taken twice (its rows repeated)."""

    def doubled(value: Any) -> Any:
        return tree_map(lambda t: torch.cat([t, t]) if _rows(t, 1) else t, value)

    with torch.no_grad():
        return batch.loss_of(doubled(batch.output), doubled(batch.target)).detach()
