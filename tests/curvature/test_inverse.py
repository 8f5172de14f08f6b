"""Damped solves: CG stops at negative curvature, product caps, statuses, argument errors.

The references are the dense parts of the exact Hessian (``eq.hessian_split(...)``,
checked against unrolled autodiff in tests/implicit) and ``torch.linalg``.
"""

from __future__ import annotations

import pytest
import torch
from problems import DenseOperator, case, relative_error

import deqhess as dh
from deqhess.curvature import InverseStatus, influence, inverse, newton_step, solve_damped
from deqhess.curvature.inverse import MAX_PRODUCTS


@pytest.fixture(scope="module")
def setup():
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        c = case("tanh_batched")
        eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, tol=1e-14, atol=1e-15, batch_dim=0)
        readout = eq.hessian_split(c.loss_theta)  # L(h, θ) with a readout
        convex = eq.hessian_split(c.loss)  # L(h) convex in h
    return c, eq, readout, convex


def test_cg_stops_at_negative_curvature_of_the_readout_loss_curvature(setup):
    """With a readout in L(h, θ), [I; Z]ᵀ∇²L[I; Z] is indefinite (λ_min ≈ −3.2 here):
    CG must stop at the first pᵀ(H + δI)p ≤ 0 and return p, whose Rayleigh quotient
    (checked on the dense matrix to 1e-10 relative: a product against a dense product)
    bounds λ_min from above."""
    c, eq, readout, _ = setup
    dense = 0.5 * (readout.loss_curvature + readout.loss_curvature.T)
    low = float(torch.linalg.eigvalsh(dense)[0])
    assert low < -1.0
    op = eq.hessian_operator(c.loss_theta, "loss_curvature")
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    result = solve_damped(
        op, b, damping=1e-3, method="cg", tol=1e-10, progress=False, require_convergence=False
    )
    assert result.status is InverseStatus.NEGATIVE_CURVATURE and not result.converged
    assert "raise the damping above −λ_min(H), or use method='minres'" in result.status.advice
    p = result.direction
    assert abs(float(p.norm()) - 1.0) <= 1e-12
    quotient = float(p @ dense @ p) + 1e-3
    assert abs(result.curvature - quotient) <= 1e-10 * abs(quotient) + 1e-12
    assert result.curvature <= 0 and low + 1e-3 <= result.curvature
    assert result.num_hvps <= op.shape[0] + 1  # stopped early, not at a cap
    assert result.residual > 1e-3  # the last iterate is no solution, and says so


def test_cg_converges_on_the_loss_curvature_of_a_convex_loss(setup):
    """L(h) convex in h: Zᵀ∇²L Z is positive semi-definite, and positive definite once
    damped; CG reaches the dense solution (1e-8: tol 1e-12 times cond ≈ 4e4)."""
    c, eq, _, convex = setup
    dense = 0.5 * (convex.loss_curvature + convex.loss_curvature.T)
    assert float(torch.linalg.eigvalsh(dense)[0]) >= -1e-12
    op = eq.hessian_operator(c.loss, "loss_curvature")
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    result = solve_damped(op, b, damping=1e-3, method="cg", tol=1e-12, progress=False)
    assert result.status is InverseStatus.CONVERGED and result.converged
    assert result.direction is None and result.curvature is None
    expected = torch.linalg.solve(dense + 1e-3 * torch.eye(len(b)), b)
    assert relative_error(result.solution, expected) <= 1e-8


