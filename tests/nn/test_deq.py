"""The DEQ layer: second and third derivatives through autograd and torch.func are exact.

References are unrolled autodiff through 60 steps of the same contractive maps (see
``problems.py``: exact to ~1e-17), so 1e-9 relative leaves six orders of margin over
the layer's own error (state solved to 1e-14, cond(I − J) < 3).
"""

from __future__ import annotations

import pytest
import torch
from problems import CASE_NAMES, LearnedStart, case, relative_error
from torch import nn

import deqhess as dh
from deqhess.nn import DEQ


class RegistryCell(nn.Module):
    """A registry family's ``f(x, h, θ)`` as a module holding θ as parameters."""

    def __init__(self, c):
        super().__init__()
        self.case = c
        self.names = [name or "theta" for name, _ in c.leaves()]
        for name, (_, t) in zip(self.names, c.leaves(), strict=True):
            self.register_parameter(name, nn.Parameter(t.detach().clone()))

    def forward(self, x, h):
        if isinstance(self.case.theta, torch.Tensor):
            return self.case.f(x, h, self.theta)
        return self.case.f(x, h, {n: getattr(self, n) for n in self.names})

    def init_state(self, x):
        return self.case.h0


def layer_for(c):
    return DEQ(RegistryCell(c), tol=1e-14, atol=1e-15, batch_dim=0 if c.batch_dim == 0 else None)


def loss_through_layer(deq, c):
    """θ_flat ↦ L(h*(θ)) via functional_call, flattening as the registry does."""
    names = [n for n, _ in deq.named_parameters()]
    shapes = [p.shape for _, p in deq.named_parameters()]
    sizes = [p.numel() for _, p in deq.named_parameters()]

    def objective(flat):
        pieces = [p.reshape(s) for p, s in zip(flat.split(sizes), shapes, strict=True)]
        h = torch.func.functional_call(deq, dict(zip(names, pieces, strict=True)), (c.x,))
        return c.loss(h)

    return objective


@pytest.mark.parametrize("name", CASE_NAMES)
def test_torch_func_hessian_through_layer(name):
    c = case(name)
    deq = layer_for(c)
    flat = c.flat_theta()
    reference = torch.func.hessian(c.reference_loss())(flat)
    assert relative_error(torch.func.hessian(loss_through_layer(deq, c))(flat), reference) <= 1e-9


@pytest.mark.parametrize("name", CASE_NAMES)
def test_autograd_second_and_third_order(name):
    c = case(name)
    deq = layer_for(c)
    v = torch.randn(c.flat_theta().numel())

    def orders(objective):
        flat = c.flat_theta().requires_grad_()
        (g,) = torch.autograd.grad(objective(flat), flat, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v, flat, create_graph=True)
        (third,) = torch.autograd.grad(hv @ v, flat)  # ∇_θ (vᵀ H v)
        return g.detach(), hv.detach(), third

    got = orders(loss_through_layer(deq, c))
    want = orders(c.reference_loss())
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= 1e-9


def test_loss_backward_on_module_parameters_matches_equilibrium():
    c = case("tanh_batched")
    deq = layer_for(c)
    c.loss(deq(c.x)).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in deq.parameters()])
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, batch_dim=0, tol=1e-14, atol=1e-15)
    expected = torch.cat([t.reshape(-1) for t in eq.grad(c.loss).values()])
    assert relative_error(grads, expected) <= 1e-10
    assert [n for n, _ in deq.named_parameters()] == ["cell.W", "cell.U", "cell.b"]


def test_torch_func_vjp_jvp_and_input_derivatives():
    c = case("tanh_coupled")
    deq = layer_for(c)
    params = {k: v.detach() for k, v in deq.named_parameters()}

    def of_x(x):
        return torch.func.functional_call(deq, params, (x,))

    def unrolled_of_x(x):
        h = c.h0
        for _ in range(60):
            h = c.f(x, h, c.theta)
        return h

    dx, cot = torch.randn_like(c.x), torch.randn_like(c.h0)
    _, tangent = torch.func.jvp(of_x, (c.x,), (dx,))
    _, ref_tangent = torch.func.jvp(unrolled_of_x, (c.x,), (dx,))
    assert relative_error(tangent, ref_tangent) <= 1e-9
    _, pullback = torch.func.vjp(of_x, c.x)
    _, ref_pullback = torch.func.vjp(unrolled_of_x, c.x)
    assert relative_error(pullback(cot)[0], ref_pullback(cot)[0]) <= 1e-9
    hess_x = torch.func.hessian(lambda x: c.loss(of_x(x)))(c.x)
    assert (
        relative_error(hess_x, torch.func.hessian(lambda x: c.loss(unrolled_of_x(x)))(c.x)) <= 1e-9
    )


