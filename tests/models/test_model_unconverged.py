"""Samples a model's DEQ layer did not converge on are never analysed as fixed points:
refused with a named error, or left out and counted (``exclude_unconverged=True``),
whatever policy the layer was built with (``"raise"``, or ``"best"`` as for training).

Reference: the same model on the converged samples alone, through an unrolled twin
(60 plain iterations of a cell whose contraction on those samples is ≤ 0.4: exact to
rounding); 1e-9 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
from problems import relative_error
from torch import nn

import deqhess as dh


class GainCell(nn.Module):
    """``tanh(g · W h + U x)`` with ``W`` orthogonal and a per-sample gain ``g = x[:, 0]``:
    samples with ``g = 0.3`` converge in a few Picard steps, those with ``g = 0.995``
    need hundreds."""

    def __init__(self, n=3, m=3):
        super().__init__()
        self.W = nn.Parameter(torch.linalg.qr(torch.randn(n, n))[0])
        self.U = nn.Parameter(0.05 * torch.randn(n, m))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.W.shape[0])

    def forward(self, x, h):
        return torch.tanh(x[:, :1] * (h @ self.W.T) + x @ self.U.T)


class Unrolled(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        h = self.cell.init_state(x)
        for _ in range(60):
            h = self.cell(x, h)
        return h


def _model(convergence):
    torch.manual_seed(0)
    deq = dh.nn.DEQ(GainCell(), solver="picard", max_iter=40, tol=1e-12,
                    linear_solver="dense", convergence=convergence)  # fmt: skip
    return nn.Sequential(deq, nn.Linear(3, 2))


def _data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=g)
    slow = torch.tensor([False, True, False, False, True, False, False, False])
    x[:, 0] = torch.where(slow, torch.tensor(0.995), torch.tensor(0.3))
    y = torch.randn(8, 2, generator=g)
    return x, y, slow


@pytest.mark.parametrize("convergence", ["raise", "best"])
def test_unconverged_samples_are_refused_by_name_or_left_out_and_counted(convergence):
    x, y, slow = _data()
    model = _model(convergence)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    with pytest.raises(
        dh.ConvergenceError, match=r"model.0 left 1 of 4 samples of batch 1 of this pass"
    ):
        dh.ModelCurvature(model, nn.MSELoss(), data).grad()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, exclude_unconverged=True)
    assert curvature.excluded_samples == 2 and curvature.num_samples == 6
    assert curvature.num_batches == 2
    twin = copy.deepcopy(model)
    twin[0] = Unrolled(twin[0].cell)
    kept = [(x[:4][~slow[:4]], y[:4][~slow[:4]]), (x[4:][~slow[4:]], y[4:][~slow[4:]])]
    names = curvature.layout.names
    params = {n: p.detach() for n, p in twin.named_parameters()}
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def objective(f):
        values, offset = {}, 0
        for n in names:
            values[n] = f[offset : offset + params[n].numel()].reshape(params[n].shape)
            offset += params[n].numel()
        return sum(
            len(xb)
            / 6
            * nn.functional.mse_loss(torch.func.functional_call(twin, values, (xb,)), yb)
            for xb, yb in kept
        )

    assert relative_error(curvature.hessian(), torch.func.hessian(objective)(flat)) <= 1e-9
    grad = curvature.layout.flatten(curvature.grad())
    assert relative_error(grad, torch.func.grad(objective)(flat)) <= 1e-9


class First(nn.Module):
    def forward(self, inputs):
        return inputs[0]


def test_excluding_needs_tensor_samples():
    x, y, _ = _data()
    model = nn.Sequential(First(), *_model("best"))
    data = [((x,), y)]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, exclude_unconverged=True,
                                  batch_size_fn=lambda inputs: len(inputs[0]))  # fmt: skip
    with pytest.raises(ValueError, match="exclude_unconverged needs tensor inputs"):
        curvature.grad()


class NoFixedPoint(nn.Module):
    """``h + 1`` where ``x[:, 0] = 1`` (no fixed point: ``I − J`` is exactly singular at
    every iterate), a contraction ``tanh(0.2 W h + x)`` elsewhere."""

    def __init__(self, n=3):
        super().__init__()
        self.W = nn.Parameter(torch.linalg.qr(torch.randn(n, n))[0])

    def init_state(self, x):
        return torch.zeros_like(x)

    def forward(self, x, h):
        a = x[:, :1]
        return (1 - a) * torch.tanh(0.2 * h @ self.W.T + x) + a * (h + 1)


@pytest.mark.parametrize("form", ["hessian", "hvp", "grad"])
def test_an_unconverged_sample_with_a_singular_system_is_refused_or_left_out(form):
    """Samples without a fixed point, whose last iterate has a singular ``I − J``: the
    Hessian and HVPs raised ``SingularSystemError`` "at the fixed point" (the first-order
    graph of the whole batch factorised their block), with ``exclude_unconverged`` too;
    now the same ``ConvergenceError`` as the gradient, or the samples left out — and the
    result that of the converged samples alone."""
    torch.manual_seed(0)
    model = nn.Sequential(
        dh.nn.DEQ(NoFixedPoint(), max_iter=50, linear_solver="dense"), nn.Linear(3, 2)
    )
    g = torch.Generator().manual_seed(3)
    x, y = 0.5 * torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g)
    x[:, 0] = 0.0
    x[[1, 5], 0] = 1.0
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)

    def run(curvature):
        return {"hessian": curvature.hessian, "hvp": lambda: curvature.hvp(v),
                "grad": lambda: curvature.layout.flatten(curvature.grad())}[form]()  # fmt: skip

    with pytest.raises(dh.ConvergenceError, match=r"left 1 of 4 samples of batch 1"):
        run(dh.ModelCurvature(model, nn.MSELoss(), data))
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, exclude_unconverged=True)
    result = run(curvature)
    assert curvature.excluded_samples == 2
    keep = x[:, 0] == 0
    kept = [(x[:4][keep[:4]], y[:4][keep[:4]]), (x[4:][keep[4:]], y[4:][keep[4:]])]
    assert relative_error(result, run(dh.ModelCurvature(model, nn.MSELoss(), kept))) <= 1e-12


class _Pooled(nn.Module):
    """The model run in a worker thread of a pool inside its own forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(self.inner, x).result()


