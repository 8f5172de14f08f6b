"""Per-sample quantities of a model through its DEQ layers, from one batch's graph.

Influence scores, the empirical Fisher and Laplace approximations need, per sample
``i`` of a batch, the gradient of that sample's own loss ``∇_θ ℓ(model(x_i), y_i)`` and
the Jacobian of the model's output ``∂model(x_i)/∂θ``. A batch's forward runs once (each
DEQ solves once); the ``n`` (or ``n·C``) one-hot cotangents then go through its graph
together (:class:`deqhess.models.backward.BlockBackward`), each DEQ layer's backward an
exact adjoint solve. Samples are independent through the model (a DEQ with
``batch_dim=0`` solves each on its own), so sample ``i``'s rows depend on ``x_i`` alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..errors import DeqhessError, InputError, NonFiniteError
from ..finiteness import all_finite
from ..streaming.grouping import sample_row
from .graph import BatchGraph
from .sample_sites import Stacking, stacked_sample_rows

__all__ = [
    "output_jacobians",
    "sample_outputs",
    "sample_gradients",
    "sample_losses",
    "stacked_rows",
]


def _shapes(value: Any) -> list[tuple[int, ...]]:
    """The shapes of a value's tensors, for messages."""
    return [tuple(t.shape) for t in tree_flatten(value)[0] if isinstance(t, Tensor)]


def sample_losses(graph: BatchGraph, n: int) -> Tensor:
    """Each sample's loss alone, ``ℓᵢ = loss(model(x)[i:i+1], target[i:i+1])``.

    The loss is evaluated on the batch's output rows, one sample at a time, so each
    ``ℓᵢ`` keeps its graph back to the chosen parameters through the batch's one forward.

    Args:
        graph: the batch's graph (its output, target and loss function).
        n: the batch's sample count.

    Returns:
        ``[n]``, with a graph: ``ℓᵢ`` in entry ``i``.

    Raises:
        InputError: the output or the target has no first dimension of ``n`` samples
            (or the output holds no tensor), or the loss raises on a sample alone (named,
            with its error).
        DeqhessError: as the loss's own checks raise it.
    """
    outputs = [t for t in tree_flatten(graph.output)[0] if isinstance(t, Tensor)]
    targets = [t for t in tree_flatten(graph.target)[0] if isinstance(t, Tensor)]
    if not outputs or any(t.ndim == 0 or len(t) != n for t in outputs + targets):
        raise InputError(
            f"per-sample quantities need the model's output and the target to hold the "
            f"batch's {n} samples along their first dimension; got output shapes "
            f"{[tuple(t.shape) for t in outputs]} and target shapes "
            f"{[tuple(t.shape) for t in targets]}."
        )
    losses = []
    with torch.enable_grad():
        for i in range(n):
            output, target = sample_row(graph.output, i, n), sample_row(graph.target, i, n)
            try:
                losses.append(graph._loss_of(output, target))
            except DeqhessError:
                raise
            except Exception as error:  # the user's loss, on a batch of one
                raise InputError(
                    f"per-sample quantities evaluate the loss on each sample alone — a batch "
                    f"of one: the output's and the target's row {i} (shapes "
                    f"{_shapes(output)} and {_shapes(target)}) — and loss_func raised "
                    f"{type(error).__name__}: {error}. The output and the target must hold "
                    "the samples along their first dimension, and the loss be defined on "
                    "one sample (a model returning the samples along another dimension: "
                    "move them first)."
                ) from error
    return torch.stack(losses)


def stacked_rows(graph: BatchGraph, out: Tensor, n: int, stacked: Tensor) -> Tensor | None:
    """Each sample's rows ``[n, r, P]`` from ``r`` cotangents stacked over the samples.

    Where the graph shows where every chosen parameter meets the samples and probes show
    the backward keeps them apart (:mod:`deqhess.models.sample_sites`): ``r`` backward
    passes instead of ``n·r`` one-hot ones.

    Args:
        graph: the batch's graph.
        out: its output, one tensor ``[n, ...]`` (the only floating one).
        n: the batch's sample count.
        stacked: ``[r, *output.shape]``, cotangent ``r`` holding each sample's own in its
            row.

    Returns:
        ``[n, r, P]`` (row ``[i, k]``: cotangent ``k``'s row ``i`` pulled back alone),
        detached; None where the route does not apply (the one-hot rows then).
    """
    rows = stacked_sample_rows(out, graph.params, stacked, n)
    if rows is None:
        return None
    # in the parameters' dtype, as the one-hot rows (an output cast to float64 on a
    # float32 model)
    return rows.dense(graph.layout.numels, graph.params[0]).detach()


def sample_gradients(graph: BatchGraph, n: int, stacking: Stacking | None = None) -> Tensor:
    """Each sample's loss gradient ``∇_θ ℓᵢ`` in the chosen parameters.

    The ``n`` one-hot cotangents of the per-sample losses go through the batch's graph
    together (each DEQ layer's backward an exact adjoint solve) — or, with a promising
    ``stacking`` and where :func:`stacked_rows` applies, each sample's loss gradient at
    its output row, all in one cotangent. Refused, with :class:`deqhess.InputError`, as
    in :func:`sample_losses`.

    Args:
        graph: the batch's graph.
        n: the batch's sample count.
        stacking: the pass's :class:`Stacking` (None: one-hot cotangents); marked
            unpromising where the route does not apply.

    Returns:
        ``[n, P]``: row ``i`` is ``∇_θ ℓᵢ``, flattened in the layout's order; detached.

    Raises:
        NonFiniteError: a row is not finite where that sample's loss alone is not (a
            loss over the batch as a whole: named as such), or as the solves raise it.
    """
    losses = sample_losses(graph, n)
    try:
        rows = _gradient_rows(graph, n, losses, stacking)
    except NonFiniteError as error:  # from a solve, named here where the loss is why
        named = _without_own_loss(losses, n)
        if named is None:
            raise
        raise named from error
    if not all_finite(rows):
        raise _without_own_loss(losses, n) or NonFiniteError(
            "a per-sample gradient is not finite: the loss or the model is not finite or "
            "not differentiable at one sample's output (sqrt, abs or division at 0, "
            "overflow).",
            quantity="a per-sample gradient",
        )
    return rows


