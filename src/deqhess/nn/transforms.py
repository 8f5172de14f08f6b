"""The layer under ``torch.func``: plain values of wrapped tensors, for the layer's checks.

Under a ``torch.func`` transform the tensors the layer sees are wrappers (a
``GradTrackingTensor`` per ``grad`` / ``jvp`` level, a ``BatchedTensor`` per ``vmap``
level), whose values the checks of an eager call cannot read, and whose tracking the
fixed point's own forward (run below the transforms' levels) cannot see. These
functions give the checks plain tensors to work on:

* :func:`plain_value` — the value of a tensor that no ``vmap`` batches, as a plain
  tensor (so a residual can be certified as in an eager call);
* :func:`representative` — a plain tensor of a tensor's logical shape, the first entry
  of every batched level (for an evaluation that only asks *what* the cell reads);
* :func:`tracked` — whether a tensor computed from plain inputs depends on something a
  transform or autograd tracks (or a ``vmap`` batches): then the cell read it besides
  its arguments, and the fixed point's derivatives would leave it out.
"""

from __future__ import annotations

from torch import Tensor
from torch._C import _functorch
from torch.autograd import forward_ad

__all__ = ["plain_value", "representative", "tracked", "under_transform"]


def under_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``jvp``, ``vmap``, …) is active."""
    return _functorch.peek_interpreter_stack() is not None


def plain_value(t: Tensor) -> Tensor | None:
    """``t``'s value as a plain, detached tensor; None where a ``vmap`` level batches it.

    Args:
        t: a tensor, possibly wrapped by ``torch.func`` transforms.

    Returns:
        A plain tensor of ``t``'s shape and values (sharing its storage), or None when
        some level is a ``vmap`` (the value is then one per batch entry, not ``t``'s).
    """
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return None
        t = _functorch.get_unwrapped(t)
    return t.detach()


def representative(t: Tensor) -> Tensor:
    """A plain, detached tensor of ``t``'s logical shape, with values taken from ``t``.

    Its values where no ``vmap`` batches ``t``, else those of the first entry of every
    batched level.

    Args:
        t: a tensor, possibly wrapped by ``torch.func`` transforms.

    Returns:
        A plain tensor shaped like ``t`` (as the code that sees ``t`` sees it).
    """
    while _functorch.is_functorch_wrapped_tensor(t):
        batched = _functorch.is_batchedtensor(t)
        dim = _functorch.maybe_get_bdim(t) if batched else None
        t = _functorch.get_unwrapped(t)
        if dim is not None and dim >= 0:
            t = t.select(dim, 0)
    return t.detach()


def tracked(t: Tensor) -> bool:
    """Whether ``t``, computed from plain inputs, depends on a tracked tensor.

    Every op under a ``grad`` / ``jvp`` level wraps its output at that level, tracked or
    not, so the wrappers are walked level by level: at each, ``t`` is tracked if it
    requires grad (reverse mode) or carries a tangent (forward mode), and it read a
    batched tensor if a ``vmap`` level batches it. (A tangent of an outer ``jvp`` level
    seen only through an inner ``grad`` level is not visible here.)

    Args:
        t: the output of a computation whose inputs were plain and detached
            (:func:`representative`).

    Returns:
        True if ``t`` depends on a tensor that autograd or a transform tracks, or that a
        ``vmap`` batches.
    """
    while True:
        if t.requires_grad or forward_ad.unpack_dual(t).tangent is not None:
            return True
        if not _functorch.is_functorch_wrapped_tensor(t):
            return False
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
