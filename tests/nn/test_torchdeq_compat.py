"""``deqhess.nn.get_deq``: torchdeq's entry point — same signatures, same statistics,
exact first derivatives of a closure's fixed point.

References: autograd through 60 unrolled steps of the cell (contraction 0.4, exact to
rounding); the fixed point and the adjoint solved to 1e-12 relative, so 1e-9 holds.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import weakref

import numpy as np
import pytest
import torch
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.nn import get_deq

EXACT = {"f_solver": "anderson", "f_max_iter": 200, "f_tol": 1e-12, "f_stop_mode": "rel",
         "b_tol": 1e-12, "b_stop_mode": "rel", "b_max_iter": 200}  # fmt: skip


class Cell(nn.Module):
    """torchdeq style: ``f(z, x)``."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def _grads(cell, x, z):
    loss = z.sin().sum()
    return torch.autograd.grad(loss, [*cell.parameters(), x])


def test_first_derivatives_of_the_closure_are_exact():
    cell, x = Cell(), torch.randn(4, 6, requires_grad=True)
    z_out, info = get_deq(**EXACT)(lambda z: cell(z, x), torch.zeros(4, 6))
    got = _grads(cell, x, z_out[-1])
    z = torch.zeros(4, 6)
    for _ in range(60):
        z = cell(z, x)
    for a, b in zip(got, _grads(cell, x, z), strict=True):
        assert relative_error(a, b) <= 1e-9
    assert info["linear_solves"].solves == 1 and info["linear_solves"].unconverged == 0
    assert bool(info["converged"].all())


def test_a_second_derivative_is_refused():
    cell, x = Cell(), torch.randn(4, 6, requires_grad=True)
    z_out, _ = get_deq(**EXACT)(lambda z: cell(z, x), torch.zeros(4, 6))
    with pytest.raises(dh.UnsupportedDerivativeError, match="DEQ\\(StateFirst\\(cell\\)\\)"):
        torch.autograd.grad(z_out[0].sum(), x, create_graph=True)


def _hook_records(forward, cell):
    """What a forward hook and a full backward hook on ``cell.lin`` see in one forward
    and backward of ``forward(x)`` (the ecosystem's way of reading a model)."""
    seen = {"inputs": [], "grads": []}
    handles = [
        cell.lin.register_forward_hook(lambda m, i, o: seen["inputs"].append(i[0].detach())),
        cell.lin.register_full_backward_hook(
            lambda m, gi, go: seen["grads"].append(go[0].detach())
        ),
    ]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    forward(x).sin().sum().backward()
    for handle in handles:
        handle.remove()
    return seen


def test_hooks_of_the_closures_modules_see_one_evaluation_at_the_fixed_point():
    """Module hooks on the cell a closure calls: they saw every solver iteration and every
    adjoint product (laplace-torch's ASDL diagonal GGN 74% off, the cell's entries 760%,
    silently); now, as through ``deqhess.nn.DEQ(StateFirst(cell))``, one forward at z*
    and one backward carrying the adjoint — the same records as the layer's."""
    from deqhess.nn import DEQ, StateFirst

    cell = Cell().double()
    deq = get_deq(**EXACT)
    closure = lambda x: deq(lambda z: cell(z, x), torch.zeros_like(x))[0][-1]  # noqa: E731
    layer = DEQ(StateFirst(cell), tol=1e-12)
    got, expected = _hook_records(closure, cell), _hook_records(layer, cell)
    assert len(got["inputs"]) == len(got["grads"]) == 1
    assert len(expected["inputs"]) == len(expected["grads"]) == 1
    for key in ("inputs", "grads"):
        assert relative_error(got[key][0], expected[key][0]) <= 1e-9


def test_hooks_on_modules_the_closure_does_not_hold_are_refused():
    """A closure calling a module deqhess does not find from it (in a list wider than the
    search looks into): its hooks would see every iteration — refused by name. Modules
    reached through globals, containers, objects' attributes and nested closures are
    found (below)."""
    cell = Cell()
    shelf = [None] * 300 + [cell]
    handle = cell.lin.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(4, 6)
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"modules with hooks \(Linear\)"):
        get_deq(**EXACT)(lambda z: shelf[-1](z, x), torch.zeros(4, 6))
    handle.remove()
    get_deq(**EXACT)(lambda z: shelf[-1](z, x), torch.zeros(4, 6))  # no hook: nothing to refuse


class _Holder:
    def __init__(self, cell):
        self.cells = {"main": [cell]}

    def step(self, z, x):
        return self.cells["main"][0](z, x)


