"""Stacked training (vaeflow.run.stack): N runs in one batched computation, each equal to
the same run trained alone, in an ordinary run directory."""

from __future__ import annotations

import json
import os
import shlex
import warnings
from pathlib import Path

import pytest
import torch

from vaeflow.cli import main as cli_main
from vaeflow.config import ConfigError, load_config
from vaeflow.data import load_splits
from vaeflow.run.checkpoint import load_checkpoint
from vaeflow.run.logger import read_metrics
from vaeflow.run.stack import train_stack
from vaeflow.run.train import TrainingDiverged, train
from vaeflow.tools import sweep as sw

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("VAEFLOW_DATA") or str(ROOT.parent / "shared" / "datasets")

TINY = [
    f'data.root="{DATA}"',
    "data.batch_size=20",
    "data.val_size=100",
    "data.eval_batch_size=50",
    "model.latent_dim=4",
    "model.encoder.options={hidden=[16]}",
    "model.decoder.options={hidden=[16]}",
    "train.device=cpu",
    "train.steps=6",
    "train.log_every=2",
    "train.val_every=3",
    "train.val_k=3",
    "train.ckpt_every=3",
    "train.ema_decay=0.9",
    "eval.k=4",
    "eval.chunk=4",
    "eval.n_test=20",
]

# Runs that differ in everything a stack lets differ, each exercising one per-run rule.
RUNS = {
    # A clip far below the gradient norm: clipping binds, on this run's own norm.
    "clipped": ["train.seed=0", "train.clip_norm=1e-3"],
    # Another clipped run: a global norm over both runs would scale both differently.
    "clipped_lr": ["train.seed=1", "train.clip_norm=1e-3", "train.lr=3e-3", "data.seed=5"],
    # KL warm-up (beta per run) and fewer steps: it leaves the stack early.
    "warmup_short": ["train.seed=2", "train.kl_warmup_steps=4", "train.steps=4"],
    # Every update skipped: diverges after two, as alone.
    "skipping": ["train.seed=3", "train.skip_grad_norm=1e-9", "train.max_consecutive_skips=2"],
    # A learning rate that overshoots: its validation bound stops improving, and it stops
    # early (patience 1, validating every step) while the others train on.
    "early": ["train.seed=4", "train.lr=0.1", "train.early_stopping=1", "train.val_every=1"],
}


@pytest.fixture(scope="module")
def splits():
    return load_splits("mnist", DATA, val_size=100)


def _cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


def _solo(cfg, run_dir: Path, splits) -> str:
    try:
        return train(cfg, run_dir, splits=splits)["status"]
    except TrainingDiverged:
        return "diverged"


def _assert_same_checkpoint(a_path: Path, b_path: Path, tol: float = 1e-12) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"]
    sums_a, sums_b = a["train_state"].pop("interval_sums"), b["train_state"].pop("interval_sums")
    assert sums_b == pytest.approx(sums_a, rel=tol, abs=tol)  # the logging interval's sums
    assert b["train_state"] == pytest.approx(a["train_state"], rel=tol, abs=tol)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=tol, atol=tol)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for j in sa:
        for name in sa[j]:
            torch.testing.assert_close(sb[j][name], sa[j][name], rtol=tol, atol=tol)
    assert (a["ema"] is None) == (b["ema"] is None)
    if a["ema"] is not None:
        assert a["ema"]["updates"] == b["ema"]["updates"]
        for key in a["ema"]["shadow"]:
            torch.testing.assert_close(
                b["ema"]["shadow"][key], a["ema"]["shadow"][key], rtol=tol, atol=tol
            )
    # The run's own noise stream, at the same place.
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["scheduler"] == b["scheduler"]


def _assert_same_metrics(a_dir: Path, b_dir: Path, tol: float = 1e-9) -> None:
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key != "time":
                assert rb[key] == pytest.approx(ra[key], rel=tol, abs=tol), (ra["step"], key)


