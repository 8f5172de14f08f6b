"""Each sample's rows of a batch's output Jacobian from a few stacked cotangents.

A dense GGN from output Jacobians needs, per sample ``n`` of a batch and row ``r`` of the
loss curvature's factor ``Rₙ`` (:func:`~deqhess.models.symmetric.loss_factor`), the row
``∂(Rₙ,ᵣ · outₙ)/∂θ``. One-hot cotangents give them one backward of the whole batch per
``(n, r)``: ``n_b · r`` products, each mostly zeros. This module gives them all from
``r`` backwards (sample ``n``'s ``r``-th factor row, all samples at once) where the graph
shows where each parameter meets the samples — its **sites**:

* a matrix product's weight, ``a @ Wᵀ (+ b)`` (``nn.Linear``'s ``addmm``/``mm``, the
  input ``a`` ``[n_b, k]``): sample ``n``'s row is ``gₙ ⊗ aₙ``, ``gₙ`` the gradient
  reaching the product's row ``n``;
* a bias added to every sample's row (``addmm``'s, or a broadcast ``+ b``): ``gₙ``;
* a DEQ layer's cell evaluated once more at its fixed point, in the graph
  (``layer_calls(visible=True)``, :mod:`deqhess.nn.observed`): its parameters meet the
  samples at that evaluation's sites, and their path through the fixed point's own
  backward receives a gradient that is exactly zero (checked on every cotangent).

With stacked cotangents the gradient reaching a site's row ``n`` is sample ``n``'s own
only if the backward from the output to the sites keeps samples apart. That is
certified on every batch by :mod:`deqhess.linear.coupling`'s probes (a random cotangent
and copies with each sample's row scaled by a power of two: a coupling of rows shows up
for almost every draw) — to the bit: samples kept apart scale exactly with their
power-of-two factors, and any leak, however weak, could be amplified downstream without
bound, so none is accepted. Where a parameter meets the samples anywhere else, a site's
rows are not the samples (a sequence's tokens), or a check fails, there is no answer
(None) and the caller takes the one-hot route: exact either way.

Measured on ``benchmarks/vs_curvlinops.py``'s tanh classifier (four batches of 32, 9
factor rows a sample, float64, one thread): the rows of a batch from 12 stacked
cotangents in 2.7 ms, against 13 ms for its 288 one-hot ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from ..errors import DeqhessError
from ..linear.coupling import probe_scales, scales_exactly

__all__ = [
    "NO_SITES",
    "TRANSPOSES",
    "SampleRows",
    "Site",
    "Sites",
    "Stacking",
    "find_sites",
    "may_have_sites",
    "plain_transpose",
    "row_spread",
    "sample_rows",
    "stacked_sample_rows",
    "unit_factor",
]

#: the autograd nodes of a weight taken transposed into a matrix product
TRANSPOSES = ("TBackward0", "PermuteBackward0")

#: nodes deqhess's own Functions make, and the first of their inputs the rule gives no
#: gradient to (``_Observed``: the cell's arguments; see :mod:`deqhess.nn.observed`)
_SILENT_FROM = {"_ObservedBackward": 3}

#: a DEQ layer's fixed point: what reaches its output must be exactly zero
_FIXED_POINT = "FixedPointFunctionBackward"


@dataclass(frozen=True)
class Site:
    """Where a parameter meets the samples: an operation of the batch's graph.

    Attributes:
        node: the operation's autograd node (the gradient reaching its output is read).
        activation: ``[n_b, k]``, the matrix product's input ``a`` (row ``n`` is sample
            ``n``'s), for a weight; None for a bias added to each row.
        shape: the parameter's shape (the gradient reaching a site is ``[n_b, o]`` for a
            weight ``[o, k]``, ``[n_b, *shape]`` for a bias).
    """

    node: Any
    activation: Tensor | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Sites:
    """Where the chosen parameters meet the samples in a batch's graph, found in one walk.

    Attributes:
        per_parameter: per parameter (in the layout's order) its sites; empty where the
            output does not depend on it.
        fixed_points: the DEQ fixed points' nodes met on the way (what reaches each must
            be exactly zero, :func:`sample_rows` checks).
    """

    per_parameter: list[list[Site]]
    fixed_points: list[Any]


@dataclass
class Stacking:
    """Whether the stacked route is worth trying on the next batch of a model's passes.

    One per kind of pass (the dense GGN, the per-sample rows) and model, kept across
    passes: a batch the route fails on marks it, and the later graphs are formed as
    usual.

    Attributes:
        promising: no batch has failed it yet (its graphs are then formed with each DEQ
            layer's cell evaluated once more, ``layer_calls(visible=True)``).
    """

    promising: bool = True


@dataclass(frozen=True)
class SampleRows:
    """Each sample's factor rows of a batch, per parameter, as outer products or rows.

    Attributes:
        factors: per parameter (in the layout's order) a list of its sites' shares: a
            pair ``(g, a)`` (``[n_b, r, o]``, ``[n_b, k]``: sample ``n``'s row ``r`` is
            ``g[n, r] ⊗ a[n]``, the parameter ``[o, k]``), or a tensor ``[n_b, r, size]``
            (the rows themselves); an empty list for a parameter the output does not
            depend on.
        samples: ``n_b``.
        rank: ``r``, the rows a sample.
    """

    factors: list[list[tuple[Tensor, Tensor] | Tensor]]
    samples: int
    rank: int

    def parameter_rows(self, i: int, size: int, like: Tensor) -> Tensor:
        """Parameter ``i``'s rows, ``[n_b, r, size]``: its sites' shares added (or zeros).

        Args:
            i: the parameter's position.
            size: its number of entries.
            like: a tensor of the rows' dtype and device.

        Returns:
            ``[n_b, r, size]``; row ``[n, r]`` is sample ``n``'s ``r``-th.
        """
        total = like.new_zeros(self.samples, self.rank, size)
        for share in self.factors[i]:
            if isinstance(share, tuple):
                g, a = share
                total += (g[:, :, :, None] * a[:, None, None, :]).reshape(total.shape)
            else:
                total += share.reshape(total.shape)
        return total

    def dense(self, sizes: Sequence[int], like: Tensor) -> Tensor:
        """Every parameter's rows side by side, ``[n_b, r, P]`` in the layout's order.

        Args:
            sizes: the parameters' numbers of entries.
            like: a tensor of the rows' dtype and device.

        Returns:
            ``[n_b, r, P]``.
        """
        parts = [self.parameter_rows(i, size, like) for i, size in enumerate(sizes)]
        return torch.cat(parts, dim=2)


#: modules whose parameters meet the samples in operations no site reads (a convolution's
#: sum over positions, a norm's statistics, a lookup): a model holding one of the chosen
#: parameters is not asked to evaluate its DEQ cells visibly for the stacked route
NO_SITES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
    nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention,
    nn.Bilinear, nn.PReLU,
)  # fmt: skip


def may_have_sites(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether every chosen parameter's module may meet the samples at sites.

    A cheap look at the modules, before any graph: False where one of ``names`` belongs
    to a module of :data:`NO_SITES` (a graph formed for the route would only be slower);
    True otherwise (the graph decides).

    Args:
        model: the model.
        names: the chosen parameters' names in it.

    Returns:
        Whether the stacked route is worth a try.
    """
    modules = dict(model.named_modules())
    for name in names:
        owner = modules.get(name.rpartition(".")[0])
        if isinstance(owner, NO_SITES):
            return False
    return True


def find_sites(output: Tensor, params: Sequence[Tensor], samples: int) -> Sites | None:
    """The sites of each of ``params`` in the graph of ``output``, if each has only these.

    One walk of the graph, which also collects its DEQ fixed points.

    Args:
        output: the batch's output (its graph is read, not run).
        params: the chosen parameters (leaves of the graph).
        samples: the batch's sample count.

    Returns:
        The :class:`Sites`; None where a parameter meets the graph anywhere else than at
        a site or a DEQ layer's fixed point. The fixed points are :func:`sample_rows`'s
        to check.
    """
    index = {id(p): i for i, p in enumerate(params)}
    sites: list[list[Site]] = [[] for _ in params]
    fixed_points: list[Any] = []
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if name == _FIXED_POINT:
            fixed_points.append(node)
        for position, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            leaf = index.get(id(getattr(child, "variable", None)))
            if leaf is not None:  # the parameter itself, as this node's input
                site = _bias_site(node, name, position, params[leaf], samples)
                if site is False:
                    return None
                if site is not None:
                    sites[leaf].append(site)
            elif type(child).__name__ in TRANSPOSES and plain_transpose(child):
                weight = index.get(id(getattr(child.next_functions[0][0], "variable", None)))
                if weight is not None:
                    site = _weight_site(node, name, position, params[weight], samples)
                    if site is None:
                        return None
                    sites[weight].append(site)
                    seen.add(id(child))  # the transpose's only consumer is this product
                    continue
            stack.append(child)
    return Sites(sites, fixed_points)


def _bias_site(node: Any, name: str, position: int, param: Tensor, samples: int) -> Any:
    """A parameter that is a node's own input: a bias site, ``None`` (silent), or False."""
    if name in _SILENT_FROM and position >= _SILENT_FROM[name]:
        return None  # a rule that gives this input no gradient
    if name == _FIXED_POINT:
        return None  # checked by sample_rows: what reaches its output is zero
    if name == "AddmmBackward0" and position == 0 and param.ndim == 1:
        return Site(node, None, tuple(param.shape)) if unit_factor(node, "_saved_beta") else False
    if name == "AddBackward0" and unit_factor(node, "_saved_alpha"):
        return Site(node, None, tuple(param.shape))  # its gradient's shape is checked
    return False


def _weight_site(node: Any, name: str, position: int, param: Tensor, samples: int) -> Any:
    """A weight taken transposed into a matrix product whose rows are the samples."""
    if param.ndim != 2:
        return None
    if name == "AddmmBackward0" and position == 2 and unit_factor(node, "_saved_alpha"):
        activation = node._saved_mat1
    elif name == "MmBackward0" and position == 1:
        activation = node._saved_self
    else:
        return None
    if activation.shape != (samples, param.shape[1]):
        return None
    return Site(node, activation.detach(), tuple(param.shape))


def plain_transpose(node: Any) -> bool:
    """A ``.T`` / ``.permute(1, 0)`` of a leaf, nothing else."""
    if type(node).__name__ == "PermuteBackward0" and tuple(node._saved_dims) != (1, 0):
        return False
    return len(node.next_functions) == 1


def unit_factor(node: Any, attribute: str) -> bool:
    """Whether an operation's scalar factor (``addmm``'s ``alpha``/``beta``) is 1."""
    value = getattr(node, attribute, 1)
    return isinstance(value, (int, float)) and value == 1


def sample_rows(
    output: Tensor, sites: Sites, stacked: Tensor, samples: int, seed: int = 0
) -> SampleRows | None:
    """Each sample's rows from ``r`` stacked cotangents, if the backward keeps samples apart.

    Args:
        output: the batch's output ``[n_b, ...]``.
        sites: :func:`find_sites`'s answer for the chosen parameters.
        stacked: ``[r, n_b, ...]``: cotangent ``r`` holds each sample's ``r``-th factor row
            in its own row.
        samples: ``n_b``.
        seed: the probes' draw.

    Returns:
        The rows as :class:`SampleRows`; None where the probes find two samples coupled
        (by any nonzero amount), a fixed point's
        output receives a nonzero gradient, a product is not finite, or a site's
        gradient is not shaped as its parameter's rows.
    """
    per_parameter = sites.per_parameter
    flat = [site for per in per_parameter for site in per]
    edges = [GradientEdge(site.node, 0) for site in flat]
    edges += [GradientEdge(node, 0) for node in sites.fixed_points]
    r = stacked.shape[0]
    if not edges or r == 0:  # nothing depends on θ, or ∇²ℓ = 0 (every target ignored)
        return SampleRows([[] for _ in per_parameter], samples, r)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    probe = probe.to(output.device)
    scales = probe_scales(samples, output.dtype, output.device)  # [L, n_b]
    factor = scales.reshape(*scales.shape, *([1] * (output.ndim - 1)))
    cotangents = torch.cat([stacked, probe[None], factor * probe[None]])
    grads = _backward(output, edges, cotangents)
    if grads is None:
        return None
    for g in grads[len(flat) :]:  # the fixed points' outputs: exactly zero
        if g is not None and bool(g.any()):
            return None
    shares: list[list[tuple[Tensor, Tensor] | Tensor]] = [[] for _ in per_parameter]
    owner = [i for i, per in enumerate(per_parameter) for _ in per]
    for site, i, g in zip(flat, owner, grads, strict=False):
        if g is None:
            continue
        rows = site.shape if site.activation is None else site.shape[:1]
        if tuple(g.shape[1:]) != (samples, *rows) or not bool(torch.isfinite(g).all()):
            return None
        # exactly: rows kept apart scale bit for bit with their power-of-two factors, and
        # a leak however weak can be amplified without bound downstream (a gain of 1e7 on
        # the sample it leaks into made a 1e-6 coupling 6e-7 of the rows); entry by entry,
        # since norms of rows of ~1e-160 underflow and read any leak as none
        if not scales_exactly(g[r], g[r + 1 :], scales):
            return None
        # a leak below rounding hides under the largest row, and the rows' spread over
        # the samples (downstream gains in g, inputs in a) scales it up to ε·spread
        spread = row_spread(g[r]) * (
            1.0 if site.activation is None else row_spread(site.activation)
        )
        if spread > torch.finfo(g.dtype).eps ** -0.5:
            return None
        share = g[:r].transpose(0, 1)  # [n_b, r, ...]
        if site.activation is None:
            shares[i].append(share.reshape(samples, r, -1))
        else:  # a copy: the input's memory may be reused after the batch (a loader's)
            shares[i].append((share.reshape(samples, r, -1), site.activation.clone()))
    return SampleRows(shares, samples, r)


def stacked_sample_rows(
    output: Tensor, params: Sequence[Tensor], stacked: Tensor, samples: int,
    fits: Callable[[int], bool] | None = None,
) -> SampleRows | None:  # fmt: skip
    """Each sample's rows of ``output`` from ``r`` stacked cotangents, where the graph allows.

    The route's one entry (the dense GGN's and the per-sample rows'): the sites
    (:func:`find_sites`), then, if ``fits`` accepts how many cotangents go through the
    graph at once, the rows and their certificate (:func:`sample_rows`).

    Args:
        output: the batch's output, ``[n_b, ...]``.
        params: the chosen parameters.
        stacked: ``[r, *output.shape]``: cotangent ``r`` holds each sample's ``r``-th
            row in its own row.
        samples: ``n_b``.
        fits: called with the cotangents of the one backward (``r``, a random probe and
            its scaled copies) before it runs; False: not tried (None: always tried).

    Returns:
        The rows; None where the output's rows are not the samples, a parameter meets
        them elsewhere than at a site, ``fits`` declines, or the certificate fails (the
        caller's one-hot route then).
    """
    if samples < 1 or output.ndim == 0 or output.shape[0] != samples:
        return None
    sites = find_sites(output, params, samples)
    if sites is None:
        return None
    width = stacked.shape[0] + 1 + probe_scales(samples, output.dtype, output.device).shape[0]
    if fits is not None and not fits(width):
        return None
    with torch.enable_grad():
        return sample_rows(output, sites, stacked.to(output), samples)


def row_spread(rows: Tensor) -> float:
    """The largest row's norm over the rows' median (1 for rows all zero).

    A coupling below rounding is invisible to the probes; leaked into a row ``b``, it is
    amplified in the rows by how far row ``b`` stands above the others (a sample with
    inputs 10³⁰ times the others' made a 1e-28 leak 0.71 of a per-sample gradient), so
    the route asks that spread to stay below ``1/√ε`` (error ≲ √ε: 1.5e-8 in float64).

    Returns:
        ``max‖row‖ / median‖row‖`` over the samples.
    """
    norms = torch.linalg.vector_norm(rows.reshape(rows.shape[0], -1).double(), dim=1)
    largest, typical = float(norms.max()), float(norms.median())
    if largest == 0.0:
        return 1.0
    return largest / typical if typical > 0.0 else float("inf")


def _backward(output: Tensor, edges: list[GradientEdge], cotangents: Tensor) -> list | None:
    """The gradients reaching ``edges`` for each cotangent (vmapped, else one by one)."""

    def one(cotangent: Tensor) -> tuple:
        return torch.autograd.grad(output, edges, cotangent, retain_graph=True, allow_unused=True)

    try:
        return list(torch.func.vmap(one)(cotangents))
    except DeqhessError:
        raise
    except RuntimeError:
        pass
    rows = [one(c) for c in cotangents]
    return [
        None if column[0] is None else torch.stack(column) for column in zip(*rows, strict=True)
    ]
