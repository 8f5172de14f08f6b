"""The data users really pass, through both data-set front ends: every pass must read
the same samples (augmentation, reshuffled subsets and data changed after construction
raise :class:`deqhess.DataChangedError` naming the cause), batch order and grouping do
not matter, and warm starts never move a sample to another fixed point.

References: unrolled float64 autograd of the same model (``models.py``) and cold-start
(``cache_bytes=0``) operators; tolerance 1e-10 relative (the DEQ layers solve to 1e-13
with contraction ≤ 0.4; a warm start changes a product by the solve's accuracy).
"""

from __future__ import annotations

import re

import pytest
import torch
from models import Classifier, Reference, unrolled_twin
from problems import relative_error
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import deqhess as dh
from deqhess.curvature import extreme_eigenpairs


def _tensors(samples=12, m=3, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, m, generator=g), torch.randn(samples, k, generator=g)


class Augmented(Dataset):
    """A data set with a random transform applied on every read (as torchvision's)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def test_augmentation_is_caught_by_every_front_end_and_by_lanczos():
    x, y = _tensors()
    model = Classifier()
    loader = DataLoader(Augmented(x, y), batch_size=4)
    op = dh.ModelCurvature(model, nn.MSELoss(), loader).hessian_operator()
    v = torch.randn(op.shape[0], 2)
    op @ v  # the first pass records what it read
    with pytest.raises(dh.DataChangedError, match=r"every sample differs: a random transform"):
        op @ v
    with pytest.raises(dh.DataChangedError, match="augment once"):
        extreme_eigenpairs(op, k=2, progress=False)

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T)

    theta = {"W": 0.3 * torch.eye(2), "U": torch.ones(2, 3)}
    init = dict(init_state=lambda xb: torch.zeros(len(xb), 2), progress=False)
    data = dh.DatasetEquilibrium(f, theta, loader, lambda h, t: ((h - t) ** 2).mean(), **init)
    with pytest.raises(dh.DataChangedError, match="holds 4 of its 4 samples that the first"):
        data.grad()


def test_a_reshuffled_subset_is_caught_and_a_reshuffled_whole_is_exact():
    """``shuffle=True, drop_last=True`` reads another subset each pass; without
    ``drop_last`` the same samples in other batches: that one is exact."""
    x, y = _tensors(samples=10)
    model = Classifier()
    torch.manual_seed(3)
    dropping = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True)
    op = dh.ModelCurvature(model, nn.MSELoss(), dropping).hessian_operator()
    v = torch.randn(op.shape[0])
    with pytest.raises(dh.DataChangedError, match=r"shuffle=True with drop_last=True"):
        for _ in range(6):  # a different 8 of the 10 samples: caught once one is new
            op @ v
    whole = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    curvature = dh.ModelCurvature(model, nn.MSELoss(), whole)
    twin = Reference(unrolled_twin(model), nn.MSELoss(), [(x, y)], curvature.layout.names)
    expected = twin.total()
    op = curvature.hessian_operator()
    for _ in range(3):
        assert relative_error(op @ v, expected @ v) <= 1e-10


def test_data_changed_after_construction_raises_whatever_the_cache():
    """The issue's case: a list changed after construction gave the old answer when the
    cache held every batch, the new one without a cache."""

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T)

    x, y = _tensors(samples=6)
    theta = {"W": 0.3 * torch.eye(2), "U": torch.ones(2, 3)}
    for cache_bytes in (0, 2**30):
        data = [(x[:3].clone(), y[:3].clone()), (x[3:].clone(), y[3:].clone())]
        eq = dh.DatasetEquilibrium(f, theta, data, lambda h, t: ((h - t) ** 2).mean(),
                                   init_state=lambda xb: torch.zeros(len(xb), 2),
                                   cache_bytes=cache_bytes, progress=False)  # fmt: skip
        eq.grad()
        data[1] = (x[3:] * 2, y[3:])  # a batch replaced
        with pytest.raises(dh.DataChangedError, match="build a new operator"):
            eq.grad()
        data[1] = (x[3:].clone(), y[3:].clone())
        eq.grad()  # the same content again: fine
        data[0][0].mul_(-1)  # a tensor changed in place
        with pytest.raises(dh.DataChangedError, match="never read"):
            eq.hvp(torch.ones(eq.num_parameters))
    model = Classifier()
    data = [(x[:3].clone(), y[:3].clone()), (x[3:].clone(), y[3:].clone())]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    curvature.grad()
    data.pop()
    with pytest.raises(dh.DataChangedError, match="read 3 samples in 1 batches, the first read 6"):
        curvature.grad()


def test_targets_negated_or_augmented_by_sign_are_caught():
    """``y.neg_()`` after the first pass, and a random-sign augmentation of a 2-d target,
    flip an even number of sign bits per sample, which the fingerprint's linear sum
    missed: the next Hessian was 130% off, two ``hvp(v)`` 109% apart, silently."""
    x, y = _tensors(samples=8)
    data = [(x[:4].clone(), y[:4].clone()), (x[4:].clone(), y[4:].clone())]
    curvature = dh.ModelCurvature(Classifier(), nn.MSELoss(), data)
    curvature.grad()
    data[0][1].neg_()
    with pytest.raises(dh.DataChangedError):
        curvature.grad()

    class SignFlipped(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return x[i], y[i] * (1.0 if torch.rand(()) < 0.5 else -1.0)

    torch.manual_seed(3)
    flipped = dh.ModelCurvature(Classifier(), nn.MSELoss(), DataLoader(SignFlipped(), 4))
    v = torch.ones(flipped.num_parameters, dtype=x.dtype)
    with pytest.raises(dh.DataChangedError):
        for _ in range(4):  # a pass whose draws all match the first has chance 2⁻⁸
            flipped.hvp(v)


@pytest.mark.parametrize("loss", ["class weights", "ignore_index", "pairwise", "needs two"])
def test_a_loss_that_depends_on_the_grouping_refuses_a_regrouping_loader(loss):
    """A cross-entropy with class weights or ``ignore_index`` is a weighted mean over the
    batch, so the data set's loss Σ_b (n_b/N)·ℓ_b depends on the grouping: with a
    shuffling loader two ``hvp(v)`` were 54% (14%) apart and two ``hessian()`` 52% (74%),
    silently. Refused on the first regrouped pass; fixed batches stay exact against the
    unrolled twin, and a plain cross-entropy may be regrouped freely."""
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0])
    model = Classifier(k=2)

    def pairwise(out, target):  # a term coupling the samples (0 on one sample)
        pairs = (out[:, None] - out[None]).pow(2).mean()
        return nn.functional.cross_entropy(out, target) + 0.1 * pairs

    def needs_two(out, target):  # raises on a batch of one
        return nn.functional.cross_entropy(out, target) + 0.1 * (out[1] - out[0]).pow(2).sum()

    coupled = {
        "class weights": nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0])),
        "ignore_index": nn.CrossEntropyLoss(ignore_index=1),
        "pairwise": pairwise,
        "needs two": needs_two,
    }[loss]
    torch.manual_seed(2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    curvature = dh.ModelCurvature(model, coupled, loader)
    v = torch.ones(curvature.num_parameters)
    with pytest.raises(dh.DataChangedError, match="depends on the grouping"):
        for _ in range(3):  # a pass that happens to repeat the first grouping is fine
            curvature.hvp(v)
    fixed = [(x[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)]
    first = dh.ModelCurvature(model, coupled, fixed).hvp(v)
    again = dh.ModelCurvature(model, coupled, fixed)
    assert torch.equal(again.hvp(v), first) and torch.equal(again.hvp(v), first)
    plain = dh.ModelCurvature(model, nn.CrossEntropyLoss(), loader)
    assert relative_error(plain.hvp(v), plain.hvp(v)) <= 1e-5  # float32: regrouped sums


@pytest.mark.parametrize("sizes", [(6, 6), (8, 4)])
def test_a_mean_loss_added_by_reduction_sum_regroups_only_into_batches_of_one_size(sizes):
    """``reduction="sum"`` adds the batches' means: a sample weighs ``1/n_b``, so the
    data set's loss is the same under any grouping into batches of one size (refused
    before, with a message blaming class weights) and another operator under batches of
    unequal sizes (refused, naming the reductions)."""
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0])
    model = Classifier(k=2).double()
    loss = nn.CrossEntropyLoss()
    order, shuffled = (
        torch.arange(12),
        torch.randperm(12, generator=torch.Generator().manual_seed(2)),
    )

    class Regrouped:  # the first pass in order, the next ones shuffled
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            index = order if self.passes == 0 else shuffled
            self.passes += 1
            for part in index.split(list(sizes)):
                yield x[part], y[part]

    curvature = dh.ModelCurvature(model, loss, Regrouped(), reduction="sum")
    fixed = [(x[part], y[part]) for part in order.split(list(sizes))]
    names = curvature.layout.names
    v = torch.randn(curvature.num_parameters, dtype=torch.float64)
    reference = Reference(unrolled_twin(model), loss, fixed, names, reduction="sum")
    assert relative_error(curvature.hvp(v), reference.total() @ v) <= 1e-10
    if sizes[0] != sizes[1]:
        with pytest.raises(dh.DataChangedError, match=r"its batch's size .* held \[4, 8\]"):
            curvature.hvp(v)
    else:
        assert relative_error(curvature.hvp(v), reference.total() @ v) <= 1e-10


@pytest.mark.parametrize("loss", ["consecutive", "by position", "class weights", "pairwise"])
def test_a_loss_that_depends_on_the_order_refuses_a_reordering_loader(loss):
    """One batch of all samples, shuffled on every pass: the grouping stays, the order
    moves. A term over consecutive samples or weights by position make each order
    another operator (two hvp(v) were 18% apart, two hessian() 29%, silently): refused;
    a loss coupling the samples but blind to their order (class weights, all pairs)
    stays exact in any order (float64, against the same batch in order)."""
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0])
    model = Classifier(k=2).double()
    position = torch.linspace(1.0, 2.0, 12, dtype=torch.float64)

    def consecutive(out, target):
        return nn.functional.cross_entropy(out, target) + 0.1 * (out[1:] - out[:-1]).pow(2).mean()

    def by_position(out, target):
        losses = nn.functional.cross_entropy(out, target, reduction="none")
        return (losses * position[: len(losses)]).mean()

    def pairwise(out, target):
        pairs = (out[:, None] - out[None]).pow(2).mean()
        return nn.functional.cross_entropy(out, target) + 0.1 * pairs

    chosen = {
        "consecutive": consecutive,
        "by position": by_position,
        "class weights": nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0], dtype=torch.float64)),
        "pairwise": pairwise,
    }[loss]
    torch.manual_seed(3)
    loader = DataLoader(TensorDataset(x, y), batch_size=12, shuffle=True)
    curvature = dh.ModelCurvature(model, chosen, loader)
    v = torch.ones(curvature.num_parameters, dtype=torch.float64)
    if loss in ("consecutive", "by position"):
        with pytest.raises(dh.DataChangedError, match="in another order"):
            for _ in range(3):  # a pass that happens to repeat the first order is fine
                curvature.hvp(v)
        return
    expected = dh.ModelCurvature(model, chosen, [(x, y)]).hvp(v)
    for _ in range(3):
        assert relative_error(curvature.hvp(v), expected) <= 1e-12


def test_inference_mode_data_and_calls_give_the_same_numbers():
    """Data made under ``torch.inference_mode`` (raw "Inference tensors do not track
    version counter"), and calls made inside it (raw "Inference tensors cannot be saved
    for backward"), with a vector made there: the numbers of plain data and calls."""
    x, y = _tensors()
    model = Classifier()
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters, generator=torch.Generator().manual_seed(4))
    expected, hvp = curvature.hessian(), curvature.hvp(v)
    with torch.inference_mode():
        frozen = [(a.clone(), b.clone()) for a, b in data]
        w = v.clone()
        assert relative_error(curvature.hvp(w), hvp) <= 1e-12
        assert relative_error(curvature.hessian(), expected) <= 1e-12
    assert (
        relative_error(dh.ModelCurvature(model, nn.MSELoss(), frozen).hessian(), expected) <= 1e-12
    )
    assert relative_error(dh.ModelCurvature(model, nn.MSELoss(), frozen).hvp(w), hvp) <= 1e-12