def _gradient_rows(graph: BatchGraph, n: int, losses: Tensor, stacking: Stacking | None) -> Tensor:
    """:func:`sample_gradients`' rows: stacked where the graph allows, else one-hot."""
    outputs = [t for t in tree_flatten(graph.output)[0] if isinstance(t, Tensor)]
    if stacking is not None and stacking.promising:
        rows = None
        if len(outputs) == 1 and outputs[0].requires_grad:
            with torch.enable_grad():  # each ℓᵢ reads output row i alone: one gradient
                (at_output,) = torch.autograd.grad(losses.sum(), outputs, retain_graph=True)
            rows = stacked_rows(graph, outputs[0], n, at_output[None])
        if rows is not None:
            return rows[:, 0]
        stacking.promising = False
    eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
    with torch.enable_grad():
        grads = graph.backward([losses], graph.params, [eye])
    return torch.cat([g.reshape(n, -1) for g in grads], dim=1).detach()


def _without_own_loss(losses: Tensor, n: int) -> NonFiniteError | None:
    """Why rows are not finite where a sample's loss alone is not (None: every one is)."""
    finite = torch.isfinite(losses.detach())
    if bool(finite.all()):
        return None
    first = int(torch.nonzero(~finite)[0, 0])
    return NonFiniteError(
        f"the loss of sample {first} alone (loss_func on that sample's output and target, "
        f"a batch of one) is {float(losses[first])} ({int((~finite).sum())} of the "
        f"batch's {n} samples), and its gradient is not finite: per-sample gradients "
        "differentiate each sample's loss on its own, and this loss has none — it reads "
        "the batch as a whole (a standard deviation over the batch is NaN on one sample). "
        "Use a loss that is defined on one sample, or the data set's curvature "
        "(hessian_operator, ggn_operator), which takes the batch's loss.",
        quantity="a sample's loss alone",
    )


def sample_outputs(graph: BatchGraph, n: int) -> list[Tensor]:
    """The floating tensors of the batch's output, each holding its ``n`` samples first.

    Args:
        graph: the batch's graph.
        n: the batch's sample count.

    Returns:
        The output's floating tensors, in the order the output flattens.

    Raises:
        InputError: an output tensor has no first dimension of ``n`` samples (a 0-dim
            entry such as a regulariser returned beside the logits), or the output holds
            no floating tensor.
    """
    outputs = [t for t in tree_flatten(graph.output)[0] if isinstance(t, Tensor)]
    outputs = [t for t in outputs if t.is_floating_point()]
    if not outputs or any(t.ndim == 0 or len(t) != n for t in outputs):
        raise InputError(
            f"output Jacobians need every floating tensor of the model's output to hold the "
            f"batch's {n} samples along its first dimension; got shapes "
            f"{[tuple(t.shape) for t in outputs]}. Return the per-sample outputs alone (a "
            "term of the loss that is not per sample, such as a weight penalty, belongs in "
            "the loss function), or use the GGN's products (hessian_operator('ggn'))."
        )
    return outputs


def output_jacobians(graph: BatchGraph, n: int, stacking: Stacking | None = None) -> Tensor:
    """Each sample's output Jacobian ``∂model(x_i)/∂θ`` in the chosen parameters.

    ``C`` is the numbers of a sample's output: the floating tensors of a tuple / list /
    dict output, flattened and concatenated. The ``n·C`` one-hot cotangents go through
    the batch's graph together.

    With a promising ``stacking``, where :func:`stacked_rows` applies, the one-hot
    cotangents of an output number are stacked over the samples instead: ``C`` backward
    passes.

    Args:
        graph: the batch's graph.
        n: the batch's sample count.
        stacking: the pass's :class:`Stacking` (None: one-hot cotangents); marked
            unpromising where the route does not apply.

    Returns:
        ``[n, C, P]``: ``[i, c]`` is the gradient of output number ``c`` of sample ``i``,
        flattened in the layout's order; detached.

    Raises:
        InputError: an output tensor has no first dimension of ``n`` samples (or the
            output holds no floating tensor).
    """  # noqa: DOC502 (raised by sample_outputs)
    outputs = sample_outputs(graph, n)
    widths = [t[0].numel() for t in outputs]
    c = sum(widths)
    every = [t for t in tree_flatten(graph.output)[0] if isinstance(t, Tensor)]
    if stacking is not None and stacking.promising:
        rows, out = None, outputs[0]
        if len(every) == 1 and out.requires_grad:
            eye = torch.eye(c, dtype=out.dtype, device=out.device)
            one_hot = eye[:, None, :].expand(c, n, c).reshape(c, *out.shape)
            rows = stacked_rows(graph, out, n, one_hot)
        if rows is not None:
            return rows
        stacking.promising = False
    eye = torch.eye(n * c, dtype=outputs[0].dtype, device=outputs[0].device).reshape(n * c, n, c)
    cotangents = [
        part.reshape(n * c, *t.shape)
        for part, t in zip(eye.split(widths, dim=2), outputs, strict=True)
    ]
    with torch.enable_grad():
        grads = graph.backward(outputs, graph.params, cotangents)
    return torch.cat([g.reshape(n * c, -1) for g in grads], dim=1).reshape(n, c, -1).detach()
