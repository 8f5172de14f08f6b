"""User-facing errors of Equilibrium and the one-shot forms, and input immutability."""

from __future__ import annotations

import pytest
import torch
from problems import case, relative_error

import deqhess as dh
from deqhess.errors import ArgumentError


def _tanh():
    return case("tanh_coupled")


@pytest.mark.parametrize(
    ("where", "label"),
    [("theta", r"theta\['W'\]"), ("x", "x"), ("h0", "h0")],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_named(where, label, bad):
    c = _tanh()
    theta, x, h0 = dict(c.theta), c.x.clone(), c.h0.clone()
    if where == "theta":
        theta["W"] = theta["W"].clone()
        theta["W"][0, 0] = bad
    elif where == "x":
        x[0, 0] = bad
    else:
        h0[0, 0] = bad
    with pytest.raises(ValueError, match=f"^{label} contains non-finite values"):
        dh.Equilibrium(c.f, theta, x, h0)


def test_f_with_wrong_shape_shows_both():
    c = _tanh()
    with pytest.raises(ValueError, match=r"returned shape \(3, 4\) .* h0 has shape \(3, 5\)"):
        dh.Equilibrium(lambda x, h, t: c.f(x, h, t)[:, :4], c.theta, c.x, c.h0)


def test_f_with_wrong_dtype_shows_both():
    c = _tanh()
    with pytest.raises(ValueError, match=r"dtype torch\.float32, .*dtype torch\.float64"):
        dh.Equilibrium(lambda x, h, t: c.f(x, h, t).float(), c.theta, c.x, c.h0)


def test_f_returning_a_non_tensor():
    c = _tanh()
    with pytest.raises(ValueError, match="must return a tensor shaped like h; got tuple"):
        dh.Equilibrium(lambda x, h, t: (h,), c.theta, c.x, c.h0)


def test_h0_dtype_must_match_theta():
    c = _tanh()
    with pytest.raises(ValueError, match=r"h0 is torch\.float32 .* theta is torch\.float64"):
        dh.Equilibrium(c.f, c.theta, c.x, c.h0.float())


@pytest.mark.parametrize(
    ("theta", "message"),
    [
        ({}, "theta is an empty dict"),
        ({"W": [1.0]}, r"theta\['W'\] is a list, not a torch.Tensor"),
        ({"W": torch.ones(2, dtype=torch.long)}, r"theta\['W'\] has dtype torch.int64"),
        (
            {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float32)},
            "share one dtype",
        ),
        ([torch.ones(2)], "must be a torch.Tensor or a dict"),
        ({"cell": {"W": torch.ones(2)}}, r"theta\['cell'\] is a dict: theta is one level deep"),
    ],
)
def test_bad_theta(theta, message):
    with pytest.raises(ValueError, match=message):
        dh.Equilibrium(lambda x, h, t: h * 0.5, theta, torch.zeros(2), torch.zeros(2))


def test_bad_state_arguments():
    f = lambda x, h, t: 0.5 * h * t  # noqa: E731
    t = torch.tensor(1.0)
    with pytest.raises(ValueError, match="h0 is required when x is not a tensor"):
        dh.Equilibrium(f, t, None)
    with pytest.raises(ValueError, match="the state must be float32 or float64"):
        dh.Equilibrium(f, t, None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"batch_dim=2 is out of range .*\(3, 2\)"):
        dh.Equilibrium(f, t, None, torch.zeros(3, 2), batch_dim=2)
    with pytest.raises(ValueError, match="f must be callable"):
        dh.Equilibrium(None, t, None, torch.zeros(2))


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda h: h.sum(dim=1), r"0-dim floating tensor .*shape \(3,\).* \.sum\(\)"),
        (lambda h: 1.0, "got float"),
        (lambda h, t, y: h.sum(), "requires 3 positional arguments"),
        (lambda: 0.0, "requires 0 positional arguments"),
        ("mse", "loss must be callable"),
    ],
)
def test_bad_losses(loss, message):
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    with pytest.raises(ValueError, match=message):
        eq.grad(loss)


def _no_wraps(loss):
    def wrapper(*args, **kwargs):  # a decorator without functools.wraps: (*args, **kwargs)
        return loss(*args, **kwargs)

    return wrapper


def test_a_loss_whose_signature_hides_theta_or_that_leaves_torch_is_explained():
    """A decorated L(h, θ) without functools.wraps was taken as L(h) and failed with a raw
    TypeError; a loss calling .numpy() failed with torch's "data pointer" error alone."""
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    with pytest.raises(dh.InputError, match=r"functools\.wraps"):
        eq.grad(_no_wraps(lambda h, theta: (h * theta["W"].sum()).sum()))
    with pytest.raises(RuntimeError) as error:
        eq.grad(lambda h: (h**2).sum().detach().numpy())
    assert ".numpy(), .item()" in "".join(error.value.__notes__)


def test_swapped_x_and_h0_carry_both_shapes_in_a_note():
    c = _tanh()
    with pytest.raises(RuntimeError) as error:
        dh.Equilibrium(c.f, c.theta, c.h0, c.x)  # h0 where x goes
    assert "takes x before h0" in "".join(error.value.__notes__)