def test_data_of_another_dtype_than_the_model_is_named_with_the_remedy():
    """float32 data on a float64 model ended in torch's raw "mat1 and mat2 must have the
    same dtype", naming neither the batch nor what to do."""
    x, y = _tensors()
    curvature = dh.ModelCurvature(Classifier(), nn.MSELoss(), [(x.double(), y), (x.float(), y)])
    with pytest.raises(dh.InputError, match="batch 2 of this pass holds float32") as caught:
        curvature.grad()
    assert "x.to(torch.float64)" in str(caught.value)


def test_a_non_finite_target_is_named_in_the_refusal():
    """An inf in a target made the solves' right-hand sides non-finite: the NonFiniteError
    blamed "the loss or f"; it now names the batch's target too."""
    x, y = _tensors()
    y[3, 1] = float("inf")
    curvature = dh.ModelCurvature(Classifier(), nn.MSELoss(), [(x[:6], y[:6]), (x[6:], y[6:])])
    for call in (curvature.grad, curvature.hessian):
        with pytest.raises(dh.NonFiniteError) as caught:
            call()
        assert "the target of batch 1 holds non-finite values" in " ".join(caught.value.__notes__)


def test_unbatched_samples_are_told_apart_from_a_coupling_cell():
    """``DataLoader(batch_size=None)`` yields single samples (x ``[m]``, a 0-dim target):
    x's features were read as samples and the refusal blamed the DEQ cell for coupling
    them, suggesting ``batch_dim=None``; a note now says what the batches look like."""
    x, _ = _tensors(samples=6)
    y = torch.arange(6) % 2
    loader = DataLoader(TensorDataset(x, y), batch_size=None)
    curvature = dh.ModelCurvature(Classifier(), nn.CrossEntropyLoss(), loader)
    with pytest.raises(ValueError) as caught:
        curvature.grad()
    assert "DataLoader(..., batch_size=None)" in " ".join(getattr(caught.value, "__notes__", []))


