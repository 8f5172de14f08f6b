"""Inverse-Hessian-vector products: ``(H + δI) x = b`` by damped CG or MINRES.

``(H + δI) x = b`` is solved with products of the operator. Which method suits which
operator:

* ``method="minres"`` (default; :mod:`deqhess.curvature.minres`) handles any symmetric
  ``H + δI``, definite or not; for a singular system it ends ``STAGNATED`` with a
  least-squares solution (not the minimum-norm one).
* ``method="cg"`` needs ``H + δI`` positive definite. That holds for any part when
  ``δ > −λ_min`` (get λ_min from :func:`extreme_eigenpairs` with ``which="smallest"``);
  without damping it holds only for the ``loss_curvature`` part of a loss convex in
  ``(θ, h)`` (then ``[I; Z]ᵀ ∇²L [I; Z]`` is positive semi-definite — still singular
  where ``Z`` has a null space, so add some ``δ > 0``). The ``total`` Hessian and the
  ``dynamics_curvature`` are indefinite in general, and so is ``loss_curvature`` as soon
  as ``L(h, θ)`` holds a readout (a cross-entropy of ``V h + c`` is not convex in
  ``(V, h)`` jointly). CG checks this as it goes: when it meets a direction ``p`` with
  ``pᵀ(H + δI)p ≤ 0`` it stops with status ``NEGATIVE_CURVATURE`` and returns ``p``.

Both stop after ``max_iter`` products (default ``min(2P, 1000)``: never more than 1,000
whatever ``P``, and never SciPy's ``10·P`` or ``5·P`` — 64,100 products, over 15
minutes, at ``P = 6,410``), with a progress bar against that cap. A solve that ends
short of its tolerance — the cap reached, negative curvature met by CG, MINRES
stagnating on a singular system, or a recomputed residual above ``10·tol`` — raises
:class:`deqhess.AnalysisConvergenceError` saying how it ended and what to try; its
``.result`` is the :class:`InverseResult` (``require_convergence=False`` returns that
instead). Newton steps and influence scores, built on these solves, are in
:mod:`deqhess.curvature.newton`.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass
from typing import SupportsFloat, cast

import torch
from torch import Tensor

from ..errors import AnalysisConvergenceError, InputError
from ..options import integer
from .accuracy import check_symmetric
from .base import Counted, SymmetricOperator, checked_operator
from .minres import MinresOutcome, minres

_NOT_SOLVABLE = "MINRES and CG, which assume H = Hᵀ, would not solve (H + δI) x = b"

__all__ = [
    "DEFAULT_TOL",
    "damping_value",
    "InverseResult",
    "InverseStatus",
    "solve_damped",
]

#: Upper end of the default product cap of :func:`solve_damped`.
MAX_PRODUCTS = 1000


class InverseStatus(enum.Enum):
    """How a damped solve ended; ``advice`` says what to try."""

    CONVERGED = "converged"
    NEGATIVE_CURVATURE = "negative curvature"
    MAX_ITER = "max_iter reached"
    INACCURATE = "inaccurate"
    STAGNATED = "stagnated"

    @property
    def advice(self) -> str:
        """What to try after a solve that ended so (empty when it converged)."""
        return {
            "converged": "",
            "negative curvature": (
                "H + δI is not positive definite (see `direction` and `curvature`): raise "
                "the damping above −λ_min(H), or use method='minres'."
            ),
            "max_iter reached": (
                "the product cap was reached before the tolerance: raise max_iter, add "
                "damping (better conditioning), or loosen tol."
            ),
            "inaccurate": (
                "the solver reported convergence but the recomputed residual exceeds "
                "10·tol: its running residual drifted from the true one, as on a system too "
                "ill-conditioned for tol; add damping or loosen tol."
            ),
            "stagnated": (
                "MINRES's residual stopped decreasing above tol: what is left of it r has "
                "‖(H + δI) r‖ ≤ max(tol, √ε)·‖H + δI‖·‖r‖, so it lies in the null space of "
                "H + δI (a singular system, b not in its range: the solution is then a "
                "least-squares one) or on eigenvalues too small for tol in this dtype; add "
                "damping or loosen tol."
            ),
        }[self.value]


@dataclass(frozen=True)
class InverseResult:
    """A solution of ``(H + δI) x = b``.

    Attributes:
        solution: ``[P]``; with ``NEGATIVE_CURVATURE`` CG's last iterate before the
            direction was met (the minimiser of the quadratic model on the Krylov space
            built so far), not a solution.
        residual: ``‖(H + δI) x − b‖ / ‖b‖``, recomputed with one extra product of the
            operator as computed (its own error is not included).
        converged: ``status is CONVERGED``: the recomputed relative residual is within
            ``10 · tol``.
        num_hvps: Hessian-vector products used (including the residual check).
        method: ``"cg"`` or ``"minres"``.
        status: how the solve ended (:class:`InverseStatus`, with advice).
        direction: ``[P]`` unit vector ``p`` with ``pᵀ(H + δI)p ≤ 0`` when CG met
            negative curvature, else None.
        curvature: ``pᵀ(H + δI)p`` for that unit ``p`` (so ``λ_min(H) ≤ curvature − δ``),
            else None.
    """

    solution: Tensor
    residual: float
    converged: bool
    num_hvps: int
    method: str
    status: InverseStatus = InverseStatus.CONVERGED
    direction: Tensor | None = None
    curvature: float | None = None


def damping_value(damping: object) -> float:
    """The damping ``δ`` as a float: a real number, a NumPy scalar or a 0-dim real tensor.

    The one check of ``damping`` for :func:`solve_damped` (so :func:`newton_step` and
    :func:`influence`) and :func:`inverse_diagonal`: ``1.0 - result.eigenvalues[0]`` is a
    0-dim tensor and is taken as its value.

    Args:
        damping: what the caller passed.

    Returns:
        ``δ`` as a Python float (not checked for finiteness or sign: the caller says
        what it needs).

    Raises:
        InputError: None, a bool, a string or other non-number, a complex number, or a
            tensor with dimensions (one ``δ`` for all of ``H``; not per parameter).
    """
    if isinstance(damping, Tensor) and (damping.ndim != 0 or damping.is_complex()):
        what = f"shape {tuple(damping.shape)}" if damping.ndim else f"dtype {damping.dtype}"
        raise InputError(
            f"damping must be one real number δ (H + δI), a 0-dim real tensor at most; got "
            f"a tensor of {what}. A per-parameter damping is not supported: pass one "
            "number, e.g. damping=float(d.max()), or scale H yourself."
        )
    number = isinstance(damping, (numbers.Real, Tensor)) or (
        hasattr(damping, "__float__") and not isinstance(damping, numbers.Complex)
    )
    if damping is None or isinstance(damping, bool) or not number:
        raise InputError(
            f"damping must be a real number δ (the system is H + δI); got {damping!r} "
            f"({type(damping).__name__}). Pass e.g. damping=1e-3, or damping=0.0 for none."
        )
    return float(cast(SupportsFloat, damping))


#: ``solve_damped``'s default relative residual, by the operator's dtype
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}


def solve_damped(
    op: SymmetricOperator,
    b: Tensor,
    damping: float | Tensor = 0.0,
    method: str = "minres",
    tol: float | None = None,
    max_iter: int | None = None,
    progress: bool | None = None,
    require_convergence: bool = True,
) -> InverseResult:
    """Solve ``(H + δI) x = b`` by MINRES or CG, with the residual recomputed at the end.

    See the module docstring for which operators suit CG.

    Args:
        op: the symmetric ``P × P`` operator ``H``.
        b: the right-hand side, a flat ``[P]`` tensor.
        damping: ``δ``: a real number, or a 0-dim tensor (e.g. ``1.0 - lowest`` with
            ``lowest`` an eigenvalue from :func:`extreme_eigenpairs`).
        method: ``"minres"`` (any symmetric system) or ``"cg"`` (positive definite;
            stops at the first direction of non-positive curvature).
        tol: relative residual ``‖(H + δI)x − b‖ / ‖b‖`` to reach; default
            :data:`DEFAULT_TOL` by dtype (1e-8 in float64, 1e-5 in float32: a float32
            product's rounding, ~1e-7 relative, is a floor no solve gets under).
        max_iter: cap on products; default ``min(2P, 1000)`` (one more recomputes the
            residual).
        progress: a progress bar of products against ``max_iter`` (None: only on a
            terminal).
        require_convergence: raise when the solve ends short of ``tol`` (default); if
            False, return the :class:`InverseResult` whatever its ``status`` (check
            ``converged``) — e.g. to use the direction of negative curvature CG found.

    Returns:
        An :class:`InverseResult` (``status`` CONVERGED unless ``require_convergence`` is
        False).

    Raises:
        AnalysisConvergenceError: the cap was reached, CG met ``pᵀ(H + δI)p ≤ 0``,
            MINRES's residual stopped decreasing above ``tol`` (a singular or too
            ill-conditioned system), or the recomputed residual of a reported
            convergence is above ``10 · tol``; ``.result`` is the :class:`InverseResult`
            and its ``status`` says which.
        InputError: an unknown ``method``, ``b`` not a ``[P]`` tensor, ``damping`` not a
            real number (None, a string, a tensor with dimensions), a non-finite
            ``damping`` or ``b``, ``tol ≤ 0`` or ``max_iter < 1``; an operator that says
            it is not symmetric (``symmetric=False``) or is measured so on two probes
            (two products before the solve, not in ``num_hvps``).
    """  # noqa: DOC502 (raised by _damped_solution)
    checked_operator(op, "solve_damped")
    return _damped_solution(
        op, b, damping, method, tol, max_iter, progress, require_convergence, check=True
    )


def _damped_solution(
    op: SymmetricOperator,
    b: Tensor,
    damping: float | Tensor = 0.0,
    method: str = "minres",
    tol: float | None = None,
    max_iter: int | None = None,
    progress: bool | None = None,
    require_convergence: bool = True,
    check: bool = False,
) -> InverseResult:
    """:func:`solve_damped`, with its symmetry check only where ``check`` asks for it.

    For callers that checked the operator's symmetry once for many solves.

    Returns:
        :func:`solve_damped`'s result.

    Raises:
        AnalysisConvergenceError: as :func:`solve_damped`.
        InputError: as :func:`solve_damped`.
    """
    if method not in ("cg", "minres"):
        raise InputError(f"unknown method {method!r}; use 'minres' (indefinite) or 'cg'.")
    size = op.shape[0]
    if not (isinstance(b, Tensor) and b.shape == (size,)):
        got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise InputError(
            f"b must be a [{size}] tensor (the operator's size); got {got}. Flatten a "
            "θ-structured vector first: eq.problem.params.flatten(g) (or "
            "curvature.layout.flatten(g) for a ModelCurvature)."
        )
    damping = damping_value(damping)
    if not (math.isfinite(damping) and bool(torch.isfinite(b).all())):
        raise InputError(f"damping and b must be finite; got damping={damping}.")
    tol = DEFAULT_TOL.get(op.dtype, 1e-5) if tol is None else tol
    if not tol > 0:
        raise InputError(f"tol must be positive; got {tol}.")
    max_iter = min(2 * size, MAX_PRODUCTS) if max_iter is None else integer(max_iter, "max_iter")
    if max_iter < 1:
        raise InputError(f"max_iter must be at least 1; got {max_iter}.")
    b = b.detach().to(dtype=op.dtype, device=op.device)
    norm_b = float(torch.linalg.vector_norm(b))
    if norm_b == 0:
        return InverseResult(torch.zeros_like(b), 0.0, True, 0, method)
    with Counted(op, max_iter, progress, method.upper()) as counted:
        if check:  # two products, before the solve's own (not in its num_hvps)
            check_symmetric(op, "H", _NOT_SOLVABLE)
        if method == "cg":
            solution, status, direction, curvature = _cg(counted, b, damping, tol, max_iter)
        else:
            solution, status = _minres(counted, b, damping, tol, max_iter)
            direction = curvature = None
        applied = op.matmat(solution[:, None])[:, 0] + damping * solution
    residual = float(torch.linalg.vector_norm(applied - b)) / norm_b
    if status is InverseStatus.CONVERGED and not residual <= 10 * tol:
        status = InverseStatus.INACCURATE
    result = InverseResult(
        solution=solution,
        residual=residual,
        converged=status is InverseStatus.CONVERGED,
        num_hvps=counted.products + 1,
        method=method,
        status=status,
        direction=direction,
        curvature=curvature,
    )
    if require_convergence and not result.converged:
        raise AnalysisConvergenceError(_unsolved(result, damping, tol, max_iter), result,
                                       result.num_hvps, max_iter)  # fmt: skip
    return result


def _unsolved(result: InverseResult, damping: float, tol: float, max_iter: int) -> str:
    found = (
        f"; its direction p (.result.direction) has pᵀ(H + δI)p = {result.curvature:.3e}, so "
        f"λ_min(H) ≤ {result.curvature - damping:.3e}"
        if result.direction is not None and result.curvature is not None
        else ""
    )
    return (
        f"{result.method.upper()} did not solve (H + δI) x = b with δ = {damping:g}: "
        f"{result.status.value} after {result.num_hvps} products (cap max_iter={max_iter}), "
        f"relative residual {result.residual:.1e} where tol = {tol:.0e} was asked{found}. "
        f"{result.status.advice} The error's .result holds the solution so far; pass "
        "require_convergence=False to have it returned instead."
    )


def _cg(
    op: Counted, b: Tensor, damping: float, tol: float, max_iter: int
) -> tuple[Tensor, InverseStatus, Tensor | None, float | None]:
    """Conjugate gradients on ``H + δI`` that watches the curvature ``pᵀ(H + δI)p``.

    Written here rather than calling ``scipy.sparse.linalg.cg`` because SciPy's CG does
    not expose ``pᵀAp``: on an indefinite operator it keeps iterating on a meaningless
    recurrence until its cap, and cannot say that the operator, not the tolerance, was
    the problem. Here the first ``pᵀ(H + δI)p ≤ 0`` ends the run (as in Steihaug's
    truncated CG) and ``p`` is returned.

    Returns:
        ``(x, status, p, curvature)``: the last iterate and how the run ended; with
        ``NEGATIVE_CURVATURE`` the unit direction ``p`` and its ``pᵀ(H + δI)p``, else
        None and None.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(r @ r)
    threshold = tol * float(torch.linalg.vector_norm(b))
    for _ in range(max_iter):
        q = op.matvec(p) + damping * p
        curvature = float(p @ q)
        if curvature <= 0:
            norm_p = float(torch.linalg.vector_norm(p))
            return x, InverseStatus.NEGATIVE_CURVATURE, p / norm_p, curvature / norm_p**2
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * q
        rr_next = float(r @ r)
        if math.sqrt(rr_next) <= threshold:
            return x, InverseStatus.CONVERGED, None, None
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x, InverseStatus.MAX_ITER, None, None


