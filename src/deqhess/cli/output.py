"""The folder ``deqhess analyze`` writes its plots and ``report.json`` into, checked first.

The files are written after every analysis has run; a folder that cannot be made or
written must be refused before the batches are solved, not found at the end.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch.distributed as dist

from ..errors import InputError

__all__ = ["check_out"]


def check_out(out: Path) -> None:
    """Refuse an output folder that could not be made or written when the report is due.

    The missing folders are made, a file is written into ``out`` and removed, and the
    folders made are removed again: nothing is left behind. Under ``torch.distributed``
    only rank 0 (the one that writes) tries.

    Args:
        out: the folder for the plots and ``report.json``: new, or an existing folder.

    Raises:
        InputError: ``out`` is a file or lies under one; or it cannot be made or written
            (no permission, a read-only or virtual file system), with the system's reason.
    """
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == out else f"lies under {str(existing)!r}, which is"
        raise InputError(
            f"out {str(out)!r} {where} a file, not a folder; the plots and report.json are "
            "written into a folder: pass a new folder's path or an existing folder (--out)."
        )
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    made: list[Path] = []
    try:
        for folder in reversed([p for p in (out, *out.parents) if not p.exists()]):
            folder.mkdir()
            made.append(folder)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(
            f"out {str(out)!r} cannot be made or written ({reason}: {error.filename or out}); "
            "pass a folder you can create and write (--out): the plots and report.json go "
            "there once the analyses have run."
        ) from error
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # something else wrote into it meanwhile
                folder.rmdir()