def test_loss_arity_from_signature():
    from deqhess.implicit import Loss

    assert not Loss(lambda h: h.sum()).uses_theta
    assert Loss(lambda h, theta: h.sum()).uses_theta
    assert not Loss(lambda h, scale=2.0: h.sum()).uses_theta
    assert not Loss(torch.sum).uses_theta


def test_bad_directions_and_methods():
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    with pytest.raises(
        ValueError,
        match=r"acts on flat \[45\] vectors, \[45, K\] blocks, theta-structured vectors "
        r"\(\{'W': \(5, 5\).*lists of tensors shaped like theta's; got \(7,\)",
    ):
        eq.hvp(c.loss, torch.ones(7))
    with pytest.raises(
        ValueError, match=r"vector has dtype torch.float32 but the operator is torch.float64"
    ):
        eq.hvp(c.loss, torch.ones(45, dtype=torch.float32))
    with pytest.raises(ValueError, match="vector contains non-finite"):
        eq.hvp(c.loss, torch.full((45,), float("nan")))
    with pytest.raises(ValueError, match="unknown gradient method 'magic'"):
        eq.grad(c.loss, method="magic")


def test_hvp_arguments_h0_and_v_are_never_guessed():
    """h0 and v go by keyword, or positionally in the contract's order — both, or one
    beside the other's keyword — where they cannot be confused; every other form is
    refused (an ArgumentError: a TypeError, as before, and an InputError), so a swapped
    h0 and v can never pass silently."""
    c = _tanh()
    v = torch.ones(45)
    expected = dh.hvp(c.f, c.loss, c.theta, c.x, h0=c.h0, v=v)
    for form in (
        lambda: dh.hvp(c.f, c.loss, c.theta, c.x, c.h0, v),
        lambda: dh.hvp(c.f, c.loss, c.theta, c.x, v, h0=c.h0),  # the contract: h0 by keyword
        lambda: dh.hvp(c.f, c.loss, c.theta, c.x, c.h0, v=v),
    ):
        assert torch.equal(form(), expected)
    with pytest.raises(ArgumentError, match=r"needs the direction v: hvp\(f, loss, theta, x, h0="):
        dh.hvp(c.f, c.loss, c.theta, c.x, h0=c.h0)
    with pytest.raises(TypeError, match=r"one positional argument after x and neither h0= nor v="):
        dh.hvp(c.f, c.loss, c.theta, c.x, v)
    with pytest.raises(ArgumentError, match="one positional argument after x and h0= and v="):
        dh.hvp(c.f, c.loss, c.theta, c.x, v, h0=c.h0, v=v)
    with pytest.raises(ArgumentError, match=r"the h0 given \(\(45,\)\) has the form of a"):
        dh.hvp(c.f, c.loss, c.theta, c.x, v, v=v)  # a direction passed as h0 beside v=
    with pytest.raises(dh.InputError, match=r"got 3 positional arguments after x"):
        dh.hvp(c.f, c.loss, c.theta, c.x, c.h0, v, v)
    with pytest.raises(ArgumentError, match=r"positionally and h0= or v= by keyword as well"):
        dh.hvp(c.f, c.loss, c.theta, c.x, c.h0, v, v=v)
    # swapped: a direction where h0 belongs, in each of the operator's forms
    for direction in (v, v[:, None], {k: torch.ones_like(t) for k, t in c.theta.items()}):
        with pytest.raises(
            ArgumentError,
            match=r"^hvp\(f, loss, theta, x, h0, v\): the h0 given \(.*\) has the form of a "
            r"direction, so h0 and v could be swapped unnoticed; pass them by keyword",
        ):
            dh.hvp(c.f, c.loss, c.theta, c.x, direction, c.h0)
    # a state shaped like θ: the positional form is refused even in the right order
    square = {"theta": torch.full((3,), 0.4)}
    x3 = torch.tensor([0.1, -0.2, 0.3])
    with pytest.raises(ArgumentError, match=r"the h0 given \(\(3,\)\) has the form of a"):
        dh.hvp(lambda x, h, t: torch.tanh(t["theta"] * h + x), lambda h: h.sum(),
               square, x3, torch.zeros(3), torch.ones(3))  # fmt: skip


def test_hessian_split_flag_is_deprecated_for_hessian_split():
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    new = eq.hessian_split(c.loss)
    with pytest.warns(
        DeprecationWarning,
        match=r"^Equilibrium\.hessian\(\.\.\., split=True\) is deprecated and will be removed "
        r"in deqhess 0\.3; use eq\.hessian_split\(loss\), which returns the HessianSplit",
    ):
        old = eq.hessian(c.loss, split=True)
    with pytest.warns(
        DeprecationWarning,
        match=r"^deqhess\.hessian\(\.\.\., split=True\) is deprecated .* use "
        r"deqhess\.hessian_split\(f, loss, theta, x, h0\), which returns the Hessian",
    ):
        functional = dh.hessian(c.f, c.loss, c.theta, c.x, c.h0, split=True)
    for result in (old, functional):
        assert isinstance(result, dh.HessianSplit)
        for part in ("loss_curvature", "dynamics_curvature", "total"):
            assert torch.equal(getattr(result, part), getattr(new, part))


def test_hvp_positional_form_of_the_contract_still_works():
    c = _tanh()
    v = torch.randn(45)
    by_keyword = dh.hvp(c.f, c.loss, c.theta, c.x, h0=c.h0, v=v)
    assert torch.equal(dh.hvp(c.f, c.loss, c.theta, c.x, c.h0, v), by_keyword)


