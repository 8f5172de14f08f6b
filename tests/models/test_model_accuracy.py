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

import pytest
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


class _SlowCell(nn.Module):
    """``tanh(W h + x)``, ``W = 0.97 I``: near ``h = 0`` (small x) ``‖(I − J)⁻¹‖ ≈ 33``,
    saturated (large x) ≈ 1 — one layer, two very different conditionings."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(0.97 * torch.eye(3))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h) + x)


def test_the_pass_warning_quotes_the_worst_batch_and_bounds_the_error():
    """Two batches, one well conditioned, one with ``‖(I − J)⁻¹‖ ≈ 18``: the pass's
    one warning quotes the worse batch's figure (which that batch alone gives), as a
    message and as ``.error_bound``, and the Hessian's measured error is within it (4×,
    as above). Reference: 3000 unrolled iterations (contraction ≤ 0.97: ``0.97³⁰⁰⁰ ≈
    1e-40``), ``torch.func.hessian`` in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), DEQ(_SlowCell(), tol=1e-4), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(1)
    saturated = 3 + torch.rand(4, 3, generator=g, dtype=torch.float64)
    slow = 0.02 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    data = [(x, torch.randn(4, 2, generator=g, dtype=torch.float64)) for x in (saturated, slow)]

    def figures(batches):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = dh.ModelCurvature(model, nn.MSELoss(), batches, progress=False).hessian()
        return got, [w.message for w in record if issubclass(w.category, dh.AccuracyWarning)]

    hessian, (warning,) = figures(data)
    _, (first,) = figures(data[:1])
    _, (second,) = figures(data[1:])
    assert second.error_bound > 10 * first.error_bound  # the second batch is the worse
    assert warning.error_bound == second.error_bound
    assert "the worst:" in str(warning) and f"up to {second.error_bound:.1e}" in str(warning)

    class Unrolled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros_like(x)
            for _ in range(3000):
                h = self.model[1].cell(x, h)
            return self.model[2](h)

    twin, named = Unrolled(), dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(v, [p.numel() for p in named.values()])
        params = {
            f"model.{n}": c.view_as(p) for (n, p), c in zip(named.items(), chunks, strict=True)
        }
        out = [torch.func.functional_call(twin, params, (x,)) for x, _ in data]
        return sum(0.5 * nn.MSELoss()(o, y) for o, (_, y) in zip(out, data, strict=True))

    error = relative_error(hessian, torch.func.hessian(loss)(flat))
    assert 10 * first.error_bound < error <= 4 * warning.error_bound


class _FoldCell(nn.Module):
    """``tanh(W h + x + b) + α (h − r)``: with ``α = 1 − λ_max(J)`` at ``r``, the fixed point
    ``r`` (the layer's own, at ``α = 0``) is a fold — ``I − J`` singular there."""

    def __init__(self, n: int) -> None:
        super().__init__()
        w = torch.randn(n, n, dtype=torch.float64)
        w = w + w.T
        self.W = nn.Parameter(0.4 * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.1 * torch.randn(n, dtype=torch.float64))
        self.alpha, self.r = 0.0, None

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(h @ self.W.T + x + self.b)
        return out if self.r is None else out + self.alpha * (h - self.r)


def test_a_layer_solved_beside_a_fold_is_refused():
    """A cold solve of a layer whose fixed point is a fold stops ~2e-6 from it (residual
    6e-14, ‖(I − J)⁻¹‖ ≈ 4e7): its HVP had come back with a norm of 1.5e20 and an
    AccuracyWarning claiming "a relative error of up to 2.5e-06". I − J changes by more
    than itself along the Newton step (q ≈ 1.2): refused, naming the fold."""
    torch.manual_seed(0)
    cell = _FoldCell(4)
    deq = DEQ(cell, tol=1e-13, linear_solver="dense")
    model = nn.Sequential(nn.Linear(3, 4), deq, nn.Linear(4, 2)).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    with torch.no_grad():
        u = model[0](x)
        cell.r = deq(u).detach()
        jacobian = torch.func.jacrev(lambda h: cell(u, h))(cell.r)[0, :, 0, :]
        cell.alpha = float(1.0 - torch.linalg.eigvals(jacobian).real.max())
    curvature = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)], progress=False)
    v = torch.randn(curvature.num_parameters, dtype=torch.float64)
    with pytest.raises(dh.SingularSystemError, match=r"along the Newton step.*near a fold"):
        curvature.hvp(v)