def test_statistics_on_request_and_default_state():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.3))

        def forward(self, x, h):
            return self.a * torch.tanh(h) + x

    deq = DEQ(Cell(), tol=1e-12)
    x = torch.randn(4, 3)
    solution = deq.solve(x)
    h, info = solution.h, solution.info
    assert h.shape == x.shape and info.converged and info.sample_iterations.shape == (4,)
    assert torch.allclose(h, 0.3 * torch.tanh(h) + x, atol=1e-10)
    assert not hasattr(deq, "info")  # statistics are returned, not stored
    assert "solver=Anderson" in repr(deq)


class SolveCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        with torch.no_grad():
            self.lin.weight.mul_(0.45 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, x, h):
        return torch.tanh(self.lin(h) + x)


def test_solve_is_the_layers_call_with_its_statistics_typed():
    """``deq.solve(x)`` is the call ``deq(x)``: the same h* and the same derivatives, bit
    for bit, at first and second order in autograd and through torch.func (one
    computation, so nothing may differ); the layer's own hooks run; a frozen result."""
    import dataclasses

    deq = DEQ(SolveCell(), tol=1e-12)
    x = torch.randn(4, 3, requires_grad=True)
    v = torch.randn(4, 3)
    calls = []
    deq.register_forward_hook(lambda module, args, output: calls.append(type(output)))

    def derivatives(h):
        """∂L/∂x and the double-backward HVP (∂²L/∂x²)·v for L = Σ sin(h*)."""
        (g,) = torch.autograd.grad(h.sin().sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, v)
        return g.detach(), hv

    solution = deq.solve(x)
    assert isinstance(solution, dh.nn.LayerSolution) and isinstance(solution.info, dh.nn.LayerInfo)
    h = deq(x)
    assert torch.equal(solution.h, h) and solution.h.requires_grad
    for a, b in zip(derivatives(solution.h), derivatives(h), strict=True):
        assert torch.equal(a, b)
    # the derivatives' solves are recorded in the info as they are taken: the adjoint
    # (I − J)ᵀλ = ḡ; then the double backward's two, with I − J (the adjoint system's own
    # adjoint) and (I − J)ᵀ (through h* in the first backward's products)
    assert solution.info.converged and solution.info.linear_solves.solves == 3
    jac = torch.func.jacrev(lambda z: deq.solve(z).h)(x.detach())
    assert torch.equal(jac, torch.func.jacrev(deq)(x.detach()))
    assert calls[:2] == [tuple, torch.Tensor]  # solve is a call of the module: hooks run
    with pytest.raises(dataclasses.FrozenInstanceError):
        solution.h = h  # type: ignore[misc]


def test_return_info_is_deprecated_for_solve():
    deq = DEQ(SolveCell(), tol=1e-12)
    x = torch.randn(4, 3)
    with pytest.warns(
        DeprecationWarning,
        match=r"return_info=True\) is deprecated .* call deq\.solve\(x, h0\), which returns "
        r"a LayerSolution",
    ) as caught:
        h, info = deq(x, return_info=True)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    solution = deq.solve(x)
    assert torch.equal(h, solution.h) and info.iterations == solution.info.iterations
    assert torch.equal(deq(x, return_info=False), h)  # the default, said aloud: no warning


def test_layer_errors():
    class Wrong(nn.Module):
        def forward(self, x, h):
            return h[:, :2]

    with pytest.raises(ValueError, match=r"cell must be a torch.nn.Module"):
        DEQ(lambda x, h: h)
    with pytest.raises(ValueError, match=r"batch_dim must be 0 or None"):
        DEQ(Wrong(), batch_dim=1)
    with pytest.raises(ValueError, match=r"cell\(x, h\) returned shape \(4, 2\) .* shape \(4, 3\)"):
        DEQ(Wrong())(torch.randn(4, 3))

    class Divergent(nn.Module):
        def forward(self, x, h):
            return h + 1  # no fixed point

    with pytest.raises(dh.ConvergenceError, match="did not converge in max_iter=20"):
        DEQ(Divergent(), max_iter=20)(torch.randn(2, 2))


