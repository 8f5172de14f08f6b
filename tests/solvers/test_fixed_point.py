"""The shared driver and the Picard / Anderson solvers."""

from __future__ import annotations

import pytest
import torch

from deqhess import Anderson, ConvergenceError, Picard
from deqhess.solvers import Tolerance, default_tolerance, resolve_solver, solve_fixed_point

SOLVERS = {
    "picard": Picard(),
    "picard-damped": Picard(damping=0.7),
    "anderson": Anderson(),
    "anderson-m2-damped": Anderson(memory=2, damping=0.8),
}


def _rowwise_map(samples=4, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=g)
    w = 0.6 * w / torch.linalg.matrix_norm(w, ord=2)
    bias = torch.randn(samples, width, generator=g)

    def fn(h):
        return torch.tanh(h @ w.T + bias[: h.shape[0]])

    return fn, bias


@pytest.mark.parametrize("key", sorted(SOLVERS))
def test_solvers_reach_the_tolerance_per_row(key):
    fn, _ = _rowwise_map()
    tol = Tolerance(rtol=1e-12, atol=1e-12)
    h, info = solve_fixed_point(fn, torch.zeros(4, 6), SOLVERS[key], tol, max_iter=500)
    assert info.converged
    fh = fn(h)
    residual = torch.linalg.vector_norm(fh - h, dim=1)
    assert torch.all(residual <= tol.threshold(torch.linalg.vector_norm(fh, dim=1)))
    assert torch.allclose(info.sample_residuals, residual, rtol=0, atol=1e-30)
    assert len(info.residual_history) == info.iterations + 1


def test_anderson_needs_fewer_iterations_than_picard():
    fn, _ = _rowwise_map()
    tol = Tolerance(rtol=1e-12, atol=1e-12)
    _, picard = solve_fixed_point(fn, torch.zeros(4, 6), Picard(), tol, 500)
    _, anderson = solve_fixed_point(fn, torch.zeros(4, 6), Anderson(), tol, 500)
    assert anderson.iterations < picard.iterations


@pytest.mark.parametrize("key", ["picard", "anderson"])
def test_rows_do_not_depend_on_their_batch(key):
    """Per-sample stopping and per-sample Anderson coefficients: a row solved alone
    takes the same steps and lands on the same iterate as inside a batch."""
    fn, _ = _rowwise_map()
    tol = Tolerance(rtol=1e-11, atol=1e-11)
    h_all, info_all = solve_fixed_point(fn, torch.zeros(4, 6), SOLVERS[key], tol, 500)
    for row in range(4):

        def single(h, row=row):
            padded = torch.zeros(4, 6).index_copy(0, torch.tensor([row]), h)
            return fn(padded)[row : row + 1]

        h_one, info_one = solve_fixed_point(single, torch.zeros(1, 6), SOLVERS[key], tol, 500)
        assert info_one.iterations == int(info_all.sample_iterations[row])
        assert torch.allclose(h_one[0], h_all[row], rtol=0, atol=1e-14)


def test_unconverged_solve_raises_with_residual_and_advice():
    fn, _ = _rowwise_map()
    with pytest.raises(
        ConvergenceError, match=r"did not converge in max_iter=3 .*best residual.*larger max_iter"
    ) as err:
        solve_fixed_point(fn, torch.zeros(4, 6), Picard(), Tolerance(1e-12, 1e-12), 3)
    assert err.value.info.iterations == 3 and not err.value.info.converged


def test_unconverged_solve_can_return_best_iterate_with_a_warning():
    fn, _ = _rowwise_map()
    with pytest.warns(RuntimeWarning, match="Returning the best iterate"):
        h, info = solve_fixed_point(
            fn, torch.zeros(4, 6), Picard(), Tolerance(0.0, 0.0), 5, require_convergence=False
        )
    assert not info.converged and info.iterations == 5
    residual = torch.linalg.vector_norm(fn(h) - h, dim=1)
    assert torch.allclose(residual, info.sample_residuals)


def test_divergence_to_non_finite_raises():
    with pytest.raises(ConvergenceError, match=r"diverged: .* at iteration .*damped"):
        solve_fixed_point(
            lambda h: 1e200 * h + 1.0, torch.zeros(1, 3), Picard(), Tolerance(1e-10, 1e-10), 100
        )


def test_default_tolerance_by_dtype():
    assert default_tolerance(torch.float64) == 1e-10
    assert default_tolerance(torch.float32) == 1e-5
    with pytest.raises(ValueError, match="supports float32 and float64"):
        default_tolerance(torch.float16)
    assert Tolerance.resolve(None, None, torch.float64) == Tolerance(1e-10, 1e-10)
    with pytest.raises(ValueError, match=r"tol must be a finite number in \[0, 1\); got -1\.0"):
        Tolerance.resolve(-1.0, None, torch.float64)


