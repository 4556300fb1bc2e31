"""Shared fixtures: every test starts from a fixed seed; flow tests run in float64;
hypothesis runs derandomised."""

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (derandomised: the seed comes from
# the test itself, and no example database carries state between runs), so a red run
# is reproduced by running it again. HYPOTHESIS_PROFILE=explore searches afresh.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


@pytest.fixture
def data_init_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the batches ``vaeflow train`` ran its data-dependent init pass on
    (``vaeflow.run.train._data_dependent_init``, still run), one entry per pass."""
    import vaeflow.run.train as train_mod

    calls: list[tuple[int, ...]] = []
    real = train_mod._data_dependent_init

    def counting(model, x, seed):
        calls.append(tuple(x.shape))
        real(model, x, seed)

    monkeypatch.setattr(train_mod, "_data_dependent_init", counting)
    return calls


# The long end-to-end checks (real training runs, subprocesses, benchmarks, ODE solves):
# `pytest -m "not slow"` skips them for a fast local loop (about a minute); CI runs all.
# A node id containing any of these strings is marked slow.
SLOW = (
    "tests/test_compiled_step.py::test_compiled",
    "tests/test_ddp.py",
    "tests/test_benchmarks_smoke.py",
    "tests/test_sweep.py::test_tiny_real_sweep",
    "tests/test_sweep_cluster.py::test_submitit_local_sweep",
    "tests/test_sweep_cluster.py::test_preempted_job",
    "tests/test_train.py",
    "tests/test_iaf_code_weight_norm.py::test_training_runs_the_init_pass_once",
    "tests/test_toy2d.py",
    "tests/test_docs.py::test_some_docstring_examples_exist",
    "ffjord",
    "tests/flows/test_continuous.py",
    "tests/test_likelihoods.py::test_mixture_three_channels_exhaustive",
    "tests/test_data.py::test_binarized_mnist_is_the_standard_file",
    "tests/test_data.py::test_cifar10",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(s in item.nodeid for s in SLOW):
            item.add_marker(pytest.mark.slow)
