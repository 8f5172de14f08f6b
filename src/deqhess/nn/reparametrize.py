"""``torch.func.functional_call`` that leaves the module exactly as it found it.

torch 2.13 restores the swapped tensors by module path; a submodule registered under two
paths (a cell that holds the encoder it shares with the model) gets a swapped-in plain
tensor back in place of its ``nn.Parameter``, so an optimizer created before the call
updates a tensor the model no longer uses. Here every module's registered parameters
and buffers are put back as they were, whatever torch did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["functional_call"]


def functional_call(module: nn.Module, tensors: dict[str, Tensor], args: tuple[Any, ...]) -> Any:
    """``module(*args)`` with the named parameters and buffers replaced by ``tensors``.

    Args:
        module: the module; its registered tensors are the same objects afterwards.
        tensors: replacements by name (``named_parameters`` / ``named_buffers`` names).
        args: the positional arguments of ``module.forward``.

    Returns:
        What ``module(*args)`` returns, computed with the replacements.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        return torch.func.functional_call(module, tensors, args)
    finally:
        for owner, parameters, buffers in saved:
            _restore(owner._parameters, parameters)
            _restore(owner._buffers, buffers)


def _restore(registry: dict[str, Any], saved: dict[str, Any]) -> None:
    for name, value in saved.items():
        if registry.get(name) is not value:
            registry[name] = value
