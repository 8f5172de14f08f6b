"""The linearisation of a fixed point: the independence check, the shared solve, statistics,
warm starts, and products taken in the contexts where torch.func misbehaves."""

from __future__ import annotations

import pytest
import torch

from deqhess import NonFiniteError
from deqhess.linear import (
    GMRES,
    Dense,
    Linearization,
    Neumann,
    ResidualOperator,
    coupling_tolerance,
    row_coupling,
)


def _independent(samples=5, width=4, seed=0, rate=0.5):
    g = torch.Generator().manual_seed(seed)
    w = rate * torch.randn(samples, width, width, generator=g) / width**0.5

    def fn(h):
        return torch.tanh(torch.einsum("sij,sj->si", w, h) + 0.2)

    return fn, torch.randn(samples, width, generator=g)


def _with_coupling(samples, source, target, strength=1e-3):
    fn, h = _independent(samples)

    def coupled(h):
        out = fn(h)
        return out.index_add(0, torch.tensor([target]), strength * torch.sin(h[source])[None])

    return coupled, h


@pytest.mark.parametrize("direction", ["apply", "apply_transpose"])
def test_independent_rows_show_no_coupling(direction):
    fn, h = _independent(samples=40)
    coupling, _ = row_coupling(getattr(ResidualOperator(fn, h), direction), h)
    assert coupling <= coupling_tolerance(h.dtype)


@pytest.mark.parametrize(
    ("samples", "source", "target"),
    [(2, 1, 0), (2, 0, 1), (5, 0, 2), (5, 2, 4), (40, 3, 19), (40, 35, 3), (300, 0, 256),
     (300, 257, 1)],
    ids=lambda v: str(v),
)  # fmt: skip
def test_any_one_way_coupling_is_seen(samples, source, target):
    """One-way couplings, between rows of the same parity, and between rows whose indices
    differ only in a high base-16 digit: each changes the coupled row's derivative by
    ~1e-3 relative, far above the 2e-13 tolerance, and is reported at the receiving row
    (of ``J``; of ``(I − J)ᵀ`` the coupling runs the other way)."""
    fn, h = _with_coupling(samples, source, target)
    op = ResidualOperator(fn, h)
    coupling, row = row_coupling(op.apply, h)
    assert coupling > 1e-5 and row == target
    coupling, row = row_coupling(op.apply_transpose, h)
    assert coupling > 1e-5 and row == source


def test_linearization_checks_before_its_first_solve():
    fn, h = _with_coupling(5, 1, 3)
    lin = Linearization(fn, h, Dense(), independent_rows=True, declared=("f couples", "fix it"))
    assert not lin.is_prepared  # the check and the set-up are lazy
    with pytest.raises(
        ValueError,
        match=r"f couples \(declared independent\): the products of ∂F/∂h for sample 1 .*fix it",
    ):
        lin.solve(torch.randn(5, 4))

    # one coupled system: no check, and the solve is that of the full J
    def whole(r):
        return fn(r.reshape(5, 4)).reshape(1, -1)

    full = Linearization(whole, h.reshape(1, -1), Dense())
    x = full.solve(torch.ones(1, 20))
    jac = torch.func.jacrev(whole)(h.reshape(1, -1))
    assert torch.allclose(x @ (torch.eye(20) - jac[0, :, 0, :]).T, torch.ones(1, 20), atol=1e-13)


def test_non_finite_jacobian_is_named():
    def fn(h):
        return 0.5 * torch.sqrt(h**2)  # derivative 0/0 at h* = 0

    lin = Linearization(fn, torch.zeros(3, 2), GMRES(), independent_rows=True)
    with pytest.raises(
        NonFiniteError, match=r"∂F/∂h is not finite at the fixed point \(sample 0\)"
    ):
        lin.solve(torch.ones(3, 2))


@pytest.mark.parametrize("strategy", [Dense(), GMRES()], ids=repr)
def test_one_prepared_solve_serves_both_systems_and_is_recorded(strategy):
    fn, h = _independent()
    lin = Linearization(fn, h, strategy)
    a = torch.eye(4) - ResidualOperator(fn, h).jacobian_blocks()
    rhs = torch.randn(3, 5, 4)
    x = lin.solve(rhs)
    y = lin.solve(rhs, transpose=True)
    assert torch.allclose(torch.einsum("sij,ksj->ksi", a, x), rhs, atol=1e-12)
    assert torch.allclose(torch.einsum("sji,ksj->ksi", a, y), rhs, atol=1e-12)
    prepared = lin.prepared
    lin.solve_transpose(rhs)
    assert lin.prepared is prepared  # set up once
    assert lin.stats.solves == 3
    if isinstance(strategy, GMRES):
        assert lin.stats.products >= 3 and lin.stats.max_residual <= 1e-12
    else:
        assert lin.stats.products == 0 and lin.stats.max_residual is None
        assert lin.condition_number is not None


def test_warm_start_reuses_the_previous_solution():
    fn, h = _independent(samples=3, width=60, rate=0.9)
    lin = Linearization(fn, h, GMRES())
    rhs = torch.randn(3, 60)
    first = lin.solve(rhs, warm_start=True)
    cold = lin.stats.last.iterations
    again = lin.solve(rhs + 1e-9 * torch.randn(3, 60), warm_start=True)
    assert lin.stats.last.iterations < cold and torch.allclose(again, first, atol=1e-8)