def test_no_fixed_point_raises_convergence_error():
    with pytest.raises(dh.ConvergenceError, match=r"did not converge in max_iter=50"):
        dh.Equilibrium(
            lambda x, h, t: h + t,
            torch.tensor(1.0),
            None,
            torch.zeros(2),
            solver="picard",
            max_iter=50,
        )


def test_divergence_raises_convergence_error():
    with pytest.raises(dh.ConvergenceError, match=r"diverged: .* at iteration"):
        dh.Equilibrium(
            lambda x, h, t: t * h * h + 1, torch.tensor(3.0), None, torch.zeros(2), solver="picard"
        )


def test_singular_system_raises():
    eq = dh.Equilibrium(lambda x, h, t: h + 0 * t, torch.tensor(1.0), None, torch.zeros(2))
    with pytest.raises(dh.SingularSystemError, match="exactly singular"):
        eq.hessian(lambda h: h.sum())


def test_ill_conditioned_system_raises():
    rates = torch.tensor([1 - 1e-15, 0.5])  # I − J = diag(1e-15, 0.5): condition 5e14
    eq = dh.Equilibrium(lambda x, h, t: rates * h * t, torch.tensor(1.0), None, torch.zeros(2))
    with pytest.raises(dh.SingularSystemError, match="too ill-conditioned"):
        eq.grad(lambda h: h.sum())


def test_in_place_change_after_construction_raises():
    c = _tanh()
    theta = {k: v.clone() for k, v in c.theta.items()}
    x = c.x.clone()
    eq = dh.Equilibrium(c.f, theta, x, c.h0)
    eq.grad(c.loss)
    theta["b"].add_(1.0)
    with pytest.raises(dh.StaleEquilibriumError, match=r"modified in place .*new Equilibrium"):
        eq.hvp(c.loss, torch.ones(45))
    eq = dh.Equilibrium(c.f, c.theta, x, c.h0)
    x.mul_(2.0)
    with pytest.raises(dh.StaleEquilibriumError, match="modified in place"):
        eq.hessian(c.loss)


def test_inputs_are_not_mutated_and_flags_kept():
    c = _tanh()
    theta = {k: v.clone().requires_grad_(k != "b") for k, v in c.theta.items()}
    x, h0 = c.x.clone(), torch.randn_like(c.h0)
    before = {k: v.detach().clone() for k, v in theta.items()}
    x_before, h0_before = x.clone(), h0.clone()
    v = {k: torch.randn_like(t) for k, t in theta.items()}
    v_before = {k: t.clone() for k, t in v.items()}
    eq = dh.Equilibrium(c.f, theta, x, h0)
    eq.hessian_split(c.loss_theta)
    eq.hvp(c.loss_theta, v)
    eq.grad(c.loss_theta, method="sensitivity")
    eq.second_sensitivity()
    for k in theta:
        assert torch.equal(theta[k].detach(), before[k]) and torch.equal(v[k], v_before[k])
        assert theta[k].requires_grad == (k != "b") and theta[k].grad is None
    assert torch.equal(x, x_before) and torch.equal(h0, h0_before)
    assert not x.requires_grad and not h0.requires_grad
    assert not eq.h.requires_grad
    eq.h.add_(1.0)  # the returned state is a copy
    assert torch.allclose(eq.hessian(c.loss), dh.hessian(c.f, c.loss, c.theta, c.x, c.h0))


def test_info_reports_conditioning_after_factorisation():
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    assert eq.info.condition_number is None and eq.info.converged
    eq.grad(c.loss)
    assert 1.0 <= eq.info.condition_number < 10.0
    assert "Equilibrium(state=(3, 5), P=45" in repr(eq)


def test_batch_dim_with_coupled_samples_raises():
    c = _tanh()

    def coupled(x, h, t):  # a batch-norm-like coupling across samples
        a = h @ t["W"].T + x @ t["U"].T + t["b"]
        return torch.tanh(a - a.mean(dim=0, keepdim=True))

    eq = dh.Equilibrium(coupled, c.theta, c.x, c.h0, batch_dim=0)
    with pytest.raises(
        ValueError, match=r"f couples the samples along batch_dim=0 .*batch_dim=None"
    ):
        eq.grad(c.loss)
    dh.Equilibrium(coupled, c.theta, c.x, c.h0).grad(c.loss)  # one coupled system is fine


