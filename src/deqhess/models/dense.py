"""One batch's dense ``[P, P]`` curvature, assembled the cheaper way, within a memory budget.

A dense form of a model's curvature is one pass over the data; each batch's graph is
built once (each DEQ solves once) and gives its whole ``[P, P]`` contribution:

* **products** — ``P`` one-hot directions through the batch's second-order graph, in
  blocks of ``chunk``: the symmetric matrix's rows, each from the first column of its
  parameter on (:meth:`~deqhess.models.graph.BatchGraph.upper_rows`: for the Hessian a
  backward that stops at that parameter, so a late layer's rows are cheap), added to
  the pass's sum by that upper block triangle (every part);
* **output Jacobians** — for the GGN ``Jᵀ∇²ℓJ`` when the batch's output has fewer
  numbers than there are parameters (``M = n_b·C < P``): the ``M`` rows of ``J`` by
  one-hot cotangents through the graph (each row costs at most one product direction: a
  GGN direction is three passes, ``J v``, ``∇²ℓ``, ``Jᵀ``), ``∇²ℓ`` at the output
  (``[M, M]``, through the loss alone) — ``P / M`` times fewer passes through the model
  (measured 5× on a tanh classifier, 36× on a conv DEQ). The batch's term
  ``Jᵀ ∇²ℓ J`` (the Gram matrix of ``RJ`` where ``∇²ℓ = RᵀR`` per sample,
  :func:`~deqhess.models.symmetric.loss_factor`, else ``Jᵀ(∇²ℓ J)``) is added to the
  pass's sum by its upper triangle; the sum is mirrored once at the end.

The memory a block of directions takes is measured, not assumed: the first block of a
pass runs :data:`PROBE` directions under :class:`deqhess.memory.PeakMemory`, and the
blocks after it are as wide as half the memory available allows (:class:`Blocks`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DenseMemoryError, DeqhessError
from ..implicit.finite import require_finite
from ..memory import PeakMemory, budget_bytes
from .graph import BatchGraph, one_hot_rows
from .input_sites import InputSiteTerm, find_input_sites, input_site_rows
from .sample_gram import SampleGram
from .sample_sites import SampleRows, Stacking, stacked_sample_rows
from .symmetric import SymmetricProduct, UpperRows, curvature_times, loss_factor

__all__ = [
    "CPU_DENSE_BLOCK",
    "PROBE",
    "Blocks",
    "SampleTerm",
    "batch_dense",
    "run_block",
    "uses_jacobians",
]

#: the most directions of the first block, whose memory is measured (a wider first block
#: could already exhaust memory: 394 directions of an MDEQ batch needed ~13 GB).
PROBE = 16

#: the widest block of a dense form's rows on the CPU, unless ``chunk_size`` says otherwise.
#: A block costs about as much as 45 rows besides its rows (3.5 ms against 75 µs a row on
#: a batch of ``benchmarks/vs_curvlinops.py``'s tanh classifier), and the widest blocks
#: make the process map and fault in fresh pages. That classifier's Hessian (four
#: batches): 0.62 s in blocks of 512 against 0.65 s in blocks of 256 (its 1,056 cell rows
#: in two blocks instead of five; one process, the two in turn, medians of nine), and
#: 0.58 s in the 1,086 its memory allowed against 0.51 s in 256 (55,000 page faults
#: against 4,000); with a 64-wide state, two batches: 2.44 s in 512, 2.45 s in 256, 3.6 s
#: in what memory allowed; the conv model within 1% between 256 and 512
CPU_DENSE_BLOCK = 512

#: parameters with fewer rows than this share a block of a dense form with the next such
#: (a block costs about as much as 30 rows besides its rows: 6 ms against 0.14 ms a row
#: on one batch of ``benchmarks/vs_curvlinops.py``'s tanh classifier)
ROWS_BEFORE_CUT = 32

#: a parameter of at most this many entries that one operation takes with the one before
#: it (a bias after its weight) shares that one's blocks of a dense form's rows
JOIN_ROWS = 64

#: numbers in one block of the loss curvature's one-hot rows (``[rows, M]``)
CURVATURE_ROWS = 2**22


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:,.2f} GiB"


@dataclass
class Blocks:
    """How many directions a block may hold, from the memory one direction took.

    Attributes:
        limit: the most directions per block (the user's ``chunk_size``, or the default).
        reserved: bytes held besides the blocks (the dense result, its sums).
        per_direction: measured bytes one direction took per sample (None: not yet).
    """

    limit: int
    reserved: float = 0.0
    per_direction: float | None = None

    def size(self, samples: int, device: torch.device) -> int:
        """Directions in the next block for a batch of ``samples`` samples.

        Before a direction was measured, at most :data:`PROBE`; after it, as many as fit
        in half the memory available (:func:`deqhess.memory.budget_bytes`) less
        :attr:`reserved`, at most :attr:`limit` (all of it where the memory available
        cannot be read).

        Args:
            samples: the batch's sample count.
            device: where the block runs.

        Returns:
            The block's width, at least 1.

        Raises:
            DenseMemoryError: not even one direction fits.
        """
        if self.per_direction is None:
            return min(PROBE, self.limit)
        available = budget_bytes(device)
        if available is None:
            return self.limit
        cost = max(self.per_direction * samples, 1.0)
        room = 0.5 * available - self.reserved
        if room < cost:
            raise DenseMemoryError(
                f"one direction (or Jacobian row) through a batch of {samples} samples takes "
                f"about {_size(cost)} (measured), and {_size(max(room, 0.0))} of the "
                f"{_size(available)} available (half of it for a block) remain for it "
                f"beside the {_size(self.reserved)} the dense sums hold (the result, a "
                "batch's share and its weighted copy). Use smaller batches, fewer "
                "parameters (theta=...), or the matrix-free operator "
                "(hessian_operator(part) with the analyses of deqhess.curvature).",
                required=cost + self.reserved,
                available=available,
            )
        return int(max(1, min(self.limit, room // cost)))

    def measured(self, peak: PeakMemory, directions: int, samples: int, floor: float) -> None:
        """Record what a block of ``directions`` took, per direction and sample.

        The probe's peak above its start, at least ``floor`` bytes a direction: a small
        block can reuse memory the process already holds, and its peak then shows
        nothing. Only the first measurement counts; an unmeasurable peak records nothing.

        Args:
            peak: the block's measurement.
            directions: the block's width.
            samples: the batch's sample count.
            floor: the least bytes one direction can take.
        """
        if peak.extra is not None and self.per_direction is None:
            self.per_direction = max(peak.extra, floor * directions) / (
                directions * max(samples, 1)
            )


def run_block(
    blocks: Blocks, graph: BatchGraph, samples: int, device: torch.device,
    product: Callable[[int, int], Tensor], start: int, stop: int,
) -> Tensor:  # fmt: skip
    """``product(start, stop)`` for the directions ``[start, stop)``, measured if first.

    While no direction has been measured, the block runs under
    :class:`deqhess.memory.PeakMemory` and ``blocks`` records what it took.

    Args:
        blocks: the block sizes, and the memory one direction took once measured.
        graph: the batch's graph (its parameter count gives the floor).
        samples: the batch's sample count.
        device: where the block runs.
        product: ``(start, stop) ↦`` the block's ``[stop − start, P]`` rows.
        start: the block's first direction.
        stop: one past its last.

    Returns:
        What ``product(start, stop)`` returned.
    """
    if blocks.per_direction is not None:
        return product(start, stop)
    with PeakMemory(device) as peak:
        out = product(start, stop)
    # at the least, a direction's result and the gradients it leaves: four rows of P
    floor = 4.0 * graph.layout.size * out.element_size()
    blocks.measured(peak, stop - start, samples, floor)
    return out


def uses_jacobians(graph: BatchGraph, parameters: int) -> bool:
    """Whether this batch's dense GGN is cheaper from its output Jacobians.

    Args:
        graph: the batch's graph.
        parameters: ``P``.

    Returns:
        True for a GGN graph whose output has fewer numbers (``M = n_b·C``) than ``P``:
        ``M`` rows of ``J`` then cost fewer passes than ``P`` product directions.
    """
    return graph.part == "ggn" and sum(o.numel() for o in graph.outputs) < parameters


def batch_dense(
    graph: BatchGraph, samples: int, blocks: Blocks, progress: Callable[[int], object],
    gram: SampleGram | None = None, input_sites: Stacking | None = None,
) -> UpperRows | SymmetricProduct | SampleTerm | InputSiteTerm:  # fmt: skip
    """The batch's ``[P, P]`` matrix of ``graph``'s part, assembled the cheaper way.

    From output Jacobians where :func:`uses_jacobians` says so — each sample's rows from
    stacked cotangents where the graph shows where the parameters meet the samples
    (:mod:`deqhess.models.sample_sites`, given a ``gram`` to add them to), else from
    one-hot ones — else from ``P`` one-hot product directions, in blocks as wide as
    :class:`Blocks` allows (refused with :class:`deqhess.DenseMemoryError` when not one
    direction, or Jacobian row, fits).

    Args:
        graph: the batch's graph for one part.
        samples: the batch's sample count.
        blocks: the block sizes (measured on the first block if not yet).
        progress: called with the directions done after each block.
        gram: the pass's sum of each sample's rows, for the stacked route (None: not
            tried).
        input_sites: for the Hessian, whether the rows of parameters that meet the data
            first may come from each sample's curvature
            (:mod:`~deqhess.models.input_sites`; a batch that fails it marks it; None:
            not tried).

    Returns:
        The batch's ``[P, P]`` matrix, its weight included, by its rows on and above the
        diagonal's blocks (:class:`~deqhess.models.symmetric.UpperRows`); or, from output
        Jacobians, as a :class:`~deqhess.models.symmetric.SymmetricProduct` or a
        :class:`SampleTerm`; with the input sites' rows, as an
        :class:`~deqhess.models.input_sites.InputSiteTerm`. Each adds to a sum's upper
        triangle, which is whole once mirrored
        (:func:`~deqhess.models.symmetric.mirror_upper_`) — and, after a
        :class:`SampleTerm`, once ``gram`` has assembled what it keeps.
    """
    p = graph.layout.size
    device = graph.params[0].device
    if uses_jacobians(graph, p):
        return _from_jacobians(graph, samples, blocks, progress, gram)
    if gram is not None:  # P product directions: the next batches' graphs as usual
        gram.stacking.promising = False
    ends = _block_ends(graph)
    if input_sites is not None and input_sites.promising and graph.part == "total":
        found = _with_input_sites(graph, samples, blocks, progress, ends)
        if found is not None:
            return found
        input_sites.promising = False  # the next batches' rows as usual
    term = UpperRows(p)

    def product(start: int, stop: int) -> Tensor:
        column, rows = graph.upper_rows(start, stop)
        term.add(start, column, rows)
        return rows

    start = 0
    while start < p:
        stop = _block_stop(start, blocks.size(samples, device), ends)
        run_block(blocks, graph, samples, device, product, start, stop)
        progress(stop - start)
        start = stop
    return term


def _with_input_sites(
    graph: BatchGraph, samples: int, blocks: Blocks, progress: Callable[[int], object],
    ends: list[int],
) -> InputSiteTerm | None:  # fmt: skip
    """The batch's Hessian, its layers on the data from each sample's curvature.

    See :mod:`~deqhess.models.input_sites`.

    Returns:
        The term; None where the batch's graph has no such layer or the route does not
        hold (the one-hot rows then).

    Raises:
        RuntimeError: a :class:`deqhess.DeqhessError` met on the route (about the model:
            the one-hot rows would meet it too).
    """
    sites = find_input_sites(graph.loss, graph.params, samples)
    if not sites:
        return None
    device = graph.params[0].device

    def run(product: Callable[[int, int], Tensor], start: int, stop: int) -> Tensor:
        return run_block(blocks, graph, samples, device, product, start, stop)

    try:
        return input_site_rows(
            graph, sites, lambda: blocks.size(samples, device), run, progress,
            lambda start: _block_stop(start, blocks.size(samples, device), ends),
        )  # fmt: skip
    except RuntimeError as error:  # torch's, on the route's own way (its edges)
        if isinstance(error, DeqhessError):
            raise  # about the model: the one-hot rows would meet it too
        return None


def _block_ends(graph: BatchGraph) -> list[int]:
    """Where blocks of a dense form's rows may end.

    At each parameter's end, unless the next parameter is small (at most
    :data:`JOIN_ROWS` rows) and one operation takes it with the one before (a bias after
    its weight, :meth:`~deqhess.models.graph.BatchGraph.parameter_runs`). A block's rows
    all take the columns from its first parameter on: a bias joining its weight's block
    adds a few rows of columns the backward reaches anyway, where a block of its own
    would cost a block's fixed cost for them (a conv cell's 4-entry biases: 42 ms a
    block of four rows over three batches); a large parameter after another of the same
    operation keeps its own columns (a conv cell's second convolution's rows from the
    first's column on took 10% longer).

    Returns:
        The ends in the flat layout, increasing; the last is ``P``.
    """
    runs = set(graph.parameter_runs())
    offsets, numels = graph.layout.offsets, graph.layout.numels
    return [
        offsets[i + 1]
        for i in range(len(numels))
        if i + 1 == len(numels) or offsets[i + 1] in runs or numels[i + 1] > JOIN_ROWS
    ]


def _block_stop(start: int, width: int, ends: list[int]) -> int:
    """Where a block of rows from ``start``, at most ``width`` wide, ends.

    A block ends at the first of ``ends`` (:func:`_block_ends`) after ``start``, unless
    both the rows before that end and the rows after it up to the next end are fewer
    than :data:`ROWS_BEFORE_CUT` (small parameters in a row share a block): a block's
    rows all start at its first parameter's column
    (:meth:`~deqhess.models.graph.BatchGraph.upper_rows`), so a later parameter's rows
    are cheaper in a block of their own (a head's 1,440 rows in a block with the cell's
    4-entry bias took 1.05 s, alone 0.008 s). Rows up to that end that do not fit in
    ``width`` are split into blocks of equal width: each block costs about as much as
    dozens of rows besides its rows, and a narrow last block pays it for a few
    (``benchmarks/vs_curvlinops.py``'s tanh classifier, at most 256 rows a block: 0.62 s
    in blocks of 256 then the rest, a bias in a block of its own; 0.57 s in equal blocks,
    each bias with its weight).

    Args:
        start: the block's first row.
        width: the most rows it may hold.
        ends: where blocks may end in the flat layout (the last is ``P``).

    Returns:
        One past the block's last row.
    """
    stop = ends[-1]
    for end, after in itertools.pairwise(ends):
        if start < end and (end - start >= ROWS_BEFORE_CUT or after - end >= ROWS_BEFORE_CUT):
            stop = end
            break
    rows = stop - start
    if rows <= width:
        return stop
    blocks = -(-rows // width)
    return start + -(-rows // blocks)


def _from_jacobians(
    graph: BatchGraph, samples: int, blocks: Blocks, progress: Callable[[int], object],
    gram: SampleGram | None,
) -> SymmetricProduct | SampleTerm:  # fmt: skip
    """The batch's GGN ``Jᵀ∇²ℓJ`` from vector-Jacobian products at the output.

    ``∇²ℓ`` (``[M, M]``) by a backward of the loss's output gradient along the ``M``
    one-hot rows, through the loss alone (one with NaN or inf entries is refused with
    :class:`deqhess.NonFiniteError`). Where it factors, ``∇²ℓ = RᵀR``
    (:func:`~deqhess.models.symmetric.loss_factor`), the rows of ``RJ`` by ``R``'s rows as
    cotangents through the graph: the term is their Gram matrix. Otherwise ``J``'s rows by
    the one-hot cotangents, and the term ``Jᵀ(∇²ℓ J)``. Rows go through the graph in
    blocks.

    Returns:
        The batch's ``[P, P]`` GGN (its weight included: it is in ``∇²ℓ``).
    """
    outputs, leaves = graph.outputs, graph.out_leaves
    sizes = [o.numel() for o in outputs]
    m, p = sum(sizes), graph.layout.size
    like = graph.params[0]

    def cotangents(rows: Tensor) -> list[Tensor]:
        """Rows ``[K, M]`` of output cotangents, as one ``[K, *output.shape]`` per output."""
        pieces = zip(rows.split(sizes, dim=1), outputs, strict=True)
        return [c.reshape(rows.shape[0], *o.shape) for c, o in pieces]

    curvature = torch.empty(m, m, dtype=like.dtype, device=like.device)
    step = max(1, CURVATURE_ROWS // max(m, 1))  # through the loss alone: cheap, but M² numbers
    for start in range(0, m, step):
        stop = min(m, start + step)
        with torch.enable_grad():
            second = graph.backward(
                list(graph.out_grad), leaves, cotangents(one_hot_rows(start, stop, m, like))
            )
        # a 0-dim output (a penalty returned beside the logits) has rows of one number
        curvature[start:stop] = torch.cat([g.reshape(g.shape[0], -1) for g in second], 1)
    require_finite(curvature, "the loss curvature at the output")
    curvature = 0.5 * (curvature + curvature.T)
    factor = loss_factor(curvature)
    if factor is not None and gram is not None and gram.stacking.promising:
        term = _from_sites(graph, samples, blocks, factor, gram)
        if term is not None:
            progress(p)
            return term
        gram.stacking.promising = False  # the next batches' graphs as usual
    count = m if factor is None else factor.shape[0]
    products = torch.empty(count, p, dtype=like.dtype, device=like.device)

    def rows(start: int, stop: int) -> Tensor:
        along = one_hot_rows(start, stop, m, like) if factor is None else factor[start:stop]
        with torch.enable_grad():
            grads = graph.backward(outputs, graph.params, cotangents(along))
        column = 0
        for g in grads:  # each parameter's columns written in place: no concatenated copy
            width = g[0].numel()
            products[start:stop, column : column + width] = g.detach().reshape(stop - start, -1)
            column += width
        return products[start:stop]

    start = 0
    while start < count:
        stop = min(count, start + blocks.size(samples, like.device))
        run_block(blocks, graph, samples, like.device, rows, start, stop)
        start = stop
    progress(p)
    if factor is not None:
        return SymmetricProduct(products)
    return SymmetricProduct(products, curvature_times(curvature, products))


@dataclass
class SampleTerm:
    """A batch's GGN as each sample's rows, added to a pass's sum through its gram.

    Attributes:
        rows: the batch's rows (:class:`~deqhess.models.sample_sites.SampleRows`).
        gram: the pass's :class:`~deqhess.models.sample_gram.SampleGram`, which adds the
            blocks it can at once and keeps the weights' outer products to assemble.
        like: a tensor of the sum's dtype and device (for a first, zero sum).
    """

    rows: SampleRows
    gram: SampleGram
    like: Tensor

    def add_to(self, total: Tensor | None, weight: float) -> Tensor:
        """``total + weight · term`` in the sum's upper triangle, in part kept by the gram."""
        if total is None:
            p = self.gram.offsets[-1]
            total = self.like.new_zeros(p, p)
        self.gram.add(total, self.rows, weight)
        return total


def _from_sites(
    graph: BatchGraph, samples: int, blocks: Blocks, factor: Tensor, gram: SampleGram
) -> SampleTerm | None:
    """The batch's GGN from stacked cotangents, where the graph allows (else None).

    The output must be one tensor whose rows are the samples and ``∇²ℓ``'s factor one
    block per sample (``r`` rows each); its ``r`` stacked cotangents and the coupling
    probes run through the graph at once, measured like a block of directions (and not
    tried where fewer directions than that fit).

    Returns:
        The batch's term, or None where the output, the factor or the graph does not
        allow the route (:mod:`~deqhess.models.sample_sites`): the one-hot route then.
    """
    outputs = graph.outputs
    if len(outputs) != 1 or outputs[0].ndim == 0 or outputs[0].shape[0] != samples:
        return None
    out = outputs[0]
    columns = out.numel() // max(samples, 1)
    if samples < 1 or factor.shape[0] % samples:
        return None
    rank = factor.shape[0] // samples
    blocked = factor.view(samples, rank, samples, columns)
    index = torch.arange(samples, device=factor.device)
    own = blocked[index, :, index]  # [n_b, r, columns]
    if int(torch.count_nonzero(blocked)) != int(torch.count_nonzero(own)):
        return None  # a factor row across samples: the loss couples them
    device = out.device
    tried = 0  # the cotangents of the route's one backward, once it runs

    def fits(count: int) -> bool:
        nonlocal tried
        if blocks.size(samples, device) < count:
            return False
        tried = count
        return True

    stacked = own.transpose(0, 1).reshape(rank, *out.shape)
    with PeakMemory(device) as peak:
        rows = stacked_sample_rows(out, graph.params, stacked, samples, fits)
    if tried:  # measured like a block of that many directions
        blocks.measured(peak, tried, samples, 4.0 * graph.layout.size * out.element_size())
    # the sum in the parameters' dtype (an output cast to float64 on a float32 model)
    return None if rows is None else SampleTerm(rows, gram, graph.params[0].detach())
