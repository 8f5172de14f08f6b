"""One batch's forward through a model, and exact curvature products taken from its graph.

A model's DEQ layers (:class:`deqhess.nn.DEQ`) are differentiable to every order, so
second derivatives of the whole model go through plain autograd: the batch's forward
is run once (each DEQ solves its fixed point once) and the K directions of a block go
together through the graph it leaves. With θ the
chosen parameters, ``o`` the model's output and ``ℓ(o)`` the weighted batch loss:

* ``total`` — the Hessian ``∇²_θ ℓ``: a backward of ``∇_θ ℓ`` (built with
  ``create_graph``) along each direction;
* ``ggn`` — the generalised Gauss–Newton matrix ``Jᵀ ∇²_o ℓ J`` at the output,
  ``J = ∂o/∂θ`` (positive semi-definite for a convex ℓ): ``J V`` by the double-backward
  trick (``Jᵀu`` is linear in ``u``; its VJP along ``V`` is ``J V``), ``∇²_o ℓ`` by a
  backward of ``∇_o ℓ``, ``Jᵀ`` by a backward of ``o``;
* ``loss_curvature`` / ``dynamics_curvature`` — the split of the Hessian at one DEQ
  layer's fixed point ``h*``: with ``L(h, θ)`` the loss as a function of that layer's
  output (everything after it) and ``Z = dh*/dθ`` (everything before it and the cell),
  ``[I; Z]ᵀ ∇²L [I; Z]`` and ``Σᵢ (∂L/∂h)ᵢ ∇²_θ h*ᵢ`` (``= [I; Z]ᵀ∇²(λᵀf)[I; Z]`` with
  ``f`` the cell fed by the encoder). The forward substitutes a leaf for ``h*`` after
  the layer (a forward hook held only during that forward), so ``L`` can be
  differentiated in ``h`` alone.

How the K directions go through the graph is :class:`deqhess.models.backward.BlockBackward`'s
choice (vmapped, batched or looped).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..callers import user_stacklevel
from ..errors import DeqhessError, InputError, UnsupportedDerivativeError
from ..nn.reparametrize import functional_call
from ..parameters import ParameterLayout
from .backward import BlockBackward

__all__ = [
    "BatchGraph",
    "graph_nodes",
    "leaves_reached",
    "missing_derivatives_named",
    "one_hot_pieces",
    "one_hot_rows",
]

LossFunc = Callable[[Tensor, Any], Tensor]


def _first_grads(value: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``∇ value`` in ``inputs`` with a graph, for second derivatives (zeros where unused)."""
    return torch.autograd.grad(
        value, inputs, create_graph=True, allow_unused=True, materialize_grads=True
    )


def _directional(
    backward: BlockBackward,
    outputs: Sequence[Tensor],
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
) -> list[Tensor]:
    """The directional derivatives ``J V`` of each output, ``J = ∂output/∂θ``.

    By double backward: ``Jᵀu`` is linear in a probe ``u``, so its VJP along ``V`` is
    ``J V`` — K backwards through the graph of ``Jᵀu``, no forward-mode AD.

    Args:
        backward: how the K directions go through the graph.
        outputs: tensors of the batch's graph.
        params: the chosen parameters' leaves.
        directions: one ``[K, *param.shape]`` per parameter, ``V``'s rows.

    Returns:
        One ``[K, *output.shape]`` per output (zeros for an output that does not depend
        on the parameters).
    """
    count = directions[0].shape[0]
    live = [o for o in outputs if o.requires_grad]
    if not live:
        return [o.new_zeros((count, *o.shape)) for o in outputs]
    probes = [torch.zeros_like(o, requires_grad=True) for o in live]
    transposed = torch.autograd.grad(
        live, params, probes, create_graph=True, allow_unused=True, materialize_grads=True
    )
    found = iter(backward(transposed, probes, directions))
    return [next(found) if o.requires_grad else o.new_zeros((count, *o.shape)) for o in outputs]


