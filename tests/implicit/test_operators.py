"""Curvature operators and the matrix-free paths equal the dense path.

Tolerance 1e-9 relative: the iterative solves stop at a relative residual of 1e-12 and
cond(I − J) < 3 for every family, so they lose at most ~1e-11 against the LU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import CASE_NAMES, case, relative_error
from scipy.sparse.linalg import eigsh

import deqhess as dh
from deqhess.linear import GMRES, Neumann
from deqhess.parameters import ParameterLayout


def _equilibrium(c, linear_solver="dense"):
    return dh.Equilibrium(
        c.f, c.theta, c.x, c.h0, tol=1e-14, atol=1e-15, batch_dim=c.batch_dim,
        linear_solver=linear_solver,
    )  # fmt: skip


@pytest.mark.parametrize("linear", ["gmres", "neumann"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_matrix_free_path_equals_dense_path(name, linear):
    c = case(name)
    dense, free = _equilibrium(c), _equilibrium(c, linear)
    for loss in (c.loss, c.loss_theta):
        v = torch.randn(dense.num_parameters)
        assert relative_error(free.hvp(loss, v), dense.hvp(loss, v)) <= 1e-9
        assert relative_error(free.hessian(loss), dense.hessian(loss)) <= 1e-9
        g_free = ParameterLayout(c.theta).flatten(free.grad(loss))
        g_dense = ParameterLayout(c.theta).flatten(dense.grad(loss))
        assert relative_error(g_free, g_dense) <= 1e-9
    assert free.info.condition_number is None


@pytest.mark.parametrize("name", CASE_NAMES)
def test_operators_match_dense_hessian_and_split(name):
    c = case(name)
    eq = _equilibrium(c)
    split = eq.hessian_split(c.loss_theta)
    p = eq.num_parameters
    block = torch.randn(p, 5)
    for part, dense in [
        ("total", split.total),
        ("loss_curvature", split.loss_curvature),
        ("dynamics_curvature", split.dynamics_curvature),
    ]:
        op = eq.hessian_operator(c.loss_theta, part)
        assert op.shape == (p, p) and op.dtype == torch.float64 and op.part == part
        assert relative_error(op @ block, dense @ block) <= 1e-12
        assert relative_error(op @ block[:, 0], dense @ block[:, 0]) <= 1e-12
        assert relative_error(op.to_dense(), dense) <= 1e-12
    with pytest.warns(DeprecationWarning, match=r"is the loss curvature \[I; Z\]ᵀ∇²L\[I; Z\]"):
        ggn = eq.ggn_operator(c.loss_theta)
    assert relative_error(ggn.to_dense(), split.loss_curvature) <= 1e-12


def test_operator_on_structured_vectors_and_small_chunks():
    c = case("tanh_batched")
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, tol=1e-14, batch_dim=0, chunk_size=3)
    op = eq.hessian_operator(c.loss)
    assert op.chunk_size == 3
    dense = eq.hessian(c.loss)
    v = {k: torch.randn_like(t) for k, t in c.theta.items()}
    flat = torch.cat([t.reshape(-1) for t in v.values()])
    out = op @ v
    assert list(out) == list(c.theta)
    assert relative_error(torch.cat([t.reshape(-1) for t in out.values()]), dense @ flat) <= 1e-12
    assert relative_error(op.to_dense(), dense) <= 1e-12


def test_scipy_eigsh_runs_on_the_operator():
    c = case("conv_image")
    eq = _equilibrium(c)
    dense = eq.hessian(c.loss)
    exact = torch.linalg.eigvalsh(0.5 * (dense + dense.T)).numpy()
    linear_operator = eq.hessian_operator(c.loss).to_scipy()
    assert linear_operator.shape == dense.shape and linear_operator.dtype == np.float64
    top = eigsh(linear_operator, k=3, which="LA", return_eigenvectors=False, tol=1e-12)
    np.testing.assert_allclose(np.sort(top), exact[-3:], rtol=1e-8)
    block = np.random.default_rng(0).standard_normal((dense.shape[0], 2))
    np.testing.assert_allclose(linear_operator @ block, dense.numpy() @ block, rtol=1e-10)


def test_gmres_instance_and_operator_errors():
    c = case("tanh_coupled")
    eq = _equilibrium(c, GMRES(restart=4))
    assert eq.info.linear_solver == "GMRES(restart=4, max_iter=500)"
    op = eq.hessian_operator(c.loss)
    with pytest.raises(ValueError, match=r"acts on flat \[45\] vectors, \[45, K\] blocks"):
        op @ torch.ones(3)
    with pytest.raises(ValueError, match=r"has dtype torch.float32 but the operator is"):
        op @ torch.ones(45, dtype=torch.float32)
    with pytest.raises(ValueError, match="non-finite"):
        op @ torch.full((45,), float("inf"))
    with pytest.raises(ValueError, match=r"unknown curvature part 'ggn'; use one of"):
        eq.hessian_operator(c.loss, "ggn")
    with pytest.raises(ValueError, match="unknown linear_solver"):
        dh.Equilibrium(c.f, c.theta, c.x, c.h0, linear_solver="cholesky")


def test_neumann_failure_surfaces_as_convergence_error():
    c = case("tanh_coupled")
    eq = _equilibrium(c, Neumann(max_iter=2))
    with pytest.raises(dh.ConvergenceError, match="Neumann"):
        eq.grad(c.loss)


def test_float32_operator():
    c = case("tanh_batched")
    theta32 = {k: v.float() for k, v in c.theta.items()}
    eq32 = dh.Equilibrium(c.f, theta32, c.x.float(), c.h0.float(), batch_dim=0,
                          linear_solver="gmres")  # fmt: skip
    eq64 = _equilibrium(c)
    op32 = eq32.hessian_operator(c.loss)
    assert op32.dtype == torch.float32 and op32.to_scipy().dtype == np.float32
    v = torch.randn(eq64.num_parameters)
    assert relative_error((op32 @ v.float()).double(), eq64.hvp(c.loss, v)) <= 1e-4


def test_curvlinops_functions_run_on_deqhess_operators():
    """The operator surface curvlinops' functions use (shape, dtype, device, ``@`` on
    ``[P, K]`` blocks): its Hutchinson trace on the exact Hessian operator equals
    ``Σᵢ gᵢᵀ H gᵢ / K`` of the dense Hessian for the same probes (curvlinops draws them from
    torch's global generator, so re-seeding replays them)."""
    curvlinops = pytest.importorskip("curvlinops")
    c = case("tanh_batched")
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, batch_dim=0, tol=1e-14, atol=1e-15)
    op, dense = eq.hessian_operator(c.loss), eq.hessian(c.loss)
    torch.manual_seed(3)
    estimate = curvlinops.hutchinson_trace(op, num_matvecs=10)
    torch.manual_seed(3)
    probes = torch.stack(
        [curvlinops.sampling.random_vector(op.shape[0], "rademacher", op.device, op.dtype)
         for _ in range(10)], dim=1,
    )  # fmt: skip
    assert torch.allclose(estimate, torch.einsum("ij,ij", probes, dense @ probes) / 10, rtol=1e-12)


