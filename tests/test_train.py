"""The training loop on real MNIST: learning, resume, robustness, logs, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaeflow.atomic import atomic_temp_files, remove_stale_temps
from vaeflow.cli import main as cli_main
from vaeflow.config import ConfigError, load_config
from vaeflow.run.checkpoint import CheckpointError, load_checkpoint
from vaeflow.run.evaluate import evaluate_run
from vaeflow.run.logger import read_metrics
from vaeflow.run.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("VAEFLOW_DATA") or str(ROOT.parent / "shared" / "datasets")

TINY = [
    f'data.root="{DATA}"',
    "data.batch_size=50",
    "data.eval_batch_size=250",
    "model.latent_dim=8",
    "model.encoder.options={hidden=[64]}",
    "model.decoder.options={hidden=[64]}",
    'model.posterior.flow="iaf"',
    "model.posterior.num_layers=1",
    "model.posterior.hidden=32",
    "model.posterior.context_features=8",
    'model.prior.name="flow"',
    'model.prior.flow="realnvp"',
    "model.prior.num_layers=2",
    "model.prior.hidden=16",
    "train.lr=2e-3",
    "train.val_size=500",
    "train.val_k=10",
    "train.log_every=10",
    "train.device=cpu",
    "eval.k=20",
    "eval.chunk=10",
    "eval.n_test=100",
]


def _cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short real MNIST run shared by the read-only tests below."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = _cfg(
        "train.steps=300",
        "train.val_every=100",
        "train.ckpt_every=100",
        "train.image_every=300",
        "train.ema_decay=0.99",
    )
    summary = train(cfg, run_dir)
    return run_dir, summary


def test_short_mnist_run_learns(trained_run):
    run_dir, summary = trained_run
    assert summary["status"] == "completed" and summary["step"] == 300
    vals = [r["val/elbo_nats"] for r in read_metrics(run_dir) if "val/elbo_nats" in r]
    assert len(vals) == 3
    assert vals[-1] > vals[0], f"validation ELBO did not improve: {vals}"
    # A model that ignores z can at best learn each pixel's marginal (~206 nats on MNIST):
    # beating that baseline clearly means the latents carry information.
    from vaeflow.data import load_splits, prepare_eval

    splits = load_splits("mnist", DATA)
    p = (splits.train.double() / 255).mean(0).clamp(1e-6, 1 - 1e-6)
    xv = prepare_eval(splits.val[:500], "binary", "dynamic", 0).double()
    baseline = (xv * p.log() + (1 - xv) * (1 - p).log()).sum((1, 2, 3)).mean().item()
    assert vals[-1] > baseline + 5, (vals, baseline)
    assert all(math.isfinite(v) for v in vals)
    for f in (
        "config.json",
        "environment.json",
        "metrics.jsonl",
        "train_summary.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run_dir / f).exists(), f
    assert list((run_dir / "samples").glob("*.png"))


def test_tensorboard_has_the_expected_tags(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained_run
    acc = EventAccumulator(
        str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0}
    )
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss_nats",
        "train/elbo_nats",
        "train/kl_nats",
        "train/grad_norm",
        "train/lr",
        "train/beta",
        "train/skipped_steps",
        "train/flow_logdet_nats",
        "val/elbo_nats",
        "val/iwae_k10_nats",
        "val/active_units",
        "val/flow_logdet_nats",
    ):
        assert tag in scalars, tag
    assert {"val/reconstructions", "val/prior_samples_t1", "val/prior_samples_t0.7"} <= set(
        acc.Tags()["images"]
    )
    assert {"val/posterior_mean", "val/flow_logdet"} <= set(acc.Tags()["histograms"])
    # TIME SERIES groups every kind of card by the tag's first segment, sorted by name,
    # and opens the first two: the image grids live in the split groups, so nothing sorts
    # before the curves but the eval's one row of test numbers.
    groups = {
        t.split("/")[0] for kind in ("scalars", "images", "histograms") for t in acc.Tags()[kind]
    }
    assert groups == {"train", "val"}, groups
    # The SCALARS tab opens on the curves: no single-point hparam/* charts. The HParams
    # row's columns are the test metrics (filled by `vaeflow eval`) and validation
    # curves, and its hyperparameters start with the model's keys, not the data's.
    assert not [t for t in scalars if t.startswith("hparam")]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]
    ).experiment
    columns = [m.name.tag for m in experiment.metric_infos]
    assert columns[:2] == ["test/nll_iw20_nats", "test/elbo_nats"] and "val/elbo_nats" in columns
    assert experiment.hparam_infos[0].name.startswith("model.")


SCHEDULES = {
    "constant": [],
    "warmup+cosine": ['train.lr_schedule="cosine"', "train.lr_warmup_steps=15"],
    "exponential": ['train.lr_schedule="exponential"', "train.lr_decay_every=7"],
    "multistep": ['train.lr_schedule="multistep"', "train.lr_milestones=[12, 23, 31]"],
    "slow+delayed prior": ["train.prior_lr_scale=0.3", "train.prior_freeze_steps=25"],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_kill_and_resume_equals_uninterrupted(tmp_path, schedule):
    """Bit for bit, also under learning-rate schedules (a resume that restarted the
    schedule, or lost its step, changes every update after the kill)."""
    cfg = _cfg(
        "train.steps=40",
        "train.val_every=20",
        "train.ckpt_every=10",
        "train.ema_decay=0.9",
        "train.kl_warmup_steps=20",
        *SCHEDULES[schedule],
    )
    train(cfg, tmp_path / "full")
    # "Killed" after step 25: the last checkpoint is from step 20; resume from there.
    train(cfg, tmp_path / "killed", stop_after_step=25)
    assert load_checkpoint(tmp_path / "killed/checkpoints/last.pt")["step"] == 20
    train(cfg, tmp_path / "killed", resume=True)
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "killed/checkpoints/last.pt")
    assert a["step"] == b["step"] == 40
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["ema"]["updates"] == b["ema"]["updates"] == 40
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key


# Saves a checkpoint as train() does, but stalls between writing the bytes and the rename
# (where a preemption's SIGKILL can land), saying so on stdout.
_STALLED_WRITER = """
import os, sys, time
from vaeflow.run.checkpoint import load_checkpoint, save_checkpoint

