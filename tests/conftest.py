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
