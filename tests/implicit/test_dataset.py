"""Data-set sums equal one equilibrium on the concatenated data (per-sample independence)."""

from __future__ import annotations

import pytest
import torch
from problems import CASE_NAMES, case, relative_error

import deqhess as dh
from deqhess.parameters import ParameterLayout


def _data(seed=0, n=5, m=3, samples=11):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g)
    theta = {
        "W": 0.45 * w / torch.linalg.matrix_norm(w, ord=2),
        "U": torch.randn(n, m, generator=g),
        "b": 0.1 * torch.randn(n, generator=g),
    }
    x = torch.randn(samples, m, generator=g)
    y = torch.randn(samples, n, generator=g)

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    return f, theta, x, y


def _batches(x, y, sizes):
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def _mean_loss(h, y):
    return ((h - y) ** 2).sum(dim=1).mean() + torch.log(torch.cosh(h)).sum(dim=1).mean()


def _sum_loss_theta(h, theta, y):
    return ((h @ theta["W"] - y) ** 2).sum() + 0.01 * theta["U"].pow(2).sum() * h.shape[0]


OPTS = dict(tol=1e-14, atol=1e-15, progress=False)


@pytest.mark.parametrize("linear", ["dense", "gmres"])
def test_mean_over_uneven_batches_equals_concatenated(linear):
    f, theta, x, y = _data()
    data = dh.DatasetEquilibrium(
        f, theta, _batches(x, y, [4, 2, 5]), _mean_loss,
        init_state=lambda xb: torch.zeros(xb.shape[0], 5), linear_solver=linear, **OPTS,
    )  # fmt: skip
    assert data.num_samples == 11 and data.num_batches == 3
    whole = dh.Equilibrium(f, theta, x, torch.zeros(11, 5), batch_dim=0, tol=1e-14, atol=1e-15)

    def loss(h):
        return _mean_loss(h, y)

    layout = ParameterLayout(theta)
    assert relative_error(layout.flatten(data.grad()), layout.flatten(whole.grad(loss))) <= 1e-12
    dense = whole.hessian(loss)
    assert relative_error(data.hessian(), dense) <= 1e-10
    v = torch.randn(layout.size)
    assert relative_error(data.hvp(v), dense @ v) <= 1e-10
    block = torch.randn(layout.size, 3)
    assert relative_error(data.hessian_operator() @ block, dense @ block) <= 1e-10
    split = data.hessian_split()
    assert relative_error(split.total, dense) <= 1e-10
    whole_split = whole.hessian_split(loss)
    assert relative_error(split.loss_curvature, whole_split.loss_curvature) <= 1e-10
    ggn = data.hessian_operator("loss_curvature").to_dense()
    assert relative_error(ggn, whole_split.loss_curvature) <= 1e-10


def test_sum_reduction_with_theta_in_loss():
    f, theta, x, y = _data(seed=3, samples=7)
    data = dh.DatasetEquilibrium(
        f, theta, _batches(x, y, [3, 3, 1]), _sum_loss_theta, reduction="sum",
        init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS,
    )  # fmt: skip
    whole = dh.Equilibrium(f, theta, x, torch.zeros(7, 5), batch_dim=0, tol=1e-14, atol=1e-15)
    dense = whole.hessian(lambda h, t: _sum_loss_theta(h, t, y))
    assert relative_error(data.hessian(), dense) <= 1e-10
    structured = data.hvp({k: torch.ones_like(t) for k, t in theta.items()})
    flat = ParameterLayout(theta).flatten(structured)
    assert relative_error(flat, dense @ torch.ones(dense.shape[0])) <= 1e-10