def test_stack_equals_solo_runs_in_float64(tmp_path: Path, splits, float64) -> None:
    cfgs = [_cfg(*extra) for extra in RUNS.values()]
    solo = [_solo(c, tmp_path / f"solo_{n}", splits) for c, n in zip(cfgs, RUNS, strict=True)]
    assert solo[:4] == ["completed", "completed", "completed", "diverged"]
    assert solo[4].startswith("early stopping at step ") and solo[4] != "early stopping at step 6"
    stacked = train_stack(cfgs, [tmp_path / f"stack_{n}" for n in RUNS], splits=splits)
    assert [s["status"] for s in stacked] == solo
    for name in RUNS:
        a, b = tmp_path / f"solo_{name}", tmp_path / f"stack_{name}"
        # An ordinary run directory: TensorBoard events and the config beside the rest.
        assert list(b.glob("events.out.tfevents.*")) and (b / "config.json").is_file()
        _assert_same_checkpoint(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt")
        _assert_same_metrics(a, b)
        assert (a / "train_summary.json").exists() == (b / "train_summary.json").exists()
        assert (a / "checkpoints" / "best.pt").exists() == (b / "checkpoints" / "best.pt").exists()
    # The clips bound (else per-run and global clipping would not be told apart) ...
    for name in ("clipped", "clipped_lr"):
        records = read_metrics(tmp_path / f"stack_{name}")
        assert min(r["train/grad_norm"] for r in records if "train/grad_norm" in r) > 1e-2
    # ... and the runs really differ (own seeds, data order, noise): no vacuous equality.
    w = [
        load_checkpoint(tmp_path / f"stack_{n}" / "checkpoints" / "last.pt")["model"]
        for n in ("clipped", "clipped_lr", "warmup_short")
    ]
    key = "encoder.net.0.weight"
    assert not torch.allclose(w[0][key], w[1][key]) and not torch.allclose(w[0][key], w[2][key])


def test_stacked_runs_log_the_test_curve_as_alone(tmp_path: Path, splits, float64) -> None:
    """``train.test_every`` in a stack: each run's test-curve points at the same steps
    (the stack copies a run out only at its periodic steps) with the values alone gives."""
    # Step 5 is no other periodic step of TINY (logs every 2, validates every 3).
    extra = ("train.test_every=5", "train.test_size=20")
    cfgs = [_cfg("train.seed=0", *extra), _cfg("train.seed=1", *extra)]
    for i, c in enumerate(cfgs):
        _solo(c, tmp_path / f"solo_{i}", splits)
    train_stack(cfgs, [tmp_path / "stack_0", tmp_path / "stack_1"], splits=splits)
    for i in range(2):
        _assert_same_metrics(tmp_path / f"solo_{i}", tmp_path / f"stack_{i}")
        steps = [
            r["step"] for r in read_metrics(tmp_path / f"stack_{i}") if "test_curve/elbo_nats" in r
        ]
        assert steps == [5, 6]


def test_runs_with_the_same_seed_but_other_data_order_differ(tmp_path: Path, splits) -> None:
    """Same init and noise seed, other data.seed: only the batches differ, and that shows."""
    cfgs = [_cfg("train.steps=2", "data.seed=0"), _cfg("train.steps=2", "data.seed=1")]
    train_stack(cfgs, [tmp_path / "a", tmp_path / "b"], splits=splits)
    train(cfgs[1], tmp_path / "solo_b", splits=splits)
    a, b, solo_b = (
        load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("a", "b", "solo_b")
    )
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the same noise stream
    key = "encoder.net.0.weight"
    assert not torch.allclose(a["model"][key], b["model"][key])
    torch.testing.assert_close(b["model"][key], solo_b["model"][key], rtol=1e-5, atol=1e-6)


def test_resumed_stack_equals_uninterrupted_stack(tmp_path: Path, splits, float64) -> None:
    cfgs = [_cfg("train.seed=0"), _cfg("train.seed=1", "train.lr=2e-3")]
    whole = [tmp_path / "whole0", tmp_path / "whole1"]
    parts = [tmp_path / "part0", tmp_path / "part1"]
    train_stack(cfgs, whole, splits=splits)
    first = train_stack(cfgs, parts, splits=splits, stop_after_step=3)
    assert [s["status"] for s in first] == ["stopped after step 3 (stop_after_step)"] * 2
    rest = train_stack(cfgs, parts, resume=True, splits=splits)
    assert [s["status"] for s in rest] == ["completed"] * 2
    for a, b in zip(whole, parts, strict=True):
        _assert_same_checkpoint(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt", 0)
        _assert_same_metrics(a, b, 0)


def test_stacked_run_resumes_alone_and_evaluates(tmp_path: Path, splits) -> None:
    """A stacked run directory is an ordinary one: `vaeflow train --resume` continues it
    alone, `vaeflow eval` scores it."""
    cfgs = [_cfg("train.seed=0", "train.steps=4"), _cfg("train.seed=1", "train.steps=4")]
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    train_stack(cfgs, dirs, splits=splits, stop_after_step=3)
    train(cfgs[0], dirs[0], resume=True, splits=splits)  # the rest alone
    train_stack(cfgs[1:], dirs[1:], resume=True, splits=splits)
    train(cfgs[0], tmp_path / "solo0", splits=splits)
    _assert_same_checkpoint(
        tmp_path / "solo0" / "checkpoints" / "last.pt", dirs[0] / "checkpoints" / "last.pt", 1e-5
    )
    for d in dirs:
        assert cli_main(["eval", str(d), "--k", "4", "--n-test", "20"]) == 0
        summary = json.loads((d / "summary.json").read_text())
        assert 0 < summary["test/nll_iw4_nats"] < 1000


def test_unstackable_configs_are_refused_naming_the_key(tmp_path: Path, splits) -> None:
    """What a stack does not implement, configs that differ in a shape, and models whose
    step a stack would get wrong (seed-drawn buffers, a step vmap cannot batch, random
    draws besides the posterior noise) are refused before anything is written."""
    with pytest.raises(ConfigError, match="train.compile"):
        train_stack([_cfg("train.compile=true")], [tmp_path / "c"], splits=splits)
    with pytest.raises(ConfigError, match="model.latent_dim"):
        train_stack([_cfg(), _cfg("model.latent_dim=6")], [tmp_path / "d", tmp_path / "e"])
    residual = 'model.posterior.flow="residual"'
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ConfigError, match="buffer 'posterior.flow.*sn_u' differs"):
        train_stack([_cfg(residual, "train.seed=0"), _cfg(residual, "train.seed=1")], dirs)
    with pytest.raises(ConfigError, match="vmap cannot batch"):  # its power iteration
        train_stack([_cfg(residual)], dirs[:1], splits=splits)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_model_drawing_its_own_noise_is_refused(tmp_path: Path, splits, monkeypatch) -> None:
    """A forward that draws random numbers of its own (dropout, say) would give every run
    of the stack one stream: refused, naming why."""
    from vaeflow.models import build as build_module

    real = build_module.build_model

    def with_dropout(cfg):
        model = real(cfg)
        decoder = model.decoder
        model.decoder = torch.nn.Sequential(torch.nn.Dropout(0.5), decoder)
        return model

    monkeypatch.setattr(build_module, "build_model", with_dropout)
    with pytest.raises(ConfigError, match="draws random numbers besides the posterior noise"):
        train_stack([_cfg()], [tmp_path / "a"], splits=splits)
    assert not any(tmp_path.iterdir())


def _assert_stack_equals_solo(tmp_path: Path, splits, cfgs) -> None:
    """Each config trained alone and all of them stacked: the same checkpoints (weights,
    optimiser state, EMA, RNG) and metrics, in float64; and the runs really differ."""
    for i, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"solo{i}", splits=splits)
    train_stack(cfgs, [tmp_path / f"st{i}" for i in range(len(cfgs))], splits=splits)
    for i in range(len(cfgs)):
        a, b = tmp_path / f"solo{i}", tmp_path / f"st{i}"
        _assert_same_checkpoint(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt")
        _assert_same_metrics(a, b)
    w = [load_checkpoint(tmp_path / f"st{i}" / "checkpoints" / "last.pt")["model"] for i in (0, 1)]
    assert any(not torch.allclose(w[0][k], w[1][k]) for k in w[0] if w[0][k].is_floating_point())


CONV = [
    'model.encoder.name="gated_conv"',
    "model.encoder.options={channels=[4,4],strides=[2,2],kernel_size=3,out_features=16}",
    'model.decoder.name="gated_conv"',
    "model.decoder.options={channels=[4,4,4],strides=[2,2],kernel_size=3}",
    "data.batch_size=8",
    "train.steps=3",
]


def test_conv_sylvester_stack_equals_solo_in_float64(tmp_path: Path, splits, float64) -> None:
    """The Sylvester paper's model shape (gated convolutions, an orthogonal Sylvester flow
    amortised from the encoder's features), two seeds, per-run free bits (one group: a
    floor in one run, none in the other) and learning rates."""
    syl = [
        *CONV,
        'model.posterior.flow="sylvester_orthogonal"',
        "model.posterior.num_layers=2",
        "model.posterior.context_features=16",
        "model.posterior.context_projection=false",
        'model.posterior.options={amortization="linear", num_ortho_vectors=2}',
        'train.optimizer="adamax"',
        "train.free_bits_group_size=4",
    ]
    cfgs = [
        _cfg(*syl, "train.seed=0", "train.free_bits=2.0"),
        _cfg(*syl, "train.seed=1", "train.free_bits=0", "train.lr=2e-3"),
    ]
    _assert_stack_equals_solo(tmp_path, splits, cfgs)


def test_vampprior_planar_stack_equals_solo_in_float64(tmp_path: Path, splits, float64) -> None:
    """A learned prior whose parameters are pseudo-inputs (VampPrior) and a planar flow
    posterior, one free-bits group per run that has a floor."""
    vamp = [
        'model.prior.name="vamp"',
        "model.prior.num_components=3",
        'model.posterior.flow="planar"',
        "model.posterior.num_layers=2",
        "train.free_bits_group_size=4",
    ]
    cfgs = [_cfg(*vamp, "train.seed=0", "train.free_bits=0.5"), _cfg(*vamp, "train.seed=1")]
    _assert_stack_equals_solo(tmp_path, splits, cfgs)


@pytest.mark.parametrize("floors", [(0.0, 0.5), (0.5, 0.0)])
def test_chain_rule_free_bits_stack_equals_solo(tmp_path: Path, splits, float64, floors) -> None:
    """Per-dimension free bits against a VampPrior's chain-rule conditionals in one run of
    the stack and none in the other, in either order: the stack's one module computes the
    chain-rule KL if any run needs it (for the other it is the same KL, summed)."""
    vamp = ['model.prior.name="vamp"', "model.prior.num_components=3"]
    cfgs = [_cfg(*vamp, f"train.seed={i}", f"train.free_bits={fb}") for i, fb in enumerate(floors)]
    _assert_stack_equals_solo(tmp_path, splits, cfgs)


def test_a_gradient_the_stack_would_miss_is_refused(tmp_path: Path, splits, monkeypatch) -> None:
    """A forward that reads a parameter through a plain attribute (a tied weight kept
    outside the module's parameters) gets that parameter's gradient alone but not in a
    stack (functional_call replaces only registered parameters): the trial compares the
    stacked gradients with the run's own and refuses."""
    from vaeflow.models import build as build_module

    real = build_module.build_model

    class Tied(torch.nn.Module):
        def __init__(self, decoder: torch.nn.Module, weight: torch.Tensor) -> None:
            super().__init__()
            self.decoder = decoder
            self.__dict__["tied"] = weight  # not registered: invisible to functional_call

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.decoder(z) + 1e-2 * self.tied.sum()

    def tied(cfg):
        model = real(cfg)
        model.decoder = Tied(model.decoder, next(model.encoder.parameters()))
        return model

    monkeypatch.setattr(build_module, "build_model", tied)
    with pytest.raises(ConfigError, match="stacked gradient of parameter 'encoder"):
        train_stack([_cfg()], [tmp_path / "a"], splits=splits)
    assert not any(tmp_path.iterdir())


def test_flow_prior_and_per_dimension_free_bits_stack_equals_solo(
    tmp_path: Path, splits, float64
) -> None:
    """A MAF prior (its own masked networks) with a Gaussian posterior; and N(0, I) runs
    whose per-dimension floors differ (0 in one: the plain KL, not a floor at 0)."""
    maf = ['model.prior.name="flow"', 'model.prior.flow="maf"', "model.prior.num_layers=2"]
    maf += ["model.prior.hidden=8"]
    _assert_stack_equals_solo(
        tmp_path / "maf", splits, [_cfg(*maf, "train.seed=0"), _cfg(*maf, "train.seed=1")]
    )
    cfgs = [_cfg("train.seed=0", "train.free_bits=0.3"), _cfg("train.seed=1", "train.free_bits=0")]
    _assert_stack_equals_solo(tmp_path / "fb", splits, cfgs)


def test_sweep_stack_makes_ordinary_run_dirs(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text("")
    sweep = tmp_path / "sweep.toml"
    root = json.dumps(str(tmp_path / "runs"))
    overrides = [*TINY, "train.steps=3", "train.ckpt_every=3"]
    sweep.write_text(
        f"""base = "base.toml"
name = "st"
root = {root}
seeds = [0, 1, 2]
set = {json.dumps(overrides)}
[grid]
"model.encoder.name" = ["mlp", "gated_conv"]
"""
    )
    points = sw.expand(sweep, validate=False)
    with pytest.warns(UserWarning, match="--stack: .*gated_conv.* train alone: cannot build"):
        groups = sw.stack_groups(points, 2)
    # mlp seeds 0 and 1 together, seed 2 alone (the stack is full); gated_conv with the
    # MLP's options cannot be built, so its model trial fails: alone each (where its
    # training reports the error as its own).
    assert [[p.name for p in g] for g in groups] == [
        ["encoder.name=mlp__seed=0", "encoder.name=mlp__seed=1"],
        ["encoder.name=mlp__seed=2"],
        ["encoder.name=gated_conv__seed=0"],
        ["encoder.name=gated_conv__seed=1"],
        ["encoder.name=gated_conv__seed=2"],
    ]
    # A model the stack would get wrong (seed-drawn buffers of a residual flow) trains
    # alone, point by point; so does one whose settings a stack does not implement.
    sweep.write_text(
        sweep.read_text()
        .replace('"model.encoder.name"', '"model.posterior.flow"')
        .replace('["mlp", "gated_conv"]', '["residual", "iaf"]')
    )
    with pytest.warns(UserWarning, match="train alone: this model cannot be trained in a stack"):
        groups = sw.stack_groups(sw.expand(sweep, validate=False), 3)
    assert [len(g) for g in groups] == [1, 1, 1, 3], [[p.name for p in g] for g in groups]
    sweep.write_text(
        sweep.read_text()
        .replace('"model.posterior.flow"', '"model.encoder.name"')
        .replace('["residual", "iaf"]', '["mlp", "gated_conv"]')
    )
    sweep.write_text(sweep.read_text().replace('["mlp", "gated_conv"]', '["mlp"]'))
    # A commands file for a scheduler groups the same way: one train-stack line per
    # stack, a plain train line for a point alone.
    cmds = tmp_path / "cmds.txt"
    assert cli_main(["sweep", str(sweep), "--stack", "2", "--commands-file", str(cmds)]) == 0
    lines = [shlex.split(line) for line in cmds.read_text().splitlines()]
    assert [line[1] for line in lines] == ["train-stack", "train"], lines
    assert lines[0][2:] == [str(sweep), "encoder.name=mlp__seed=0", "encoder.name=mlp__seed=1"]
    statuses = sw.run_sweep(sweep, stack=2, threads=1)
    assert [s["status"] for s in statuses] == ["finished"] * 3, [s["log"] for s in statuses]
    assert "train-stack" in statuses[0]["command"] and "train-stack" not in statuses[2]["command"]
    for p in sw.expand(sweep, validate=False):
        for name in ("config.json", "metrics.jsonl", "train_summary.json", "summary.json"):
            assert (p.run_dir / name).is_file(), (p.name, name)
    out = tmp_path / "report"
    assert cli_main(["report", str(tmp_path / "runs" / "st"), "-o", str(out)]) == 0
    assert any(out.iterdir())


def test_burda_optimiser_stack_equals_solo_in_float64(tmp_path: Path, splits, float64) -> None:
    """Burda et al.'s own Adam (``adam_iwae``: its second-moment start and epsilon) and
    their 3^i-epoch step decay, as the burda2016_iwae configs train, seeds stacked."""
    burda = [
        'train.optimizer="adam_iwae"',
        "train.initial_second_moment=0.0025",
        "train.betas=[0.99, 0.999]",
        "train.eps=1e-4",
        'train.lr_schedule="multistep"',
        "train.lr_milestones=[1, 3]",
        "train.lr_decay=0.5",
        'train.objective="iwae"',
        "train.k=3",
        "train.steps=4",
    ]
    cfgs = [_cfg(*burda, "train.seed=0"), _cfg(*burda, "train.seed=1", "data.batch_seed=1")]
    _assert_stack_equals_solo(tmp_path, splits, cfgs)


def test_iaf_posterior_stack_equals_solo_in_float64(tmp_path: Path, splits, float64) -> None:
    iaf = [
        'model.posterior.flow="iaf"',
        "model.posterior.num_layers=2",
        "model.posterior.hidden=8",
        "model.posterior.context_features=4",
        "train.steps=3",
    ]
    cfgs = [_cfg(*iaf, "train.seed=0"), _cfg(*iaf, "train.seed=1", "train.lr=2e-3")]
    for i, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"solo{i}", splits=splits)
    train_stack(cfgs, [tmp_path / "st0", tmp_path / "st1"], splits=splits)
    for i in range(2):
        a, b = tmp_path / f"solo{i}", tmp_path / f"st{i}"
        _assert_same_checkpoint(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt")
        _assert_same_metrics(a, b)


@pytest.mark.parametrize(
    ("optimizer", "per_run"),
    [
        # torch's Adam: each run its own betas, eps and L2 weight decay (one none)
        ("adam", (["train.betas=[0.8, 0.99]", "train.eps=1e-6", "train.weight_decay=0.1"], [])),
        # AdamNormGrad: each run's gradient tensors divided by their own norms; the planar
        # flow's one-number parameters (a (N,) stacked tensor) by their own sizes
        ("adam_normgrad", (["train.eps=1e-3"], ["train.lr=3e-3"])),
        # ... and with the VampPrior code's split of the fused Gaussian head (mean, scale)
        (
            "adam_normgrad",
            (["train.normgrad_split=true", "train.eps=1e-3"], ["train.normgrad_split=true"]),
        ),
        ("adamax", (["train.betas=[0.5, 0.9]", "train.weight_decay=0.2"], [])),
        # the IAF code's AdaMax (no bias correction)
        ("adamax_iaf", (["train.betas=[0.5, 0.9]"], ["train.lr=3e-3"])),
        # no batched rule: each run's own RMSprop steps on its (re-laid-out) rows
        ("rmsprop", (["train.lr=1e-3"], ["train.lr=3e-4"])),
    ],
)
def test_each_optimiser_stacks_with_per_run_settings(
    tmp_path: Path, splits, float64, optimizer: str, per_run, monkeypatch
) -> None:
    """The stack's one batched update (``stack_optim``) with each run's own
    hyperparameters equals each run's solo optimiser, state included (float64)."""
    from vaeflow.run import stack_optim

    batched = []
    real_step = stack_optim.StackedOptimizer.step

    def counted(self, *args):
        batched.append(1)
        return real_step(self, *args)

    monkeypatch.setattr(stack_optim.StackedOptimizer, "step", counted)
    common = [
        f'train.optimizer="{optimizer}"',
        'model.posterior.flow="planar"',
        "model.posterior.num_layers=2",
        "train.steps=4",
    ]
    cfgs = [_cfg(*common, "train.seed=0", *per_run[0]), _cfg(*common, "train.seed=1", *per_run[1])]
    _assert_stack_equals_solo(tmp_path, splits, cfgs)
    # the batched update did the stepping (RMSprop: each run's own optimiser)
    assert len(batched) == (0 if optimizer == "rmsprop" else 4)


def test_stacked_parameters_take_their_gradients_without_a_copy(tmp_path: Path, splits) -> None:
    """The stacked parameters are laid out as the batched backward produces their
    gradients, so autograd keeps each gradient as it comes (no copy into another layout);
    each run's optimiser state has its rows' layout."""
    from vaeflow.run.stack import _Member, _Stack
    from vaeflow.run.train import _setup_run

    cfgs = [_cfg("train.seed=0"), _cfg("train.seed=1")]
    members = []
    for i, cfg in enumerate(cfgs):
        run = _setup_run(cfg, tmp_path / f"r{i}", False, splits, stacked=True)
        members.append(_Member(run, torch.Generator().manual_seed(i)))
    stack = _Stack(members)
    incoming = {}

    def record(g: torch.Tensor, name: str) -> None:
        incoming[name] = g.stride()

    for name, p in stack.params.items():
        p.register_hook(lambda g, name=name: record(g, name))
    stack.step()
    weights = [n for n in stack.params if n.endswith("weight")]
    assert weights and all(stack.params[n].dim() == 3 for n in weights)
    for name, p in stack.params.items():
        assert incoming[name] == p.stride(), name  # autograd steals a gradient of this layout
    # The linear weights' gradients come transposed: the layout really changed.
    assert any(not stack.params[n].is_contiguous() for n in weights)
    for member in stack.members:
        for p in member.run.model.parameters():
            for v in member.run.opt.state[p].values():
                if v.dim():
                    assert v.stride() == p.stride()
    for member in members:
        member.run.logger.close()


def test_compiled_stacked_update_equals_solo_in_float64(
    tmp_path: Path, splits, float64, monkeypatch
) -> None:
    """``train.compile_step`` in a stack: the vmapped forward/backward and the batched
    update of all runs as compiled graphs (``stack_optim._update_compiled``), compiled
    again when a run leaves, equal to each run trained alone (eager)."""
    from vaeflow.run import stack_optim

    calls = []
    compiled = stack_optim._update_compiled

    def counted(*args):
        calls.append(1)
        return compiled(*args)

    monkeypatch.setattr(stack_optim, "_update_compiled", counted)
    burda = [
        'train.optimizer="adam_iwae"',
        "train.initial_second_moment=0.0025",
        "train.steps=3",
    ]
    # Run 1 leaves after 2 steps: run 0's last step is compiled afresh for one run.
    per_run = (["train.seed=0"], ["train.seed=1", "train.lr=3e-3", "train.steps=2"])
    for i, extra in enumerate(per_run):
        train(_cfg(*burda, *extra), tmp_path / f"solo{i}", splits=splits)
    stacked = [_cfg(*burda, *extra, "train.compile_step=true") for extra in per_run]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*compiled forward failed")  # stays compiled
        train_stack(stacked, [tmp_path / "st0", tmp_path / "st1"], splits=splits)
    assert len(calls) == 3  # every update went through the compiled graph
    for i in range(2):
        a, b = tmp_path / f"solo{i}", tmp_path / f"st{i}"
        _assert_same_checkpoint(a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt")
        _assert_same_metrics(a, b)


def test_a_failed_compilation_of_the_stacked_forward_falls_back_to_eager(
    tmp_path: Path, splits, monkeypatch
) -> None:
    """``train.compile_step``: if compiling the vmapped forward fails, the stack warns and
    trains on eagerly -- the same step as a stack that never compiled."""
    from vaeflow.run import stack_optim
    from vaeflow.run.stack import _Member, _Stack
    from vaeflow.run.train import _setup_run

    monkeypatch.setattr(stack_optim, "_update_compiled", stack_optim._update)  # no compile

    def make(name: str, *extra: str) -> _Stack:
        members = []
        for i in range(2):
            cfg = _cfg(f"train.seed={i}", *extra)
            run = _setup_run(cfg, tmp_path / f"{name}{i}", False, splits, stacked=True)
            members.append(_Member(run, torch.Generator().manual_seed(i)))
        return _Stack(members)

    compiled, eager = make("c", "train.compile_step=true"), make("e")
    assert compiled._compiled_loss is not None and eager._compiled_loss is None

    def broken(*args):
        raise RuntimeError("inductor could not compile this")

    compiled._compiled_loss = broken
    with pytest.warns(UserWarning, match="compiled forward failed.*eager"):
        compiled.step()
    eager.step()
    assert compiled._compiled_loss is None
    for name, p in eager.params.items():
        torch.testing.assert_close(compiled.params[name], p, rtol=0, atol=0)
    for m in [*compiled.members, *eager.members]:
        m.run.logger.close()


def test_dense_order_and_laid_out_stacking() -> None:
    """The memory order read from a gradient, and stacking into that order: the values
    are the rows', only the layout changes; a gapped or overlapping gradient gives none."""
    from vaeflow.run.stack import _dense_order, _inverse, _stacked_parameters

    t = torch.empty(2, 3, 4)
    assert _dense_order(t) == (0, 1, 2)
    assert _dense_order(t.permute(0, 2, 1)) == (0, 2, 1)
    assert _dense_order(t.transpose(0, 2)) == (2, 1, 0)
    assert _dense_order(torch.empty(4, 6)[:, ::2]) is None  # gaps
    assert _dense_order(torch.empty(3, 1).expand(3, 5)) is None  # overlapping
    assert _inverse((0, 2, 1)) == (0, 2, 1) and _inverse((2, 0, 1)) == (1, 2, 0)
    rows = [{"w": torch.randn(3, 5), "b": torch.randn(5)} for _ in range(4)]
    stacked = _stacked_parameters(rows, {"w": (0, 2, 1)})
    assert stacked["w"].shape == (4, 3, 5) and stacked["w"].stride() == (15, 1, 3)
    assert stacked["b"].is_contiguous() and stacked["w"].is_leaf
    for i, r in enumerate(rows):
        assert torch.equal(stacked["w"][i], r["w"]) and torch.equal(stacked["b"][i], r["b"])
