"""The user's model as it really comes: modules in training mode are refused by name,
a forward that draws random numbers or writes the model's state is refused, and no
analysis changes anything of the model (parameters, buffers, random state: bitwise).

References: unrolled float64 autograd of the same model (``models.py``), 1e-9 relative.
"""

from __future__ import annotations

import pytest
import torch
from models import Classifier, Reference, unrolled_twin
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.curvature import extreme_eigenpairs, hutchpp
from deqhess.nn import DEQ


def _data(sizes=(3, 4), m=3, k=2):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(sum(sizes), m, generator=g), torch.randn(sum(sizes), k, generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


class Headed(nn.Module):
    """A classifier whose head holds a module with a training-mode behaviour."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.body = Classifier()
        self.extra = module

    def forward(self, x):
        return self.extra(self.body(x))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: nn.Dropout(0.2), r"model.extra is dropout in training mode"),
        (lambda: nn.BatchNorm1d(2), r"model.extra is batch norm in training mode"),
    ],
    ids=["dropout", "batch-norm"],
)
def test_training_mode_modules_anywhere_are_refused_by_name(make, reason):
    """Dropout in train mode made two products differ by 33–79% and `deqhess analyze`
    report an operator error of 5e-17; batch norm moved the running statistics on every
    pass. Refused at construction, and again at a pass if the mode changes later; in
    eval() mode the operators are the unrolled model's."""
    model = Headed(make())
    data = _data()
    with pytest.raises(ValueError, match=reason + r".*Call model.eval\(\)"):
        dh.ModelCurvature(model, nn.MSELoss(), data)
    model.eval()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    twin = unrolled_twin(model.body)
    reference_model = Headed(make()).eval()
    reference_model.body = twin
    reference_model.load_state_dict(model.state_dict(), strict=False)
    reference = Reference(reference_model, nn.MSELoss(), data, curvature.layout.names)
    assert relative_error(curvature.hessian(), reference.total()) <= 1e-9
    model.extra.train()
    with pytest.raises(ValueError, match=reason):
        curvature.grad()


def test_other_random_or_self_updating_modules_are_named_too():
    data = _data()
    with pytest.raises(ValueError, match=r"model.extra is RReLU in training mode"):
        dh.ModelCurvature(Headed(nn.RReLU()), nn.MSELoss(), data)
    spectral = Headed(nn.utils.parametrizations.spectral_norm(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"model.extra is a spectral norm in training mode"):
        dh.ModelCurvature(spectral, nn.MSELoss(), data)
    statistics = nn.Sequential(Headed(nn.Identity()), nn.Unflatten(1, (1, 2)),
                               nn.InstanceNorm1d(1, track_running_stats=True))  # fmt: skip
    with pytest.raises(ValueError, match=r"model.2 is instance norm with running statistics"):
        dh.ModelCurvature(statistics, nn.MSELoss(), data)


def test_every_analysis_leaves_the_model_and_the_random_state_bitwise_unchanged():
    """Batch norm (eval) in the head, a DEQ inside: after each analysis the parameters,
    buffers (running statistics, num_batches_tracked) and torch's generator are the
    same bits as before."""
    model = Headed(nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model.extra.running_mean.fill_(0.3)
        model.extra.running_var.fill_(2.0)
    data = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    analyses = [
        curvature.grad,
        curvature.hessian,
        lambda: curvature.hessian_split(),
        lambda: curvature.ggn_operator().to_dense(),
        lambda: extreme_eigenpairs(curvature.hessian_operator(), 2, dense_below=0, progress=False),
        lambda: hutchpp(curvature.hessian_operator(), 30, progress=False),
    ]
    for analysis in analyses:
        analysis()
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(torch.random.get_rng_state(), rng)
    assert int(model.extra.num_batches_tracked) == 0


class Noisy(nn.Module):
    def forward(self, x):
        return torch.nn.functional.dropout(x, 0.3, training=True)


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


def test_a_forward_that_draws_random_numbers_or_writes_state_is_refused():
    data = _data()
    noisy = dh.ModelCurvature(Headed(Noisy()), nn.MSELoss(), data)
    rng = torch.random.get_rng_state()
    with pytest.raises(dh.ModelChangedError, match=r"drew random numbers(?s:.*)another thread"):
        noisy.grad()
    assert torch.equal(torch.random.get_rng_state(), rng)  # put back
    counting = Headed(Counting())
    with pytest.raises(dh.ModelChangedError, match=r"\['extra.calls'\] were written"):
        dh.ModelCurvature(counting, nn.MSELoss(), data).grad()


class Writing(nn.Module):
    """A forward that writes its state three ways: a buffer in place, a buffer rebound,
    a parameter in place (under no_grad)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.tensor([-0.0, 1.5]))
        self.register_buffer("last", torch.zeros(2))
        self.scale = nn.Parameter(torch.tensor([-0.0, 2.0]))

    def forward(self, x):
        self.count += 1
        self.last = x.detach().mean(0)[:2]
        with torch.no_grad():
            self.scale.mul_(3.0)
        return x


def _bits(tensor):
    return tensor.detach().view(torch.int64 if tensor.dtype == torch.float64 else torch.int32)


def test_state_a_forward_wrote_is_put_back_bitwise_before_the_refusal():
    """Refused, and every parameter and buffer is the same tensor with the same bits
    as before (``-0.0`` kept: compared as integers)."""
    model = Headed(Writing())
    before = {k: (v, _bits(v).clone()) for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(
        dh.ModelChangedError,
        match=r"\['extra.count', 'extra.last', 'extra.scale'\] were written.*put them back",
    ):
        dh.ModelCurvature(model, nn.MSELoss(), _data()).grad()
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (tensor, bits) in before.items():
        assert after[name] is tensor, name  # the same object, not a copy
        assert torch.equal(_bits(after[name]), bits), name


class DataWriting(nn.Module):
    """A forward that writes through ``.data``, which moves no version counter."""

    def __init__(self, write):
        super().__init__()
        self.register_buffer("count", torch.tensor([-0.0, 1.5]))
        self.scale = nn.Parameter(torch.tensor([-0.0, 2.0]))
        self.write = write

    def forward(self, x):
        self.write(self)
        return x * self.scale.abs().add(1.0) + self.count


def _state_bits(model):
    return {k: (v, _bits(v).clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_same_state(model, before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (tensor, bits) in before.items():
        assert after[name] is tensor, name  # the same object, not a copy
        assert torch.equal(_bits(after[name]), bits), name


@pytest.mark.parametrize(
    ("write", "name"),
    [
        (lambda model: model.extra.count.data.add_(1.0), "extra.count"),
        (lambda model: model.extra.scale.data.mul_(1.01), "extra.scale"),
        (lambda model: model.extra.count.data.abs_(), "extra.count"),  # -0.0 → 0.0: bits only
        (lambda model: model.body.head.weight.data.mul_(1.01), "body.head.weight"),
    ],
    ids=["buffer", "parameter", "sign-of-zero", "a-differentiated-parameter"],
)
def test_writes_through_data_are_named_and_put_back_bitwise(write, name):
    """A write through ``.data`` moves no version counter: it was refused only by the
    changed outputs, or not at all, and the model was left written. Now every pass
    compares the model's state bitwise with its copy: refused by name, put back."""
    model = Headed(DataWriting(None))
    model.extra.write = lambda module: write(model)
    before = _state_bits(model)
    with pytest.raises(dh.ModelChangedError, match=rf"\['{name}'\] were written.*put them back"):
        dh.ModelCurvature(model, nn.MSELoss(), _data()).grad()
    _assert_same_state(model, before)


class Rebinding(nn.Module):
    """A forward that updates a buffer by rebinding it (a running state)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.tensor([-0.0, 1.0]))

    def forward(self, x):
        self.b = self.b * 0.5 + 1.0
        return x * self.b


class RebindingCell(nn.Module):
    """A DEQ cell that counts its calls in a buffer it rebinds."""

    def __init__(self, n=4):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.3)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x, h):
        self.calls = self.calls + 1
        return torch.tanh(self.lin(h) + x)


@pytest.mark.parametrize("where", ["head", "cell"])
def test_a_forward_that_rebinds_a_buffer_is_refused_by_name(where):
    """Rebinding a buffer was put back silently after every batch's call, so every batch
    used the same first update where a plain run would evolve it (a gradient 39% off):
    refused by name, the model's tensors the same objects with the same bits."""
    if where == "head":
        model, name = Headed(Rebinding()), "extra.b"
    else:
        model = nn.Sequential(
            nn.Linear(3, 4), dh.nn.DEQ(RebindingCell(), tol=1e-12), nn.Linear(4, 2)
        )
        name = "1.cell.calls"
    before = _state_bits(model)
    with pytest.raises(dh.ModelChangedError, match=rf"\['{name}'\] were written.*put them back"):
        dh.ModelCurvature(model, nn.MSELoss(), _data()).grad()
    _assert_same_state(model, before)


class FailingWriter(nn.Module):
    """Writes through ``.data``, then fails on the second batch (of 4 samples)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.zeros(2))

    def forward(self, x):
        self.b.data.add_(1.0)
        if len(x) == 4:
            raise ValueError("the user's own error")
        return x + self.b


def test_a_pass_that_fails_after_a_write_names_the_write_from_the_failure():
    model = Headed(FailingWriter())
    before = _state_bits(model)
    with pytest.raises(dh.ModelChangedError, match=r"\['extra.b'\] were written") as caught:
        dh.ModelCurvature(model, nn.MSELoss(), _data()).grad()
    assert isinstance(caught.value.__cause__, ValueError)
    _assert_same_state(model, before)


class Scaled(nn.Module):
    """A head scaled by a plain attribute (neither parameter nor buffer)."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0

    def forward(self, x):
        return self.scale * x


def test_a_model_changed_between_products():
    """New parameter values (an optimiser step) start the checks afresh: the next
    product is the new model's; a change deqhess cannot see (a plain attribute) is
    caught by the model's outputs."""
    model = Headed(Scaled())
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters)
    curvature.hvp(v)
    with torch.no_grad():
        model.body.head.weight.mul_(1.5)
    fresh = dh.ModelCurvature(model, nn.MSELoss(), data)
    assert relative_error(curvature.hvp(v), fresh.hvp(v)) <= 1e-12
    model.extra.scale = 2.0
    with pytest.raises(
        dh.ModelChangedError,
        match=r"returned other values on the same samples.*on purpose.*build a new operator",
    ):
        curvature.hvp(v)


@pytest.mark.parametrize("write", ["data in place", "data rebound", "buffer data"])
def test_a_write_through_data_between_products_is_a_new_model(write):
    """``p.data.mul_(…)`` and ``p.data = …`` leave no version behind: the model's state
    is recognised by the digest of its bytes, so the next product is the new model's
    (it had been refused as 'samples moved … dropout', a wrong diagnosis)."""
    model = Headed(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).eval()))
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.randn(curvature.num_parameters)
    curvature.hvp(v)
    weight = model.body.head.weight
    if write == "data in place":
        weight.data.mul_(1.5)
    elif write == "data rebound":
        weight.data = weight.data * 1.5
    else:
        model.extra[1].running_var.data.mul_(2.0)
    fresh = dh.ModelCurvature(model, nn.MSELoss(), data)
    assert relative_error(curvature.hvp(v), fresh.hvp(v)) <= 1e-12


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap
def test_second_derivatives_through_torch_weight_norm_are_refused():
    """torch's double backward of ``_weight_norm`` along a dimension is wrong (a
    Hessian 34% off finite differences of the exact gradient): refused by name for the
    Hessian and its split, while the gradient and the GGN, first-order, stay exact
    (compared here with a hand-written weight norm of the same values)."""
    data = _data()
    model = Headed(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)))
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    for part in ("total", "loss_curvature", "dynamics_curvature"):
        with pytest.raises(dh.UnsupportedDerivativeError, match=r"model.extra.weight"):
            curvature.hessian_operator(part)

    class HandNorm(nn.Module):
        def __init__(self, wn):
            super().__init__()
            chain = wn.parametrizations.weight  # in weight_norm's order: bias, g, v
            self.bias = nn.Parameter(wn.bias.detach().clone())
            self.g = nn.Parameter(chain.original0.detach().clone())
            self.v = nn.Parameter(chain.original1.detach().clone())

        def forward(self, x):
            weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
            return x @ weight.T + self.bias

    hand = Headed(HandNorm(model.extra))
    hand.body.load_state_dict(model.body.state_dict())
    exact = dh.ModelCurvature(hand, nn.MSELoss(), data)
    assert (
        relative_error(curvature.ggn_operator().to_dense(), exact.ggn_operator().to_dense())
        <= 1e-12
    )
    assert (
        relative_error(
            curvature.layout.flatten(curvature.grad()), exact.layout.flatten(exact.grad())
        )
        <= 1e-12
    )