def test_data_set_errors():
    f, theta, x, y = _data()
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5))
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        dh.DatasetEquilibrium(f, theta, _batches(x, y, [11]), _mean_loss, reduction="max")
    with pytest.raises(ValueError, match=r"loss\(h, target\) or loss\(h, theta, target\)"):
        dh.DatasetEquilibrium(f, theta, _batches(x, y, [11]), lambda h: h.sum(), **init)
    with pytest.raises(ValueError, match=r"\(x, target\) pair; got a Tensor of shape \(11, 3\)"):
        dh.DatasetEquilibrium(f, theta, [x], _mean_loss, **init)
    with pytest.raises(ValueError, match="data is empty"):
        dh.DatasetEquilibrium(f, theta, [], _mean_loss, **init)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_family_as_a_data_set_of_two_inputs(name):
    """A data set of two inputs (x and x/2) for each family: the sum-reduced data-set
    Hessian is the sum of the two single-equilibrium Hessians (and so is its GGN)."""
    c = case(name)
    xs = [c.x, 0.5 * c.x]
    data = dh.DatasetEquilibrium(
        c.f, c.theta, [(x, None) for x in xs], lambda h, theta, y: c.loss_theta(h, theta),
        init_state=lambda x: c.h0, reduction="sum", batch_dim=c.batch_dim, **OPTS,
    )  # fmt: skip
    singles = [
        dh.Equilibrium(c.f, c.theta, x, c.h0, batch_dim=c.batch_dim, tol=1e-14, atol=1e-15)
        for x in xs
    ]
    expected = sum(eq.hessian(c.loss_theta) for eq in singles)
    assert relative_error(data.hessian(), expected) <= 1e-12
    block = torch.randn(expected.shape[0], 3)
    assert relative_error(data.hessian_operator() @ block, expected @ block) <= 1e-12
    ggn = sum(eq.hessian_split(c.loss_theta).loss_curvature for eq in singles)
    assert relative_error(data.hessian_operator("loss_curvature").to_dense(), ggn) <= 1e-12