def _output_leaves(output: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The floating tensors of a model's output, where the GGN's ``∇²_o ℓ`` is taken.

    Other leaves (an ``argmax`` beside the logits, a count) do not depend on θ
    differentiably: they stay as they are, constants of the loss.

    Args:
        output: a tensor, or a tuple / list / dict of them (and other values).

    Returns:
        The floating tensors in ``tree_flatten``'s order, and ``rebuild``: new values of
        them ↦ the output with them in their places.

    Raises:
        InputError: the output holds no floating tensor.
    """
    leaves, spec = tree_flatten(output)
    where = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point()]
    if not where:
        kinds = sorted({f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
                        for t in leaves})  # fmt: skip
        raise InputError(
            "the GGN Jᵀ∇²ℓJ is taken at the model's output, which must hold a floating "
            "tensor (alone or in a tuple / list / dict); got "
            f"{type(output).__name__}{f' holding {kinds}' if kinds else ''}. Use the "
            "'total' Hessian, or return the tensors the loss is convex in."
        )

    def rebuild(values: list[Tensor]) -> Any:
        new = list(leaves)
        for i, value in zip(where, values, strict=True):
            new[i] = value
        return tree_unflatten(new, spec)

    return [leaves[i] for i in where], rebuild


#: torch's message for an operation it cannot differentiate (again)
_NOT_DIFFERENTIABLE = re.compile(r"derivative for (\S+) is not implemented")


@contextlib.contextmanager
def missing_derivatives_named() -> Iterator[None]:
    """Name an operation torch cannot differentiate twice, where second derivatives need it.

    Yields:
        Nothing: the block whose second derivatives may meet such an operation.

    Raises:
        UnsupportedDerivativeError: torch has no derivative of an operation of the
            model's backward (e.g. CPU flash attention's): its name, and the way around.
        RuntimeError: any other error of the block, as it was.
    """
    try:
        yield
    except RuntimeError as error:
        found = _NOT_DIFFERENTIABLE.search(str(error))
        if found is None or isinstance(error, DeqhessError):
            raise
        operation = found.group(1)
        way = (
            "Attention has a kernel torch differentiates twice: run the analysis inside "
            "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):`."
            if "attention" in operation
            else "Compute that step of the model with operations torch differentiates twice "
            "for the analysis, or use the dense GGN from output Jacobians (first "
            "derivatives only: ggn_operator().to_dense() where a batch's output has fewer "
            "numbers than P)."
        )
        raise UnsupportedDerivativeError(
            f"torch has no derivative of {operation}, which the model's backward runs: "
            "second derivatives (Hessian and GGN products, which differentiate the "
            f"backward again) cannot go through it. {way}"
        ) from error


def graph_nodes(starts: Iterable[Any]) -> Iterator[Any]:
    """Every autograd node a backward from ``starts`` would run, each once.

    Args:
        starts: autograd nodes (``tensor.grad_fn``; None is skipped).

    Yields:
        The nodes, depth first.
    """
    nodes: list[Any] = list(starts)
    seen: set[int] = set()
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        nodes.extend(next_node for next_node, _ in node.next_functions)


def leaves_reached(value: Tensor | Any) -> list[Tensor]:
    """The leaf tensors a graph accumulates gradients into.

    Args:
        value: a tensor of a graph, or an autograd node.

    Returns:
        Every leaf with ``requires_grad`` that a backward from ``value`` would reach.
    """
    start = value.grad_fn if isinstance(value, Tensor) else value
    variables = (getattr(node, "variable", None) for node in graph_nodes([start]))
    return [v for v in variables if isinstance(v, Tensor)]  # AccumulateGrad nodes'


def _taken(node: Any, index: dict[int, int]) -> Iterator[int]:
    """The chosen parameters an operation's input ``node`` is, or passes through views.

    Follows nodes of one input (a transpose, a view, an expand) down to a leaf.

    Args:
        node: an input node of an operation (``next_functions`` entry).
        index: ``id(parameter)`` → its position in the layout.

    Yields:
        The position of the parameter reached, if one is.
    """
    for _ in range(_VIEW_DEPTH):
        if node is None:
            return
        found = index.get(id(getattr(node, "variable", None)))
        if found is not None:
            yield found
            return
        inputs = [child for child, _ in node.next_functions if child is not None]
        if len(inputs) != 1:
            return
        node = inputs[0]


#: nodes of one input followed from an operation to a parameter (``W.T``, ``b.view(1, -1)``)
_VIEW_DEPTH = 4


def one_hot_rows(start: int, stop: int, width: int, like: Tensor) -> Tensor:
    """Rows ``[start, stop)`` of the ``width × width`` identity, as ``like``'s dtype and device."""
    rows = torch.zeros(stop - start, width, dtype=like.dtype, device=like.device)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return rows