def test_caps_and_statuses(setup, monkeypatch):
    """An explicit cap is respected (products = cap + 1 for the residual check); the
    default is min(2P, MAX_PRODUCTS = 1000), never SciPy's 10·P; b = 0 needs no product."""
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    p = op.shape[0]
    b = torch.randn(p, generator=torch.Generator().manual_seed(2))
    for method in ("cg", "minres"):
        capped = solve_damped(op, b, 1e-3, method=method, tol=1e-14, max_iter=3,
                              progress=False, require_convergence=False)  # fmt: skip
        assert capped.status is InverseStatus.MAX_ITER and not capped.converged
        assert capped.num_hvps <= 4 and "raise max_iter" in capped.status.advice
    assert MAX_PRODUCTS == 1000
    monkeypatch.setattr(inverse, "MAX_PRODUCTS", 5)  # below 2P = 90: the default binds
    for method in ("cg", "minres"):
        with pytest.raises(dh.AnalysisConvergenceError, match=r"cap max_iter=5\)") as caught:
            solve_damped(op, b, 1e-3, method=method, tol=1e-14, progress=False)
        stuck = caught.value.result
        assert stuck.status is InverseStatus.MAX_ITER and stuck.num_hvps <= 6
    zero = solve_damped(op, torch.zeros(p), 1.0, method="cg", progress=False)
    assert zero.converged and zero.num_hvps == 0 and float(zero.solution.abs().max()) == 0.0


def test_minres_on_a_singular_system_stagnates_and_says_so(setup):
    """H + δI singular (δ = −λ_min): MINRES's residual stops decreasing (a least-squares
    solution); the status and message say that, not a residual above 10·tol it does not
    have."""
    c, eq, readout, _ = setup
    op = eq.hessian_operator(c.loss_theta)
    dense = 0.5 * (readout.total + readout.total.T)
    shift = -float(torch.linalg.eigvalsh(dense)[0])  # H + δI singular
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3))
    with pytest.raises(
        dh.AnalysisConvergenceError, match=r"stagnated after .* MINRES's residual stopped"
    ) as caught:
        solve_damped(op, b, shift, tol=1e-12, progress=False)
    result = caught.value.result
    assert result.status is InverseStatus.STAGNATED and not result.converged
    assert result.residual > 1e-6 and result.num_hvps < 2 * op.shape[0]  # before the cap
    assert "10·tol" not in str(caught.value)


def test_minres_near_tol_on_indefinite_systems_converges(setup):
    """The report: on indefinite systems of condition 47–368 (every part with a readout,
    δ = 0.1), a MINRES restart asked for the last factor of 1–2 to tol stopped at once on
    SciPy's own estimate; the run was then called singular with "the recomputed residual
    exceeds 10·tol" at residuals 1.4–10× tol (33 of these 45 solves). MINRES now stops on
    the residual relative to ‖b‖ itself: all converge, to the dense solution within
    cond · tol."""
    c, eq, readout, _ = setup
    for part in ("total", "dynamics_curvature", "loss_curvature"):
        op = eq.hessian_operator(c.loss_theta, part)
        system = getattr(readout, part) + 0.1 * torch.eye(op.shape[0])
        system = 0.5 * (system + system.T)
        assert float(torch.linalg.eigvalsh(system)[0]) < 0  # indefinite
        condition = float(torch.linalg.cond(system))
        for seed in range(5):
            b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(seed))
            result = solve_damped(op, b, 0.1, tol=1e-8, progress=False)
            assert result.status is InverseStatus.CONVERGED and result.residual <= 1e-8
            expected = torch.linalg.solve(system, b)
            assert relative_error(result.solution, expected) <= 2 * condition * 1e-8


def test_an_inaccurate_status_means_a_residual_above_10_tol(setup):
    """CG's running residual meets tol on an operator whose products carry an error of
    1e-9 (an inexact HVP), the recomputed one does not: INACCURATE, with a residual
    above 10·tol as its message says."""
    _, _, readout, _ = setup
    matrix = 0.5 * (readout.total + readout.total.T) + 4 * torch.eye(len(readout.total))
    assert float(torch.linalg.eigvalsh(matrix)[0]) > 0

    class Inexact:
        shape, dtype, device = matrix.shape, matrix.dtype, matrix.device
        generator = torch.Generator().manual_seed(0)

        def matmat(self, block):
            return matrix @ block + 1e-9 * torch.randn(block.shape, generator=self.generator)

    b = torch.randn(len(matrix), generator=torch.Generator().manual_seed(3))
    with pytest.raises(dh.AnalysisConvergenceError, match="recomputed residual exceeds") as caught:
        solve_damped(Inexact(), b, 0.0, method="cg", tol=1e-10, progress=False)
    result = caught.value.result
    assert result.status is InverseStatus.INACCURATE and result.residual > 10 * 1e-10


