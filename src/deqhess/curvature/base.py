"""What every analysis takes: a symmetric operator applied to ``[P, K]`` blocks.

A symmetric :class:`deqhess.operator.Operator` — a :class:`deqhess.CurvatureOperator`
(Hessian, loss curvature, dynamics curvature of one equilibrium or of a data set) or a
:class:`ParameterBlock` of one — or anything else with ``shape``, ``dtype``, ``device``
and ``matmat`` (:class:`SymmetricOperator`). :class:`Counted` wraps an operator to count
its products and drive a progress bar, without touching the operator itself.
"""

from __future__ import annotations

import contextlib
import operator
import secrets
import warnings
from collections.abc import Sequence
from typing import Protocol, SupportsIndex, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..callers import user_stacklevel
from ..errors import InputError
from ..operator import Operator
from ..options import integer
from ..parameters import ParameterLayout

__all__ = [
    "FEW_PROBES",
    "Counted",
    "ParameterBlock",
    "SymmetricOperator",
    "checked_operator",
    "count",
    "generator",
    "rademacher",
    "seed_value",
    "warn_few_probes",
]

#: fewer probes than this behind a standard error: it is itself too uncertain to quote
FEW_PROBES = 4

_SEEDS = 2**63  # seeds NumPy and torch both take


class SymmetricOperator(Protocol):
    """What the analyses need of a symmetric ``P × P`` operator.

    Attributes:
        shape: ``(P, P)``.
        dtype: the dtype of its products.
        device: the device of its products.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, block: Tensor) -> Tensor:
        """``A V`` for a block ``V`` ``[P, K]``, returning ``[P, K]``."""
        ...


def checked_operator(op: object, analysis: str, *, symmetric: bool = True) -> int:
    """Refuse what an analysis cannot take as its ``P × P`` operator; return ``P``.

    Args:
        op: what the caller passed as the operator.
        analysis: the analysis's name, for the message.
        symmetric: whether the analysis needs a symmetric operator (eigenpairs, spectral
            densities, inverses): then one that says ``symmetric=False`` is refused.

    Returns:
        ``P``, the operator's size.

    Raises:
        InputError: ``op`` is a tensor, lacks ``shape``/``dtype``/``device``/``matmat``,
            is not square, or says it is not symmetric where the analysis needs it to be.
    """
    if isinstance(op, Tensor):
        raise InputError(
            f"{analysis} takes an operator (shape, dtype, device and matmat), not a tensor "
            f"({tuple(op.shape)}): pass a curvature operator such as "
            "ModelCurvature(...).hessian_operator() or Equilibrium.hessian_operator(loss); "
            "for a matrix you hold, use torch.linalg directly."
        )
    missing = [name for name in ("shape", "dtype", "device", "matmat") if not hasattr(op, name)]
    if missing:
        raise InputError(
            f"{analysis} takes an operator with shape, dtype, device and matmat; "
            f"{type(op).__name__} has no {', '.join(missing)}."
        )
    shape = tuple(op.shape)  # type: ignore[attr-defined]
    if len(shape) != 2 or shape[0] != shape[1]:
        raise InputError(f"{analysis} needs a square P × P operator; got shape {shape}.")
    if symmetric and getattr(op, "symmetric", True) is False:
        name = type(op).__name__
        inherited = "symmetric" not in vars(op) and all(
            "symmetric" not in vars(kind) for kind in type(op).__mro__ if kind is not Operator
        )
        says = (
            f"{name} inherits symmetric=False from deqhess.operator.Operator (set "
            "symmetric = True on the class if it is symmetric)"
            if inherited
            else f"{name} says it is not (symmetric=False)"
        )
        raise InputError(
            f"{analysis} needs a symmetric operator, and {says}. Pass a symmetric operator "
            "(a Hessian, GGN or Fisher), or symmetrise your own as (A + Aᵀ)/2."
        )
    return int(shape[0])


def count(value: object, name: str, minimum: int, analysis: str, why: str = "") -> int:
    """``value`` as an int of at least ``minimum``: an analysis' count of probes or products.

    The one check of such counts, so that an analysis and a caller checking its arguments
    before any work (``deqhess analyze``) refuse the same values with the same words.

    Args:
        value: what the caller passed.
        name: the argument's name, for the message (e.g. ``"num_probes"``).
        minimum: the fewest the analysis can work with.
        analysis: the analysis' name, for the message.
        why: why the minimum, appended to it (e.g. ``" for an error estimate"``).

    Returns:
        The count.

    Raises:
        InputError: ``value`` is not an int (a float, a bool), or is below ``minimum``.
    """
    number = integer(value, name)
    if number < minimum:
        raise InputError(f"{analysis} needs {name} >= {minimum}{why}; got {number}.")
    return number


def holding(op: object, products: int | None = None) -> contextlib.AbstractContextManager[None]:
    """``op.holding(products)`` where it has one (:meth:`deqhess.operator.Operator.holding`)."""
    held = getattr(op, "holding", None)
    return held(products) if callable(held) else contextlib.nullcontext()


class Counted(Operator):
    """``op`` with a count of matrix-vector products and an optional progress bar.

    Used as a context manager by every analysis: inside, ``op`` is held
    (:meth:`deqhess.operator.Operator.holding`: a model's operator keeps each batch's
    graph from one product to the next) when the analysis takes more than one;
    leaving it closes the bar.

    Args:
        op: the operator.
        total: expected number of products, for the bar (None: unknown).
        progress: show a bar (None: only on a terminal).
        desc: the bar's label.
        hold: hold ``op`` inside the block (False for an analysis of one block product:
            nothing would be taken from what is kept).
    """

    def __init__(
        self,
        op: SymmetricOperator,
        total: int | None,
        progress: bool | None,
        desc: str,
        hold: bool = True,
    ) -> None:
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.symmetric = getattr(op, "symmetric", True)  # analyses take symmetric operators
        self.streamed = getattr(op, "streamed", False)
        self.products, self.total, self.hold = 0, total, hold
        self._held = contextlib.ExitStack()
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="HVP",
            disable=None if progress is None else not progress,
            leave=False,
        )

    def matmat(self, block: Tensor) -> Tensor:
        """``A V``, counting the K products and advancing the bar.

        Args:
            block: directions ``[P, K]``.

        Returns:
            ``A V`` ``[P, K]``.

        Raises:
            InputError: the operator returned another shape or dtype than the block's.
        """
        out = self.op.matmat(block)
        if not (isinstance(out, Tensor) and out.shape == block.shape and out.dtype == self.dtype):
            got = (out.shape, out.dtype) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(
                f"{type(self.op).__name__}.matmat returned {got} for a {tuple(block.shape)} "
                f"block of {self.dtype}: an operator's matmat maps [P, K] blocks to [P, K] "
                "blocks of its own dtype."
            )
        self.products += block.shape[1]
        self.bar.update(block.shape[1])
        return out

    def __enter__(self) -> Counted:
        if self.hold:
            self._held.enter_context(holding(self.op, self.total))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._held.close()
        finally:
            self.close()

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


class ParameterBlock(Operator):
    """The principal block of an operator on some named parameters: ``H[I, I]``.

    Args:
        op: the full ``P × P`` operator.
        layout: θ's layout (names and sizes) — the operator's own, e.g.
            ``eq.problem.params`` or ``curvature.layout``: it must hold ``P`` parameters.
        names: the parameter names to keep (dict θ only), in the order the block's rows
            and columns take: ``I`` is their index ranges one after the other.

    Attributes:
        layout: the block's own layout (the kept parameters, in ``names``' order), for
            splitting a result on the block by parameter, e.g.
            ``diagonal(block).by_parameter(block.layout)``.

    Raises:
        InputError: ``layout`` is not a :class:`deqhess.parameters.ParameterLayout`,
            holds another number of parameters than the operator, or differs from the
            operator's own ``layout`` where it has one (a curvature operator, a block);
            θ is not a dict, or ``names`` is empty, unknown or repeated.
    """

    def __init__(self, op: SymmetricOperator, layout: ParameterLayout, names: Sequence[str]):
        if not isinstance(layout, ParameterLayout):
            raise InputError(
                "ParameterBlock takes θ's ParameterLayout (eq.problem.params, or "
                f"curvature.layout for a ModelCurvature); got {type(layout).__name__}."
            )
        if layout.size != op.shape[0]:
            raise InputError(
                f"ParameterBlock: the layout holds {layout.size} parameters but the operator "
                f"is {op.shape[0]} × {op.shape[1]}, so its index ranges would pick other "
                "entries: pass the layout of the operator's own θ (eq.problem.params, or "
                "curvature.layout of the ModelCurvature that made the operator)."
            )
        own = getattr(op, "layout", None)
        if isinstance(own, ParameterLayout) and (own.names, own.shapes) != (
            layout.names,
            layout.shapes,
        ):
            raise InputError(
                f"ParameterBlock: the layout given, {layout.describe()}, is not the "
                f"operator's own θ, {own.describe()}, so its index ranges would pick other "
                "entries: pass the operator's layout (op.layout)."
            )
        if layout.names is None:
            raise InputError("parameter blocks need a dict theta (named parameters).")
        if isinstance(names, str):
            names = [names]
        if not names:
            raise InputError(f"names is empty; choose from {list(layout.names)}.")
        self.layout = layout.select(names)
        offsets = layout.offsets
        where = {n: i for i, n in enumerate(layout.names)}
        pieces = [torch.arange(offsets[where[n]], offsets[where[n] + 1]) for n in names]
        self.index = torch.cat(pieces).to(op.device)
        self.op = op
        self.symmetric = getattr(op, "symmetric", True)
        self.streamed = getattr(op, "streamed", False)
        self.names = list(names)
        size = len(self.index)
        self.shape, self.dtype, self.device = (size, size), op.dtype, op.device

    def holding(self, products: int | None = None) -> contextlib.AbstractContextManager[None]:
        """The full operator's block keeping what its products share."""
        return holding(self.op, products)

    def matmat(self, block: Tensor) -> Tensor:
        """``H[I, I] V``: ``V`` padded with zeros outside ``I``, one product of the full operator.

        Args:
            block: directions on the block's parameters ``[|I|, K]``.

        Returns:
            ``H[I, I] V`` ``[|I|, K]``.
        """
        full = block.new_zeros(self.op.shape[0], block.shape[1])
        full[self.index] = block
        return self.op.matmat(full)[self.index]