def _minres(
    op: Counted, b: Tensor, damping: float, tol: float, max_iter: int
) -> tuple[Tensor, InverseStatus]:
    """MINRES (:func:`.minres.minres`) on ``H + δI``, checked on the recomputed residual.

    Each run stops when its running residual ``φ_k`` reaches ``tol ‖b‖``; the residual is
    then recomputed (one product) and, where rounding has let ``φ_k`` drift below the true
    one, MINRES restarts on it with the remaining budget. A restart that does not halve
    the true residual ends the run: the caller's recomputed residual then says whether it
    is within ``10 · tol`` (else ``INACCURATE``). A run that finds the residual in the
    null space of ``H + δI`` (``‖(H + δI) r‖ ≤ max(tol, √ε) ‖H + δI‖ ‖r‖``) ends as
    ``STAGNATED``.

    Returns:
        ``(x, status)``: the last iterate and how the run ended.
    """
    x = torch.zeros_like(b)
    r = b
    threshold = tol * float(torch.linalg.vector_norm(b))
    norm_r = float(torch.linalg.vector_norm(b))
    while True:
        remaining = max_iter - op.products
        if remaining < 1:
            return x, InverseStatus.MAX_ITER
        run = minres(op, r, damping, threshold, tol, remaining)
        x = x + run.solution
        if run.outcome is MinresOutcome.MAX_ITER:
            return x, InverseStatus.MAX_ITER
        if run.outcome is MinresOutcome.SINGULAR:
            return x, InverseStatus.STAGNATED
        if op.products >= max_iter:  # no product left to check it: the caller does
            return x, InverseStatus.CONVERGED
        r = b - (op.matmat(x[:, None])[:, 0] + damping * x)
        norm_next = float(torch.linalg.vector_norm(r))
        if norm_next <= threshold or norm_next > 0.5 * norm_r:
            return x, InverseStatus.CONVERGED  # reached, or at the floor rounding sets
        norm_r = norm_next