class Bistable(nn.Module):
    """``tanh(2h + x)``: three fixed points for ``|x| < 0.53`` (a cold start from zero
    lands on the middle one, ``h ≈ −x``), one for ``|x| = 1`` (``h ≈ ±0.99``); started
    from a ``|x| = 1`` sample's fixed point, a small-``x`` sample lands on an outer one."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))
        self.shift = nn.Parameter(torch.zeros(1))

    def forward(self, x, h):
        return torch.tanh(self.gain * h + x + self.shift)


def test_warm_starts_never_move_a_sample_to_another_fixed_point():
    """A shuffling loader over a bistable cell: warm starts keyed by batch position
    started samples from other samples' fixed points (6–11% off, different each pass);
    keyed by content, every pass equals the cold-start operator."""
    x = torch.tensor([[1.0], [-0.1], [-1.0], [0.1], [0.9], [-0.05]])
    y = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(dh.nn.DEQ(Bistable(), tol=1e-13, linear_solver="dense"))
    cold = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)], cache_bytes=0).hessian()
    torch.manual_seed(0)
    for batch_size in (1, 2):
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
        op = dh.ModelCurvature(model, nn.MSELoss(), loader).hessian_operator()
        for _ in range(4):
            assert relative_error(op.to_dense(), cold) <= 1e-10


def test_empty_batches_in_place_inputs_time_major_data_and_loss_reductions():
    """An empty batch adds nothing (it crashed in the fingerprint); a forward writing
    its input in place is named as such (it was called augmentation); time-major batches
    shuffle freely with batch_dim=1 (they were called changed data); a loss's reduction
    attribute is read ('batchmean' is a mean, 'none' explained)."""
    x, y = _tensors(samples=6)
    model = Classifier()
    exact = dh.ModelCurvature(model, nn.MSELoss(), [(x, y)]).hessian()
    with_empty = [(x[:3], y[:3]), (x[:0], y[:0]), (x[3:], y[3:])]
    assert (
        relative_error(dh.ModelCurvature(model, nn.MSELoss(), with_empty).hessian(), exact) <= 1e-12
    )

    class Halving(nn.Module):
        def forward(self, inputs):
            return inputs.div_(2)

    writer = nn.Sequential(Halving(), Classifier())
    with pytest.raises(
        dh.ModelChangedError, match="wrote to the batch's inputs or targets in place"
    ):
        dh.ModelCurvature(writer, nn.MSELoss(), [(x.clone(), y)]).grad()

    class TimeMajor(nn.Module):  # [T, B, m] → the last step's [B, k]
        def __init__(self):
            super().__init__()
            self.body = Classifier()

        def forward(self, seq):
            return self.body(seq.sum(0))

    seq = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(2))
    time_major = TimeMajor()
    expected = dh.ModelCurvature(time_major, nn.MSELoss(), [(seq, y)], batch_dim=1).hessian()
    orders = (
        [torch.tensor([3, 0, 5]), torch.tensor([1, 4, 2])],
        [torch.tensor([5, 4, 3]), torch.tensor([2, 1, 0])],
    )
    data = [(seq[:, i], y[i]) for i in orders[0]]
    op = dh.ModelCurvature(time_major, nn.MSELoss(), data, batch_dim=1).hessian_operator()
    op.to_dense()
    data[:] = [(seq[:, i], y[i]) for i in orders[1]]  # the same samples, regrouped
    assert relative_error(op.to_dense(), expected) <= 1e-12
    unsplit = dh.ModelCurvature(time_major, nn.MSELoss(), data, batch_size_fn=lambda s: s.shape[1])
    unsplit.grad()
    data[:] = [(seq[:, i], y[i]) for i in orders[0]]
    with pytest.raises(dh.DataChangedError, match=r"could not be told apart.*pass batch_dim="):
        unsplit.grad()

    log_probs = nn.Sequential(Classifier(), nn.LogSoftmax(dim=1))
    target = torch.softmax(y, dim=1)
    kl = dh.ModelCurvature(log_probs, nn.KLDivLoss(reduction="batchmean"), [(x, target)])
    assert kl.reduction == "mean"
    with pytest.raises(dh.InputError, match=r"reduction='none'.*give the loss reduction='mean'"):
        dh.ModelCurvature(model, nn.MSELoss(reduction="none"), [(x, y)])


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_an_analysis_over_a_data_loader_leaves_torchs_random_state_as_it_was(shuffle):
    """A DataLoader draws a base seed from torch's generator on every ``iter()`` (a
    shuffling one its permutation too): the user's state is the same bits after every
    analysis, and the next draw is the one it would have been without it."""
    x, y = _tensors(samples=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=shuffle)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    curvature = dh.ModelCurvature(Classifier(), nn.MSELoss(), loader)
    v = torch.randn(curvature.num_parameters, generator=torch.Generator().manual_seed(0))
    torch.random.set_rng_state(before)  # Classifier() and nothing else drew
    analyses = {
        "grad": curvature.grad,
        "hvp": lambda: curvature.hvp(v),
        "extreme_eigenpairs": lambda: extreme_eigenpairs(curvature.hessian_operator(), k=1),
    }
    for name, analysis in analyses.items():
        analysis()
        assert torch.equal(torch.random.get_rng_state(), before), name
    assert torch.equal(torch.rand(3), expected)


def test_batches_that_are_not_pairs_are_refused_with_what_to_do():
    """Dict batches, 3-tuples and one bare (x, y) pair: each message names what came and
    how to give (x, target) pairs."""
    x, y = _tensors(samples=8)

    def as_dict(samples):
        return {
            "x": torch.stack([s[0] for s in samples]),
            "y": torch.stack([s[1] for s in samples]),
        }

    cases = [
        (DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=as_dict),
         [r"got a dict with keys \['x', 'y'\]", r"\[\(b\['x'\], b\['y'\]\) for b in loader\]",
          "collate_fn"]),
        (DataLoader(TensorDataset(x, y, torch.arange(8)), batch_size=4),
         ["got a list of length 3", r"\[\(b\[0\], b\[1\]\) for b in loader\]", "collate_fn"]),
        ((x, y), [r"one \(x, target\) pair of tensors", r"pass \[\(x, y\)\]"]),
    ]  # fmt: skip
    for data, phrases in cases:
        with pytest.raises(dh.InputError) as caught:
            dh.ModelCurvature(Classifier(), nn.MSELoss(), data).grad()
        for phrase in phrases:
            assert re.search(phrase, str(caught.value)), (phrase, str(caught.value))


def test_a_target_with_another_sample_count_is_refused_before_torch():
    """x of 8 samples and a target of 5 reached torch ("The size of tensor a (8) must
    match …"); now refused naming both counts. Targets laid out otherwise — class
    indices, a target broadcast over the samples — are left to the loss."""
    x, y = _tensors(samples=8)
    with pytest.raises(
        dh.InputError,
        match=r"batch 2: x has 4 samples along batch_dim=0, the target 3 "
        r"\(shapes \(4, 3\) and \(3, 2\)\).*same rows",
    ):
        dh.ModelCurvature(Classifier(), nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[5:])]).grad()
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    dh.ModelCurvature(Classifier(), nn.CrossEntropyLoss(), [(x, labels)]).grad()
    offset = dh.ModelCurvature(Classifier(), lambda out, t: (out - t).square().mean(), [(x, y[:1])])
    offset.grad()  # one target row for every sample


def test_a_sample_count_the_batch_contradicts_is_refused():
    """``batch_size_fn=len`` on a tuple of inputs counts the inputs (2), not the samples:
    the batches were weighed 1/2 each instead of n_b / N (0.18 relative off, silently);
    now refused, as is a count that is not an int. Any other function's count is the
    user's to define (a graph batch's graphs, whose tensors all count points)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.extra = Classifier(), nn.Linear(2, 3)

        def forward(self, x):
            return self.inner(x[0] + self.extra(x[1]))

    x, y = _tensors(samples=13)
    extra = torch.randn(13, 2, generator=torch.Generator().manual_seed(3))
    data = [((x[:5], extra[:5]), y[:5]), ((x[5:], extra[5:]), y[5:])]
    model = Two()
    with pytest.raises(dh.InputError, match=r"=len counts the 2 entries of x \(tuple\), but"):
        dh.ModelCurvature(model, nn.MSELoss(), data, batch_size_fn=len).grad()
    with pytest.raises(dh.InputError, match=r"count is 5.0 \(float\).*non-negative int"):
        dh.ModelCurvature(model, nn.MSELoss(), data, batch_size_fn=lambda x: 5.0).grad()
    right = dh.ModelCurvature(model, nn.MSELoss(), data, batch_size_fn=lambda x: len(x[0]))
    whole = dh.ModelCurvature(model, nn.MSELoss(), [((x, extra), y)], batch_size_fn=lambda x: 13)
    assert relative_error(right.hessian(), whole.hessian()) <= 1e-12