def test_more_state_and_data_set_errors():
    f = lambda x, h, t: 0.5 * h * t  # noqa: E731
    t = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"h0 must be a torch.Tensor; got list"):
        dh.Equilibrium(f, t, None, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"h0 is empty \(shape \(0,\)\)"):
        dh.Equilibrium(f, t, None, torch.zeros(0))
    with pytest.raises(ValueError, match="loss must be callable; got str"):
        dh.DatasetEquilibrium(f, t, [(torch.zeros(2), None)], "mse")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"tol": float("inf")}, r"tol must be a finite number in \[0, 1\); got inf\. It is rel"),
        ({"tol": float("nan")}, r"tol must be a finite number in \[0, 1\); got nan"),
        ({"tol": 1.0}, r"tol must be .*got 1\.0\. .*tol >= 1 accepts any iterate"),
        ({"tol": "1e-8"}, r"tol must be a number; got '1e-8' \(str\)"),
        ({"atol": float("inf")}, r"atol must be a finite number >= 0; got inf"),
        ({"max_iter": 10.5}, r"max_iter must be an int; got 10\.5 \(float\)"),
        ({"max_iter": "100"}, r"max_iter must be an int; got '100' \(str\)"),
        ({"batch_dim": 0.0}, r"batch_dim must be an int; got 0\.0 .*batch_dim=0"),
        ({"chunk_size": 0}, r"chunk_size must be an int >= 1; got 0"),
        ({"max_condition": 0.0}, r"max_condition must be a number >= 1; got 0\.0. .*inf turns"),
        ({"max_condition": float("nan")}, r"max_condition must be a number >= 1; got nan"),
        ({"max_condition": -5}, r"max_condition must be a number >= 1; got -5"),
        ({"solver": "newton"}, r"unknown solver 'newton'"),
    ],
)
def test_options_that_make_no_sense_are_refused_at_construction(option, message):
    c = _tanh()
    with pytest.raises(ValueError, match=message):
        dh.Equilibrium(c.f, c.theta, c.x, c.h0, **option)


