"""laplace-torch on models holding a DEQ layer, every backend installed here.

Full and diagonal curvature (GGN, empirical Fisher, Hessian) are compared with the
unrolled twin's, dense (1e-10: the fixed point is solved to 1e-13, the references exact to
rounding); Kronecker-factored curvature with the factors built from ``h*`` and the adjoint
(``models.kfac_matrix``; one batch, where laplace-torch's factors are exactly KFAC's).
The GLM predictive, the sampled predictive and the marginal-likelihood prior precision are
compared with the same laplace-torch calls on the unrolled twin.

What cannot work says so (:data:`LIMITS`): BackPACK's second-order extensions have no
rule for a DEQ layer (BackPACK's own error), and a few combinations fail in laplace-torch
0.3 with these tool versions on *any* model — tested to fail the same way on a plain MLP.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from problems import relative_error
from torch import nn

import deqhess as dh
import deqhess.nn
from deqhess import ConvergenceError
from deqhess.curvature import inverse_diagonal

from .models import build, empirical_fisher, ggn, hessian, kfac_matrix, loss_hessians

laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace import curvature as backends  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # BackPACK / torch hook notes
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

BACKENDS = [
    name
    for name in ("CurvlinopsGGN", "CurvlinopsEF", "CurvlinopsHessian", "BackPackGGN",
                 "BackPackEF", "AsdlGGN", "AsdlEF", "AsdlHessian")
    if hasattr(backends, name)
]  # fmt: skip
STRUCTURES = ["full", "diag", "kron"]
SUBSETS = ["all", "last_layer"]
LAST_LAYER = 3 * 6 + 3  # the tanh model's head: weight and bias

#: (backend, structure, subset) → why it cannot work: DEQ-specific, or the tool's own
LIMITS = {
    **{(b, "diag", "all"): "deq" for b in ("BackPackGGN",)},
    **{(b, "kron", "all"): "deq" for b in ("BackPackGGN",)},
    **{(b, s, sub): "tool" for b in ("CurvlinopsHessian", "AsdlHessian")
       for s in ("diag", "kron") for sub in SUBSETS},
    **{("BackPackEF", "kron", sub): "tool" for sub in SUBSETS},
    ("AsdlGGN", "full", "all"): "tool",
    ("AsdlEF", "full", "all"): "tool",
    ("AsdlEF", "full", "last_layer"): "tool",
    ("AsdlHessian", "full", "last_layer"): "tool",
    ("CurvlinopsEF", "diag", "last_layer"): "tool",  # zeros, on any model
}  # fmt: skip


def _fit(model, X, y, backend, structure, subset, batch_size=None):
    data = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size or len(y))
    la = Laplace(
        model,
        "classification",
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=getattr(backends, backend),
    )
    la.fit(loader)
    return la


def _reference(setup, backend, structure, subset):
    if structure == "kron":
        full = kfac_matrix(setup, "type-2" if "GGN" in backend else "empirical")
    else:
        full = {"GGN": ggn, "EF": empirical_fisher, "Hessian": hessian}[
            next(k for k in ("GGN", "EF", "Hessian") if backend.endswith(k))
        ](setup)
    if subset == "last_layer":
        full = full[-LAST_LAYER:, -LAST_LAYER:]
    return full.diagonal() if structure == "diag" else full


CASES = [
    pytest.param(b, s, sub, id=f"{b}-{s}-{sub}")
    for b in BACKENDS
    for s in STRUCTURES
    for sub in SUBSETS
    if not (s == "kron" and sub == "last_layer" and b.startswith("BackPack"))
]


@pytest.mark.parametrize(("backend", "structure", "subset"), CASES)
def test_curvature_is_exact_or_refused(backend, structure, subset):
    setup = build("tanh")
    why = LIMITS.get((backend, structure, subset))
    if why == "deq":
        with pytest.raises(AssertionError, match="expects a backpropagation quantity"):
            _fit(setup.model, setup.X, setup.y, backend, structure, subset)
        return
    if why == "tool":
        _assert_fails_on_any_model(setup, backend, structure, subset)
        return
    # the reference first: BackPACK leaves its hooks on the modules the twin shares
    expected = _reference(setup, backend, structure, subset)
    la = _fit(setup.model, setup.X, setup.y, backend, structure, subset)
    got = la.H.to_matrix() if structure == "kron" else la.H
    assert relative_error(got, expected) <= 1e-10


def _assert_fails_on_any_model(setup, backend, structure, subset):
    """The same failure, or the same zeros, on a plain MLP: the tool's, not the layer's."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    outcomes = []
    for model in (setup.model, plain):
        try:
            la = _fit(model, setup.X, setup.y, backend, structure, subset)
        except Exception as error:  # the tool's own errors, compared below
            outcomes.append(type(error))
        else:
            outcomes.append("zeros" if float(la.H.abs().max()) == 0.0 else "numbers")
    assert outcomes[0] == outcomes[1] and outcomes[0] != "numbers", outcomes