def stall(src, dst):
    print("written", flush=True)
    time.sleep(600)

path = sys.argv[1]
state = load_checkpoint(path)
os.replace = stall
save_checkpoint(path, state)
"""


def test_kill_inside_a_checkpoint_write_then_resume_leaves_no_temp_file(tmp_path, capsys):
    """A run SIGKILLed while writing last.pt leaves the write's temp file (as large as a
    checkpoint); resuming removes it and says so; the checkpoint still loads."""
    cfg = _cfg("train.steps=10", "train.val_every=5", "train.ckpt_every=5", "train.log_every=5")
    run = tmp_path / "run"
    train(cfg, run, stop_after_step=5)
    last = run / "checkpoints" / "last.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    writer = subprocess.Popen(
        [sys.executable, "-c", _STALLED_WRITER, str(last)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout.readline() == "written\n"
        (temp,) = atomic_temp_files(run, recursive=True)
        assert temp.parent == last.parent and temp.stat().st_size > 0.9 * last.stat().st_size
        # While the writer lives its temp file is in use: nobody may remove it.
        assert remove_stale_temps(run, recursive=True) == [] and temp.exists()
    finally:
        writer.kill()  # SIGKILL: no finally, no atexit; the temp file stays
        writer.wait()
        writer.stdout.close()
    assert temp.exists()
    capsys.readouterr()

    summary = train(cfg, run, resume=True)
    assert summary["step"] == 10
    assert [p for p in run.rglob("*") if p.name.endswith(".tmp")] == []
    assert torch.load(last, weights_only=True)["step"] == 10
    assert f"removed 1 temporary file left by an interrupted write in {run}: " in (
        capsys.readouterr().out
    )

    # vaeflow eval cleans the run's top level (an interrupted summary.json write), and
    # leaves checkpoints/ to the run's training, which may still be writing there.
    stale_summary = run / ".summary.json.ab12cd34.tmp"
    stale_best = run / "checkpoints" / ".best.pt.ab12cd34.tmp"
    for p in (stale_summary, stale_best):
        p.write_bytes(b"x")
    evaluate_run(run, checkpoint="last", data_root=DATA, k=2, chunk=2, n_test=10)
    assert not stale_summary.exists() and stale_best.exists()


def test_nan_loss_is_skipped_counted_and_logged(tmp_path, monkeypatch):
    from vaeflow.models import vae as vae_mod

    original = vae_mod.VAE.forward
    calls = {"n": 0}

    def flaky(self, x, k=1):
        calls["n"] += 1
        terms = original(self, x, k)
        if self.training and calls["n"] in (3, 4):
            return type(terms)(terms.log_px_z * float("nan"), terms.log_pz, terms.log_qz)
        return terms

    monkeypatch.setattr(vae_mod.VAE, "forward", flaky)
    summary = train(_cfg("train.steps=10", "train.val_every=10"), tmp_path / "nan")
    assert summary["skipped_steps"] == 2 and summary["status"] == "completed"
    logged = [
        r["train/skipped_steps"]
        for r in read_metrics(tmp_path / "nan")
        if "train/skipped_steps" in r
    ]
    assert logged[-1] == 2
    ckpt = load_checkpoint(tmp_path / "nan/checkpoints/last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(("delay", "stop_step"), [(0, 30), (50, 70)])
def test_early_stopping_counts_after_its_delay(tmp_path, monkeypatch, delay, stop_step):
    """A validation bound that only gets worse after step 10: stop after 2 bad validations,
    counted from the start, or only after ``early_stopping_delay`` steps (as the VampPrior
    and Sylvester codes count only after the KL warm-up). The best checkpoint stays."""
    from vaeflow.run import train as train_mod

    def worsening(model, ema, x_val, cfg, logger, state):
        return {"val/iwae": -float(state.step), "val/elbo_nats": -float(state.step)}

    monkeypatch.setattr(train_mod, "_validate", worsening)
    cfg = _cfg(
        "train.steps=100",
        "train.val_every=10",
        "train.early_stopping=2",
        f"train.early_stopping_delay={delay}",
    )
    summary = train(cfg, tmp_path / f"es{delay}")
    assert summary["status"] == f"early stopping at step {stop_step}"
    assert summary["step"] == stop_step and summary["best_step"] == 10
    assert load_checkpoint(tmp_path / f"es{delay}/checkpoints/best.pt")["step"] == 10


@pytest.mark.parametrize(("limit", "stops"), [(20.0, True), (60.0, False)])
def test_a_fallen_validation_bound_stops_the_run_as_diverged(tmp_path, monkeypatch, limit, stops):
    """``train.divergence_nats``: validation bounds -100, -90 (best), -140: 50 nats below
    the best stops a 20-nat limit at step 30 (TrainingDiverged naming the fix, last.pt at
    step 30, best.pt at step 20, no summary); a 60-nat limit trains to the end."""
    from vaeflow.run import train as train_mod

    bounds = {10: -100.0, 20: -90.0, 30: -140.0, 40: -135.0}

    def scripted(model, ema, x_val, cfg, logger, state):
        return {"val/iwae": bounds[state.step], "val/elbo_nats": bounds[state.step]}

    monkeypatch.setattr(train_mod, "_validate", scripted)
    cfg = _cfg("train.steps=40", "train.val_every=10", f"train.divergence_nats={limit}")
    run_dir = tmp_path / "run"
    if not stops:
        assert train(cfg, run_dir)["status"] == "completed"
        return
    with pytest.raises(train_mod.TrainingDiverged, match=r"fell to -140.00 nats at step 30.*"
                       r"best \(-90.00 at step 20\).*Lower train.lr"):  # fmt: skip
        train(cfg, run_dir)
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["step"] == 30
    assert load_checkpoint(run_dir / "checkpoints/best.pt")["step"] == 20
    assert not (run_dir / "train_summary.json").exists()


def test_divergence_limit_is_checked(tmp_path):
    from vaeflow.config import ConfigError

    with pytest.raises(ConfigError, match="train.divergence_nats"):
        _cfg("train.divergence_nats=0")
    with pytest.raises(ConfigError, match="train.divergence_nats = 5.0 stops on the validation"):
        _cfg("train.divergence_nats=5", "data.val_size=0")


def test_free_bits_groups_need_a_kl_that_splits(tmp_path):
    """TINY has a RealNVP prior (does not factorise): per-dimension free bits are a config
    error naming the fix, before any run directory exists; one group trains."""
    from vaeflow.config import ConfigError

    with pytest.raises(ConfigError, match="free_bits_group_size = 8 \\(one group"):
        train(_cfg("train.free_bits=0.1", "train.steps=2"), tmp_path / "fb")
    assert not (tmp_path / "fb").exists()
    ok = train(
        _cfg("train.free_bits=0.1", "train.free_bits_group_size=8", "train.steps=2"),
        tmp_path / "fb1",
    )
    assert ok["step"] == 2
    # A Gaussian prior with an IAF posterior splits: groups of 2 train.
    ok = train(
        _cfg(
            "train.free_bits=0.1",
            "train.free_bits_group_size=2",
            'model.prior.name="standard_normal"',
            "model.prior.flow=none",
            "train.steps=2",
        ),
        tmp_path / "fb2",
    )
    assert ok["step"] == 2


@pytest.mark.parametrize("flow", ["planar", "sylvester_orthogonal", "realnvp"])
def test_free_bits_groups_refused_for_a_posterior_whose_log_q_does_not_split(tmp_path, flow):
    """Planar, Sylvester and coupling posteriors give log q only as a whole: groups smaller
    than the latent are a config error (with N(0, I), which factorises), and no run
    directory is left."""
    from vaeflow.config import ConfigError

    cfg = _cfg(
        "train.free_bits=0.1",
        "train.free_bits_group_size=2",
        'model.prior.name="standard_normal"',
        "model.prior.flow=none",
        f'model.posterior.flow="{flow}"',
        "model.posterior.options={}",
        "train.steps=2",
    )
    with pytest.raises(ConfigError, match="do\\s+not split log q"):
        train(cfg, tmp_path / "fb")
    assert not (tmp_path / "fb").exists()


@pytest.mark.parametrize("prior", ['model.prior.name="mog"', 'model.prior.name="vamp"'])
def test_free_bits_groups_with_a_mixture_prior_use_its_chain_rule(tmp_path, prior):
    """A mixture or VampPrior prior does not factorise, but its conditionals are exact: per
    group free bits train, against ``p(z_g | z_<g)`` (the model's ``kl_chain_rule``)."""
    from vaeflow.run import train as train_mod

    cfg = _cfg(
        "train.free_bits=0.1",
        "train.free_bits_group_size=2",
        prior,
        "model.prior.flow=none",
        "model.prior.options={num_components=5}",
        "model.posterior.flow=none",
        "train.steps=2",
    )
    from vaeflow.models.build import build_model

    model = build_model(cfg.model)
    assert not model.kl_splits_over_dimensions  # alone, the mixture gives no dims
    train_mod._check_free_bits(cfg, model)
    assert model.kl_chain_rule and model.kl_splits_over_dimensions
    ok = train(cfg, tmp_path / "fb")
    assert ok["step"] == 2 and ok["skipped_steps"] == 0


def test_prior_learning_rate_and_delay(tmp_path):
    """The prior's parameters learn at lr * prior_lr_scale and not at all during
    prior_freeze_steps; the rest of the model trains as usual."""
    from vaeflow.models.build import build_model

    torch.manual_seed(0)
    init = build_model(_cfg().model).state_dict()
    runs = {
        "frozen": ("train.prior_freeze_steps=10",),
        "zero_lr": ("train.prior_lr_scale=0",),
        "plain": (),
    }
    moved = {}
    for name, extra in runs.items():
        train(_cfg("train.steps=6", "train.val_every=6", *extra), tmp_path / name)
        state = load_checkpoint(tmp_path / name / "checkpoints/last.pt")["model"]
        moved[name] = {
            part: any(not torch.equal(state[k], init[k]) for k in state if k.startswith(part))
            for part in ("prior.", "encoder.", "decoder.")
        }
    assert moved["plain"] == {"prior.": True, "encoder.": True, "decoder.": True}
    for name in ("frozen", "zero_lr"):
        assert moved[name] == {"prior.": False, "encoder.": True, "decoder.": True}, name
    # A frozen prior builds no optimiser state (it starts as a fresh learner when it
    # thaws); the prior's group is the second one.
    opt = load_checkpoint(tmp_path / "frozen/checkpoints/last.pt")["optimizer"]
    prior_ids = set(opt["param_groups"][1]["params"])
    assert prior_ids and not prior_ids & set(opt["state"])
    # Resuming with another prior split is a clear error, not torch's.
    from vaeflow.config import ConfigError

    with pytest.raises(ConfigError, match="prior_lr_scale != 1 or train.prior_freeze_steps"):
        train(_cfg("train.steps=8", "train.val_every=6"), tmp_path / "frozen", resume=True)


def test_vamp_pseudo_inputs_from_training_data(tmp_path):
    """init_from_data: the K pseudo-inputs start as training images (plus 0.01 noise),
    not the N(0.05, 0.01) default; the option is only for the VampPrior."""
    from vaeflow.config import ConfigError
    from vaeflow.data import load_splits

    vamp = ['model.prior.name="vamp"', "model.prior.flow=none", "model.prior.num_components=7"]
    cfg = _cfg(*vamp, "model.prior.init_from_data=true", "train.steps=1", "train.val_every=1")
    seen = {}
    from vaeflow.run import train as train_mod

    original = train_mod._optimizer

    def capture(cfg, model):  # noqa: ANN001, ANN202
        seen["u"] = model.prior.pseudo_inputs().detach().clone()
        return original(cfg, model)

    train_mod._optimizer = capture
    try:
        train(cfg, tmp_path / "vamp")
    finally:
        train_mod._optimizer = original
    u = seen["u"]
    x = load_splits("mnist", DATA).train.float() / 255
    # Every pseudo-input is within the noise of some training image (here: its nearest).
    nearest = torch.cdist(u.flatten(1), x[:50000].flatten(1)).min(1).values
    assert (nearest < 0.01 * 28 * 5).all(), nearest
    assert u.mean() > 0.08  # the default init would be ~0.05 everywhere
    with pytest.raises(ConfigError, match="init_from_data"):
        _cfg("model.prior.init_from_data=true")


def test_repeated_failures_stop_with_a_usable_checkpoint(tmp_path, monkeypatch):
    from vaeflow.models import vae as vae_mod

    original = vae_mod.VAE.forward

    def broken(self, x, k=1):
        terms = original(self, x, k)
        return type(terms)(terms.log_px_z * float("nan"), terms.log_pz, terms.log_qz)

    monkeypatch.setattr(vae_mod.VAE, "forward", broken)
    with pytest.raises(TrainingDiverged, match="consecutive updates skipped"):
        train(_cfg("train.steps=50", "train.max_consecutive_skips=5"), tmp_path / "div")
    ckpt = load_checkpoint(tmp_path / "div/checkpoints/last.pt")
    assert ckpt["step"] == 5


def _poison_training_steps(monkeypatch, nan_steps, huge_steps):
    """Make the training forward of the given steps return a non-finite loss, or one
    scaled by 1e8 (a gradient norm above any sane ``train.skip_grad_norm``); by step, so
    that a resumed run is poisoned at the same steps."""
    from vaeflow.models import vae as vae_mod
    from vaeflow.run import train as train_mod

    original_forward, original_beta = vae_mod.VAE.forward, train_mod._beta
    current = {"step": -1}

    def beta(cfg, step):
        current["step"] = step
        return original_beta(cfg, step)

    def poisoned(self, x, k=1):
        terms = original_forward(self, x, k)
        if self.training and current["step"] in nan_steps:
            return type(terms)(terms.log_px_z * float("nan"), terms.log_pz, terms.log_qz)
        if self.training and current["step"] in huge_steps:
            return type(terms)(terms.log_px_z * 1e8, terms.log_pz, terms.log_qz)
        return terms

    monkeypatch.setattr(train_mod, "_beta", beta)
    monkeypatch.setattr(vae_mod.VAE, "forward", poisoned)


def _assert_same_checkpoints(a, b):
    for part in ("model", "optimizer", "ema"):
        torch.testing.assert_close(a[part], b[part], rtol=0, atol=0, msg=part)
    assert a["step"] == b["step"] and a["train_state"] == b["train_state"]
    assert a["scheduler"] == b["scheduler"]


def test_sync_free_training_equals_the_syncing_loop(tmp_path, monkeypatch):
    """train.sync_free trains bit for bit as the syncing loop: checkpoints (parameters,
    Adam state, EMA, skip counts) and logged scalars, with skipped updates (non-finite
    losses, a gradient norm above skip_grad_norm) and a kill + resume."""
    _poison_training_steps(monkeypatch, nan_steps={3, 4, 22}, huge_steps={12})
    common = (
        "train.steps=30",
        "train.val_every=15",
        "train.ckpt_every=10",
        "train.ema_decay=0.9",
        "train.skip_grad_norm=1e5",
    )
    syncing = train(_cfg(*common), tmp_path / "sync")
    sync_free = train(_cfg(*common, "train.sync_free=true"), tmp_path / "free")
    cfg = _cfg(*common, "train.sync_free=true")
    train(cfg, tmp_path / "killed", stop_after_step=25)
    resumed = train(cfg, tmp_path / "killed", resume=True)
    assert syncing["skipped_steps"] == sync_free["skipped_steps"] == resumed["skipped_steps"] == 4
    ckpt = {n: load_checkpoint(tmp_path / n / "checkpoints/last.pt") for n in ("sync", "free")}
    _assert_same_checkpoints(ckpt["sync"], ckpt["free"])
    _assert_same_checkpoints(
        ckpt["sync"], load_checkpoint(tmp_path / "killed/checkpoints/last.pt")
    )

    def scalars(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / run)]

    logged = scalars("sync")
    assert [r["train/skipped_steps"] for r in logged if "train/skipped_steps" in r] == [2, 3, 4]
    assert str(scalars("free")) == str(logged) == str(scalars("killed"))