def seed_value(seed: object) -> int:
    """An analysis' ``seed`` as an int; ``None`` draws a fresh one from the OS's entropy.

    The one reading of ``seed`` for every randomised analysis (Lanczos' start and
    continuation, Hutchinson, Hutch++, the diagonal, the spectral density, the inverse
    diagonal's probes, ``operator_accuracy``): an int repeats its probes exactly;
    ``None`` (as NumPy's ``default_rng(None)``) gives different, unrepeatable probes at
    each call — for averaging over independent runs.

    Args:
        seed: what the caller passed.

    Returns:
        An int in ``[0, 2⁶³)``.

    Raises:
        InputError: not an int or None (a float, a bool, a string), or outside
            ``[0, 2⁶³)``.
    """
    if seed is None:
        return secrets.randbelow(_SEEDS)
    if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
        raise InputError(
            f"seed must be an int (or None for fresh, unrepeatable randomness); got {seed!r} "
            f"({type(seed).__name__})."
        )
    number = operator.index(cast(SupportsIndex, seed))
    if not 0 <= number < _SEEDS:
        raise InputError(f"seed must lie in [0, 2**63); got {number}.")
    return number


def generator(seed: object) -> torch.Generator:
    """A CPU generator seeded by :func:`seed_value` ``(seed)``.

    Args:
        seed: an int, or None for fresh, unrepeatable randomness.

    Returns:
        The generator.
    """
    return torch.Generator().manual_seed(seed_value(seed))


def rademacher(
    size: int, count: int, generator: torch.Generator, like: SymmetricOperator
) -> Tensor:
    """``[size, count]`` random ±1 probes in the operator's dtype and device."""
    signs = torch.randint(0, 2, (size, count), generator=generator).to(like.dtype) * 2 - 1
    return signs.to(like.device)


def warn_few_probes(probes: int, measured: str, advice: str) -> None:
    """Warn that a standard error from fewer than :data:`FEW_PROBES` probes is no error bar.

    The sample standard deviation of ``n`` probes is itself uncertain: ``±1`` standard
    error covers the truth about as often as a Student ``t`` with ``n − 1`` degrees of
    freedom allows (50% at ``n = 2``, not 68%).

    Args:
        probes: the probes behind the standard error.
        measured: what it was worth in a measurement, for the message.
        advice: what to pass instead, for the message.
    """
    if probes < FEW_PROBES:
        warnings.warn(
            f"the standard error rests on {probes} probes and is itself uncertain (measured: "
            f"{measured}); {advice} for an error bar to quote.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