def test_torch_data_loader_with_progress_bar():
    f, theta, x, y = _data(samples=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    data = dh.DatasetEquilibrium(
        f, theta, loader, _mean_loss, init_state=lambda xb: torch.zeros(xb.shape[0], 5),
        progress=True, tol=1e-14, atol=1e-15,
    )  # fmt: skip
    assert [len(info.sample_iterations) for info in data.batch_infos] == [4, 4, 2]
    whole = dh.Equilibrium(f, theta, x, torch.zeros(10, 5), batch_dim=0, tol=1e-14, atol=1e-15)
    assert relative_error(data.hessian(), whole.hessian(lambda h: _mean_loss(h, y))) <= 1e-10


def _whole(f, theta, x, y):
    whole = dh.Equilibrium(f, theta, x, torch.zeros(len(x), 5), batch_dim=0, tol=1e-14, atol=1e-15)
    return whole, (lambda h: _mean_loss(h, y))


@pytest.mark.parametrize("cache", ["all", "part", "none"])
def test_streaming_and_partial_cache_equal_the_concatenated_data(cache):
    """Whatever the cache holds, every pass sums the same batches: gradient, products,
    dense Hessian and split equal one equilibrium on the concatenated data (≤ 1e-10,
    the tolerance of the other data-set tests: solves to 1e-14 amplified by cond ≈ 2)."""
    f, theta, x, y = _data(samples=12)
    batches = _batches(x, y, [3, 3, 3, 3])
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS)
    full = dh.DatasetEquilibrium(f, theta, batches, _mean_loss, **init)
    assert full.cached_batches == 4 and full.cached_bytes > 0
    budget = {"all": full.cached_bytes, "part": full.cached_bytes // 2, "none": 0}[cache]
    data = dh.DatasetEquilibrium(f, theta, batches, _mean_loss, cache_bytes=budget, **init)
    assert data.cached_batches == {"all": 4, "part": 2, "none": 0}[cache]
    whole, loss = _whole(f, theta, x, y)
    layout = ParameterLayout(theta)
    assert relative_error(layout.flatten(data.grad()), layout.flatten(whole.grad(loss))) <= 1e-12
    dense = whole.hessian_split(loss)
    block = torch.randn(layout.size, 3)
    assert relative_error(data.hessian_operator() @ block, dense.total @ block) <= 1e-10
    ggn = data.hessian_operator("loss_curvature") @ block
    assert relative_error(ggn, dense.loss_curvature @ block) <= 1e-10
    split = data.hessian_split()
    assert relative_error(split.dynamics_curvature, dense.dynamics_curvature) <= 1e-10
    assert relative_error(data.hessian(), dense.total) <= 1e-10


def test_streamed_batches_are_freed_before_the_next_is_solved(monkeypatch):
    """Memory does not grow with the number of batches: with no cache, every batch's
    equilibrium is gone (no reference cycle, gc off) once the pass moves on."""
    import gc
    import weakref

    f, theta, x, y = _data(samples=12)
    data = dh.DatasetEquilibrium(
        f, theta, _batches(x, y, [3, 3, 3, 3]), _mean_loss, cache_bytes=0,
        init_state=lambda xb: torch.zeros(xb.shape[0], 5), linear_solver="gmres", **OPTS,
    )  # fmt: skip
    alive: list[weakref.ref] = []
    solve = data._solve

    def tracked(*args, **kwargs):
        assert sum(r() is not None for r in alive) == 0  # the previous batch is gone
        eq = solve(*args, **kwargs)
        alive.append(weakref.ref(eq))
        return eq

    monkeypatch.setattr(data, "_solve", tracked)
    gc.disable()
    try:
        data.hessian_operator() @ torch.randn(data.num_parameters, 2)
        data.grad()
    finally:
        gc.enable()
    assert len(alive) == 8 and all(r() is None for r in alive)


def test_shuffled_loader_with_workers_streams_the_same_sums():
    """A DataLoader that reshuffles on every pass, with worker processes: each pass
    sums other batches of the same samples, so the results equal the concatenated
    data's (≤ 1e-10 as above; a per-sample loss makes the grouping irrelevant)."""
    f, theta, x, y = _data(samples=10)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2)
    data = dh.DatasetEquilibrium(
        f, theta, loader, _mean_loss, init_state=lambda xb: torch.zeros(xb.shape[0], 5),
        cache_bytes=0, **OPTS,
    )  # fmt: skip
    whole, loss = _whole(f, theta, x, y)
    dense = whole.hessian(loss)
    block = torch.randn(dense.shape[0], 2)
    assert relative_error(data.hessian_operator() @ block, dense @ block) <= 1e-10
    assert relative_error(data.hessian(), dense) <= 1e-10


def test_a_shuffled_loader_never_reuses_another_batch_s_solve():
    """A partial cache is keyed by position but used only for an equal batch: with a
    reshuffling loader the products still equal the concatenated data's."""
    f, theta, x, y = _data(samples=12)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=3, shuffle=True
    )
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS)
    full = dh.DatasetEquilibrium(f, theta, loader, _mean_loss, **init)
    data = dh.DatasetEquilibrium(
        f, theta, loader, _mean_loss, cache_bytes=full.cached_bytes // 2, **init
    )
    assert 0 < data.cached_batches < 4
    whole, loss = _whole(f, theta, x, y)
    v = torch.randn(data.num_parameters)
    assert relative_error(data.hvp(v), whole.hvp(loss, v)) <= 1e-10