def test_solver_aliases_and_bad_arguments():
    assert isinstance(resolve_solver("Anderson"), Anderson)
    assert isinstance(resolve_solver("picard"), Picard)
    with pytest.raises(
        ValueError, match=r"unknown solver 'broyden'; use one of \['anderson', 'picard'\]"
    ):
        resolve_solver("broyden")
    with pytest.raises(ValueError, match=r"damping must lie in \(0, 1\]"):
        Picard(damping=0.0)
    with pytest.raises(ValueError, match="Anderson memory must be an int >= 1; got 0"):
        Anderson(memory=0)
    with pytest.raises(ValueError, match=r"damping must lie in \(0, 1\]"):
        Anderson(damping=1.5)
    with pytest.raises(ValueError, match="regularization must be >= 0"):
        Anderson(regularization=-1)
    with pytest.raises(ValueError, match="max_iter must be an int >= 0; got -1"):
        solve_fixed_point(lambda h: h, torch.zeros(1, 2), Picard(), Tolerance(1, 1), -1)


def test_anderson_in_float32_on_a_saturating_map():
    """Regression: a δ below float32's resolution left the Gram matrix exactly singular
    once some rows converged fast (tanh of a large input saturates)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, dtype=torch.float32)
    x = torch.randn(4, 8, dtype=torch.float32)

    def fn(h):
        with torch.no_grad():
            return torch.tanh(0.5 * lin(h) + x)

    h0 = torch.zeros(4, 8, dtype=torch.float32)
    tol = Tolerance.resolve(None, None, torch.float32)
    h, info = solve_fixed_point(fn, h0, Anderson(), tol, 100)
    assert info.converged and h.dtype == torch.float32
    assert torch.allclose(fn(h), h, atol=1e-4)


def test_tolerance_below_dtype_resolution_is_explained():
    fn, _ = _rowwise_map()

    def fn32(h):
        return fn(h.double()).float()

    with pytest.raises(ConvergenceError, match=r"rtol=1e-12 is below what torch.float32 can"):
        solve_fixed_point(fn32, torch.zeros(4, 6).float(), Picard(), Tolerance(1e-12, 1e-12), 5)


def test_a_map_that_modifies_its_argument_in_place_is_named():
    def f(h):
        return torch.relu_(h) * 0.5 + 1.0

    with pytest.raises(ValueError, match=r"f modified the state it was given in place"):
        solve_fixed_point(f, torch.randn(2, 3), Picard(), Tolerance(1e-10, 1e-10), 50)


def test_running_away_to_huge_states_is_not_convergence():
    """f(h) = h + 1 + 0.1 sin h has no fixed point (f(h) − h ≥ 0.9), yet Anderson can push h
    to ~1e10, where the residual 0.9 is below rtol·‖f(h)‖: not a fixed point, and said so."""

    def f(h):
        return h + 1.0 + 0.1 * torch.sin(h)

    with pytest.raises(ConvergenceError, match=r"ran away: .*‖f\(h\)‖ grew from .* has no fixed"):
        solve_fixed_point(f, torch.zeros(1, 3), Anderson(), Tolerance(1e-10, 1e-10), 500)


def test_running_away_from_a_larger_first_residual_is_not_convergence():
    """No fixed point either (f(h) − h ≥ 0.5), but a first residual of ~5 (the bump at 0):
    Anderson ran to ‖h‖ ≈ 6e10 with the residual at 47% of its start, which the bar of
    "not halved" took for convergence (a Hessian 36–47% off, silently); the residual must
    fall below a tenth of its start."""

    z = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(h):
        return h + 1.0 + 0.5 * torch.sin(h + z) + 4.0 * torch.exp(-(h**2))

    with pytest.raises(
        ConvergenceError, match=r"ran away: .*did not fall below 0.1 of the largest"
    ):
        solve_fixed_point(f, z.clone(), Anderson(), Tolerance(1e-10, 0.0), 500)


def _anderson_reference(fn, h0, steps, memory, damping, regularization=1e-10):
    """Type-II Anderson written out from its definition: per row, the regularised normal
    equations over the last ``memory`` differences, ``h ← h + βg − (ΔH + βΔG)γ``."""
    hs, gs, h = [], [], h0
    for _ in range(steps):
        g = fn(h) - h
        hs.append(h)
        gs.append(g)
        nxt = h + damping * g
        k = min(len(hs) - 1, memory)
        if k:
            dh = torch.stack([hs[-i] - hs[-i - 1] for i in range(1, k + 1)], 1)  # [S, k, d]
            dg = torch.stack([gs[-i] - gs[-i - 1] for i in range(1, k + 1)], 1)
            gram = dg @ dg.transpose(1, 2)
            diag = torch.diagonal(gram, dim1=1, dim2=2)
            reg = regularization * diag.mean(1, keepdim=True) + torch.finfo(h.dtype).tiny
            gram = gram + torch.diag_embed(reg.expand_as(diag))
            gamma = torch.linalg.solve(gram, dg @ g[:, :, None])  # [S, k, 1]
            nxt = nxt - ((dh + damping * dg) * gamma).sum(1)
        h = nxt
    return h


@pytest.mark.parametrize("damping", [1.0, 0.8])
def test_anderson_steps_match_their_definition(damping):
    """The ring buffers, the one-row Gram update and the β = 1 shortcut ``ΔH + ΔG =
    Δf(h)`` take the same steps as the textbook formula (float64, before convergence)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    bias = torch.randn(3, 8, generator=g, dtype=torch.float64)

    def fn64(h):
        return torch.tanh(h @ w.T + bias)

    solver = Anderson(memory=3, damping=damping)
    h = torch.zeros(3, 8, dtype=torch.float64)
    memory = solver.init(h)
    for steps in range(1, 8):
        h, memory = solver.step(memory, h, fn64(h))
        h0 = torch.zeros(3, 8, dtype=torch.float64)
        expected = _anderson_reference(fn64, h0, steps, 3, damping)
        # the same arithmetic in another order: rounding, amplified by the least squares
        assert torch.allclose(h, expected, rtol=0, atol=1e-10), steps


