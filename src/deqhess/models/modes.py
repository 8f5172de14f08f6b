"""Checks that a model is one fixed function on every pass, and that a pass left it so.

Every product of a data-set curvature reruns the model on every batch. That defines one
linear operator only if the model is one fixed function: no module that draws random
numbers or uses (and updates) batch statistics in its current mode (:func:`check_modes`,
naming each such module), and nothing in the forward that writes the model's parameters
or buffers (:class:`StateGuard`, checked after each pass). deqhess never switches the user's
modules to ``eval()`` itself: that would change the model it was given.
:func:`check_parameters_read` checks, on the first pass, that the loss reads the chosen
parameters only through the model's forward (where the derivatives are taken).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import InputError, ModelChangedError, UnsupportedDerivativeError
from ..nn.contract import check_parametrize_cache, training_hazard
from ..nn.reparametrize import Rebind, rebinds_recorded, same_bits
from ..nn.second_order import wrong_double_backward
from ..streaming.fingerprint import tensor_digests
from .graph import graph_nodes, leaves_reached

__all__ = [
    "StateGuard",
    "check_modes",
    "check_parameters_read",
    "check_second_order",
    "check_second_order_graph",
]

#: the autograd node of ``torch._weight_norm`` along a dimension, whose double backward
#: torch 2.13 computes wrongly (``dim=None`` runs other operations: exact)
_WRONG_DOUBLE_BACKWARD = "WeightNormInterfaceBackward0"


def check_modes(model: nn.Module, label: str) -> None:
    """Refuse a model holding modules that are another function on every call.

    Args:
        model: the user's model, in whatever modes its modules are.
        label: who asks (e.g. ``"ModelCurvature"``), for the message.

    Parametrised modules inside ``parametrize.cached()`` are refused too
    (:func:`deqhess.nn.contract.check_parametrize_cache`).

    Raises:
        InputError: naming each such module (dropout, batch norm, … in training mode)
            and saying to call ``model.eval()`` first.
    """
    check_parametrize_cache(model, "model")
    hazards = [
        (f"model.{name}" if name else "the model", reason)
        for name, module in model.named_modules()
        if (reason := training_hazard(module)) is not None
    ]
    if not hazards:
        return
    listed = "; ".join(f"{name} is {reason}" for name, reason in hazards[:4])
    more = f" (and {len(hazards) - 4} more)" if len(hazards) > 4 else ""
    raise InputError(
        f"{label} reruns the model on every pass and needs it to be the same function each "
        f"time, but {listed}{more}. Call model.eval() before the analysis (and model.train() "
        "after it, to resume training); deqhess does not switch modes itself, since that "
        "would change your model."
    )


def check_parameters_read(model: nn.Module, names: Sequence[str], loss: Tensor) -> None:
    """Refuse a loss (or model) that reads a chosen parameter itself.

    A pass evaluates the model with each chosen parameter replaced by a leaf of its own
    (the derivatives are taken in those); a loss that reads ``model.p`` from a closure,
    or a module holding another's parameter as a plain attribute, reads the parameter
    itself, whose part of the derivatives would be missing (zero).

    Args:
        model: the user's model.
        names: the chosen parameters' names.
        loss: a batch's loss, with its graph.

    Raises:
        InputError: naming the parameters read so.
    """
    real = dict(model.named_parameters())
    reached = {id(t) for t in leaves_reached(loss)}
    read = [n for n in names if id(real[n]) in reached]
    if read:
        raise InputError(
            f"the loss (or the model's forward) reads the parameters {read[:4]} "
            "themselves, not through the model's forward call: the derivatives are taken "
            "in the parameters as the forward sees them, so those terms would be missing "
            "(zero) from the gradient and the curvature. Compute the term in the model's "
            "forward (return it with the output, e.g. as a tuple the loss takes apart), "
            "not from a closure over model.<name>."
        )


def check_second_order(model: nn.Module, what: str, chosen: Sequence[str]) -> None:
    """Refuse second derivatives through modules whose double backward torch gets wrong.

    That is weight normalisation along a dimension (``torch._weight_norm`` with
    ``dim`` ≠ None, by the old ``weight_norm`` hook or the parametrisation), whose
    double-backward formula in torch 2.13 gives a Hessian 30–35% off finite differences
    of its exact gradient; ``dim=None`` and a hand-written ``g · v / ‖v‖`` are exact.
    Only where its ``v`` is among the chosen parameters: the wrong blocks are the
    derivatives in ``v`` of the gradient (in ``v`` and in ``g``); with ``v`` frozen (or a
    frozen, pretrained layer) the second derivatives in ``g`` and the rest are exact.

    Args:
        model: the user's model.
        what: what needs the second derivatives (e.g. ``"the 'total' operator"``), for
            the message.
        chosen: the names of the chosen parameters (``model.named_parameters()``'s).

    Raises:
        UnsupportedDerivativeError: naming the modules, the exact alternatives (the
            GGN; a hand-written weight norm, or ``dim=None``).
    """
    names = set(chosen)
    found = [
        f"model.{n}" if n else "the model"
        for n, (_, v) in wrong_double_backward(model).items()
        if v in names
    ]
    if found:
        raise UnsupportedDerivativeError(_weight_norm_message(what, found))


def check_second_order_graph(
    roots: Sequence[Tensor], params: Sequence[Tensor], names: Sequence[str], what: str
) -> None:
    """Refuse second derivatives through a ``torch._weight_norm`` the graph shows.

    :func:`check_second_order` finds the weight normalisations a model's modules declare
    (the hook, the parametrisation); a forward that calls ``torch._weight_norm`` itself,
    in the model or inside a DEQ cell, shows only in the graph (its Hessian was 5% off,
    silently). Checked on a batch's first-order graph: the operation's node, and a chosen
    parameter below its ``v`` (derivatives in ``v`` are the wrong ones).

    Args:
        roots: the first-order quantities the second derivatives differentiate.
        params: the chosen parameters' leaves in that graph.
        names: their names.
        what: what needs the second derivatives, for the message.

    Raises:
        UnsupportedDerivativeError: such a node reaches a chosen parameter (named).
    """
    chosen = {id(p): name for p, name in zip(params, names, strict=True)}
    found: list[str] = []
    for node in graph_nodes(r.grad_fn for r in roots):
        if type(node).__name__ == _WRONG_DOUBLE_BACKWARD:  # its inputs: (v, g)
            v_path = node.next_functions[0][0]
            reached = leaves_reached(v_path) if v_path is not None else []
            found += [chosen[id(t)] for t in reached if id(t) in chosen]
    if found:
        labels = [f"torch._weight_norm of model.{n}" for n in dict.fromkeys(found)]
        raise UnsupportedDerivativeError(_weight_norm_message(what, labels))


def _weight_norm_message(what: str, found: list[str]) -> str:
    return (
        f"{what} needs second derivatives through weight normalisation along a dimension "
        f"({found[:4]}{' …' if len(found) > 4 else ''}), whose double backward torch "
        "computes wrongly (its Hessian was 30–35% off finite differences of the exact "
        "gradient). The gradient and the GGN (hessian_operator('ggn')) are exact; for "
        "the Hessian, write the weight norm by hand (w = g * v / v.norm(dim=1, "
        "keepdim=True)), which is exact, or use weight_norm(..., dim=None)."
    )


class StateGuard:
    """The model's parameters and buffers as they were when the guard was made.

    :meth:`check` tells whether a forward since then wrote any of them — in place (a
    tensor's version moved, or, for a write through ``.data`` that versions do not see,
    its bits differ from the guard's copy), or by rebinding (another tensor under the
    name, also one that :func:`~deqhess.nn.reparametrize.functional_call` put back
    after the call, seen while :meth:`watching`) — and puts back what it wrote first:
    the guard keeps a copy of every parameter's and buffer's values (one copy of the
    model's state, for the length of a pass; one bitwise comparison per check).

    Args:
        model: the model to watch.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state = self._read(model)
        with torch.no_grad():
            self._values = {name: t.detach().clone() for name, (t, _) in self._state.items()}
        self._kinds = {name: kind for name, kind in self._named(model)}
        self._rebound: list[Rebind] = []

    @classmethod
    def snapshot(cls, model: nn.Module) -> tuple[tuple[str, int, int, int], ...]:
        """A comparable token of the model's parameters and buffers.

        Args:
            model: the model to read.

        Returns:
            ``(name, id, version, digest)`` of each parameter and buffer: equal tokens
            mean nothing was written in between — the digest of its bytes
            (:func:`~deqhess.streaming.fingerprint.tensor_digests`) sees what the
            version does not, a write through ``.data``.
        """
        state = cls._read(model)
        digests = tensor_digests([t for t, _ in state.values()])
        return tuple(
            (n, id(t), v, d) for (n, (t, v)), d in zip(state.items(), digests, strict=True)
        )

    @staticmethod
    def _named(model: nn.Module) -> list[tuple[str, str]]:
        named = [(n, "_parameters") for n, _ in model.named_parameters(remove_duplicate=False)]
        return named + [(n, "_buffers") for n, _ in model.named_buffers(remove_duplicate=False)]

    @staticmethod
    def _read(model: nn.Module) -> dict[str, tuple[Tensor, int]]:
        named: list[tuple[str, Tensor]] = [*model.named_parameters(remove_duplicate=False)]
        named += model.named_buffers(remove_duplicate=False)
        return {name: (tensor, tensor._version) for name, tensor in named}

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Around the pass: record the registered tensors its forwards rebind.

        :func:`~deqhess.nn.reparametrize.functional_call` puts a rebound tensor back
        after every call, so the rebind leaves no trace for :meth:`restore` to find; it
        reports it here instead, and :meth:`check` names it.

        Yields:
            Nothing: the pass runs inside.
        """
        with rebinds_recorded() as found:
            try:
                yield
            finally:
                self._rebound += found

    def _rebound_names(self) -> set[str]:
        """The names (in the model) of the tensors rebound inside ``functional_call``."""
        if not self._rebound:
            return set()
        owners: dict[tuple[int, str], str] = {}
        for prefix, module in self.model.named_modules(remove_duplicate=False):
            for leaf in (*module._parameters, *module._buffers):
                owners.setdefault((id(module), leaf), f"{prefix}.{leaf}" if prefix else leaf)
        return {
            owners.get((id(owner), leaf), f"{type(owner).__name__}.{leaf}")
            for owner, leaf in self._rebound
        }

    def restore(self) -> list[str]:
        """Put back every parameter and buffer written since the guard was made.

        A tensor written in place gets its values back (bitwise), also when its version
        did not move (a write through ``.data``); a name rebound to another tensor,
        added or removed gets its original tensor back, or is removed.

        Returns:
            The names whose writes changed the model, sorted (empty: none did): other
            bits, a name added or removed, a parameter rebound, and those a forward
            rebound inside ``functional_call`` (already put back there). A buffer
            written, or rebound, to the same bits is put back and not named.
        """
        now = self._read(self.model)
        changed = sorted(
            name
            for name in set(now) | set(self._state)
            if name not in now
            or name not in self._state
            or now[name][0] is not self._state[name][0]
            or now[name][1] != self._state[name][1]
            or not same_bits(now[name][0], self._values[name])
        )
        # what changed the function: other bits, a name added or removed, or a parameter
        # rebound (its derivatives would be the new tensor's); a buffer written or rebound
        # to the same bits (a per-call reset) is only put back
        harmful = [
            name
            for name in changed
            if name not in now
            or name not in self._state
            or not same_bits(now[name][0], self._values[name])
            or (self._kinds[name] == "_parameters" and now[name][0] is not self._state[name][0])
        ]
        kinds_now = dict(self._named(self.model))
        for name in changed:
            prefix, _, leaf = name.rpartition(".")
            owner = self.model.get_submodule(prefix)
            if name in kinds_now:  # whatever is there now goes: the original comes back
                getattr(owner, kinds_now[name]).pop(leaf, None)
            if name in self._state:
                original = self._state[name][0]
                saved = self._values[name]
                with torch.no_grad():
                    if original.shape == saved.shape:
                        original.copy_(saved)  # bitwise: same dtype, same shape
                    else:  # resized in place
                        original.data = saved
                getattr(owner, self._kinds[name])[leaf] = original
        rebound, self._rebound = self._rebound_names(), []
        return sorted(set(harmful) | rebound)

    def check(self, label: str, failure: Exception | None = None) -> None:
        """Refuse a pass that wrote the model's parameters or buffers, after undoing it.

        Args:
            label: the pass's owner (e.g. ``"ModelCurvature"``), for the message.
            failure: the error the pass failed with, if it did: the refusal is raised
                from it (and it is left to the caller to raise when nothing was written).

        Raises:
            ModelChangedError: naming what the forward changed since the guard was made
                (the model is already as it was when the guard was made).
        """
        changed = self.restore()
        if changed:
            raise ModelChangedError(
                f"the model's forward changed its own state during a pass of {label}: "
                f"{changed[:6]}{' …' if len(changed) > 6 else ''} were written (in place, "
                "through .data, or rebound; e.g. running statistics, a counter, a cached "
                "weight); deqhess put them back as they were. The analysis reruns the model "
                "on every pass, so it must not update itself: keep such state out of "
                "forward, or freeze it (eval() mode) for the analysis."
            ) from failure