def test_one_shot_iterators_and_changing_data():
    f, theta, x, y = _data(samples=6)
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS)
    batches = _batches(x, y, [3, 3])
    with pytest.raises(ValueError, match=r"one-shot iterator \(generator\).*holds only 0 of 2"):
        dh.DatasetEquilibrium(f, theta, (b for b in batches), _mean_loss, cache_bytes=0, **init)
    cached = dh.DatasetEquilibrium(f, theta, (b for b in batches), _mean_loss, **init)
    whole, loss = _whole(f, theta, x, y)
    assert relative_error(cached.hessian(), whole.hessian(loss)) <= 1e-10

    class Shrinking:  # re-iterable, but gives one batch fewer on every pass
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches[: 3 - self.passes])

    data = dh.DatasetEquilibrium(f, theta, Shrinking(), _mean_loss, cache_bytes=0, **init)
    with pytest.raises(
        dh.DataChangedError, match="read 3 samples in 1 batches, the first read 6 in 2"
    ):
        data.grad()
    with pytest.raises(ValueError, match="cache_bytes must be a non-negative int"):
        dh.DatasetEquilibrium(f, theta, batches, _mean_loss, cache_bytes=-1, **init)
    with pytest.raises(ValueError, match="batches must be an iterable"):
        dh.DatasetEquilibrium(f, theta, 3, _mean_loss, **init)


@pytest.mark.parametrize("cache_bytes", [0, 2**30])
def test_theta_changed_in_place_is_stale_for_every_pass(cache_bytes):
    f, theta, x, y = _data(samples=6)
    data = dh.DatasetEquilibrium(
        f, theta, _batches(x, y, [3, 3]), _mean_loss, cache_bytes=cache_bytes,
        init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS,
    )  # fmt: skip
    with torch.no_grad():
        theta["b"].add_(0.1)
    with pytest.raises(dh.StaleEquilibriumError, match="theta was modified in place"):
        data.grad()


