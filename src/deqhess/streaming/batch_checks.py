"""What a pass checks of each batch it reads, and the notes it adds to a batch's errors.

A batch's sample count (an int the batch does not contradict), its target's sample count,
its tensors made plain (``torch.inference_mode``'s have no version counter and cannot be
saved for backward) and their versions (a forward must not write to them); and, where a
batch fails, what in it likely caused the failure.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import InputError, ModelChangedError, add_note
from .fingerprint import unmatched_target

__all__ = [
    "check_target",
    "check_unwritten",
    "checked_count",
    "note_non_finite_target",
    "note_unbatched",
    "plain_tensors",
    "refuse_mixed_dtypes",
    "refuse_mixed_model",
    "tensor_versions",
]


def plain_tensors(value: Any) -> Any:
    """``value`` with each tensor made under ``torch.inference_mode`` copied as a plain one.

    Such a tensor has no version counter (what a pass checks a batch's tensors by) and
    autograd cannot save it (what the derivatives' graphs do with the model's input).

    Returns:
        ``value`` itself where it holds no such tensor, else a copy of its structure.
    """
    if isinstance(value, Tensor):
        return value.clone() if value.is_inference() else value
    leaves, spec = tree_flatten(value)
    if not any(isinstance(t, Tensor) and t.is_inference() for t in leaves):
        return value
    return tree_unflatten([plain_tensors(t) for t in leaves], spec)


def refuse_mixed_dtypes(
    error: RuntimeError, index: int, x: Any, target: Any, dtype: torch.dtype
) -> None:
    """Name a raw type error of a batch's forward whose data are not of the model's dtype.

    torch's own message (``mat1 and mat2 must have the same dtype``, ``expected scalar
    type Double but found Float``) names neither the batch nor the remedy.

    Args:
        error: what the batch's forward (or loss) raised.
        index: the batch's position in the pass.
        x: the batch's input.
        target: its target.
        dtype: the chosen parameters' dtype.

    Raises:
        InputError: from ``error``, where its message is about types and the batch holds
            floating-point tensors of another dtype than ``dtype``.
    """
    if "type" not in str(error).lower():
        return
    others = sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for t in tree_flatten((x, target))[0]
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype
        }
    )
    if not others:
        return
    name = str(dtype).removeprefix("torch.")
    raise InputError(
        f"batch {index + 1} of this pass holds {' and '.join(others)} tensors, but the model's "
        f"parameters are {name}, and its forward failed on them (torch: "
        f"{' '.join(str(error).split())[:160]!r}). Give the data the parameters' dtype "
        f"(x.to(torch.{name}), in the data set or the loader) or the model the data's "
        f"(model.to(torch.{others[0]}))."
    ) from error


def refuse_mixed_model(error: RuntimeError, model: Any, dtype: torch.dtype, label: str) -> None:
    """Name a raw type error of a forward where the model's own tensors mix dtypes.

    A module cast on its own (``model.head.float()``) among parameters of another dtype
    fails in torch with a message that names neither the module nor the remedy (the
    chosen parameters, ``theta``, may all be of one dtype).

    Args:
        error: what the batch's forward raised.
        model: the model (an ``nn.Module``; anything else is not checked).
        dtype: the chosen parameters' dtype.
        label: the operator's name, for the message.

    Raises:
        InputError: from ``error``, where its message is about types and the model holds
            floating-point parameters or buffers of another dtype than ``dtype``.
    """
    if "type" not in str(error).lower() or not isinstance(model, torch.nn.Module):
        return
    named = [*model.named_parameters(), *model.named_buffers()]
    others = [(n, t.dtype) for n, t in named if t.is_floating_point() and t.dtype != dtype]
    if not others:
        return
    listed = ", ".join(f"{n} ({str(d).removeprefix('torch.')})" for n, d in others[:4])
    more = f" and {len(others) - 4} more" if len(others) > 4 else ""
    raise InputError(
        f"{label}: the model's forward failed on a type error (torch: "
        f"{' '.join(str(error).split())[:160]!r}), and the model mixes dtypes: its chosen "
        f"parameters are {str(dtype).removeprefix('torch.')}, but {listed}{more} are not. "
        f"Give the whole model one dtype (model.to(...)) and build the {label} again if "
        "its parameters' dtype changed."
    ) from error


def tensor_versions(batch: Any) -> list[tuple[Tensor, int]]:
    """The tensors of a batch with their versions (bumped by any in-place write)."""
    return [(t, t._version) for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]


def note_non_finite_target(error: Exception, index: int, target: Any) -> None:
    """Add a note to ``error`` where batch ``index``'s target holds NaN or inf (a likely cause)."""
    leaves = tree_flatten(target)[0]
    if any(
        isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in leaves
    ):
        add_note(
            error,
            f"deqhess: the target of batch {index + 1} holds non-finite values (NaN "
            "or inf), which reach the loss's gradient; fix or drop those samples (a loss "
            "that masks missing targets must keep them out of its value and gradient).",
        )


