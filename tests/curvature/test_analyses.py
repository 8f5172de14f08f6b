"""Every analysis against the dense truth on small problems, for all three operators."""

from __future__ import annotations

import math

import pytest
import torch
from problems import case, relative_error

import deqhess as dh
from deqhess.curvature import (
    ParameterBlock,
    diagonal,
    extreme_eigenpairs,
    hutchinson,
    hutchpp,
    influence,
    newton_step,
    solve_damped,
    spectral_density,
)
from deqhess.implicit import PARTS


def _setup(name="tanh_batched"):
    c = case(name)
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, tol=1e-14, atol=1e-15, batch_dim=c.batch_dim)
    split = eq.hessian_split(c.loss_theta)
    dense = {
        "total": split.total,
        "loss_curvature": split.loss_curvature,
        "dynamics_curvature": split.dynamics_curvature,
    }
    return c, eq, dense


def _sym(m):
    return 0.5 * (m + m.T)


@pytest.mark.parametrize("route", ["lanczos", "dense"])
@pytest.mark.parametrize("part", PARTS)
def test_extreme_eigenvalues_to_1e_8(part, route):
    c, eq, dense = _setup()
    op = eq.hessian_operator(c.loss_theta, part)
    exact = torch.linalg.eigvalsh(_sym(dense[part]))
    scale = float(exact.abs().max())
    below = 0 if route == "lanczos" else 256  # force ARPACK, or the small-P dense route
    top = extreme_eigenpairs(op, k=3, which="largest", progress=False, dense_below=below)
    bottom = extreme_eigenpairs(op, k=3, which="smallest", progress=False, dense_below=below)
    assert torch.allclose(top.eigenvalues, exact[-3:], rtol=0, atol=1e-8 * scale)
    assert torch.allclose(bottom.eigenvalues, exact[:3], rtol=0, atol=1e-8 * scale)
    assert float(top.residuals.max()) <= 1e-6 * scale and top.num_hvps > 3
    v = top.eigenvectors
    assert torch.allclose(v.T @ v, torch.eye(3), atol=1e-8)


@pytest.mark.parametrize("part", PARTS)
def test_traces_within_their_stated_error(part):
    c, eq, dense = _setup()
    op = eq.hessian_operator(c.loss_theta, part)
    truth = float(torch.trace(dense[part]))
    p = op.shape[0]
    exact = hutchpp(op, num_hvps=3 * p, progress=False)  # the sketch spans R^P
    assert math.isclose(exact.estimate, truth, rel_tol=1e-10, abs_tol=1e-10)
    assert exact.std_error == 0.0
    for result in (
        hutchinson(op, 400, seed=1, progress=False),
        hutchpp(op, 30, seed=1, progress=False),
    ):
        assert result.std_error > 0 and result.num_hvps <= 400
        assert abs(result.estimate - truth) <= 5 * result.std_error, result


def test_diagonal_within_its_stated_error_and_by_parameter():
    c, eq, dense = _setup()
    op = eq.hessian_operator(c.loss_theta)
    result = diagonal(op, num_probes=2000, seed=2, progress=False)
    truth = torch.diagonal(dense["total"])
    assert torch.all((result.estimate - truth).abs() <= 5 * result.std_error + 1e-12)
    parts = result.by_parameter(eq.problem.params)
    assert {k: v.shape for k, v in parts.items()} == {k: v.shape for k, v in c.theta.items()}
    errors = result.std_error_by_parameter(eq.problem.params)
    assert torch.equal(torch.cat([errors[k].reshape(-1) for k in c.theta]), result.std_error)