def _slow_and_fast(seed=0):
    """``h = θ·r(x)·h + x₁``: samples whose rate r(x) = x₀ is 0.9 need ~260 Picard steps
    for 1e-12, those at 0.1 about 12; with max_iter=30 the slow ones miss the tolerance."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        rate = torch.where(torch.rand(5, generator=g) < 0.4, 0.9, 0.1)
        x = torch.stack([rate, torch.randn(5, generator=g)], dim=1)
        batches.append((x, torch.randn(5, generator=g)))

    def f(x, h, theta):
        return theta * x[:, :1] * h + x[:, 1:]

    def loss(h, target):
        return ((h[:, 0] - target) ** 2).mean()

    return f, torch.tensor(1.0), batches, loss


def test_unconverged_samples_are_excluded_explicitly_and_counted():
    f, theta, batches, loss = _slow_and_fast()
    options = dict(solver="picard", tol=1e-12, atol=1e-13, max_iter=30)
    with pytest.raises(dh.ConvergenceError, match="did not converge"):
        dh.DatasetEquilibrium(f, theta, batches, loss, **options)
    data = dh.DatasetEquilibrium(  # excluding implies keeping the best iterates to exclude
        f, theta, batches, loss, exclude_unconverged=True, cache_bytes=0, **options
    )
    slow = sum(int((x[:, 0] > 0.5).sum()) for x, _ in batches)
    assert data.excluded_samples == slow and data.num_samples == 15 - slow
    kept = [(x[x[:, 0] < 0.5], y[x[:, 0] < 0.5]) for x, y in batches]
    reference = dh.DatasetEquilibrium(f, theta, [b for b in kept if len(b[0])], loss, **options)
    assert torch.allclose(data.grad(), reference.grad(), rtol=1e-12)
    assert torch.allclose(data.hessian(), reference.hessian(), rtol=1e-12)
    v = torch.ones(1)
    assert torch.allclose(data.hvp(v), reference.hvp(v), rtol=1e-12)
    with pytest.raises(dh.ConvergenceError, match="did not converge"):  # a policy chosen stays
        dh.DatasetEquilibrium(
            f, theta, batches, loss, exclude_unconverged=True, convergence="raise", **options
        )


def test_excluding_needs_tensor_samples_and_a_converged_one():
    f, theta, batches, loss = _slow_and_fast()
    options = dict(solver="picard", tol=1e-12, atol=1e-13, max_iter=30, convergence="best")
    listed = [(x, y.tolist()) for x, y in batches]
    with pytest.raises(ValueError, match="exclude_unconverged needs tensor inputs and targets"):
        dh.DatasetEquilibrium(f, theta, listed, loss, exclude_unconverged=True, **options)
    slow = [(x[x[:, 0] > 0.5], y[x[:, 0] > 0.5]) for x, y in batches]
    with pytest.raises(ValueError, match=r"no sample converged: all \d+ were excluded"):
        dh.DatasetEquilibrium(
            f, theta, [b for b in slow if len(b[0])], loss, exclude_unconverged=True, **options
        )


def _time_major(batches):
    """The batches transposed: ``x`` ``[m, B]`` and target ``[n, B]`` (samples last)."""
    return [(x.T.contiguous(), y.T.contiguous() if y.ndim == 2 else y[None]) for x, y in batches]


def test_time_major_data_count_their_samples_along_batch_dim():
    """x [3, B], target [5, B] with batch_dim=1 were refused: "x has 3 samples along
    batch_dim=0, the target 5 … or pass batch_dim=" though batch_dim=1 was passed. The
    samples are now counted along batch_dim, and the sums are the sample-first ones."""
    f, theta, x, y = _data()
    sizes = [4, 2, 5]
    first = dh.DatasetEquilibrium(
        f, theta, _batches(x, y, sizes), _mean_loss,
        init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS,
    )  # fmt: skip
    last = dh.DatasetEquilibrium(
        lambda x, h, t: f(x.T, h.T, t).T, theta, _time_major(_batches(x, y, sizes)),
        lambda h, y: _mean_loss(h.T, y.T), init_state=lambda xb: torch.zeros(5, xb.shape[1]),
        batch_dim=1, **OPTS,
    )  # fmt: skip
    assert last.num_samples == 11 and [s.samples for s in last.batch_solves] == sizes
    assert relative_error(last.hessian(), first.hessian()) <= 1e-12
    mismatched = [(x[:4].T, y[:3].T)]  # 4 samples in x, 3 in the target
    with pytest.raises(ValueError, match=r"batch 1: x has 4 samples along batch_dim=1, the "
                                         r"target 3 \(shapes \(3, 4\) and \(5, 3\)\)"):  # fmt: skip
        dh.DatasetEquilibrium(f, theta, mismatched, _mean_loss, batch_dim=1, **OPTS)


def test_time_major_unconverged_samples_are_excluded_along_batch_dim():
    """Left-out samples are taken out of x, the target and the state along batch_dim
    (a [1, B] target, moved sample-first, was refused by the fingerprints' byte view)."""
    f, theta, batches, loss = _slow_and_fast()
    options = dict(solver="picard", tol=1e-12, atol=1e-13, max_iter=30, exclude_unconverged=True)
    first = dh.DatasetEquilibrium(f, theta, batches, loss, **options)
    last = dh.DatasetEquilibrium(
        lambda x, h, t: f(x.T, h.T, t).T, theta, _time_major(batches),
        lambda h, y: loss(h.T, y[0]), init_state=lambda xb: torch.zeros(1, xb.shape[1]),
        batch_dim=1, **options,
    )  # fmt: skip
    assert last.excluded_samples == first.excluded_samples > 0
    assert last.num_samples == first.num_samples
    assert torch.allclose(last.hessian(), first.hessian(), rtol=1e-12)


def test_batches_is_the_old_name_of_data():
    f, theta, x, y = _data()
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS)
    batches = _batches(x, y, [5, 6])
    new = dh.DatasetEquilibrium(f, theta, batches, _mean_loss, **init).grad()
    with pytest.warns(DeprecationWarning, match=r"DatasetEquilibrium\(batches=...\) is deprec"):
        old = dh.DatasetEquilibrium(f, theta, batches=batches, loss=_mean_loss, **init)
    assert all(torch.equal(old.grad()[k], new[k]) for k in new)
    with pytest.raises(ValueError, match="needs data"):
        dh.DatasetEquilibrium(f, theta, loss=_mean_loss, **init)


