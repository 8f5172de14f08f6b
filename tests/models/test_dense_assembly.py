"""Dense forms of a model's curvature: the assembly chosen by cost, blocks sized by the
memory a direction was measured to take, refusals before a run that cannot fit.

References: unrolled float64 autograd of the same model (``models.py``), 1e-9 relative
(the DEQ layer solves to 1e-13 with contraction ≤ 0.4).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from models import Classifier, Reference, unrolled_twin
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.linear import Dense, NeumannGMRES, resolve_linear_solver
from deqhess.models import BatchGraph, dense


def _data(sizes=(3, 4), m=3, k=2):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(sum(sizes), m, generator=g), torch.randn(sum(sizes), k, generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def test_the_ggn_from_output_jacobians_or_products_by_cost():
    """A batch's output of n·C numbers below P gives the GGN from its Jacobian rows; a
    wider output from P product directions — both the unrolled model's GGN."""
    model = Classifier(m=3, n=4, k=2)  # P = 46
    narrow = _data(sizes=(3, 4))  # n·C = 6, 8 < 46
    wide = _data(sizes=(30,), k=2)  # n·C = 60 ≥ 46
    for data, route in ((narrow, "output Jacobians"), (wide, "product directions")):
        curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
        reference = Reference(unrolled_twin(model), nn.MSELoss(), data, curvature.layout.names)
        assert relative_error(curvature.ggn_operator().to_dense(), reference.ggn()) <= 1e-9
        assert route in curvature.info.assembly["ggn"]