@pytest.mark.parametrize("backend", ["CurvlinopsGGN", "AsdlGGN"])
@pytest.mark.parametrize("kind", ["tanh", "conv"])
def test_kron_is_kfac_of_the_fixed_point_and_adjoint(kind, backend):
    setup = build(kind)
    la = _fit(setup.model, setup.X, setup.y, backend, "kron", "all")
    assert relative_error(la.H.to_matrix(), kfac_matrix(setup)) <= 1e-10


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_predictives_and_prior_precision_match_the_unrolled_model(structure):
    """GLM predictive (probit), the sampled predictive with the same seed, and the
    marginal-likelihood prior precision: the DEQ model against its unrolled twin (whose
    derivatives are exact; its KFAC is not the DEQ's — 60 weight-shared steps — so kron
    is checked against a hand-built predictive below)."""
    setup = build("conv", samples=10)
    fits = [
        _fit(m, setup.X, setup.y, "CurvlinopsGGN", structure, "all", batch_size=5)
        for m in (setup.model, setup.unrolled)
    ]
    for la in fits:
        la.prior_precision = 50.0  # samples close to the MAP: every sampled cell contracts
    glm = [la(setup.X, pred_type="glm", link_approx="probit") for la in fits]
    assert relative_error(glm[0], glm[1]) <= 1e-10
    sampled = []
    for la in fits:
        generator = torch.Generator().manual_seed(3)
        sampled.append(la.predictive_samples(setup.X, pred_type="nn", n_samples=5,
                                             generator=generator))  # fmt: skip
    assert relative_error(sampled[0], sampled[1]) <= 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for la in fits:
            la.optimize_prior_precision(method="marglik", n_steps=20, lr=0.1)
    assert relative_error(fits[0].prior_precision, fits[1].prior_precision) <= 1e-9


@pytest.mark.parametrize("kind", ["tanh", "conv"])
def test_kron_glm_predictive_is_that_of_the_hand_built_posterior(kind):
    """``softmax(f / √(1 + π/8 · diag(J Σ Jᵀ)))`` with ``Σ = (KFAC + δI)⁻¹`` built by hand
    and ``J`` the output Jacobian of the unrolled twin."""
    setup = build(kind)
    jac, _ = loss_hessians(setup)
    prior = 2.0
    posterior = torch.linalg.inv(kfac_matrix(setup) + prior * torch.eye(jac.shape[2]))
    logits = setup.unrolled(setup.X).detach()
    variance = torch.einsum("nkp,pq,nkq->nk", jac, posterior, jac)
    expected = torch.softmax(logits / torch.sqrt(1 + torch.pi / 8 * variance), -1)
    la = _fit(setup.model, setup.X, setup.y, "CurvlinopsGGN", "kron", "all")
    la.prior_precision = prior
    got = la(setup.X, pred_type="glm", link_approx="probit")
    assert relative_error(got, expected) <= 1e-10


