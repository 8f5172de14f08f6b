"""Matrix-free solves: the residual operator, batched GMRES, Neumann, and the choice."""

from __future__ import annotations

import pytest
import torch

from deqhess import ConvergenceError
from deqhess.linear import (
    GMRES,
    Dense,
    DenseLU,
    Neumann,
    NeumannGMRES,
    ResidualOperator,
    gmres,
    neumann,
    neumann_then_gmres,
    resolve_linear_solver,
)


def _rowwise(samples=3, width=7, rate=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(samples, width, width, generator=g)
    w = rate * w / torch.linalg.matrix_norm(w, ord=2)[:, None, None]

    def fn(h):  # independent rows; J_s = diag(tanh') W_s has norm ≤ rate
        return torch.tanh(torch.einsum("sij,sj->si", w, h) + 0.3)

    return fn, torch.randn(samples, width, generator=g)


def test_operator_products_match_dense_blocks():
    fn, h = _rowwise()
    op = ResidualOperator(fn, h)
    a = torch.eye(7) - op.jacobian_blocks()
    v = torch.randn(5, 3, 7)
    assert torch.allclose(op.apply(v), torch.einsum("sij,ksj->ksi", a, v), atol=1e-14)
    assert torch.allclose(op.apply_transpose(v), torch.einsum("sji,ksj->ksi", a, v), atol=1e-14)
    assert torch.allclose(op.apply(v[0]), torch.einsum("sij,sj->si", a, v[0]), atol=1e-14)
    # the flat Operator view: [S·d, K] blocks, its transpose, and the dense matrix
    full = torch.block_diag(*a)
    flat = v.reshape(5, 21).T
    assert op.shape == (21, 21) and not op.symmetric
    assert torch.allclose(op @ flat, full @ flat, atol=1e-14)
    assert torch.allclose(op.T @ flat[:, 0], full.T @ flat[:, 0], atol=1e-14)
    assert torch.allclose(op.to_dense(), full, atol=1e-14)
    assert torch.allclose(torch.as_tensor(op.to_scipy().rmatvec(flat[:, 1].numpy())),
                          full.T @ flat[:, 1], atol=1e-14)  # fmt: skip


@pytest.mark.parametrize("strategy", [GMRES(), GMRES(restart=3), Neumann()], ids=repr)
def test_matrix_free_solves_match_dense(strategy):
    fn, h = _rowwise()
    op = ResidualOperator(fn, h)
    dense = Dense().init(op)
    solve = strategy.init(op)
    rhs = torch.randn(4, 3, 7)
    assert torch.allclose(solve.solve(rhs), dense.solve(rhs), rtol=0, atol=1e-10)
    assert torch.allclose(solve.solve_transpose(rhs), dense.solve_transpose(rhs), atol=1e-10)
    _, info = solve.compute(rhs)
    assert info.converged and info.residual <= 1e-12 and info.iterations >= 1
    _, info = solve.transpose().compute(rhs)
    assert info.converged and info.residual <= 1e-12
    assert solve.transpose().transpose().solve(rhs).allclose(solve.solve(rhs), atol=1e-14)


def test_gmres_rows_are_independent_and_warm_start_helps():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = torch.stack([torch.ones(4), torch.zeros(4), torch.arange(4.0)])  # a zero row too

    def matvec(x):
        return x @ a.T

    x, info = gmres(matvec, b, rtol=1e-14)
    assert info.converged
    assert torch.allclose(x @ a.T, b, atol=1e-13) and torch.equal(x[1], torch.zeros(4))
    _, warm = gmres(matvec, b, x0=x, rtol=1e-14)
    assert warm.iterations == 1  # only the residual check
    # a guess worse than zero is dropped row by row: it costs the one product that tests it
    bad = x.clone()
    bad[0] = -10 * x[0]
    y, info = gmres(matvec, b, x0=bad, rtol=1e-14)
    assert info.converged and torch.allclose(y @ a.T, b, atol=1e-13)


def test_gmres_reorthogonalises_where_gram_schmidt_cancels():
    """A nonsymmetric 40 × 40 system with cond 1e5 in one 40-step cycle: classical
    Gram–Schmidt alone loses orthogonality and stalls at a relative residual of ~6e-8;
    with the second pass where a pass cancels (the DGKS test) it reaches 1e-10, and the
    solution matches a dense solve to what cond 1e5 allows (1e-12 · 1e5 · margin)."""
    n = 40
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    r, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    a = (q * torch.logspace(0, -5, n)) @ r.T
    b = torch.randn(3, n, generator=g)
    x, info = gmres(lambda v: v @ a.T, b, rtol=1e-10, restart=n, max_iter=n + 1)
    assert info.converged and info.residual <= 1e-10
    exact = torch.linalg.solve(a, b.T).T
    assert float((x - exact).norm() / exact.norm()) <= 1e-5


def test_gmres_workspace_is_reused_and_changes_nothing():
    """Solves sharing a workspace reuse one Krylov basis (no new allocation per solve)
    and return exactly what solves without one return."""
    fn, h = _rowwise()
    op = ResidualOperator(fn, h)
    workspace: dict = {}
    rhs = torch.randn(2, 3, 7)
    plain, _ = gmres(op.apply, rhs, rtol=1e-13)
    first, _ = gmres(op.apply, rhs, rtol=1e-13, workspace=workspace)
    (kept,) = workspace.values()
    again, _ = gmres(op.apply_transpose, rhs, rtol=1e-13, workspace=workspace)
    (still,) = workspace.values()
    assert still.data_ptr() == kept.data_ptr()
    assert torch.equal(first, plain)
    assert torch.allclose(again, Dense().init(op).solve_transpose(rhs), rtol=0, atol=1e-12)


def test_gmres_reports_failure_without_raising_and_solver_raises():
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0]])

    def matvec(x):  # a non-normal system needing 2 steps; restart=1 stagnates
        return x @ rotation.T

    _, info = gmres(matvec, b, rtol=1e-12, restart=1, max_iter=10)
    assert not info.converged and info.residual > 0.5
    fn, h = _rowwise(rate=0.95)
    solve = GMRES(restart=1, max_iter=2).init(ResidualOperator(fn, h))
    with pytest.raises(ConvergenceError, match=r"GMRES.* did not solve I − J x = b: relative"):
        solve.solve(torch.randn(3, 7))


