"""What a cell must be for exact derivatives, and the errors when it is not (found by an
adversarial review: each case once returned a wrong number silently, or a raw error).

References are unrolled float64 autograd through 60 steps of contractions with c ≤ 0.45
(error ~K²cᴷ < 1e-16); the layer solves to 1e-12, so 1e-8 leaves ample margin."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.nn import DEQ


class Tanh(nn.Module):
    def __init__(self, n: int = 4):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.45 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, x, h):
        return torch.tanh(self.lin(h) + x)


def _unrolled(cell, x, h0, steps=60):
    h = h0
    for _ in range(steps):
        h = cell(x, h)
    return h


@pytest.mark.parametrize("kind", ["F.dropout", "noise", "RReLU", "InstanceNorm"])
def test_a_random_cell_is_named_not_left_to_a_convergence_error(kind):
    """A functional dropout or noise in training mode, an RReLU, an instance norm updating
    running statistics: each had ended in 'did not converge … try a larger max_iter'. The
    modules are refused by name before the solve; a map that draws random numbers is told
    apart from a slow one, where the solve fails, by two evaluations at one point."""

    class Random(Tanh):
        def __init__(self):
            super().__init__()
            self.act = nn.RReLU() if kind == "RReLU" else nn.Identity()
            self.norm = nn.InstanceNorm1d(4, track_running_stats=kind == "InstanceNorm")

        def forward(self, x, h):
            h = self.act(super().forward(x, h))
            if kind == "F.dropout":
                return nn.functional.dropout(h, 0.2, training=self.training)
            if kind == "noise" and self.training:
                return h + 1e-3 * torch.randn_like(h)
            if kind == "InstanceNorm":
                return self.norm(h[:, None])[:, 0]
            return h

    message = {
        "F.dropout": "not a deterministic function of the state: evaluated twice",
        "noise": "not a deterministic function of the state: evaluated twice",
        "RReLU": r"cell\.act is an RReLU in training mode",
        "InstanceNorm": r"cell\.norm is a InstanceNorm1d with running statistics",
    }[kind]
    with pytest.raises(ValueError, match=message):
        DEQ(Random().train(), max_iter=50)(torch.randn(3, 4))
    if kind != "InstanceNorm":  # in eval mode each is one deterministic map
        DEQ(Random().eval())(torch.randn(3, 4))


@pytest.mark.parametrize("solver", ["auto", "dense", "gmres"])
def test_coupling_is_checked_under_vmap_too(solver):
    """Per-instance gradients of a cell that couples its samples: each vmapped instance's
    linear algebra relies on independent samples, so it must refuse, not answer."""

    class Coupled(Tanh):
        def forward(self, x, h):
            return torch.tanh(self.lin(h) + 0.4 * h.mean(0, keepdim=True) + x)

    deq = DEQ(Coupled(3), linear_solver=solver)
    params = {k: v.detach() for k, v in deq.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(deq, p, (x,)).pow(2).sum()

    with pytest.raises(ValueError, match="couples the samples of the batch"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, torch.randn(5, 4, 3))


def test_stochastic_cells_are_refused():
    class Dropped(Tanh):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)

        def forward(self, x, h):
            return self.drop(super().forward(x, h))

    with pytest.raises(ValueError, match=r"cell.drop is a Dropout in training mode.*\.eval\(\)"):
        DEQ(Dropped().train())(torch.randn(3, 4))
    assert DEQ(Dropped().eval())(torch.randn(3, 4)).shape == (3, 4)

    class Drifting(Tanh):  # state read by the cell but not an argument of it
        shift = 0.0

        def forward(self, x, h):
            return super().forward(x, h) + self.shift

    cell = Drifting()
    h = DEQ(cell, tol=1e-12, atol=1e-13)(torch.randn(3, 4))
    cell.shift = 1e-2  # the map changed after its fixed point was solved
    with pytest.raises(ValueError, match="f is not a deterministic function of the state"):
        h.sum().backward()

    cell = Tanh()
    nn.utils.parametrizations.spectral_norm(cell.lin)
    with pytest.raises(ValueError, match=r"cell\.lin has a spectral norm in training mode"):
        DEQ(cell.train())(torch.randn(3, 4))


def test_buffers_and_structured_inputs_are_differentiated():
    """A buffer read by the cell and an input given as a dict are arguments of the fixed
    point: torch.func derivatives in them match the unrolled map."""

    class Buffered(Tanh):
        def __init__(self):
            super().__init__()
            self.register_buffer("gain", torch.tensor([0.9, -0.5, 0.3, 0.7]))

        def forward(self, x, h):
            return torch.tanh(self.lin(h) * self.gain + x["a"] - 0.5 * x["b"])

        def init_state(self, x):
            return torch.zeros_like(x["a"])

    cell = Buffered()
    deq = DEQ(cell, tol=1e-13, atol=1e-14)
    x = {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}

    def through_layer(gain, b):
        out = torch.func.functional_call(deq, {"cell.gain": gain}, ({"a": x["a"], "b": b},))
        return out.pow(2).sum()

    def unrolled(gain, b):
        h = torch.zeros(3, 4)
        for _ in range(60):
            h = torch.func.functional_call(cell, {"gain": gain}, ({"a": x["a"], "b": b}, h))
        return h.pow(2).sum()

    got = torch.func.grad(through_layer, argnums=(0, 1))(cell.gain, x["b"])
    want = torch.func.grad(unrolled, argnums=(0, 1))(cell.gain, x["b"])
    for a, b in zip(got, want, strict=True):
        assert relative_error(a.detach(), b.detach()) <= 1e-8


def test_unregistered_tensors_that_need_grad_are_refused():
    shared = nn.Parameter(0.3 * torch.eye(4))

    class Sharing(nn.Module):
        def __init__(self):
            super().__init__()
            self.__dict__["weight"] = shared  # read, but not registered on the cell

        def forward(self, x, h):
            return torch.tanh(h @ self.weight + x)

    with pytest.raises(ValueError, match="reads a tensor that requires grad"):
        DEQ(Sharing())(torch.randn(3, 4))


class _Hyper(nn.Module):
    """A hypernetwork writes the cell's weight (a plain attribute) in the model's forward;
    ``tied`` reads the encoder's weight through a reference the cell does not register."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.hyper, self.enc = how, nn.Linear(1, 16, bias=False), nn.Linear(4, 4)
        self.cell, self.cell.refs = Tanh(), [self.enc]
        self.deq = DEQ(self.cell)

    def forward(self, x):
        if self.how == "hyper":  # as torchdeq's reset_norm writes a normalised weight
            self.cell.extra = 0.05 * self.hyper(torch.ones(1)).reshape(4, 4)
        else:
            self.cell.extra = 0.1 * self.cell.refs[0].weight
        return self.deq(self.enc(x))