class _CalledWeightNorm(nn.Module):
    """``x @ torch._weight_norm(v, g, 0)ᵀ``: the operation called, no module declaring it."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(n, n))
        self.g = nn.Parameter(torch.rand(n, 1) + 0.5)

    def forward(self, x):
        return x @ torch._weight_norm(self.v, self.g, 0).T


class _CellCallingWeightNorm(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.norm = _CalledWeightNorm(n)
        with torch.no_grad():
            self.norm.g.fill_(0.3)

    def forward(self, x, h):
        return torch.tanh(self.norm(h) + x)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap
@pytest.mark.parametrize("where", ["model", "cell"])
def test_torch_weight_norm_called_by_the_forward_is_refused_from_the_graph(where):
    """A forward that calls ``torch._weight_norm`` itself (no hook, no parametrisation to
    find): the Hessian was 5% off, silently. Its node in the first-order graph is refused
    by name; the GGN, first-order in the model, still runs."""
    torch.manual_seed(0)
    if where == "model":
        model = Headed(_CalledWeightNorm())
    else:
        model = nn.Sequential(nn.Linear(3, 4), DEQ(_CellCallingWeightNorm()), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    data = [(x, model(x).detach() + 0.1)]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    v = torch.ones(curvature.num_parameters)
    name = "extra" if where == "model" else "1.cell.norm"
    with pytest.raises(
        dh.UnsupportedDerivativeError, match=rf"torch._weight_norm of model.{name}.v"
    ):
        curvature.hvp(v)
    assert torch.isfinite(curvature.ggn_operator() @ v).all()


@pytest.mark.parametrize("how", ["frozen", "not chosen"])
def test_a_weight_norm_whose_g_and_v_are_not_differentiated_is_not_refused(how):
    """A frozen (pretrained) weight-normalised layer, or one whose g and v are left out of
    theta: no gradient of the chosen parameters passes through the normalisation, so the
    Hessian is exact (against a plain layer holding the same weight as a constant); it
    had been refused as if g and v were differentiated."""
    data = _data()
    model = Headed(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)))
    chain = model.extra.parametrizations.weight
    if how == "frozen":
        chain.original0.requires_grad_(False)
        chain.original1.requires_grad_(False)
        theta = None
    else:
        theta = [n for n, _ in model.named_parameters() if "original" not in n]
    got = dh.ModelCurvature(model, nn.MSELoss(), data, theta).hessian()
    plain = Headed(nn.Linear(2, 2))
    plain.body.load_state_dict(model.body.state_dict())
    with torch.no_grad():
        plain.extra.weight.copy_(model.extra.weight)
        plain.extra.bias.copy_(model.extra.bias)
    plain.extra.weight.requires_grad_(False)
    want = dh.ModelCurvature(plain, nn.MSELoss(), data).hessian()
    assert relative_error(got, want) <= 1e-12


def test_a_parametrised_model_inside_parametrize_cached_is_refused():
    """Before: inside ``parametrize.cached()`` the Hessian of a model with a parametrised
    head was 62% off and its GGN rows for the weight exactly zero, with no error (the cache
    kept a weight cut off from the substituted parameters)."""
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w):
            return (w + w.T) / 2

    torch.manual_seed(0)
    model = Classifier().double()
    head = nn.Linear(2, 2).double()
    parametrize.register_parametrization(head, "weight", Symmetric())
    model = nn.Sequential(model, head)
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data, progress=False)
    with parametrize.cached(), pytest.raises(dh.InputError, match=r"parametrize\.cached"):
        curvature.hessian()
    curvature.hessian()  # outside the block: runs


def test_a_forward_rebinding_a_parameter_is_named_and_put_back():
    """Before: ``self.lin.weight = nn.Parameter(...)`` in a forward made that weight's
    gradient and Hessian rows exactly zero (the forward computed with the new, detached
    tensor; torch's functional_call then put the substituted one back), with no error."""

    class Rebinding(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, h):
            self.lin.weight = nn.Parameter(self.lin.weight.detach().clone())
            return self.lin(h)

    torch.manual_seed(0)
    model = nn.Sequential(Classifier(), Rebinding()).double()
    weight = model[1].lin.weight
    bits = weight.detach().clone()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    with pytest.raises(dh.ModelChangedError, match=r"1\.lin\.weight"):
        dh.ModelCurvature(model, nn.MSELoss(), data, progress=False).grad()
    assert model[1].lin.weight is weight and torch.equal(weight.detach(), bits)


@pytest.mark.parametrize("reset", ["fill", "rebind-clone", "rebind-fresh"])
def test_a_forward_resetting_a_buffer_to_the_same_bits_is_accepted_and_left_as_it_was(reset):
    """A per-call reset (``self.mask.fill_(1)``, ``self.mask = torch.ones(...)``) leaves the
    model the same function: it was refused as a write. It is accepted, the products exact
    (the same as without the reset), and the buffer is the same object and bits after."""

    class Resetting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("mask", torch.ones(2))

        def forward(self, h):
            if reset == "fill":
                self.mask.fill_(1.0)
            elif reset == "rebind-clone":
                self.mask = self.mask.clone()
            else:
                self.mask = torch.ones(2, dtype=self.mask.dtype)
            return self.lin(h) * self.mask

    torch.manual_seed(0)
    model = nn.Sequential(Classifier(), Resetting()).double()
    mask = model[1].mask
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    got = dh.ModelCurvature(model, nn.MSELoss(), data, progress=False).hessian()
    plain = nn.Sequential(model[0], model[1].lin)
    want = dh.ModelCurvature(plain, nn.MSELoss(), data, progress=False).hessian()
    assert torch.equal(got, want)
    assert model[1].mask is mask and torch.equal(mask, torch.ones(2, dtype=torch.float64))


def test_a_parameter_gone_since_construction_is_named():
    """A parametrization registered (or weights tied) after the operator was built: the
    parameter it was built on is gone, a ModelChangedError naming it (not a KeyError)."""
    import torch.nn.utils.parametrize as parametrize

    class Symmetric(nn.Module):
        def forward(self, w):
            return 0.5 * (w + w.T)

    model = Classifier(n=4)
    curvature = dh.ModelCurvature(model, nn.MSELoss(), _data())
    op = curvature.hessian_operator()
    v = torch.randn(op.shape[0], 1)
    op @ v
    parametrize.register_parametrization(model.deq0.cell, "W", Symmetric())
    with pytest.raises(dh.ModelChangedError, match=r"\['deq0.cell.W'\], which it no longer"):
        op @ v


def test_a_loss_reading_a_parameter_itself_is_refused():
    """A loss term from a closure over ``model.p``: the derivatives are taken in the
    parameters the forward sees, so that term's would be missing — refused by name."""
    model = Classifier()
    model.scale = nn.Parameter(torch.tensor(0.7))
    mse = nn.MSELoss()

    def loss(output, target):
        return mse(output, target) + 0.1 * model.scale**3

    with pytest.raises(dh.InputError, match=r"reads the parameters \['scale'\] themselves"):
        dh.ModelCurvature(model, loss, _data()).grad()
    # the parameter left out of theta: a constant of the analysis, fine
    names = [n for n, _ in model.named_parameters() if n != "scale"]
    reference = Reference(unrolled_twin(model), mse, _data(), names)
    curvature = dh.ModelCurvature(model, loss, _data(), theta=names)
    assert relative_error(curvature.hessian(), reference.total()) <= 1e-9


def test_an_operation_torch_cannot_differentiate_twice_is_named():
    """Attention before the DEQ layer: CPU flash attention has no double backward in
    torch, so second derivatives are refused naming it and the math kernel, under which
    the Hessian is exact (against the unrolled reference of the same model)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Attended(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Classifier(n=4)
            self.attention = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            z = torch.tanh(self.inner.encoder(x))[:, None]
            a, _ = self.attention(z, z, z, need_weights=False)
            return self.inner.after(self.inner.deq0(a[:, 0]))

    model = Attended().eval()
    data = _data()
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"(?s)flash_attention.*SDPBackend"):
        curvature.hessian()
    with sdpa_kernel(SDPBackend.MATH):
        dense = curvature.hessian()
    model.inner, kept = unrolled_twin(model.inner), model.inner  # the same names, unrolled
    with sdpa_kernel(SDPBackend.MATH):
        reference = Reference(model, nn.MSELoss(), data, curvature.layout.names).total()
    model.inner = kept
    assert relative_error(dense, reference) <= 1e-9


def test_any_operation_without_a_second_derivative_is_named_with_the_ggn_as_the_way():
    """``F.pdist`` has no double backward in torch: the Hessian is refused naming it, with
    the GGN from output Jacobians (first derivatives only) as the way around."""

    class Distances(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Classifier()

        def forward(self, x):
            return torch.nn.functional.pdist(self.inner(x))[:, None]

    data = [(x, torch.zeros(x.shape[0] * (x.shape[0] - 1) // 2, 1)) for x, _ in _data()]
    curvature = dh.ModelCurvature(Distances(), nn.MSELoss(), data, batch_dim=None)
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"(?s)_pdist_backward.*dense GGN"):
        curvature.hessian()


@pytest.mark.parametrize("part", ["total", "ggn"])
def test_a_reentrant_checkpoint_is_refused_by_name_and_the_other_is_exact(part):
    """``torch.utils.checkpoint(..., use_reentrant=True)`` around the head (an input with
    grad): torch.autograd.grad cannot go through it — refused naming the variant that
    works (was torch's raw RuntimeError); under ``use_reentrant=False`` the curvature
    matches the unrolled reference of the same model without the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.inner, self.reentrant = Classifier(), reentrant

        def forward(self, x):
            h = self.inner.before(x)
            return checkpoint(self.inner.after, h, use_reentrant=self.reentrant)

    data = _data()
    refused = Checkpointed(True).eval()
    curvature = dh.ModelCurvature(refused, nn.MSELoss(), data)
    with pytest.raises(dh.UnsupportedDerivativeError, match="use_reentrant=False"):
        curvature.hessian_operator(part).to_dense()
    with pytest.raises(dh.UnsupportedDerivativeError, match="use_reentrant=False"):
        curvature.grad() if part == "total" else curvature.ggn_operator() @ torch.ones(
            curvature.num_parameters, dtype=torch.float64
        )
    model = Checkpointed(False).eval()
    model.inner.load_state_dict(refused.inner.state_dict())
    curvature = dh.ModelCurvature(model, nn.MSELoss(), data)
    dense = curvature.hessian_operator(part).to_dense()
    plain = Checkpointed(None)  # the same function without the checkpoint (torch.func
    plain.forward = lambda x: plain.inner(x)  # cannot take the reference through one)
    plain.inner = unrolled_twin(model.inner)
    reference = Reference(plain, nn.MSELoss(), data, curvature.layout.names)
    assert relative_error(dense, reference.total() if part == "total" else reference.ggn()) <= 1e-9


class _TwoTasks(nn.Module):
    """A batch of 3 samples goes through a head calling ``torch._weight_norm``, others not."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.plain, self.normed = Classifier(), nn.Linear(2, 2), _CalledWeightNorm()

    def forward(self, x):
        out = self.body(x)
        return self.normed(out) if len(x) == 3 else self.plain(out)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap
def test_torch_weight_norm_on_a_later_batch_only_is_refused():
    """The graph check read the first batch's graph alone: a head only the second batch
    goes through gave a Hessian 7% off, silently. Every batch of the part's first pass."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)),
            (torch.randn(3, 3, generator=g), torch.randn(3, 2, generator=g))]  # fmt: skip
    curvature = dh.ModelCurvature(_TwoTasks(), nn.MSELoss(), data)
    with pytest.raises(dh.UnsupportedDerivativeError, match=r"model.normed.v"):
        curvature.hessian()


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap
@pytest.mark.parametrize("how", ["called", "parametrised"])
def test_a_weight_norm_with_v_frozen_is_exact_not_refused(how):
    """torch's double backward of ``_weight_norm`` is wrong only in ``v`` (the blocks
    ``∂(∇_g, ∇_v)/∂v``): with ``v`` frozen the Hessian in ``g`` and the rest is exact
    (against a hand-written ``g · v / ‖v‖``), and was refused."""
    torch.manual_seed(0)
    if how == "called":
        normed = _CalledWeightNorm()
        g_param, v_param = normed.g, normed.v
    else:
        normed = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2, bias=False))
        chain = normed.parametrizations.weight
        g_param, v_param = chain.original0, chain.original1
    v_param.requires_grad_(False)

    class Hand(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(g_param.detach().clone())
            self.v = v_param.detach().clone()

        def forward(self, x):
            return x @ (self.g * self.v / self.v.norm(dim=1, keepdim=True)).T

    data = _data()
    model, hand = Headed(normed), Headed(Hand())
    hand.body.load_state_dict(model.body.state_dict())
    got = dh.ModelCurvature(model, nn.MSELoss(), data).hessian()
    expected = dh.ModelCurvature(hand, nn.MSELoss(), data).hessian()
    assert relative_error(got, expected) <= 1e-12