@pytest.mark.parametrize("key", sorted(SOLVERS))
def test_a_map_that_reuses_its_output_buffer_solves_the_same(key):
    """``f`` writing each image into one buffer it returns (``out=``): the driver and the
    solvers keep no reference to ``f``'s output across evaluations, so the iterates and
    the fixed point are those of the plain map."""
    fn, _ = _rowwise_map()
    buffer = torch.empty(4, 6)

    def reusing(h):
        return buffer.copy_(fn(h))

    tol = Tolerance(rtol=1e-12, atol=1e-12)
    h, info = solve_fixed_point(reusing, torch.zeros(4, 6), SOLVERS[key], tol, max_iter=500)
    expected, plain = solve_fixed_point(fn, torch.zeros(4, 6), SOLVERS[key], tol, max_iter=500)
    assert info.converged and info.iterations == plain.iterations
    assert torch.equal(h, expected)


def test_the_public_driver_checks_its_inputs_and_detaches_fn():
    """``solve_fixed_point`` on its own: rows ``[S, d]`` only, ``fn`` of the same shape and
    dtype (a float32 image of float64 rows would be 'converged' at float32's accuracy), and
    an ``fn`` whose output carries a graph is iterated without it."""
    fn, _ = _rowwise_map()
    tol = Tolerance(rtol=1e-10, atol=1e-10)
    for bad in (torch.zeros(6), torch.zeros(2, 2, 6)):
        with pytest.raises(ValueError, match=r"h0 must be rows \[S, d\] .* got shape"):
            solve_fixed_point(fn, bad, Picard(), tol, 50)
    with pytest.raises(ValueError, match="supports float32 and float64"):
        solve_fixed_point(fn, torch.zeros(4, 6, dtype=torch.float16), Picard(), tol, 50)
    rows = torch.zeros(4, 6, dtype=torch.float64)
    for solver in (Picard(), Anderson()):
        with pytest.raises(ValueError, match=r"fn\(h\) returned shape \(4, 6\) and dtype torch"):
            solve_fixed_point(lambda h: fn(h).float(), rows, solver, tol, 50)
    scale = torch.tensor(1.0, requires_grad=True)
    for solver in (Picard(), Anderson()):
        h, info = solve_fixed_point(lambda h: scale * fn(h), torch.zeros(4, 6), solver, tol, 500)
        assert info.converged and not h.requires_grad
        assert torch.allclose(h, solve_fixed_point(fn, torch.zeros(4, 6), solver, tol, 500)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fixed_point_far_from_the_start_at_a_loose_tolerance_is_convergence(dtype):
    """h* = 1e4 from h0 = 0 (f = h/2 + 5000 sigmoid(h − 10) + 0.1, J = 1/2 there): the
    residual climbs to thousands on the way and falls to ~tol·1e4 at the end — a third
    of the first residual at tol 1e-5, which the runaway bar measured against the start
    refused; against the largest residual reached it is convergence."""

    def f(h):
        return 0.5 * h + 5000.0 * torch.sigmoid(h - 10.0) + 0.1

    h, info = solve_fixed_point(f, torch.zeros(2, 1, dtype=dtype), Picard(),
                                Tolerance(1e-5, 0.0), 200)  # fmt: skip
    assert bool(info.converged_mask.all())
    assert float((h - 10000.2).abs().max()) <= 1e-5 * 1e4 * 4