class _ReadsExtra(Tanh):
    def forward(self, x, h):
        return torch.tanh(self.lin(h) + h @ self.extra.T + x)


@pytest.mark.parametrize("how", ["hyper", "tied"])
@pytest.mark.parametrize("transform", ["grad", "vmap(grad)", "jacrev", "jvp", "hessian"])
def test_unregistered_tensors_a_transform_tracks_are_refused_too(how, transform):
    """Under torch.func the solve runs below the transforms' levels, where a tensor the
    cell reads besides its arguments is a constant: its derivatives were 0 (the
    hypernetwork's) or 5% off (the tied encoder's), silently. Refused, as eagerly."""
    model = _Hyper(how)
    model.cell.__class__ = _ReadsExtra
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 4)

    def loss(p, x=x):
        return torch.func.functional_call(model, p, (x,)).pow(2).sum()

    with pytest.raises(ValueError, match="reads a tensor that requires grad"):
        model(x).sum().backward()  # eagerly
    with pytest.raises(ValueError, match=r"or that a torch\.func transform tracks"):
        if transform == "grad":
            torch.func.grad(loss)(params)
        elif transform == "vmap(grad)":
            torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
        elif transform == "jacrev":
            torch.func.jacrev(loss)(params)
        elif transform == "jvp":
            torch.func.jvp(loss, (params,), (params,))
        else:  # in the weight the cell reads through the attribute
            name = "hyper.weight" if how == "hyper" else "enc.weight"
            torch.func.hessian(lambda w: loss({**params, name: w}))(params[name])


