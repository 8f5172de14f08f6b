"""``Equilibrium``: one solved DEQ fixed point and every derivative built on it.

The seed's computation graph, step by step:

1. forward — :func:`deqhess.solvers.solve_fixed_point` (at construction);
2. Jacobian — ``J = ∂f/∂h`` in the fixed point's :class:`deqhess.linear.Linearization`
   (:attr:`Equilibrium.linearization`): ``I − J`` by JVP/VJP, prepared once by the linear
   solver — a dense LU per sample block or a matrix-free GMRES/Neumann solve;
3. adjoint — :meth:`Equilibrium.adjoint`, ``(I − J)ᵀ λ = ∇ₕL``;
4. sensitivity — :meth:`Equilibrium.sensitivity`, ``(I − J) Z = ∂f/∂θ``;
5. assemble — :meth:`Equilibrium.hessian` (dense) and :meth:`Equilibrium.hvp`
   (matrix-free, two solves).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial, wraps
from typing import Any, Literal, TypeVar, cast, overload

import torch
from torch import Tensor

from ..callers import user_stacklevel
from ..chunks import default_chunk_size
from ..errors import InputError
from ..linear import (
    DEFAULT_MAX_ERROR_BOUND,
    Dense,
    DenseLU,
    Linearization,
    LinearSolver,
    LinearSolveStats,
    check_max_error_bound,
    coupling_tolerance,
    resolve_linear_solver,
    row_coupling,
)
from ..locking import engine, serialized
from ..memory import check_dense
from ..options import integer
from ..parameters import Parameters
from ..solvers import (
    Convergence,
    FixedPointSolver,
    Residual,
    SolveInfo,
    Tolerance,
    resolve_solver,
    solve_fixed_point,
)
from .derivatives import lagrangian_hessian, parameter_jacobian
from .finite import require_finite
from .hessian import HessianSplit, dense_hessian, second_sensitivity, split_deprecated
from .hvp import ParameterProducts, hessian_vector_products
from .loss import Captured, Loss
from .operators import CurvatureOperator, check_part
from .problem import FixedPointMap, Problem

__all__ = ["Equilibrium", "EquilibriumInfo"]

_ADJOINT_CACHE_SIZE = 8


_Method = TypeVar("_Method", bound=Callable)


def _one_call(method: _Method) -> _Method:
    """``method`` run in the engine, its inputs checked unchanged once for the whole call.

    θ, the tensors of x and what ``f`` captured: versions at every internal step, their
    bytes (which see a write through ``.data`` or NumPy) once, on entry.

    Returns:
        ``method`` wrapped.
    """

    @wraps(method)
    def call(self: Equilibrium, *args: Any, **kwargs: Any) -> Any:
        with engine(), self.problem.checked():
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


_HESSIAN_ALTERNATIVE = (
    "Use the exact matrix-free products instead: eq.hvp(loss, v), or "
    "eq.hessian_operator(loss) (its to_scipy() feeds eigsh/cg) with the analyses of "
    "deqhess.curvature (eigenvalues, trace, diagonal, spectral density)."
)
_SENSITIVITY_ALTERNATIVE = (
    "The gradient needs no Z: eq.grad(loss) uses the adjoint; Hessian-vector products "
    "(eq.hvp, eq.hessian_operator) apply Z one direction at a time."
)


@dataclass(frozen=True)
class EquilibriumInfo(SolveInfo):
    """The forward solve's statistics plus the linear solves', to judge an equilibrium.

    The fields of :class:`deqhess.solvers.SolveInfo` (iterations, residual_norm,
    converged, residual_history, per-sample figures, tolerance) and those below, from
    which a user judges the accuracy of what is built on the equilibrium.

    Attributes:
        condition_number: estimated 1-norm condition number of ``I − J`` (largest
            over samples) from the dense LU, or None (not factorised yet, or a
            matrix-free solver). Expect to lose about ``log10`` of it in digits
            relative to the residual.
        linear_solver: the strategy for solves with ``I − J``.
        linear_solves: the solves with ``I − J`` so far (count, products, the largest
            iteration count and relative residual of the iterative ones), as of this call.
        inverse_norm: estimated ``‖(I − J)⁻¹‖₁`` (largest over samples) from the dense
            LU, or None: the fixed point's error is about this times its residual.
        error_bound: the derivatives' relative error bound ``‖(I − J)⁻¹‖ ·
            max(r_forward, r_linear, ε)`` (:mod:`deqhess.linear.accuracy`): the residual
            the forward solve left (at most ``tol``) and the linear solves' (iterative
            ones), amplified by ``‖(I − J)⁻¹‖`` from the dense LU or GMRES's estimate. Above
            1e-6 (float64) / 1e-3 (float32) an :class:`deqhess.AccuracyWarning` gave it;
            above ``max_error_bound`` the solve was refused. None where ``‖(I − J)⁻¹‖``
            is not known: ``error_bound_source`` says why (not set up yet, or Neumann
            solves, which estimate nothing).
        error_bound_source: where ``‖(I − J)⁻¹‖`` came from, or why there is no bound.
    """

    condition_number: float | None = None
    linear_solver: str = ""
    linear_solves: LinearSolveStats | None = None
    inverse_norm: float | None = None
    error_bound: float | None = None
    error_bound_source: str = ""


@dataclass(frozen=True)
class _AdjointSolution:
    loss: Loss
    captured: Captured  # what the loss captured when λ was computed
    adjoint: Tensor  # λ rows [S, d]
    loss_grad_h: Tensor  # ∇ₕL rows [S, d]
    loss_grad_theta: Tensor  # ∂L/∂θ flat [P]
    # part → (v, z) ↦ ∇²Φ(v, z), the pullback of ∇Φ built on first use (a cache)
    second_order: dict[str, Callable] = field(default_factory=dict)

    def gradient_is(self, grad_theta: Tensor, grad_h: Tensor) -> bool:
        """Whether ``∇L`` at ``h*`` evaluated again is the one λ was solved for.

        Equal up to a few rounding errors of its norm (a GPU's reductions need not repeat
        bit for bit); a smaller change moves λ less than the error bound's ε floor.

        Returns:
            True where λ still solves ``(I − J)ᵀλ = ∇ₕL`` and ``∂L/∂θ`` is the cached one.
        """
        now = torch.cat([grad_theta, grad_h.reshape(-1)])
        then = torch.cat([self.loss_grad_theta, self.loss_grad_h.reshape(-1)])
        slack = 16 * torch.finfo(now.dtype).eps * torch.linalg.vector_norm(then)
        return bool(torch.linalg.vector_norm(now - then) <= slack)


class Equilibrium:
    """The fixed point ``h* = f(x, h*, θ)`` and the exact derivatives of a loss at it.

    Solves once at construction; caches the factorisation of ``I − J``, the
    sensitivity Z and, per loss object, the adjoint λ (hold the loss object to reuse
    it across many :meth:`hvp` calls).

    **Caching contract.** θ, the tensors of x and those ``f`` captures are watched:
    changed in place — also through ``.data`` or a NumPy view, which leave no version
    (their bytes are digested once per derivative call) — they make every later call
    raise :class:`deqhess.StaleEquilibriumError`. A loss is cached by identity (the
    last 8 loss objects); its cached λ is recomputed when an object it captured
    (closure cells, defaults, ``partial`` arguments, the tensors and numbers among the
    globals it names, a loss module's parameters and buffers) was rebound or a captured
    tensor changed, or when ``∇L`` at ``h*`` (with ``∂L/∂θ``), evaluated again at each
    call, is not the one λ was solved for — which follows state the loss reaches in
    other ways (functions it calls, NumPy arrays, lists). A change there that leaves
    ``∇L`` at ``h*`` as it was but not ``∇²L`` is not seen by the HVPs' cached
    pullback: after changing such state call :meth:`forget` (or :meth:`clear_cache`),
    or pass a new loss object. Methods are thread-safe: they
    hold one process-wide lock (``torch.func``'s forward AD is process-global).

    Args:
        f: dynamics ``f(x, h, theta)`` returning a tensor shaped like ``h``; it must be
            traceable by ``torch.func`` (no in-place updates of its inputs).
        theta: parameters, a floating tensor or a ``dict[str, Tensor]`` (flattened in
            insertion order, each row-major, as ``parameters_to_vector``).
        x: input passed to ``f`` as is.
        h0: initial state, fixing the state's shape and dtype; default zeros like x.
        solver: ``"anderson"``, ``"picard"`` or a :class:`deqhess.solvers.FixedPointSolver`.
        tol: relative tolerance on ``‖f(h) − h‖``; default by dtype (1e-10 float64,
            1e-5 float32).
        max_iter: cap on forward-solver iterations.
        atol: absolute tolerance floor; default ``tol``.
        batch_dim: dimension of ``h`` whose slices are independent samples (``f`` must
            treat them independently; the loss may couple them), or None for one
            coupled system.
        linear_solver: ``"auto"`` (dense LU per sample block while blocks are at most
            2048 wide and fit in 2 GB, else GMRES), ``"dense"``, ``"gmres"``,
            ``"neumann"`` or a :class:`deqhess.linear.LinearSolver` instance.
        max_condition: largest acceptable condition number of ``I − J`` (dense LU).
        max_error_bound: largest accepted relative error bound of the derivatives,
            ``‖(I − J)⁻¹‖ × the residual left`` (``info.error_bound``); default 0.1, above
            which no digit is correct and the first solve raises
            :class:`deqhess.SingularSystemError` (``inf``: never). Bounds above 1e-6
            (float64) / 1e-3 (float32) but within it give an
            :class:`deqhess.AccuracyWarning` with the figure.
        require_convergence: if False, an unconverged solve warns and keeps its best
            iterate instead of raising (``info.converged`` tells); shorthand for
            ``convergence="best"``.
        convergence: what to do with samples that miss the tolerance: ``"raise"``
            (default), ``"best"`` (keep each one's best iterate, warn, and mark it in
            ``info.converged_mask``) or a :class:`deqhess.solvers.Convergence` with
            fallback solvers (e.g. ``Convergence(fallback=Picard(damping=0.5))``).
        chunk_size: directions vmapped at once in dense Jacobians/Hessians (bounds
            memory); None picks about 4M numbers per chunk.

    Raises:
        InputError: bad inputs (non-finite θ/x/h0, dtype or shape mismatches).
        ConvergenceError: the forward solve did not reach the tolerance.
        SingularSystemError: (at the first derivative) ``I − J`` singular, or its
            condition or the error bound above ``max_condition`` / ``max_error_bound``.

    Warns:
        AccuracyWarning: (at the first derivative, or during matrix-free solves as
            ``‖(I − J)⁻¹‖`` is estimated) the derivatives' error bound exceeds 1e-6
            (float64) / 1e-3 (float32) relative.

    Example:
        >>> import torch, deqhess as dh
        >>> def f(x, h, theta):
        ...     return torch.tanh(theta["W"] @ h + x)
        >>> theta = {"W": 0.5 * torch.eye(3, dtype=torch.float64)}
        >>> x = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
        >>> eq = dh.Equilibrium(f, theta, x, torch.zeros(3, dtype=torch.float64))
        >>> def loss(h):
        ...     return (h**2).sum()
        >>> H = eq.hessian(loss)
        >>> H.shape
        torch.Size([9, 9])
        >>> v = torch.ones(9, dtype=torch.float64)
        >>> torch.allclose(eq.hvp(loss, v), H @ v)
        True
    """

    def __init__(
        self,
        f: FixedPointMap,
        theta: Parameters,
        x: Any,
        h0: Tensor | None = None,
        solver: str | FixedPointSolver = "anderson",
        tol: float | None = None,
        max_iter: int = 1000,
        *,
        atol: float | None = None,
        batch_dim: int | None = None,
        linear_solver: str | LinearSolver = "auto",
        max_condition: float | None = None,
        max_error_bound: float = DEFAULT_MAX_ERROR_BOUND,
        require_convergence: bool = True,
        chunk_size: int | None = None,
        convergence: Convergence | str | None = None,
    ) -> None:
        advice = None
        if h0 is None:
            if not isinstance(x, Tensor):
                raise InputError("h0 is required when x is not a tensor (it fixes the state).")
            h0 = torch.zeros_like(x)
            advice = (
                f"h0 was not given, so the state starts as zeros shaped like x, "
                f"{tuple(x.shape)}; if the state has another shape, pass h0 shaped like it "
                "(e.g. h0=x.new_zeros(x.shape[0], n); for a data set, "
                "init_state=lambda x: x.new_zeros(x.shape[0], n))"
            )
        self.problem = Problem(f, theta, x, h0, batch_dim, state_advice=advice)
        self.solver = resolve_solver(solver)
        state = self.problem.state
        self.linear_solver = resolve_linear_solver(
            linear_solver, state.samples, state.width, state.dtype, max_condition
        )
        self._max_condition = max_condition
        max_error_bound = check_max_error_bound(max_error_bound)
        # one coupled system too wide for a dense LU: probe for independent slices first
        self._probe_blocks = (
            linear_solver == "auto"
            and state.batch_dim is None
            and not isinstance(self.linear_solver, Dense)
            and len(state.shape) >= 2
            and state.shape[0] > 1
        )
        self.chunk_size = None if chunk_size is None else integer(chunk_size, "chunk_size", 1)
        tolerance = Tolerance.resolve(tol, atol, state.dtype)
        self._theta = self.problem.params.flatten(theta).detach().clone()
        # bound to the problem, not to self: a cycle through self would keep a streamed
        # batch's equilibrium (and its LU) alive until Python's full collection
        residual = Residual(partial(self.problem.dynamics, self._theta))
        with torch.no_grad():
            rows, self._solve_info = solve_fixed_point(
                residual,
                state.to_rows(h0.detach()).clone(),
                self.solver,
                tolerance,
                max_iter,
                convergence=Convergence.resolve(convergence, require_convergence),
            )
        self._h = rows
        self._linearization = Linearization(
            residual,
            rows,
            self.linear_solver,
            independent_rows=state.batch_dim is not None,
            declared=(
                f"f couples the samples along batch_dim={state.batch_dim}",
                "pass batch_dim=None for one coupled system",
            ),
            accepted=self._solve_info.sample_residuals,
            tolerance=tolerance,
            max_error_bound=max_error_bound,
            watch_accuracy=True,
        )
        self._sensitivity: Tensor | None = None
        self._parameter_products: ParameterProducts | None = None
        self._adjoints: OrderedDict[Any, _AdjointSolution] = OrderedDict()

    # ----------------------------------------------------------------- state and info
    @property
    def h(self) -> Tensor:
        """The fixed point ``h*``, shaped like ``h0`` (a fresh tensor, no autograd history)."""
        return self.problem.state.from_rows(self._h).clone()

    @property
    def num_parameters(self) -> int:
        """P, the length of flattened θ."""
        return self.problem.params.size

    @property
    def info(self) -> EquilibriumInfo:
        """Forward-solve statistics and, once used, those of the linear solves."""
        forward = {f.name: getattr(self._solve_info, f.name) for f in fields(SolveInfo)}
        linearization = self._linearization
        bound = linearization.error_bound
        return EquilibriumInfo(
            **forward,
            condition_number=linearization.condition_number,
            linear_solver=repr(self.linear_solver),
            linear_solves=linearization.stats.snapshot(),
            inverse_norm=linearization.inverse_norm,
            error_bound=bound.value,
            error_bound_source=bound.source,
        )

    @property
    @serialized
    def linearization(self) -> Linearization:
        """``I − J`` at ``h*`` and its prepared solve (steps 2–4), set up on first use.

        On first use, an ``f`` that couples the samples ``batch_dim`` declares
        independent is refused with :class:`deqhess.InputError`; ``I − J`` singular or
        too ill-conditioned with :class:`deqhess.SingularSystemError`.
        """
        self.problem.check_fresh()
        if not self._linearization.is_prepared:
            with torch.no_grad():
                if self._probe_blocks:
                    self._linearization = self._blocked() or self._linearization
                    self._probe_blocks = False
                _ = self._linearization.prepared
        return self._linearization

    def _blocked(self) -> Linearization | None:
        """The linearisation solved per slice of the state, where ``f`` does not couple them.

        For ``batch_dim=None`` and a state too wide for one dense LU: whether ``f``
        couples the slices along the state's first dimension at ``h*`` is probed as for a
        declared ``batch_dim`` (a few products).

        Returns:
            The same linearisation solved per slice — dense blocks where they fit —
            instead of matrix-free on the whole; None if ``f`` couples the slices.
        """
        state, lin = self.problem.state, self._linearization
        blocks = (state.shape[0], state.size // state.shape[0])
        probe = Linearization.in_blocks(lin.residual, lin.h, blocks, self.linear_solver)
        coupling, _ = row_coupling(probe.operator.apply_transpose, probe.h)
        if not coupling <= coupling_tolerance(state.dtype):
            return None
        strategy = resolve_linear_solver("auto", *blocks, state.dtype, self._max_condition)
        self.linear_solver = strategy
        return Linearization.in_blocks(
            lin.residual, lin.h, blocks, strategy, stats=lin.stats,
            accepted=None if lin.accepted is None else lin.accepted.amax().expand(blocks[0]),
            tolerance=lin.tolerance,
            max_error_bound=lin.max_error_bound, watch_accuracy=True,
        )  # fmt: skip

    @property
    @serialized
    def parameter_products(self) -> ParameterProducts:
        """Products with ``∂f/∂θ`` at ``(θ, h*)``; its pullback is taken once and reused."""
        self.problem.check_fresh()
        if self._parameter_products is None:
            self._parameter_products = ParameterProducts.at(
                self.problem.dynamics, self._theta, self._h
            )
        return self._parameter_products

    # ----------------------------------------------------------------- caches
    @serialized  # not while another thread reads the cache
    def forget(self, loss: Callable[..., Tensor]) -> None:
        """Drop what is cached for ``loss`` (its λ and second-order pullbacks).

        Call it after changing state the loss reads that deqhess cannot watch (see the
        caching contract above); the next call with ``loss`` recomputes λ.
        """
        try:
            self._adjoints.pop(loss, None)
        except TypeError:  # unhashable: never cached
            pass

    @serialized
    def clear_cache(self) -> None:
        """Drop what is cached for every loss (the fixed point and ``I − J`` stay)."""
        self._adjoints.clear()

    # ----------------------------------------------------------------- first order
    @serialized
    def _adjoint_solution(self, loss: Callable[..., Tensor]) -> _AdjointSolution:
        self.problem.check_fresh()
        try:
            cached = self._adjoints.get(loss)
        except TypeError:  # unhashable loss object: no caching
            cached, loss_key = None, None
        else:
            loss_key = loss
        if cached is not None and cached.captured.changed():
            cached = None
        wrapped = Loss(loss) if cached is None else cached.loss
        captured = Captured(loss) if cached is None else cached.captured
        with torch.no_grad():
            # λ solves (I − J)ᵀλ = ∇ₕL: it is the cached one exactly when ∇L at h* is the
            # cached ∇L — also after a change Captured cannot see (a tensor inside a
            # function the loss calls) that would otherwise mix the old λ with the new ∇²L
            grad_theta, grad_h = torch.func.grad(
                lambda t, r: self.problem.objective(wrapped, t, r), argnums=(0, 1)
            )(self._theta, self._h)
            require_finite(torch.cat([grad_h.reshape(-1), grad_theta]), "∇L at h*")
            if cached is not None and cached.gradient_is(grad_theta, grad_h):
                self._adjoints.move_to_end(loss_key)
                return cached
            adjoint = require_finite(self.linearization.solve_transpose(grad_h), "the adjoint λ")
        solution = _AdjointSolution(wrapped, captured, adjoint, grad_h, grad_theta)
        if loss_key is not None:
            self._adjoints[loss_key] = solution
            if len(self._adjoints) > _ADJOINT_CACHE_SIZE:
                self._adjoints.popitem(last=False)
        return solution

    @_one_call
    def adjoint(self, loss: Callable[..., Tensor]) -> Tensor:
        """λ solving ``(I − J)ᵀ λ = ∇ₕL`` at ``h*`` (step 3), shaped like ``h``.

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor; λ is cached
                per loss object.

        Returns:
            The adjoint λ, shaped like ``h`` (a copy).
        """
        return self.problem.state.from_rows(self._adjoint_solution(loss).adjoint).clone()

    @_one_call
    def sensitivity(self) -> Tensor:
        """``Z = dh*/dθ`` solving ``(I − J) Z = ∂f/∂θ`` (step 4), P right-hand sides.

        Refused with :class:`deqhess.DenseMemoryError` when Z would not fit in the memory
        available (see :func:`deqhess.memory_limit`).

        Returns:
            Z, shape ``h.shape + (P,)`` (a copy of the cached one).
        """
        self._check_dense(1, "eq.sensitivity()", _SENSITIVITY_ALTERNATIVE)
        return self.problem.state.from_rows(self._sensitivity_rows()).clone()

    @serialized
    def _sensitivity_rows(self) -> Tensor:
        self.problem.check_fresh()
        if self._sensitivity is None:
            self._check_dense(0, "the sensitivity Z = dh*/dθ", _SENSITIVITY_ALTERNATIVE)
            with torch.no_grad():
                rhs = parameter_jacobian(
                    self.problem.dynamics, self._theta, self._h, self.chunk_size
                )
                columns = self.linearization.solve(rhs.permute(2, 0, 1))  # [P, S, d]
                z = columns.permute(1, 2, 0).contiguous()
                self._sensitivity = require_finite(z, "the sensitivity Z")
        return self._sensitivity

    def _check_dense(self, extra_z: int, request: str, alternative: str, square: int = 0) -> None:
        """Refuse a dense request that cannot fit in the memory available.

        The request holds ``square`` P × P matrices and ``extra_z`` copies of Z's N·P
        numbers, plus Z's own set-up unless it is cached; :func:`deqhess.memory.check_dense`
        raises :class:`deqhess.DenseMemoryError` naming ``request`` and ``alternative``.
        """
        p, n = self.num_parameters, self.problem.state.size
        setup = 0 if self._sensitivity is not None else 3 * n * p  # ∂f/∂θ, columns, Z
        numbers = square * p * p + extra_z * n * p + setup
        shape = f"P = {p:,}, N = {n:,}"
        dtype, device = self.problem.state.dtype, self._h.device
        check_dense(numbers, dtype, device, f"{request} ({shape})", alternative)

    @_one_call
    def grad(self, loss: Callable[..., Tensor], method: str = "adjoint") -> Parameters:
        """The gradient ``dL(h*(θ), θ)/dθ``.

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
            method: ``"adjoint"`` computes ``∂L/∂θ + λᵀ ∂f/∂θ`` (one solve, one VJP);
                ``"sensitivity"`` computes ``∂L/∂θ + Zᵀ ∇ₕL`` from the dense Z. The two
                agree to rounding; the first is the cheap one.

        Returns:
            ``dL/dθ`` with θ's structure.

        Raises:
            InputError: an unknown ``method``.
        """
        solution = self._adjoint_solution(loss)
        with engine(), torch.no_grad():
            if method == "adjoint":
                flat = solution.loss_grad_theta + self.parameter_products.vjp(solution.adjoint)
            elif method == "sensitivity":
                flat = solution.loss_grad_theta + torch.einsum(
                    "sdp,sd->p", self._sensitivity_rows(), solution.loss_grad_h
                )
            else:
                raise InputError(
                    f"unknown gradient method {method!r}; use 'adjoint' or 'sensitivity'."
                )
        require_finite(flat, "the gradient")
        return self.problem.params.unflatten(flat.clone())

    # ----------------------------------------------------------------- second order
    @overload
    def hessian(self, loss: Callable[..., Tensor], split: Literal[False] = False) -> Tensor: ...
    @overload
    def hessian(self, loss: Callable[..., Tensor], split: Literal[True]) -> HessianSplit: ...
    @_one_call
    def hessian(self, loss: Callable[..., Tensor], split: bool = False) -> Tensor | HessianSplit:
        """The exact Hessian ``d²L/dθ²`` ``[P, P]`` (θ flattened), dense.

        ``H = [I; Z]ᵀ ∇²₍θ,h₎(L + λᵀf) [I; Z]``: P Hessian-vector products of the
        Lagrangian along ``(eᵢ, Zᵢ)`` and a ``P × N × P`` matrix product (or, with a
        dense LU, one transposed solve per column); memory ``O(P² + N·P)``.

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
            split: deprecated: ``split=True`` returns what :meth:`hessian_split` does.

        Refused with :class:`deqhess.DenseMemoryError` when the ``[P, P]`` result would
        not fit in the memory available; :meth:`hvp` and :meth:`hessian_operator` then
        give its exact products.

        Returns:
            The Hessian ``[P, P]`` (a :class:`HessianSplit` with the deprecated
            ``split=True``).
        """
        if split:
            split_deprecated("Equilibrium.hessian", "eq.hessian_split(loss)")
            return self.hessian_split(loss)
        result = self._dense_hessian(loss, split=False, request="eq.hessian(loss)")
        return require_finite(cast(Tensor, result), "the Hessian")

    @_one_call
    def hessian_split(self, loss: Callable[..., Tensor]) -> HessianSplit:
        """The Hessian's two parts, dense: the loss and the dynamics curvature.

        ``loss_curvature = [I; Z]ᵀ∇²L[I; Z]`` (``= Zᵀ∇²ₕL Z`` when L ignores θ) and
        ``dynamics_curvature = [I; Z]ᵀ∇²(λᵀf)[I; Z]``, each assembled as :meth:`hessian`
        assembles the whole (twice its cost).

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.

        Refused with :class:`deqhess.DenseMemoryError` when the three ``[P, P]`` results
        would not fit in the memory available; :meth:`hessian_operator` with a ``part``
        then gives their exact products.

        Returns:
            ``.loss_curvature``, ``.dynamics_curvature`` and their sum ``.total``, each
            ``[P, P]``.
        """
        result = cast(
            HessianSplit, self._dense_hessian(loss, split=True, request="eq.hessian_split(loss)")
        )
        require_finite(result.loss_curvature, "the Hessian")
        require_finite(result.dynamics_curvature, "the Hessian")
        return result

    def _dense_hessian(
        self, loss: Callable[..., Tensor], split: bool, request: str
    ) -> Tensor | HessianSplit:
        """:func:`dense_hessian` at this fixed point, after the memory check."""
        self._check_dense(0, request, _HESSIAN_ALTERNATIVE, square=3 if split else 1)
        solution = self._adjoint_solution(loss)
        with engine(), torch.no_grad():
            return dense_hessian(
                self.problem,
                solution.loss,
                solution.adjoint,
                self._theta,
                self._h,
                self._sensitivity_rows(),
                split=split,
                chunk_size=self.chunk_size,
                back_projection=self._back_projection(),
            )

    def _back_projection(self) -> Callable[[Tensor], Tensor] | None:
        """``g ↦ Zᵀ g = (∂f/∂θ)ᵀ (I − J)⁻ᵀ g`` on blocks ``[K, S, d]``, where it is cheaper.

        Returns:
            The back projection where it costs less than projecting by Z — a direct solve
            (``S·d²`` per column) with blocks narrower than P, against the projection's
            ``N·P = S·d·P`` — else None.
        """
        linearization = self.linearization
        if not isinstance(linearization.prepared, DenseLU):
            return None
        if self.problem.state.width >= self.num_parameters:
            return None
        products = self.parameter_products
        return lambda g: products.vjps(linearization.solve_transpose(g))

    def hvp(self, loss: Callable[..., Tensor], v: Parameters) -> Parameters:
        """``H v``, exact and matrix-free: two solves with the prepared linear solve.

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
            v: a direction with θ's structure, or a flat ``[P]`` tensor (or a ``[P, K]``
                block).

        Returns:
            ``H v`` in the same form as ``v``.
        """
        return self.hessian_operator(loss) @ v

    def hessian_operator(
        self, loss: Callable[..., Tensor], part: str = "total"
    ) -> CurvatureOperator:
        """The Hessian (or one part of it) as a ``P × P`` operator of exact products.

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
            part: ``"total"`` (the Hessian), ``"loss_curvature"``
                (``[I; Z]ᵀ∇²L[I; Z]``: the Gauss–Newton matrix of θ ↦ h* when L ignores
                θ; with a readout in ``L(h, θ)`` it can be indefinite) or
                ``"dynamics_curvature"`` (``[I; Z]ᵀ∇²(λᵀf)[I; Z]``).

        Returns:
            The operator; each product costs two solves with ``I − J`` and a few AD
            passes, and the K directions of a block share them.
        """
        check_part(part)
        state = self.problem.state
        chunk = self.chunk_size or default_chunk_size(self.num_parameters + state.size)
        return CurvatureOperator(self.block_products(loss, part), self.problem.params, part, chunk)

    def ggn_operator(self, loss: Callable[..., Tensor]) -> CurvatureOperator:
        """Deprecated name of ``hessian_operator(loss, "loss_curvature")``.

        It returns the loss curvature ``[I; Z]ᵀ∇²L[I; Z]``, which is the generalised
        Gauss–Newton matrix ``Zᵀ∇²ₕL Z`` of θ ↦ h* only when L ignores θ; with a readout
        inside ``L(h, θ)`` it is not a GGN and can be indefinite. For the GGN at a
        model's output (``Jᵀ∇²ℓJ``, as curvlinops defines it), use
        :meth:`deqhess.ModelCurvature.ggn_operator`.

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.

        Returns:
            ``hessian_operator(loss, "loss_curvature")``.
        """
        warnings.warn(
            "Equilibrium.ggn_operator(loss) is the loss curvature [I; Z]ᵀ∇²L[I; Z], not "
            "a GGN when the loss takes theta; call hessian_operator(loss, "
            "'loss_curvature'), or deqhess.ModelCurvature(...).ggn_operator() for the GGN "
            "at a model's output.",
            DeprecationWarning,
            stacklevel=user_stacklevel(),
        )
        return self.hessian_operator(loss, "loss_curvature")

    def block_products(self, loss: Callable[..., Tensor], part: str) -> Callable[[Tensor], Tensor]:
        """``V ↦ (H Vᵀ)ᵀ`` on row-blocks ``[K, P]`` for one part (λ from the cache).

        The K directions share each solve and vmapped AD pass; this is what
        :class:`CurvatureOperator` and data-set sums are built on.

        Args:
            loss: ``loss(h)`` or ``loss(h, theta)``, returning a 0-dim tensor.
            part: ``"total"``, ``"loss_curvature"`` or ``"dynamics_curvature"``.

        Returns:
            The product ``[K, P] → [K, P]``, row ``k`` of its result ``H vₖ``.
        """

        def products(v: Tensor) -> Tensor:
            with engine(), self.problem.checked(), torch.no_grad():
                solution = self._adjoint_solution(loss)
                if part not in solution.second_order:
                    phi = self.problem.lagrangian(
                        solution.loss if part != "dynamics_curvature" else None,
                        solution.adjoint if part != "loss_curvature" else None,
                    )
                    solution.second_order[part] = lagrangian_hessian(phi, self._theta, self._h)
                out = hessian_vector_products(
                    self.parameter_products, solution.second_order[part], self.linearization, v
                )
            return require_finite(out, "the Hessian-vector products")

        return products

    @_one_call
    def second_sensitivity(self) -> Tensor:
        """``d²h*/dθ²``, the seed's intermediate, for small P only.

        Solves ``(I − J) d²h*/dθᵢdθⱼ = D²f[(eᵢ, Zᵢ), (eⱼ, Zⱼ)]`` for every pair ``(i, j)``;
        refused with :class:`deqhess.DenseMemoryError` when the ``N × P × P`` result would
        not fit in memory.

        Returns:
            ``d²h*/dθ²``, shape ``h.shape + (P, P)``.
        """
        square = 2 * self.problem.state.size  # the right-hand sides and the solution
        self._check_dense(0, "eq.second_sensitivity()", _HESSIAN_ALTERNATIVE, square=square)
        with engine(), torch.no_grad():
            rows = second_sensitivity(
                self.problem,
                self._theta,
                self._h,
                self._sensitivity_rows(),
                self.linearization,
                self.chunk_size,
            )
        return self.problem.state.from_rows(require_finite(rows, "d²h*/dθ²"))

    def __repr__(self) -> str:
        s = self._solve_info
        return (
            f"Equilibrium(state={tuple(self.problem.state.shape)}, P={self.num_parameters}, "
            f"solver={s.solver}, iterations={s.iterations}, residual={s.residual_norm:.2e})"
        )
