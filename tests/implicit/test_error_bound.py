"""Accuracy stays visible: the derivatives' error bound, its warning and its refusal.

The problem is a linear DEQ ``h = A(μ) h + B x`` with ``A = Q diag(μ) Qᵀ`` (``Q``
orthogonal, fixed): ``J = A`` has the eigenvalue ``μ₁`` close to 1, so
``‖(I − J)⁻¹‖ = 1/(1 − μ₁)``. The reference is the closed form
``h*(θ) = Q diag(1/(1 − μ)) Qᵀ B x``, differentiated by ``torch.func`` in float64: no
solve, exact to rounding (``1 − μ`` is exact in floating point).

The state handed to the forward solve is ``h* + c q₁`` (``q₁`` the slow eigenvector) with
its residual ``(1 − μ₁) c`` at 90% of the tolerance, so the solve accepts it as is: the
fixed point a solver stopping at its tolerance leaves when its last error lies along the
slowest direction, as a fixed-point iteration's does. Its relative error is then
``0.9 · tol / (1 − μ₁)``: about 1% for ``‖(I − J)⁻¹‖ = 1e8`` and float64's default
``tol = 1e-10`` — the issue's "gradient and HVP 1–4% off, no warning".
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import deqhess as dh
from deqhess.linear import warning_threshold


def _problem(
    slow: float, tol: float, dtype=torch.float64, at_rounding: bool = False, size: float = 1.0
):
    """``(f, θ, x, h0, loss, reference)``; ``reference(θ)`` is the closed-form loss.

    ``size`` scales ``B`` and so ``h*``; the residual left is 90% of the threshold
    ``max(atol, tol·‖h*‖)`` (``atol = tol``): ``atol`` sets it for a state of norm below 1.
    """
    n, m = 6, 3
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    mu = torch.tensor([slow, 0.5, 0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    theta = {"mu": mu, "B": size * torch.randn(n, m, generator=g, dtype=torch.float64)}
    x = torch.randn(m, generator=g, dtype=torch.float64)
    target = torch.randn(n, generator=g, dtype=torch.float64)

    def closed(t):
        return q @ ((q.T @ (t["B"] @ x)) / (1 - t["mu"]))

    scale = float(torch.linalg.vector_norm(closed(theta)))
    c = 0.0 if at_rounding else 0.9 * tol * max(1.0, scale) / (1 - slow)  # residual (1 − μ₁)c
    h0 = closed(theta) + c * q[:, 0]
    qd = q.to(dtype)

    def f(x, h, t):
        return qd @ (t["mu"] * (qd.T @ h)) + t["B"] @ x

    def loss(h):
        return 0.5 * ((h / scale - target.to(h.dtype)) ** 2).sum()

    cast = {k: v.to(dtype) for k, v in theta.items()}
    return f, cast, x.to(dtype), h0.to(dtype), loss, lambda t: loss(closed(t))


def _errors(eq, loss, reference, theta):
    """Relative errors of the gradient and of an HVP against the closed form (float64)."""
    exact = {k: v.double() for k, v in theta.items()}
    v = {k: torch.ones_like(t) for k, t in exact.items()}

    def flat(d):
        return torch.cat([d["mu"].double(), d["B"].double().reshape(-1)])

    grad = flat(torch.func.grad(reference)(exact))
    _, hv = torch.func.jvp(torch.func.grad(reference), (exact,), (v,))
    got_grad = flat(eq.grad(loss))
    got_hv = flat(eq.hvp(loss, {k: t.to(theta[k].dtype) for k, t in v.items()}))
    return (
        float((got_grad - grad).norm() / grad.norm()),
        float((got_hv - flat(hv)).norm() / flat(hv).norm()),
    )


def _figure(record) -> float:
    """The bound an AccuracyWarning gives (the first among the warnings recorded)."""
    first = next(r for r in record if r.category is dh.AccuracyWarning)
    return float(re.search(r"relative error of up to ([0-9.e+-]+)", str(first.message))[1])


def test_an_ill_conditioned_fixed_point_warns_with_its_error_bound():
    """‖(I − J)⁻¹‖ = 1e8, float64, default tol: the gradient and the HVP are 3.7% and
    2.6% off (measured). The first derivative warns once (AccuracyWarning, a UserWarning)
    with the bound ‖(I − J)⁻¹‖₁ · r_forward = 1.4e-2: the measured errors lie within 10×
    of it either way (2.6× and 1.8×), far above float64's 1e-6 threshold. info carries
    it."""
    f, theta, x, h0, loss, reference = _problem(1 - 1e-8, 1e-10)
    eq = dh.Equilibrium(f, theta, x, h0)
    assert eq.info.iterations == 0  # the state was accepted as given
    with pytest.warns(dh.AccuracyWarning, match=r"‖\(I − J\)⁻¹‖ ≈ 1\.\d+e\+08") as record:
        grad_error, hvp_error = _errors(eq, loss, reference, theta)
    ours = [r for r in record if r.category is dh.AccuracyWarning]
    assert len(ours) == 1 and issubclass(dh.AccuracyWarning, UserWarning)
    bound = _figure(ours)
    assert 1e-3 < grad_error and 1e-3 < hvp_error  # the "1–4% off"
    for error in (grad_error, hvp_error):
        assert bound / 10 <= error <= 10 * bound, (error, bound)
    info = eq.info
    assert info.error_bound == pytest.approx(bound, rel=0.01)
    assert "dense LU" in info.error_bound_source
    assert info.error_bound == pytest.approx(info.inverse_norm * 0.9e-10, rel=0.02)


def test_the_same_problem_solved_to_rounding_stays_silent():
    """Solved as far as float64 allows (h0 the closed form: residual ~ε‖h‖), the bound is
    ‖(I − J)⁻¹‖·ε ≈ 3e-8 and nothing warns (warnings are errors here); the derivatives
    are indeed right to better than the 1e-6 threshold."""
    f, theta, x, h0, loss, reference = _problem(1 - 1e-8, 1e-10, at_rounding=True)
    eq = dh.Equilibrium(f, theta, x, h0)
    grad_error, hvp_error = _errors(eq, loss, reference, theta)
    assert eq.info.error_bound < 1e-6
    assert grad_error < 1e-6 and hvp_error < 1e-6


def _fold(tol: float = 1e-10, curvature: float = 1.0):
    """``(f, θ, x, h0, loss)``: a map with a fold at its fixed point, ``h0`` beside it.

    ``f(h) = s + A(h − s) − a (q₁ᵀ(h − s))² q₁`` with ``s = B x``, ``A`` symmetric with the
    eigenvalue 1 along ``q₁``: ``h* = s`` is a double root, where ``I − J`` is singular (the
    derivatives do not exist there). ``h0 = s + e q₁`` leaves the residual ``a e² q₁`` at
    90% of the tolerance, so the solve accepts it as is; there ``‖(I − J)⁻¹‖ ≈ 1/(2ae)``
    (2.8e4 for ``tol = 1e-10``, ``a = 1``: ``‖s‖ = 6.2``) and the first-order bound is
    about 2.5e-6, while
    ``I − J`` changes by half of itself (``q = 1/2``) along the Newton step ``−e/2 q₁``.
    """
    n, m = 5, 3
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a_matrix = q @ torch.diag(torch.tensor([1.0, 0.5, 0.3, -0.2, 0.1], dtype=torch.float64)) @ q.T
    theta = {"B": torch.randn(n, m, generator=g, dtype=torch.float64)}
    x = torch.randn(m, generator=g, dtype=torch.float64)
    shift = theta["B"] @ x
    e = (0.9 * tol * max(1.0, float(shift.norm())) / curvature) ** 0.5

    def f(x, h, t):
        s = t["B"] @ x
        along = q[:, 0] @ (h - s)
        return s + a_matrix @ (h - s) - curvature * along**2 * q[:, 0]

    def loss(h):
        return (h**2).sum()

    return f, theta, x, shift + e * q[:, 0], loss


def test_a_fold_at_the_fixed_point_is_refused_not_given_a_first_order_bound():
    """At a fold the first-order bound ‖(I − J)⁻¹‖·r (4.7e-6 here) is no bound: I − J is
    singular at h* itself, and the derivatives at the point solved — finite, of any size —
    carry no correct digit (a model's HVP of norm 1.5e20 came back with "up to 2.5e-06").
    The second-order term q = ‖(I − J)⁻¹ ΔJ δ‖/‖δ‖ along the Newton step δ measures it
    (0.5 here) and the solve is refused; with max_error_bound=inf it warns with a figure
    of at least q. A map linear in h has q = 0: the ill-conditioned linear DEQs above keep
    their first-order figure to 2% (test_an_ill_conditioned_fixed_point_warns_...)."""
    f, theta, x, h0, loss = _fold()
    eq = dh.Equilibrium(f, theta, x, h0)
    assert eq.info.iterations == 0  # accepted as given, beside the fold
    with pytest.raises(
        dh.SingularSystemError, match=r"changes by a relative 5\.\de-01 along the Newton"
    ):
        eq.grad(loss)
    lenient = dh.Equilibrium(f, theta, x, h0, max_error_bound=float("inf"))
    with pytest.warns(dh.AccuracyWarning, match="near a fold") as record:
        lenient.grad(loss)
    assert _figure(record) >= 0.5
    assert lenient.info.error_bound >= 0.5
    assert 1e4 < lenient.info.inverse_norm < 1e5  # 1/(2ae): the point is 2.4e-5 off the fold


def test_a_fold_further_off_is_measured_as_such():
    """The same fold solved to a looser tolerance (1e-6, the residual at 90% of it):
    ‖(I − J)⁻¹‖ ≈ 280 and r ≈ 1e-6 give a first-order figure of about 2.5e-4, which would
    only warn; q = 0.5 still refuses it."""
    f, theta, x, h0, loss = _fold(tol=1e-6)
    eq = dh.Equilibrium(f, theta, x, h0, tol=1e-6)
    assert eq.info.iterations == 0
    with pytest.raises(
        dh.SingularSystemError, match=r"near a fold.*at a fold itself it stays at 0.5 or more"
    ):
        eq.grad(loss)


def test_a_sharp_fold_is_measured_whatever_the_first_order_figure():
    """A fold's term q is about 0.5 whatever its sharpness, while ‖(I − J)⁻¹‖²·r =
    1/(4a‖h‖) falls with the curvature a: at a = 1e6 it is 4e-8, below the warning
    threshold, and a gate on it had let the fold through with "up to 5e-9" (an
    adversarial round). q is measured wherever accuracy is watched."""
    f, theta, x, h0, loss = _fold(curvature=1e6)
    eq = dh.Equilibrium(f, theta, x, h0)
    assert eq.info.iterations == 0
    with pytest.raises(dh.SingularSystemError, match="near a fold"):
        eq.grad(loss)


def test_a_neumann_bound_carries_the_second_order_term():
    """A near fold (ε = 1e-6 in h + ε − a(h − c)², a = 100: dh*/dε = 1/(2√(aε)) = 50)
    beside a component with ρ(J) = 0.999 solved by a Neumann series: the gradient is
    2.5% off, and the bound in info (an estimate that warns, never refuses) says so —
    it had dropped q and read 5e-6 while the warning said 2.5e-2."""

    def f(x, h, t):
        h0, h1 = h[..., :1], h[..., 1:]
        return torch.cat([h0 + t["eps"] - 100.0 * (h0 - 10.0) ** 2, -0.999 * h1 + 1.0], -1)

    theta = {"eps": torch.tensor(1e-6, dtype=torch.float64)}
    h0 = torch.tensor([[10.001, 0.0]], dtype=torch.float64)
    eq = dh.Equilibrium(f, theta, None, h0, tol=1e-8, batch_dim=0,
                        linear_solver=dh.Neumann(max_iter=50000), max_iter=100000)  # fmt: skip
    with pytest.warns(dh.AccuracyWarning, match="relative error of up to"):
        grad = float(eq.grad(lambda h: h.sum())["eps"])
    error = abs(grad - 50.0) / 50.0
    assert error > 1e-2  # what the bound must show
    assert "Neumann" in eq.info.error_bound_source
    assert error / 10 <= eq.info.error_bound <= 10 * error


def test_the_refusal_threshold_is_the_max_error_bound_option():
    """Refused (SingularSystemError) above ``max_error_bound``: 0.1 by default, lower on
    request; ``inf`` accepts anything (and warns). A bound of 0.7 — ‖(I − J)⁻¹‖ = 1e10 —
    is refused by default: the gradient is then 6.3 times its own size off (measured)."""
    f, theta, x, h0, loss, reference = _problem(1 - 1e-8, 1e-10)
    strict = dh.Equilibrium(f, theta, x, h0, max_error_bound=1e-3)
    with pytest.raises(dh.SingularSystemError, match=r"above max_error_bound=0\.001\. .*raise "):
        strict.grad(loss)
    f, theta, x, h0, loss, reference = _problem(1 - 1e-10, 1e-10)
    with pytest.raises(dh.SingularSystemError, match=r"up to \d\.\de-01 .*max_error_bound=0\.1\."):
        dh.Equilibrium(f, theta, x, h0).grad(loss)
    lenient = dh.Equilibrium(f, theta, x, h0, max_error_bound=float("inf"))
    with pytest.warns(dh.AccuracyWarning, match=r"up to \d\.\de-01"):
        grad_error, _ = _errors(lenient, loss, reference, theta)
    assert 1.0 < grad_error  # what the refusal spared
    for bad in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="max_error_bound must be a number"):
            dh.Equilibrium(f, theta, x, h0, max_error_bound=bad)


def test_gmres_warns_from_its_own_estimate_of_the_inverse():
    """Matrix-free: GMRES's Hessenberg matrices give 1/σ_min ≤ ‖(I − J)⁻¹‖₂, no product
    spent (here 1000.0, the exact 2-norm). ‖(I − J)⁻¹‖ = 1e3 and tol = 1e-8: the state is
    9e-6 off; the warning comes during the first solve with the bound 9.0e-6, within 10×
    of the measured errors (3.7e-5 and 2.5e-5), and info names GMRES as its source."""
    f, theta, x, h0, loss, reference = _problem(1 - 1e-3, 1e-8)
    eq = dh.Equilibrium(f, theta, x, h0, tol=1e-8, linear_solver="gmres")
    assert eq.info.error_bound is None and "not known yet" in eq.info.error_bound_source
    with pytest.warns(dh.AccuracyWarning, match="GMRES's Hessenberg") as record:
        grad_error, hvp_error = _errors(eq, loss, reference, theta)
    bound = _figure(record)
    assert 1e-6 < bound and eq.info.linear_solves.inverse_norm == pytest.approx(1e3, rel=0.05)
    for error in (grad_error, hvp_error):
        assert bound / 10 <= error <= 10 * bound, (error, bound)


def test_neumann_solves_have_an_error_bound():
    """μ₁ = 0.9 (‖(I − J)⁻¹‖ = 10) with the Neumann solver: it warns, with a bound within
    10× of the errors the dense LU's bound also sees (the errors are real: 4.7e-5 and
    2.5e-5 with either solver) — ‖(I − J)⁻¹‖ found by Arnoldi steps from the forward
    residual, and by the series' contraction rate. It had said it had no bound, and
    stayed silent."""
    f, theta, x, h0, loss, reference = _problem(0.9, 1e-6)
    neumann = dh.Equilibrium(f, theta, x, h0, tol=1e-6, linear_solver="neumann")
    with pytest.warns(dh.AccuracyWarning, match="relative error of up to") as record:
        neumann_errors = _errors(neumann, loss, reference, theta)
    bound = _figure(record)
    assert neumann.info.linear_solves.inverse_norm == pytest.approx(10, rel=0.1)
    assert neumann.info.linear_solves.last.inverse_norm == pytest.approx(10, rel=0.1)  # ρ
    for error in neumann_errors:
        assert bound / 10 <= error <= 10 * bound, (error, bound)
    dense = dh.Equilibrium(f, theta, x, h0, tol=1e-6, linear_solver="dense")
    with pytest.warns(dh.AccuracyWarning):
        dense_errors = _errors(dense, loss, reference, theta)
    assert min(neumann_errors + dense_errors) > 1e-6


def test_an_estimate_that_may_lie_above_warns_but_never_refuses():
    """A Neumann series' 1/(1 − ρ) lies above ‖(I − J)⁻¹‖ for a negative dominant
    eigenvalue: past max_error_bound it warns, where a bound refuses."""
    from deqhess.linear.accuracy import ErrorBound

    estimate = ErrorBound(1.0, 1e6, 1e-6, "an estimate", refusable=False)
    with pytest.warns(dh.AccuracyWarning, match="an estimate"):
        estimate.enforce(0.1, torch.float64, warned=False)
    bound = ErrorBound(1.0, 1e6, 1e-6, "a bound")
    with pytest.raises(dh.SingularSystemError, match=r"above max_error_bound=0\.1"):
        bound.enforce(0.1, torch.float64, warned=False)


def test_float32_warns_above_its_own_threshold():
    """float32 keeps 1e-3 unremarked: ‖(I − J)⁻¹‖ = 1e3 at its default tol 1e-5 leaves a
    bound of 1.4e-2, which warns, within 10× of the errors measured against the float64
    closed form (3.7e-2 and 2.6e-2); ‖(I − J)⁻¹‖ = 2 (μ₁ = 0.5) stays silent (bound
    2.3e-5, errors 1.4e-5 and 3.5e-5)."""
    f, theta, x, h0, loss, reference = _problem(1 - 1e-3, 1e-5, dtype=torch.float32)
    eq = dh.Equilibrium(f, theta, x, h0)
    with pytest.warns(dh.AccuracyWarning, match="above the 1e-03 that torch.float32") as record:
        grad_error, hvp_error = _errors(eq, loss, reference, theta)
    bound = _figure(record)
    for error in (grad_error, hvp_error):
        assert bound / 10 <= error <= 10 * bound, (error, bound)
    f, theta, x, h0, loss, reference = _problem(0.5, 1e-5, dtype=torch.float32)
    calm = dh.Equilibrium(f, theta, x, h0)
    assert max(_errors(calm, loss, reference, theta)) < 1e-3
    assert calm.info.error_bound < 1e-3


@pytest.mark.parametrize(
    ("dtype", "tol", "size"),
    [(torch.float64, 1e-10, 1e-8), (torch.float64, 1e-10, 1e-2), (torch.float32, 1e-5, 1e-3)],
    ids=["float64-1e-8", "float64-1e-2", "float32-1e-3"],
)
def test_a_state_of_small_norm_stopped_by_atol_has_its_residual_in_the_bound(dtype, tol, size):
    """‖h*‖ = 2·size, well conditioned (μ₁ = 0.5, ‖(I − J)⁻¹‖ = 2), a loss on h's own scale:
    ``atol = tol`` stops the solve, and the residual it leaves is 0.9·atol — relative to
    ‖h*‖, 4.5e-3 (float64, size 1e-8), 4.5e-9 (size 1e-2), 4.5e-3 (float32, size 1e-3).
    The bound had counted it as ``tol`` (2.3e-10, 2.3e-10 and 2.3e-5) while the gradient
    was 7.8e-3, 7.8e-9 and 7.8e-3 off the closed form; it now counts ``‖r‖/‖h*‖`` and
    lies within 10× of the errors, warning where they pass the threshold."""
    f, theta, x, h0, loss, reference = _problem(0.5, tol, dtype=dtype, size=size)
    eq = dh.Equilibrium(f, theta, x, h0, tol=tol)
    assert eq.info.iterations == 0  # the state was accepted as given
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", dh.AccuracyWarning)
        grad_error, _ = _errors(eq, loss, reference, theta)
    bound = eq.info.error_bound
    assert grad_error > tol  # the residual atol leaves shows in the derivatives
    assert bound / 10 <= grad_error <= 10 * bound, (grad_error, bound)
    warned = [r for r in record if r.category is dh.AccuracyWarning]
    assert len(warned) == (1 if grad_error > warning_threshold(dtype) else 0)


def test_a_state_whose_residual_is_its_own_size_is_refused():
    """‖h*‖ = 2e-10 with ``atol = 1e-10``: the residual left is 45% of the state, the
    gradient 78% off the closed form. The bound had said 2.3e-10; it says 0.9 (above
    max_error_bound = 0.1) and the derivative is refused."""
    f, theta, x, h0, loss, reference = _problem(0.5, 1e-10, size=1e-10)
    with pytest.raises(dh.SingularSystemError, match=r"up to \d\.\de-01 .*max_error_bound=0\.1\."):
        dh.Equilibrium(f, theta, x, h0).grad(loss)
    lenient = dh.Equilibrium(f, theta, x, h0, max_error_bound=float("inf"))
    with pytest.warns(dh.AccuracyWarning):
        grad_error, _ = _errors(lenient, loss, reference, theta)
    assert grad_error > 0.5


def test_a_data_set_gives_one_warning_for_all_its_batches():
    """Each batch's equilibrium warns on its own; a pass over 4 ill-conditioned batches
    says so once, with the count and the first figure."""
    slow, tol = 1 - 1e-8, 1e-10
    f, theta, _, _, loss, _ = _problem(slow, tol)
    q, _ = torch.linalg.qr(
        torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )  # _problem's Q
    a = q @ torch.diag(theta["mu"]) @ q.T
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(4)]

    def start(x):  # the fixed point with the residual a solve stopping at tol leaves
        exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - a, theta["B"] @ x)
        return exact + 0.9 * tol * float(exact.norm()) / (1 - slow) * q[:, 0]

    data = dh.DatasetEquilibrium(
        f, theta, [(x, torch.zeros(())) for x in xs], lambda h, target: loss(h),
        init_state=start, batch_dim=None, cache_bytes=0, progress=False,
    )  # fmt: skip
    with pytest.warns(dh.AccuracyWarning) as record:
        data.grad()
    ours = [str(r.message) for r in record if r.category is dh.AccuracyWarning]
    assert len(ours) == 1
    assert "DatasetEquilibrium: the derivatives of 4 batch solve(s) of 4 batches" in ours[0]
    assert "‖(I − J)⁻¹‖ ≈ 1." in ours[0]


@pytest.mark.parametrize("linear_solver", ["neumann", "neumann-gmres", "gmres"])
def test_a_slow_mode_the_loss_does_not_see_is_found_along_the_forward_residual(linear_solver):
    """J with one eigenvalue 1 − 1e-6 and the rest 0.3; the loss reads h along a direction
    orthogonal to the slow eigenvector, so the adjoint solve never meets it (its Neumann
    estimate: 1.43) — but h* itself is off along it, and the gradient in W 4e-4 (the
    closed form). The forward residual carries that direction: ten Arnoldi steps from it
    find ‖(I − J)⁻¹‖ ≈ 1e6, and the bound warns within 10× of the error, as the dense LU's
    does. (With the solves' own estimate alone it reported 1.2e-10 and stayed silent.)"""
    d, samples = 6, 4
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eigenvalues = torch.full((d,), 0.3, dtype=torch.float64)
    eigenvalues[0] = 1 - 1e-6
    w = q @ torch.diag(eigenvalues) @ q.T
    u = torch.randn(d, 3, generator=g, dtype=torch.float64)
    x = torch.randn(samples, 3, generator=g, dtype=torch.float64)
    c = q[:, 1].clone()  # orthogonal to the slow eigenvector q[:, 0]

    def f(x, h, t):
        return h @ t["W"].T + x @ t["U"].T

    def loss(h):
        return (h @ c).sum()

    weight = w.clone().requires_grad_()
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - weight, (x @ u.T).T).T
    (reference,) = torch.autograd.grad((exact @ c).sum(), weight)
    eq = dh.Equilibrium(
        f, {"W": w, "U": u}, x, torch.zeros(samples, d, dtype=torch.float64), batch_dim=0,
        linear_solver=linear_solver,
    )  # fmt: skip
    with pytest.warns(dh.AccuracyWarning, match="GMRES's Hessenberg") as record:
        got = eq.grad(loss)["W"]
    error = float((got - reference).abs().max() / reference.abs().max())
    bound = _figure(record)
    assert error > 1e-5 and bound / 10 <= error <= 10 * bound, (error, bound)
    assert eq.info.linear_solves.inverse_norm == pytest.approx(1e6, rel=0.05)
