"""What :class:`deqhess.ModelCurvature` reports of how it computed: ``info``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..linear.cholesky import MAX_WIDTH
from .dense import Blocks

__all__ = ["CurvatureInfo", "assembly"]


@dataclass(frozen=True)
class CurvatureInfo:
    """How :class:`ModelCurvature` computed what it computed.

    Attributes:
        per_direction_bytes: the memory one direction took per sample of a batch, as
            measured on the first block (None: not measured yet, or not measurable on
            this platform); blocks of directions are sized from it.
        assembly: per dense part, how its ``[P, P]`` matrix was assembled (output
            Jacobians or products, in blocks of how many directions).
    """

    per_direction_bytes: float | None = None
    assembly: dict[str, str] = field(default_factory=dict)


def assembly(routes: set[str], part: str, p: int, blocks: Blocks) -> str:
    """What :attr:`ModelCurvature.info` says of a dense form.

    Args:
        routes: the routes its batches took (``"sample sites"``, ``"factored
            jacobians"``, ``"jacobians"``, ``"input sites"``, ``"products"``).
        part: the dense part.
        p: ``P``.
        blocks: the block sizes, and the memory a direction took once measured.

    Returns:
        One sentence per route.
    """
    said = []
    if "sample sites" in routes:
        said.append(
            "output Jacobians (a batch's output has fewer numbers than P = "
            f"{p:,}), ∇²ℓ = RᵀR by pivoted Cholesky per sample: each sample's rows of RJ "
            "from R's rows stacked over the batch's samples (the graph shows where each "
            "parameter meets them, the DEQ layers' cells evaluated once more; samples "
            "kept apart, checked by probes), the weights' blocks from their outer "
            "products over the whole pass, the rest as the rows' Gram matrix"
        )
    if "factored jacobians" in routes:
        said.append(
            "output Jacobians (a batch's output has fewer numbers than P = "
            f"{p:,}), ∇²ℓ = RᵀR by pivoted Cholesky (positive semi-definite): the Gram "
            "matrix of RJ, its rows by vector-Jacobian products along R's rows"
        )
    if "jacobians" in routes:
        said.append(
            "output Jacobians (a batch's output has fewer numbers than P = "
            f"{p:,}; ∇²ℓ not positive semi-definite in blocks of at most "
            f"{MAX_WIDTH}): Jᵀ(∇²ℓ J) from its rows, by its upper block triangle"
        )
    if "input sites" in routes:
        said.append(
            "the rows of the layers that meet the data first (a matrix product on the "
            "data, its weight and bias met nowhere else) from each sample's curvature at "
            "their output — o stacked directions, samples kept apart checked by probes — "
            "and the gradients reaching that output from the other rows"
        )
    if "products" in routes or "input sites" in routes:
        measured = (
            f"{blocks.per_direction / 2**20:.2f} MiB per direction and sample, measured"
            if blocks.per_direction is not None
            else "memory not measurable here: blocks of at most chunk_size"
        )
        said.append(
            f"{'the other rows as' if 'input sites' in routes else f'P = {p:,}'} product "
            f"directions per batch, in blocks of at most "
            f"{blocks.limit:,} sized by memory ({measured}), each block's rows from its "
            "first parameter's column on (the upper block triangle, mirrored at the end); "
            "the DEQ layers' 'auto' linear solver sees P directions (a per-sample LU where "
            "cheaper)"
        )
    return "; ".join(said) or f"no batch ({part})"
