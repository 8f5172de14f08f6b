"""What every analysis accepts as its operator: a square operator, symmetric where needed.

A tensor, something without ``matmat``, a rectangular operator, or one that says
``symmetric=False`` where the analysis needs symmetry (eigenpairs, spectral densities,
inverses) is refused with :class:`deqhess.InputError` before any product; traces and
diagonals need no symmetry and run. ``extreme_eigenpairs``' dense path measures the
asymmetry of the matrix it forms (it returned the symmetric part's eigenvalues, residuals
0.8–1.5, with no error).
"""

from __future__ import annotations

import pytest
import torch
from problems import DenseOperator
from torch import Tensor

import deqhess as dh
from deqhess.curvature import (
    ParameterBlock,
    diagonal,
    extreme_eigenpairs,
    hutchinson,
    hutchpp,
    inverse_diagonal,
    operator_accuracy,
    solve_damped,
    spectral_density,
)
from deqhess.operator import Operator
from deqhess.parameters import ParameterLayout


def _matrices(p: int = 30):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(p, p, dtype=torch.float64, generator=g)
    return a @ a.T + p * torch.eye(p, dtype=torch.float64), a + 3 * torch.eye(
        p, dtype=torch.float64
    )


SYMMETRIC = {
    "extreme_eigenpairs": lambda op: extreme_eigenpairs(op, k=2, progress=False),
    "spectral_density": lambda op: spectral_density(op, num_probes=2, steps=5, progress=False),
    "inverse_diagonal": lambda op: inverse_diagonal(op, 1.0, progress=False),
    "solve_damped": lambda op: solve_damped(op, torch.ones(30, dtype=torch.float64), 1.0),
}
ANY = {
    "hutchinson": lambda op: hutchinson(op, num_probes=4, progress=False),
    "hutchpp": lambda op: hutchpp(op, num_hvps=30, progress=False),
    "diagonal": lambda op: diagonal(op, num_probes=4, progress=False),
    "operator_accuracy": lambda op: operator_accuracy(op, num_probes=2, progress=False),
}


@pytest.mark.parametrize("name", [*SYMMETRIC, *ANY])
def test_a_tensor_or_a_rectangular_operator_is_refused_by_name(name):
    run = {**SYMMETRIC, **ANY}[name]
    spd, _ = _matrices()
    with pytest.raises(dh.InputError, match="not a tensor"):
        run(spd)
    with pytest.raises(dh.InputError, match="square"):
        run(DenseOperator(spd[:, :20], symmetric=False))
    with pytest.raises(dh.InputError, match="matmat"):
        run(object())


@pytest.mark.parametrize("name", list(SYMMETRIC))
def test_an_operator_flagged_not_symmetric_is_refused_where_symmetry_is_needed(name):
    spd, general = _matrices()
    for matrix in (general, spd):  # the flag is what the operator says: refused either way
        with pytest.raises(dh.InputError, match="symmetric"):
            SYMMETRIC[name](DenseOperator(matrix, symmetric=False))
    SYMMETRIC[name](DenseOperator(spd, symmetric=True))  # the control runs


@pytest.mark.parametrize("name", list(ANY))
def test_traces_and_diagonals_take_any_square_operator(name):
    _, general = _matrices()
    ANY[name](DenseOperator(general, symmetric=False))


def test_the_dense_eigenpairs_measure_the_asymmetry_of_what_they_form():
    _, general = _matrices()
    with pytest.raises(dh.InputError, match="not symmetric"):
        extreme_eigenpairs(DenseOperator(general, symmetric=True), k=3, progress=False)


class _Duck:
    """A non-symmetric matrix with the operator's attributes, claiming nothing."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def matmat(self, block: Tensor) -> Tensor:
        return self.matrix @ block


def test_lanczos_analyses_measure_the_asymmetry_of_an_operator_that_claims_nothing():
    """Before: ``spectral_density`` on an upper-triangular P = 40 operator (eigenvalues in
    [0.69, 4.85]) returned nodes spanning [−4.2, 9.6], silently; Lanczos eigenpairs ran to
    their cap and blamed slow convergence."""
    g = torch.Generator().manual_seed(1)
    p = 300
    upper = torch.triu(torch.randn(p, p, dtype=torch.float64, generator=g)) * 0.1
    upper += torch.eye(p, dtype=torch.float64) * 3
    with pytest.raises(dh.InputError, match="not symmetric"):
        spectral_density(_Duck(upper[:40, :40]), num_probes=2, steps=10, progress=False)
    with pytest.raises(dh.InputError, match="not symmetric"):
        extreme_eigenpairs(_Duck(upper), k=2, progress=False)  # P > 256: Lanczos
    symmetric = (upper + upper.T) / 2
    extreme_eigenpairs(_Duck(symmetric), k=2, progress=False)  # the control runs


def test_an_operator_returning_the_wrong_shape_or_dtype_and_an_inherited_flag_are_named():
    """Before: a ``matmat`` returning too few rows or a vector reached torch's raw errors,
    one returning float32 for a float64 operator gave float32 eigenvalues silently, and a
    subclass that never set ``symmetric`` was told it had declared itself non-symmetric."""
    spd, _ = _matrices()

    class Rows(_Duck):
        def matmat(self, block):
            return (self.matrix @ block)[:-1]

    class Vector(_Duck):
        def matmat(self, block):
            return (self.matrix @ block)[:, 0]

    class Single(_Duck):
        def matmat(self, block):
            return (self.matrix @ block).float()

    for kind in (Rows, Vector, Single):
        with pytest.raises(dh.InputError, match="an operator's matmat maps"):
            hutchinson(kind(spd), num_probes=4, progress=False)

    class Silent(Operator):
        def __init__(self, matrix):
            self.matrix = matrix
            self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, "cpu"

        def matmat(self, block):
            return self.matrix @ block

    with pytest.raises(dh.InputError, match="inherits symmetric=False"):
        extreme_eigenpairs(Silent(spd), k=2, progress=False)


def _laid_out() -> tuple[DenseOperator, ParameterLayout, Tensor]:
    """A diagonal operator on θ = {a: [2, 3], b: [4], c: [5]} (P = 15), whose diagonal
    estimate is exact: ``z ⊙ D z = diag(D)`` for every ±1 probe ``z``."""
    theta = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(5)}
    d = torch.arange(1.0, 16.0)
    return DenseOperator(torch.diag(d)), ParameterLayout(theta), d


def test_a_parameter_block_refuses_a_layout_that_is_not_its_operators():
    """Before: a layout of another θ (48 parameters for an operator of 80) was taken, and
    the block's index ranges picked other entries (1.7 relative off the block meant)."""
    op, layout, _ = _laid_out()
    smaller = ParameterLayout({"b": torch.zeros(4), "c": torch.zeros(5)})
    with pytest.raises(dh.InputError, match=r"the layout holds 9 parameters but the operator "
                       r"is 15 × 15.*pass the layout of the operator's own θ"):  # fmt: skip
        ParameterBlock(op, smaller, ["c"])
    # an operator that knows its θ (a curvature operator) refuses one of the same size
    # in another order, which would shift every range
    op.layout = layout
    reordered = ParameterLayout({"c": torch.zeros(5), "b": torch.zeros(4), "a": torch.zeros(2, 3)})
    with pytest.raises(dh.InputError, match=r"is not the operator's own θ, \{'a': \(2, 3\)"):
        ParameterBlock(op, reordered, ["c"])
    with pytest.raises(dh.InputError, match=r"takes θ's ParameterLayout .*got dict"):
        ParameterBlock(op, {"a": torch.zeros(2, 3)}, ["a"])
    ParameterBlock(op, layout, ["c"])  # the control: its own layout


