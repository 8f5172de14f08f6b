"""K vector-Jacobian products through one autograd graph: vmapped, batched or looped.

A block of K directions reuses one batch's graph (one forward, so one fixed-point solve
per DEQ layer). Three ways to push K cotangents through it:

* ``"vmap"`` — ``torch.func.vmap`` over ``torch.autograd.grad``: a DEQ layer's own vmap
  rule solves the K systems at once, whatever its linear solver. Measured on one batch
  of 60 digits through ``Linear → DEQ(tanh, n = 32) → Linear`` (float32, one thread):
  10 ms for K = 8 and 13 ms for K = 32, against 20 ms and 63 ms looped
  (``python benchmarks/dataset_scale.py --sections backward``);
* ``"batched"`` — ``torch.autograd.grad(..., is_grads_batched=True)``, autograd's own
  batching: it cannot batch the data-dependent checks inside a DEQ layer's solves and
  raises there, but serves models it can batch;
* ``"loop"`` — K backwards with ``retain_graph``.

``"auto"`` tries them in that order and keeps the first that works for the model —
and whose first block agrees with a plain backward of a random combination of its
cotangents (a wrong batching rule in torch, ``torch.cdist``'s backward under ``vmap``,
made a model's GGN 10% off). A genuine error (the model's, or a deqhess error) still
surfaces: from the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import DeqhessError, InputError, UnsupportedDerivativeError
from ..linear.batched import BATCHING_TOLERANCE, combination_weights, disagreement

__all__ = ["BACKWARD_MODES", "BlockBackward", "reentrant_checkpoint_named"]

BACKWARD_MODES = ("vmap", "batched", "loop")

#: torch's message for a reentrant checkpoint met by ``torch.autograd.grad``
_REENTRANT_CHECKPOINT = "torch.utils.checkpoint is incompatible with .grad()"


@contextlib.contextmanager
def reentrant_checkpoint_named() -> Iterator[None]:
    """Name ``torch.utils.checkpoint(..., use_reentrant=True)`` where a backward meets it.

    Its backward cannot be taken by ``torch.autograd.grad``, which every derivative of a
    model's curvature is (the passes of :class:`deqhess.ModelCurvature` run inside).

    Yields:
        Nothing: the block that takes gradients through the model's graph.

    Raises:
        UnsupportedDerivativeError: the block met a reentrant checkpoint; the message
            names the variant that works.
        RuntimeError: any other error of the block, as it was.
    """
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, DeqhessError) or _REENTRANT_CHECKPOINT not in str(error):
            raise
        raise UnsupportedDerivativeError(
            "the model runs torch.utils.checkpoint(..., use_reentrant=True), whose backward "
            "torch.autograd.grad cannot take — and every derivative here is one (on an input "
            "without grad it even leaves the segment's parameters with no derivative at "
            "all, with only torch's warning). Pass use_reentrant=False (torch's recommended "
            "variant): its derivatives are exact here, to every order."
        ) from error


class BlockBackward:
    """``Σ_outputs cₖ · ∂output/∂input`` for K cotangents ``cₖ`` through one graph.

    Args:
        mode: ``"auto"`` or one of :data:`BACKWARD_MODES`.

    Raises:
        InputError: ``mode`` is none of these.
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode != "auto" and mode not in BACKWARD_MODES:
            raise InputError(
                f"unknown backward mode {mode!r}; use 'auto' or one of {list(BACKWARD_MODES)}."
            )
        self.mode = mode
        self._tried = 0  # with "auto": the modes before this one failed on this model
        # with "auto": the kinds of block whose batched products agreed with a plain one
        self._checked: set[tuple] = set()

    @property
    def working(self) -> str:
        """The mode in use: the one chosen, or the first that worked so far."""
        return self.mode if self.mode != "auto" else BACKWARD_MODES[self._tried]

    def __call__(
        self, outputs: Sequence[Tensor], inputs: Sequence[Any], cotangents: Sequence[Tensor]
    ) -> list[Tensor]:
        """The K vector-Jacobian products of a block, ``Σ_o cₖ(o) · ∂o/∂input``.

        Args:
            outputs: tensors of one graph.
            inputs: tensors of that graph to differentiate in.
            cotangents: one ``[K, *output.shape]`` per output, ``cₖ(o)`` in row ``k``.

        Returns:
            One ``[K, *input.shape]`` per input. Outputs that do not depend on any input
            (constant gradients) contribute zero; an input no output depends on gets
            zeros. An input may be a :class:`torch.autograd.graph.GradientEdge` (the
            gradient reaching an operation's output), which the outputs must reach (None
            where none of them depends on anything).

        Raises:
            UnsupportedDerivativeError: a batching mode chosen by name (not ``"auto"``)
                gives other products than a plain backward on this model.
        """
        count = cotangents[0].shape[0]
        pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
        if not pairs:
            return [_no_gradient(t, count) for t in inputs]
        outs, cots = zip(*pairs, strict=True)
        if count == 1:
            grads = _looped(outs, inputs, cots)
        elif self.mode != "auto":
            grads = _MODES[self.mode](outs, inputs, cots)
            kind = _kind(outs, inputs)
            if self.mode != "loop" and kind not in self._checked:
                if not _agrees(outs, inputs, cots, grads):
                    raise UnsupportedDerivativeError(
                        f"backward={self.mode!r} gives other products than a plain backward "
                        "on this model: a wrong batching rule in torch for an operation in "
                        "it (torch.cdist's backward under vmap is one, in torch 2.13). Pass "
                        "backward='loop' (or 'auto', which switches to it by itself)."
                    )
                self._checked.add(kind)
        else:
            grads = self._first_that_works(outs, inputs, cots)
        pairs_out = zip(grads, inputs, strict=True)
        return [_no_gradient(t, count) if g is None else g for g, t in pairs_out]

    def _first_that_works(
        self, outs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor]
    ) -> list[Tensor | None]:
        while BACKWARD_MODES[self._tried] != "loop":
            try:
                grads = _MODES[BACKWARD_MODES[self._tried]](outs, inputs, cots)
            except RuntimeError as error:
                # deqhess's answers about the problem itself: no other way of batching
                # would change them (an unsupported mode is about the way: try the next)
                if isinstance(error, DeqhessError) and not isinstance(
                    error, UnsupportedDerivativeError
                ):
                    raise
                self._tried += 1
                continue
            # checked once per kind of block (the loss alone, the model's rows, a
            # second-order pass): each goes through other operations
            kind = _kind(outs, inputs)
            if kind in self._checked or _agrees(outs, inputs, cots, grads):
                self._checked.add(kind)
                return grads
            self._tried += 1  # a wrong batching rule in torch (cdist's backward): the next
        return _looped(outs, inputs, cots)


