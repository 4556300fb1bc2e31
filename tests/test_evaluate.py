"""The k-sample evaluation's pass shape: chosen for the device unless the config sets it."""

from __future__ import annotations

import pytest
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


# ----------------------------------------------------------------------------- resumable


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 20-step real MNIST run (TINY of test_train), trained once for the tests below."""
    from tests.test_train import _cfg
    from vaeflow.run.train import train

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    train(
        _cfg("train.steps=20", "train.val_every=20", "eval.n_test=60", "eval.batch_size=10"),
        run_dir,
    )
    (run_dir / "summary.json").unlink(missing_ok=True)  # train() alone does not evaluate
    return run_dir


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make the ``calls``-th batch of the k-sample estimator raise KeyboardInterrupt."""
    from vaeflow.models.vae import VAE

    real, seen = VAE.log_likelihood, [0]

    def flaky(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] == calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "log_likelihood", flaky)


def test_an_interrupted_evaluation_resumes_to_the_same_numbers(
    short_run, tmp_path, monkeypatch, capsys
):
    """Killed after two of six batches, the evaluation leaves its scores and random state
    in ``eval_partial.*.pt`` (no summary.json); the next call scores the other four
    batches only and writes exactly what an uninterrupted evaluation writes, then removes
    the partial file."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    monkeypatch.setattr(ev, "PARTIAL_EVERY_S", 0.0)  # save after every batch
    args = {"data_root": DATA, "k": 20, "chunk": 7}
    whole = tmp_path / "whole"
    shutil.copytree(short_run, whole)
    reference = ev.evaluate_run(whole, **args)
    assert reference["test/n_examples"] == 60 and not list(whole.glob("eval_partial.*"))

    run = tmp_path / "interrupted"
    shutil.copytree(short_run, run)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_run(run, **args)
    (partial,) = run.glob("eval_partial.*.pt")
    assert not (run / "summary.json").exists()
    assert ev.load_checkpoint(partial)["n_done"] == 20  # batch size 10: two batches scored

    counted = []
    real = ev.VAE.log_likelihood
    monkeypatch.setattr(
        ev.VAE, "log_likelihood", lambda self, *a, **kw: counted.append(1) or real(self, *a, **kw)
    )
    resumed = ev.evaluate_run(run, **args)
    assert "20 of 60 test examples scored" in capsys.readouterr().out
    assert len(counted) == 4
    for name, value in reference.items():
        if name not in ("run_dir", "test/seconds_per_example"):
            assert resumed[name] == value, name
    assert not list(run.glob("eval_partial.*"))


def test_a_partial_of_another_evaluation_or_unreadable_is_not_used(
    short_run, tmp_path, monkeypatch
):
    """Another setting (k) keeps its own partial file; a corrupt one is reported and the
    evaluation starts over -- never a mix of two evaluations' scores."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    monkeypatch.setattr(ev, "PARTIAL_EVERY_S", 0.0)
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_run(run, data_root=DATA, k=20, chunk=7)
    (k20,) = run.glob("eval_partial.*.pt")
    ev.evaluate_run(run, data_root=DATA, k=5, chunk=5)  # another k: its own file
    assert k20.exists() and len(list(run.glob("eval_partial.*.pt"))) == 1
    k20.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        result = ev.evaluate_run(run, data_root=DATA, k=20, chunk=7)
    assert result["test/n_examples"] == 60 and not k20.exists()
