"""curvlinops on models holding a DEQ layer: its operators exact, its KFAC and EKFAC those
of the layer's input at the fixed point and the implicit output gradient.

The Hessian, GGN and empirical-Fisher operators differentiate through autograd and are
compared, dense, with the unrolled twin's (1e-10: the fixed point is solved to 1e-13 and
the references are exact to rounding). KFAC (type-2: the loss Hessian's exact square root;
``sum`` reduction, ``expand``, weight and bias apart) is a product of two factors per
layer: ``A = Σ a aᵀ / (N · positions)`` over the layer's inputs and ``G = Σ g gᵀ`` over the
gradients at its output. For a module inside the cell ``a`` is its input at ``h*`` and
``g = (1 − f²) ⊙ λ`` with the adjoint ``λ = (I − J)⁻ᵀ v`` — built here from the definition
(``models``), never from the tool — so each Kronecker block is compared with ``G ⊗ A``.
"""

from __future__ import annotations

import pytest
import torch
from problems import LearnedStart, relative_error

from .models import (
    build,
    cell_output_gradients,
    empirical_fisher,
    fixed_points,
    flat,
    ggn,
    hessian,
    kfac_factors,
    kfac_matrix,
    loss_hessian_roots,
    state_cotangents,
)

curvlinops = pytest.importorskip("curvlinops")


def _dense(operator, size: int) -> torch.Tensor:
    return operator @ torch.eye(size, dtype=torch.float64)


def _operator(cls, setup, **options):
    return cls(
        setup.model,
        torch.nn.CrossEntropyLoss(reduction="sum"),
        list(setup.model.parameters()),
        [(setup.X, setup.y)],
        **options,
    )


@pytest.mark.parametrize("kind", ["tanh", "conv"])
@pytest.mark.parametrize(
    ("operator", "reference"),
    [("HessianLinearOperator", hessian), ("GGNLinearOperator", ggn),
     ("EFLinearOperator", empirical_fisher)],
    ids=["hessian", "ggn", "ef"],
)  # fmt: skip
def test_operators_are_exact(kind, operator, reference):
    setup = build(kind)
    size = flat(setup).numel()
    got = _dense(_operator(getattr(curvlinops, operator), setup), size)
    assert relative_error(got, reference(setup)) <= 1e-10


@pytest.mark.parametrize("kind", ["tanh", "conv"])
def test_kfac_factors_are_the_fixed_point_input_and_the_adjoint_gradient(kind):
    setup = build(kind)
    kfac = _operator(
        curvlinops.KFACLinearOperator, setup, fisher_type="type-2", check_deterministic=False
    )
    expected = kfac_matrix(setup)
    assert relative_error(_dense(kfac, expected.shape[0]), expected) <= 1e-10


def test_ekfac_corrects_the_eigenvalues_with_the_adjoint_per_sample_gradients():
    """EKFAC's block for the cell's weight: ``Q diag(s) Qᵀ`` with ``Q = Q_G ⊗ Q_A`` (the
    eigenbases of the factors above) and ``s = Σ_{n,c} (Qᵀ vec(g_{nc} a_nᵀ))²``."""
    setup = build("tanh")
    params = list(setup.model.parameters())
    ekfac = _operator(
        curvlinops.EKFACLinearOperator, setup, fisher_type="type-2", check_deterministic=False
    )
    dense = _dense(ekfac, sum(p.numel() for p in params))
    A, G = kfac_factors(setup)[1]
    _, h = fixed_points(setup)
    roots = loss_hessian_roots(setup)
    basis = torch.kron(torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])
    scales = torch.zeros(basis.shape[0], dtype=h.dtype)
    for c in range(roots.shape[2]):
        g = cell_output_gradients(setup, state_cotangents(setup, roots[:, :, c]))
        per_sample = torch.einsum("ni,nj->nij", g, h).reshape(len(h), -1)
        scales += ((per_sample @ basis) ** 2).sum(0)
    start = params[0].numel() + params[1].numel()
    w = params[2].numel()
    block = dense[start : start + w, start : start + w]
    assert relative_error(block, basis @ torch.diag(scales) @ basis.T) <= 1e-9


def test_factors_built_here_match_the_tool_on_an_ordinary_model():
    """The normalisation of ``models.kfac_factors`` checked where no DEQ is involved: the
    head alone, on a plain input tensor."""
    setup = build("conv")
    _, h = fixed_points(setup)
    head = torch.nn.Sequential(*list(setup.model)[2:])
    data = [(h, setup.y)]
    kfac = curvlinops.KFACLinearOperator(
        head, torch.nn.CrossEntropyLoss(reduction="sum"), list(head.parameters()), data,
        fisher_type="type-2", check_deterministic=False,
    )  # fmt: skip
    A, G = kfac_factors(setup)[2]
    dense = _dense(kfac, sum(p.numel() for p in head.parameters()))
    w = head[1].weight.numel()
    assert relative_error(dense[:w, :w], torch.kron(G, A)) <= 1e-12


@pytest.mark.parametrize("operator", ["HessianLinearOperator", "GGNLinearOperator"])
def test_operators_on_a_model_with_a_learned_start(operator):
    """``h0 = tanh(init(x))``: the start's parameters get zero rows, as on the unrolled
    twin (torch's raw "not used in the graph" before, from the Hessian and the GGN)."""
    torch.manual_seed(0)
    model = LearnedStart().double()
    twin = LearnedStart(unrolled=True).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    size = sum(p.numel() for p in model.parameters())
    got, expected = (
        _dense(getattr(curvlinops, operator)(
            m, torch.nn.CrossEntropyLoss(), list(m.parameters()), [(x, y)]), size)
        for m in (model, twin)
    )  # fmt: skip
    assert relative_error(got, expected) <= 1e-10
