"""Module hooks on the cell see one evaluation at the fixed point, whose backward carries
the implicit (adjoint) gradient — never the solver's iterations or the derivatives'
products.

The references are closed forms of the tanh cell ``f = tanh(W h + U x + b)``: its
Jacobian ``J = diag(1 − f²) W`` per sample, the adjoint ``λ = (I − J)⁻ᵀ ḡ`` by a dense
solve, and the gradient reaching ``W h + b`` (``lin``'s output) ``(1 − f²) ⊙ λ``. The
fixed point is solved to 1e-13 and the dense solve is exact to rounding, so 1e-10 holds
with margin.
"""

from __future__ import annotations

import pytest
import torch
from problems import relative_error
from torch import nn

from deqhess.nn import DEQ


class Cell(nn.Module):
    def __init__(self, n: int = 5, m: int = 3):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.inj = nn.Linear(m, n, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.n = n

    def forward(self, x, h):
        return torch.tanh(self.lin(h) + self.inj(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.n)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    cell = Cell()
    return cell, DEQ(cell, tol=1e-13), torch.randn(4, 3)


def _adjoint(cell: Cell, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``λ_b = (I − J_bᵀ)⁻¹ ḡ_b`` per sample, ``J_b = diag(1 − f_b²) W`` (``f_b = h_b``)."""
    w = cell.lin.weight.detach()
    eye = torch.eye(h.shape[1], dtype=h.dtype)
    out = []
    for hb, gb in zip(h, g, strict=True):
        jac = (1 - hb**2)[:, None] * w
        out.append(torch.linalg.solve((eye - jac).T, gb))
    return torch.stack(out)


def test_forward_hooks_fire_once_at_the_fixed_point():
    cell, deq, x = _setup()
    seen: list[torch.Tensor] = []
    pre: list[int] = []
    cell.lin.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    cell.register_forward_pre_hook(lambda m, i: pre.append(1))
    h = deq(x)
    assert len(seen) == 1 and len(pre) == 1  # today: once per solver iteration
    assert relative_error(seen[0], h.detach()) <= 1e-12
    (h**2).sum().backward()  # the backward's products evaluate the cell: still unseen
    assert len(seen) == 1 and len(pre) == 1


def test_full_backward_hook_sees_the_adjoint_and_the_gradient_is_exact():
    """Today ``loss.backward()`` crashes here (functorch + BackwardHookFunction)."""
    cell, deq, x = _setup()
    grads_out: list[torch.Tensor] = []
    cell.lin.register_full_backward_hook(lambda m, gi, go: grads_out.append(go[0]))
    h = deq(x)
    g = torch.randn_like(h)
    (h * g).sum().backward()
    assert len(grads_out) == 1
    adjoint = _adjoint(cell, h.detach(), g)
    assert relative_error(grads_out[0], (1 - h.detach() ** 2) * adjoint) <= 1e-10
    # the implicit gradient in W: Σ_b (λ_b ⊙ (1 − h_b²)) h_bᵀ
    expected = ((1 - h.detach() ** 2) * adjoint).T @ h.detach()
    assert relative_error(cell.lin.weight.grad, expected) <= 1e-10


def test_tensor_hook_on_a_submodule_output_registered_in_a_forward_hook():
    """curvlinops' KFAC pattern; today: "cannot register a hook on a tensor that doesn't
    require gradient" (the solver's no-grad iterations)."""
    cell, deq, x = _setup()
    caught: list[torch.Tensor] = []

    def hook(module, inputs, output):
        output.register_hook(caught.append)

    cell.lin.register_forward_hook(hook)
    h = deq(x)
    g = torch.randn_like(h)
    (h * g).sum().backward()
    assert len(caught) == 1
    expected = (1 - h.detach() ** 2) * _adjoint(cell, h.detach(), g)
    assert relative_error(caught[0], expected) <= 1e-10


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_hooks_fire_once_per_backward_even_when_differentiated_twice():
    cell, deq, x = _setup()
    forward_calls, backward_calls = [], []
    cell.lin.register_forward_hook(lambda m, i, o: forward_calls.append(1))
    cell.lin.register_full_backward_hook(lambda m, gi, go: backward_calls.append(1))
    h = deq(x)
    params = list(cell.parameters())
    (h**3).sum().backward(create_graph=True)
    torch.autograd.grad(sum(p.grad.sum() for p in params), params)
    for p in params:
        p.grad = None  # the reference cycle backward(create_graph=True) makes
    assert len(forward_calls) == 1
    # the first backward, and the second through the visible evaluation's input: it is
    # h*, a function of the parameters, as in a plain model whose hooked module's input
    # depends on them (torch fires a full backward hook there in both backwards too)
    assert len(backward_calls) == 2


@pytest.mark.parametrize("where", ["output", "input"])
def test_a_hook_that_changes_an_output_or_input_is_refused_by_name(where):
    """Before: the message blamed dropout or noise ("f is not a deterministic function")."""
    cell, deq, x = _setup()
    if where == "output":
        cell.lin.register_forward_hook(lambda m, i, o: o + 1.0)
    else:
        cell.lin.register_forward_pre_hook(lambda m, i: (i[0] + 1.0,))
    kind = "forward hook" if where == "output" else "forward pre-hook"
    message = rf"a module hook on the DEQ layer's cell changes the map.*cell.lin: {kind}"
    with pytest.raises(ValueError, match=message + ".*Hooks may observe, not alter") as caught:
        deq(x)
    assert "dropout" not in str(caught.value)


@pytest.mark.parametrize("hook", ["altering", "observing"])
@pytest.mark.parametrize("transform", ["grad", "jacrev(jacrev)", "hessian"])
def test_a_hook_that_changes_an_output_is_refused_under_torch_func_too(hook, transform):
    """Under torch.func the residual of the visible evaluation was not checked: the
    gradient came out 22–26% off the hooked model (and 47–99% off the plain one), the
    Hessian 37–41%, silently. Certified on the values below the transforms' wrappers, and
    again where a tangent's solve had certified the map without hooks (``hessian``). An
    observing hook changes nothing: the derivatives are those of the plain layer."""
    cell, deq, x = _setup()
    deq, x = deq.double(), x.double()
    params = {k: v.detach() for k, v in deq.named_parameters()}

    def loss(w):
        return torch.func.functional_call(deq, {**params, "cell.lin.weight": w}, (x,)).sum()

    run = {
        "grad": torch.func.grad,
        "jacrev(jacrev)": lambda f: torch.func.jacrev(torch.func.jacrev(f)),
        "hessian": torch.func.hessian,
    }[transform]
    plain = run(loss)(params["cell.lin.weight"])
    if hook == "observing":
        cell.lin.register_forward_hook(lambda m, i, o: None)
        assert relative_error(run(loss)(params["cell.lin.weight"]), plain) <= 1e-12
        return
    cell.lin.register_forward_hook(lambda m, i, o: 1.5 * o)
    with pytest.raises(ValueError, match="a module hook on the DEQ layer's cell changes the map"):
        run(loss)(params["cell.lin.weight"])


def test_a_pre_hook_that_computes_a_weight_the_map_reads_is_refused():
    """A hand-written weight-norm pre-hook: ``lin.weight = g(lin.weight_orig)``, the
    attribute first set without a graph. The solve and the derivatives' products run
    with observing hooks set aside and read the attribute as a constant: the gradient was
    exact (through the visible evaluation) but a double-backward HVP 19% off. A pre-hook
    that only records (assigns an attribute the map does not read) stays allowed."""
    cell, deq, x = _setup()
    w0 = cell.lin.weight.detach().clone()
    del cell.lin._parameters["weight"]
    cell.lin.register_parameter("weight_orig", nn.Parameter(w0))

    def standardise(m, inputs):
        m.weight = m.weight_orig / (2 * torch.linalg.matrix_norm(m.weight_orig, ord=2))

    cell.lin.register_forward_pre_hook(standardise)
    with torch.no_grad():
        standardise(cell.lin, None)
    with pytest.raises(ValueError, match=r"assigns cell\.lin\.weight, which the cell's map reads"):
        deq(x)

    recording, _, _ = _setup()
    recorded = []

    def record(m, inputs):
        m.last_input = inputs[1].detach() if len(inputs) > 1 else inputs[0].detach()
        recorded.append(m.last_input)

    recording.inj.register_forward_pre_hook(record)
    recording.inj.last_input = torch.zeros(1)
    recorder = DEQ(recording, tol=1e-13)
    recorder(x).pow(2).sum().backward()
    recorder(x)
    assert len(recorded) == 2


def test_a_recording_hook_survives_torch_func_transforms():
    """A pre-hook storing its input on the module: inside ``vmap`` it stores a batched
    tensor that outlives the transform. The check for hooks assigning what the map reads
    had tried to copy it on the next call and failed with torch's "tensor may have
    escaped" error, on every later call, eager ones included."""
    cell, deq, x = _setup()
    deq, x = deq.double(), x.double()
    cell.lin.register_forward_pre_hook(lambda m, i: setattr(m, "last", i[0].detach()))
    params = {k: v.detach() for k, v in deq.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(deq, p, (x,)).sum()

    rows = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
    whole = torch.func.grad(loss)(params, x)
    for k in params:
        assert relative_error(rows[k].sum(0), whole[k]) <= 1e-10
    deq(x).pow(2).sum().backward()  # a plain call after the transforms


def test_a_hook_writing_a_buffer_is_named_and_one_outside_the_cell_records():
    """A forward hook accumulating an activation statistic: in a buffer of the cell it
    had been refused as the cell's own "call counter"; it is named as a hook's write (a
    cell's floating buffers are arguments of the fixed point, kept for its derivatives).
    Kept in a module outside the cell, it records the one visible evaluation."""
    cell, deq, x = _setup()
    cell.register_buffer("seen", torch.zeros(()))

    def inside(m, i, o):
        with torch.no_grad():
            cell.seen.add_(o.pow(2).mean())

    handle = cell.lin.register_forward_hook(inside)
    with pytest.raises(ValueError, match=r"a hook on the DEQ layer's cell writes .*cell\.seen"):
        deq(x)
    assert float(cell.seen) == 0.0  # put back
    handle.remove()
    stats = nn.Module()
    stats.register_buffer("seen", torch.zeros(()))

    def outside(m, i, o):
        stats.seen.add_(o.detach().pow(2).mean())

    cell.lin.register_forward_hook(outside)
    h = deq(x)
    h.pow(2).sum().backward()
    want = nn.functional.linear(h.detach(), cell.lin.weight, cell.lin.bias).pow(2).mean()
    assert torch.allclose(stats.seen, want, rtol=1e-6)  # once: the visible evaluation


def test_a_cell_that_is_not_deterministic_is_not_blamed_on_its_hooks():
    """A cell whose map depends on the grad mode (the solve runs without grad, the visible
    evaluation with it): the cell without hooks does not reproduce its fixed point either,
    so the error is the non-determinism one, with a note."""

    class Moody(Cell):
        def forward(self, x, h):
            return super().forward(x, h) + (0.5 if torch.is_grad_enabled() else 0.0)

    torch.manual_seed(0)
    cell = Moody()
    cell.lin.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ValueError, match="not a deterministic function") as caught:
        DEQ(cell, tol=1e-13)(torch.randn(4, 3))
    assert "the cell itself is not deterministic" in str(caught.value.__notes__)


def test_a_full_backward_hook_returning_a_new_grad_input_is_refused_by_name():
    """Before: silently ignored (the state's gradient goes no further than h*)."""
    cell, deq, x = _setup()
    cell.lin.register_full_backward_hook(lambda m, gi, go: (2 * gi[0],))
    h = deq(x)
    with pytest.raises(
        ValueError, match=r"a backward hook of cell.lin .* returned a new grad_input"
    ):
        h.pow(2).sum().backward()


def test_a_global_backward_hook_returning_a_new_grad_input_is_refused_by_name():
    _, deq, x = _setup()
    register = torch.nn.modules.module.register_module_full_backward_hook
    handle = register(lambda m, gi, go: tuple(None if g is None else 2 * g for g in gi))
    try:
        h = deq(x.requires_grad_())  # an input with a gradient, as for the layer's own hooks
        with pytest.raises(
            ValueError, match=r"a global backward hook .* returned a new grad_input"
        ):
            h.pow(2).sum().backward()
    finally:
        handle.remove()


@pytest.mark.parametrize("how", ["backward_pre_hook", "tensor_hook"])
def test_a_hook_doubling_an_output_gradient_acts_on_the_one_visible_evaluation(how):
    """As on a plain module evaluated once, at its input ``h*``, with output gradient λ:
    doubling the gradient reaching ``lin``'s output doubles what flows back from it —
    ``lin``'s parameters and its input ``h*``. Of the input's ``2 Wᵀu``, ``Wᵀu`` is the
    ``Jᵀλ`` the adjoint already accounts for; the other ``Wᵀu`` reaches ``h*`` as any
    gradient does, through the implicit adjoint ``μ = (I − J)⁻ᵀ Wᵀu``. Closed forms, with
    ``u = (1 − h²) ⊙ λ`` and ``v = (1 − h²) ⊙ μ``: ``∇W = Σ_b (2 u_b + v_b) h_bᵀ``,
    ``∇b = Σ_b (2 u_b + v_b)``, ``∇U = Σ_b (u_b + v_b) x_bᵀ``. (Before the visible
    evaluation ran at ``h*`` itself, the extra ``Wᵀu`` was dropped.)"""
    cell, deq, x = _setup()
    if how == "backward_pre_hook":
        cell.lin.register_full_backward_pre_hook(lambda m, go: (2 * go[0],))
    else:
        cell.lin.register_forward_hook(lambda m, i, o: o.register_hook(lambda g: 2 * g) and None)
    h = deq(x)
    g = torch.randn_like(h)
    (h * g).sum().backward()
    h = h.detach()
    u = (1 - h**2) * _adjoint(cell, h, g)
    v = (1 - h**2) * _adjoint(cell, h, u @ cell.lin.weight.detach())
    assert relative_error(cell.lin.weight.grad, (2 * u + v).T @ h) <= 1e-10
    assert relative_error(cell.lin.bias.grad, (2 * u + v).sum(0)) <= 1e-10
    assert relative_error(cell.inj.weight.grad, (u + v).T @ x) <= 1e-10


def test_a_backward_pre_hook_changing_the_gradient_of_a_recorded_backward_is_refused():
    """Second derivatives could not follow the change: refused, by name."""
    cell, deq, x = _setup()
    cell.lin.register_full_backward_pre_hook(lambda m, go: (2 * go[0],))
    h = deq(x)
    with pytest.raises(
        ValueError, match=r"a backward pre-hook of cell.lin .* while the backward is recorded"
    ):
        torch.autograd.grad(h.pow(2).sum(), list(cell.parameters()), create_graph=True)


def test_hooks_are_restored_after_the_cell_raises():
    cell, deq, _ = _setup()
    handle = cell.lin.register_forward_hook(lambda m, i, o: None)
    registry = cell.lin._forward_hooks
    with pytest.raises(RuntimeError):
        deq(torch.randn(4, 7))  # wrong input width: the cell raises inside the solve
    assert cell.lin._forward_hooks is registry and len(registry) == 1
    handle.remove()
    assert len(cell.lin._forward_hooks) == 0


def test_map_defining_pre_hooks_are_kept_during_the_solve():
    """Legacy ``weight_norm`` computes the weight in a forward pre-hook: it is part of the
    map, so the solve keeps it (with an observer present too) and the fixed point is that
    of the weight-normalised cell."""
    cell, _, x = _setup()
    with pytest.warns(FutureWarning, match="weight_norm"):
        torch.nn.utils.weight_norm(cell.lin)  # the legacy API, a pre-hook, on purpose
    cell.lin.register_forward_hook(lambda m, i, o: None)
    deq = DEQ(cell, tol=1e-13)
    h = deq(x)
    with torch.no_grad():
        residual = cell(x, h) - h
    assert float(residual.abs().max()) <= 1e-12


def test_the_visible_evaluation_runs_outside_autocast_and_inference_mode_works():
    """A forward under torch.autocast is bitwise what it is without (the visible
    evaluation, like the solve, runs in the state's dtype), and so is the backward when
    called outside autocast, as PyTorch asks: autograd then runs the cell's backward — the
    one hooks see — in the dtypes of its forward. Under inference_mode and no_grad the hooks
    fire once and the output is the fixed point."""
    cell, _, x = _setup()
    cell.float()
    x = x.float()
    seen: list[torch.dtype] = []
    cell.lin.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def step(enabled):
        cell.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            h = DEQ(cell)(x)
        h.pow(2).sum().backward()
        return h.detach(), [p.grad.clone() for p in cell.parameters()]

    h, grads = step(False)
    h_amp, grads_amp = step(True)
    assert torch.equal(h_amp, h) and seen == [torch.float32, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(grads_amp, grads, strict=True))
    for context in (torch.inference_mode, torch.no_grad):
        seen.clear()
        with context():
            out = DEQ(cell)(x)
        assert len(seen) == 1 and torch.equal(out, h)


def test_backward_hooks_returning_the_gradients_they_were_given_are_accepted():
    """A backward hook returning its ``grad_input`` unchanged (or a pre-hook its
    ``grad_output``) alters nothing: accepted, the gradients those without the hook (the
    hook returning a value was refused whatever the value)."""
    cell, deq, x = _setup()
    expected = torch.autograd.grad(deq(x).pow(2).sum(), list(cell.parameters()))
    for register in (
        lambda: cell.lin.register_full_backward_hook(lambda m, gi, go: gi),
        lambda: cell.lin.register_full_backward_pre_hook(lambda m, go: go),
    ):
        handle = register()
        got = torch.autograd.grad(deq(x).pow(2).sum(), list(cell.parameters()))
        handle.remove()
        for a, b in zip(got, expected, strict=True):
            assert relative_error(a, b) <= 1e-12