def test_options_at_their_limits_are_valid():
    """tol=0 forces max_iter (a benchmark's setting), max_condition=inf turns the check off,
    a NumPy integer is an int: the answers are the usual exact ones."""
    import numpy as np

    c = _tanh()
    reference = dh.Equilibrium(c.f, c.theta, c.x, c.h0).grad(c.loss)
    eq = dh.Equilibrium(
        c.f, c.theta, c.x, c.h0, tol=0.0, atol=0.0, max_iter=np.int64(60),
        max_condition=float("inf"), require_convergence=False,
    )  # fmt: skip
    for k, v in eq.grad(c.loss).items():
        assert torch.allclose(v, reference[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tol", [None, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_with_what_to_do(tol, dtype):
    c = _tanh()
    theta = {k: v.to(dtype) for k, v in c.theta.items()}
    with pytest.raises(ValueError, match=rf"theta\['W'\] has dtype {dtype}; deqhess supports"):
        dh.Equilibrium(c.f, theta, c.x.to(dtype), c.h0.to(dtype), tol=tol)
    with pytest.raises(ValueError, match=rf"h0 has dtype {dtype}; .*\.float\(\) or \.double\(\)"):
        dh.Equilibrium(
            lambda x, h, t: 0.5 * h, torch.tensor(1.0), None, torch.zeros(2, dtype=dtype)
        )


def test_an_empty_block_of_directions_gives_an_empty_product():
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    out = eq.hvp(c.loss, torch.zeros(eq.num_parameters, 0))
    assert out.shape == (eq.num_parameters, 0)
    block = torch.randn(eq.num_parameters, 2)
    assert torch.allclose(eq.hvp(c.loss, block), eq.hessian(c.loss) @ block, atol=1e-12)


# --------------------------------------------------------------- non-finite derivatives
def _calls(eq, loss):
    return {
        "grad": lambda: eq.grad(loss),
        "hvp": lambda: eq.hvp(loss, torch.ones(eq.num_parameters)),
        "hessian": lambda: eq.hessian(loss),
    }


@pytest.mark.parametrize("call", ["grad", "hvp", "hessian"])
def test_a_loss_that_is_not_finite_at_the_fixed_point_is_named(call):
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)

    def loss(h):  # log(0): the loss is -inf and its gradient inf · 0 = NaN
        return torch.log(0.0 * h.sum())

    with pytest.raises(dh.NonFiniteError, match=r"^∇L at h\* has 15 non-finite entries of 60 .*"
                       r"evaluate loss\(eq\.h\)") as err:  # fmt: skip
        _calls(eq, loss)[call]()
    assert err.value.quantity == "∇L at h*"


def test_a_jacobian_that_is_not_finite_at_the_fixed_point_is_named():
    """f = 0.5·t·sqrt(h²) has h* = 0, where ∂f/∂h = 0.5·t·h/|h| is 0/0."""
    eq = dh.Equilibrium(
        lambda x, h, t: 0.5 * t * torch.sqrt(h**2), torch.tensor(1.0), None, torch.zeros(3)
    )
    with pytest.raises(dh.NonFiniteError, match=r"^∂f/∂h at the fixed point has 9 non-finite"):
        eq.grad(lambda h: (h - 1).pow(2).sum())
    iterative = dh.Equilibrium(
        lambda x, h, t: 0.5 * t * torch.sqrt(h**2), torch.tensor(1.0), None, torch.zeros(3),
        linear_solver="gmres",
    )  # fmt: skip
    with pytest.raises(dh.NonFiniteError, match=r"products with I − J are not finite"):
        iterative.grad(lambda h: (h - 1).pow(2).sum())


def test_first_and_second_derivatives_in_theta_that_are_not_finite_are_named():
    """At t = 0, f = 0.5 h + sqrt(t) has ∂f/∂t = inf; f = 0.5 h + t^1.5 has a finite
    ∂f/∂t = 0 but ∂²f/∂t² = inf."""
    loss = lambda h: h.sum()  # noqa: E731
    eq = dh.Equilibrium(lambda x, h, t: 0.5 * h + t.sqrt(), torch.zeros(1), None, torch.zeros(2))
    with pytest.raises(dh.NonFiniteError, match=r"^the gradient has 1 non-finite .*∂f/∂θ"):
        eq.grad(loss)
    with pytest.raises(dh.NonFiniteError, match=r"right-hand side of a solve with I − J .*∂f/∂θ"):
        eq.sensitivity()
    eq = dh.Equilibrium(lambda x, h, t: 0.5 * h + t**1.5, torch.zeros(1), None, torch.zeros(2))
    assert torch.equal(eq.grad(loss), torch.zeros(1))  # finite, exact
    with pytest.raises(dh.NonFiniteError, match=r"^the Hessian has 1 non-finite .*second deriv"):
        eq.hessian(loss)
    with pytest.raises(dh.NonFiniteError, match=r"^the Hessian-vector products has 1 non-fin"):
        eq.hvp(loss, torch.ones(1))
    with pytest.raises(dh.NonFiniteError, match=r"right-hand side .* a second derivative of f"):
        eq.second_sensitivity()


# --------------------------------------------------------------- stale inputs and the caches
@pytest.mark.parametrize(
    ("make_x", "change", "label", "first"),
    [
        (
            lambda x: (x[:, :2].clone(), x[:, 2:].clone()),
            lambda x: x[1].mul_(2),
            r"x\[1\]",
            r"x\[0\]",
        ),
        (
            lambda x: {"u": x.clone(), "s": 2.0},
            lambda x: x["u"].add_(1),
            r"x\['u'\]",
            r"x\['u'\]",
        ),
    ],
)
def test_tensors_inside_a_structured_x_are_watched(make_x, change, label, first):
    c = _tanh()

    def f(x, h, t):
        u = torch.cat(x, dim=1) if isinstance(x, tuple) else x["u"]
        return c.f(u, h, t)

    x = make_x(c.x)
    eq = dh.Equilibrium(f, c.theta, x, c.h0)
    expected = dh.Equilibrium(c.f, c.theta, c.x, c.h0).grad(c.loss)
    assert all(torch.allclose(eq.grad(c.loss)[k], expected[k]) for k in expected)
    change(x)
    with pytest.raises(
        dh.StaleEquilibriumError, match=rf"^{label} was modified in place .*version 0 → 1"
    ):
        eq.grad(c.loss)
    bad = make_x(c.x)
    (bad[0] if isinstance(bad, tuple) else bad["u"])[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^{first} contains non-finite values"):
        dh.Equilibrium(f, c.theta, bad, c.h0)


TARGET = torch.zeros(3, 5)  # a module-level tensor a loss reads as a global


def _global_loss(h):
    return (h - TARGET).pow(2).sum()


def test_a_cached_adjoint_follows_what_the_loss_captured():
    """λ is cached per loss object; a captured tensor changed in place, a rebound closure
    variable, a global tensor, or a loss module's buffer makes it be recomputed. Each
    answer is compared with a fresh Equilibrium's."""
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    v = torch.randn(eq.num_parameters)

    def fresh(loss):
        return dh.Equilibrium(c.f, c.theta, c.x, c.h0).hvp(loss, v)

    target = torch.zeros(3, 5)

    def closure(h):
        return (h - target).pow(2).sum()

    first = eq.hvp(closure, v)
    target.add_(0.5)  # in place
    assert torch.allclose(eq.hvp(closure, v), fresh(closure), rtol=1e-12)
    assert not torch.allclose(eq.hvp(closure, v), first)
    target = torch.ones(3, 5)  # rebound
    assert torch.allclose(eq.hvp(closure, v), fresh(closure), rtol=1e-12)
    eq.hvp(_global_loss, v)
    TARGET.add_(1.0)
    try:
        assert torch.allclose(eq.hvp(_global_loss, v), fresh(_global_loss), rtol=1e-12)
    finally:
        TARGET.zero_()

    class Mse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("target", torch.zeros(3, 5))

        def forward(self, h):
            return (h - self.target).pow(2).sum()

    module = Mse()
    eq.hvp(module, v)
    module.target.fill_(2.0)
    assert torch.allclose(eq.hvp(module, v), fresh(module), rtol=1e-12)


def test_state_the_loss_reaches_indirectly_is_followed_through_its_gradient():
    """A Python list changed in place is not among what the loss visibly captured, but it
    changes ∇L at h*, and λ is recomputed when ∇L moved (the cached λ had been kept: the
    gradient stayed the old loss's, 3× off). forget() and clear_cache() still drop it."""
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    scales = [1.0]

    def loss(h):
        return scales[0] * torch.logsumexp(h, dim=1).pow(2).sum()

    first = eq.grad(loss)["W"]
    scales[0] = 3.0
    assert torch.allclose(eq.grad(loss)["W"], 3.0 * first, rtol=1e-12)
    scales[0] = 1.0
    eq.forget(loss)
    assert torch.allclose(eq.grad(loss)["W"], first, rtol=1e-12)
    eq.clear_cache()
    assert torch.allclose(eq.grad(loss)["W"], first, rtol=1e-12)
    eq.forget(lambda h: h.sum())  # never cached: nothing to drop


def _numpy_double(t: torch.Tensor) -> None:
    view = t.numpy()  # shares t's memory; its writes leave t's version as it was
    view *= 2.0


@pytest.mark.parametrize("first_call", [True, False], ids=["after-a-derivative", "before-any"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda theta, x, scale: x.data.mul_(2.0), r"^x was modified .*version unchanged"),
        (lambda theta, x, scale: _numpy_double(x), r"^x was modified .*version unchanged"),
        (
            lambda theta, x, scale: theta["W"].data.mul_(0.5),
            r"^theta\['W'\] was modified .*\.data, \.numpy\(\)",
        ),
        (lambda theta, x, scale: scale.data.fill_(2.0), r"^f reads state that changed .*\.data"),
    ],
    ids=["x.data", "x.numpy", "theta.data", "closure.data"],
)
def test_a_write_that_leaves_no_version_makes_the_equilibrium_stale(change, message, first_call):
    """θ, x and a tensor f closes over, changed through ``.data`` or a NumPy view: versions
    do not move, their bytes do. After a first derivative this had gone unseen — the
    Hessian 1.24 off the old x's and 0.41 off the new x's, a mix of both — and before
    one it was refused as "f is not a deterministic function". Now the next derivative
    call raises StaleEquilibriumError, as x.mul_(2) does."""
    c = _tanh()
    theta = {k: v.clone() for k, v in c.theta.items()}
    x, scale = c.x.clone(), torch.tensor(1.0)

    def f(x, h, t):
        return c.f(scale * x, h, t)

    eq = dh.Equilibrium(f, theta, x, c.h0)
    if first_call:
        eq.grad(c.loss)
    change(theta, x, scale)
    with pytest.raises(dh.StaleEquilibriumError, match=message):
        eq.hessian(c.loss)
    with pytest.raises(dh.StaleEquilibriumError, match=message):
        eq.hvp(c.loss, torch.ones(eq.num_parameters))


def test_a_write_to_another_part_of_x_s_base_is_not_a_change_of_x():
    """x a view of a larger tensor: a write to the base's other rows moves x's version
    (views share their base's), not its numbers. It had been refused as "x was modified
    in place"; the bytes now decide, and the Hessian is that of a fresh Equilibrium."""
    c = _tanh()
    base = torch.cat([c.x, torch.randn(3, *c.x.shape[1:], dtype=c.x.dtype)])
    x = base[: len(c.x)]
    eq = dh.Equilibrium(c.f, c.theta, x, c.h0)
    eq.grad(c.loss)
    base[len(c.x) :].mul_(3.0)
    fresh = dh.Equilibrium(c.f, c.theta, x.clone(), c.h0)
    assert torch.equal(eq.hessian(c.loss), fresh.hessian(c.loss))
    base[0].mul_(3.0)  # x's own numbers: stale
    with pytest.raises(dh.StaleEquilibriumError, match="modified in place"):
        eq.hessian(c.loss)


def _unrolled_hessian(c, loss) -> torch.Tensor:
    """d²L/dθ² through 60 plain iterations of the 0.45-contraction (see problems.py)."""
    return torch.func.hessian(lambda flat: loss(c.unrolled_state(flat)))(c.flat_theta())


@pytest.mark.parametrize("change", ["data", "numpy", "inside a helper"])
def test_a_cached_adjoint_follows_a_target_changed_without_a_version(change):
    """The loss's target moved after λ was cached — through ``.data``, a NumPy view, or in
    place inside a helper the loss calls (beyond what it visibly captures). hessian()
    had mixed the old λ with the new ∇²L (0.41 off the new target's Hessian, 0.32 off the
    old's); now the Hessian and an HVP are the new target's, against the unrolled
    reference."""
    c = _tanh()
    g = torch.Generator().manual_seed(7)
    old, new = torch.randn(c.h0.shape, generator=g), 2.0 * torch.randn(c.h0.shape, generator=g)
    target, inner = old.clone(), old.clone()

    def helper(h):
        return torch.log(torch.cosh(h - inner)).sum()

    def direct(h):
        return torch.log(torch.cosh(h - target)).sum() + h.pow(3).sum()

    def indirect(h):
        return helper(h) + h.pow(3).sum()

    loss = indirect if change == "inside a helper" else direct
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    v = torch.randn(eq.num_parameters, generator=g)
    eq.hvp(loss, v)  # λ cached for the old target
    if change == "data":
        target.data.copy_(new)
    elif change == "numpy":
        target.numpy()[:] = new.numpy()
    else:
        inner.copy_(new)
    reference = _unrolled_hessian(
        c, lambda h: torch.log(torch.cosh(h - new)).sum() + h.pow(3).sum()
    )
    stale = _unrolled_hessian(c, lambda h: torch.log(torch.cosh(h - old)).sum() + h.pow(3).sum())
    assert relative_error(stale, reference) > 0.1  # the change matters
    assert relative_error(eq.hessian(loss), reference) < 1e-9
    assert relative_error(eq.hvp(loss, v), reference @ v) < 1e-9


# --------------------------------------------------------------- dense requests beyond memory
def test_dense_requests_beyond_the_limit_are_refused_before_allocating():
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    with dh.memory_limit(10_000):
        with pytest.raises(
            dh.DenseMemoryError,
            match=r"^eq\.hessian\(loss\) \(P = 45, N = 15\) would allocate about "
            r"32\.4 kB of torch\.float64, but 10\.0 kB is the limit set with deqhess\.memory_l"
            r"imit\. Use the exact matrix-free products instead: eq\.hvp.*memory_limit\(None\)",
        ) as err:
            eq.hessian(c.loss)
        assert err.value.required == 8 * (45 * 45 + 3 * 45 * 15) and err.value.available == 1e4
        with pytest.raises(
            dh.DenseMemoryError,
            match=r"^op\.to_dense\(\) on a CurvatureOperator \(45 × 45\) .*op @ V",
        ):
            eq.hessian_operator(c.loss).to_dense()
        with pytest.raises(dh.DenseMemoryError, match=r"^eq\.hessian_split\(loss\) \(P = 45"):
            eq.hessian_split(c.loss)
        with pytest.raises(dh.DenseMemoryError, match=r"^eq\.second_sensitivity\(\)"):
            eq.second_sensitivity()
        eq.grad(c.loss)  # no dense object: allowed
        with dh.memory_limit(None):  # the explicit override
            assert eq.hessian(c.loss).shape == (45, 45)
    with pytest.raises(ValueError, match=r"memory_limit takes a number of bytes >= 0 or None"):
        with dh.memory_limit(-1):
            pass


def test_dense_requests_at_p_1e5_are_refused_at_once():
    """P = N = 100,000: the Hessian is 80 GB, Z 80 GB (×4 with its set-up), both far
    above this machine's memory; each is refused before any allocation."""
    from deqhess.memory import available_bytes

    n = 100_000
    if (available_bytes(torch.device("cpu")) or 0) > 4 * 8 * n * n:
        pytest.skip("this machine could hold the request")
    eq = dh.Equilibrium(lambda x, h, t: 0.5 * h + t, torch.zeros(n), None, torch.zeros(n))
    loss = lambda h: (h - 1).pow(2).sum()  # noqa: E731
    with pytest.raises(dh.DenseMemoryError, match=r"P = 100,000, N = 100,000\) would alloc.* GB"):
        eq.hessian(loss)
    with pytest.raises(dh.DenseMemoryError, match=r"^eq\.sensitivity\(\) .*needs no Z"):
        eq.sensitivity()
    with pytest.raises(
        dh.DenseMemoryError, match=r"^op\.to_dense\(\) on a CurvatureOperator \(100,000 × 100,000\)"
    ):
        eq.hessian_operator(loss).to_dense()
    # the gradient needs no dense object: h* = 2t = 0, so dL/dt = 2(h* − 1)·2 = −4
    assert torch.allclose(eq.grad(loss), torch.full((n,), -4.0))


@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
def test_derivatives_under_inference_mode_are_exact(linear_solver):
    """torch.func.linearize (GMRES's products) returns zeros under inference_mode; the
    engine leaves it, and traced products are verified anyway."""
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, batch_dim=0, linear_solver=linear_solver)
    expected = torch.cat([t.reshape(-1) for t in eq.grad(c.loss).values()])
    v = torch.randn(eq.num_parameters)
    hv = eq.hvp(c.loss, v)
    with torch.inference_mode():
        inside = dh.Equilibrium(c.f, c.theta, c.x, c.h0, batch_dim=0, linear_solver=linear_solver)
        got = torch.cat([t.reshape(-1) for t in inside.grad(c.loss).values()])
        got_hv = inside.hvp(c.loss, v)
    assert torch.allclose(got, expected, atol=1e-12) and bool(expected.abs().sum() > 0)
    assert torch.allclose(got_hv, hv, atol=1e-12)