def test_sync_free_stops_on_repeated_failures_at_the_next_read(tmp_path, monkeypatch):
    """The consecutive-skip limit is seen at the next periodic step (log_every = 10), not
    at the failing step 4; the checkpoint then written holds the same parameters as the
    syncing loop's (skipped updates do not move them)."""
    _poison_training_steps(monkeypatch, nan_steps=set(range(50)), huge_steps=set())
    for name, extra in (("sync", ()), ("free", ("train.sync_free=true",))):
        with pytest.raises(TrainingDiverged, match="5 consecutive updates skipped at step 4"):
            train(_cfg("train.steps=50", "train.max_consecutive_skips=5", *extra), tmp_path / name)
    sync = load_checkpoint(tmp_path / "sync/checkpoints/last.pt")
    free = load_checkpoint(tmp_path / "free/checkpoints/last.pt")
    assert (sync["step"], free["step"]) == (5, 10)
    assert free["train_state"]["consecutive_skips"] == free["train_state"]["skipped"] == 10
    torch.testing.assert_close(sync["model"], free["model"], rtol=0, atol=0)


_COMPILED = (
    "train.steps=30",
    "train.val_every=15",
    "train.ckpt_every=10",
    "train.ema_decay=0.9",
    "train.kl_warmup_steps=20",
    'train.lr_schedule="cosine"',
    "train.lr_warmup_steps=5",
    "train.clip_norm=50.0",
)