def test_slq_quadrature_reproduces_moments_and_density():
    c, eq, dense = _setup("conv_image")
    h = _sym(dense["total"])
    op = eq.hessian_operator(c.loss_theta)
    p = op.shape[0]
    result = spectral_density(op, num_probes=1, steps=p, seed=3, progress=False)
    # the same probe: Gauss quadrature is exact for degree < 2m polynomials
    g = torch.Generator().manual_seed(3)
    q = (torch.randint(0, 2, (p, 1), generator=g).double() * 2 - 1)[:, 0] / math.sqrt(p)
    theta, tau = result.nodes[0], result.weights[0]
    for k in (0, 1, 2, 3):
        moment = float(q @ torch.linalg.matrix_power(h, k) @ q)
        assert math.isclose(float((tau * theta**k).sum()), moment, rel_tol=1e-8, abs_tol=1e-10)
    many = spectral_density(op, num_probes=60, steps=p, seed=4, progress=False)
    exact = many.smoothed(many.grid, many.sigma)  # same quadrature: identical
    assert torch.allclose(exact, many.density)
    eigenvalues = torch.linalg.eigvalsh(h)
    reference = torch.exp(-0.5 * ((many.grid[:, None] - eigenvalues) / many.sigma) ** 2).sum(1)
    reference = reference / (p * many.sigma * math.sqrt(2 * math.pi))
    step = float(many.grid[1] - many.grid[0])
    assert abs(float(many.density.sum()) * step - 1.0) <= 0.02
    assert float((many.density - reference).abs().sum()) * step <= 0.25
    assert many.num_hvps == 60 * p + 2  # the probes, and 2 checking symmetry


def test_inverse_products_on_an_indefinite_hessian():
    c, eq, dense = _setup()
    h = _sym(dense["total"])
    op = eq.hessian_operator(c.loss_theta)
    eigenvalues = torch.linalg.eigvalsh(h)
    low = float(eigenvalues[0])
    assert low < 0  # this family's Hessian is indefinite
    b = torch.randn(op.shape[0])
    # an indefinite but well-posed shift (between the two lowest eigenvalues), and a PD one
    for damping in (-float(eigenvalues[:2].mean()), -low + 0.5):
        result = solve_damped(op, b, damping, method="minres", tol=1e-12, progress=False)
        expected = torch.linalg.solve(h + damping * torch.eye(len(b)), b)
        assert relative_error(result.solution, expected) <= 1e-6 and result.residual <= 1e-9
    result = solve_damped(op, b, -low + 0.5, method="cg", tol=1e-12, progress=False)
    expected = torch.linalg.solve(h + (-low + 0.5) * torch.eye(len(b)), b)
    assert result.converged and relative_error(result.solution, expected) <= 1e-6
    g = torch.randn(op.shape[0])
    step = newton_step(op, g, damping=-low + 0.5, tol=1e-12, progress=False)
    assert float(g @ step.solution) < 0  # damped past λ_min: a descent direction
    train = torch.randn(4, op.shape[0])
    scores = influence(op, g, train, damping=1.0, tol=1e-12, progress=False).scores
    truth = -train @ torch.linalg.solve(h + torch.eye(len(g)), g)
    assert relative_error(scores, truth) <= 1e-6


def test_parameter_blocks():
    c, eq, dense = _setup()
    op = eq.hessian_operator(c.loss_theta)
    block = ParameterBlock(op, eq.problem.params, ["W", "b"])
    index = torch.cat([torch.arange(0, 25), torch.arange(40, 45)])
    assert block.shape == (30, 30)
    expected = dense["total"][index][:, index]
    v = torch.randn(30, 2)
    assert relative_error(block.matmat(v), expected @ v) <= 1e-12
    top = extreme_eigenpairs(block, k=2, progress=False, dense_below=0)
    assert torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(_sym(expected))[-2:], atol=1e-8)
    # the block's order is the names' order (it was θ's, whatever was asked)
    swapped = ParameterBlock(op, eq.problem.params, ["b", "W"])
    index = torch.cat([torch.arange(40, 45), torch.arange(0, 25)])
    expected = dense["total"][index][:, index]
    assert relative_error(swapped.matmat(v), expected @ v) <= 1e-12
    with pytest.raises(ValueError, match=r"parameter names \['b'\] are given more than once"):
        ParameterBlock(op, eq.problem.params, ["b", "b"])
    with pytest.raises(ValueError, match=r"names is empty; choose from \['W', 'U', 'b'\]"):
        ParameterBlock(op, eq.problem.params, [])
    # a θ-structured direction may list its keys in any order: they are read by name
    direction = {n: torch.ones_like(t) for n, t in reversed(list(c.theta.items()))}
    in_order = {n: torch.ones_like(t) for n, t in c.theta.items()}
    flatten = eq.problem.params.flatten
    got, want = (flatten(eq.hvp(c.loss_theta, d)) for d in (direction, in_order))
    assert torch.equal(got, want)