@pytest.mark.parametrize(
    "how",
    ["global", "container", "object", "nested", "class attribute", "weakref", "quoted", "trainer"],
)
def test_a_hooked_module_the_closure_reaches_is_found(how):
    """However the closure reaches the cell — a module global, a dict of lists, a plain
    object's bound method, closures in closures — its hooks see one evaluation at z*."""
    global _GLOBAL_CELL
    cell = Cell()
    _GLOBAL_CELL = cell
    calls = []
    handle = cell.lin.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(4, 6)
    holder = _Holder(cell)
    inner = lambda z: cell(z, x)  # noqa: E731
    closure = {
        "global": lambda z: _GLOBAL_CELL(z, x),
        "container": lambda z: holder.cells["main"][0](z, x),
        "object": functools.partial(holder.step, x=x),
        "nested": lambda z: (lambda w: (lambda v: inner(v))(w))(z),
        "class attribute": lambda z: _Registry.cell(z, x),
        "weakref": functools.partial(_through_weakref, weakref.ref(cell), x=x),
        "quoted": lambda z: globals()["_GLOBAL_CELL"](z, x),
        "trainer": _Trainer(cell).closure(x),
    }[how]
    _Registry.cell = cell
    get_deq(**EXACT)(closure, torch.zeros(4, 6))
    handle.remove()
    assert len(calls) == 1


def test_a_hook_that_alters_the_closure_is_refused():
    """A forward hook returning another output makes the visible evaluation another map
    than the one solved (with the hooks set aside): refused, naming the hook (it was
    z* 18% off, silently, once the solve set hooks aside)."""
    cell = Cell()
    cell.lin.register_forward_hook(lambda m, i, o: 0.5 * o + 0.1)
    x = torch.randn(4, 6, requires_grad=True)
    for grad in (True, False):
        with (
            torch.set_grad_enabled(grad),
            pytest.raises(dh.InputError, match=r"changes what it computes.*Linear: forward hook"),
        ):
            get_deq(**EXACT)(lambda z: cell(z, x), torch.zeros(4, 6))


_GLOBAL_CELL: Cell | None = None


class _Trainer:
    """A plain object with a long log before its cell: the search looks up the names the
    closure's code uses (``self.cell``), not every attribute (it gave up in the log and
    refused the cell as out of reach)."""

    def __init__(self, cell):
        self.log = [{"loss": np.float32(i), "parts": [np.float32(i)] * 10} for i in range(250)]
        self.cell = cell

    def closure(self, x):
        return lambda z: self.cell(z, x)


class _Registry:
    cell: Cell | None = None


def _through_weakref(ref, z, x):
    return ref()(z, x)


def test_list_states_and_argparse_configs():
    """An MDEQ-style list state, and a training script's whole namespace as ``args``."""
    cell = Cell(n=5)
    x = torch.randn(3, 5)
    args = argparse.Namespace(lr=0.1, epochs=3, **EXACT)  # lr, epochs: not torchdeq's

    def f(state):
        a, b = state
        return [cell(b, x), 0.5 * torch.tanh(a)]

    with torch.no_grad():
        z_out, info = get_deq(args)(f, [torch.zeros(3, 5), torch.zeros(3, 5)])
        a, b = z_out[0]
        assert relative_error(torch.stack(f([a, b])), torch.stack([a, b])) <= 1e-11
    assert info["abs_lowest"].shape == (3,)


def test_training_defaults_carry_on_and_mark():
    """torchdeq's defaults (40 steps, 1e-3 absolute) under the training preset: a sample or
    an adjoint solve that misses is marked, and the step is not lost."""
    cell, x = Cell(), torch.randn(4, 6, requires_grad=True)
    deq = get_deq(f_max_iter=2, f_tol=1e-12, b_max_iter=1, b_tol=1e-14)
    z_out, info = deq(lambda z: cell(z, x), torch.zeros(4, 6))
    z_out[-1].sum().backward()
    assert not bool(info["converged"].any())
    assert info["linear_solves"].unconverged == 1
    strict = get_deq(f_max_iter=2, f_tol=1e-12, convergence="raise")
    with pytest.raises(dh.ConvergenceError):
        strict(lambda z: cell(z, x), torch.zeros(4, 6))


def test_options_without_a_counterpart_are_refused():
    with pytest.raises(ValueError, match="unknown options \\['f_tolerance'\\]"):
        get_deq(f_tolerance=1e-3)
    with pytest.raises(ValueError, match="trajectory supervision"):
        get_deq(n_states=2)
    with pytest.raises(ValueError, match="unknown f_solver 'newton'"):
        get_deq(f_solver="newton")


torchdeq = pytest.importorskip("torchdeq")


