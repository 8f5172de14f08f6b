"""A dense Hessian's rows of the layers that meet the data first, from each sample's curvature.

A matrix product on the data, ``u = x Wᵀ + b`` (an encoder's ``nn.Linear``; ``x`` has no
graph to the parameters), meets the loss only through its output ``u``. With
``x̃ₙ = (xₙ, 1)`` the Hessian's rows of ``(W, b)`` are

* against every other parameter θ: ``Σₙ x̃ₙ ⊗ ∂²ℓ/∂uₙ∂θ``: the gradient at ``u``, sample
  by sample, of the other parameters' rows — whose backward passes ``u`` anyway, so
  it is captured there (a :class:`torch.autograd.graph.GradientEdge`) and contracted
  with ``x̃``;
* against themselves: ``Σₙ,ₘ (x̃ₙ x̃ₘᵀ) ⊗ ∂²ℓ/∂uₙ∂uₘ``. For samples the backward keeps
  apart (``∂²ℓ/∂uₙ∂uₘ = 0`` for ``n ≠ m``) that is ``Σₙ (x̃ₙ x̃ₙᵀ) ⊗ Kₙ``, each sample's
  ``o × o`` curvature ``Kₙ`` from ``o`` stacked directions (``eᵢ`` in every sample's
  row). That the samples are kept apart is certified on every batch, to the bit, by
  :mod:`deqhess.linear.coupling`'s probes (a random direction and copies with each
  sample's row scaled by a power of two), as :mod:`~deqhess.models.sample_sites` does
  for the GGN; where it fails, or a layer's parameters meet the graph anywhere else,
  the caller takes the one-hot rows instead — exact either way.

So ``o`` plus a few probe directions go through the batch's graph instead of the
``(k + 1)·o`` rows of ``(W, b)``. Measured on ``benchmarks/vs_curvlinops.py``'s tanh
classifier (an encoder ``Linear(16, 32)``: 544 of its 1,930 parameters; one batch of
32, float64, one thread): 34 ms for the encoder's rows by one-hot directions, against
5.4 ms for the 35 stacked and probe directions with the block's assembly, and 11 ms
more in the other rows, which now reach back to ``u`` (the head's through the DEQ
layer).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ..linear.coupling import probe_scales, scales_exactly
from .graph import BatchGraph, graph_nodes, missing_derivatives_named, one_hot_pieces
from .sample_sites import TRANSPOSES, plain_transpose, row_spread, unit_factor

__all__ = ["InputSite", "InputSiteTerm", "find_input_sites", "input_site_rows"]

#: the most numbers one step of a site block's assembly forms at once
BUDGET = 1 << 22


@dataclass(frozen=True)
class InputSite:
    """A matrix product on the data, ``u = x Wᵀ + b``, and the chosen parameters it holds.

    Attributes:
        node: the product's autograd node (``AddmmBackward0`` or ``MmBackward0``).
        data: ``[n_b, k]``, its input ``x`` (row ``n`` sample ``n``'s; no graph).
        width: ``o``, the columns of ``u``.
        weight: the layout position of ``W`` ``[o, k]``, or None (not chosen).
        bias: the layout position of ``b`` ``[o]``, or None.
    """

    node: Any
    data: Tensor
    width: int
    weight: int | None
    bias: int | None

    @property
    def edge(self) -> GradientEdge:
        """Where the gradient reaching ``u`` is read."""
        return GradientEdge(self.node, 0)

    @property
    def params(self) -> list[int]:
        """The layout positions of its chosen parameters."""
        return [i for i in (self.weight, self.bias) if i is not None]

    def extended(self) -> Tensor:
        """``x̃`` ``[n_b, k + 1]``: the data and a column of ones (the bias's)."""
        return torch.cat([self.data, self.data.new_ones(self.data.shape[0], 1)], dim=1)


def find_input_sites(loss: Tensor, params: Sequence[Tensor], samples: int) -> list[InputSite]:
    """The products on the data whose chosen parameters meet the loss's graph only there.

    One walk of the graph. A weight counts where it enters an ``addmm`` / ``mm`` as a
    plain transpose and the other operand has no graph (the data, ``[n_b, k]``, row
    ``n`` sample ``n``'s); a bias where it is that ``addmm``'s added vector (unit
    factors). A parameter met anywhere else too (a weight tied to another layer, used
    twice) leaves its product out.

    Args:
        loss: the batch's loss (its graph is read, not run).
        params: the chosen parameters, in the layout's order.
        samples: the batch's sample count ``n_b``.

    Returns:
        The sites, each holding at least one chosen parameter (none: an empty list).
    """
    index = {id(p): i for i, p in enumerate(params)}
    met: list[list[tuple[Any, int]]] = [[] for _ in params]  # (node, input position)
    for node in graph_nodes([loss.grad_fn]):
        if type(node).__name__ in TRANSPOSES and _transposed_leaf(node, index) is not None:
            continue  # counted where its consumer takes it
        for position, (child, _) in enumerate(node.next_functions):
            leaf, at = index.get(id(getattr(child, "variable", None))), position
            if leaf is None and type(child).__name__ in TRANSPOSES:
                leaf, at = _transposed_leaf(child, index), -1 - position  # via a transpose
            if leaf is not None:
                met[leaf].append((node, at))
    sites: dict[int, dict[str, Any]] = {}  # by node: the node, and its parameters' roles
    for i, uses in enumerate(met):
        if len(uses) != 1:
            continue
        node, position = uses[0]
        role = _role(node, position, params[i], samples)
        if role is not None:
            entry = sites.setdefault(id(node), {"node": node})
            entry[role] = i
    found = []
    for entry in sites.values():
        node = entry["node"]
        data = node._saved_mat1 if type(node).__name__ == "AddmmBackward0" else node._saved_self
        weight, bias = entry.get("weight"), entry.get("bias")
        width = params[entry["weight" if weight is not None else "bias"]].shape[0]
        found.append(InputSite(node, data.detach().clone(), int(width), weight, bias))
    return found


def _transposed_leaf(node: Any, index: dict[int, int]) -> int | None:
    """The chosen parameter a plain ``.T`` node transposes, if it is one."""
    if not plain_transpose(node):
        return None
    return index.get(id(getattr(node.next_functions[0][0], "variable", None)))


def _role(node: Any, position: int, param: Tensor, samples: int) -> str | None:
    """``"weight"`` or ``"bias"`` where ``param`` enters ``node`` as a product on the data."""
    name = type(node).__name__
    if name == "AddmmBackward0":
        if not (unit_factor(node, "_saved_alpha") and unit_factor(node, "_saved_beta")):
            return None
        data, weight_at = node._saved_mat1, -3  # mat2 = Wᵀ, the third input
    elif name == "MmBackward0":
        data, weight_at = node._saved_self, -2  # mat2 = Wᵀ, the second input
    else:
        return None
    if data is None or data.requires_grad or data.ndim != 2 or data.shape[0] != samples:
        return None  # not kept (no weight to differentiate), or not the data
    if position == weight_at and param.ndim == 2 and param.shape[1] == data.shape[1]:
        return "weight"
    if position == 0 and name == "AddmmBackward0" and param.ndim == 1:
        return "bias"
    return None


@dataclass
class InputSiteTerm:
    """One batch's ``[P, P]`` Hessian: rows of the other parameters, and the sites' blocks.

    Added to a pass's sum by :meth:`add_to`, into its upper triangle (the sum is mirrored
    at the end, :func:`~deqhess.models.symmetric.mirror_upper_`).

    Attributes:
        offsets: the parameters' first columns in the flat layout, and ``P`` last.
        rows: ``(start, columns, values)``: rows ``[start, start + k)`` at the flat
            columns ``columns`` (``(first, width, mirrored)`` ranges, concatenated in
            ``values`` ``[k, Σ width]``): added as they are, or (``mirrored``: a site's
            columns left of the rows) transposed, at the mirror image.
        blocks: ``(row, column, values)``: a block at those first flat row and column,
            added as it is where it lies on or above the diagonal's blocks, transposed
            where below.
    """

    offsets: tuple[int, ...]
    rows: list[tuple[int, list[tuple[int, int, bool]], Tensor]]
    blocks: list[tuple[int, int, Tensor]]

    def add_to(self, total: Tensor | None, weight: float) -> Tensor:
        """``total + weight · term`` on and above the diagonal, in place.

        Args:
            total: ``[P, P]``, whose upper triangle holds the sum so far (None: zero).
            weight: the term's weight.

        Returns:
            ``total`` (or a new zero sum).
        """
        p = self.offsets[-1]
        if total is None:
            like = self.rows[0][2] if self.rows else self.blocks[0][2]
            total = like.new_zeros(p, p)
        for start, columns, values in self.rows:
            stop = start + values.shape[0]
            at = 0
            for first, width, mirrored in columns:
                piece = values[:, at : at + width]
                at += width
                if mirrored:
                    total[first : first + width, start:stop].add_(piece.T, alpha=weight)
                else:
                    total[start:stop, first : first + width].add_(piece, alpha=weight)
        for row, column, block in self.blocks:
            height, breadth = block.shape
            if row <= column:
                total[row : row + height, column : column + breadth].add_(block, alpha=weight)
            else:
                total[column : column + breadth, row : row + height].add_(block.T, alpha=weight)
        return total


def input_site_rows(
    graph: BatchGraph,
    sites: list[InputSite],
    width: Callable[[], int],
    run: Callable[[Callable[[int, int], Tensor], int, int], Tensor],
    progress: Callable[[int], object],
    block_stop: Callable[[int], int],
) -> InputSiteTerm | None:
    """The batch's Hessian with the sites' rows from each sample's curvature, if certified.

    First the sites' own block from stacked directions and the coupling probes (None,
    and nothing else run, where a probe finds two samples coupled, a product is not
    finite, or the rows' spread over the samples could hide a leak below rounding);
    then the other parameters' rows in blocks, each reaching back to the sites' outputs.

    Args:
        graph: the batch's ``total`` graph.
        sites: :func:`find_input_sites`'s answer (not empty).
        width: the most rows of the next block.
        run: runs ``product(start, stop)`` for a block of rows (measuring it if first).
        progress: called with the rows done.
        block_stop: where a block of rows from a row ends (the dense forms' partition).

    Returns:
        The term, or None where the sites' block could not be certified.
    """
    layout = graph.layout
    offsets = layout.offsets
    like = graph.params[0]
    samples = sites[0].data.shape[0]
    held = {i for site in sites for i in site.params}
    directions = sum(site.width for site in sites)
    probes = 1 + probe_scales(samples, like.dtype, like.device).shape[0]
    if directions + probes >= sum(layout.numels[i] for i in held):
        return None  # no fewer directions than the one-hot rows (a layer on 1 feature)
    if samples * directions**2 > layout.size**2:
        return None  # each sample's curvature would hold more numbers than the result
    edges = [site.edge for site in sites]
    with torch.enable_grad(), missing_derivatives_named():
        at_sites = list(torch.autograd.grad(graph.loss, edges, create_graph=True))
    own = _own_blocks(graph, sites, at_sites, samples, width, run)
    if own is None:
        return None
    reaches = _reaching(graph, held, sites)
    term = InputSiteTerm(offsets, [], own)
    progress(sum(layout.numels[i] for i in held))

    def product(start: int, stop: int) -> Tensor:
        block = _rows(graph, sites, held, reaches, start, stop, like)
        term.rows.append(block)
        return block[2]

    start, size = 0, layout.size
    while start < size:
        i = bisect.bisect_right(offsets, start) - 1
        if i in held:
            start = offsets[i + 1]
            continue
        stop = min(block_stop(start), _next_held(start, offsets, held))
        run(product, start, stop)
        progress(stop - start)
        start = stop
    return term


def _next_held(start: int, offsets: tuple[int, ...], held: set[int]) -> int:
    """Where the next site parameter after row ``start`` begins (``P`` if none)."""
    first = bisect.bisect_right(offsets, start) - 1
    for i in range(first + 1, len(offsets) - 1):
        if i in held:
            return offsets[i]
    return offsets[-1]


def _reaching(graph: BatchGraph, held: set[int], sites: list[InputSite]) -> list[set[int]]:
    """Per parameter not at a site, the sites its gradient's graph reaches (by position).

    Returns:
        One set per parameter (empty for the sites' own): a site its gradient does not
        reach has no second derivative with it (zero), and is not asked for.
    """
    found: list[set[int]] = []
    for i, first in enumerate(graph.first):
        if i in held or first.grad_fn is None:
            found.append(set())
            continue
        seen = {id(n) for n in graph_nodes([first.grad_fn])}
        found.append({s for s, site in enumerate(sites) if id(site.node) in seen})
    return found


def _rows(
    graph: BatchGraph, sites: list[InputSite], held: set[int], reaches: list[set[int]],
    start: int, stop: int, like: Tensor,
) -> tuple[int, list[tuple[int, int, bool]], Tensor]:  # fmt: skip
    """Rows ``[start, stop)`` of parameters not at a site, with the sites' columns.

    Their columns from their first parameter on, as
    :meth:`~deqhess.models.graph.BatchGraph.upper_rows` takes them, and every site
    parameter's, from the gradients reaching the sites' outputs.

    Returns:
        ``(start, ranges, values)`` as :attr:`InputSiteTerm.rows` holds them.
    """
    layout = graph.layout
    offsets = layout.offsets
    first = bisect.bisect_right(offsets, start) - 1
    last = bisect.bisect_right(offsets, stop - 1) - 1
    count = stop - start
    directions = one_hot_pieces(layout, start, stop, like)
    columns = [j for j in range(first, len(graph.params)) if j not in held]
    reached = sorted(set().union(*(reaches[i] for i in range(first, last + 1))))
    inputs: list[Any] = [graph.params[j] for j in columns] + [sites[s].edge for s in reached]
    with torch.enable_grad(), missing_derivatives_named():
        out = graph.backward(graph.first[first : last + 1], inputs, directions)
    pieces = [g.detach().reshape(count, -1) for g in out[: len(columns)]]
    ranges = [(offsets[j], layout.numels[j], False) for j in columns]
    for s, g in zip(reached, out[len(columns) :], strict=True):
        if g is None:
            continue
        site, g = sites[s], g.detach()  # [K, n_b, o]: the gradient reaching u, per sample
        if site.weight is not None:  # Σₙ g[k, n, i] xₙⱼ
            pieces.append((g.transpose(1, 2) @ site.data.to(g)).reshape(count, -1))
            at = offsets[site.weight]
            ranges.append((at, layout.numels[site.weight], at < start))
        if site.bias is not None:
            pieces.append(g.sum(dim=1))
            at = offsets[site.bias]
            ranges.append((at, layout.numels[site.bias], at < start))
    return start, _merged(ranges), torch.cat(pieces, dim=1)


def _merged(ranges: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Column ranges in a row, next ones that continue each other made one (one add)."""
    merged: list[tuple[int, int, bool]] = []
    for first, width, mirrored in ranges:
        if merged and merged[-1][2] == mirrored and sum(merged[-1][:2]) == first:
            merged[-1] = (merged[-1][0], merged[-1][1] + width, mirrored)
        else:
            merged.append((first, width, mirrored))
    return merged


def _own_blocks(
    graph: BatchGraph, sites: list[InputSite], at_sites: list[Tensor], samples: int,
    width: Callable[[], int], run: Callable[[Callable[[int, int], Tensor], int, int], Tensor],
) -> list[tuple[int, int, Tensor]] | None:  # fmt: skip
    """The sites' block ``Σₙ (x̃ₙ x̃ₙᵀ) ⊗ Kₙ``, certified, as blocks of the flat layout.

    Directions, in blocks as wide as ``width()`` allows: for each site and column ``i``
    of its output, ``eᵢ`` in every sample's row (zero at the other sites); then a random
    direction ``r`` at every site and its copies with sample ``n``'s row scaled by
    ``cₗ,ₙ``. Samples kept apart give, for each ``l``, exactly ``cₗ,ₙ`` times the random
    direction's result in row ``n``.

    Returns:
        ``(row, column, block)`` per pair of site parameters (row's first column at most
        the column's); None where the certificate fails.
    """
    like = at_sites[0]
    widths = [site.width for site in sites]
    total = sum(widths)
    generator = torch.Generator().manual_seed(0)
    probe = [torch.randn(samples, o, generator=generator, dtype=like.dtype).to(like.device)
             for o in widths]  # fmt: skip
    scales = probe_scales(samples, like.dtype, like.device)  # [L, n_b]
    starts = list(itertools.accumulate([0, *widths]))
    # a site no site's gradient reaches has no curvature with them (and may not be asked)
    seen = {id(n) for n in graph_nodes([g.grad_fn for g in at_sites])}
    reached = [s for s, site in enumerate(sites) if id(site.node) in seen]
    chunks: list[list[Tensor]] = [[] for _ in sites]

    def product(a: int, b: int) -> Tensor:
        directions = [_directions(a, b, q, starts, probe[q], scales) for q in range(len(sites))]
        with torch.enable_grad(), missing_derivatives_named():
            out = graph.backward(at_sites, [sites[q].edge for q in reached], directions)
        for q, g in zip(reached, out, strict=True):
            missing = g is None
            chunks[q].append(like.new_zeros(b - a, samples, widths[q]) if missing else g.detach())
        return directions[0]

    count, a = total + 1 + scales.shape[0], 0
    while a < count:
        b = min(count, a + width())
        run(product, a, b)
        a = b
    results = []
    for q, site in enumerate(sites):
        g = (
            torch.cat(chunks[q])
            if chunks[q]
            else like.new_zeros(count, samples, site.width)
        )  # fmt: skip
        if not bool(torch.isfinite(g).all()):
            return None
        if not scales_exactly(g[total], g[total + 1 :], scales):
            return None  # a leak between samples, however weak (see sample_sites)
        spread = row_spread(g[total]) * row_spread(site.data)
        if spread > torch.finfo(g.dtype).eps ** -0.5:
            return None
        results.append(g[:total])  # [Σo, n_b, o_q]: direction (p, i), sample, column
    blocks = []
    offsets, numels = graph.layout.offsets, graph.layout.numels
    for p, q in itertools.product(range(len(sites)), repeat=2):
        curvature = results[q][starts[p] : starts[p + 1]].transpose(0, 1)  # [n_b, o_p, o_q]
        block = _kronecker_sum(curvature, sites[p].extended().to(like),
                               sites[q].extended().to(like))  # fmt: skip
        for i, row_part in _parts(sites[p]):
            for j, column_part in _parts(sites[q]):
                if offsets[i] > offsets[j]:
                    continue  # the lower block: its mirror is the upper one
                piece = block[:, row_part, :, column_part]
                blocks.append((offsets[i], offsets[j], piece.reshape(numels[i], numels[j])))
    return blocks


def _directions(a: int, b: int, q: int, starts: list[int], probe: Tensor, scales: Tensor) -> Tensor:
    """Directions ``[a, b)`` at site ``q`` (``[b − a, n_b, o_q]``): see :func:`_own_blocks`."""
    total, samples, width = starts[-1], probe.shape[0], probe.shape[1]
    out = probe.new_zeros(b - a, samples, width)
    low = max(a, starts[q])
    own = torch.arange(low, max(low, min(b, starts[q + 1])))  # eᵢ of this site's columns
    out[own - a, :, own - starts[q]] = 1
    for row in range(max(a, total), b):
        level = row - total - 1  # the random direction (−1), then its scaled copies
        out[row - a] = probe if level < 0 else scales[level][:, None] * probe
    return out


def _kronecker_sum(curvature: Tensor, x_p: Tensor, x_q: Tensor) -> Tensor:
    """``Σₙ Kₙ[i, k] x_p[n, j] x_q[n, l]`` as ``[o_p, k_p, o_q, k_q]``, in row chunks.

    Each chunk forms ``[n_b, rows, o_q, k_q]`` (at most :data:`BUDGET` numbers) and one
    matrix product with ``x_p`` over the samples.

    Returns:
        ``[o_p, k_p, o_q, k_q]`` (``k`` the columns of ``x̃``).
    """
    samples, o_p, o_q = curvature.shape
    k_p, k_q = x_p.shape[1], x_q.shape[1]
    out = curvature.new_empty(o_p, k_p, o_q, k_q)
    step = max(1, BUDGET // max(samples * o_q * k_q, 1))
    for i in range(0, o_p, step):
        part = curvature[:, i : i + step, :, None] * x_q[:, None, None, :]  # [n, c, o_q, k_q]
        summed = x_p.T @ part.reshape(samples, -1)  # [k_p, c·o_q·k_q]
        out[i : i + step] = summed.reshape(k_p, -1, o_q, k_q).transpose(0, 1)
    return out


def _parts(site: InputSite) -> list[tuple[int, Any]]:
    """Each chosen parameter of a site with its index into ``x̃``'s columns."""
    k = site.data.shape[1]
    parts: list[tuple[int, Any]] = []
    if site.weight is not None:
        parts.append((site.weight, slice(0, k)))
    if site.bias is not None:
        parts.append((site.bias, k))
    return parts