def test_coupled_cell_with_batch_dim_raises():
    class BatchMixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.3))

        def forward(self, x, h):
            return self.a * torch.tanh(h - h.mean(dim=0, keepdim=True)) + x

    x = torch.randn(4, 3)
    h = DEQ(BatchMixing())(x)  # checked once a derivative is taken
    with pytest.raises(ValueError, match=r"couples the samples .*batch_dim=None"):
        h.sum().backward()
    h = DEQ(BatchMixing(), batch_dim=None)(x)
    h.sum().backward()
    assert h.shape == x.shape


def test_batch_norm_in_training_mode_is_refused():
    """Running statistics would be updated at every solver iteration and batch statistics
    couple the samples; in eval mode batch norm is per-sample (see the derivative grid)."""

    class BN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.norm = nn.BatchNorm1d(4)

        def forward(self, x, h):
            return torch.tanh(0.3 * self.norm(self.lin(h)) + x)

    with pytest.raises(
        ValueError, match=r"cell.norm is a BatchNorm1d in training mode: .*\.eval\(\)"
    ):
        DEQ(BN().train())(torch.randn(6, 4))
    assert DEQ(BN().eval())(torch.randn(6, 4)).shape == (6, 4)


def test_empty_batch_and_option_errors():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, h):
            return torch.tanh(0.5 * self.lin(h) + x)

    deq = DEQ(Cell())
    solution = deq.solve(torch.randn(0, 3))  # an empty batch: an empty answer
    h, info = solution.h, solution.info
    assert h.shape == (0, 3) and info.converged and info.converged_mask.shape == (0,)
    h.sum().backward()
    assert torch.equal(deq.cell.lin.weight.grad, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"max_iter must be an int; got 10\.5"):
        DEQ(Cell(), max_iter=10.5)
    with pytest.raises(ValueError, match=r"tol must be a finite number in \[0, 1\); got inf"):
        DEQ(Cell(), tol=float("inf"))
    with pytest.raises(ValueError, match=r"the state has dtype torch\.float16; deqhess supports"):
        DEQ(Cell().half(), tol=1e-3)(torch.randn(2, 3).half())
    with pytest.raises(ValueError, match=r"unknown linear_solver 'cholesky'; use 'auto'"):
        DEQ(Cell(), linear_solver="cholesky")  # at construction, not at the first forward


def test_an_initial_state_of_the_wrong_shape_is_named():
    """Where the cell states the state's shape (``init_state``) a wrong ``h0`` is refused
    before the cell runs; elsewhere the cell's own error carries a note about ``h0``."""

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.rec = nn.Linear(4, 6), nn.Linear(6, 6)

        def forward(self, x, h):
            return torch.tanh(0.3 * self.rec(h) + self.lin(x))

    class Stated(Cell):
        def init_state(self, x):
            return x.new_zeros(x.shape[0], 6)

    x = torch.randn(3, 4)
    for h0 in (torch.zeros(2, 6), torch.zeros(3, 5)):
        shape = str(tuple(h0.shape)).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=rf"h0 has shape {shape} but the state has shape"):
            DEQ(Stated())(x, h0=h0)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as error:
        DEQ(Cell())(x, h0=torch.zeros(3, 5))  # the user's own error, untouched ...
    assert "from the h0 you passed (shape (3, 5); x: (3, 4))" in "".join(error.value.__notes__)
    assert DEQ(Cell())(x, h0=torch.zeros(3, 6)).shape == (3, 6)  # ... and a right h0 works


