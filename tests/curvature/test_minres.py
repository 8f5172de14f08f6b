"""MINRES (the default of ``solve_damped``): converges where it should, names a singular system.

The references are dense: diagonal systems, whose solution ``b / d`` and least-squares
solution (``b_i / d_i`` where ``d_i ≠ 0``) are exact, and ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch
from problems import DenseOperator, relative_error

import deqhess as dh
from deqhess.curvature import InverseStatus, solve_damped
from deqhess.curvature.minres import MinresOutcome, minres


def _rhs(size: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("lowest", [1e-2, 1e-3], ids=["cond1e2", "cond1e3"])
def test_minres_solves_well_conditioned_definite_systems(lowest):
    """The report: on ``diag(logspace(−3, 0, 300))`` (positive definite, condition 10³)
    every default solve (MINRES, tol 1e-8) was called "stagnated … singular or too
    ill-conditioned" at a residual of 5.7e-8, where CG converged in 252 products: SciPy's
    least-squares test, asked by a restart for the last factor to tol, fired at once on a
    residual lying on the small eigenvalues. Now every solve reaches tol, within the
    default cap, at the dense solution (within cond · tol)."""
    d = torch.logspace(torch.log10(torch.tensor(lowest)).item(), 0, 300)
    op = DenseOperator(torch.diag(d))
    for seed in range(5):
        b = _rhs(300, seed)
        result = solve_damped(op, b, progress=False)
        assert result.status is InverseStatus.CONVERGED and result.residual <= 1e-8
        assert relative_error(result.solution, b / d) <= 2 * (1 / lowest) * 1e-8


def test_minres_solves_a_damped_rank_deficient_system():
    """The report's minimal case: ``diag(57 values in [0.02, 2], 254 zeros) + δI`` with
    ``δ = 1e-3`` (condition 2,001, a damped rank-deficient GGN's shape) was "stagnated" at
    2e-8; CG took 68 products. MINRES now converges in about as many."""
    d = torch.cat([torch.logspace(-1.7, 0.3, 57), torch.zeros(254)])
    op = DenseOperator(torch.diag(d))
    for seed in range(5):
        b = _rhs(311, seed)
        result = solve_damped(op, b, damping=1e-3, progress=False)
        assert result.status is InverseStatus.CONVERGED and result.residual <= 1e-8
        assert relative_error(result.solution, b / (d + 1e-3)) <= 2 * 2001 * 1e-8
        assert result.num_hvps <= 100


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("spectrum", ["definite", "indefinite"])
def test_minres_names_a_singular_system_with_a_least_squares_solution(dtype, spectrum):
    """``diag(0 ×5, …)`` with ``b`` outside the range: MINRES stops as STAGNATED (not at
    the cap), its residual is the least-squares one and its solution matches the
    least-squares solution on the range (rounding leaves a component in the null space, so
    it is not the minimum-norm one — as documented)."""
    rest = (
        torch.linspace(-1, -0.01, 100) if spectrum == "indefinite" else torch.logspace(-3, -2, 100)
    )
    d = torch.cat([torch.zeros(5), rest, torch.logspace(-2, 0, 100)])
    op = DenseOperator(torch.diag(d).to(dtype))
    b = _rhs(205, 0)
    with pytest.raises(dh.AnalysisConvergenceError, match=r"stagnated after .* lies in the null"):
        solve_damped(op, b.to(dtype), progress=False)
    result = solve_damped(op, b.to(dtype), progress=False, require_convergence=False)
    assert result.status is InverseStatus.STAGNATED and result.num_hvps < 2 * 205
    least_squares = float(b[:5].norm() / b.norm())
    assert abs(result.residual - least_squares) <= 1e-3 * least_squares
    on_range = result.solution.double()[5:]
    assert relative_error(on_range, b[5:] / d[5:]) <= (1e-6 if dtype == torch.float64 else 1e-2)


def test_minres_stops_where_its_running_residual_reaches_the_threshold():
    """One run of :func:`minres` on ``(diag(d) − δ) x = r``: CONVERGED with its running
    residual within the threshold and matching the true one; MAX_ITER when capped."""
    d = torch.linspace(1.0, 3.0, 50)
    op = DenseOperator(torch.diag(d))
    b = _rhs(50, 1)
    run = minres(op, b, -0.5, 1e-10 * float(b.norm()), 1e-10, 100)
    assert run.outcome is MinresOutcome.CONVERGED and run.products <= 50
    true = float((b - (d - 0.5) * run.solution).norm())
    assert run.residual <= 1e-10 * float(b.norm()) and abs(true - run.residual) <= 1e-12
    capped = minres(op, b, -0.5, 1e-10 * float(b.norm()), 1e-10, 3)
    assert capped.outcome is MinresOutcome.MAX_ITER and capped.products == 3
