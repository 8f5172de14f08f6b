"""``inverse_diagonal``: ``diag((G + δI)⁻¹)`` against a dense inverse.

``G`` is the loss curvature of a convex loss (positive semi-definite, from
``eq.hessian_split(...)``, checked against unrolled autodiff in tests/implicit), and
the reference ``torch.linalg.inv(G + δI)``. The dense method is exact to rounding (1e-10);
the probes' estimate must lie within 5 standard errors of the truth in every entry (the
stated error estimate; with the seed fixed the check is deterministic).
"""

from __future__ import annotations

import pytest
import torch
from problems import case, relative_error

import deqhess as dh
from deqhess.curvature import inverse_diagonal

DAMPING = 0.5


@pytest.fixture(scope="module")
def setup():
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        c = case("tanh_batched")
        eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, tol=1e-14, atol=1e-15, batch_dim=0)
        split = eq.hessian_split(c.loss)
        readout = eq.hessian_split(c.loss_theta)
    dense = 0.5 * (split.loss_curvature + split.loss_curvature.T)
    exact = torch.linalg.inv(dense + DAMPING * torch.eye(len(dense))).diagonal()
    return c, eq, exact, readout


def test_dense_is_exact(setup):
    c, eq, exact, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    result = inverse_diagonal(op, DAMPING, progress=False)
    assert result.method == "dense" and result.num_hvps == op.shape[0]
    assert relative_error(result.estimate, exact) <= 1e-10


def test_probes_are_within_their_error_estimate(setup):
    c, eq, exact, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    result = inverse_diagonal(op, DAMPING, method="probes", num_probes=64, tol=1e-10,
                              progress=False)  # fmt: skip
    assert result.num_probes == 64 and result.max_residual <= 1e-9
    assert bool(((result.estimate - exact).abs() <= 5 * result.std_error).all())
    assert relative_error(result.estimate, exact) <= 0.2  # 64 probes: a rough estimate


def test_the_product_cap(setup):
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    size = op.shape[0]
    with pytest.raises(dh.ConvergenceError, match="above max_hvps"):
        inverse_diagonal(op, DAMPING, method="dense", max_hvps=size - 1, progress=False)
    # the cap stops the probes early, at 2: too few behind an error bar, as it says
    with pytest.warns(RuntimeWarning, match="rests on 2 probes"):
        auto = inverse_diagonal(op, DAMPING, max_hvps=size - 1, num_probes=8, progress=False)
    assert auto.method == "probes" and auto.num_hvps <= size - 1
    assert auto.num_probes == 2
    with pytest.raises(dh.ConvergenceError, match="fewer than two probes"):
        inverse_diagonal(op, DAMPING, method="probes", max_hvps=3, progress=False)


def test_a_standard_error_from_too_few_probes_is_flagged(setup):
    """With 2 probes ±1 standard error held the true variance in 50% of entries (100
    seeds, this operator), not 68% — a Student t with one degree of freedom: below 4
    probes a warning says so, as hutchinson's does; from 4 on none (warnings are errors
    here)."""
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    for count in (2, 3):
        with pytest.warns(RuntimeWarning, match=rf"rests on {count} probes .* within ±1 "
                          r"standard error in 50% .* num_probes >= 30"):  # fmt: skip
            inverse_diagonal(op, DAMPING, method="probes", num_probes=count, progress=False)
    inverse_diagonal(op, DAMPING, method="probes", num_probes=4, progress=False)
    inverse_diagonal(op, DAMPING, method="dense", num_probes=2, progress=False)  # no probes


def test_an_indefinite_system_is_no_covariance(setup):
    """With a readout in L(h, θ) the loss curvature is indefinite (λ_min ≈ −3.2)."""
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss_theta, "loss_curvature")
    for method in ("dense", "probes"):
        with pytest.raises(ValueError, match="not positive definite"):
            inverse_diagonal(op, 1e-3, method=method, progress=False)


class Matrix:
    """A dense matrix as a duck-typed operator (no ``symmetric`` flag to go by)."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def matmat(self, block):
        return self.matrix @ block


@pytest.mark.parametrize("method", ["dense", "probes"])
def test_a_non_symmetric_operator_is_refused_as_such(setup, method):
    """A non-symmetric G was reported "not positive definite" (its symmetric part's
    curvature) — or, with a positive definite symmetric part S, the dense method
    returned diag((S + δI)⁻¹) as if G were S. Both are refused for what they are,
    with the asymmetry measured (on the formed matrix, or on two probes: 2 products)."""
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    curvature = op.matmat(torch.eye(op.shape[0]))
    curvature = 0.5 * (curvature + curvature.T)  # PSD
    g = torch.Generator().manual_seed(0)
    skew = torch.randn(op.shape, generator=g)
    skew = 0.3 * (skew - skew.T)
    shifted = curvature + skew  # its symmetric part is PSD: no negative curvature
    unrelated = torch.randn(op.shape, generator=g)  # its symmetric part is indefinite
    for matrix in (shifted, unrelated):
        with pytest.raises(ValueError, match=r"G is not symmetric: .* reaches .*·‖G‖") as e:
            inverse_diagonal(Matrix(matrix), DAMPING, method=method, progress=False)
        assert "positive definite" not in str(e.value)
    # a symmetric one passes the same check (as the operator itself does elsewhere here)
    inverse_diagonal(Matrix(curvature), DAMPING, method=method, num_probes=4, progress=False)


def test_argument_errors(setup):
    c, eq, _, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    with pytest.raises(ValueError, match="damping must be > 0"):
        inverse_diagonal(op, 0.0)
    with pytest.raises(ValueError, match="unknown method 'lanczos'"):
        inverse_diagonal(op, 1.0, method="lanczos")
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        inverse_diagonal(op, 1.0, method="probes", num_probes=1)


def test_damping_is_a_real_number_a_0dim_tensor_included(setup):
    """As ``solve_damped``'s: a 0-dim tensor is its value; None (a raw TypeError before)
    and a string are named."""
    c, eq, exact, _ = setup
    op = eq.hessian_operator(c.loss, "loss_curvature")
    result = inverse_diagonal(op, torch.tensor(DAMPING), progress=False)
    assert relative_error(result.estimate, exact) <= 1e-10
    for bad in (None, "0.5"):
        with pytest.raises(dh.InputError, match=r"damping must be a real number δ .*got"):
            inverse_diagonal(op, bad, progress=False)
