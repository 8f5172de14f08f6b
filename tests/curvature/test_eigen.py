"""Extreme eigenpairs: bounded work on badly scaled operators, repeated eigenvalues, order.

The operators are dense symmetric matrices ``Q diag(λ) Qᵀ`` with a chosen spectrum (``Q``
from the QR of a seeded Gaussian matrix), so the exact eigenvalues are the chosen ``λ``
up to rounding (``~ε‖H‖``), independent of deqhess. Products are counted by the matrix
itself, not by deqhess's own count.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from problems import tanh_dense
from torch import Tensor

import deqhess as dh
import deqhess.curvature.lanczos as lanczos
from deqhess.curvature import EigenResult, default_max_hvps, extreme_eigenpairs
from deqhess.operator import Operator


class Matrix(Operator):
    """A dense symmetric matrix as an operator, counting the columns it is applied to."""

    symmetric = True

    def __init__(self, matrix: Tensor) -> None:
        self.matrix, self.products = matrix, 0
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def matmat(self, block: Tensor) -> Tensor:
        self.products += block.shape[1]
        return self.matrix @ block


def _with_spectrum(values: Tensor, seed: int = 0) -> Matrix:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g))
    return Matrix((q * values) @ q.T)


def test_the_smallest_of_a_badly_scaled_operator_stop_at_a_cap_set_by_k():
    """The issue's case: P = 400, eigenvalues spread over 1e-8 … 1e4 (a continuum of
    near-zero ones at the bottom). No Krylov method separates the bottom four to 1e-10·‖H‖
    in a few hundred products (ARPACK ran 64,021 before failing); the run stops at the
    default cap 300·(k + 1) = 1,500 — whatever P — with the named error reporting the Ritz
    values reached and their residuals, each of which bounds the distance to a true
    eigenvalue (checked against the chosen spectrum: Weyl's bound for a unit vector)."""
    values = torch.logspace(-8, 4, 400)
    op = _with_spectrum(values)
    with pytest.raises(dh.AnalysisConvergenceError) as caught:
        extreme_eigenpairs(op, k=4, which="smallest", dense_below=0, progress=False)
    error = caught.value
    assert isinstance(error, dh.ConvergenceError)  # caught by what caught it before
    cap = default_max_hvps(4)
    assert cap == 1500 and error.max_hvps == cap
    assert op.products == error.num_hvps <= cap
    text = str(error)
    for phrase in ("cap of 1500 products (max_hvps)", "Ritz values [", "residuals [",
                   "tol >= ", "Loosen tol, raise max_hvps"):  # fmt: skip
        assert phrase in text, phrase
    reached = error.result
    assert isinstance(reached, EigenResult) and reached.num_hvps == error.num_hvps
    assert reached.eigenvalues.shape == (4,) and reached.eigenvectors.shape == (400, 4)
    gaps = (reached.eigenvalues[:, None] - values[None]).abs().min(1).values
    assert torch.all(gaps <= reached.residuals * (1 + 1e-6) + 1e-9)
    # the reported residuals are the true ones (the recurrence's, to rounding)
    v = reached.eigenvectors
    true = torch.linalg.vector_norm(op.matrix @ v - v * reached.eigenvalues, dim=0)
    assert torch.allclose(true, reached.residuals, rtol=1e-6, atol=1e-9 * float(values.max()))
    # looser, as the error suggests: accepted, and the bound still holds
    loose = float(text.split("tol >= ")[1].split(" ")[0]) * 1.01
    found = extreme_eigenpairs(op, 4, "smallest", tol=loose, dense_below=0, progress=False,
                               max_hvps=error.num_hvps)  # fmt: skip
    gaps = (found.eigenvalues[:, None] - values[None]).abs().min(1).values
    assert torch.all(gaps <= found.residuals * (1 + 1e-9))


def test_a_well_separated_end_of_the_same_spectrum_converges_quickly():
    """The top of that spectrum (1e4, 9.3e3, …: relative gaps of 7%) takes few products
    and is exact to its residual ≤ 1e-10·‖H‖."""
    values = torch.logspace(-8, 4, 400)
    op = _with_spectrum(values)
    top = extreme_eigenpairs(op, k=4, which="largest", dense_below=0, progress=False)
    assert top.num_hvps == op.products <= 200
    assert float(top.residuals.max()) <= 1e-10 * 1e4 * 1.5  # the final product's rounding
    assert torch.allclose(top.eigenvalues, values[-4:], rtol=0, atol=1e-9 * 1e4)


def test_a_repeated_eigenvalue_is_found_with_every_copy():
    """A PSD operator of rank 40 in P = 300 (like a loss curvature with fewer outputs than
    parameters): 0 has multiplicity 260. A Krylov space from one vector holds one copy
    of it, so single-vector Lanczos returned 0 and then the smallest *nonzero*
    eigenvalues, with residuals ≤ 1e-10·‖H‖ — genuine eigenpairs, not the smallest. The
    default block of k vectors finds k copies."""
    g = torch.Generator().manual_seed(1)
    values = torch.cat([torch.zeros(260), 1 + 9 * torch.rand(40, generator=g)])
    op = _with_spectrum(values, seed=1)
    bottom = extreme_eigenpairs(op, k=4, which="smallest", dense_below=0, progress=False)
    assert float(bottom.eigenvalues.abs().max()) <= 1e-9
    assert float(bottom.residuals.max()) <= 1e-9
    v = bottom.eigenvectors
    assert torch.allclose(v.T @ v, torch.eye(4), atol=1e-10)
    # one vector per step (block_size=1) misses copies — rounding brought in a second
    # one here — and reports nonzero eigenvalues as among the smallest, residuals tiny
    single = extreme_eigenpairs(op, 4, "smallest", dense_below=0, progress=False, block_size=1)
    assert float(single.eigenvalues.max()) >= 1.0 and float(single.residuals.max()) <= 1e-8


def _assert_null_pairs(result: EigenResult, matrix: Tensor, tol: float = 1e-10) -> None:
    """The ``k`` smallest pairs of a PSD ``matrix`` whose ``k`` smallest eigenvalues are 0.

    Checked with the matrix itself, not deqhess's residuals: orthonormal vectors to
    rounding (``k·ε`` ≪ 1e-12), each true residual within the stated ``tol·‖H‖`` (plus
    1e-13·‖H‖ for this recomputation's own rounding), and so each eigenvalue within it
    of 0 — the nearest eigenvalue, the others being at least 1.
    """
    scale = float(torch.linalg.matrix_norm(matrix, ord=2))
    v, k = result.eigenvectors, len(result.eigenvalues)
    true = torch.linalg.vector_norm(matrix @ v - v * result.eigenvalues, dim=0)
    assert float(true.max()) <= (tol + 1e-13) * scale, true.tolist()
    assert float(torch.linalg.matrix_norm(v.T @ v - torch.eye(k))) <= 1e-12
    assert float(result.eigenvalues.abs().max()) <= (tol + 1e-13) * scale


def test_the_reported_rank_deficient_case_returns_its_zeros_within_tol():
    """The report: P = 400, PSD of rank 20, k = 8. Lanczos' block lost orthogonality (1e-5)
    once the Krylov space filled the range, and returned eigenvalues down to −2.9e-7 with
    true residuals up to 5.6e-5 against tol·‖H‖ = 1e-9, without an error."""
    torch.manual_seed(0)
    size, rank = 400, 20
    q, _ = torch.linalg.qr(torch.randn(size, size))
    values = torch.cat([torch.zeros(size - rank), torch.rand(rank) * 10 + 1])
    op = Matrix((q * values) @ q.T)
    _assert_null_pairs(extreme_eigenpairs(op, k=8, which="smallest", progress=False), op.matrix)


@pytest.mark.parametrize("rank", [10, 20, 40])
def test_the_smallest_of_rank_deficient_operators_are_true_orthonormal_pairs(rank):
    """A sweep: seeds × k × rank, P = 150, PSD with 0 of multiplicity ``P − rank``. Before
    the fix 24 of these 48 runs returned pairs with true residuals up to 21·‖H‖ (and
    eigenvalues down to −646) or ‖VᵀV − I‖ up to 2.6, all reported as converged."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        values = torch.cat([torch.zeros(150 - rank), 1 + 10 * torch.rand(rank, generator=g)])
        op = _with_spectrum(values, seed=seed)
        for k in (4, 6, 8, 10):
            result = extreme_eigenpairs(op, k, "smallest", dense_below=0, progress=False)
            _assert_null_pairs(result, op.matrix)


def test_the_smallest_of_a_deq_loss_curvature_of_rank_20():
    """A real operator: the loss curvature ``Zᵀ ∇²ₕL Z`` of a batched tanh DEQ (n = 10,
    B = 2, L strictly convex in h: rank 20 in P = 190). k = 8 returned an eigenvalue of
    −8e-7 with a true residual of 4.8e-5 before the fix. Checked against the operator's
    own matrix (its products on the identity), the operator being what is analysed."""
    c = tanh_dense(0, n=10, m=8, b=2)
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, tol=1e-14, atol=1e-15, batch_dim=0)
    op = eq.hessian_operator(c.loss, "loss_curvature")
    matrix = op.matmat(torch.eye(op.shape[0]))
    matrix = 0.5 * (matrix + matrix.T)
    assert int(torch.linalg.matrix_rank(matrix)) == 20
    result = extreme_eigenpairs(op, 8, "smallest", dense_below=0, progress=False)
    _assert_null_pairs(result, matrix, tol=1e-10 + 1e-12)  # + the matrix's asymmetry


class Inexact(Matrix):
    """The matrix with an error in each product: ``A v + δ‖v‖ g``, ``g`` Gaussian afresh
    (an inexact Hessian-vector product: solves to a loose tolerance, float32)."""

    def __init__(self, matrix: Tensor, error: float) -> None:
        super().__init__(matrix)
        self.error, self.generator = error, torch.Generator().manual_seed(0)

    def matmat(self, block: Tensor) -> Tensor:
        noise = torch.randn(block.shape, generator=self.generator)
        return super().matmat(block) + self.error * noise * torch.linalg.vector_norm(block, dim=0)


def test_pairs_a_product_does_not_confirm_raise_with_the_products_residuals():
    """An operator inexact to 1e-9 (its products' own residual ~1.4e-8 at P = 200),
    tol·‖H‖ = 8e-10: Lanczos' recurrence, which takes its products as exact, reaches tol;
    the Rayleigh–Ritz step's product does not confirm it, more steps do not either, and
    the cap ends the run with the product's residuals in the error — never returned as
    converged (before, they were, with residuals 27× tol)."""
    values = torch.cat([torch.linspace(0, 1, 197), torch.tensor([3.0, 5.0, 8.0])])
    op = Inexact(_with_spectrum(values, seed=4).matrix, 1e-9)
    with pytest.raises(
        dh.AnalysisConvergenceError, match="recomputed from a product only 0 were"
    ) as caught:
        extreme_eigenpairs(op, 3, dense_below=0, progress=False, max_hvps=300)
    reached, text = caught.value.result, str(caught.value)
    assert "Loosen tol." in text and "residuals from the product [" in text
    assert caught.value.num_hvps == op.products == reached.num_hvps
    v = reached.eigenvectors
    assert torch.allclose(v.T @ v, torch.eye(3), atol=1e-12)
    exact = torch.linalg.vector_norm(op.matrix @ v - v * reached.eigenvalues, dim=0)
    assert torch.all(reached.residuals > 8e-10) and torch.all(exact <= reached.residuals * 2)
    assert torch.allclose(reached.eigenvalues, values[-3:], atol=1e-7)
    # a product accurate to 1e-12 confirms at once: 18 products, one confirmation's 3
    # among them
    fine = Inexact(op.matrix, 1e-12)
    found = extreme_eigenpairs(fine, 3, dense_below=0, progress=False, max_hvps=300)
    assert found.num_hvps == fine.products and float(found.residuals.max()) <= 8e-10


def test_a_refuted_confirmation_lets_the_run_go_on(monkeypatch):
    """The first confirmation is made to fail (its residuals reported 10× larger, as a
    product's rounding near tol can): the run goes on, confirms later, and returns
    pairs within tol; each confirmation's k products are counted, on top of the cap."""
    values = torch.cat([torch.linspace(0, 1, 197), torch.tensor([3.0, 5.0, 8.0])])
    op = _with_spectrum(values, seed=4)
    confirmations, confirm = [], lanczos.rayleigh_ritz

    def once_refuted(op, vectors, target, scale):
        pairs = confirm(op, vectors, target, scale)
        confirmations.append(pairs)
        if len(confirmations) > 1:
            return pairs
        return dataclasses.replace(pairs, residuals=10 * target + pairs.residuals, converged=False)

    monkeypatch.setattr(lanczos, "rayleigh_ritz", once_refuted)
    found = extreme_eigenpairs(op, 3, dense_below=0, progress=False, max_hvps=30)
    assert len(confirmations) == 2 and confirmations[1].converged
    assert found.num_hvps == op.products  # Lanczos' products (≤ 30) and 2 × 3 confirming
    plain = extreme_eigenpairs(_with_spectrum(values, seed=4), 3, dense_below=0, progress=False)
    assert found.num_hvps >= plain.num_hvps + 1 + 3  # one more step at least, and 3 more
    assert float(found.residuals.max()) <= 1e-10 * 8
    assert torch.allclose(found.eigenvalues, values[-3:], atol=1e-9)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("dense_below", [0, 400], ids=["lanczos", "dense"])
def test_eigenvalues_are_ascending_whatever_was_asked(which, dense_below):
    """One order everywhere: ascending, pairs aligned (``Hv = λv`` column by column), on
    both routes; ``magnitude`` picks by |λ| and still sorts by value."""
    values = torch.cat([torch.tensor([-9.0, -7.0]), torch.linspace(-1, 1, 394),
                        torch.tensor([5.0, 6.0, 8.0, 10.0])])  # fmt: skip
    op = _with_spectrum(values, seed=2)
    result = extreme_eigenpairs(op, k=4, which=which, dense_below=dense_below, progress=False)
    expected = {
        "largest": [5.0, 6.0, 8.0, 10.0],
        "smallest": [-9.0, -7.0, -1.0, -1 + 2 / 393],
        "magnitude": [-9.0, -7.0, 8.0, 10.0],
    }[which]
    assert torch.allclose(result.eigenvalues, torch.tensor(expected), atol=1e-9)
    assert torch.all(result.eigenvalues[1:] >= result.eigenvalues[:-1])
    v = result.eigenvectors
    assert torch.allclose(op.matrix @ v, v * result.eigenvalues, atol=1e-8)
    assert torch.allclose(result.residuals, torch.linalg.vector_norm(op.matrix @ v -
                          v * result.eigenvalues, dim=0), atol=1e-12)  # fmt: skip


def test_float32_converges_with_its_default_tolerance():
    """In float32 the default tol is 1e-5·‖H‖ (1e-10 would be below its rounding)."""
    values = torch.cat([torch.linspace(0, 1, 296), torch.tensor([2.0, 3.0, 4.0, 5.0])])
    op = Matrix(_with_spectrum(values, seed=3).matrix.float())
    top = extreme_eigenpairs(op, k=3, dense_below=0, progress=False)
    assert top.eigenvalues.dtype == torch.float32
    assert torch.allclose(top.eigenvalues.double(), torch.tensor([3.0, 4.0, 5.0]), atol=1e-4)
    assert float(top.residuals.max()) <= 1e-4 * 5


def test_the_progress_bar_counts_products_against_the_cap(capsys):
    values = torch.cat([torch.linspace(0, 1, 296), torch.tensor([2.0, 3.0, 4.0, 5.0])])
    op = _with_spectrum(values, seed=3)
    extreme_eigenpairs(op, k=2, dense_below=0, progress=True)
    err = capsys.readouterr().err
    assert "Lanczos (largest 2)" in err and f"/{default_max_hvps(2)}" in err
    assert math.isclose(default_max_hvps(2), 900)


class StreamedMatrix(Matrix):
    """A matrix whose every product stands for a pass over a data set (``streamed``),
    recording the width of each block it is applied to."""

    streamed = True

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(matrix)
        self.widths: list[int] = []

    def matmat(self, block: Tensor) -> Tensor:
        self.widths.append(block.shape[1])
        return super().matmat(block)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_a_streamed_operator_is_run_in_blocks_of_2k_and_its_pairs_hold(which):
    """A model's or data set's operator pays a pass per product whatever its width: the
    default block is 2k there (1 elsewhere for the top), and the pairs still meet tol."""
    values = torch.linspace(-3.0, 5.0, 300, dtype=torch.float64)
    streamed, plain = StreamedMatrix(_with_spectrum(values).matrix), _with_spectrum(values)
    k = 4
    result = extreme_eigenpairs(streamed, k=k, which=which, tol=1e-10, progress=False)
    assert max(streamed.widths) == 2 * k
    assert len(streamed.widths) < result.num_hvps / k  # passes, not products
    extreme_eigenpairs(plain, k=k, which="largest", tol=1e-10, progress=False)
    want = {"largest": values[-k:], "smallest": values[:k],
            "magnitude": values[values.abs().argsort()[-k:]].sort().values}[which]  # fmt: skip
    assert torch.allclose(result.eigenvalues, want, atol=1e-8)
    v = result.eigenvalues
    true = torch.linalg.vector_norm(
        streamed.matrix @ result.eigenvectors - result.eigenvectors * v, dim=0
    )
    assert float(true.max()) <= 1e-10 * 5.0 * 1.01


def test_model_and_dataset_operators_are_streamed_and_an_equilibrium_is_not():
    c = tanh_dense(0)
    eq = dh.Equilibrium(c.f, c.theta, c.x, c.h0, batch_dim=0)
    assert not eq.hessian_operator(c.loss).streamed

    def loss(h, theta, y):
        return (h - y).pow(2).mean()

    data = [(c.x, torch.zeros_like(c.h0))] * 2
    dataset = dh.DatasetEquilibrium(
        c.f, c.theta, data, loss, init_state=lambda x: x.new_zeros(x.shape[0], 5)
    )
    assert dataset.hessian_operator().streamed
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    curvature = dh.ModelCurvature(model, torch.nn.MSELoss(), [(c.x, torch.zeros(3, 2))])
    assert curvature.hessian_operator().streamed and curvature.ggn_operator().streamed


def test_the_bottom_of_a_wide_null_space_on_a_streamed_operator():
    """A GGN's null space (224 zero eigenvalues of P = 272, the rest from 1e-7 up): k = 1
    smallest with the default block (8 on a streamed operator) meets tol; the pair is a
    null vector, orthonormal, its residual measured."""
    values = torch.cat([torch.zeros(224), torch.logspace(-7, 0, 48)]).double()
    op = StreamedMatrix(_with_spectrum(values, seed=2).matrix)
    result = extreme_eigenpairs(op, k=1, which="smallest", tol=1e-10, progress=False)
    v = result.eigenvectors
    assert max(op.widths) == 8
    assert abs(float(result.eigenvalues[0])) <= 1e-10
    assert float(torch.linalg.vector_norm(op.matrix @ v - v * result.eigenvalues)) <= 1e-10
    # a block of 2 stalls there: within a cap of the caller's, the message says what works
    # (and speaks of no spread among one Ritz value)
    with pytest.raises(dh.AnalysisConvergenceError, match="a larger k") as caught:
        extreme_eigenpairs(op, k=1, which="smallest", tol=1e-10, block_size=2, max_hvps=600,
                           progress=False)  # fmt: skip
    assert "of each other" not in str(caught.value)
    # within the default cap (600 ≥ P + k), the stalled run ends in the dense eigh: exact
    dense = extreme_eigenpairs(op, k=1, which="smallest", block_size=2, progress=False)
    assert abs(float(dense.eigenvalues[0])) <= 1e-12 and dense.num_hvps <= 600
    v = dense.eigenvectors
    assert float(torch.linalg.vector_norm(op.matrix @ v - v * dense.eigenvalues)) <= 1e-12


def test_many_pairs_of_a_small_operator_are_taken_densely():
    """k = 40 pairs at P = 272: Lanczos took 359 (largest) and 682 (smallest) products of a
    random symmetric matrix; by default ``P ≤ 8k`` is formed with P products and
    diagonalised, exact; an explicit ``dense_below`` still chooses."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(272, 272, dtype=torch.float64, generator=g)
    h = (a + a.T) / 2
    exact = torch.linalg.eigvalsh(h)
    for which, want in (("largest", exact[-40:]), ("smallest", exact[:40])):
        found = extreme_eigenpairs(Matrix(h), 40, which, progress=False)
        assert found.num_hvps <= 272 + 40  # the matrix, and the residuals of the 40 pairs
        assert torch.allclose(found.eigenvalues, want, atol=1e-12)
    assert extreme_eigenpairs(Matrix(h), 40, progress=False, dense_below=0).num_hvps > 272


def _reference(matrix: Tensor, k: int, which: str) -> Tensor:
    """The ``k`` wanted eigenvalues by ``eigvalsh``, ascending (``"magnitude"``: by ``|λ|``,
    the spectra below having no tie in ``|λ|`` at the boundary)."""
    values = torch.linalg.eigvalsh(matrix)
    if which == "largest":
        return values[-k:]
    if which == "smallest":
        return values[:k]
    return values[torch.argsort(values.abs(), stable=True)[-k:]].sort().values


def _null_with(values: list[float], size: int = 120) -> Tensor:
    return torch.tensor(values + [0.0] * (size - len(values)))


INDEFINITE_RANK_4 = _null_with([-244.0, -3.0, 0.3, 55.0])
FEW_DISTINCT = torch.tensor([3.0] * 10 + [-2.0] * 10 + [1.0] * 100)

# (spectrum, which, k, block_size): every one of these returned wrong eigenvalues before
# the fix, the first [-244, -3, 0, 0.3, 55] as the 5 largest (the other end of the spectrum)
EXHAUSTED = {
    "indefinite-rank-4-largest-5": (INDEFINITE_RANK_4, "largest", 5, None),
    "indefinite-rank-4-largest-8-block-4": (INDEFINITE_RANK_4, "largest", 8, 4),
    "indefinite-rank-4-smallest-5-block-1": (INDEFINITE_RANK_4, "smallest", 5, 1),
    "indefinite-rank-3-largest-12": (_null_with([5.0, 3.0, -2.0]), "largest", 12, None),
    "indefinite-rank-3-smallest-8-block-2": (_null_with([5.0, 3.0, -2.0]), "smallest", 8, 2),
    "negative-rank-1-largest-3": (_null_with([-5.0]), "largest", 3, None),
    "rank-1-smallest-5-block-1": (_null_with([5.0]), "smallest", 5, 1),
    "repeated-top-largest-3": (_null_with([9.0, 9.0, 9.0, 1.0, -1.0]), "largest", 3, None),
    "repeated-top-largest-12-block-4": (_null_with([9.0] * 3 + [1.0, -1.0]), "largest", 12, 4),
    "few-distinct-magnitude-8": (FEW_DISTINCT, "magnitude", 8, None),
}  # fmt: skip


@pytest.mark.parametrize("case", EXHAUSTED.values(), ids=EXHAUSTED.keys())
def test_an_exhausted_krylov_space_goes_on_from_random_directions(case):
    """A spectrum of few distinct values (0 of multiplicity up to 119 in P = 120): the
    Krylov space becomes invariant after a few steps (its dimension about the number of
    distinct eigenvalues), every Ritz pair then has a residual ~1e-15, and Lanczos
    returned them — eigenvalues from the other end of the spectrum among "the 5 largest".
    It now goes on from random directions orthogonal to the basis, and stops only when
    what lies outside can hold nothing beyond the wanted values. Each eigenvalue is
    compared with ``eigvalsh``: to 1e-8·‖H‖, 100× the default tol·‖H‖ = 1e-10·‖H‖ that
    each residual meets, which bounds the distance to the nearest eigenvalue (Weyl)."""
    values, which, k, block = case
    for seed in range(2):
        op = _with_spectrum(values, seed=seed)
        result = extreme_eigenpairs(
            op, k, which, dense_below=0, progress=False, block_size=block, seed=seed
        )
        scale = float(values.abs().max())
        expected = _reference(op.matrix, k, which)
        assert torch.allclose(result.eigenvalues, expected, rtol=0, atol=1e-8 * scale), (
            result.eigenvalues.tolist(), expected.tolist(),
        )  # fmt: skip
        assert float(result.residuals.max()) <= 1e-10 * scale


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_rank_one_and_zero_operators_with_k_beyond_the_rank(which):
    """k = 5 of a rank-1 operator (its one eigenvalue negative: the largest are zeros) and
    of the zero matrix, in blocks of 1 and 3: the largest of ``−5 u uᵀ`` came back as
    [−5, 0, 0]."""
    for values in (_null_with([-5.0]), _null_with([5.0]), torch.zeros(120)):
        for block in (1, 3):
            op = _with_spectrum(values)
            result = extreme_eigenpairs(
                op, 5, which, dense_below=0, progress=False, block_size=block
            )
            expected = _reference(op.matrix, 5, which)
            assert torch.allclose(result.eigenvalues, expected, rtol=0, atol=1e-8 * 5)


def test_the_largest_of_a_low_rank_deq_hessian():
    """The adversarial report, smaller: the Hessian of a DEQ on one sample with a wide
    input (n = 2, m = 25: P = 56, θ entering through W, b and U x, so of rank at most
    n² + 2n = 8, here 4, with eigenvalues of both signs around a null space of dimension
    52). ``which="largest"`` returned its negative eigenvalues as among the 5 largest
    (−244.65 in place of 0 at P = 306). Compared with ``eigvalsh`` of the operator's own
    matrix to 1e-8·‖H‖ (100× the tol·‖H‖ its residuals meet)."""
    g = torch.Generator().manual_seed(0)
    n, m = 2, 25
    w = torch.randn(n, n, generator=g)
    theta = {
        "W": 0.5 * w / torch.linalg.matrix_norm(w, 2),
        "U": torch.randn(n, m, generator=g) / m**0.5,
        "b": 0.1 * torch.randn(n, generator=g),
    }
    x, y = torch.randn(1, m, generator=g), torch.randn(1, n, generator=g)

    def f(x, h, t):
        return torch.tanh(h @ t["W"].T + x @ t["U"].T + t["b"])

    eq = dh.Equilibrium(f, theta, x, torch.zeros(1, n), tol=1e-14, atol=1e-15, batch_dim=0)
    op = eq.hessian_operator(lambda h: ((h - y) ** 2).sum())
    matrix = op.matmat(torch.eye(op.shape[0]))
    matrix = 0.5 * (matrix + matrix.T)
    scale = float(torch.linalg.matrix_norm(matrix, 2))
    for which in ("largest", "smallest"):
        for k in (5, 8):
            result = extreme_eigenpairs(op, k, which, dense_below=0, progress=False)
            expected = _reference(matrix, k, which)
            assert torch.allclose(result.eigenvalues, expected, rtol=0, atol=1e-8 * scale), (
                which, k, result.eigenvalues.tolist(), expected.tolist(),
            )  # fmt: skip


@pytest.mark.parametrize(("k", "shown"), [(2.0, r"2\.0 \(float\)\. Pass e\.g\. k=2\."),
                                          (True, r"True \(bool\)\.")])  # fmt: skip
def test_a_k_that_is_not_an_int_is_refused_by_name(k, shown):
    """``k=2.0`` was a raw ``TypeError: slice indices must be integers``."""
    op = _with_spectrum(torch.linspace(1.0, 2.0, 12))
    with pytest.raises(dh.InputError, match=f"^k must be an int; got {shown}"):
        extreme_eigenpairs(op, k=k, progress=False)
    assert op.products == 0
