"""``torch.func.functional_call`` that leaves the module exactly as it found it.

torch 2.13 restores the swapped tensors by module path; a submodule registered under two
paths (a cell that holds the encoder it shares with the model) gets a swapped-in plain
tensor back in place of its ``nn.Parameter``, so an optimizer created before the call
updates a tensor the model no longer uses. Here every module's registered parameters
and buffers are put back as they were, whatever torch did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Rebind", "functional_call", "rebinds_recorded", "same_bits"]

Rebind = tuple[nn.Module, str]
"""A registered tensor a forward rebound: its owning module and its name there."""

_RECORDERS: list[list[Rebind]] = []


@contextlib.contextmanager
def rebinds_recorded() -> Iterator[list[Rebind]]:
    """Record the registered tensors that forwards rebind inside :func:`functional_call`.

    Yields:
        The list the rebinds are appended to, ``(owner, name)`` each, in order (a
        name rebound on every call appears once per call).
    """
    found: list[Rebind] = []
    _RECORDERS.append(found)
    try:
        yield found
    finally:
        _RECORDERS.remove(found)


def functional_call(
    module: nn.Module,
    tensors: dict[str, Tensor],
    args: tuple[Any, ...],
    *,
    watch_rebinds: bool = False,
) -> Any:
    """``module(*args)`` with the named parameters and buffers replaced by ``tensors``.

    Args:
        module: the module; its registered tensors are the same objects afterwards.
        tensors: replacements by name (``named_parameters`` / ``named_buffers`` names).
        args: the positional arguments of ``module.forward``.
        watch_rebinds: also record (for :func:`rebinds_recorded`) a forward's rebinding
            of a substituted tensor, which torch undoes before the call returns (one
            module more around ``module``: for a whole model's evaluation, not a cell's
            many).

    Returns:
        What ``module(*args)`` returns, computed with the replacements.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    # torch's own leftovers (a swapped-in tensor under a second path) are no rebinds
    swapped = {id(t) for t in tensors.values()}
    try:
        if watch_rebinds:
            watched = _Watched(module, tensors, swapped)
            return torch.func.functional_call(watched, watched.prefixed(tensors), args)
        return torch.func.functional_call(module, tensors, args)
    finally:
        rebound: list[Rebind] = []
        for owner, parameters, buffers in saved:
            rebound += _restore(owner, owner._parameters, parameters, swapped)
            rebound += _restore(owner, owner._buffers, buffers, swapped, same_bits_ok=True)
        for recorder in _RECORDERS:
            recorder += rebound


def _restore(
    owner: nn.Module,
    registry: dict[str, Any],
    saved: dict[str, Any],
    swapped: set[int],
    same_bits_ok: bool = False,
) -> list[Rebind]:
    """Put ``saved`` back into ``registry``, returning the rebinds found.

    Returns:
        ``(owner, name)`` of each entry a forward rebound (not torch's own leftovers; a
        buffer rebound to the same bits, a per-call reset, is put back and not reported
        where ``same_bits_ok``).
    """
    rebound = []
    for name, value in saved.items():
        now = registry.get(name)
        if now is not value:
            registry[name] = value
            harmless = same_bits_ok and same_bits(now, value)
            if id(now) not in swapped and not harmless:
                rebound.append((owner, name))
    return rebound


_INTEGERS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(tensor: Any, saved: Any) -> bool:
    """Whether ``tensor`` holds the bits of ``saved`` (``-0.0`` and NaN payloads count).

    Args:
        tensor: a parameter or buffer as it is now.
        saved: its copy, or the tensor it replaced.

    Returns:
        True when both are tensors of one shape, dtype and device whose every element's
        bits agree (compared as integers of the same width); also for layouts other than
        strided, which are not compared.
    """
    if not (isinstance(tensor, Tensor) and isinstance(saved, Tensor)):
        return False
    if tensor.layout != torch.strided or tensor.is_meta:
        return True
    if tensor.shape != saved.shape or tensor.dtype != saved.dtype:
        return False
    if tensor.device != saved.device:
        return False
    a, b = tensor.detach(), saved.detach()
    if a.is_complex():
        a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
    if a.is_floating_point() or a.dtype == torch.bool:
        a, b = a.view(_INTEGERS[a.element_size()]), b.view(_INTEGERS[b.element_size()])
    return bool(torch.equal(a, b))


class _Watched(nn.Module):
    """``module`` behind one more module, which sees what its forward rebound.

    torch's ``functional_call`` puts its swapped-in tensors back when the call ends, so a
    forward that rebinds one (``self.w = nn.Parameter(...)``) goes unseen after it — and
    the rebound tensor, not the substituted one, is what the forward computed with (its
    derivatives in the substituted tensor are then exactly zero). Inside the call, after
    the forward, each substituted name's registry entry must still be a swapped-in tensor.
    """

    def __init__(self, module: nn.Module, tensors: dict[str, Tensor], swapped: set[int]):
        super().__init__()
        self.inner = module
        self._swapped = swapped
        self._entries: list[tuple[nn.Module, str]] = []
        for name in tensors:
            path, _, attr = name.rpartition(".")
            self._entries.append((module.get_submodule(path) if path else module, attr))

    @staticmethod
    def prefixed(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The replacements named as this module's (under ``inner.``)."""
        return {f"inner.{name}": t for name, t in tensors.items()}

    def forward(self, *args: Any) -> Any:
        """``module(*args)``, recording the substituted tensors it rebound."""
        out = self.inner(*args)
        rebound = []
        for owner, attr in self._entries:
            now = owner._parameters.get(attr, owner._buffers.get(attr))
            if now is not None and id(now) not in self._swapped:
                rebound.append((owner, attr))
        for recorder in _RECORDERS:
            recorder += rebound
        return out
