"""Shared fixtures: every test starts from a fixed seed; flow tests run in float64."""

import pytest
import torch

# The tests run many tiny ops; intra-op threads only add contention on 2-core machines
# (measured ~20x slower with 2 threads while another process ran).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
