"""Refuse dense results that cannot fit in memory, before allocating them.

A dense Hessian at P = 10⁵ is 80 GB in float64: allocating it would run for tens of
seconds and die with the allocator's message. Each dense entry point estimates its
bytes first and raises :class:`deqhess.DenseMemoryError`, naming the matrix-free
alternative, when the estimate exceeds the memory available now — read from the OS
(``/proc/meminfo``'s ``MemAvailable``, else ``os.sysconf``) or, on a CUDA device,
from ``torch.cuda.mem_get_info`` plus what torch's allocator holds unused.
:func:`memory_limit` overrides the limit explicitly.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import cast

import torch

from .errors import DenseMemoryError, InputError

__all__ = ["PeakMemory", "available_bytes", "budget_bytes", "check_dense", "memory_limit"]

_MEASURED = object()  # the default: what the device has available at the time of the call
_LIMIT: ContextVar[object] = ContextVar("deqhess_memory_limit", default=_MEASURED)


@contextlib.contextmanager
def memory_limit(nbytes: float | None) -> Iterator[None]:
    """Within the block, check dense requests against ``nbytes`` (``None``: no check).

    Args:
        nbytes: the bytes a dense request may allocate, or ``None`` to turn the check off.

    Yields:
        Nothing: the limit holds inside the ``with`` block.

    Raises:
        InputError: ``nbytes`` is negative or not a number.

    Example:
        >>> import deqhess as dh
        >>> with dh.memory_limit(None):  # I know it fits (swap, memory freed meanwhile)
        ...     pass  # H = eq.hessian(loss)
    """
    if nbytes is not None and not float(nbytes) >= 0:
        raise InputError(f"memory_limit takes a number of bytes >= 0 or None; got {nbytes!r}.")
    token = _LIMIT.set(None if nbytes is None else float(nbytes))
    try:
        yield
    finally:
        _LIMIT.reset(token)


def available_bytes(device: torch.device) -> float | None:
    """Bytes available now on ``device``.

    Returns:
        On CUDA, the device's free memory and what torch's allocator holds unused; on the
        CPU the least of the system's ``MemAvailable``, what the process's control group
        (a container's memory limit) has left, and what its address-space limit
        (``RLIMIT_AS``) has left — a container sees the host's ``MemAvailable``; None
        where none of them can be read.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return float(free + cached)
    if device.type != "cpu":
        return None
    found = [b for b in (_mem_available(), _cgroup_left(), _address_space_left()) if b is not None]
    return min(found) if found else None


def _mem_available() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_number(path: str) -> float | None:
    try:
        with open(path, encoding="ascii") as file:
            text = file.read().strip()
    except OSError:
        return None
    return float(text) if text.isdigit() else None  # "max": no limit


def _cgroup_left() -> float | None:
    """What the process's memory control group has left (v2, else v1), or None."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        cap, used = _read_number(limit), _read_number(usage)
        if cap is not None and used is not None and cap < 2**60:
            return max(cap - used, 0.0)
    return None


def _address_space_left() -> float | None:
    """What ``RLIMIT_AS`` leaves above the process's current virtual size, or None."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    size = _status_bytes("VmSize")
    return None if size is None else max(float(soft) - size, 0.0)


def budget_bytes(device: torch.device) -> float | None:
    """The bytes a request may take on ``device``.

    Returns:
        The :func:`memory_limit` in force, else what is available now; None when there is
        no limit or it cannot be read.
    """
    chosen = _LIMIT.get()
    return available_bytes(device) if chosen is _MEASURED else cast("float | None", chosen)


def check_dense(
    numbers: int, dtype: torch.dtype, device: torch.device, request: str, alternative: str
) -> None:
    """Raise unless ``numbers`` entries of ``dtype`` fit in the memory available.

    Args:
        numbers: entries the request allocates at its peak (estimated by the caller).
        dtype: their dtype.
        device: where they would be allocated.
        request: what was asked and its shape, e.g. ``"eq.hessian(loss): [P, P] with
            P = 100,000"``.
        alternative: the matrix-free way to get what the user wants.

    Raises:
        DenseMemoryError: the estimate exceeds the limit.
    """
    chosen = _LIMIT.get()
    limit = budget_bytes(device)
    if limit is None:
        return
    required = float(numbers) * torch.finfo(dtype).bits / 8
    if required <= limit:
        return
    source = (
        f"available on {device}"
        if chosen is _MEASURED
        else "the limit set with deqhess.memory_limit"
    )
    raise DenseMemoryError(
        f"{request} would allocate about {_size(required)} of {dtype}, but {_size(limit)} is "
        f"{source}. {alternative} If it does fit (swap, memory freed meanwhile), allow it "
        "explicitly: `with deqhess.memory_limit(None): ...`.",
        required=required,
        available=limit,
    )


def _size(nbytes: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    exponent = min(int(math.log10(max(nbytes, 1.0)) // 3), len(units) - 1)
    return f"{nbytes / 1000**exponent:.1f} {units[exponent]}"


class PeakMemory:
    """The most memory a block of code held above what was held when it started.

    Read where it can be: on CUDA from torch's allocator (its peak, reset at the start),
    on Linux from the kernel's resident high-water mark (``VmHWM``, reset through
    ``/proc/self/clear_refs``); elsewhere :attr:`extra` is None.

    Example:
        >>> import torch
        >>> with PeakMemory(torch.device("cpu")) as peak:
        ...     block = torch.ones(1000, 1000)
        >>> peak.extra is None or peak.extra >= 0
        True
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra: float | None = None
        self._start: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = float(torch.cuda.memory_allocated(self.device))
        elif self.device.type == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as refs:
                    refs.write("5")  # the high-water mark back to the current RSS
                self._start = _status_bytes("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        peak: float | None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = float(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = _status_bytes("VmHWM")
        if peak is not None:
            self.extra = max(peak - self._start, 0.0)


def _status_bytes(field: str) -> float | None:
    """A ``/proc/self/status`` memory field in bytes, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None