def test_legacy_batched_gradients_are_refused_with_the_supported_alternative():
    """is_grads_batched runs the backward under torch's legacy vmap, which never calls the
    Function's vmap rule; torch.func.vmap over torch.autograd.grad does, and is exact."""

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, x, h):
            return torch.tanh(0.4 * self.lin(h) + x)

    deq = DEQ(Cell(), tol=1e-13, atol=1e-14)
    params = list(deq.parameters())
    grads = torch.autograd.grad(deq(torch.randn(3, 5)).pow(2).sum(), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    directions = torch.randn(4, flat.numel())
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"is_grads_batched=True.*torch\.func"):
        torch.autograd.grad(flat, params, directions, is_grads_batched=True, retain_graph=True)

    def product(v):
        parts = torch.autograd.grad(flat, params, v, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in parts])

    batched = torch.func.vmap(product)(directions)
    looped = torch.stack([product(v) for v in directions])
    assert relative_error(batched, looped) <= 1e-12


def test_in_place_use_of_the_output_does_not_move_the_next_warm_start():
    """The store keeps the layer's own copy of h*: negating what was returned (a map with
    two stable fixed points, ±0.96) must not send the next call to the other one."""

    class Bistable(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.tensor(2.0))

        def forward(self, x, h):
            return torch.tanh(self.g * h + x)

    deq = DEQ(Bistable(), solver="picard", tol=1e-12)
    x = torch.full((2, 3), 0.05)
    store = {}
    with dh.nn.warm_starts(store):
        first = deq(x)
    assert all(v.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
               for v in store.values())  # fmt: skip
    with torch.no_grad():
        first.neg_()
    with dh.nn.warm_starts(store):
        second = deq(x)
    assert bool((second > 0.9).all()), second


def test_autocast_around_the_layer_changes_nothing_inside_it():
    """Under torch.autocast (CPU bfloat16) the layer solves and differentiates in its
    state's dtype (float32 here): the same output and gradients, bitwise, as without
    autocast — with the forward, or only the backward, inside it. Before: a raw dtype
    error in Anderson, or a 'non-deterministic map' error."""

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, h):
            return torch.tanh(0.4 * self.lin(h) + x)

    torch.manual_seed(0)
    cell = Cell().float()
    x = torch.randn(16, 8, dtype=torch.float32)

    def step(forward_autocast, backward_autocast):
        deq = DEQ(cell)
        cell.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
            h = deq(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_autocast):
            h.pow(2).sum().backward()
        return h.detach(), [p.grad.clone() for p in cell.parameters()]

    h, grads = step(False, False)
    for modes in ((True, True), (True, False), (False, True)):
        h_amp, grads_amp = step(*modes)
        assert h_amp.dtype == torch.float32 and torch.equal(h_amp, h), modes
        assert all(torch.equal(a, b) for a, b in zip(grads_amp, grads, strict=True)), modes


def test_a_parametrised_cell_inside_parametrize_cached_is_refused():
    """weight_norm's weight cached on first use inside the layer's solve was detached from
    its parameters (their gradients exactly zero, no error); outside cached() it is exact."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = weight_norm(nn.Linear(4, 4))

        def forward(self, x, h):
            return torch.tanh(0.3 * self.lin(h) + x)

    deq = DEQ(Cell(), tol=1e-13)
    x = torch.randn(3, 4)
    with parametrize.cached():
        with pytest.raises(ValueError, match=r"\['cell.lin'\] are evaluated inside .*cached\(\)"):
            deq(x)
    names = [n for n, _ in deq.cell.named_parameters()]
    got = torch.autograd.grad(deq(x).pow(2).sum(), list(deq.cell.parameters()))
    cell = deq.cell
    h = torch.zeros(3, 4)
    for _ in range(80):  # contraction ≤ 0.3 ‖W‖: 0.3⁸⁰ is far below rounding
        h = cell(x, h)
    expected = torch.autograd.grad(h.pow(2).sum(), list(cell.parameters()))
    for name, a, b in zip(names, got, expected, strict=True):
        assert relative_error(a, b) <= 1e-9, name


class _Lin(nn.Module):
    def __init__(self, n=4, m=None):
        super().__init__()
        self.lin, self.inp = nn.Linear(n, n), nn.Linear(m or n, n)

    def forward(self, x, h):
        return torch.tanh(0.4 * self.lin(h) + self.inp(x))


def test_an_exactly_zero_upstream_gradient_gives_zero_gradients_not_none():
    """A zero loss weight (a warm-up schedule, a mask leaving out every sample): the layer
    gave None, so .grad stayed None, autograd.grad raised torch's "not used in the graph",
    and Adam's momentum skipped the parameters (82% off the unrolled model in 3 steps)."""
    torch.manual_seed(0)
    deq = DEQ(_Lin(), tol=1e-12)
    x = torch.randn(3, 4, requires_grad=True)
    (0.0 * deq(x).pow(2).sum()).backward()
    for t in (*deq.parameters(), x):
        assert t.grad is not None and not bool(t.grad.any())
    grads = torch.autograd.grad(0.0 * deq(x).sum(), list(deq.parameters()))
    assert all(not bool(g.any()) for g in grads)


