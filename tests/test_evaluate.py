"""The k-sample evaluation's pass shape: chosen for the device unless the config sets it."""

from __future__ import annotations

import torch

from vaeflow.run.evaluate import SAMPLES_PER_PASS, eval_pass_shape


def test_pass_shape_targets_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # k = 5000 on a CPU: one example's 1,000 samples per pass; on a GPU: 20 examples x 5000.
    assert eval_pass_shape(5000, cpu) == (1, 1000)
    assert eval_pass_shape(5000, cuda) == (20, 5000)
    # Small k: the batch takes what the chunk cannot.
    assert eval_pass_shape(100, cpu) == (10, 100)
    for device in (cpu, cuda):
        for k in (1, 7, 100, 5000, 50000):
            b, c = eval_pass_shape(k, device)
            assert 1 <= c <= k and b >= 1
            assert b * c <= SAMPLES_PER_PASS[device.type]
            assert b * c >= min(k, SAMPLES_PER_PASS[device.type]) // 2


def test_given_values_are_kept() -> None:
    cpu = torch.device("cpu")
    assert eval_pass_shape(5000, cpu, chunk=500, batch_size=20) == (20, 500)
    assert eval_pass_shape(5000, cpu, chunk=250) == (4, 250)
    assert eval_pass_shape(5000, cpu, batch_size=4) == (4, 250)


def test_conv_decoders_and_other_devices_get_smaller_passes() -> None:
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert eval_pass_shape(5000, cuda, conv=True) == (1, 5000)
    assert eval_pass_shape(5000, cpu, conv=True) == (1, 1000)
    assert eval_pass_shape(100, cuda, conv=True) == (50, 100)
    assert eval_pass_shape(5000, mps) == eval_pass_shape(5000, cpu)
