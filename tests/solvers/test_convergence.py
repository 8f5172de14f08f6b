"""The convergence policy: per-sample status, best iterates, fallback solvers, advice."""

from __future__ import annotations

import pytest
import torch

import deqhess as dh
from deqhess import Anderson, ConvergenceError, Picard
from deqhess.solvers import Convergence, Status, Tolerance, solve_fixed_point

TOL = Tolerance(1e-12, 1e-12)


def _mixed_map(oscillating: list[bool]):
    """Rows marked True follow ``h ↦ 2 − h`` (fixed point 1; undamped Picard flips between
    two points forever, damped Picard(0.5) lands on 1 in one step); the others follow the
    contraction ``h ↦ 0.5 h + 1`` (fixed point 2)."""
    mask = torch.tensor(oscillating)[:, None]

    def fn(h):
        return torch.where(mask, 2.0 - h, 0.5 * h + 1.0)

    return fn


def test_overflow_is_divergence_not_convergence():
    """Picard on f = 2h + 1: ‖f(h)‖ overflows long before any entry does; the threshold
    rtol·‖f(h)‖ is then inf, which must not count as meeting it."""
    with pytest.raises(
        ConvergenceError, match=r"diverged: ‖f\(h\)‖ overflowed torch.float64 at iteration \d+ "
    ) as err:
        dh.Equilibrium(
            lambda x, h, t: 2 * h + t, torch.tensor(1.0), None, torch.zeros(5), solver="picard"
        )
    assert not err.value.info.converged


def test_best_keeps_converged_rows_and_marks_the_others():
    fn = _mixed_map([False, True, False, True])
    with pytest.warns(RuntimeWarning, match=r"2 of 4 samples unconverged \(2 out of iterations\)"):
        h, info = solve_fixed_point(fn, torch.zeros(4, 3), Picard(), TOL, 60, convergence="best")
    assert info.converged_mask.tolist() == [True, False, True, False] and info.unconverged == 2
    assert info.sample_status.tolist() == [Status.CONVERGED, Status.MAX_ITER] * 2
    assert torch.allclose(h[[0, 2]], torch.full((2, 3), 2.0), atol=1e-11)
    # an oscillating row keeps its best iterate: residual ‖(2 − h) − h‖ = 2√3 at 0 and 2
    residual = torch.linalg.vector_norm(fn(h) - h, dim=1)
    assert torch.allclose(residual, info.sample_residuals)
    assert torch.allclose(info.sample_residuals[[1, 3]], torch.full((2,), 2 * 3**0.5))


def test_fallback_continues_from_the_best_iterate_and_leaves_converged_rows_alone():
    fn = _mixed_map([False, True, False, True])
    policy = Convergence(fallback=Picard(damping=0.5))
    h, info = solve_fixed_point(fn, torch.zeros(4, 3), Picard(), TOL, 60, convergence=policy)
    quiet = Convergence("best", warn=False)
    alone, _ = solve_fixed_point(fn, torch.zeros(4, 3), Picard(), TOL, 60, convergence=quiet)
    assert info.converged and info.converged_mask.all()
    assert torch.equal(h[[0, 2]], alone[[0, 2]])  # frozen once converged
    assert torch.allclose(h[[1, 3]], torch.ones(2, 3), atol=1e-12)
    first, second = info.stages
    assert (first.samples, first.iterations, first.converged) == (4, 60, 2)
    assert (second.solver, second.samples, second.converged) == ("Picard(damping=0.5)", 2, 2)
    assert second.iterations == 1 and info.sample_iterations.tolist()[1] == 61


def test_patience_hands_a_stalled_sample_on_early():
    fn = _mixed_map([True, False])
    policy = Convergence(fallback="picard", patience=5)  # an alias at the edge
    with pytest.raises(ConvergenceError, match=r"1 of 2 samples unconverged \(1 stalled"):
        solve_fixed_point(fn, torch.zeros(2, 3), Picard(), TOL, 1000, convergence=policy)
    policy = Convergence(fallback=Picard(damping=0.5), patience=5)
    _, info = solve_fixed_point(fn, torch.zeros(2, 3), Picard(), TOL, 1000, convergence=policy)
    assert info.converged and info.stages[0].iterations < 100  # not 1000