def test_argument_errors(setup):
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss)
    p = op.shape[0]
    with pytest.raises(ValueError, match=rf"b must be a \[{p}\] tensor .*got \(3,\)"):
        solve_damped(op, torch.ones(3))
    with pytest.raises(ValueError, match="damping and b must be finite; got damping=nan"):
        solve_damped(op, torch.ones(p), damping=float("nan"))
    with pytest.raises(ValueError, match="damping and b must be finite"):
        solve_damped(op, torch.full((p,), float("inf")))
    with pytest.raises(ValueError, match="tol must be positive; got 0"):
        solve_damped(op, torch.ones(p), tol=0)
    with pytest.raises(ValueError, match="max_iter must be at least 1; got 0"):
        solve_damped(op, torch.ones(p), max_iter=0)


def test_minres_reaches_the_tolerance_asked_for(setup):
    """SciPy's MINRES stopped on its own estimate (relative to ‖A‖‖x‖ + ‖b‖), which sat 17×
    above ``‖r‖/‖b‖ = tol`` on an easy indefinite-made-definite system; deqhess's MINRES
    stops on ``‖r‖ ≤ tol ‖b‖`` and reaches it, as CG does."""
    c, eq, readout, _ = setup
    dense = 0.5 * (readout.total + readout.total.T)
    damping = 1.0 - float(torch.linalg.eigvalsh(dense)[0])  # H + δI ⪰ I
    op = eq.hessian_operator(c.loss_theta)
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3))
    system = dense + damping * torch.eye(len(b))
    expected = torch.linalg.solve(system, b)
    condition = float(torch.linalg.cond(system))
    for tol in (1e-6, 1e-8, 1e-10):
        result = solve_damped(op, b, damping, tol=tol, progress=False)
        assert result.status is InverseStatus.CONVERGED and result.residual <= tol
        residual = dense @ result.solution + damping * result.solution - b
        assert float(residual.norm() / b.norm()) <= tol * (1 + 1e-6)
        # ‖δx‖/‖x‖ ≤ cond · ‖r‖/‖b‖ (the dense operator agrees with the products to ~1e-12)
        assert relative_error(result.solution, expected) <= 2 * condition * tol


def test_a_structured_gradient_is_refused_alike_everywhere(setup):
    """``newton_step`` with eq.grad's dict raised a raw TypeError (unary minus on a dict);
    it now gives solve_damped's message, which says how to flatten."""
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss)
    grad = eq.grad(c.loss)
    for call in (lambda: newton_step(op, grad), lambda: solve_damped(op, grad)):
        with pytest.raises(ValueError, match=r"got dict\. Flatten a θ-structured vector first"):
            call()
    flat = eq.problem.params.flatten(grad)
    step = newton_step(op, flat, damping=1.0, progress=False)
    assert step.converged and relative_error(step.solution, -solve_damped(
        op, flat, 1.0, progress=False).solution) <= 1e-12  # fmt: skip