def _no_gradient(input: Any, count: int) -> Any:
    """``count`` zero gradients for a tensor input no output depends on (None for an edge)."""
    return input.new_zeros((count, *input.shape)) if isinstance(input, Tensor) else None


def _kind(outs: Sequence[Tensor], inputs: Sequence[Any]) -> tuple:
    """A block's kind for the batching check: its outputs' and inputs' shapes.

    Returns:
        The outputs' shapes and the inputs' (a :class:`torch.autograd.graph.GradientEdge`,
        the gradient reaching an operation's output, by its operation's name).
    """
    shapes = tuple(i.shape if isinstance(i, Tensor) else type(i.node).__name__ for i in inputs)
    return tuple(o.shape for o in outs), shapes


def _agrees(
    outs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor],
    grads: Sequence[Tensor | None],
) -> bool:  # fmt: skip
    """Whether batched products agree with one plain backward of a random combination.

    The products are linear in the cotangents, so a random combination of them must be
    the backward of the same combination (:mod:`deqhess.linear.batched`'s test, here for
    a block through a whole model's graph: torch 2.13's vmap of ``torch.cdist``'s
    backward in a model's head gave every direction the first one's gradient).

    Returns:
        True where they agree to :data:`deqhess.linear.batched.BATCHING_TOLERANCE` (or
        the block has one direction, or runs under a ``torch.func`` transform).
    """
    count = cots[0].shape[0]
    if count < 2 or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    weights = combination_weights(count)
    combined = [torch.tensordot(weights.to(c), c, dims=1) for c in cots]
    plain = torch.autograd.grad(outs, inputs, combined, retain_graph=True, allow_unused=True)
    present = [(g, p) for g, p in zip(grads, plain, strict=True) if g is not None]
    if any(p is not None and bool(p.any()) for g, p in zip(grads, plain, strict=True) if g is None):
        return False
    if not present:
        return True
    gaps, scale = disagreement(weights, [g for g, _ in present], [p for _, p in present])
    tolerance = BATCHING_TOLERANCE.get(present[-1][0].dtype, 1e-3)
    # against the block's largest terms: an input whose gradient cancels to rounding
    # (a sum of centred inputs, 1e-17) differs between the two by its own size
    return all(gap <= tolerance * scale for gap in gaps)


def _batched(
    outs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor]
) -> list[Tensor | None]:
    return list(
        torch.autograd.grad(
            outs, inputs, cots, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    )


def _vmapped(
    outs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor]
) -> list[Tensor | None]:
    def one(*cotangent: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            outs, inputs, cotangent, retain_graph=True, allow_unused=True,
            materialize_grads=True,
        )  # fmt: skip

    return list(torch.func.vmap(one)(*cots))


def _looped(
    outs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor]
) -> list[Tensor | None]:
    options = dict(retain_graph=True, allow_unused=True, materialize_grads=True)
    rows = [
        torch.autograd.grad(outs, inputs, [c[k] for c in cots], **options)
        for k in range(cots[0].shape[0])
    ]
    return [torch.stack(column) for column in zip(*rows, strict=True)]


_MODES = {"batched": _batched, "vmap": _vmapped, "loop": _looped}