def test_hessian_split_flag_is_deprecated_for_hessian_split():
    f, theta, x, y = _data()
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS)
    data = dh.DatasetEquilibrium(f, theta, _batches(x, y, [5, 6]), _mean_loss, **init)
    with pytest.warns(
        DeprecationWarning,
        match=r"^DatasetEquilibrium\.hessian\(\.\.\., split=True\) is deprecated and will be "
        r"removed in deqhess 0\.3; use data\.hessian_split\(\), which returns the HessianSplit",
    ):
        old = data.hessian(split=True)
    new = data.hessian_split()
    assert isinstance(old, dh.HessianSplit)
    for part in ("loss_curvature", "dynamics_curvature", "total"):
        assert torch.equal(getattr(old, part), getattr(new, part))


def test_a_loss_changed_after_construction_is_followed_by_every_derivative():
    """A tensor the loss closes over, changed in place after grad() and hvp() ran, left
    both at the old answer (0.667 off) while hessian() followed it: the batch loss wraps
    the user's loss, and what that captured is watched as in Equilibrium."""
    f, theta, x, y = _data()
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS)
    scale = torch.tensor(1.0)

    def loss(h, target):
        return scale * _mean_loss(h, target)

    data = dh.DatasetEquilibrium(f, theta, _batches(x, y, [5, 6]), loss, **init)
    v = torch.randn(data.num_parameters)
    grad, hv = data.layout.flatten(data.grad()), data.hvp(v)
    scale.fill_(3.0)
    assert relative_error(data.layout.flatten(data.grad()), 3 * grad) <= 1e-12
    assert relative_error(data.hvp(v), 3 * hv) <= 1e-12
    assert relative_error(data.hessian() @ v, 3 * hv) <= 1e-10


def test_module_and_varargs_losses_are_read_by_their_forward():
    """nn.MSELoss() was refused as 'requires 1 positional arguments' (its __call__ takes
    *args): a module's forward decides; *args is loss(h, target)."""
    f, theta, x, y = _data()
    init = dict(init_state=lambda xb: torch.zeros(xb.shape[0], 5), **OPTS)
    batches = _batches(x, y, [5, 6])
    reference = dh.DatasetEquilibrium(f, theta, batches, lambda h, t: ((h - t) ** 2).mean(), **init)
    expected = reference.layout.flatten
    for loss in (torch.nn.MSELoss(), lambda *args: ((args[0] - args[1]) ** 2).mean()):
        data = dh.DatasetEquilibrium(f, theta, batches, loss, **init)
        assert relative_error(expected(data.grad()), expected(reference.grad())) <= 1e-14


def _coupled_loss(h, y):  # a term over the batch as a whole: no loss per sample
    return ((h.mean(0) - y.mean(0)) ** 2).sum() + ((h - y) ** 2).sum(1).mean()


def _by_position(h, y):  # weights by position in the batch: its order matters
    position = torch.arange(1, len(h) + 1, dtype=h.dtype)[:, None]
    return (position * (h - y) ** 2).mean()