def test_compile_step_resume_continues_identically(tmp_path):
    """train.compile_step: killed after step 25 (last checkpoint at 20) and resumed, a run
    ends with the uninterrupted compiled run's checkpoint bit for bit (model, Adam state,
    schedule, EMA, train state) and logs the same scalars; both equal the eager
    (sync-free) run to float rounding. Checkpoints keep learning rates as floats."""
    torch._dynamo.reset()  # each train() compiles its own step: keep under the cache limit
    cfg = _cfg(*_COMPILED, "train.compile_step=true")
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "killed", stop_after_step=25)
    assert load_checkpoint(tmp_path / "killed/checkpoints/last.pt")["step"] == 20
    train(cfg, tmp_path / "killed", resume=True)
    train(_cfg(*_COMPILED, "train.sync_free=true"), tmp_path / "eager")
    full, killed, eager = (
        load_checkpoint(tmp_path / name / "checkpoints/last.pt")
        for name in ("full", "killed", "eager")
    )
    _assert_same_checkpoints(full, killed)
    assert full["step"] == 30 and full["ema"]["updates"] == 30
    assert isinstance(full["optimizer"]["param_groups"][0]["lr"], float)
    assert all(isinstance(v, float) for v in full["scheduler"]["_last_lr"])

    def scalars(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / run)]

    assert str(scalars("killed")) == str(scalars("full"))
    for part in ("model", "ema"):
        torch.testing.assert_close(full[part], eager[part], rtol=1e-4, atol=1e-5, msg=part)
    # The compiled step keeps state for every parameter; the eager one's is a subset here.
    state = full["optimizer"]["state"]
    torch.testing.assert_close(
        {k: state[k] for k in eager["optimizer"]["state"]},
        eager["optimizer"]["state"],
        rtol=1e-4,
        atol=1e-5,
    )
    assert full["scheduler"] == eager["scheduler"]
    for a, b in zip(scalars("full"), scalars("eager"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (key, a["step"])


def test_cli_trains_with_the_compiled_step(tmp_path, capsys):
    """`vaeflow train ... --set train.compile_step=true` trains through the compiled step
    (one graph) and evaluates."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nname = "cli"\nroot = "' + str(tmp_path) + '"\n')
    args = ["train", str(cfg)] + [a for s in TINY for a in ("--set", s)]
    args += ["--set", "train.steps=4", "--set", "train.val_every=4", "--set", "eval.n_test=10"]
    assert cli_main([*args, "--set", "train.compile_step=true"]) == 0
    assert "test/nll_iw20_nats" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli/config.json").read_text())["train"]["compile_step"]
    summary = json.loads((tmp_path / "cli/train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 4
    assert counters["stats"]["unique_graphs"] == 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    cfg = _cfg("train.steps=10", "train.val_every=10")
    train(cfg, tmp_path / "c")
    last = tmp_path / "c/checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, tmp_path / "c", resume=True)


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = _cfg("train.steps=5", "train.val_every=5")
    train(cfg, tmp_path / "r")
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "r")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.lrr"):
        _cfg("train.lrr=1")
    with pytest.raises(ConfigError, match="model.likelihood"):
        _cfg('model.likelihood="discretized_logistic"')
    with pytest.raises(ConfigError, match="model.x_shape"):
        _cfg('data.dataset="cifar10"', 'model.likelihood="discretized_logistic"')


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.clip_norm=-1.0", "train.clip_norm"),
        ("train.early_stopping=0", "train.early_stopping"),
        ("train.betas=[1.5, 0.9]", "train.betas"),
        ("eval.n_test=-5", "eval.n_test"),
        ("data.val_size=-1", "data.val_size"),
    ],
)
def test_impossible_values_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(override)


def test_unknown_component_is_a_config_error_and_leaves_no_run(tmp_path):
    with pytest.raises(ConfigError, match="cannot build the model"):
        train(_cfg('model.prior.name="nope"'), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_resume_with_changed_config_records_it(tmp_path):
    cfg = _cfg("train.steps=10", "train.val_every=10")
    train(cfg, tmp_path / "r")
    more = _cfg("train.steps=20", "train.val_every=10")
    with pytest.warns(UserWarning, match="changed config"):
        train(more, tmp_path / "r", resume=True)
    assert json.loads((tmp_path / "r/config.json").read_text())["train"]["steps"] == 20
    old = json.loads((tmp_path / "r/config.before_resume_step10.json").read_text())
    assert old["train"]["steps"] == 10


def test_resume_auto_before_and_after_the_first_checkpoint(tmp_path, capsys):
    """A requeued job runs the same command each time: `--resume auto` starts when the
    job died before its first checkpoint and continues after it, and ends exactly where an
    uninterrupted run ends."""
    steps = ["train.steps=30", "train.val_every=30", "train.ckpt_every=10"]
    cfg = _cfg(*steps)
    train(cfg, tmp_path / "full")
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("")
    args = ["train", str(cfg_file), "--run-dir", str(tmp_path / "requeued"), "--no-eval"]
    args += [a for s in [*TINY, *steps] for a in ("--set", s)]
    # Killed before its first checkpoint: a run directory without checkpoints/last.pt.
    train(cfg, tmp_path / "requeued", stop_after_step=5)
    assert not (tmp_path / "requeued/checkpoints/last.pt").exists()
    from vaeflow.run.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):  # plain --resume fails
        train(cfg, tmp_path / "requeued", resume=True)
    from vaeflow.run import train as train_mod

    real = train_mod.train
    stops = iter([15, None])  # the requeued job is killed again after step 15

    def killed_at(cfg, run_dir, resume=False, **kw):  # noqa: ANN001, ANN202
        return real(cfg, run_dir, resume=resume, stop_after_step=next(stops), **kw)

    train_mod.train = killed_at
    try:
        assert cli_main([*args, "--resume", "auto"]) == 0
        assert "no checkpoint yet, starting" in capsys.readouterr().out
        assert load_checkpoint(tmp_path / "requeued/checkpoints/last.pt")["step"] == 10
        assert cli_main([*args, "--resume", "auto"]) == 0
        assert "continuing from checkpoints/last.pt" in capsys.readouterr().out
        # The flag before the config path still means a plain resume (as it always did).
        from vaeflow.cli import _resume_mode, build_parser

        parsed = build_parser().parse_args(["train", "--resume", str(cfg_file)])
        _resume_mode(parsed)
        assert (parsed.config, parsed.resume) == (str(cfg_file), "yes")
        assert cli_main(["train", "--resume", "sometimes", str(cfg_file)]) == 2
        assert "no value other than 'auto'" in capsys.readouterr().err
    finally:
        train_mod.train = real
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "requeued/checkpoints/last.pt")
    assert a["step"] == b["step"] == 30
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_cli_train_eval_sample(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nname = "cli"\nroot = "' + str(tmp_path) + '"\n')
    args = ["train", str(cfg)] + [a for s in TINY for a in ("--set", s)]
    args += ["--set", "train.steps=20", "--set", "train.val_every=20"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "test/nll_iw20_nats" in out and "tensorboard --logdir" in out
    summary = json.loads((tmp_path / "cli/summary.json").read_text())
    assert summary["test/n_examples"] == 100 and math.isfinite(summary["test/nll_iw20_nats"])
    # A reduced evaluation (100 of 10,000 images) stays out of the run's TensorBoard HParams
    # columns; a full one at the config's k fills them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tb_scalars() -> EventAccumulator:
        acc = EventAccumulator(str(tmp_path / "cli"), size_guidance={"scalars": 0})
        acc.Reload()
        return acc

    assert "test/nll_iw20_nats" not in tb_scalars().Tags()["scalars"]
    full = ["eval", str(tmp_path / "cli"), "--k", "20", "--chunk", "20"]
    assert cli_main([*full, "--n-test", "10000"]) == 0
    full_summary = json.loads((tmp_path / "cli/summary.json").read_text())
    assert tb_scalars().Scalars("test/nll_iw20_nats")[-1].value == pytest.approx(
        full_summary["test/nll_iw20_nats"], rel=1e-6
    )
    # Only the HParams columns: each test metric is a one-point chart in the SCALARS
    # tab's first group (TensorBoard sorts groups by name); summary.json has the rest.
    tb_test = {t for t in tb_scalars().Tags()["scalars"] if t.startswith("test/")}
    assert tb_test == {"test/nll_iw20_nats", "test/elbo_nats"}
    capsys.readouterr()
    assert summary["checkpoint"] == "best"  # eval.checkpoint = "auto" with a validation split
    # A reduced evaluation says which examples it scored, and the data it scored them on.
    assert summary["test_examples"] == "fixed random subset of 100 of 10000"
    assert (summary["dataset"], summary["binarization"]) == ("mnist", "dynamic")
    assert (summary["batch_size"], summary["chunk"]) == (100, 10)  # chunk set; batch for the CPU
    assert cli_main(["sample", str(tmp_path / "cli"), "--n", "4", "--temperature", "0.5"]) == 0
    assert list((tmp_path / "cli/samples").glob("prior_best_step*_t0.5.png"))
    assert summary["compiled"] is False
    eval_args = ["eval", str(tmp_path / "cli"), "--k", "5", "--chunk", "5", "--n-test", "10"]
    assert cli_main([*eval_args, "--compile"]) == 0
    summary = json.loads((tmp_path / "cli/summary.json").read_text())
    assert summary["compiled"] is True and math.isfinite(summary["test/nll_iw5_nats"])
    # A user error is one clear line and exit status 2, not a traceback.
    assert cli_main(["train", str(cfg), "--set", "train.nope=1"]) == 2
    assert "unknown config key(s) train.nope" in capsys.readouterr().err


CONV = [
    'model.encoder.name="gated_conv"',
    "model.encoder.options={channels=[4,4],strides=[2,2],kernel_size=3,out_features=16}",
    'model.decoder.name="gated_conv"',
    "model.decoder.options={channels=[4,4,4],strides=[2,2],kernel_size=3}",
    "eval.n_test=20",
]


def test_resume_with_channels_last_switched_continues_the_same_training(tmp_path):
    """A checkpoint's Adam moments keep their saved layout; resuming with
    train.channels_last flipped must still pair each weight with its own moments (the fused
    kernel walks memory linearly), i.e. match the uninterrupted run to layout rounding."""
    base = [*CONV, "train.steps=10", "train.val_every=10", "train.ckpt_every=5"]
    train(_cfg(*base), tmp_path / "full")
    train(_cfg(*base), tmp_path / "flipped", stop_after_step=5)
    with pytest.warns(UserWarning, match="changed config"):
        train(_cfg(*base, "train.channels_last=true"), tmp_path / "flipped", resume=True)
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "flipped/checkpoints/last.pt")["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key


def test_channels_last_trains_the_same_model(tmp_path):
    """train.channels_last only changes the memory layout: a conv VAE trained a few steps
    either way ends with the same weights (to conv-algorithm rounding), its conv weights
    are NHWC, and the run evaluates."""
    conv = [*CONV, "train.steps=6", "train.val_every=6", "train.ckpt_every=6"]
    train(_cfg(*conv), tmp_path / "nchw")
    train(_cfg(*conv, "train.channels_last=true"), tmp_path / "nhwc")
    a = load_checkpoint(tmp_path / "nchw/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "nhwc/checkpoints/last.pt")["model"]
    convs = [k for k, v in b.items() if v.dim() == 4]
    assert convs and all(b[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert not all(a[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
    summary = evaluate_run(tmp_path / "nhwc", data_root=DATA)
    assert math.isfinite(summary["test/nll_iw20_nats"])


def test_conv_models_are_scored_in_nhwc_on_the_cpu(tmp_path, monkeypatch):
    """eval.channels_last left unset: a conv model trained in NCHW is scored in NHWC on
    the CPU (oneDNN's NCHW transposed convolutions are its bottleneck), with the same
    estimate as an NCHW evaluation (same noise; layout changes rounding only); an MLP
    keeps the training layout; a set value wins."""
    import vaeflow.run.evaluate as ev

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ev.eval_channels_last(None, False, True, cpu) is True
    assert ev.eval_channels_last(None, False, False, cpu) is False
    assert ev.eval_channels_last(None, False, True, cuda) is False
    assert ev.eval_channels_last(None, True, False, cuda) is True
    assert ev.eval_channels_last(False, True, True, cpu) is False
    conv = [*CONV, "train.steps=4", "train.val_every=4", "train.ckpt_every=4"]
    train(_cfg(*conv), tmp_path / "run")
    nhwc = evaluate_run(tmp_path / "run", data_root=DATA)
    monkeypatch.setattr(ev, "eval_channels_last", lambda *a: False)
    nchw = evaluate_run(tmp_path / "run", data_root=DATA)
    assert nhwc["channels_last"] is True and nchw["channels_last"] is False
    key = "test/nll_iw20_nats"
    assert math.isclose(nhwc[key], nchw[key], rel_tol=0, abs_tol=1e-4), (nhwc[key], nchw[key])


NO_VAL = ["data.val_size=0", "train.val_size=none"]


@pytest.mark.parametrize(
    "extra, keys",
    [
        (["train.early_stopping=5"], ["train.early_stopping", "data.val_size = 0"]),
        (["train.val_size=100"], ["train.val_size", "data.val_size = 0"]),
        (['eval.checkpoint="best"'], ["eval.checkpoint", "data.val_size = 0"]),
    ],
)
def test_no_validation_split_refuses_what_needs_one(extra, keys):
    """data.val_size = 0 is a fixed budget: early stopping, a validation subset and an
    explicit best checkpoint are config errors naming both keys."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [*TINY, *NO_VAL, *extra])
    for key in keys:
        assert key in str(err.value)
    assert _cfg(*NO_VAL).data.val_size == 0  # on its own it is allowed


def test_run_without_validation_split_trains_keeps_last_and_evaluates_it(tmp_path, capsys):
    """data.val_size = 0: train on all 60,000 training images for a fixed budget with no
    validation pass and no best.pt; `vaeflow train` then evaluates last.pt and says so in
    summary.json; best.pt asked for explicitly is a clear error; images and HParams are
    still written (from training examples and training scalars)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nname = "noval"\nroot = "' + str(tmp_path) + '"\n')
    sets = [*TINY, *NO_VAL, "train.steps=20", "train.val_every=10", "train.ckpt_every=10"]
    assert cli_main(["train", str(cfg), *[a for s in sets for a in ("--set", s)]]) == 0
    run = tmp_path / "noval"
    assert (run / "checkpoints/last.pt").exists() and not (run / "checkpoints/best.pt").exists()
    assert not [r for r in read_metrics(run) if any(k.startswith("val/") for k in r)]
    train_summary = json.loads((run / "train_summary.json").read_text())
    assert train_summary["validation"].startswith("none (data.val_size = 0)")
    assert train_summary["best_val_iwae_nats"] is None and train_summary["step"] == 20
    splits = json.loads((run / "environment.json").read_text())["splits"]
    assert (splits["train"], splits["val"]) == (60000, 0)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["checkpoint"], summary["checkpoint_step"]) == ("last", 20)
    assert math.isfinite(summary["test/nll_iw20_nats"])
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert "train/reconstructions" in acc.Tags()["images"]
    # Without validation curves the HParams columns are the training ones -- the means
    # over each logging interval, logged under those tags -- and the test metrics that
    # eval added.
    from tensorboard.plugins.hparams import plugin_data_pb2

    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    ).experiment
    columns = [m.name.tag for m in experiment.metric_infos]
    assert "train/mean_elbo_nats" in columns and not [c for c in columns if c.startswith("val/")]
    assert "train/mean_elbo_nats" in acc.Tags()["scalars"]
    assert "test/nll_iw20_nats" in columns
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--checkpoint", "best", "--k", "2", "--n-test", "5"]) == 2
    err = capsys.readouterr().err
    assert "best.pt does not exist" in err and "--checkpoint last" in err
    assert cli_main(["sample", str(run), "--n", "4"]) == 0
    assert list((run / "samples").glob("prior_last_step0000020_*.png"))


def test_deep_hierarchies_log_a_few_layer_grids():
    """A 20-group model logs reconstructions from four layers spread from 2 to the top,
    not 19; shallow ones log every layer above the first."""
    from vaeflow.run.train import MAX_LAYER_GRIDS, layers_to_show

    assert layers_to_show(1) == [] and layers_to_show(2) == [2]
    assert layers_to_show(5) == [2, 3, 4, 5]
    deep = layers_to_show(20)
    assert len(deep) == MAX_LAYER_GRIDS and deep[0] == 2 and deep[-1] == 20
    assert deep == sorted(set(deep))


@pytest.mark.parametrize(
    ("extra", "batches", "held_out"),
    [((), 0, 0), (("data.seed=3",), 3, 3), (("data.batch_seed=7",), 7, 0)],
)
def test_the_batch_seed_drives_the_training_batches_only(
    tmp_path, monkeypatch, extra, batches, held_out
):
    """data.batch_seed (set per seed by sweeps) seeds the training batches -- order and
    dynamic binarisation; validation and test data keep data.seed's bits; unset, the
    batches follow data.seed as before."""
    from vaeflow.run import train as train_mod

    seen = {"batches": [], "eval": []}
    real_batches, real_eval = train_mod.TrainBatches, train_mod.prepare_eval

    def batches_spy(x, batch_size, seed, *args, **kwargs):
        seen["batches"].append(seed)
        return real_batches(x, batch_size, seed, *args, **kwargs)

    def eval_spy(x, kind, binarization="dynamic", seed=0, *args, **kwargs):
        seen["eval"].append(seed)
        return real_eval(x, kind, binarization, seed, *args, **kwargs)

    monkeypatch.setattr(train_mod, "TrainBatches", batches_spy)
    monkeypatch.setattr(train_mod, "prepare_eval", eval_spy)
    train(_cfg("train.steps=1", "train.val_every=1", *extra), tmp_path / "run")
    assert seen["batches"] == [batches]
    assert seen["eval"] and set(seen["eval"]) == {held_out}


def test_joint_warmup_weighs_the_log_joint(float64):
    """``train.kl_warmup_target = "joint"``: the loss is the mean over samples and
    examples of ``-(beta (log p(x|z) + log p(z)) - log q(z|x))``, the negated ELBO at
    beta = 1 and not the KL-weighted objective below it."""
    from vaeflow.models.bounds import Terms, elbo
    from vaeflow.run.train import training_loss

    g = torch.Generator().manual_seed(0)
    px, pz, qz = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    terms = Terms(log_px_z=px - 90, log_pz=pz - 30, log_qz=qz - 20)
    joint = load_config(None, ['train.kl_warmup_target="joint"', "train.kl_warmup_steps=10"])
    kl = load_config(None, ["train.kl_warmup_steps=10"])
    want = -(0.3 * (terms.log_px_z + terms.log_pz) - terms.log_qz).mean()
    assert torch.allclose(training_loss(terms, joint.train, 0.3, 4), want, atol=1e-12)
    assert not torch.allclose(training_loss(terms, kl.train, 0.3, 4), want)
    at_one = training_loss(terms, joint.train, 1.0, 4)
    assert torch.allclose(at_one, -elbo(terms).mean(), atol=1e-12)
    assert torch.allclose(at_one, training_loss(terms, kl.train, 1.0, 4), atol=1e-12)


def test_tf32_is_a_choice_of_training_and_never_of_evaluation(tmp_path: Path) -> None:
    """torch's defaults differ (CUDA matmuls strict float32, cuDNN convolutions TF32), so a
    run never inherits them: training sets ``train.tf32`` for both (default off; a CPU
    warns that it has no TF32), and the test evaluation scores in strict float32 (and
    puts the flags back), so a reported bound is a float32 number whatever the run
    trained with."""
    import torch

    from vaeflow.run.evaluate import evaluate_run
    from vaeflow.run.utils import set_tf32

    def flags() -> tuple[bool, bool]:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    torch.backends.cudnn.allow_tf32 = True  # torch's default
    train(_cfg("train.steps=2", "train.val_every=2"), tmp_path / "strict")
    assert flags() == (False, False)
    with pytest.warns(UserWarning, match="train.tf32 = true is ignored on CPU"):
        train(_cfg("train.steps=2", "train.val_every=2", "train.tf32=true"), tmp_path / "tf32")
    assert flags() == (True, True)
    from vaeflow.run import evaluate

    seen = []
    real = evaluate.score_examples

    def spy(*args, **kwargs):  # the flags while the test images are scored
        seen.append(flags())
        return real(*args, **kwargs)

    evaluate.score_examples = spy
    try:
        evaluate_run(tmp_path / "tf32", data_root=DATA, k=2, chunk=2, n_test=5)
    finally:
        evaluate.score_examples = real
    assert seen == [(False, False)]
    assert flags() == (True, True)  # put back: the process's flags are not evaluation's
    set_tf32(False)


def test_interval_means_average_the_steps_since_the_last_log(tmp_path: Path) -> None:
    """``train/mean_*`` at a logging step is the mean of the steps' own scalars since the
    previous log (summed on the device, read at the log); logging changes nothing in
    training, so a run logging every step gives the steps' values. A run stopped inside
    an interval and resumed logs the same means (the sums travel in the checkpoint)."""
    from vaeflow.run.logger import read_metrics

    every = _cfg("train.steps=6", "train.val_every=6", "train.log_every=1")
    third = _cfg("train.steps=6", "train.val_every=6", "train.log_every=3", "train.ckpt_every=2")
    train(every, tmp_path / "every")
    train(third, tmp_path / "third")
    per_step = {r["step"]: r for r in read_metrics(tmp_path / "every") if "train/elbo_nats" in r}
    for r in per_step.values():  # an interval of one step: that step's (to rounding)
        assert r["train/mean_elbo_nats"] == pytest.approx(r["train/elbo_nats"], rel=1e-6)
    logged = {
        r["step"]: r for r in read_metrics(tmp_path / "third") if "train/mean_elbo_nats" in r
    }
    assert sorted(logged) == [3, 6]
    for end in (3, 6):
        for name in ("loss", "elbo", "kl", "recon"):
            window = [per_step[s][f"train/{name}_nats"] for s in range(end - 2, end + 1)]
            assert logged[end][f"train/mean_{name}_nats"] == pytest.approx(
                sum(window) / 3, rel=1e-6
            ), (end, name)
    # Stopped at step 2 (a checkpoint inside the first interval), resumed: the same means.
    train(third, tmp_path / "parts", stop_after_step=2)
    train(third, tmp_path / "parts", resume=True)
    again = {r["step"]: r for r in read_metrics(tmp_path / "parts") if "train/mean_elbo_nats" in r}
    assert again[3]["train/mean_elbo_nats"] == pytest.approx(logged[3]["train/mean_elbo_nats"])
