"""A model whose DEQ layer is solved loosely: ``ModelCurvature`` says so, once per pass.

A layer at ``tol=1e-3`` (Picard, float64) leaves its fixed point, and so every
derivative through it, ~1e-3 off. The layer alone stays silent (a training loop would
warn at every step); ``ModelCurvature`` watches its layers' accuracy as
:class:`deqhess.Equilibrium` does, and its pass gives one
:class:`deqhess.AccuracyWarning` whatever the batch count, with the figure
``‖(I − J)⁻¹‖ · r_forward``. Reference: the unrolled twin (``models.py``, exact to
rounding). The gradient's error is of the figure's scale (held within 4×, the factor
:mod:`deqhess.linear.accuracy` documents).
"""

from __future__ import annotations

import re
import warnings

import torch
from models import Classifier, unrolled_twin
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.nn import DEQ


def _model(tol: float) -> Classifier:
    torch.manual_seed(0)
    model = Classifier().double()
    model.deq0 = DEQ(model.deq0.cell, solver="picard", tol=tol, linear_solver="dense")
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    return list(zip(x.split(4), y.split(4), strict=True))


def _accuracy(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, dh.AccuracyWarning)]


def test_a_loose_layer_gives_one_warning_per_pass_with_an_honest_figure():
    model, data = _model(1e-3), _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = curvature.grad()
    (message,) = _accuracy(record)
    assert "ModelCurvature" in message and "3 batches" in message, message
    figure = float(re.search(r"relative error of up to ([0-9.e+-]+)", message)[1])
    assert 1e-6 < figure < 1e-2
    twin = unrolled_twin(model)
    loss = sum(x.shape[0] / 12 * nn.MSELoss()(twin(x), y) for x, y in data)
    want = torch.autograd.grad(loss, list(twin.parameters()))
    worst = max(relative_error(g, w) for g, w in zip(got.values(), want, strict=True))
    assert 1e-9 < worst <= 4 * figure  # really off, and by no more than the figure says
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        curvature.hvp(torch.randn(curvature.num_parameters, dtype=torch.float64))
    assert len(_accuracy(record)) == 1  # the next pass says it again, once


def test_a_tight_layer_is_silent():
    curvature = dh.ModelCurvature(_model(1e-13), nn.MSELoss(), _data())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        curvature.grad()
        curvature.hvp(torch.randn(curvature.num_parameters, dtype=torch.float64))
    assert _accuracy(record) == []
