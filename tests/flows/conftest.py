"""Flow tests check exactness, so they run in float64 by default (as zuko's conftest does)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