@pytest.mark.parametrize(
    ("backend", "reference"),
    [("AsdlGGN", ggn), ("CurvlinopsGGN", ggn), ("AsdlEF", empirical_fisher),
     ("BackPackEF", empirical_fisher)],
    ids=["AsdlGGN", "CurvlinopsGGN", "AsdlEF", "BackPackEF"],
)  # fmt: skip
def test_diagonal_on_a_conv_deq_is_exact(backend, reference):
    """ASDL's diagonal GGN on a conv DEQ was 130% off when its forward hooks fired at every
    solver iteration."""
    setup = build("conv")
    expected = reference(setup).diagonal()
    la = _fit(setup.model, setup.X, setup.y, backend, "diag", "all")
    assert relative_error(la.H, expected) <= 1e-10


def test_low_rank_needs_the_old_asdfghjkl_which_pypi_does_not_have():
    """laplace-torch's ``lowrank`` imports the pre-``asdl`` asdfghjkl, installable only from
    its git branch: the tool says so, on any model."""
    if importlib.util.find_spec("asdfghjkl") is not None:
        pytest.skip("the old asdfghjkl is installed")
    setup = build("tanh")
    with pytest.raises(ImportError, match="asdfghjkl"):
        _fit(setup.model, setup.X, setup.y, "CurvlinopsGGN", "lowrank", "all")


def test_sampled_predictive_leaves_out_weights_whose_cell_does_not_converge():
    """The recipe of the Laplace page: ``pred_type="nn"`` draws weights, some of which make
    the cell non-contractive. The layer's default policy stops with ConvergenceError;
    inside ``deqhess.nn.convergence("best")`` each call is recorded, sample ``s`` of the
    record is weight sample ``s``, and the predictive averages only what converged."""
    setup = build("tanh", samples=6, solver="picard", max_iter=100, tol=1e-10)
    la = _fit(setup.model, setup.X, setup.y, "CurvlinopsGGN", "full", "all")
    la.prior_precision = 1.0  # wide enough that about half the sampled cells diverge

    def draw():
        generator = torch.Generator().manual_seed(0)
        return la.predictive_samples(setup.X, pred_type="nn", n_samples=20, generator=generator)

    with pytest.raises(ConvergenceError):
        draw()
    with deqhess.nn.convergence("best") as record:
        samples = draw()  # [S, B, C] probabilities
    kept = record.converged_mask()  # [S, B]
    assert kept.shape == samples.shape[:2]
    assert bool(kept.any()) and not bool(kept.all())
    # the record is aligned with the samples: redo one fully converged sample strictly
    s = int(torch.nonzero(kept.all(1))[0, 0])
    weights = la.sample(20, generator=torch.Generator().manual_seed(0))[s]
    torch.nn.utils.vector_to_parameters(weights, la.params)
    with torch.no_grad():
        strict = torch.softmax(setup.model(setup.X), -1)
    torch.nn.utils.vector_to_parameters(la.mean, la.params)
    assert relative_error(strict, samples[s]) <= 1e-12
    probs = (samples * kept[..., None]).sum(0) / kept.sum(0)[:, None]
    answered = kept.any(0)
    assert torch.allclose(probs[answered].sum(-1), torch.ones(int(answered.sum())))


def test_inverse_diagonal_is_laplaces_full_posterior_variance():
    """``deqhess.curvature.inverse_diagonal`` of ``ModelCurvature``'s GGN (sum reduction)
    at the prior precision is laplace-torch's full-GGN posterior variance."""
    setup = build("tanh")
    la = _fit(setup.model, setup.X, setup.y, "CurvlinopsGGN", "full", "all")
    la.prior_precision = 0.7
    curvature = dh.ModelCurvature(
        setup.model, nn.CrossEntropyLoss(reduction="sum"), [(setup.X, setup.y)]
    )
    result = inverse_diagonal(curvature.ggn_operator(), 0.7, progress=False)
    assert relative_error(result.estimate, la.posterior_covariance.diagonal()) <= 1e-10