class _WithPenalty(nn.Module):
    """``(model(x), 0.1‖head.W‖²)``: a 0-dim output beside the per-sample one."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), 0.1 * self.model.head.weight.pow(2).sum()


def test_the_ggn_of_an_output_with_a_0_dim_penalty_from_output_jacobians():
    """A penalty returned beside the logits enters the loss linearly: its ∇²ℓ is zero, so
    the GGN is the logits' — also from output Jacobians, where the penalty's row is one
    number (a raw IndexError before)."""
    model = Classifier(m=3, n=4, k=2)
    data = _data(sizes=(3, 4))
    mse = nn.MSELoss()
    curvature = dh.ModelCurvature(_WithPenalty(model), lambda o, y: mse(o[0], y) + o[1], data)
    names = [name.removeprefix("model.") for name in curvature.layout.names]
    reference = Reference(unrolled_twin(model), mse, data, names).ggn()
    assert relative_error(curvature.ggn_operator().to_dense(), reference) <= 1e-9
    assert "output Jacobians" in curvature.info.assembly["ggn"]
    with pytest.raises(dh.InputError, match=r"\[\(3, 2\), \(\)\]. Return the per-sample"):
        curvature.output_jacobians()


def test_blocks_are_sized_from_the_measured_memory_of_a_direction():
    """The first block measures what a direction takes; under a tight memory limit the
    next blocks are narrower (more passes) and the products are the same."""
    model = Classifier(m=3, n=4, k=2)
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    block = torch.randn(curvature.num_parameters, 40)
    op = curvature.hessian_operator()
    expected = op @ block[:, :16]  # the first block: measured
    per_direction = curvature._blocks.per_direction
    if per_direction is None:
        pytest.skip("this platform does not let a process read its peak memory")
    assert per_direction > 0
    passes = []
    original = curvature._stream.run
    curvature._stream.run = lambda *a, **k: passes.append(1) or original(*a, **k)
    # room for about 4 directions of the widest batch (4 samples) at a time
    with dh.memory_limit(2 * 4 * 4 * per_direction):
        narrow = op @ block
    assert len(passes) >= 10  # 40 directions, about 4 a pass
    assert relative_error(narrow[:, :16], expected) <= 1e-12
    reference = Reference(unrolled_twin(model), nn.MSELoss(), data, curvature.layout.names)
    assert relative_error(narrow, reference.total() @ block) <= 1e-9


def test_a_dense_form_that_cannot_fit_is_refused_before_it_runs():
    model = Classifier(m=3, n=4, k=2)  # P = 46: the dense sums take 3 · 46² · 8 bytes
    curvature = dh.ModelCurvature(model, nn.MSELoss(), _data())
    passes = []
    original = curvature._stream.run
    curvature._stream.run = lambda *a, **k: passes.append(1) or original(*a, **k)
    with (
        dh.memory_limit(3 * 46 * 46 * 8 - 1),
        pytest.raises(dh.DenseMemoryError, match=r"the dense 'total' matrix, \[P, P\] with P = 46"),
    ):
        curvature.hessian()
    assert not passes
    curvature.hessian_operator() @ torch.randn(46, 2)  # measures a direction
    if curvature._blocks.per_direction is None:
        return
    with (
        dh.memory_limit(3 * 46 * 46 * 8 + 1),
        pytest.raises(
            dh.DenseMemoryError,
            match=r"one direction \(or Jacobian row\) through a batch of \d samples takes",
        ),
    ):
        curvature.hessian()


def test_many_directions_make_the_layers_factorise_their_jacobians():
    """A dense form sends P directions × three solves through each batch's layer: its
    'auto' linear solver factorises I − J per sample wherever forming J (d products)
    costs less than the iterative solves (~90 products a direction) — a training step's
    two solves do not."""
    for width, directions, expected in [(144, 1, NeumannGMRES), (144, 2, Dense),
                                        (144, None, NeumannGMRES), (3000, 10**4, NeumannGMRES),
                                        (32, None, Dense)]:  # fmt: skip
        strategy = resolve_linear_solver(
            "auto", 16, width, torch.float64, few_solves=True, directions=directions
        )
        assert isinstance(strategy, expected), (width, directions)


@pytest.mark.parametrize("order", ["forward", "reversed"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_dense_rows_from_their_parameter_on_give_every_part(monkeypatch, order, chunk_size):
    """A dense form takes each block of rows from its first parameter's column on
    (their upper block triangle, mirrored at the end): every part equals the unrolled
    reference whatever the parameters' order (a late layer first: its rows then reach
    back through the whole model) and however blocks fall (inside a parameter with
    chunk_size=3, or one block per parameter)."""
    monkeypatch.setattr(dense, "ROWS_BEFORE_CUT", 1)  # every parameter a block of its own
    model = Classifier(depth=2)
    data = _data(sizes=(2, 3))
    names = [n for n, _ in model.named_parameters()]
    names = names if order == "forward" else names[::-1]
    reference = Reference(unrolled_twin(model), nn.MSELoss(), data, names)
    curvature = dh.ModelCurvature(
        model, nn.MSELoss(), data, theta=names, split_at="deq0", chunk_size=chunk_size
    )
    loss_part, dynamics_part = reference.split(0)
    expected = {"total": reference.total(), "loss_curvature": loss_part,
                "dynamics_curvature": dynamics_part}  # fmt: skip
    for part, matrix in expected.items():
        got = curvature.hessian_operator(part).to_dense()
        assert relative_error(got, matrix) <= 1e-9, part
        assert torch.equal(got, got.T), part  # mirrored: exactly symmetric


def test_a_block_of_rows_differentiates_in_its_parameters_and_those_after():
    """The Hessian's rows of a parameter and the small one after it that one operation
    takes with it (a layer's bias, a DEQ cell's bias) come from a backward of those
    parameters' gradients alone, into them and the parameters after them: a head's rows
    never reach the DEQ layer's parameters (their block is a short backward)."""
    model = Classifier()
    data = _data(sizes=(3,))
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    names = curvature.layout.names
    calls = []
    original = BatchGraph.upper_rows

    def recording(self, start, stop):
        inner = self.backward

        def backward(outputs, inputs, cotangents):
            calls.append((start, stop, len(outputs), len(inputs)))
            return inner(outputs, inputs, cotangents)

        self.backward = backward
        try:
            return original(self, start, stop)
        finally:
            self.backward = inner

    reference = Reference(unrolled_twin(model), nn.MSELoss(), data, names)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dense, "ROWS_BEFORE_CUT", 1)
        patch.setattr(BatchGraph, "upper_rows", recording)
        patch.setattr(dense, "find_input_sites", lambda *args: [])  # every row by products
        assert relative_error(curvature.hessian(), reference.total()) <= 1e-9
    # encoder.{weight, bias}, deq0.cell.{W, b}, head.{weight, bias}: three runs of two
    ends = torch.tensor(curvature.layout.numels).cumsum(0).tolist()[1::2]
    assert [(a, b) for a, b, _, _ in calls] == list(zip([0, *ends[:-1]], ends, strict=True))
    # the rows of run r: its two gradients alone, differentiated in parameters 2r, 2r+1, …
    assert [(o, i) for _, _, o, i in calls] == [(2, len(names) - 2 * r) for r in range(3)]


