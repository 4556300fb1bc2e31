"""``train.test_every``: a learning curve of the test bound (issue 14's long runs), logged
only -- never read back by checkpoint selection, early stopping or the RNG stream."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_train import DATA, _assert_same_checkpoints, _cfg
from vaeflow.config import ConfigError
from vaeflow.data import batches, load_splits, prepare_eval
from vaeflow.run import train as train_mod
from vaeflow.run.checkpoint import load_checkpoint
from vaeflow.run.logger import read_metrics
from vaeflow.run.train import train

COMMON = (
    "train.steps=30",
    "train.val_every=10",
    "train.ckpt_every=10",
    "train.ema_decay=0.9",
    "train.val_size=100",
)


def _curve(run_dir, tag: str) -> dict[int, float]:
    return {r["step"]: r[tag] for r in read_metrics(run_dir) if tag in r}


def test_the_test_curve_is_logged_and_changes_nothing_else(tmp_path):
    """Every ``test_every`` steps and at the last step: the test ELBO and IWAE-k (k =
    ``test_k``), finite, IWAE >= ELBO (the same k draws); the checkpoints, the validation
    and training scalars are bit-identical to a run without the curve."""
    plain = train(_cfg(*COMMON), tmp_path / "plain")
    curved = train(
        _cfg(*COMMON, "train.test_every=12", "train.test_size=200", "train.test_k=7"),
        tmp_path / "curved",
    )
    elbo = _curve(tmp_path / "curved", "test_curve/elbo_nats")
    iwae = _curve(tmp_path / "curved", "test_curve/iwae_k7_nats")
    assert sorted(elbo) == sorted(iwae) == [12, 24, 30]
    assert all(math.isfinite(v) and v < 0 for v in elbo.values())
    assert all(iwae[s] >= elbo[s] for s in elbo), (elbo, iwae)
    assert not _curve(tmp_path / "plain", "test_curve/elbo_nats")

    assert plain["best_step"] == curved["best_step"]
    for name in ("last.pt", "best.pt"):
        _assert_same_checkpoints(
            load_checkpoint(tmp_path / f"plain/checkpoints/{name}"),
            load_checkpoint(tmp_path / f"curved/checkpoints/{name}"),
        )
    for tag in ("val/elbo_nats", "val/iwae_k10_nats", "train/loss_nats"):
        assert _curve(tmp_path / "plain", tag) == _curve(tmp_path / "curved", tag), tag


def test_the_curve_scores_the_fixed_random_test_subset(tmp_path, monkeypatch):
    """``test_size`` picks :func:`vaeflow.data.batches.test_subset`'s examples (the ones
    ``eval.n_test`` scores; not the first N of a sorted file), with ``test_k`` samples
    (``val_k`` when unset)."""
    seen = []
    real = train_mod.validate_bounds

    def spy(model, x, k, batch_size):
        seen.append((x.clone(), k))
        return real(model, x, k, batch_size)

    monkeypatch.setattr(train_mod, "validate_bounds", spy)
    train(_cfg(*COMMON[:1], "train.val_every=30", "train.test_every=30", "train.test_size=64"),
          tmp_path / "run")  # fmt: skip
    splits = load_splits("mnist", DATA)
    x = prepare_eval(splits.test, splits.kind, "dynamic", 0)
    indices, _ = batches.test_subset(len(x), 64)
    assert indices is not None and indices[-1] > 64  # not the first 64
    tests = [(xs, k) for xs, k in seen if xs.shape[0] == 64]
    assert len(tests) == 1 and tests[0][1] == 10  # val_k of TINY
    torch.testing.assert_close(tests[0][0], x[indices], rtol=0, atol=0)


def test_test_curve_keys_are_checked():
    for bad, match in [
        ("train.test_every=-1", "train.test_every must be >= 0"),
        ("train.test_size=0", "train.test_size must be >= 1"),
        ("train.test_k=0", "train.test_k must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _cfg(bad)
