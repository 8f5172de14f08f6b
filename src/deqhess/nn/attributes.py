"""Tensors the cell keeps on itself: exact functions of ``h*`` after the layer's call.

A cell may keep an intermediate on a module in its forward (``self.feat = self.lin(h)``)
for the model to read after the call (``deq.cell.feat``), as with any module: the
attribute then holds what the module's last evaluation computed. The layer evaluates its
cell many times — the solver's iterations (without a graph), the derivatives' products
(inside ``torch.func``) — and none of those is the model's evaluation. So:

* the tensor-valued attributes of the cell and its submodules (entries of their
  ``__dict__``; parameters and buffers live elsewhere) are compared before and after the
  solve (:func:`attribute_snapshot`, :func:`assigned_since`);
* if the solve assigned any, the layer's last evaluation of the cell is one at the
  differentiable fixed point ``h*`` (the visible evaluation where hooks observe the cell,
  else one more evaluation with the hooks set aside), so each attribute holds an exact
  function of ``h*`` — differentiable to every order, as ``h*`` is;
* every later evaluation of the layer's map (the backward's and forward mode's products)
  leaves the attributes as it found them (:func:`attributes_kept`).

Tensors kept inside containers (a list appended to at each call) are not followed: the
container grows by one entry per solver iteration, which the user sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = [
    "assigned_since",
    "attribute_snapshot",
    "attributes_kept",
    "check_hooks_assign_nothing_read",
]

#: per module, its tensor-valued plain attributes: ``(module, {name: tensor})``
Snapshot = list[tuple[nn.Module, dict[str, Tensor]]]


def attribute_snapshot(module: nn.Module) -> Snapshot:
    """The tensor-valued plain attributes of ``module`` and its submodules, as they are.

    Returns:
        Per module (``module.modules()`` order), the ``__dict__`` entries holding a tensor
        (the tensors themselves, not copies: assignments are told apart by identity).
    """
    return [
        (m, {k: v for k, v in m.__dict__.items() if isinstance(v, Tensor)})
        for m in module.modules()
    ]


def _assigned(snapshot: Snapshot, later: Snapshot | None = None) -> set[tuple[int, str]]:
    """The tensor attributes assigned (or removed) between two snapshots.

    Returns:
        ``(id(module), name)`` of each attribute that differs between ``snapshot`` and
        ``later`` (None: the modules as they are now).
    """
    then = {id(m): after for m, after in later} if later is not None else None
    found = set()
    for m, before in snapshot:
        now = (
            {k: v for k, v in m.__dict__.items() if isinstance(v, Tensor)}
            if then is None
            else then.get(id(m), {})
        )
        for k in now.keys() | before.keys():
            if now.get(k) is not before.get(k):
                found.add((id(m), k))
    return found


def check_hooks_assign_nothing_read(
    module: nn.Module,
    by_solve: Snapshot,
    by_visible: Snapshot,
    evaluate: Callable[[], Tensor],
    label: str = "cell",
) -> None:
    """Refuse a hook that assigns a tensor attribute the map reads.

    A forward pre-hook that computes a module's weight from its parameters
    (``m.weight = g(m.weight_orig)``, the legacy ``weight_norm`` pattern written by hand)
    defines the map, but runs only in the layer's visible evaluation: the solver's
    iterations and the derivatives' products run with observing hooks set aside and read
    the attribute as it stood — its value the same, its dependence on the parameters
    gone (second derivatives 19–40% off, silently). Found here as an attribute the visible
    evaluation assigned but the solve's evaluations did not, that already existed (the
    map read the old one), and whose replacement by NaN makes the map's output
    non-finite: the map reads it.

    Args:
        module: the cell.
        by_solve: the cell's attributes before the solve (:func:`attribute_snapshot`).
        by_visible: its attributes after the solve, before the visible evaluation.
        evaluate: the map as the solve evaluates it (hooks set aside), at ``h*``.
        label: the module's name in messages.

    Raises:
        InputError: such an attribute exists, named with the module that holds it.
    """
    hooked = _assigned(by_visible) - _assigned(by_solve, by_visible)
    if not hooked:
        return
    names = {id(m): name for name, m in module.named_modules()}
    stale = [
        (m, k, before[k])
        for m, before in by_visible
        for k in before
        if (id(m), k) in hooked
        and before[k].is_floating_point()
        # a tensor left by a hook inside an earlier torch.func transform (escaped from
        # it): the map cannot read it either, and it cannot be copied from
        and not torch._C._functorch.is_functorch_wrapped_tensor(before[k])
    ]
    for m, k, old in stale:
        current = m.__dict__.get(k)
        m.__dict__[k] = torch.full_like(old, float("nan"))
        try:
            with torch.no_grad():
                read = not bool(torch.isfinite(evaluate()).all())
        except Exception:  # the map reacted to the attribute alone: it reads it
            read = True
        finally:
            if current is None:
                del m.__dict__[k]
            else:
                m.__dict__[k] = current
        if read:
            where = f"{label}.{names[id(m)]}" if names[id(m)] else label
            raise InputError(
                f"a hook on the DEQ layer's cell assigns {where}.{k}, which the cell's map "
                "reads (a forward pre-hook computing a weight, say): the solver's "
                "iterations and the derivatives' products run with observing hooks set "
                f"aside, so they read {where}.{k} as it stood, not as a function of the "
                "parameters — the second derivatives would be wrong. Compute it inside the "
                "cell's forward, or use torch.nn.utils.parametrize (a parametrisation is "
                "part of the map); torch's own weight_norm and spectral_norm pre-hooks are "
                "kept in every evaluation."
            )


def assigned_since(snapshot: Snapshot) -> bool:
    """Whether a tensor-valued attribute was assigned (or removed) after ``snapshot``.

    Returns:
        True if some module of the snapshot now holds, under some name, a tensor other
        than the one it held then (a new one included), or no longer holds it.
    """
    for m, before in snapshot:
        now = {k: v for k, v in m.__dict__.items() if isinstance(v, Tensor)}
        if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
            return True
    return False


@contextlib.contextmanager
def attributes_kept(module: nn.Module) -> Iterator[None]:
    """Within the block, evaluations of ``module`` leave its tensor attributes unchanged.

    Each tensor-valued plain attribute of ``module`` and its submodules is put back
    afterwards (one assigned in the block, that did not exist before, removed), so an
    evaluation that is no step of the model leaves no trace on it.
    """
    snapshot = attribute_snapshot(module)
    try:
        yield
    finally:
        for m, before in snapshot:
            own = m.__dict__
            for k in [k for k, v in own.items() if isinstance(v, Tensor) and k not in before]:
                del own[k]
            own.update(before)
