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
from collections.abc import Iterator

from torch import Tensor, nn

__all__ = ["assigned_since", "attribute_snapshot", "attributes_kept"]

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