@pytest.mark.parametrize(
    ("loss", "reduction", "sizes", "refused"),
    [
        (_coupled_loss, "mean", (5, 6), "depends on the grouping"),
        (_by_position, "mean", (11,), "depends on the order"),
        (_mean_loss, "sum", (5, 6), r"weighs each sample by its batch's size"),
        (_mean_loss, "sum", (5, 5), None),  # one size: every grouping the same operator
        (_mean_loss, "mean", (5, 6), None),
    ],
    ids=["coupled", "by-position", "sizes", "one-size", "plain"],
)
def test_a_regrouping_loader_is_checked_against_what_the_loss_makes_of_it(
    loss, reduction, sizes, refused
):
    """DatasetEquilibrium over a shuffling loader: a loss coupling the samples, ordering
    them, or a batch mean added by reduction="sum" over batches of two sizes made each
    pass another operator — two hessian() calls 0.41, 0.95 and 0.32 apart, silently, where
    ModelCurvature refused. Now the same first-pass check; the others stay exact against
    the first pass's batches."""
    f, theta, x, y = _data(samples=sum(sizes))
    order = [
        torch.arange(len(x)),
        torch.randperm(len(x), generator=torch.Generator().manual_seed(4)),
    ]

    class Regrouped:  # the first pass in order, the next ones shuffled
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            index = order[min(self.passes, 1)]
            self.passes += 1
            return iter(_batches(x[index], y[index], list(sizes)))

    init = dict(init_state=lambda xb: torch.zeros(len(xb), 5), progress=False)
    data = dh.DatasetEquilibrium(f, theta, Regrouped(), loss, reduction=reduction, **init)
    fixed = dh.DatasetEquilibrium(f, theta, _batches(x, y, list(sizes)), loss,
                                  reduction=reduction, **init)  # fmt: skip
    if refused is None:
        assert relative_error(data.hessian(), fixed.hessian()) <= 1e-10
        return
    with pytest.raises(dh.DataChangedError, match=refused):
        data.hessian()


class _Schedule:
    """Passes of the samples in the groupings ``schedule`` gives, one per pass (the last
    one repeated); ``target`` builds each batch's target from its indices."""

    def __init__(self, x, target, schedule):
        self.x, self.target, self.schedule, self.passes = x, target, schedule, 0

    def __iter__(self):
        groups = self.schedule[min(self.passes, len(self.schedule) - 1)]
        self.passes += 1
        return iter([(self.x[torch.tensor(i)], self.target(torch.tensor(i))) for i in groups])


def test_a_first_pass_of_batches_of_one_refuses_batches_of_several():
    """A variance over the batch is zero on one sample (and on one sample twice): a first
    pass of batches of one took the loss for a plain mean, and passes in batches of four
    alternated with it between two operators 2.1 apart, silently."""
    f, theta, x, y = _data(samples=8)

    def loss(h, target):
        return ((h - target) ** 2).mean() + h.var(0, unbiased=False).sum()

    schedule = [[[i] for i in range(8)], [[0, 1, 2, 3], [4, 5, 6, 7]]]
    init = dict(init_state=lambda xb: torch.zeros(len(xb), 5), progress=False)
    data = dh.DatasetEquilibrium(f, theta, _Schedule(x, lambda i: y[i], schedule), loss, **init)
    with pytest.raises(dh.DataChangedError, match="held one sample each"):
        data.hessian()


def test_a_target_tensor_shared_by_the_batch_is_passed_whole_to_each_sample():
    """A target ``(y, μ)`` with ``μ`` ``[1, d]`` shared by every sample: the check took
    the batch for one without sample rows and checked nothing — a loss matching the batch
    mean to μ then gave operators 0.49 apart under a regrouping loader, silently."""
    f, theta, x, y = _data(samples=8)
    mu = torch.randn(1, 5, generator=torch.Generator().manual_seed(7))

    def loss(h, target):
        rows, shared = target
        return ((h - rows) ** 2).mean() + ((h.mean(0, keepdim=True) - shared) ** 2).sum()

    schedule = [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]]
    init = dict(init_state=lambda xb: torch.zeros(len(xb), 5), progress=False)
    loader = _Schedule(x, lambda i: (y[i], mu), schedule)
    data = dh.DatasetEquilibrium(f, theta, loader, loss, **init)
    with pytest.raises(dh.DataChangedError, match="depends on the grouping"):
        data.hessian()

    def plain_loss(h, target):
        return ((h - target[0]) ** 2 + 0 * target[1]).mean()

    loader = _Schedule(x, lambda i: (y[i], mu), schedule)
    plain = dh.DatasetEquilibrium(f, theta, loader, plain_loss, **init)
    assert torch.isfinite(plain.hessian()).all()  # a plain mean: regrouped freely