def test_a_solve_short_of_its_tolerance_raises_with_what_it_reached(setup):
    """Before, ``solve_damped`` returned a result flagged ``converged=False`` and
    ``influence`` turned it into scores without a word: the issue asks every iterative
    analysis to end with a named error. Each way a solve can end short — the cap, CG's
    negative curvature, a singular system — raises ``AnalysisConvergenceError`` (a
    ``ConvergenceError``) whose message says how it ended, the products and the cap, the
    residual against tol and what to try, and whose ``.result`` is the InverseResult."""
    c, eq, readout, _ = setup
    p = eq.num_parameters
    b = torch.randn(p, generator=torch.Generator().manual_seed(4))
    convex = eq.hessian_operator(c.loss, "loss_curvature")
    with pytest.raises(dh.AnalysisConvergenceError) as caught:
        solve_damped(convex, b, 1e-3, method="minres", tol=1e-14, max_iter=3, progress=False)
    error = caught.value
    assert isinstance(error, dh.ConvergenceError) and error.max_hvps == 3
    assert error.result.status is InverseStatus.MAX_ITER and error.num_hvps <= 4
    for phrase in ("MINRES did not solve (H + δI) x = b with δ = 0.001", "max_iter reached",
                   "cap max_iter=3", "where tol = 1e-14 was asked", "raise max_iter"):  # fmt: skip
        assert phrase in str(error), phrase
    indefinite = eq.hessian_operator(c.loss_theta, "loss_curvature")
    with pytest.raises(dh.AnalysisConvergenceError, match=r"negative curvature .* λ_min\(H\) ≤"):
        solve_damped(indefinite, b, 1e-3, method="cg", tol=1e-10, progress=False)
    low = float(torch.linalg.eigvalsh(0.5 * (readout.total + readout.total.T))[0])
    singular = eq.hessian_operator(c.loss_theta)
    train = torch.randn(3, p, generator=torch.Generator().manual_seed(5))
    for call in (
        lambda: influence(singular, b, train, damping=-low, tol=1e-12, progress=False),
        lambda: newton_step(singular, b, damping=-low, tol=1e-12, progress=False),
    ):
        with pytest.raises(dh.AnalysisConvergenceError, match="did not solve"):
            call()
    scores = influence(singular, b, train, damping=-low, tol=1e-12, progress=False,
                       require_convergence=False)  # fmt: skip
    assert not scores.inverse.converged