class _WithBatchStatistic(nn.Module):
    """``{"logits": model(x), "spread": the batch's variance of the logits}``."""

    def __init__(self):
        super().__init__()
        self.model = Classifier(k=2)

    def forward(self, x):
        out = self.model(x)
        return {"logits": out, "spread": out.var(0, unbiased=False).sum()}


def test_an_output_without_sample_rows_refuses_a_regrouping_loader():
    """A 0-dim batch statistic returned beside the logits: the check found no sample rows
    and checked nothing, and a regrouping loader alternated between operators 0.33
    apart. Such an output is taken as coupling the samples: regroupings are refused."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    model = _WithBatchStatistic().double()

    def loss(out, target):
        return nn.functional.cross_entropy(out["logits"], target) + out["spread"]

    class Regrouped:  # in order, then shuffled
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            index = torch.arange(8) if self.passes == 0 else torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
            self.passes += 1
            return iter([(x[i], y[i]) for i in index.split(4)])

    curvature = dh.ModelCurvature(model, loss, Regrouped())
    v = torch.ones(curvature.num_parameters, dtype=torch.float64)
    curvature.hvp(v)
    with pytest.raises(dh.DataChangedError, match="without sample rows"):
        curvature.hvp(v)


class _Squeezed(nn.Module):
    """A regression model returning ``[n]`` — and a 0-dim output on a batch of one."""

    def __init__(self):
        super().__init__()
        self.model = Classifier(k=1)

    def forward(self, x):
        return self.model(x).squeeze()


def test_a_squeezed_output_on_a_last_batch_of_one_is_not_taken_for_a_batch_statistic():
    """An output without sample rows couples the samples — but a squeezed output on a
    batch of one is 0-dim too: a shuffling loader with a last batch of one stays free."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randn(10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.manual_seed(2)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)

    def loss(out, target):
        return ((out - target) ** 2).mean()

    curvature = dh.ModelCurvature(_Squeezed().double(), loss, loader)
    fixed = dh.ModelCurvature(_Squeezed().double(), loss, [(x, y)])
    fixed.model.load_state_dict(curvature.model.state_dict())
    v = torch.ones(curvature.num_parameters, dtype=torch.float64)
    for _ in range(3):  # regrouped on every pass: the same operator
        assert relative_error(curvature.hvp(v), fixed.hvp(v)) <= 1e-10
