"""A batch's dense GGN added by its upper triangle, mirrored once: ``Jᵀ(∇²ℓ J)``, or the
Gram matrix of ``RJ`` where ``∇²ℓ = RᵀR`` (pivoted Cholesky), by BLAS ``syrk``.

References: the plain products in the same dtype (float64 to 1e-13 of the largest
entry: a few roundings of O(M) sums; float32 to 1e-5), and, on models, the matrix-free
GGN products (``op @ V``, P directions through each batch's graph, no Jacobian rows) —
the cases an eigen-factored ``∇²ℓ`` got 50% (and one output's whole block) wrong.
"""

from __future__ import annotations

import pytest
import torch
from models import Cell
from problems import relative_error
from torch import nn

import deqhess as dh
from deqhess.models.symmetric import (
    SymmetricProduct,
    curvature_times,
    loss_factor,
    mirror_upper_,
)
from deqhess.nn import DEQ


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("m, p, width", [(12, 37, 3), (12, 5, 4), (7, 1, 7), (30, 600, 10)])
def test_the_upper_block_triangle_is_the_product(dtype, tol, m, p, width):
    g = torch.Generator().manual_seed(m + p)
    jacobian = torch.randn(m, p, dtype=dtype, generator=g)
    blocks = torch.randn(m // width, width, width, dtype=dtype, generator=g)
    indefinite = torch.block_diag(*(blocks + blocks.transpose(1, 2)))
    for curvature in (indefinite, indefinite + 0.1):  # per sample, and coupled
        product = curvature_times(curvature, jacobian)
        assert relative_error(product, curvature @ jacobian) <= tol
        term = SymmetricProduct(jacobian, product)
        total = mirror_upper_(term.add_to(term.add_to(None, 2.0), 0.5))
        want = 2.5 * jacobian.T @ curvature @ jacobian
        assert float((total - want).abs().max()) <= tol * float(want.abs().max())
        assert torch.equal(total, total.T)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("contiguous", [True, False])  # syrk, or the column blocks
def test_a_gram_term_is_its_rows_gram_matrix(dtype, tol, contiguous):
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(23, 301, dtype=dtype, generator=g)
    storage = torch.zeros(301, 301, dtype=dtype)
    total = storage if contiguous else torch.zeros(301, 302, dtype=dtype)[:, 1:]
    term = SymmetricProduct(rows)
    out = mirror_upper_(term.add_to(term.add_to(total, 0.5), 2.0))
    assert out.data_ptr() == total.data_ptr()  # in place, either way
    want = 2.5 * rows.T @ rows
    assert float((out - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("samples, classes", [(5, 4), (1, 3), (3, 1)])
def test_a_positive_semi_definite_loss_curvature_factors_block_by_block(samples, classes):
    g = torch.Generator().manual_seed(samples)
    logits = torch.randn(samples, classes, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, 1)
    curvature = torch.block_diag(*(torch.diag(q) - torch.outer(q, q) for q in p))
    factor = loss_factor(curvature)
    assert factor is not None and factor.shape == (samples * max(classes - 1, 0), samples * classes)
    jacobian = torch.randn(samples * classes, 9, generator=g, dtype=torch.float64)
    gram = (factor @ jacobian).T @ (factor @ jacobian)
    for got, want, tol in ((factor.T @ factor, curvature, 1e-14),
                           (gram, jacobian.T @ curvature @ jacobian, 1e-13)):  # fmt: skip
        # (one class: ∇²ℓ = 0, no rows, and both sides exactly zero)
        assert float((got - want).abs().max()) <= tol * float(want.abs().max())


def test_an_indefinite_loss_curvature_keeps_the_direct_product():
    curvature = torch.block_diag(*[torch.tensor([[1.0, 2.0], [2.0, 1.0]])] * 3).double()
    assert loss_factor(curvature) is None


class _FrozenSecondOutput(nn.Module):
    """``[head(DEQ(encoder(x))), 0]``: the second output does not depend on θ."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.deq, self.head = (
            nn.Linear(3, 5),
            DEQ(Cell(5), tol=1e-13),
            nn.Linear(5, 1),
        )

    def forward(self, x):
        first = self.head(self.deq(self.encoder(x)))
        return torch.cat([first, torch.zeros_like(first)], 1)


def test_a_loss_stiff_along_an_output_the_parameters_do_not_move():
    """Per sample ``∇²ℓ = [[2, √K], [√K, K]]``, K = 2⁵², and ``J``'s second row zero: the
    GGN is ``2 J₁ᵀJ₁``. A factor of ``∇²ℓ`` (accurate to ``ε·K ≈ 1``) had lost half of it."""
    stiff, e = 2.0**52, 2.0**-26

    def loss(o, y):
        a, b = o[:, 0] - y[:, 0], o[:, 1] - y[:, 1]
        return (0.5 * stiff * (b + e * a) ** 2 + 0.5 * (a - e * b) ** 2).sum()

    data = [(torch.randn(s, 3), torch.randn(s, 2)) for s in (4, 6)]
    curvature = dh.ModelCurvature(_FrozenSecondOutput(), loss, data, reduction="sum")
    dense = curvature.ggn_operator().to_dense()
    assert "pivoted Cholesky" in curvature.info.assembly["ggn"]
    products = curvature.ggn_operator() @ torch.eye(curvature.num_parameters)
    assert relative_error(dense, products) <= 1e-12


class _TwoHeads(nn.Module):
    """A classification head (2 classes) and a regression head (3 outputs) on one DEQ."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.deq = nn.Linear(3, 6), DEQ(Cell(6), tol=1e-13)
        self.classes, self.values = nn.Linear(6, 2), nn.Linear(6, 3)

    def forward(self, x):
        h = self.deq(self.encoder(x))
        return self.classes(h), self.values(h)


@pytest.mark.parametrize("samples", [18, 19])  # output-major rows: blocks found, or not
def test_a_heavily_weighted_task_keeps_the_other_tasks_block(samples):
    weight = 1e13

    def loss(out, y):
        return nn.functional.cross_entropy(out[0], y) + weight * ((out[1] - 1) ** 2).mean()

    g = torch.Generator().manual_seed(samples)
    data = [(torch.randn(samples, 3, generator=g), torch.randint(0, 2, (samples,), generator=g))]
    curvature = dh.ModelCurvature(_TwoHeads(), loss, data)
    dense = curvature.ggn_operator().to_dense()  # P = 101 > 5·18, 5·19
    assert "output Jacobians" in curvature.info.assembly["ggn"]
    assert "pivoted Cholesky" in curvature.info.assembly["ggn"]  # one block, or per sample
    products = curvature.ggn_operator() @ torch.eye(curvature.num_parameters)
    layout = curvature.layout
    start = sum(n for name, n in zip(layout.names, layout.numels, strict=True)
                if layout.names.index(name) < layout.names.index("classes.weight"))  # fmt: skip
    rows = slice(start, start + 6 * 2 + 2)  # classes.weight and classes.bias
    assert relative_error(dense[rows, rows], products[rows, rows]) <= 1e-9
    assert relative_error(dense, products) <= 1e-12


def test_a_non_finite_loss_curvature_is_named():
    model = nn.Sequential(nn.Linear(3, 5), DEQ(Cell(5), tol=1e-13), nn.Linear(5, 3))

    def loss(o, y):  # finite, but NaN derivatives where o < 0
        return torch.sqrt(o).nan_to_num().sum()

    data = [(torch.randn(4, 3), torch.randn(4, 3))]
    with pytest.raises(dh.NonFiniteError, match="the loss curvature at the output"):
        dh.ModelCurvature(model, loss, data).ggn_operator().to_dense()


@pytest.mark.parametrize("loss_kind", ["convex", "concave"])
def test_a_model_ggn_factored_or_not_equals_its_products(loss_kind):
    """Squared error (∇²ℓ ⪰ 0: factored) and a cosine loss (indefinite ∇²ℓ: the direct
    product), each against the matrix-free GGN products."""
    model = nn.Sequential(nn.Linear(3, 5), DEQ(Cell(5), tol=1e-13), nn.Linear(5, 2)).double()

    def loss(o, y):
        if loss_kind == "convex":
            return ((o - y) ** 2).sum()
        return torch.cos(o - y).sum()

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(s, 3, generator=g, dtype=torch.float64),
             torch.randn(s, 2, generator=g, dtype=torch.float64)) for s in (4, 5)]  # fmt: skip
    curvature = dh.ModelCurvature(model, loss, data)
    dense = curvature.ggn_operator().to_dense()
    said = curvature.info.assembly["ggn"]
    assert ("pivoted Cholesky" in said) == (loss_kind == "convex"), said
    products = curvature.ggn_operator() @ torch.eye(curvature.num_parameters, dtype=torch.float64)
    assert relative_error(dense, products) <= 1e-12
    assert torch.equal(dense, dense.T)