class _ProductInForward(torch.autograd.Function):
    """Applies ``I − J`` inside ``Function.forward``, where ``torch.func.linearize``
    silently returns zeros."""

    @staticmethod
    def forward(v, fn, h):
        return ResidualOperator(fn, h).apply(v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def test_operator_products_are_exact_inside_function_forward_and_inference_mode():
    fn, h = _independent()
    v = torch.randn(5, 4)
    expected = v - torch.func.jvp(fn, (h,), (v,))[1]
    assert torch.allclose(_ProductInForward.apply(v, fn, h), expected, atol=1e-14)
    op = ResidualOperator(fn, h)
    for _ in range(2):  # the first product verifies the traced one, the second replays it
        assert torch.allclose(op.apply(v), expected, atol=1e-14)
    with torch.no_grad():
        assert torch.allclose(ResidualOperator(fn, h).apply(v), expected, atol=1e-14)


def test_untraced_operator_gives_the_same_products_without_tracing(monkeypatch):
    """``trace_tangent=False`` (the layer, whose solves run inside
    ``autograd.Function.forward`` where a trace returns zeros) never calls
    ``torch.func.linearize`` and gives the plain JVP's products."""
    fn, h = _independent()
    v = torch.randn(5, 4)
    expected = v - torch.func.jvp(fn, (h,), (v,))[1]
    calls = []
    original = torch.func.linearize
    monkeypatch.setattr(torch.func, "linearize", lambda *a: calls.append(1) or original(*a))
    op = ResidualOperator(fn, h, trace_tangent=False)
    for _ in range(2):
        assert torch.allclose(op.apply(v), expected, atol=1e-14)
    assert torch.allclose(op.apply(torch.stack([v, 2 * v])[:, None]).squeeze(1)[1], 2 * expected)
    assert not calls
    ResidualOperator(fn, h).apply(v)  # the default traces (and verifies) once
    assert len(calls) == 1


def test_the_layer_never_traces_a_tangent(monkeypatch):
    """A double-backward HVP through the layer with a matrix-free solver takes JVPs with
    ``I − J`` (the adjoint's own derivative) without paying for a trace that cannot serve."""
    from deqhess.nn import DEQ

    calls = []
    original = torch.func.linearize
    monkeypatch.setattr(torch.func, "linearize", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    cell = lambda x, h: torch.tanh(0.4 * lin(h) + x)  # noqa: E731

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, h):
            return cell(x, h)

    deq = DEQ(Cell(), tol=1e-12, linear_solver="gmres")
    x = torch.randn(3, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad((deq(x) ** 2).sum(), lin.weight, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.ones_like(g)).sum(), lin.weight)
    assert torch.isfinite(hv).all() and not calls


@pytest.mark.parametrize("strategy", [GMRES(), Neumann()], ids=repr)
def test_non_finite_inputs_and_products_are_named_not_zeroed(strategy):
    """A NaN right-hand side would make GMRES stop at once and return zeros; a NaN J would
    leave Neumann running its whole budget: both are named instead."""
    fn, h = _independent()
    lin = Linearization(fn, h, strategy)
    rhs = torch.randn(5, 4)
    rhs[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="right-hand side of a solve with I − J is not finite"):
        lin.solve(rhs)

    def nan_jacobian(h):
        return 0.5 * torch.sqrt(h**2)

    lin = Linearization(nan_jacobian, torch.zeros(3, 2), strategy)
    with pytest.raises(NonFiniteError, match=r"products with I − J are not finite"):
        lin.solve(torch.ones(3, 2))
    assert lin.stats.solves == 0


def test_nan_loss_through_the_layer_is_named():
    from torch import nn

    from deqhess.nn import DEQ

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, h):
            return torch.tanh(0.5 * self.lin(h) + x)

    h = DEQ(Cell(), linear_solver="gmres")(torch.randn(2, 3))
    with pytest.raises(NonFiniteError, match="right-hand side of a solve with I − J"):
        (h.sum() * float("nan")).backward()


def test_only_strategies_that_rely_on_independent_rows_check_them():
    """A Neumann iteration applies the full (I − J)ᵀ and so is exact for coupled rows
    too; dense blocks and GMRES per row would not be, and refuse."""
    fn, h = _with_coupling(5, 1, 3, strength=0.2)

    def whole(r):
        return fn(r.reshape(5, 4)).reshape(1, -1)

    jac = torch.func.jacrev(whole)(h.reshape(1, -1))[0, :, 0, :]
    rhs = torch.randn(5, 4)
    exact = torch.linalg.solve((torch.eye(20) - jac).T, rhs.reshape(-1)).reshape(5, 4)
    lin = Linearization(fn, h, Neumann(), independent_rows=True)
    assert torch.allclose(lin.solve(rhs, transpose=True), exact, atol=1e-11)
    for strategy in (Dense(), GMRES()):
        lin = Linearization(fn, h, strategy, independent_rows=True)
        with pytest.raises(ValueError, match=r"declared independent"):
            lin.solve(rhs, transpose=True)