def test_analysis_errors():
    c, eq, _ = _setup()
    op = eq.hessian_operator(c.loss_theta)
    with pytest.raises(ValueError, match="unknown which='top'"):
        extreme_eigenpairs(op, which="top")
    with pytest.raises(ValueError, match=r"k must lie in \[1, P\) = \[1, 45\)"):
        extreme_eigenpairs(op, k=45)
    with pytest.raises(ValueError, match="hutch\\+\\+ needs num_hvps >= 6"):
        hutchpp(op, num_hvps=5)
    with pytest.raises(ValueError, match="num_probes >= 2"):
        hutchinson(op, num_probes=1)
    with pytest.raises(ValueError, match="unknown method 'lsqr'"):
        solve_damped(op, torch.ones(45), method="lsqr")
    with pytest.raises(ValueError, match=r"unknown parameter names \['V'\]; choose from"):
        ParameterBlock(op, eq.problem.params, ["V"])


def test_singular_system_is_not_reported_converged():
    c, eq, dense = _setup()
    op = eq.hessian_operator(c.loss_theta)
    shift = -float(torch.linalg.eigvalsh(_sym(dense["total"]))[0])  # H + δI singular
    b = torch.randn(op.shape[0])
    with pytest.raises(dh.AnalysisConvergenceError, match="did not solve") as caught:
        solve_damped(op, b, shift, tol=1e-12, progress=False)
    assert not caught.value.result.converged and caught.value.result.residual > 1e-6
    result = solve_damped(op, b, shift, tol=1e-12, progress=False, require_convergence=False)
    assert not result.converged and result.residual > 1e-6


def test_more_analysis_errors():
    c, eq, _ = _setup()
    op = eq.hessian_operator(c.loss_theta)
    with pytest.raises(ValueError, match="diagonal needs num_probes >= 2"):
        diagonal(op, num_probes=1)
    with pytest.raises(ValueError, match="need num_probes >= 1 and steps >= 1"):
        spectral_density(op, num_probes=0)
    tensor_theta = case("scalar_gains")
    eq2 = dh.Equilibrium(tensor_theta.f, tensor_theta.theta, tensor_theta.x, tensor_theta.h0)
    with pytest.raises(ValueError, match="parameter blocks need a dict theta"):
        ParameterBlock(eq2.hessian_operator(tensor_theta.loss), eq2.problem.params, ["theta"])
    with pytest.raises(dh.AnalysisConvergenceError, match=r"cap of 12 products .* Ritz values"):
        extreme_eigenpairs(op, k=8, dense_below=0, max_hvps=12, tol=1e-15, progress=False)
    with pytest.raises(ValueError, match=r"max_hvps must be an int >= 8; got 7"):
        extreme_eigenpairs(op, k=8, dense_below=0, max_hvps=7)
    with pytest.raises(ValueError, match=r"basis_size must lie in \[k \+ block_size, P\] = "):
        extreme_eigenpairs(op, k=8, dense_below=0, basis_size=8)
    with pytest.raises(ValueError, match=r"tol must be a finite number in \[0, 1\); got 2"):
        extreme_eigenpairs(op, k=8, dense_below=0, tol=2)
    # the old cap on ARPACK's restarts still caps the work, with a deprecation warning
    with (
        pytest.warns(DeprecationWarning, match=r"max_iter=\.\.\.\) is deprecated.* max_hvps"),
        pytest.raises(dh.AnalysisConvergenceError, match=r"cap of \d+ products"),
    ):
        extreme_eigenpairs(op, k=8, dense_below=0, max_iter=1, tol=1e-15, progress=False)