def test_neumann_needs_a_contraction():
    b = torch.ones(1, 2)
    x, info = neumann(lambda x: x * 0.5, b, rtol=1e-12)  # I − J = 0.5 I: J = 0.5 I
    assert info.converged and torch.allclose(x, 2 * b)
    _, info = neumann(lambda x: x * -0.5, b, rtol=1e-12, max_iter=50)  # J = 1.5 I
    assert not info.converged
    fn, h = _rowwise(rate=0.9)
    solve = Neumann(max_iter=3).init(ResidualOperator(fn, h))
    with pytest.raises(ConvergenceError, match=r"Neumann.* did not solve \(I − J\)ᵀ x = b"):
        solve.solve_transpose(torch.randn(3, 7))


def test_resolve_linear_solver():
    assert isinstance(resolve_linear_solver("auto", 64, 256, torch.float64), Dense)
    assert isinstance(resolve_linear_solver("auto", 1, 4096, torch.float64), GMRES)
    assert isinstance(resolve_linear_solver("auto", 10_000, 2048, torch.float64), GMRES)
    assert isinstance(resolve_linear_solver("gmres", 1, 4, torch.float64), GMRES)
    # a layer's backward (few solves per fixed point) factorises only narrow blocks
    assert isinstance(resolve_linear_solver("auto", 64, 64, torch.float32, few_solves=True), Dense)
    few = resolve_linear_solver("auto", 64, 256, torch.float32, few_solves=True)
    assert isinstance(few, NeumannGMRES)
    assert isinstance(resolve_linear_solver("neumann-gmres", 1, 4, torch.float64), NeumannGMRES)
    assert isinstance(resolve_linear_solver("neumann", 1, 4, torch.float64), Neumann)
    mine = GMRES(restart=5)
    assert resolve_linear_solver(mine, 1, 4, torch.float64) is mine
    with pytest.raises(ValueError, match=r"unknown linear_solver 'lu'; use 'auto', one of"):
        resolve_linear_solver("lu", 1, 4, torch.float64)
    with pytest.raises(ValueError, match="GMRES restart must be an int >= 1; got 0"):
        GMRES(restart=0)
    with pytest.raises(ValueError, match=r"GMRES restart must be an int; got 2\.5"):
        GMRES(restart=2.5)
    with pytest.raises(ValueError, match="Neumann max_iter must be an int >= 1; got 0"):
        Neumann(max_iter=0)
    with pytest.raises(
        ValueError, match=r"GMRES rtol must be a finite number in \[0, 1\); got 1\.0"
    ):
        GMRES(rtol=1.0)  # would accept x = 0 for any b
    with pytest.raises(ValueError, match=r"Neumann atol must be a finite number >= 0; got -1"):
        Neumann(atol=-1)
    with pytest.raises(ValueError, match="NeumannGMRES needs rtol > 0 or atol > 0"):
        NeumannGMRES(rtol=0.0)


def test_dense_strategy_prepares_lu():
    fn, h = _rowwise()
    assert isinstance(Dense().init(ResidualOperator(fn, h)), DenseLU)


