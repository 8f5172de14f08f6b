"""How many directions to push through one ``vmap`` at a time."""

from __future__ import annotations

__all__ = ["default_chunk_size"]


def default_chunk_size(width: int) -> int:
    """Directions per vmapped chunk when each direction carries ``width`` numbers.

    About 4M numbers per chunk (tens of MB of intermediates): on 2 cores, chunks of
    ~500 directions at P ≈ 6k run twice as fast as one vmap over all P, and memory
    stays bounded whatever P is.

    Args:
        width: the numbers one direction carries (e.g. ``P`` plus the state's size).

    Returns:
        The chunk size, at least 16.
    """
    return max(16, (1 << 22) // max(width, 1))
