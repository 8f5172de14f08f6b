"""The cast of a problem to the dtype and device ``--dtype`` and ``--device`` name."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import MappedBatches
from ..options import available_device

__all__ = ["Cast"]


class Cast:
    """Casts to a dtype and device (either None: left as is).

    Floating tensors take the dtype, every tensor the device; tuples, lists and dicts
    are walked.

    Raises:
        InputError: a device that is not available here (before anything is moved).
    """

    def __init__(self, dtype: torch.dtype | None, device: torch.device | str | None):
        self.dtype = dtype
        self.device = None if device is None else available_device(device)
        self.active = dtype is not None or device is not None

    def tensor(self, t: Tensor) -> Tensor:
        """``t`` cast (its dtype only if floating)."""
        dtype = self.dtype if t.is_floating_point() else None
        return t.to(device=self.device, dtype=dtype) if self.active else t

    def tree(self, value: Any) -> Any:
        """``value`` with its tensors cast, through tuples, lists and dicts."""
        if isinstance(value, Tensor):
            return self.tensor(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self.tree(v) for v in value)
        if isinstance(value, dict):
            return {k: self.tree(v) for k, v in value.items()}
        return value

    def module(self, cell: nn.Module) -> nn.Module:
        """A cast copy of ``cell`` (``cell`` itself when nothing is cast)."""
        return copy.deepcopy(cell).to(device=self.device, dtype=self.dtype) if self.active else cell

    def batches(self, data: Iterable[Any]) -> Iterable[Any]:
        """The batches cast as they are read.

        Returns:
            A re-iterable view (data-set passes read the data once per product), or the
            data themselves when nothing is cast.
        """
        return MappedBatches(data, self.tree) if self.active else data