def test_state_read_by_f_or_held_by_a_loss_module_is_watched():
    """f closing over a tensor changed in place, and a loss module whose plain tensor
    attribute changed, make cached derivatives stale: named or recomputed, never reused."""
    c = _tanh()
    scale = torch.tensor(0.5)

    def f(x, h, t):
        return c.f(x, h, t) * scale

    eq = dh.Equilibrium(f, c.theta, c.x, c.h0)
    eq.grad(c.loss)
    scale.fill_(0.7)
    with pytest.raises(dh.StaleEquilibriumError, match=r"^f reads state that changed"):
        eq.grad(c.loss)

    class Targeted(torch.nn.Module):
        def __init__(self, target):
            super().__init__()
            self.target = target  # a plain attribute, not a buffer

        def forward(self, h):
            return (h - self.target).pow(2).sum()

    loss = Targeted(torch.zeros(c.h0.shape))
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    before = eq.grad(loss)
    loss.target.add_(1.0)
    fresh = dh.Equilibrium(c.f, c.theta, c.x, c.h0).grad(loss)
    after = eq.grad(loss)
    assert not torch.allclose(before["W"], fresh["W"])
    assert torch.allclose(after["W"], fresh["W"], rtol=1e-12)


_GLOBAL_SCALE = torch.tensor(0.5)