def test_a_cell_reading_only_its_arguments_is_not_refused_under_transforms():
    """The check's own evaluation takes plain values: under vmap over grad over jvp the
    cell's parameters, x and h are wrapped at every level, and nothing is refused."""
    deq = DEQ(Tanh())
    params = {k: v.detach() for k, v in deq.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(deq, p, (x,)).pow(2).sum()

    xs = torch.randn(2, 3, 4)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(2):
        want = torch.func.grad(loss)(params, xs[i])
        for k in params:
            torch.testing.assert_close(grads[k][i], want[k])
    torch.func.jvp(lambda p: torch.func.grad(loss)(p, xs[0]), (params,), (params,))


def test_output_supports_in_place_use_and_inputs_are_checked():
    deq = DEQ(Tanh())
    out = nn.ReLU(inplace=True)(deq(torch.randn(3, 4)))
    out.sum().backward()
    with pytest.raises(ValueError, match=r"h0 must be a torch\.Tensor"):
        deq(torch.randn(3, 4), h0=[[0.0] * 4] * 3)
    with pytest.raises(
        ValueError, match=r"parameters are torch.float64 but the state is torch.float32"
    ):
        deq(torch.randn(3, 4, dtype=torch.float32))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^x contains non-finite values"):
        deq(bad)
    with pytest.raises(ValueError, match="return_info must be True or False"):
        deq(torch.randn(3, 4), return_info="yes")


def test_the_layers_refusals_of_bad_input_are_input_errors():
    """Each is a deqhess.InputError — under the root DeqhessError, and still the ValueError
    a caller may catch."""
    from deqhess.nn import TupleState

    class Untupled(nn.Module):
        def forward(self, x, state):
            return state[0]  # a tensor, not the tuple of states

    deq = DEQ(Tanh())
    cases = [
        (lambda: DEQ(torch.tanh), "cell must be a torch.nn.Module with forward"),
        (lambda: DEQ(Tanh(), batch_dim=1), "batch_dim must be 0 or None for the DEQ layer"),
        (lambda: deq({"a": torch.randn(3, 4)}), r"x is a dict, so the initial state cannot"),
        (
            lambda: deq(torch.randn(3, 4), h0=torch.zeros(3, 4, dtype=torch.int64)),
            r"h0 has dtype torch.int64; the state must be float32 or float64",
        ),
        (lambda: TupleState(Tanh(), shapes=[])(None, None), "at least one state shape"),
        (
            lambda: TupleState(Untupled(), shapes=[(4,)])(torch.randn(3, 4), torch.zeros(3, 4)),
            r"the cell returned a Tensor; a TupleState cell returns a tuple of 1 state",
        ),
    ]
    for call, message in cases:
        with pytest.raises(dh.InputError, match=message) as caught:
            call()
        assert isinstance(caught.value, dh.DeqhessError) and isinstance(caught.value, ValueError)


def test_ill_conditioning_beyond_the_tolerance_is_refused():
    """A linear cell with ρ(J) = 1 − 1e-5: cond(I − J) ≈ 2e5, so float32's 1e-5
    tolerance accepts h0 = 2 as it is (residual 1e-5 ≤ 2e-5) though h* = 1: the bound
    ‖(I − J)⁻¹‖ × the residual left (5e-6 relative) is 0.5, and the derivatives keep no
    digit. (h0 = 1, the fixed point itself, leaves a residual at float32's rounding: the
    bound is then 1e5 · ε = 1.2e-2, measured 1.4e-3 off, and nothing is refused.)"""

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(1 - 1e-5, dtype=torch.float32))

        def forward(self, x, h):
            return self.a * h + x

    deq = DEQ(Linear(), solver="picard", max_iter=10, convergence="best", linear_solver="dense")
    x, h0 = torch.full((2, 1), 1e-5), torch.full((2, 1), 2.0)
    h = deq(x.float(), h0=h0.float())
    with pytest.raises(dh.SingularSystemError, match=r"too ill-conditioned for the fixed point's"):
        h.sum().backward()


