"""Extreme eigenpairs: thick-restart Lanczos within a cap on products, or dense ``eigh``.

Lanczos' pairs are confirmed by one Rayleigh–Ritz step on their span (one block product
``H Q``, ``Q`` an orthonormal basis of it): the returned vectors are orthonormal to
rounding, and each residual ``‖H v − λ v‖`` comes from that product, not from the
recurrence. It is each pair's error bound — a bound against the eigenvalues of the
operator *as computed* (its dtype, its inexact fixed point and solves), not of the exact
Hessian: add the operator's own error (:func:`deqhess.curvature.operator_accuracy`), or
bound against a float64 reference with :meth:`EigenResult.residuals_against`. Operators
of at most ``dense_below`` rows (default ``max(256, 8k)``) are formed densely with ``P``
products and diagonalised exactly.

Lanczos (:mod:`deqhess.curvature.lanczos`) stops when every wanted pair has
``‖H v − θ v‖ ≤ tol · ‖H‖`` by that product (when the recurrence says so but the product
does not, it goes on), or at ``max_hvps`` products with an
:class:`deqhess.AnalysisConvergenceError` carrying the Ritz pairs reached.
SciPy's ``eigsh`` (ARPACK) was used before: its test is relative to each eigenvalue,
which eigenvalues near zero of a spectrum spanning many orders of magnitude cannot meet,
and its default cap of ``10·P`` restarts let ``which="smallest"`` run 64,021 products at
``P = 400`` before failing. No shift of the operator helps a Krylov method (``H − σI``
has the same Krylov spaces as ``H``): eigenvalues whose gaps are tiny relative to
``‖H‖`` separate slowly whatever the method, so the cap, not ``P``, bounds the work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..callers import user_stacklevel
from ..errors import AnalysisConvergenceError, InputError
from ..options import integer, real
from .accuracy import check_symmetric, require_symmetric_matrix
from .base import Counted, SymmetricOperator, checked_operator, seed_value
from .lanczos import lanczos_extreme

__all__ = ["EigenResult", "check_k", "default_max_hvps", "extreme_eigenpairs"]

#: ``P`` up to which the matrix is formed and diagonalised (``P`` products, ``eigh``)
DENSE_BELOW = 256
#: … and up to this many rows per wanted pair: Lanczos needs several products a pair
DENSE_PER_PAIR = 8

#: the narrowest default block on a streamed operator (a pass costs about the same up to ~10)
STREAMED_BLOCK = 8
_WHICH = ("largest", "smallest", "magnitude")
#: the default ``tol`` by dtype: relative to ``‖H‖``, a little above rounding
_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def check_k(k: object, size: int, name: str = "k") -> int:
    """:func:`extreme_eigenpairs`' ``k``, checked before any product.

    Args:
        k: how many pairs were asked for.
        size: ``P``, the operator's size.
        name: the argument's name, for the message.

    Returns:
        ``k`` as an int.

    Raises:
        InputError: ``k`` is not an int (a float, a bool), or lies outside ``[1, P)``.
    """
    number = integer(k, name)
    if not 1 <= number < size:
        raise InputError(f"{name} must lie in [1, P) = [1, {size}); got {number}.")
    return number


def default_max_hvps(k: int) -> int:
    """The default cap on Lanczos products for ``k`` pairs.

    It grows with what is asked, not with ``P``: about ten times what a top-``k`` of a
    DEQ Hessian usually takes (30–60 block steps of ``k`` products); a run that needs
    more is slow for a reason the error names (eigenvalues close together relative to
    ``‖H‖``, as at the bottom of a spectrum spanning many orders of magnitude).

    Returns:
        ``300·(k + 1)``.
    """
    return 300 * (k + 1)


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs in **ascending** order of eigenvalue, whatever ``which`` asked for.

    It is the order of ``torch.linalg.eigh`` and SciPy's ``eigsh``: the largest of a
    ``which="largest"`` request is ``eigenvalues[-1]``, the smallest of a
    ``"smallest"`` one ``eigenvalues[0]``, and ``"magnitude"`` pairs are sorted by value,
    not by ``|λ|``.

    Attributes:
        eigenvalues: ``[k]``, ascending.
        eigenvectors: ``[P, k]``, orthonormal columns, column ``i`` belonging to
            ``eigenvalues[i]``.
        residuals: ``[k]`` ``‖H v − λ v‖`` with ``H`` the operator as computed: some
            eigenvalue of that operator lies within it of ``λ``. It says nothing of how
            far that operator is from the exact Hessian (in float32 usually much
            further: see :func:`deqhess.curvature.operator_accuracy`). In the result an
            :class:`deqhess.AnalysisConvergenceError` carries, these are the Lanczos
            recurrence's values (no product spent on them), unless its message says
            they come from the product (the recurrence reached ``tol``, the product not).
        num_hvps: Hessian-vector products used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_hvps: int

    def residuals_against(self, reference: SymmetricOperator) -> Tensor:
        """The pairs' residuals against a more accurate operator, at ``k`` of its products.

        Args:
            reference: the same operator computed more accurately, e.g. the problem
                rebuilt in float64.

        Returns:
            ``[k]`` ``‖H_ref v − λ v‖`` in float64: some eigenvalue of ``reference`` lies
            within it of ``λ``.
        """
        vectors = self.eigenvectors.to(reference.dtype).to(reference.device)
        values = self.eigenvalues.to(reference.dtype).to(reference.device)
        residual = reference.matmat(vectors) - vectors * values
        return torch.linalg.vector_norm(residual.double(), dim=0).cpu()


def extreme_eigenpairs(
    op: SymmetricOperator,
    k: int = 5,
    which: str = "largest",
    tol: float | None = None,
    max_iter: int | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
    dense_below: int | None = None,
    *,
    max_hvps: int | None = None,
    basis_size: int | None = None,
    block_size: int | None = None,
) -> EigenResult:
    """The ``k`` largest, smallest or largest-magnitude eigenpairs of a symmetric operator.

    By thick-restart (block) Lanczos with full reorthogonalisation, or ``eigh`` of the
    dense matrix for small ``P``.

    Args:
        op: the symmetric ``P × P`` operator.
        k: how many pairs, ``1 ≤ k < P``.
        which: ``"largest"`` (top), ``"smallest"`` (bottom; H may be indefinite) or
            ``"magnitude"``.
        tol: stop when every pair has ``‖H v − λ v‖ ≤ tol · ‖H‖`` (``‖H‖`` estimated by
            the largest ``|Ritz value|`` met); default 1e-10 in float64, 1e-5 in float32.
            Relative to ``‖H‖``, not to each eigenvalue: eigenvalues near zero are found
            to about ``tol · ‖H‖``, which is what their residuals then bound.
        max_iter: deprecated (ARPACK's restarts); converted to a cap on products.
        seed: seeds the starting block and the random directions that continue the run
            where the Krylov space is exhausted (an int); None draws fresh, unrepeatable
            ones.
        progress: a progress bar of products against ``max_hvps`` (None: only on a
            terminal).
        dense_below: form the matrix (``P`` products) and use ``eigh`` when ``P`` is at
            most this; default ``max(256, 8k)`` (Lanczos for ``k`` pairs takes from a
            few ``k`` products on a decaying spectrum to about ``P`` on a flat one: at
            ``P = 272``, ``k = 40``, 359 for the largest and 682 for the smallest of a
            random symmetric matrix).
        max_hvps: cap on Lanczos products (a block of ``b`` counts ``b``); default
            :func:`default_max_hvps` ``(k) = 300·(k + 1)`` (1,800 for ``k = 5``), whatever
            ``P``. The ``k`` products of each Rayleigh–Ritz step that confirms the
            residuals come on top (one step, unless the product contradicts the
            recurrence); 2 products measuring the operator's asymmetry come first
            (counted in ``num_hvps``; a non-symmetric operator is refused). Where the
            default cap also holds the dense route (``P + k`` products) and neither it nor
            ``dense_below`` was given, Lanczos gets the rest, and a run that does not
            converge there (eigenvalues it cannot separate in time: a 176-fold 0 at
            ``P = 304``) ends in the dense ``eigh`` instead of an error.
        basis_size: Lanczos vectors kept (memory ``basis_size · P`` numbers); default
            ``max(20, k + 8b)``, at most ``P``.
        block_size: ``b``, directions per product; default ``k`` (at most ``P − k``) for
            ``which="smallest"``, else 1. A Krylov space grown from ``b`` vectors holds at
            most ``b`` copies of a repeated eigenvalue, so with ``b < k`` the returned
            pairs may miss copies and still have small residuals — unless the space
            becomes invariant (an operator with few distinct eigenvalues, such as a
            low-rank one with 0 of high multiplicity): the run then goes on from random
            directions orthogonal to it, which find further copies, and stops only when
            what lies outside can hold no eigenvalue beyond the wanted ones (with
            probability 1 over those directions). The bottom of a
            curvature operator is where that happens — 0 is an eigenvalue of multiplicity
            ``P − rank`` of a loss curvature or GGN with fewer outputs than parameters —
            hence the block there; the top is rarely repeated, and one vector per step
            takes 2–2.7× fewer products (measured on DEQ Hessians, P = 1,568 and 6,208):
            pass ``block_size=k`` where it may be. A ``[P, b]`` block costs less than
            ``b`` single products (the solves are shared); on an operator whose every
            product is a pass over a data set (``op.streamed``: ``ModelCurvature``'s and
            ``DatasetEquilibrium``'s) a block of ten costs about one product, so the
            default there is ``max(2k, 8)`` (at most ``P − k``) for every ``which``:
            1.7–2.8× faster than one vector per step (top-5 of whole DEQ models, P ≈
            2–3.5k), and a wide block finds the bottom of a GGN's null space where
            narrow ones stall (k = 1 on a 224-dimensional null space at P = 272: 57
            products with 8, the cap of 600 with 2).

    Returns:
        The pairs in ascending order of eigenvalue (see :class:`EigenResult`),
        orthonormal, with their residuals ``‖H v − λ v‖`` from ``k`` products (the
        Rayleigh–Ritz step on Lanczos' pairs), each within ``tol · ‖H‖``; ``num_hvps``
        counts every product.

    Raises:
        AnalysisConvergenceError: ``max_hvps`` products did not reach ``tol``, or did
            not reach it by the product (a ``tol`` near the product's own error); the
            message gives the Ritz values and residuals reached, and ``.result`` holds
            them (an :class:`EigenResult`).
        InputError: ``which``, ``k``, ``tol``, ``max_hvps``, ``basis_size`` or
            ``block_size`` out of range.
    """
    checked_operator(op, "extreme_eigenpairs")
    seed = seed_value(seed)
    if which not in _WHICH:
        raise InputError(f"unknown which={which!r}; use one of {sorted(_WHICH)}.")
    size = op.shape[0]
    k = check_k(k, size)
    below = max(DENSE_BELOW, DENSE_PER_PAIR * k) if dense_below is None else dense_below
    if size <= integer(below, "dense_below", minimum=0):
        return _dense(op, k, which, progress)
    tol = _DEFAULT_TOL.get(op.dtype, 1e-5) if tol is None else tol
    tol = real(tol, "tol", minimum=0.0, below=1.0,
               meaning="It is the residual each pair must reach, relative to ‖H‖.")  # fmt: skip
    if block_size is None:
        if getattr(op, "streamed", False):  # a block of directions shares each pass
            block = min(max(2 * k, STREAMED_BLOCK), size - k)
        else:
            block = min(k, size - k) if which == "smallest" else 1
    else:
        block = integer(block_size, "block_size", minimum=1)
    default_basis = min(size, max(k + 8 * block, 20))
    basis_size = default_basis if basis_size is None else integer(basis_size, "basis_size")
    if not k + block <= basis_size <= size:
        raise InputError(
            f"basis_size must lie in [k + block_size, P] = [{k + block}, {size}]; got {basis_size}."
        )
    if max_iter is not None:
        warnings.warn(
            "extreme_eigenpairs(max_iter=...) is deprecated: it counted ARPACK's restarts; "
            "pass max_hvps, a cap on products.",
            DeprecationWarning,
            stacklevel=user_stacklevel(),
        )
        restart = basis_size - (k + (basis_size - block - k) // 2)
        max_hvps = basis_size + integer(max_iter, "max_iter", minimum=0) * restart
    # with the defaults, where the cap holds the dense route too (P products, k more for
    # the residuals), Lanczos runs within the rest and, failing, the matrix is formed:
    # exact, within the cap (a cap or a dense_below of the caller's own is kept as given)
    dense_route = size + k
    chosen = max_hvps is not None or dense_below is not None
    max_hvps = default_max_hvps(k) if max_hvps is None else max_hvps
    max_hvps = integer(max_hvps, "max_hvps", minimum=block * -(-k // block))
    fallback = not chosen and max_hvps >= dense_route
    if fallback:
        rest = max_hvps - dense_route - k  # its Rayleigh–Ritz step's k on top
        if rest < block * -(-k // block):
            return _dense(op, k, which, progress)
        max_hvps = rest
    start = torch.as_tensor(
        np.random.default_rng(seed).standard_normal((size, block)), dtype=op.dtype,
        device=op.device,
    )  # fmt: skip
    with Counted(op, max_hvps, progress, f"Lanczos ({which} {k})") as counted:
        # Lanczos assumes H = Hᵀ: a non-symmetric operator would run to the cap (2 products)
        check_symmetric(counted, "H", "Lanczos' eigenpairs are not its eigenpairs")
        pairs = lanczos_extreme(counted, k, which, tol, max_hvps, basis_size, start, seed)
    found = EigenResult(pairs.values, pairs.vectors, pairs.residuals, counted.products)
    if not pairs.converged and fallback:  # eigenvalues Lanczos cannot separate: eigh
        dense = _dense(op, k, which, progress)
        return replace(dense, num_hvps=dense.num_hvps + counted.products)
    if not pairs.converged:
        explain = _unconfirmed if pairs.measured else _unconverged
        raise AnalysisConvergenceError(
            explain(found, which, tol, pairs.scale, max_hvps), found, counted.products,
            max_hvps,
        )  # fmt: skip
    return found


def _dense(op: SymmetricOperator, k: int, which: str, progress: bool | None) -> EigenResult:
    """All ``P`` columns by products, then ``eigh``: exact, ``P`` products."""
    size = op.shape[0]
    with Counted(op, size, progress, "dense eigh") as counted:
        matrix = counted.matmat(torch.eye(size, dtype=op.dtype, device=op.device))
        require_symmetric_matrix(matrix, "H", "its eigenvalues need not be real")
        values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
        pick = {
            "largest": torch.arange(size - k, size),
            "smallest": torch.arange(k),
            "magnitude": torch.argsort(values.abs().cpu(), stable=True)[-k:],
        }[which].to(values.device)
        pick = pick[torch.argsort(values[pick])]
        values, vectors = values[pick], vectors[:, pick]
        residual = op.matmat(vectors) - vectors * values
    return EigenResult(values, vectors, torch.linalg.vector_norm(residual, dim=0), size + k)


@dataclass(frozen=True)
class _Reached:
    """What the cap messages quote of the pairs reached: counts, figures, the lists."""

    k: int
    target: float
    met: int
    values: str
    residuals: str
    needed: float

    @classmethod
    def of(cls, result: EigenResult, tol: float, scale: float) -> _Reached:
        target = tol * scale
        return cls(
            k=len(result.eigenvalues),
            target=target,
            met=int((result.residuals <= target).sum()),
            values=", ".join(f"{v:+.4e}" for v in result.eigenvalues.tolist()),
            residuals=", ".join(f"{r:.1e}" for r in result.residuals.tolist()),
            needed=float(result.residuals.max()) / max(scale, 1e-300),
        )


def _unconverged(reached: EigenResult, which: str, tol: float, scale: float, max_hvps: int) -> str:
    r = _Reached.of(reached, tol, scale)
    spread = float(reached.eigenvalues.max() - reached.eigenvalues.min())
    other = "" if which == "largest" else ", or ask for the top of the spectrum if that serves"
    crowd = (
        f"These Ritz values lie within {spread:.1e} of each other, "
        f"{spread / max(scale, 1e-300):.0e} of ‖H‖: eigenvalues"
        if r.k > 1
        else "Eigenvalues"
    )
    return (
        f"Lanczos reached its cap of {max_hvps} products (max_hvps) with {r.met} of the {r.k} "
        f"{which} eigenpairs within tol·‖H‖ = {tol:.0e}·{scale:.3e} = {r.target:.1e}: Ritz "
        f"values [{r.values}] with residuals [{r.residuals}] (some eigenvalue lies within "
        f"each residual of its Ritz value; the error's .result holds the pairs), which "
        f"tol >= {r.needed:.1e} would accept. {crowd} close together relative to ‖H‖ "
        "separate slowly in any Krylov method (shifting H does not change its Krylov "
        "spaces); a wider block and basis often do it in fewer products where many "
        "eigenvalues crowd at the end asked for (a null space at the bottom of a GGN): "
        f"ask for more pairs (a larger k) or pass block_size and basis_size. Loosen tol, "
        f"raise max_hvps{other}."
    )


def _unconfirmed(found: EigenResult, which: str, tol: float, scale: float, max_hvps: int) -> str:
    r = _Reached.of(found, tol, scale)
    eps = torch.finfo(found.eigenvalues.dtype).eps
    other = "" if found.eigenvalues.dtype == torch.float64 else "; compute it in float64"
    return (
        f"Lanczos' recurrence put the {r.k} {which} Ritz pairs within tol·‖H‖ = {tol:.0e}·"
        f"{scale:.3e} = {r.target:.1e}, but recomputed from a product only {r.met} were, and "
        f"more steps up to the cap of {max_hvps} products (max_hvps) did not change that: "
        f"Ritz values [{r.values}] with residuals from the product [{r.residuals}] (the "
        f"error's .result holds these pairs), which tol >= {r.needed:.1e} would accept. The "
        f"product itself is that inexact: its rounding (about {eps:.0e}·‖H‖ times a small factor) "
        "or the operator's own error (inexact solves: see "
        f"deqhess.curvature.operator_accuracy) is above tol·‖H‖. Loosen tol{other}."
    )