def test_a_run_holds_the_parameters_one_operation_takes():
    """Parameters are one run of a dense form's rows where one operation of the graph
    takes them (through a transpose or view): a linear layer's weight and bias, a DEQ
    cell's parameters (its fixed point's arguments); two layers in a row are two runs,
    in the layout's order, whichever it is."""
    model = Classifier(depth=2)
    data = _data(sizes=(3,))
    names = [n for n, _ in model.named_parameters()]
    for order in (names, names[::-1], [names[0], names[2], names[1], *names[3:]]):
        curvature = dh.ModelCurvature(model, nn.MSELoss(), data, theta=order)
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        x, y = data[0]
        graph = BatchGraph(model, nn.MSELoss(), curvature.layout, params, x, y, 1.0, "total")
        owners = [n.rpartition(".")[0] for n in order] + [None]
        runs = [i + 1 for i in range(len(order)) if owners[i] != owners[i + 1]]
        offsets = curvature.layout.offsets
        assert graph.parameter_runs() == [offsets[i] for i in runs], order


def test_small_parameters_share_a_block_and_a_larger_one_starts_its_own():
    """A block ends at the first of the ends it may end at, unless the rows before it
    and those after it up to the next end are both small (small parameters in a row
    share a block; a 4-entry bias before a 1,440-entry head does not drag the head's
    rows back to its column)."""
    ends = list(itertools.accumulate([27, 3, 144, 4, 1440, 10]))
    stops, start = [], 0
    while start < ends[-1]:
        start = dense._block_stop(start, 10_000, ends)
        stops.append(start)
    assert stops == [30, 174, 178, 1618, 1628]
    assert dense._block_stop(0, 20, ends) == 15  # the width first: 30 rows, two blocks
    assert dense._block_stop(40, 100, ends) == 107  # inside one parameter: 134 rows, two


def test_rows_longer_than_a_block_are_split_into_equal_blocks():
    """A run's rows wider than a block go in blocks of equal width (each block costs
    dozens of rows' time besides its rows: no narrow remainder block)."""
    ends = [544, 1600, 1930]
    for width in (16, 100, 256, 1000):
        stops, start = [], 0
        while start < ends[-1]:
            start = dense._block_stop(start, width, ends)
            stops.append(start)
        assert set(ends) <= set(stops)  # no block across a run's end
        widths = [b - a for a, b in itertools.pairwise([0, *stops])]
        assert max(widths) <= width
        for a, b in itertools.pairwise([0, *ends]):  # within a run: equal to one row
            inside = [w for s, w in zip(stops, widths, strict=True) if a < s <= b]
            assert len(inside) == -(-(b - a) // width)
            assert max(inside) - min(inside) <= 1


def test_info_names_the_block_width_and_the_upper_triangle():
    """On the CPU a dense form's blocks are at most dense.CPU_DENSE_BLOCK (512) rows unless
    chunk_size says otherwise; info says so, and that the rows are the upper block
    triangle."""
    assert dense.CPU_DENSE_BLOCK == 512
    for chunk_size, width in ((None, "512"), (7, "7")):
        curvature = dh.ModelCurvature(Classifier(), nn.MSELoss(), _data(), chunk_size=chunk_size)
        curvature.hessian()
        said = curvature.info.assembly["total"]
        assert f"in blocks of at most {width} " in said and "upper block triangle" in said


def test_a_bias_joins_its_weights_block_and_a_large_parameter_keeps_its_own():
    """Blocks may end at each parameter's end, except before a small parameter one
    operation takes with the one before it (a bias after its weight: a few rows more
    in that block instead of a block of its own); a large parameter of the same
    operation (a DEQ cell's second convolution after its first) keeps its own column."""

    class Graph:  # what _block_ends reads of a batch's graph
        def __init__(self, numels, runs):
            self.layout = type("Layout", (), {})()
            self.layout.numels = numels
            self.layout.offsets = tuple(itertools.accumulate([0, *numels]))
            self.runs = runs

        def parameter_runs(self):
            return self.runs

    # a conv cell's six parameters, one operation (its fixed point) takes them all
    cell = Graph((144, 4, 144, 4, 108, 4), [408])
    assert dense._block_ends(cell) == [148, 296, 408]
    # two layers of a weight and a bias each: the biases join, the layers do not
    layers = Graph((12, 4, 16, 4), [16, 36])
    assert dense._block_ends(layers) == [16, 36]
    # a 65-entry "bias" is no small parameter
    wide = Graph((100, 65), [165])
    assert dense._block_ends(wide) == [100, 165]
