"""Shared test settings: float64 by default, deterministic seeds, one thread.

One intra-op thread: the test problems are small, and on a shared 2-core machine torch's
two threads stall each other (the suite ran 87 s with two, 57 s with one). Tests that
need several threads (the MKL hang guard) start their own processes.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Each device a test should run on: the CPU, and a CUDA device where torch sees one
    (skipped elsewhere), so the first run on a GPU machine needs no code change."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here (torch.cuda.is_available() is False)")
    return torch.device(request.param)