def test_neumann_then_gmres_switches_only_when_neumann_is_slow():
    """J = ρ·Q (Q orthogonal): at ρ = 0.3 Neumann alone; at ρ = 0.97 Neumann would need
    ~900 products for 1e-12 and hands over to GMRES; at J = −1.5 I (ρ > 1) Neumann
    diverges and GMRES solves (I − J) x = 2.5 x = b all the same."""
    q, _ = torch.linalg.qr(torch.randn(30, 30))
    b = torch.randn(3, 30)
    for rho, method in [(0.3, "Neumann"), (0.97, "Neumann→GMRES")]:
        a = torch.eye(30) - rho * q

        def matvec(v, a=a):
            return v @ a.T

        x, info = neumann_then_gmres(matvec, b, rtol=1e-12)
        assert info.method == method and info.converged and info.residual <= 1e-12
        assert torch.allclose(x, torch.linalg.solve(a, b.T).T, atol=1e-10)
    x, info = neumann_then_gmres(lambda v: 2.5 * v, b, rtol=1e-12)
    assert info.method == "Neumann→GMRES" and info.converged
    assert torch.allclose(x, b / 2.5, atol=1e-13)
    fn, h = _rowwise(width=30)
    op = ResidualOperator(fn, h)
    x = NeumannGMRES().init(op).transpose().solve(b)
    assert torch.allclose(x, Dense().init(op).transpose().solve(b), atol=1e-10)
    with pytest.raises(ValueError, match=r"NeumannGMRES needs 0 < rate < 1"):
        NeumannGMRES(rate=1.0)


def test_a_zero_right_hand_side_row_is_held_to_the_others_accuracy():
    """Neumann iterates the full system, so coupled rows are solved exactly; a row whose
    right-hand side is zero gets a nonzero solution from the coupling, and its residual is
    measured against the largest row's scale, not against zero (which would need an exact
    zero residual and report a ratio of 1e290)."""
    a = torch.tensor([[1.0, 0.3], [0.2, 1.0]])  # rows coupled
    b = torch.tensor([[1.0], [0.0]])  # two rows of width 1; row 1's right-hand side is zero

    def matvec(x):
        return (a @ x.reshape(2)).reshape(2, 1)

    x, info = neumann(matvec, b, rtol=1e-12)
    assert info.converged and info.residual <= 1e-12
    assert torch.allclose(x.reshape(2), torch.linalg.solve(a, b.reshape(2)), atol=1e-12)


def test_a_diverging_neumann_series_is_named_for_its_spectral_radius():
    """At an unstable fixed point (ρ(J) = 1.5: f(h) = 1.5 h + c, h* = −2c, given as h0)
    the Neumann series runs off; the error says why and what to use instead, and GMRES
    gives the exact answer: ∇_c L = (I − J)⁻ᵀ ∇L = −2 ∇L."""
    import deqhess as dh

    c = torch.tensor([[0.3, -0.2, 0.5]])

    def f(x, h, theta):
        return 1.5 * h + theta

    def loss(h):
        return (h**2).sum()

    with pytest.raises(ConvergenceError, match=r"diverged: .*\(ρ\(J\) ≥ 1\)\. Use linear_solver"):
        dh.Equilibrium(f, c, None, -2 * c, linear_solver="neumann").grad(loss)
    grad = dh.Equilibrium(f, c, None, -2 * c, linear_solver="gmres").grad(loss)
    assert torch.allclose(grad, -2 * (2 * (-2 * c)), rtol=1e-10)
    _, info = neumann(lambda x: x * -0.5, torch.ones(1, 2), rtol=1e-12, max_iter=500)
    assert info.method == "Neumann (diverging)" and info.iterations < 40  # stops early


@pytest.mark.parametrize("restart", [30, 4])
def test_gmres_estimates_the_inverse_norm_from_below(restart):
    """``1/σ_min`` of GMRES's rotated Hessenberg matrices bounds ``‖A⁻¹‖₂`` from below
    (``σ_min(H̄) = min ‖A V y‖ ≥ σ_min(A)``), whether or not the solve converges (GMRES(4)
    stagnates here), and reaches it once the Krylov space holds the direction A shrinks
    most — on systems with ``σ_min`` from 1e-3 to 0.4, to within 1% after a full solve."""
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(3, 12, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(3, 12, 12, generator=g))
    sigma = torch.linspace(1, 3, 12).repeat(3, 1)
    sigma[:, 0] = torch.tensor([1e-3, 0.05, 0.4])
    a = u @ torch.diag_embed(sigma) @ v.mT  # rows s: A_s with known singular values

    def matvec(x):
        return torch.einsum("sij,...sj->...si", a, x)

    b = torch.randn(2, 3, 12, generator=g)
    _, info = gmres(matvec, b, rtol=1e-12, restart=restart, max_iter=200)
    exact = float(1 / sigma[:, 0].min())
    assert 0 < info.inverse_norm <= exact * (1 + 1e-8)
    if restart == 30:
        assert info.converged and info.inverse_norm >= exact / 1.01
    # Neumann: 1/(1 − ρ) from its contraction rate, here J = 0.5 I: ‖(I − J)⁻¹‖ = 2
    _, plain = neumann(lambda x: x - 0.5 * x, b, rtol=1e-12)
    assert plain.inverse_norm == pytest.approx(2.0, rel=1e-5)  # rounding in the last steps