def test_a_non_symmetric_operator_is_refused_for_what_it_is():
    """MINRES on ``2I + e₀e₁ᵀ`` (well conditioned, asymmetric in one entry) reported a solve and
    no word of H; a random non-symmetric one stalled with "raise max_iter". Both are
    refused by name, and so is an operator flagged ``symmetric=False``; a symmetric one
    (rounding-level asymmetry: ``(A + Aᵀ)/2``) is solved."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(60, generator=g, dtype=torch.float64)
    skewed = 2 * torch.eye(60, dtype=torch.float64)
    skewed[0, 1] = 1.0
    stalls = torch.randn(60, 60, generator=g, dtype=torch.float64) + 20 * torch.eye(60)
    for matrix in (skewed, stalls):
        with pytest.raises(dh.InputError, match=r"H is not symmetric: .* reaches .*MINRES and CG"):
            solve_damped(DenseOperator(matrix), b, progress=False)
    with pytest.raises(dh.InputError, match=r"says it is not\s+\(symmetric=False\)"):
        solve_damped(DenseOperator(skewed + skewed.T, symmetric=False), b, progress=False)
    symmetric = (stalls + stalls.T) / 2
    result = solve_damped(DenseOperator(symmetric), b, tol=1e-12, progress=False)
    assert relative_error(result.solution, torch.linalg.solve(symmetric, b)) <= 1e-9


def test_the_default_tolerance_is_one_float32_can_reach():
    """Before: the default tol 1e-8 sat below float32's rounding (~1e-7 relative), so a
    well-conditioned float32 system (condition ~30) stalled and was called singular or
    ill-conditioned. The default follows the dtype; float64 keeps 1e-8."""
    g = torch.Generator().manual_seed(0)
    b_mat = torch.randn(300, 40, generator=g)
    d = 0.5 + torch.rand(300, generator=g)
    matrix = (b_mat @ b_mat.T / 40 + torch.diag(d)).float()
    rhs = torch.randn(300, generator=g)
    result = solve_damped(DenseOperator(matrix), rhs, 0.1, progress=False)
    want = torch.linalg.solve(matrix.double() + 0.1 * torch.eye(300, dtype=torch.float64),
                              rhs.double())  # fmt: skip
    assert result.converged
    assert relative_error(result.solution.double(), want) <= 1e-4
    double = solve_damped(DenseOperator(matrix.double()), rhs.double(), 0.1, progress=False)
    assert double.residual <= 1e-8


class _Counting(DenseOperator):
    products = 0

    def matmat(self, block):
        self.products += block.shape[1]
        return super().matmat(block)


def test_influence_names_the_shape_of_the_training_gradients_before_the_solve():
    """Rows [P, N] instead of [N, P] were a raw ``RuntimeError: size mismatch`` after the
    solve; now refused first, naming the shape expected and the transpose."""
    g = torch.Generator().manual_seed(0)
    op = _Counting(torch.eye(6, dtype=torch.float64) * 2.0)
    test = torch.randn(6, generator=g)
    train = torch.randn(4, 6, generator=g)
    assert torch.allclose(influence(op, test, train, progress=False).scores, -(train @ test) / 2)
    op.products = 0
    with pytest.raises(dh.InputError, match=r"must be \[N, P\] = \[N, 6\], .*got \(6, 4\): it "
                       r"looks transposed \(\[P, N\]\); pass train_gradients\.T"):  # fmt: skip
        influence(op, test, train.T, progress=False)
    with pytest.raises(dh.InputError, match=r"\[N, P\] = \[N, 6\], .*got \(6,\)\. Stack"):
        influence(op, test, test, progress=False)
    with pytest.raises(dh.InputError, match=r"train_gradients has dtype torch\.float32 but the "):
        influence(op, test, train.float(), progress=False)
    assert op.products == 0  # refused before the solve


def test_damping_is_a_real_number_a_0dim_tensor_included():
    """Before: ``damping=1.0 - lowest`` (``lowest`` an eigenvalue, a 0-dim tensor) gave a
    raw TypeError inside SciPy with MINRES (CG took it), and ``damping=None`` a raw
    TypeError. A 0-dim tensor or NumPy scalar is now its value, everywhere alike; None, a
    string, a complex number or a tensor with dimensions is a named InputError."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g)
    matrix = a @ a.T / 30 - 0.5 * torch.eye(30)  # indefinite: the damping matters
    op = DenseOperator(matrix)
    b = torch.randn(30, generator=g)
    expected = torch.linalg.solve(matrix + 2.0 * torch.eye(30), b)
    for method in ("minres", "cg"):
        plain = solve_damped(op, b, 2.0, method=method, tol=1e-12, progress=False)
        assert relative_error(plain.solution, expected) <= 1e-10
        for damping in (torch.tensor(2.0), torch.tensor(2, dtype=torch.int64)):
            got = solve_damped(op, b, damping, method=method, tol=1e-12, progress=False)
            assert torch.equal(got.solution, plain.solution)
    step = newton_step(op, b, damping=torch.tensor(2.0), progress=False)
    assert relative_error(step.solution, -expected) <= 1e-7
    scores = influence(op, b, b[None], damping=torch.tensor(2.0), progress=False).scores
    assert relative_error(scores, -(b @ expected)[None]) <= 1e-7
    for bad, says in ((None, r"got None \(NoneType\)"), ("1e-3", r"got '1e-3' \(str\)"),
                      (1j, r"got 1j \(complex\)"), (True, r"got True \(bool\)")):  # fmt: skip
        for call, extra in ((solve_damped, ()), (newton_step, ()), (influence, (b[None],))):
            with pytest.raises(dh.InputError, match=r"damping must be a real number δ .*" + says):
                call(op, b, *extra, damping=bad, progress=False)
    with pytest.raises(dh.InputError, match=r"a tensor of shape \(30,\)\. A per-parameter"):
        solve_damped(op, b, torch.ones(30), progress=False)