def one_hot_pieces(layout: ParameterLayout, start: int, stop: int, like: Tensor) -> list[Tensor]:
    """Rows ``[start, stop)`` of the ``P × P`` identity, cut into their parameters.

    Args:
        layout: the parameters' layout.
        start: the first row.
        stop: one past the last.
        like: a tensor of the rows' dtype and device.

    Returns:
        One ``[stop − start, *shape]`` per parameter the rows fall in, first to last.
    """
    offsets, count = layout.offsets, stop - start
    first = bisect.bisect_right(offsets, start) - 1
    last = bisect.bisect_right(offsets, stop - 1) - 1
    pieces = []
    for i in range(first, last + 1):
        piece = like.new_zeros(count, layout.numels[i])
        here = torch.arange(max(start, offsets[i]), min(stop, offsets[i + 1]))
        piece[here - start, here - offsets[i]] = 1
        pieces.append(piece.reshape(count, *layout.shapes[i]))
    return pieces


class BatchGraph:
    """The graph of one batch's weighted loss through the model, for one operator part.

    Args:
        model: the ``nn.Module``.
        loss_func: ``loss_func(output, target)`` → a 0-dim tensor.
        layout: the chosen parameters' layout (names of ``model``'s parameters).
        params: leaf tensors standing for those parameters (``requires_grad``).
        x, target: the batch.
        weight: the batch's weight in the data-set sum.
        part: one of ``total``, ``ggn``, ``loss_curvature``, ``dynamics_curvature``, or
            None (the loss only, for its gradient).
        split_at: the DEQ layer whose fixed point splits the Hessian (split parts only).
        backward: how K directions go through the graph (default ``"auto"``).
        samples: the batch's sample count ``n_b`` as the data-set sums count it (the
            rows of its per-sample quantities; the width that sizes its blocks of
            directions). Default 1.

    Attributes:
        output: the model's output on ``x`` (its graph back to ``params``).
        loss: the weighted loss ``weight · loss_func(output, target)``, with a graph.
        params: ``params``' tensors in the layout's order.
        samples: as given.

    Raises:
        InputError: the loss is not a 0-dim floating tensor; a split part without
            ``split_at``, or a ``split_at`` not called exactly once in the forward or
            returning a non-tensor; for ``ggn``, an output that is not floating tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: LossFunc,
        layout: ParameterLayout,
        params: dict[str, Tensor],
        x: Any,
        target: Any,
        weight: float,
        part: str | None,
        split_at: nn.Module | None = None,
        backward: BlockBackward | None = None,
        *,
        samples: int = 1,
    ) -> None:
        self.layout, self.part = layout, part
        self.backward = backward or BlockBackward()
        self.params = layout.tensors(params)
        self.split_at = split_at
        self.samples = samples
        with torch.enable_grad():
            if part in ("loss_curvature", "dynamics_curvature"):
                if split_at is None:
                    raise InputError(
                        f"the {part!r} part splits the Hessian at a DEQ layer's fixed point; "
                        "pass split_at=<the deqhess.nn.DEQ layer of the model>."
                    )
                output, (self.state, self.leaf) = self._forward_split(model, params, x, split_at)
            else:
                output = functional_call(model, params, (x,), watch_rebinds=True)
            self.output = output
            self.loss_func, self.target, self.weight = loss_func, target, weight
            self.loss = self._loss(output)
            self._prepare()

    def _loss(self, output: Any) -> Tensor:
        """``weight · loss_func(output, target)``, checked."""
        return self.weight * self._loss_of(output, self.target)

    def _loss_of(self, output: Any, target: Any) -> Tensor:
        """``loss_func(output, target)``, checked to be a 0-dim floating tensor.

        Args:
            output: the model's output (or a sample's rows of it).
            target: the batch's target (or a sample's rows of it).

        Returns:
            The loss, unweighted, with its graph.

        A loss with no graph (constant on this batch, or detached from the output — then
        with a ``RuntimeWarning``) has zero derivatives, returned as such.

        Raises:
            InputError: the loss is not a 0-dim floating tensor.
        """
        value = self.loss_func(output, target)
        if not isinstance(value, Tensor) or value.ndim != 0 or not value.is_floating_point():
            got = (
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            way = (
                "Compute it with floating operations (a count or a comparison has no derivative)."
                if isinstance(value, Tensor) and value.ndim == 0
                else "Reduce it, e.g. nn.MSELoss(reduction='mean')."
            )
            raise InputError(
                f"loss(output, target) must return a 0-dim floating tensor; got {got}. {way}"
            )
        if torch.is_grad_enabled() and not value.requires_grad:
            if any(t.requires_grad for t in tree_flatten(output)[0] if isinstance(t, Tensor)):
                warnings.warn(
                    "loss(output, target) returned a tensor with no graph back to the model's "
                    "output on a batch, so its derivatives there are zero: if that is not by "
                    "design (a constant loss), the loss detached it (.detach(), .item(), "
                    "NumPy or torch.no_grad() inside it); compute it from the output with "
                    "differentiable torch operations.",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            # zero derivatives, exactly, as a graph the products can differentiate
            zero = sum(0.0 * p.reshape(-1)[:1].sum() for p in self.params)
            value = value + torch.as_tensor(zero).to(value)
        return value

    def _forward_split(
        self, model: nn.Module, params: dict[str, Tensor], x: Any, split_at: nn.Module
    ) -> tuple[Any, tuple[Tensor, Tensor]]:
        """The forward with a leaf ``h`` substituted for ``split_at``'s fixed point ``h*``.

        Args:
            model: the model.
            params: the chosen parameters' leaves, by name.
            x: the batch's input.
            split_at: the DEQ layer whose output is substituted.

        Returns:
            The model's output (a function of ``h`` after the layer), and ``(h*, h)``:
            the layer's output with its graph back to θ, and the leaf standing for it.

        Raises:
            InputError: the layer returned a non-tensor, or ran other than once.
        """
        captured: list[tuple[Tensor, Tensor]] = []

        def substitute(module: nn.Module, inputs: Any, output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise InputError(
                    f"the split layer returned {type(output).__name__}; the loss/dynamics "
                    "split needs the fixed point as a tensor (call the layer as deq(x) inside "
                    "the model, not deq.solve(x) or with return_info)."
                )
            leaf = output.detach().requires_grad_()
            captured.append((output, leaf))
            return leaf

        handle = split_at.register_forward_hook(substitute)
        try:
            output = functional_call(model, params, (x,), watch_rebinds=True)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise InputError(
                f"the split layer {type(split_at).__name__} ran {len(captured)} times "
                "in one forward; the loss/dynamics split is defined at a fixed point computed "
                "once per forward (choose another split_at, or use 'total' or 'ggn')."
            )
        return output, captured[0]

    def _prepare(self) -> None:
        """The first-order graphs the part's products differentiate again."""
        if self.part is None:
            return
        if self.part == "total":
            self.first = _first_grads(self.loss, self.params)
        elif self.part == "ggn":
            self.outputs, rebuild = _output_leaves(self.output)
            self.out_leaves = [o.detach().requires_grad_() for o in self.outputs]
            self.out_grad = _first_grads(self._loss(rebuild(self.out_leaves)), self.out_leaves)
        elif self.part == "loss_curvature":
            self.first = _first_grads(self.loss, [*self.params, self.leaf])
        else:  # dynamics curvature: Σ (∂L/∂h)ᵢ ∇²h*ᵢ, the second derivatives of ⟨ḡ, h*(θ)⟩
            (state_grad,) = torch.autograd.grad(self.loss, self.leaf, retain_graph=True)
            self.first = _first_grads((state_grad.detach() * self.state).sum(), self.params)

    def roots(self) -> list[Tensor]:
        """The tensors this graph keeps for its products (their graphs lead back to θ).

        Returns:
            The loss, the output's tensors and the first-order quantities the part's
            products differentiate again.
        """
        found: list[Any] = [self.loss, *tree_flatten(self.output)[0]]
        for name in ("first", "outputs", "out_leaves", "out_grad", "state", "leaf"):
            value = getattr(self, name, ())
            found.extend(value if isinstance(value, (tuple, list)) else (value,))
        return [t for t in found if isinstance(t, Tensor)]

    def parameter_runs(self) -> list[int]:
        """Where the runs of parameters that the backward reaches together end.

        Parameters ``i`` and ``i + 1`` (in the layout's order) are in one run when one
        operation of the batch's graph takes both as inputs (directly, or through a
        transpose or view: a linear layer's weight and bias, a DEQ layer's cell
        parameters, all arguments of its fixed point). A backward that reaches one
        reaches the other at the same node, so a small one's rows (a bias's) share the
        other's block of a dense form for a few columns more (:meth:`upper_rows` starts
        a block's columns at its first parameter; see
        :func:`deqhess.models.dense.batch_dense`).

        Returns:
            The runs' ends in the flat layout, increasing; the last is ``P``.
        """
        index = {id(p): i for i, p in enumerate(self.params)}
        count = len(self.params)
        together = [False] * max(count - 1, 0)  # parameters i and i + 1 share an operation
        for node in graph_nodes([self.loss.grad_fn]):
            taken = sorted({i for child, _ in node.next_functions for i in _taken(child, index)})
            for a, b in itertools.pairwise(taken):
                if b == a + 1:
                    together[a] = True
        offsets = self.layout.offsets
        return [offsets[i + 1] for i in range(count) if i == count - 1 or not together[i]]

    def upper_rows(self, start: int, stop: int) -> tuple[int, Tensor]:
        """Rows ``[start, stop)`` of the part's matrix from their first parameter's column on.

        ``C`` (the part's ``[P, P]`` matrix) is symmetric, so the rows of a dense form are
        needed only on and above the diagonal, in blocks: from the parameter of its first
        row on (``column``). For the
        Hessian and the dynamics curvature (``C vₖ`` a backward of the first-order
        gradients along ``vₖ``), that backward starts at the gradients of the rows'
        parameters alone and ends at ``column``'s parameter and those after it: a
        parameter late in the forward (a head) is a short backward (measured on one
        batch of ``benchmarks/vs_curvlinops.py``'s models: 0.23 → 0.14 s for the tanh
        classifier, 28 → 3.7 s for the conv one, whose head holds 1,440 of its 1,888
        parameters). The other parts take whole rows and keep those columns.

        Args:
            start: the first row.
            stop: one past the last (``start < stop ≤ P``).

        Returns:
            ``(column, rows)``: ``rows`` ``[stop − start, P − column]`` holds
            ``C[start:stop, column:]``, detached.
        """
        offsets = self.layout.offsets
        first = bisect.bisect_right(offsets, start) - 1  # the parameter holding row `start`
        last = bisect.bisect_right(offsets, stop - 1) - 1
        column = offsets[first]
        like = self.params[0]
        count = stop - start
        if self.part not in ("total", "dynamics_curvature"):
            rows = self.products(one_hot_rows(start, stop, self.layout.size, like))
            return column, rows[:, column:]
        directions = one_hot_pieces(self.layout, start, stop, like)
        with torch.enable_grad(), missing_derivatives_named():
            out = self.backward(self.first[first : last + 1], self.params[first:], directions)
        return column, torch.cat([g.reshape(count, -1) for g in out], dim=1).detach()

    def products(self, v: Tensor) -> Tensor:
        """The batch's products ``(C Vᵀ)ᵀ`` with K directions, ``C`` this graph's part.

        Args:
            v: ``[K, P]``, one flat direction per row (the layout's order).

        Returns:
            ``[K, P]``: row ``k`` is ``C vₖ`` (``C`` symmetric), detached.
        """
        directions = list(self.layout.tensors(self.layout.unflatten(v)))
        backward = self.backward
        with torch.enable_grad(), missing_derivatives_named():
            if self.part in ("total", "dynamics_curvature"):
                out = backward(self.first, self.params, directions)
            elif self.part == "ggn":
                jv = _directional(backward, self.outputs, self.params, directions)
                hjv = backward(self.out_grad, self.out_leaves, jv)
                out = backward(self.outputs, self.params, hjv)
            else:  # [I; Z]ᵀ ∇²L [I; Z]
                (zv,) = _directional(backward, [self.state], self.params, directions)
                *g_theta, g_h = backward(self.first, [*self.params, self.leaf], [*directions, zv])
                back = backward([self.state], self.params, [g_h])
                out = [a + b for a, b in zip(g_theta, back, strict=True)]
        return torch.cat([g.reshape(v.shape[0], -1) for g in out], dim=1).detach()
