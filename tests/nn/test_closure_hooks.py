"""The modules a closure reaches (``get_deq``'s closure form: :mod:`deqhess.nn.closure_hooks`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqhess as dh
from deqhess.nn.closure_hooks import closure_modules, refuse_unreached_hooks


class _Owner:
    def __init__(self):
        self.cell = nn.Linear(2, 2)
        self.unused = nn.Linear(3, 3)  # never named by the closure's code
        self.log = [{"step": i} for i in range(200)]


def test_an_objects_attributes_are_looked_up_by_the_names_the_code_uses():
    owner = _Owner()
    x = torch.zeros(1, 2)
    found, complete = closure_modules(lambda z: owner.cell(z + x))
    assert complete and any(m is owner.cell for m in found)
    assert all(m is not owner.unused for m in found)  # nor is the log walked


def test_a_module_is_reached_with_its_submodules_and_the_budget_is_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Tanh(), nn.Linear(2, 2)))
    found, complete = closure_modules(lambda z: model(z))
    assert complete and {id(m) for m in model.modules()} <= {id(m) for m in found}
    deep = [[[[nn.Linear(1, 1)]]]]
    _, complete = closure_modules(lambda z: deep[0][0][0][0](z), budget=3)
    assert not complete


class _Awkward:
    """A callable whose ``__call__`` and a named attribute raise when looked up (as the
    internals of a compiled function can be): the search ends early, not the forward."""

    @property
    def __call__(self):
        raise RuntimeError("not here")

    @property
    def cell(self):
        raise RuntimeError("nor here")


def test_an_object_the_search_cannot_look_into_ends_it_early():
    awkward = _Awkward()
    found, complete = closure_modules(lambda z: awkward.cell(z))
    assert found == [] and complete  # every failed lookup suppressed, nothing reached


def test_a_hooked_module_the_search_did_not_reach_is_refused_saying_why():
    """The refusal says whether the search could not find the module or ran out of its
    budget (a large object graph around the closure)."""
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda m, i, o: None)
    refuse_unreached_hooks([hooked], [hooked], True)  # reached: nothing to refuse
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"\(Linear\) that deqhess cannot find"):
        refuse_unreached_hooks([hooked], [], True)
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"stopped at its budget of objects"):
        refuse_unreached_hooks([hooked], [], False)