def test_a_diverging_sample_falls_back_to_a_damped_solver():
    """Row 1 follows h ↦ 4 − 3h: undamped Picard diverges (rate 3), Picard(0.25) solves
    it in one step (rate |1 − β + β·(−3)| = 0); row 0 is a plain contraction."""
    mask = torch.tensor([False, True])[:, None]

    def fn(h):
        return torch.where(mask, 4.0 - 3.0 * h, 0.5 * h + 1.0)

    with pytest.raises(ConvergenceError, match=r"diverged: .*sample 1"):
        solve_fixed_point(fn, torch.zeros(2, 2), Picard(), TOL, 2000)
    policy = Convergence(fallback=Picard(damping=0.25))
    h, info = solve_fixed_point(fn, torch.zeros(2, 2), Picard(), TOL, 2000, convergence=policy)
    assert info.converged and torch.allclose(h, torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    with pytest.warns(RuntimeWarning, match=r"1 diverged"):
        _, info = solve_fixed_point(fn, torch.zeros(2, 2), Picard(), TOL, 2000, convergence="best")
    assert info.sample_status.tolist() == [Status.CONVERGED, Status.DIVERGED]


def test_advice_leaves_out_what_was_tried():
    fn = _mixed_map([True])
    with pytest.raises(ConvergenceError) as picard:
        solve_fixed_point(fn, torch.zeros(1, 2), Picard(), TOL, 10)
    text = str(picard.value)
    assert "solver='anderson'" in text and "fallback=Picard(damping=0.5)" in text
    assert "convergence='best'" in text
    policy = Convergence("best", fallback=Picard(damping=0.5), fallback_max_iter=0)
    with pytest.warns(RuntimeWarning) as caught:
        solve_fixed_point(
            lambda h: h + 1, torch.zeros(1, 2), Anderson(), TOL, 10, convergence=policy
        )
    text = str(caught[0].message)
    assert "nor did Picard(damping=0.5) in 0 more" in text
    for tried in ("solver='anderson'", "fallback=Picard", "convergence='best'"):
        assert tried not in text
    assert "a larger max_iter" in text and "Returning the best iterate" in text


def test_no_warning_when_asked_and_require_convergence_shorthand():
    fn = _mixed_map([True])
    _, info = solve_fixed_point(
        fn, torch.zeros(1, 2), Picard(), TOL, 5, convergence=Convergence("best", warn=False)
    )
    assert not info.converged
    with pytest.warns(RuntimeWarning, match="Returning the best iterate"):
        solve_fixed_point(fn, torch.zeros(1, 2), Picard(), TOL, 5, require_convergence=False)


def test_policy_through_equilibrium_and_layer():
    def f(x, h, t):  # sample 1 oscillates under undamped Picard
        return torch.where(x[:, None] > 0, 2.0 - h, t * h + 1.0)

    x, theta, h0 = torch.tensor([-1.0, 1.0]), torch.tensor(0.5), torch.zeros(2, 3)
    with pytest.warns(RuntimeWarning, match="1 of 2 samples unconverged"):
        eq = dh.Equilibrium(f, theta, x, h0, solver="picard", batch_dim=0, convergence="best")
    assert eq.info.converged_mask.tolist() == [True, False]
    eq = dh.Equilibrium(
        f, theta, x, h0, solver="picard", batch_dim=0,
        convergence=Convergence(fallback=Picard(damping=0.5)),
    )  # fmt: skip
    assert eq.info.converged and len(eq.info.stages) == 2

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, h):
            return f(x, h, self.t)

    deq = dh.nn.DEQ(Cell(), solver="picard", convergence=Convergence(fallback=Picard(0.5)))
    solution = deq.solve(x, h0=h0)
    assert solution.info.converged and torch.allclose(solution.h[1], torch.ones(3))


def test_policy_errors():
    with pytest.raises(ValueError, match=r"unknown on_failure 'skip'; use 'raise' .* or 'best'"):
        Convergence("skip")
    with pytest.raises(ValueError, match=r"unknown solver 'broyden'"):
        Convergence(fallback="broyden")
    with pytest.raises(ValueError, match="patience must be an int >= 1; got 0"):
        Convergence(patience=0)
    with pytest.raises(ValueError, match=r"fallback_max_iter must be an int; got 2\.5"):
        Convergence(fallback_max_iter=2.5)
    with pytest.raises(ValueError, match=r"convergence must be 'raise', 'best' or .*got 3"):
        Convergence.resolve(3)
    with pytest.raises(ValueError, match=r"require_convergence=False .* contradicts"):
        dh.Equilibrium(
            lambda x, h, t: 0.5 * h * t,
            torch.tensor(1.0),
            None,
            torch.zeros(2),
            require_convergence=False,
            convergence="raise",
        )
    assert repr(Convergence("best", fallback=Picard(0.5), patience=3)) == (
        "Convergence(on_failure='best', fallback=(Picard(damping=0.5),), patience=3)"
    )


def test_empty_rows_and_zero_iterations():
    h, info = solve_fixed_point(lambda h: h, torch.zeros(0, 3), Anderson(), TOL, 10)
    assert h.shape == (0, 3) and info.converged and info.iterations == 0
    _, info = solve_fixed_point(lambda h: 0.5 * h, torch.zeros(2, 3), Anderson(), TOL, 0)
    assert info.converged and info.iterations == 0


def test_excluding_unconverged_samples_by_re_solving_the_converged_ones():
    """The README's recipe: re-solving only the converged samples from their fixed points
    takes no step, and the derivatives equal those of a fresh solve of those samples
    alone (samples are independent along batch_dim)."""

    def f(x, h, t):  # samples with x > 0 oscillate under undamped Picard
        return torch.where(x[:, None] > 0, 2.0 - h, torch.tanh(t * h + x[:, None]))

    x, theta, h0 = torch.tensor([-1.0, 1.0, -0.5, 2.0]), torch.tensor(0.5), torch.zeros(4, 3)
    loss = lambda h: h.pow(2).sum()  # noqa: E731
    eq = dh.Equilibrium(
        f, theta, x, h0, solver="picard", batch_dim=0, tol=1e-13,
        convergence=Convergence("best", warn=False),
    )  # fmt: skip
    keep = eq.info.converged_mask
    assert keep.tolist() == [True, False, True, False]
    kept = dh.Equilibrium(f, theta, x[keep], eq.h[keep], solver="picard", batch_dim=0, tol=1e-13)
    assert kept.info.iterations == 0
    fresh = dh.Equilibrium(f, theta, x[keep], h0[keep], solver="picard", batch_dim=0, tol=1e-13)
    assert torch.allclose(kept.grad(loss), fresh.grad(loss), rtol=1e-10)
    assert torch.allclose(kept.hessian(loss), fresh.hessian(loss), rtol=1e-10)