def _reads_a_global(x, h, t):
    """``f`` reading a module-level tensor, and the attribute ``.T`` of θ's weight."""
    return torch.tanh(_GLOBAL_SCALE * (h @ t["W"].T) + x @ t["U"].T + t["b"])


def test_globals_f_reads_are_watched_and_attribute_names_are_not_globals():
    """``f`` reads the global ``_GLOBAL_SCALE`` and the attribute ``T``: binding a global
    named ``T`` after the solve changes nothing ``f`` reads (it raised
    StaleEquilibriumError: attribute names were taken for globals); changing the global
    tensor in place is named."""
    c = _tanh()
    eq = dh.Equilibrium(_reads_a_global, c.theta, c.x, c.h0)
    first = eq.grad(c.loss)
    globals()["T"] = torch.ones(3)  # unrelated, but named like an attribute f reads
    try:
        again = eq.grad(c.loss)
        assert all(torch.equal(again[k], first[k]) for k in first)
    finally:
        del globals()["T"]
    _GLOBAL_SCALE.fill_(0.6)
    try:
        with pytest.raises(dh.StaleEquilibriumError, match=r"^f reads state that changed"):
            eq.grad(c.loss)
    finally:
        _GLOBAL_SCALE.fill_(0.5)


def test_a_default_state_f_cannot_take_is_explained():
    """``h0=None`` (the documented default: zeros like x) when the state is not shaped
    like x was a raw matmul error from inside f; now the advice the CLI gives: pass h0."""
    c = _tanh()  # x is 3 × 3, the state 3 × 5
    with pytest.raises(
        dh.InputError,
        match=r"^f failed on the initial state: h0 was not given, so the state starts as zeros "
        r"shaped like x, \(3, 3\); if the state has another shape, pass h0 shaped like it",
    ) as caught:
        dh.Equilibrium(c.f, c.theta, c.x, None)
    assert isinstance(caught.value.__cause__, RuntimeError)  # f's own error, kept
    with pytest.raises(
        dh.InputError, match=r"^f returned shape \(3, 4\) on the initial state: h0 was not given"
    ):
        dh.Equilibrium(lambda x, h, t: torch.cat([h, h[:, :1]], 1), c.theta, c.x)


