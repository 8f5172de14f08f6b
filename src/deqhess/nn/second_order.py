"""Second derivatives torch computes wrongly: where they are, and the layer's refusal.

Weight normalisation along a dimension — ``torch.nn.utils.parametrizations.
weight_norm(m, dim=0)`` or the legacy ``torch.nn.utils.weight_norm(m)`` — computes
``w = g · v / ‖v‖`` by ``torch._weight_norm``, whose double backward in torch 2.13 drops
the dependence of ``‖v‖`` on ``v``: the Hessian blocks ``∂(∇_g, ∇_v)/∂v`` came out 50–75%
off finite differences of the exact gradient (every other block exact, and the first
derivatives exact). ``dim=None`` and a hand-written ``g · v / ‖v‖`` are exact.
:func:`wrong_double_backward` finds such modules, for :class:`deqhess.ModelCurvature`'s
check and for the layer.

The layer refuses a second derivative through it in those parameters, and only that:
where its backward is itself recorded (``create_graph=True``, ``torch.func``), the
parameters enter the products it records through :class:`_Refused`, an identity whose
derivatives raise :class:`deqhess.UnsupportedDerivativeError`. A first derivative never
differentiates the recorded backward, so it runs; nor does a derivative of the gradient
in its cotangent (the double-backward trick of a GGN product ``J v``), which never reaches
the parameters' side; a derivative of the gradient in ``v`` does, and raises (in ``g``
alone, with ``v`` frozen, it is exact and runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedDerivativeError

__all__ = ["RefusedSecondOrder", "wrong_double_backward"]


def wrong_double_backward(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """The weight normalisations along a dimension in ``module`` (itself included).

    Args:
        module: inspected, not changed.

    Returns:
        For each: its label relative to ``module`` — the module's path for the legacy
        hook (``""`` for ``module`` itself), ``path.tensor`` for a parametrisation — and
        the names of its parameters ``g`` and ``v`` as ``module.named_parameters()`` gives
        them.
    """
    from torch.nn.utils import parametrize

    found: dict[str, tuple[str, ...]] = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        for hook in m._forward_pre_hooks.values():
            if type(hook).__name__ == "WeightNorm" and hook.dim != -1:
                found[name] = (f"{prefix}{hook.name}_g", f"{prefix}{hook.name}_v")
        if not parametrize.is_parametrized(m):
            continue
        for tensor, chain in m.parametrizations.items():
            if any(type(p).__name__ == "_WeightNorm" and p.dim != -1 for p in chain):
                where = f"{prefix}parametrizations.{tensor}"
                found[f"{prefix}{tensor}"] = (f"{where}.original0", f"{where}.original1")
    return found


@dataclass(frozen=True)
class RefusedSecondOrder:
    """Arguments of a fixed point whose second derivatives are refused, and why.

    Attributes:
        positions: indices of the refused arguments among the fixed point's ``args``.
        message: the :class:`deqhess.UnsupportedDerivativeError`'s message.
    """

    positions: tuple[int, ...]
    message: str

    @classmethod
    def for_cell(cls, cell: nn.Module, names: list[str], offset: int) -> RefusedSecondOrder | None:
        """The refusal for a layer's cell, or None where it needs none (the usual case).

        Args:
            cell: the layer's cell.
            names: the cell's tensors among the fixed point's arguments, in order
                (:func:`deqhess.nn.contract.state_arguments`'s names).
            offset: the position of the first of them among the arguments (after ``x``'s).

        Returns:
            The refusal of the ``v`` parameters of the cell's weight normalisations
            along a dimension, or None when there are none.
        """
        found = wrong_double_backward(cell)
        refused = {v for _, v in found.values()}  # derivatives in g alone are exact
        positions = tuple(offset + i for i, name in enumerate(names) if name in refused)
        if not positions:
            return None
        labels = [f"cell.{label}" if label else "cell" for label in found]
        return cls(
            positions,
            f"a second derivative through the DEQ layer in the direction v of the weight "
            f"normalisation along a dimension of {labels}, whose double backward torch "
            "2.13 computes wrongly (the Hessian blocks in v were 50–75% off finite "
            "differences of the exact gradient). First derivatives are exact, and so are "
            "GGN products and second derivatives in g, the other parameters and x. For "
            "second derivatives in v, write the weight norm by hand (w = g * v / "
            "v.norm(dim=1, keepdim=True)), which is exact, or use weight_norm(..., "
            "dim=None).",
        )

    def guard(self, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``args``, the refused ones through an identity whose derivatives raise.

        Args:
            args: the fixed point's arguments, as a backward that is recorded uses them.

        Returns:
            The same values; the refused arguments' derivatives raise
            :class:`deqhess.UnsupportedDerivativeError` with :attr:`message`.
        """
        return tuple(
            _Refused.apply(a, self.message) if i in self.positions else a
            for i, a in enumerate(args)
        )


class _Refused(torch.autograd.Function):
    """``x ↦ x`` whose backward, forward-mode and higher derivatives raise."""

    @staticmethod
    def forward(x: Tensor, message: str) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        raise UnsupportedDerivativeError(ctx.message)

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _message: None) -> Tensor:
        raise UnsupportedDerivativeError(ctx.message)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, message: str) -> tuple[Tensor, Any]:
        return _Refused.apply(x, message), in_dims[0]
