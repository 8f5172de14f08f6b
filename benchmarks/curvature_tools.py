"""The other tools of ``vs_curvlinops.py``, each as the products a user of it would call.

Every adapter takes a :class:`curvature_models.Problem` and returns results in deqhess's
convention — the data-set mean loss (curvlinops' and hessian-eigenthings' own; laplace-
torch sums, so its matrices are divided by N; PyHessian weights batches by their size),
parameters flattened in ``model.parameters()`` order, float64 on the CPU — so they compare
entry by entry with deqhess's. A tool that is not installed is ``None``; one that fails
on the model raises, and the benchmark prints its error.

* curvlinops (``HessianLinearOperator``, ``GGNLinearOperator``; ``check_deterministic=False``
  as deqhess checks nothing either): its own block product, all columns of a block in
  one ``vmap`` per batch (a dense matrix is ``op @ I``);
* laplace-torch (``GGNInterface.full`` per batch): its torch.func route (``jacrev`` of the
  batch's output, then ``Jᵀ ∇²ℓ J``: N·C Jacobian rows instead of P products), and its
  backends' own ``full`` (Curvlinops, ASDL, BackPACK);
* PyHessian (``hessian(model, criterion, dataloader=...)``): HVPs by double backward,
  eigenvalues by power iteration with deflation (its defaults: tol 1e-3, 100 iterations);
* hessian-eigenthings (``HessianOperator`` + ``lanczos`` with full reorthogonalisation,
  which it turns off by default past 50 steps: without it, 60 steps gave a ghost copy of
  the top eigenvalue three times).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable

import numpy as np
import torch
from curvature_models import Problem
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _eye(p: int, like: Tensor) -> Tensor:
    return torch.eye(p, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------- curvlinops
def curvlinops_operator(problem: Problem, kind: str):
    """curvlinops' ``HessianLinearOperator`` or ``GGNLinearOperator`` of the problem."""
    import curvlinops

    cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator}
    params = [p for p in problem.model.parameters() if p.requires_grad]
    return cls[kind](
        problem.model,
        problem.loss_func,
        params,
        problem.data,
        check_deterministic=False,
        progressbar=False,
    )


def curvlinops_dense(op) -> Tensor:
    p = op.shape[0]
    like = next(iter(op._params))
    return op @ _eye(p, like)


def counted_scipy(matvec: Callable[[np.ndarray], np.ndarray], p: int) -> LinearOperator:
    """A SciPy operator from ``matvec`` on ``[P]`` / ``[P, K]`` arrays, counting products
    in ``.count``."""

    def apply(a: np.ndarray) -> np.ndarray:
        apply.count += 1 if a.ndim == 1 else a.shape[1]
        return matvec(a)

    apply.count = 0
    op = LinearOperator((p, p), matvec=apply, matmat=apply, dtype=np.float64)
    op.counter = apply
    return op


def curvlinops_top(op, k: int, tol: float, v0: np.ndarray) -> tuple[np.ndarray, int]:
    """The ``k`` largest eigenvalues of curvlinops' operator by SciPy's ``eigsh`` (ARPACK),
    as deqhess's ``extreme_eigenpairs`` runs it; returns them ascending and the HVPs."""
    like = next(iter(op._params))

    def matvec(a: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(a, dtype=like.dtype, device=like.device)
        return (op @ t).cpu().numpy()

    scipy_op = counted_scipy(matvec, op.shape[0])
    values = eigsh(scipy_op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(values), scipy_op.counter.count


# ---------------------------------------------------------------------- laplace-torch
def laplace_backends() -> dict[str, Callable[[Problem], Tensor]]:
    """laplace-torch's dense GGN routes that import here, each ``problem ↦ [P, P]`` (mean)."""
    if not installed("laplace"):
        return {}
    import laplace.curvature as lc

    def summed(make: Callable, route: Callable | None = None) -> Callable[[Problem], Tensor]:
        def run(problem: Problem) -> Tensor:
            model = copy.deepcopy(problem.model)
            model.output_size = problem.classes  # the ASDL and BackPACK Jacobians read it
            with warnings.catch_warnings():  # BackPACK's notes on modules it cannot extend
                warnings.simplefilter("ignore", UserWarning)
                backend = make(model, "classification")
                full = route.__get__(backend) if route is not None else backend.full
                total = sum(full(x, y)[1] for x, y in problem.data)
            return total / problem.num_samples

        return run

    routes = {"laplace-torch, torch.func Jacobians": summed(lc.CurvlinopsGGN, lc.GGNInterface.full)}
    for name in ("CurvlinopsGGN", "AsdlGGN", "BackPackGGN"):
        if hasattr(lc, name):
            routes[f"laplace-torch, {name}.full"] = summed(getattr(lc, name))
    return routes


# ---------------------------------------------------------------------- PyHessian
class PyHessianTool:
    """PyHessian's ``hessian`` object on the problem's batches, in float64."""

    def __init__(self, problem: Problem) -> None:
        from pyhessian import hessian

        self.device = problem.data[0][0].device
        with _default_dtype(torch.float64):
            self.hessian = hessian(
                problem.model,
                problem.loss_func,
                dataloader=problem.data,
                cuda=self.device.type == "cuda",
            )
        self.count = 0
        product = self.hessian.dataloader_hv_product

        def counted(v):
            self.count += 1
            return product(v)

        self.hessian.dataloader_hv_product = counted

    def hvp(self, v: Tensor) -> Tensor:
        pieces = _split(v.to(self.device), self.hessian.params)
        with _default_dtype(torch.float64):
            _, hv = self.hessian.dataloader_hv_product(pieces)
        return torch.cat([h.reshape(-1) for h in hv])

    def top(self, k: int) -> tuple[np.ndarray, int]:
        self.count = 0
        torch.manual_seed(0)
        with _default_dtype(torch.float64):
            values, _ = self.hessian.eigenvalues(top_n=k)
        return np.sort(np.asarray(values)), self.count


# ---------------------------------------------------------------------- hessian-eigenthings
class EigenthingsTool:
    """hessian-eigenthings' ``HessianOperator`` (data-set mean) and its ``lanczos``."""

    def __init__(self, problem: Problem) -> None:
        import hessian_eigenthings as he

        self.he = he
        self.op = he.HessianOperator(
            problem.model, problem.data, he.supervised_loss(problem.loss_func)
        )
        self.count = 0
        matvec = self.op.matvec

        def counted(v):
            self.count += 1
            return matvec(v)

        self.op.matvec = counted

    def hvp(self, v: Tensor) -> Tensor:
        return self.op.matvec(v)

    def top(self, k: int, steps: int, tol: float) -> tuple[np.ndarray, int]:
        self.count = 0
        result = self.he.lanczos(
            self.op, k=k, which="LA", max_iter=steps, tol=tol, reorthogonalize=True, seed=0
        )
        return np.sort(result.eigenvalues.cpu().numpy()), self.count


def _split(v: Tensor, params) -> list[Tensor]:
    sizes = [p.numel() for p in params]
    return [piece.reshape(p.shape) for piece, p in zip(v.split(sizes), params, strict=True)]


class _default_dtype:
    """PyHessian draws its vectors with the default dtype: float64 while it runs (and
    torch's note on its ``backward(create_graph=True)`` is silenced)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.quiet = warnings.catch_warnings()

    def __enter__(self) -> None:
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        self.quiet.__enter__()
        warnings.filterwarnings("ignore", "Using backward.. with create_graph=True")

    def __exit__(self, *exc) -> None:
        self.quiet.__exit__(*exc)
        torch.set_default_dtype(self.previous)
