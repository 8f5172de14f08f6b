"""The residual ``g(h) = F(h) − h`` of a fixed-point map: defined here, used everywhere.

The forward driver stops on its norm, the linear layer takes ``I − J = −∂g/∂h`` from it,
and both the :class:`deqhess.Equilibrium` and the :class:`deqhess.nn.DEQ` layer build
theirs from this one definition.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..errors import InputError

__all__ = ["Residual"]


class Residual:
    """``g(h) = F(h) − h`` for a map ``F`` on rows ``[S, d]`` (``S`` independent systems).

    The fixed point ``h* = F(h*)`` is the zero of ``g``, and ``∂g/∂h = J − I`` with
    ``J = ∂F/∂h``.

    Args:
        fn: the map ``F``, rows ``[S, d]`` to rows ``[S, d]``.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def evaluate(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(F(h), g(h))`` from one evaluation of ``F``.

        Args:
            h: the iterate, rows ``[S, d]``.

        Returns:
            ``F(h)`` and ``g(h)``, each ``[S, d]``.

        Raises:
            InputError: ``F`` modified its argument in place (the iterate it was given).
        """
        version = None if h.is_inference() else h._version  # inference tensors have none
        value = self.fn(h)
        if version is not None and h._version != version:
            raise InputError(
                "f modified the state it was given in place (e.g. torch.relu_(h) or h += …), "
                "which corrupts the solver's iterate: use out-of-place operations on h "
                "(torch.relu(h), h = h + …)."
            )
        return value, value - h

    def __call__(self, h: Tensor) -> Tensor:
        """``g(h) = F(h) − h``."""
        return self.evaluate(h)[1]