def test_signatures_and_statistics_are_torchdeqs():
    ours, theirs = get_deq(), torchdeq.get_deq()
    assert list(inspect.signature(get_deq).parameters) == list(
        inspect.signature(torchdeq.get_deq).parameters
    )
    # DEQIndexing's names; the sliced core (get_deq's default) calls the state z_star,
    # which is accepted as a keyword too
    assert (
        list(inspect.signature(ours.forward).parameters)
        == list(inspect.signature(torchdeq.core.DEQIndexing.forward).parameters)[1:]
    )
    assert "z_star" in inspect.signature(theirs.forward).parameters
    cell, x = Cell(), torch.randn(4, 6)
    with torch.no_grad():
        by_keyword, _ = get_deq(**EXACT)(lambda z: cell(z, x), z_star=torch.zeros(4, 6))
    options = {**EXACT, "ift": True}
    mine = get_deq(**options)(lambda z: cell(z, x), torch.zeros(4, 6))
    reference = torchdeq.get_deq(**options)(lambda z: cell(z, x), torch.zeros(4, 6))
    assert len(mine[0]) == len(reference[0]) == 1
    assert set(reference[1]) <= set(mine[1])
    for key, value in reference[1].items():
        if key not in ("abs_trace", "rel_trace"):  # [B, steps]; ours keeps [B, 1]
            assert mine[1][key].shape == value.shape, key
    assert relative_error(mine[0][0].detach(), reference[0][0].detach()) <= 1e-10
    assert relative_error(by_keyword[0], mine[0][0].detach()) <= 1e-12


def test_spectral_radius_and_backward_writer():
    """``sradius_mode`` (eval) estimates ``|λ_max(J)|`` per sample by the power method,
    as torchdeq does: against the eigenvalues of ``J`` by ``torch.func.jacrev``; the
    ``backward_writer`` receives the adjoint solve's statistics."""
    cell, x = Cell(), torch.randn(3, 6)
    deq = get_deq(**EXACT).eval()
    with torch.no_grad():
        z_out, info = deq(lambda z: cell(z, x), torch.zeros(3, 6), sradius_mode=True)
    for zn, xn, radius in zip(z_out[0], x, info["sradius"], strict=True):
        jac = torch.func.jacrev(lambda s, xn=xn: cell(s[None], xn[None])[0])(zn)
        expected = torch.linalg.eigvals(jac.detach()).abs().max()
        assert abs(float(radius) - float(expected)) <= 0.01 * float(expected)
    written = []
    deq.train()
    xg = x.clone().requires_grad_()
    z_out, _ = get_deq(**EXACT)(
        lambda z: cell(z, xg), torch.zeros(3, 6), backward_writer=written.append
    )
    z_out[0].sum().backward()
    assert len(written) == 1 and float(written[0]["rel_lowest"][0]) <= 1e-12


def test_a_backward_hook_that_alters_a_gradient_of_the_closure_is_refused():
    """A backward pre-hook doubling the gradient at the cell's Linear: the closure's
    visible evaluation takes z* as a detached input, so the doubled part flowing back
    through z* was lost (the gradient exactly 2x the plain one, where the chain rule —
    which deqhess.nn.DEQ follows — adds the path through z*): refused, by name."""
    cell = Cell()
    cell.lin.register_full_backward_pre_hook(lambda m, go: (2 * go[0],))
    x = torch.randn(4, 6, requires_grad=True)
    z_out, _ = get_deq(**EXACT)(lambda z: cell(z, x), torch.zeros(4, 6))
    with pytest.raises(dh.InputError, match=r"returned a new grad_output in get_deq's closure"):
        z_out[-1].sum().backward()


def test_hooks_see_no_recompute_of_a_checkpoint_in_the_adjoints_products():
    """A non-reentrant checkpoint inside the closure recomputes the cell in the backward
    of every adjoint product: those ran with the hooks back in place (a recording forward
    hook fired 18 times); now the hooks see the forward at z* and its one recompute in
    the visible evaluation's backward, the fixed point unchanged."""
    from torch.utils.checkpoint import checkpoint

    cell, calls = Cell(), []
    cell.lin.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(4, 6, requires_grad=True)
    closure = lambda z: checkpoint(cell, z, x, use_reentrant=False)  # noqa: E731
    z_out, _ = get_deq(**EXACT)(closure, torch.zeros(4, 6))
    z_out[-1].sin().sum().backward()
    assert len(calls) == 2
    expected = get_deq(**EXACT)(lambda z: cell(z, x), torch.zeros(4, 6))[0][-1]
    assert relative_error(z_out[-1].detach(), expected.detach()) <= 1e-12