def test_an_encoder_under_autocast_hands_the_layer_lower_precision_that_it_casts():
    """Linear → DEQ → Linear under CPU bfloat16 autocast: the encoder's bfloat16 output was
    refused ("cast ... model.to(bfloat16)", itself refused). The layer casts it to its
    parameters' float32 and solves there: the gradients are those of the same model fed
    the encoder's bfloat16 output cast by hand, without autocast inside the layer."""
    torch.manual_seed(0)
    encoder, deq = nn.Linear(6, 4).float(), DEQ(_Lin().float(), tol=1e-6)
    x = torch.randn(5, 6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = encoder(x)
        assert u.dtype == torch.bfloat16
        h = deq(u)
    assert h.dtype == torch.float32
    got = torch.autograd.grad(h.pow(2).sum(), list(deq.parameters()))
    want = torch.autograd.grad(deq(u.detach().float()).pow(2).sum(), list(deq.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(dh.InputError, match="keep the DEQ layer in float32"):
        DEQ(_Lin().to(torch.bfloat16))(x)  # float32 data on a bfloat16 cell
    with pytest.raises(
        dh.InputError,
        match=r"the state is torch\.bfloat16 .* x\.to\(torch"
        r"\.float32\) — under torch\.autocast the layer does this itself",
    ):
        deq(u.detach())  # bfloat16 data outside autocast, on a float32 cell


def test_a_default_start_of_the_wrong_shape_or_dtype_names_init_state():
    """No h0 and no init_state: zeros like x. A state wider than x failed with the cell's
    raw shape error, integer token ids with "h0 has dtype int64"."""
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as error:
        DEQ(_Lin(n=5, m=3))(x)
    assert "define init_state(self, x) on the cell" in "".join(error.value.__notes__)
    with pytest.raises(dh.InputError, match=r"x is torch.int64 .* define init_state"):
        DEQ(_Lin())(torch.zeros(4, 4, dtype=torch.long))


def test_a_parameter_written_through_data_before_the_backward_is_named_as_a_cause():
    torch.manual_seed(0)
    deq = DEQ(_Lin(), tol=1e-12)
    loss = deq(torch.randn(3, 4)).pow(2).sum()
    with torch.no_grad():
        deq.cell.lin.weight.data.mul_(1.5)  # weight clipping between forward and backward
    with pytest.raises(dh.InputError, match=r"a parameter written through \.data"):
        loss.backward()


def test_a_learned_start_gets_zero_derivatives_in_the_graph_not_none():
    """z* does not depend on h0: a start computed from parameters (a learned initialiser)
    gets zero derivatives, as unrolled iterations give them to rounding. The layer cut h0
    from the graph: its parameters got None, and autograd.grad over model.parameters()
    (curvlinops' operators among its callers) raised torch's "not used in the graph"."""
    torch.manual_seed(0)
    model = LearnedStart().double()
    twin = LearnedStart(unrolled=True).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    v = [torch.randn_like(p) for p in model.parameters()]
    results = []
    for m in (model, twin):
        params = list(m.parameters())
        loss = m(x).pow(2).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)  # every one in the graph
        along = sum((g * d).sum() for g, d in zip(grads, v, strict=True))
        hvp = torch.autograd.grad(along, params)
        results.append(torch.cat([t.reshape(-1) for t in (*grads, *hvp)]).detach())
    assert relative_error(*results) <= 1e-10
    init = [p for n, p in model.named_parameters() if n.startswith("init.")]
    assert all(p.grad is None for p in init)
    model(x).sum().backward()
    assert all(p.grad is not None and not bool(p.grad.any()) for p in init)