def test_x_of_another_dtype_than_theta_is_named_when_f_fails_on_it():
    """x in float32 with θ and h0 in float64 was a raw ``expected m1 and m2 to have the
    same dtype``: the dtypes are named, with what to convert. An f that casts x itself
    still works, and a failure deqhess cannot explain keeps its own traceback."""
    c = _tanh()
    with pytest.raises(
        dh.InputError,
        match=r"^f failed on the initial state: x is torch\.float32 but theta and h0 are "
        r"torch\.float64, .*convert x with \.to\(torch\.float64\)",
    ):
        dh.Equilibrium(c.f, c.theta, c.x.float(), c.h0)
    casting = dh.Equilibrium(lambda x, h, t: c.f(x.double(), h, t), c.theta, c.x.float(), c.h0)
    expected = dh.Equilibrium(c.f, c.theta, c.x.float().double(), c.h0)
    assert torch.equal(casting.h, expected.h)

    def buggy(x, h, t):
        raise RuntimeError("the user's own bug")

    with pytest.raises(RuntimeError, match=r"^the user's own bug") as error:
        dh.Equilibrium(buggy, c.theta, c.x, c.h0)
    assert type(error.value) is RuntimeError  # its own error, a note of the shapes added


def test_h0_and_v_swapped_by_keyword_are_named():
    """``hvp(..., h0=v, v=h0)`` was a raw matmul error from f given the direction as its
    state: a direction's form where h0 belongs beside a v of none is refused by name."""
    c = _tanh()
    v = torch.ones(45)
    for direction in (v, v[:, None], {k: torch.ones_like(t) for k, t in c.theta.items()}):
        with pytest.raises(
            ArgumentError,
            match=r"^hvp got h0 .*, which has the form of a direction .* P = 45\), and v "
            r"\(3, 5\), which has not: h0 and v look swapped; pass h0=<the initial state>",
        ):
            dh.hvp(c.f, c.loss, c.theta, c.x, h0=direction, v=c.h0)


@pytest.mark.parametrize("where", ["x", "theta"])
def test_f_writing_x_or_theta_in_place_is_named(where):
    """A map writing its input x or a θ entry in place (even x.mul_(1.0)) failed at
    hessian() with torch.func's raw "attempted to call in-place operation"; named at
    construction now, on copies (the caller's tensors untouched)."""
    c = _tanh()
    theta = {k: v.clone() for k, v in c.theta.items()}

    def f(x, h, t):
        if where == "x":
            x.mul_(1.0)
        else:
            next(iter(t.values())).mul_(2.0)
        return c.f(x, h, t)

    before = [v.clone() for v in theta.values()]
    x = c.x.clone()
    with pytest.raises(dh.InputError, match=rf"f modified {where}.* in place"):
        dh.Equilibrium(f, theta, x, c.h0)
    assert torch.equal(x, c.x)
    assert all(torch.equal(a, b) for a, b in zip(before, theta.values(), strict=True))


def test_a_torch_loss_module_as_equilibrium_s_loss_is_named():
    """nn.MSELoss() takes (input, target): read as loss(h, theta), it raised a raw
    AttributeError ('dict' object has no attribute 'size') from inside torch."""
    c = _tanh()
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0)
    with pytest.raises(dh.InputError, match=r"torch's MSELoss, which takes \(input, target\)"):
        eq.hessian(torch.nn.MSELoss())


def test_inputs_made_under_inference_mode_are_named_outside_it():
    """x made under torch.inference_mode(), Equilibrium built outside it: torch's raw
    "Inference tensors do not track version counter" at construction."""
    c = _tanh()
    with torch.inference_mode():
        x = c.x.clone()
    with pytest.raises(dh.InputError, match=r"x was made under torch.inference_mode\(\)"):
        dh.Equilibrium(c.f, c.theta, x, c.h0)
    with torch.inference_mode():  # inside the block it is the plain computation
        dh.Equilibrium(c.f, c.theta, x, c.h0).grad(c.loss)