def note_unbatched(error: Exception, index: int, x: Any, target: Any, dim: int | None) -> None:
    """Add a note to ``error`` where the batch looks like one sample without a batch dim.

    A ``DataLoader`` with ``batch_size=None`` (or a data set indexed directly) yields
    single samples: the input's first dimension is then read as its samples, and what
    fails (a DEQ layer "coupling the samples", say) blames the model.
    """
    if dim != 0 or not isinstance(x, Tensor) or not isinstance(target, Tensor):
        return
    if target.ndim == 0 and x.ndim >= 1:
        add_note(
            error,
            f"deqhess: batch {index + 1} has a target that is one number while x has "
            f"shape {tuple(x.shape)}, read as {x.shape[0]} samples: if each batch is one "
            "sample without a batch dimension (DataLoader(..., batch_size=None), a data set "
            "indexed directly), batch the samples (batch_size=...) or add the dimension "
            "(x[None], target[None]).",
        )


def checked_count(
    index: int, x: Any, target: Any, count: Any, dim: int, counter: Any = None
) -> int:
    """The sample count of a batch as ``batch_size_fn`` gave it, checked.

    Args:
        index: the batch's index in the pass.
        x: its input.
        target: its target.
        count: what the count function returned.
        dim: the sample dimension.
        counter: the count function itself (``len`` is checked against ``x``).

    Returns:
        The count, as an int.

    Raises:
        InputError: the count is not a non-negative integer; or ``batch_size_fn=len``
            counted the inputs of a tuple (the keys of a dict) whose tensors all have
            another size along ``dim`` — their samples. Any other count is the user's
            to define (a graph batch's graphs, say).
    """
    try:
        samples = operator.index(count)
    except TypeError:
        samples = -1
    if samples < 0:
        raise InputError(
            f"batch {index + 1}: the sample count is {count!r} ({type(count).__name__}); "
            "batch_size_fn must return the batch's number of samples as a non-negative int."
        )
    if counter is len and not isinstance(x, Tensor):
        leaves = tree_flatten((x, target))[0]
        sizes = {t.shape[dim] for t in leaves if isinstance(t, Tensor) and t.ndim > dim}
        if len(sizes) == 1 and sizes.isdisjoint({samples, 1}):
            raise InputError(
                f"batch {index + 1}: batch_size_fn=len counts the {samples} entries of x "
                f"({type(x).__name__}), but every tensor of the batch has {sizes.pop()} "
                f"entries along batch_dim={dim}: the count weighs the batch (n_b / N) and "
                "keys its samples. Return the number of samples (batch_size_fn=lambda x: "
                "len(x[0]) for a tuple of inputs)."
            )
    return samples


def check_target(index: int, x: Any, target: Any, samples: int, dim: int | None) -> None:
    """Refuse a batch whose target has another number of samples than its input.

    Args:
        index: the batch's index in the pass.
        x: its input.
        target: its target.
        samples: the input's sample count along ``dim``.
        dim: the sample dimension (None: nothing to check).

    Raises:
        InputError: naming both counts and shapes (see
            :func:`~deqhess.streaming.fingerprint.unmatched_target` for what is checked).
    """
    got = unmatched_target(x, target, samples, dim)
    if got is not None:
        raise InputError(
            f"batch {index + 1}: x has {samples} samples along batch_dim={dim}, the target "
            f"{got} (shapes {tuple(x.shape)} and {tuple(target.shape)}). Each batch's target "
            "needs one entry per sample of x: take both from the same rows (the same "
            "indices, the same DataLoader batch), or pass batch_dim= for the dimension "
            "that indexes the samples."
        )


def check_unwritten(versions: list[tuple[Tensor, int]], evaluated: str) -> None:
    """Raise :class:`deqhess.ModelChangedError` if ``evaluated`` wrote to the batch."""
    if any(t._version != version for t, version in versions):
        raise ModelChangedError(
            f"{evaluated} wrote to the batch's inputs or targets in place (e.g. x.div_(2) in "
            "forward), so the data differ on every pass and the user's batches were "
            "modified. Compute on a copy (x = x / 2) instead."
        )
