"""Warnings point at the user's line (``deqhess.callers.user_stacklevel``): attributed to
a frame inside deqhess, Python's default filters hid a ``DeprecationWarning`` (shown only
for ``__main__``) — a deprecated keyword of ``ModelCurvature`` warned from
``models/curvature.py``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import deqhess as dh


def test_a_deprecated_keyword_warns_at_the_callers_line():
    model = nn.Linear(2, 1).double()
    data = [(torch.randn(3, 2), torch.randn(3, 1))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dh.ModelCurvature(model, loss_func=nn.MSELoss(), data=data)
    (warning,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert "loss_func" in str(warning.message)
    assert warning.filename == __file__


def test_a_warning_from_a_nested_call_warns_at_the_callers_line():
    """From ``Equilibrium`` through a ``hessian(split=True)`` deprecation path."""

    def f(x, h, theta):
        return torch.tanh(0.3 * h @ theta["W"].T + x)

    theta = {"W": torch.randn(3, 3)}
    eq = dh.Equilibrium(f, theta, torch.randn(2, 3), batch_dim=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eq.hessian(lambda h, t: (h**2).sum(), split=True)
    (warning,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert warning.filename == __file__