def test_threads_share_the_engine():
    """Two threads taking HVPs through their own layers: torch.func's forward-AD levels
    are per process, so the layer's solves take the engine lock."""
    errors, results = [], {}
    torch.manual_seed(0)
    x, cell = torch.randn(2, 70), Tanh(70)
    layers = [DEQ(copy.deepcopy(cell), linear_solver="gmres") for _ in range(4)]

    def work(name):
        try:
            deq = layers[name]
            params = list(deq.parameters())
            g = torch.autograd.grad(deq(x).pow(2).sum(), params, create_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            results[name] = torch.autograd.grad(flat.sum(), params)[0]
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.allclose(results[i], results[0], rtol=1e-10) for i in results)


def test_autograd_forward_ad_is_refused_with_the_supported_alternative():
    import torch.autograd.forward_ad as forward_ad

    deq = DEQ(Tanh())
    x, dx = torch.randn(2, 4), torch.randn(2, 4)
    with forward_ad.dual_level():
        with pytest.raises(dh.UnsupportedDerivativeError, match=r"Use torch\.func\.jvp"):
            deq(forward_ad.make_dual(x, dx))
    assert torch.func.jvp(deq, (x,), (dx,))[1].shape == (2, 4)


class _CountingCell(nn.Module):
    """A cell that counts its calls in a buffer (``self.calls += 1``)."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.register_buffer("calls", torch.zeros(1, dtype=torch.float64))

    def forward(self, x, h):
        self.calls += 1
        return torch.tanh(0.4 * self.lin(h) + x)


def test_a_cell_writing_its_buffer_is_refused_by_name_and_put_back():
    """Before: torch's functorch error ("attempted to call in-place operation ... captured
    Tensor"), naming neither module nor buffer, and the counter left advanced."""
    torch.manual_seed(0)
    cell = _CountingCell().double()
    deq = DEQ(cell, tol=1e-12)
    x = torch.randn(3, 4, dtype=torch.float64)
    before = cell.calls.clone()
    with pytest.raises(dh.InputError, match=r"cell\.calls in place"):
        deq(x).sum().backward()
    assert torch.equal(cell.calls, before)
    model = nn.Sequential(deq, nn.Linear(4, 1)).double()
    data = [(x, torch.zeros(3, 1, dtype=torch.float64))]
    with pytest.raises(dh.InputError, match=r"cell\.calls in place"):
        dh.ModelCurvature(model, nn.MSELoss(), data, progress=False).grad()
    assert torch.equal(cell.calls, before)


def test_a_non_finite_buffer_of_the_cell_is_named_as_the_cell_s_input():
    class Sentinel(Tanh):
        def __init__(self):
            super().__init__()
            self.register_buffer("sentinel", torch.tensor([float("nan")]))

    with pytest.raises(dh.InputError, match=r"cell\.sentinel .*buffer of the cell"):
        DEQ(Sentinel())(torch.randn(2, 4))


def test_a_checkpoint_inside_the_cell_is_named():
    """torch.utils.checkpoint(use_reentrant=False) inside the cell: torch.func (how the
    layer differentiates its cell) refuses its saved-tensor hooks with a bare
    RuntimeError; named, with what to do (the same checkpoint around the layer works)."""
    from torch.utils.checkpoint import checkpoint

    from deqhess.nn import DEQ

    class Checkpointed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def inner(self, x, h):
            return torch.tanh(0.3 * self.lin(h) + x)

        def forward(self, x, h):
            return checkpoint(self.inner, x, h, use_reentrant=False)

    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"saved-tensor hooks.*Remove"):
        DEQ(Checkpointed())(x).sum().backward()