def test_unconverged_samples_of_layers_run_in_a_thread_pool_are_seen():
    """A forward running its DEQ layer in a pool's thread: the pass's records live in its
    own thread's context, so the layer's calls went unrecorded and unconverged samples
    were analysed as fixed points, silently; the pass now registers the model's layers."""
    x, y, _ = _data()
    model = _Pooled(_model("best"))
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    with pytest.raises(dh.ConvergenceError, match=r"left 1 of 4 samples of batch 1"):
        dh.ModelCurvature(model, nn.MSELoss(), data).hessian()
    pooled = dh.ModelCurvature(model, nn.MSELoss(), data, exclude_unconverged=True)
    direct = dh.ModelCurvature(model.inner, nn.MSELoss(), data, exclude_unconverged=True)
    assert relative_error(pooled.hessian(), direct.hessian()) <= 1e-12
    assert pooled.excluded_samples == direct.excluded_samples == 2


class Reversed(nn.Module):
    """Reverses the batch's samples: the layer's sample ``i`` is the batch's ``n − 1 − i``."""

    def forward(self, x):
        return x.flip(0)


def test_a_model_reordering_its_samples_before_the_layer_is_named_when_excluding():
    x, y, _ = _data()
    model = nn.Sequential(Reversed(), *_model("best"))
    curvature = dh.ModelCurvature(model, nn.MSELoss(), [(x[:4], y[:4])], exclude_unconverged=True)
    with pytest.raises(dh.ConvergenceError, match="reorders or mixes") as caught:
        curvature.grad()
    assert "exclude_unconverged" in str(caught.value)