def test_a_standard_error_from_too_few_probes_is_flagged():
    """With 2–3 probes a standard error is itself a rough guess (Hutchinson's sample std:
    the true trace outside ±3 standard errors in 18% of seeds; Hutch++'s √(2‖R‖_F²/n): 9%
    where one eigenvalue dominates its residual): a warning says so."""
    c, eq, _ = _setup()
    op = eq.hessian_operator(c.loss_theta)
    with pytest.warns(RuntimeWarning, match="rests on 2 probes .* num_hvps >= 30"):
        hutchpp(op, 6, progress=False)
    with pytest.warns(RuntimeWarning, match="rests on 3 probes .* num_probes >= 30"):
        hutchinson(op, 3, progress=False)
    with pytest.warns(RuntimeWarning, match="rests on 2 probes .* true diagonal .* >= 30"):
        diagonal(op, 2, progress=False)  # the same estimator, entry by entry
    diagonal(op, 4, progress=False)
    hutchpp(op, 12, progress=False)  # four probes: no warning (warnings are errors here)


def test_a_density_narrower_than_its_grid_is_refused():
    """A Gaussian width below the grid's spacing would be skipped over (∫density was 0.09
    at σ = 1e-3 on a spacing of 1.66): refused, with the grid that would resolve it, on
    which the density integrates to 1 up to the tails cut at ±3σ beyond the extreme Ritz
    values (at most Φ(−3) = 1.35e-3 of the mass)."""
    c, eq, _ = _setup()
    op = eq.hessian_operator(c.loss_theta)
    with pytest.raises(ValueError, match=r"narrower than the grid's spacing .* raise num_points"):
        spectral_density(op, 2, 20, sigma=1e-3, progress=False)
    with pytest.raises(ValueError, match="sigma must be a positive width"):
        spectral_density(op, 2, 20, sigma=0.0, progress=False)
    with pytest.raises(ValueError, match="num_points must be at least 2; got 1"):
        spectral_density(op, 2, 20, num_points=1, progress=False)
    coarse = spectral_density(op, 2, 20, progress=False)
    span = max(float(t.max()) for t in coarse.nodes) - min(float(t.min()) for t in coarse.nodes)
    sigma = span / 1000
    fine = spectral_density(op, 2, 20, num_points=1010, sigma=sigma, progress=False)
    assert abs(float(torch.trapezoid(fine.density, fine.grid)) - 1.0) <= 1.35e-3


def test_counts_that_are_not_ints_are_refused_by_name():
    """A float or bool count was a raw TypeError from deep inside (``slice indices must
    be integers``, ``randint(): argument 'size'``): each is named, with the int to pass."""
    c, eq, _ = _setup()
    op = eq.hessian_operator(c.loss_theta)
    for call, message in [
        (lambda: hutchpp(op, num_hvps=30.0), r"num_hvps must be an int; got 30\.0 \(float\)"),
        (lambda: hutchinson(op, num_probes=True), r"num_probes must be an int; got True \(bool\)"),
        (lambda: diagonal(op, num_probes=8.0), r"got 8\.0 \(float\)\. Pass e\.g\. num_probes=8\.$"),
        (lambda: spectral_density(op, 2.0, 20), r"num_probes must be an int; got 2\.0"),
        (lambda: spectral_density(op, 2, 20.5), r"steps must be an int; got 20\.5 \(float\)\.$"),
    ]:
        with pytest.raises(dh.InputError, match=message):
            call()
