"""Guards of the dense LU: the MKL batched-LU hang, and non-finite Jacobians.

The hang is reproduced only in a subprocess with a deadline: the test suite's own process
never calls ``torch.set_num_threads`` (which arms it) nor a raw batched LU of wide blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import deqhess as dh
from deqhess.linear import DenseLU
from deqhess.linear.dense import BATCHED_LU_MAX_WIDTH, _condition_estimate, lu_factor_blocks

SRC = str(Path(__file__).resolve().parents[2] / "src")

# Guarded factorisations first (deqhess's paths), then the raw batched call that hangs.
SCRIPT = textwrap.dedent(
    """
    import torch
    from deqhess.linear import DenseLU
    from deqhess.linear.dense import lu_factor_blocks

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    jacobian = 0.5 * torch.randn(4, 256, 256, generator=g, dtype=torch.float64) / 16
    system = torch.eye(256, dtype=torch.float64) - jacobian
    lu, pivots, info = lu_factor_blocks(system)
    solver = DenseLU(jacobian)
    rhs = torch.randn(4, 256, dtype=torch.float64)
    residual = torch.einsum("sij,sj->si", system, solver.solve(rhs)) - rhs
    print("guarded", int(info.max()), float(residual.abs().max()), flush=True)
    import deqhess as dh

    w = 0.5 * torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))[0]
    x = torch.randn(4, 256, generator=g, dtype=torch.float64)
    eq = dh.Equilibrium(lambda x, h, w: torch.tanh(h @ w.T + x), w, x, batch_dim=0)
    eq.grad(lambda h: h.pow(2).sum())
    print("equilibrium", flush=True)
    torch.linalg.lu_factor_ex(system)
    print("raw done", flush=True)
    """
)


def _run_until_settled(script: str, deadline: float, grace: float) -> tuple[str, bool]:
    """Run ``script``; return its output and whether it was still running ``grace`` seconds
    after MKL's error line appeared (or at ``deadline``) — then it is killed."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"deqhess-mkl-{os.getpid()}.log"
    env = {**os.environ, "PYTHONPATH": SRC}
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
        start, error_seen = time.monotonic(), None
        try:
            while process.poll() is None:
                now = time.monotonic()
                if error_seen is None and "oneMKL ERROR" in log.read_text():
                    error_seen = now
                if now - start > deadline or (error_seen and now - error_seen > grace):
                    return log.read_text(), True
                time.sleep(0.2)
            return log.read_text(), False
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.unlink(missing_ok=True)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the hang is MKL's")
def test_batched_lu_hang_is_reproduced_and_the_guarded_path_completes():
    """After ``set_num_threads(2)`` the guarded LU, DenseLU and an Equilibrium gradient
    with 4 samples of width 256 complete (the LU solves to rounding: 1e-12 with
    cond(I − J) ≈ 3); the raw batched call then hangs after MKL's DLASWP error (the rest
    of the test is skipped where this torch/MKL does not hang)."""
    output, hung = _run_until_settled(SCRIPT, deadline=240.0, grace=5.0)
    guarded = [line for line in output.splitlines() if line.startswith("guarded")]
    assert guarded, f"the guarded factorisation did not complete:\n{output}"
    _, info, residual = guarded[0].split()
    assert int(info) == 0 and float(residual) <= 1e-12
    assert "equilibrium" in output.splitlines(), output
    if "raw done" in output:
        pytest.skip("this torch/MKL does not hang on a batched LU of 256 × 256 blocks")
    assert hung and "Parameter 6 was incorrect on entry to DLASWP" in output


def test_lu_factor_blocks_matches_one_block_at_a_time():
    """Wide blocks take the per-block path, narrow ones the batched call; both give
    ``lu_factor_ex``'s own factors (the same LAPACK getrf: identical to rounding), in its
    column-major layout (a row-major stack made every ``lu_solve`` copy the LU first)."""
    g = torch.Generator().manual_seed(1)
    for width in (BATCHED_LU_MAX_WIDTH - 1, BATCHED_LU_MAX_WIDTH + 1):
        system = torch.eye(width) + 0.3 * torch.randn(3, width, width, generator=g) / width**0.5
        lu, pivots, info = lu_factor_blocks(system)
        assert lu.shape == system.shape and pivots.shape == (3, width) and info.shape == (3,)
        assert lu.mT.is_contiguous(), lu.stride()
        for s in range(3):
            lu_s, pivots_s, info_s = torch.linalg.lu_factor_ex(system[s])
            assert torch.allclose(lu[s], lu_s, rtol=0, atol=1e-14)
            assert torch.equal(pivots[s], pivots_s) and int(info[s]) == int(info_s) == 0


def test_nan_jacobian_raises_instead_of_a_nan_gradient():
    """``f = 0.5·t·sqrt(h²)`` from h0 = 0 stays at h* = 0, where ∂f/∂h = 0.5·t·h/|h| is
    0/0: LAPACK's gecon returned NaN, reported as condition number 0.0, and the gradient
    came back NaN."""

    def f(x, h, t):
        return 0.5 * t * torch.sqrt(h**2)

    eq = dh.Equilibrium(f, torch.tensor(0.7), torch.zeros(3), torch.zeros(3))
    with pytest.raises(
        dh.NonFiniteError, match=r"∂f/∂h at the fixed point has 9 non-finite .* of 9"
    ) as error:
        eq.grad(lambda h: (h**2).sum())
    assert "sqrt(h² + ε)" in str(error.value)
    assert error.value.quantity == "∂f/∂h"


def test_non_finite_jacobian_names_its_block():
    j = torch.zeros(3, 2, 2)
    j[2, 0, 1] = float("inf")
    with pytest.raises(
        dh.NonFiniteError, match=r"1 non-finite .* of 12 \(first in sample block 2\)"
    ):
        DenseLU(j)


def test_overflowing_lu_gives_a_nan_condition_error():
    """A finite J whose LU overflows: the block's 1-norm is inf and gecon cannot estimate;
    the NaN must raise, not vanish in ``max(0.0, nan)``."""
    j = 1e308 * torch.tensor([[[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]])
    system = torch.eye(3) - j
    lu, _, _ = torch.linalg.lu_factor_ex(system)
    condition, inverse_norm = _condition_estimate(system, lu)
    assert condition != condition and inverse_norm != inverse_norm  # NaN
    with pytest.raises(dh.SingularSystemError, match=r"condition number of I − ∂f/∂h .* is NaN"):
        DenseLU(j)
