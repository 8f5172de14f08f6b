"""What a batch's loss makes of its samples' grouping and order (the first pass's checks).

A plain mean (or sum, as the data set's reduction adds the batches) of per-sample losses
is neither; the other one (a mean added by ``reduction="sum"``) weighs samples by their
batch's size; a weighted mean (class weights) or a term over all pairs depends on the
grouping but not the order; a term over consecutive samples, or weights by position, on
both. Each is read from one batch's graph
(the loss, and its gradient at the output, re-evaluated), never from the model again.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqhess.models import BatchGraph
from deqhess.parameters import ParameterLayout
from deqhess.streaming.grouping import LossAtOutput, loss_grouping, loss_orders_samples


def _classifier(k: int = 2) -> nn.Module:
    """A small model: the checks read only its output (a DEQ's changes nothing there)."""
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, k))


def _at_output(graph: BatchGraph) -> LossAtOutput:
    return LossAtOutput(graph.output, graph.target, graph.loss, graph._loss_of, graph.loss_func)


def _consecutive(out, target):
    return nn.functional.cross_entropy(out, target) + 0.1 * (out[1:] - out[:-1]).pow(2).mean()


def _by_position(out, target):
    position = torch.linspace(1.0, 2.0, len(out), dtype=out.dtype)
    return (nn.functional.cross_entropy(out, target, reduction="none") * position).mean()


def _pairs(out, target):
    return nn.functional.cross_entropy(out, target) + 0.1 * (out[:, None] - out[None]).pow(2).mean()


LOSSES = {  # loss: (data set's reduction, grouping, orders)
    "plain mean": (lambda: nn.CrossEntropyLoss(), "mean", "free", False),
    "plain sum": (lambda: nn.CrossEntropyLoss(reduction="sum"), "sum", "free", False),
    "mean, added": (lambda: nn.CrossEntropyLoss(), "sum", "sizes", False),
    "sum, averaged": (lambda: nn.CrossEntropyLoss(reduction="sum"), "mean", "sizes", False),
    "class weights": (
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0])),
        "mean",
        "coupled",
        False,
    ),
    "all pairs": (lambda: _pairs, "mean", "coupled", False),
    "consecutive": (lambda: _consecutive, "mean", "coupled", True),
    "by position": (lambda: _by_position, "mean", "coupled", True),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_grouping_and_order_are_read_from_the_loss(name):
    make, reduction, grouping, orders = LOSSES[name]
    loss = make()
    torch.manual_seed(0)
    model = _classifier(k=2)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    layout = ParameterLayout(params)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    graph = BatchGraph(model, loss, layout, params, x, y, 1.0, None)
    assert loss_grouping(_at_output(graph), 6, reduction) == grouping
    assert loss_orders_samples(_at_output(graph), 6) is orders


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["mean", "sum"])
def test_a_batch_of_one_tells_a_mean_from_a_sum_by_the_sample_twice_over(kind, reduction):
    """On one sample a mean and a sum agree: a first pass of batches of one took any loss
    for free, and a later pass in batches of two was half (or twice) the operator,
    silently. The sample taken twice tells them apart."""
    torch.manual_seed(0)
    model = _classifier(k=2)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    x, y = torch.randn(1, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([1])
    loss = nn.CrossEntropyLoss(reduction=kind)
    graph = BatchGraph(model, loss, ParameterLayout(params), params, x, y, 1.0, None)
    expected = "free" if kind == reduction else "sizes"
    assert loss_grouping(_at_output(graph), 1, reduction) == expected


def test_an_order_blind_loss_near_its_minimum_is_not_taken_for_ordered():
    """Moment matching fitted to 1e-12: the batch mean summed in another order moves the
    loss by rounding far above ``ε·|loss|`` (a loader permuting rows within fixed batches
    was refused as order-dependent); compared at a generic point it is order-blind."""
    torch.manual_seed(0)
    model = _classifier(k=2)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    layout = ParameterLayout(params)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x) + 1e-6 * torch.randn(6, 2, generator=torch.Generator().manual_seed(2))

    def moments(out, target):
        return (out.mean(0) - target.mean(0)).pow(2).sum()

    graph = BatchGraph(model, moments, layout, params, x, y, 1.0, None)
    assert float(graph.loss.detach()) < 1e-11
    assert loss_grouping(_at_output(graph), 6, "mean") == "coupled"
    assert loss_orders_samples(_at_output(graph), 6) is False


def test_a_class_weighted_mean_is_coupled_even_on_a_batch_of_one_class():
    """A batch whose samples are all of one class makes the class-weighted mean the plain
    mean: a first pass of such batches took the loss for a plain mean, and a shuffling
    loader then changed the operator every pass (1.2 relative), silently."""
    torch.manual_seed(0)
    model = _classifier(k=2)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    layout = ParameterLayout(params)
    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.ones(4).long()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0]))
    graph = BatchGraph(model, weighted, layout, params, x, y, 1.0, None)
    assert loss_grouping(_at_output(graph), 4, "mean") == "coupled"
    plain = BatchGraph(model, nn.CrossEntropyLoss(), layout, params, x, y, 1.0, None)
    assert loss_grouping(_at_output(plain), 4, "mean") == "free"


def test_an_order_dependent_loss_that_refuses_the_generic_point_is_checked_at_the_output():
    """Binary cross-entropy weighted by position on a model's probabilities: the output
    moved off [0, 1] makes torch raise, and the check gave up ("not known": a reordering
    loader then changed the operator every pass, 30%); it falls back to the output."""
    torch.manual_seed(0)
    model = nn.Sequential(_classifier(k=2), nn.Sigmoid())
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    layout = ParameterLayout(params)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    y = torch.rand(6, 2, generator=torch.Generator().manual_seed(2))

    def by_position(out, target):
        weights = torch.linspace(1.0, 2.0, len(out), dtype=out.dtype)[:, None]
        return (nn.functional.binary_cross_entropy(out, target, reduction="none") * weights).mean()

    graph = BatchGraph(model, by_position, layout, params, x, y, 1.0, None)
    assert loss_orders_samples(_at_output(graph), 6) is True
    plain = BatchGraph(model, nn.BCELoss(), layout, params, x, y, 1.0, None)
    assert loss_orders_samples(_at_output(plain), 6) is False