def test_independent_slices_are_found_without_batch_dim():
    """batch_dim=None with a 3 × 700 state (one 2,100-wide system: too wide for one dense
    LU) whose rows f treats independently: the linearisation is found block diagonal and
    solved per row by LU, with the same derivatives as declaring batch_dim=0; a cell that
    couples the rows keeps the matrix-free solve of the whole system."""
    g = torch.Generator().manual_seed(0)
    theta = {"a": 0.4 * torch.rand(700, generator=g), "u": torch.randn(700, 2, generator=g)}
    x = torch.randn(3, 2, generator=g)

    def f(x, h, t):
        return torch.tanh(t["a"] * h + x @ t["u"].T)

    def coupled(x, h, t):
        return f(x, h, t) + 0.1 * torch.tanh(h.mean(0, keepdim=True))

    def loss(h):
        return (h**2).sum() + h.sum(0).pow(2).sum()

    v = torch.randn(2100, generator=g)
    whole = dh.Equilibrium(f, theta, x, torch.zeros(3, 700), tol=1e-13, atol=1e-14)
    rows = dh.Equilibrium(f, theta, x, torch.zeros(3, 700), tol=1e-13, atol=1e-14, batch_dim=0)
    assert relative_error(whole.hvp(loss, v), rows.hvp(loss, v)) <= 1e-11
    assert whole.linearization.outer == (1, 2100) and isinstance(whole.linear_solver, dh.Dense)
    other = dh.Equilibrium(coupled, theta, x, torch.zeros(3, 700), tol=1e-13, atol=1e-14)
    other.hvp(loss, v)
    assert other.linearization.outer is None and isinstance(other.linear_solver, dh.GMRES)


def test_matmat_and_matvec_name_the_form_they_take():
    """``op.matmat(v)`` with a flat ``v`` was a raw ``IndexError: tuple index out of range``."""
    c = case("tanh_batched")
    op = _equilibrium(c).hessian_operator(c.loss)
    p = op.shape[0]
    with pytest.raises(
        dh.InputError,
        match=rf"^CurvatureOperator\.matmat takes \[{p}, K\] blocks; got \({p},\)\. For flat "
        rf"\[{p}\] vectors, use op\.matvec\(v\) or op @ v\.$",
    ):
        op.matmat(torch.ones(p))
    with pytest.raises(dh.InputError, match=rf"matvec takes flat \[{p}\] vectors; got \({p}, 2\)"):
        op.matvec(torch.ones(p, 2))
    with pytest.raises(dh.InputError, match=rf"matmat takes \[{p}, K\] blocks; got \(3, 2\)\.$"):
        op.matmat(torch.ones(3, 2))


def test_a_dict_direction_with_a_wrong_entry_names_it():
    """A θ-structured direction with one entry of another shape got a message ending in
    "got dict": now it names the entry and both shapes (or the keys that differ)."""
    c = case("tanh_batched")
    eq = _equilibrium(c)
    direction = {k: torch.ones_like(t) for k, t in c.theta.items()}
    direction["U"] = direction["U"].T  # θ['U'] is 5 × 3
    with pytest.raises(
        dh.InputError,
        match=r"got a dict whose entry 'U' has shape \(3, 5\) but theta\['U'\] has shape "
        r"\(5, 3\)\.$",
    ):
        eq.hvp(c.loss, direction)
    del direction["U"]
    with pytest.raises(
        dh.InputError,
        match=r"got a dict without \['U'\] and with keys theta does not have: \['V'\]\.$",
    ):
        eq.hessian_operator(c.loss) @ {**direction, "V": torch.ones(2)}
