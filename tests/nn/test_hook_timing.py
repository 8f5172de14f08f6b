"""Which hooks run where is decided at each evaluation of the cell, not once per call.

A hook registered after the forward and before ``backward()``, a global backward hook,
and a layer compiled by ``torch.compile`` after another (hook-free) layer was: in each
case the solver's and the derivatives' evaluations run without the observing hooks, as
plain torch would (a hook registered after a module's forward does not fire in that
forward's backward), and the gradient is the implicit one. The reference gradient is the
same layer's without any hook (itself checked against unrolled autograd by the
derivative grid); the values are the same numbers computed along the same path, so they
agree to rounding (1e-12).
"""

from __future__ import annotations

import pytest
import torch
from problems import relative_error
from torch import nn

from deqhess.nn import DEQ


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, h):
        return torch.tanh(0.4 * self.lin(h) + x)


def _layer(seed: int = 0) -> DEQ:
    torch.manual_seed(seed)
    return DEQ(Cell(), tol=1e-12)


def _grads(deq: DEQ, x: torch.Tensor, run=None) -> list[torch.Tensor]:
    deq.zero_grad(set_to_none=True)
    (deq if run is None else run)(x).pow(2).sum().backward()
    return [p.grad.clone() for p in deq.parameters()]


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _hook(kind: str, module: nn.Module, fired: list) -> None:
    if kind == "forward":
        module.register_forward_hook(lambda m, i, o: fired.append(kind))
    elif kind == "full_backward":
        module.register_full_backward_hook(lambda m, gi, go: fired.append(kind))
    elif kind == "backward_pre":
        module.register_full_backward_pre_hook(lambda m, go: fired.append(kind))
    else:  # a tensor hook on the module's output, curvlinops' KFAC pattern

        def forward_hook(m, i, o):
            o.register_hook(lambda g: fired.append(kind))

        module.register_forward_hook(forward_hook)


KINDS = ["forward", "full_backward", "backward_pre", "tensor"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hook_registered_between_forward_and_backward_is_set_aside(kind):
    """Plain torch: a hook registered after the forward does not run in its backward.
    Before: a full backward hook raised torch's internal setup_context error from the
    layer's backward, a forward hook fired three times in it."""
    want = _grads(_layer(), X)
    deq = _layer()
    h = deq(X)
    fired: list[str] = []
    _hook(kind, deq.cell.lin, fired)
    h.pow(2).sum().backward()
    assert fired == []
    for got, ref in zip((p.grad for p in deq.parameters()), want, strict=True):
        assert relative_error(got, ref) <= 1e-12


@pytest.mark.parametrize("backward", ["full", "pre"])
def test_a_global_backward_hook_sees_the_one_visible_evaluation(backward):
    """A global full backward hook (or pre-hook) fires once per module of the cell, at the
    fixed point, and the gradient is exact. Before: torch's internal setup_context error."""
    want = _grads(_layer(), X)
    deq = _layer()
    seen: list[str] = []
    if backward == "full":
        register = torch.nn.modules.module.register_module_full_backward_hook
        handle = register(lambda m, gi, go: seen.append(type(m).__name__))
    else:
        register = torch.nn.modules.module.register_module_full_backward_pre_hook
        handle = register(lambda m, go: seen.append(type(m).__name__))
    try:
        got = _grads(deq, X.clone().requires_grad_())  # an input with a gradient, as usual
    finally:
        handle.remove()
    assert sorted(seen) == ["Cell", "DEQ", "Linear"]  # the layer itself, its cell, cell.lin
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= 1e-12


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
# TorchDynamo reads .grad of the tensors it wraps and means to hide torch's warning about it
# (torch._dynamo.variables.builder.safe_has_grad); pytest's error filter sees it anyway
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_layers_decide_hooks_per_layer_and_evaluation():
    """The brief's reproduction: compile a hook-free layer first, then layers whose cells
    carry hooks. Before: each hook fired three times per forward and backward (a tensor
    hook too), and a full backward hook raised torch's setup_context error."""
    want = _grads(_layer(), X)
    plain = _layer()
    first = _grads(plain, X, torch.compile(plain, backend="eager"))
    assert all(relative_error(a, b) <= 1e-12 for a, b in zip(first, want, strict=True))
    for kind in KINDS:
        deq = _layer()
        fired: list[str] = []
        _hook(kind, deq.cell.lin, fired)
        got = _grads(deq, X, torch.compile(deq, backend="eager"))
        assert fired == [kind], kind
        for a, b in zip(got, want, strict=True):
            assert relative_error(a, b) <= 1e-12


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
# inductor's own imports use torch.jit.script_method, which torch 2.13 deprecates
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_a_compiled_model_around_the_layer_has_the_eager_derivatives(backend):
    """encoder → DEQ → head compiled: the modules around the layer compile, the layer runs
    eagerly; the gradient and a double-backward gradient penalty are the eager model's
    (the same operations: to rounding)."""

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 6), DEQ(Cell(), tol=1e-12), nn.Linear(6, 2))

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def derivatives(net, run):
        params = list(net.parameters())
        grads = torch.autograd.grad(run(x).pow(2).sum(), params, create_graph=True)
        penalty = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params)
        return [g.detach() for g in grads] + list(penalty)

    eager = model()
    compiled = model()
    want = derivatives(eager, eager)
    got = derivatives(compiled, torch.compile(compiled, backend=backend))
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= 1e-10


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
# TorchDynamo's own notes on the graph breaks it makes around the layer's solve
@pytest.mark.filterwarnings("ignore::UserWarning:torch._dynamo")
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
# TorchDynamo instantiates the autograd.Function it traces, which torch itself deprecates
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_training_step_calling_backward_has_the_eager_gradients(backend):
    """``torch.compile`` of a step that calls ``loss.backward()``: TorchDynamo traced the
    layer's backward, split its legacy-vmap probe by a graph break, refused the step as
    ``is_grads_batched`` and left torch's vmap nesting raised — every later backward in
    the process, plain torch's too, then failed; with ``aot_eager`` (and ``inductor``,
    the default) it failed on the solve's ``torch.func`` products ("Cannot access
    storage of TensorWrapper"): the backward's solve runs eagerly."""
    want = _grads(_layer(), X)
    deq = _layer()

    def step():
        deq.zero_grad()
        deq(X).pow(2).sum().backward()

    torch.compile(step, backend=backend)()
    got = [p.grad for p in deq.parameters()]
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= 1e-12
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    assert level == 1  # nothing left raised: a plain backward works after it
    lin = nn.Linear(3, 1)
    lin(torch.randn(2, 3)).sum().backward()