def test_a_diagonal_of_a_parameter_block_splits_by_the_blocks_own_layout():
    """Before: ``diagonal(block).by_parameter(layout)`` raised torch's raw split_with_sizes
    error with θ's layout; the block now carries its own (``block.layout``: the kept
    parameters in the order asked), and another layout is refused by name."""
    op, layout, d = _laid_out()
    block = ParameterBlock(op, layout, ["c", "a"])
    assert block.layout.names == ("c", "a") and block.layout.size == 11
    result = diagonal(block, num_probes=4, progress=False)
    parts = result.by_parameter(block.layout)
    assert list(parts) == ["c", "a"]
    assert torch.equal(parts["c"], d[10:]) and torch.equal(parts["a"], d[:6].reshape(2, 3))
    errors = result.std_error_by_parameter(block.layout)
    assert errors["a"].shape == (2, 3) and float(errors["c"].abs().max()) == 0.0
    for call in (result.by_parameter, result.std_error_by_parameter):
        with pytest.raises(dh.InputError, match=r"the diagonal has 11 entries but the layout "
                           r"holds 15 parameters.*its own block\.layout"):  # fmt: skip
            call(layout)


SEEDED = {
    "extreme_eigenpairs": lambda op, seed: (
        extreme_eigenpairs(op, k=2, seed=seed, dense_below=0, progress=False).eigenvalues
    ),
    "hutchinson": lambda op, seed: hutchinson(op, 8, seed=seed, progress=False).estimate,
    "hutchpp": lambda op, seed: hutchpp(op, 24, seed=seed, progress=False).estimate,
    "diagonal": lambda op, seed: diagonal(op, 8, seed=seed, progress=False).estimate,
    "spectral_density": lambda op, seed: (
        spectral_density(op, 4, 10, seed=seed, progress=False).density
    ),
    "inverse_diagonal": lambda op, seed: (
        inverse_diagonal(op, 1.0, method="probes", num_probes=4, seed=seed, progress=False).estimate
    ),
    "operator_accuracy": lambda op, seed: (
        operator_accuracy(op, num_probes=2, seed=seed, progress=False).asymmetry
    ),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_every_randomised_analysis_reads_its_seed_alike(name):
    """Before: ``seed=None`` was torch's raw "manual_seed expected a long" in all of these
    (the dense eigenpairs alone took it). One reading of ``seed`` for all: an int repeats
    the run exactly, None draws fresh probes (as NumPy's ``default_rng(None)``), and
    anything else — a float, a bool, a negative int — is a named InputError."""
    spd, _ = _matrices()
    op = DenseOperator(spd)
    run = SEEDED[name]
    first, again = run(op, 3), run(op, 3)
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(again))
    fresh = torch.as_tensor(run(op, None))
    assert bool(torch.isfinite(fresh).all())
    for bad, says in ((1.5, r"got 1\.5 \(float\)"), (True, r"got True \(bool\)"),
                      ("0", r"got '0' \(str\)")):  # fmt: skip
        with pytest.raises(dh.InputError, match=r"seed must be an int \(or None.*" + says):
            run(op, bad)
    with pytest.raises(dh.InputError, match=r"seed must lie in \[0, 2\*\*63\); got -1"):
        run(op, -1)


def test_seed_none_draws_fresh_probes_at_each_call():
    """Different probes at each call (the chance of two equal draws of 8 × 30 signs is
    2⁻²⁴⁰), unlike any int seed."""
    spd, _ = _matrices()
    op = DenseOperator(spd)
    estimates = {hutchinson(op, 8, seed=None, progress=False).estimate for _ in range(2)}
    assert len(estimates) == 2
