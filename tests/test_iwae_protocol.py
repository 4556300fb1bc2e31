"""Burda et al.'s IWAE training protocol: their Adam (vaeflow.run.optim.IWAEAdam, eager and
as update_unless), their initialisation (vaeflow.models.init: Glorot-uniform networks,
the Bernoulli output bias from the training mean) and the config keys that select them.

The optimiser is checked against the update equations of yburda/iwae ``optimizers.py``
written out here in float64 (second moment started at ``initial_second_moment``, eps on
``sqrt(v)`` without bias correction, each update from the moments *before* the current
gradient); the output bias through a few real training steps on a slice of MNIST."""

from __future__ import annotations

import copy
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from vaeflow.config import ConfigError, load_config
from vaeflow.data import DataSplits, load_splits
from vaeflow.models.build import build_model
from vaeflow.models.init import glorot_uniform_, output_bias_from_data_
from vaeflow.run import train as train_mod
from vaeflow.run.checkpoint import load_checkpoint
from vaeflow.run.optim import IWAEAdam, init_state, update_unless

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("VAEFLOW_DATA") or str(ROOT.parent / "shared" / "datasets")
TWO_LAYER = ROOT / "experiments/burda2016_iwae/two_layer.toml"

# ----------------------------------------------------------------------------- IWAEAdam

#: Hyperparameters far enough from the code's that every term of the rule shows: an eps
#: comparable to sqrt(v) (a bias-corrected eps would differ visibly), v0 != 0.
LR, LR2, BETAS, EPS, V0 = 0.01, 0.05, (0.9, 0.99), 0.05, 0.3


def _params(seed: int, dtype=torch.float64) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in ((3, 4), (5,))]


def _two_groups(params, **kw) -> IWAEAdam:
    """The first tensor at the default lr, the second in a group of its own at LR2."""
    opt_kw = {"lr": LR, "betas": BETAS, "eps": EPS, "initial_second_moment": V0, **kw}
    return IWAEAdam([{"params": [params[0]]}, {"params": [params[1]], "lr": LR2}], **opt_kw)


def _grads(g: torch.Generator, params, dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=g, dtype=dtype) for p in params]


class _Reference:
    """yburda/iwae optimizers.py ``Adam``, one tensor, float64, from its equations."""

    def __init__(self, p: torch.Tensor, lr: float) -> None:
        self.p, self.lr = p.detach().clone().double(), lr
        self.m = torch.zeros_like(self.p)
        self.v = torch.full_like(self.p, V0)
        self.t = 1  # the code's timestep, before its increment

    def step(self, g: torch.Tensor) -> None:
        b1, b2 = BETAS
        alpha = self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        # every right-hand side from the old values (Theano's simultaneous updates)
        p = self.p - alpha * self.m / (torch.sqrt(self.v) + EPS)
        m = b1 * self.m + (1 - b1) * g
        v = b2 * self.v + (1 - b2) * g * g
        self.p, self.m, self.v, self.t = p, m, v, self.t + 1


def test_iwae_adam_follows_the_iwae_codes_update_equations():
    params = _params(0)
    start = [p.detach().clone() for p in params]
    opt = _two_groups(params)
    refs = [_Reference(params[0], LR), _Reference(params[1], LR2)]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = _grads(g, params)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
        for p, ref, gr in zip(params, refs, grads, strict=True):
            ref.step(gr)
            state = opt.state[p]
            msg = f"step {step}"
            torch.testing.assert_close(p.detach(), ref.p, rtol=1e-12, atol=1e-14, msg=msg)
            torch.testing.assert_close(state["exp_avg"], ref.m, rtol=1e-12, atol=1e-14, msg=msg)
            torch.testing.assert_close(state["exp_avg_sq"], ref.v, rtol=1e-12, atol=1e-14, msg=msg)
            assert state["step"].dtype == torch.float32 and float(state["step"]) == step + 1
        if step == 0:
            # The first update uses m = 0: the weights stay exactly where they were, and
            # the second moment grew from V0, not from 0.
            for p, s, gr in zip(params, start, grads, strict=True):
                assert torch.equal(p.detach(), s)
                torch.testing.assert_close(
                    opt.state[p]["exp_avg_sq"], BETAS[1] * V0 + (1 - BETAS[1]) * gr**2
                )
    for p, s in zip(params, start, strict=True):  # it did train
        assert (p.detach() - s).abs().min() > 0


def test_iwae_adam_hyperparameters_are_checked():
    p = _params(0)
    for kw in ({"lr": -1.0}, {"eps": -1e-8}, {"initial_second_moment": -1.0}):
        with pytest.raises(ValueError, match="must be >= 0"):
            IWAEAdam(p, **kw)
    with pytest.raises(ValueError, match=r"betas must be in \[0, 1\)"):
        IWAEAdam(p, betas=(0.9, 1.0))
    # the code's defaults
    group = IWAEAdam(p).param_groups[0]
    assert (group["betas"], group["eps"], group["initial_second_moment"]) == (
        (0.99, 0.999),
        1e-4,
        1.0,
    )


def _loss(params, target: torch.Tensor) -> torch.Tensor:
    """A batch-*sum* loss over 20 examples, non-quadratic, so the gradients depend on the
    trajectory."""
    w, b = params
    pred = torch.tanh(target[:, :3] @ w + 0.1) @ torch.ones(4, dtype=w.dtype) + b.sum()
    return ((pred - target[:, 3]) ** 2).sum() + (w**4).sum()


def _trajectory(scale: float, eps: float, v0: float, steps: int = 12) -> list[torch.Tensor]:
    params = _params(3)
    opt = IWAEAdam(params, lr=0.02, betas=(0.9, 0.99), eps=eps, initial_second_moment=v0)
    target = torch.randn(20, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (_loss(params, target) * scale).backward()
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    return out


def test_batch_mean_loss_with_scaled_eps_and_v0_follows_the_batch_sum_trajectory():
    """The docstring's claim: the IWAE code's settings (eps, v0) on the gradient of the
    batch sum equal (eps / B, v0 / B^2) on the batch mean's; unscaled, they do not."""
    b, eps, v0 = 20, 1e-1, 1.0
    summed = _trajectory(1.0, eps, v0)
    mean = _trajectory(1 / b, eps / b, v0 / b**2)
    for i, (s, m) in enumerate(zip(summed, mean, strict=True)):
        torch.testing.assert_close(m, s, rtol=1e-10, atol=1e-12, msg=f"step {i}")
    unscaled = _trajectory(1 / b, eps, v0)
    assert (unscaled[-1] - summed[-1]).abs().max() > 1e-3


def test_update_unless_equals_step_and_a_skip_changes_nothing():
    """The compiled step's update (update_unless) against IWAEAdam.step(), in float32 as a
    model trains, with the learning rate a 0-d tensor (as the compiled step keeps it)."""
    eager, compiled = _params(0, torch.float32), _params(0, torch.float32)
    opt_e = _two_groups(eager)
    opt_c = _two_groups(compiled)
    for group in opt_c.param_groups:
        group["lr"] = torch.tensor(group["lr"])
    init_state(opt_c)
    for p in compiled:  # the state of a parameter before its first update
        state = opt_c.state[p]
        assert torch.equal(state["exp_avg_sq"], torch.full_like(p, V0))
        assert not state["exp_avg"].any() and float(state["step"]) == 0
    groups = [group["params"] for group in opt_c.param_groups]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = _grads(g, eager, torch.float32)
        for p, gr in zip(eager, grads, strict=True):
            p.grad = gr.clone()
        if step == 3:  # skipped: nothing moves, in eager training the step is not taken
            before = copy.deepcopy((compiled, opt_c.state_dict()))
            update_unless(opt_c, groups, [[grads[0]], [grads[1]]], torch.tensor(True))
            after = (compiled, opt_c.state_dict())
            torch.testing.assert_close(after, before, rtol=0, atol=0)
            continue
        opt_e.step()
        update_unless(opt_c, groups, [[grads[0]], [grads[1]]], torch.tensor(False))
        if step == 0:  # the lag: the first update leaves the weights where they were
            start = _params(0, torch.float32)
            assert all(torch.equal(a, b) for a, b in zip(compiled, start, strict=True))
        for p, q in zip(eager, compiled, strict=True):
            msg = f"step {step}"
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=msg)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(
                    opt_c.state[q][key], opt_e.state[p][key], rtol=1e-6, atol=1e-9, msg=msg
                )
    assert float(opt_c.state[compiled[0]]["step"]) == 5  # one of six skipped


def test_state_dict_round_trip_continues_identically():
    params = _params(0)
    opt = _two_groups(params)
    g = torch.Generator().manual_seed(1)

    def steps(opt, params, grads_list):
        for grads in grads_list:
            for p, gr in zip(params, grads, strict=True):
                p.grad = gr.clone()
            opt.step()

    steps(opt, params, [_grads(g, params) for _ in range(3)])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    restored = [nn.Parameter(t.clone()) for t in saved["params"]]
    # a fresh optimiser with other hyperparameters: the checkpoint's are the ones used
    fresh = IWAEAdam(
        [{"params": [restored[0]]}, {"params": [restored[1]]}], lr=1.0, initial_second_moment=0
    )
    fresh.load_state_dict(saved["opt"])
    assert [grp["lr"] for grp in fresh.param_groups] == [LR, LR2]
    assert fresh.param_groups[0]["initial_second_moment"] == V0
    later = [_grads(g, params) for _ in range(3)]
    steps(opt, params, later)
    steps(fresh, restored, later)
    for p, q in zip(params, restored, strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh.state[q][key]), key
    assert float(fresh.state[restored[0]]["step"]) == 6


def test_train_builds_iwae_adam_from_the_config():
    cfg = load_config(
        None,
        [
            'train.optimizer="adam_iwae"',
            "train.betas=[0.99, 0.999]",
            "train.eps=5e-6",
            "train.initial_second_moment=0.0025",
            "train.lr=3e-4",
        ],
    )
    opt = train_mod._optimizer(cfg, build_model(cfg.model))
    assert type(opt) is IWAEAdam
    for group in opt.param_groups:
        assert (group["lr"], group["betas"], group["eps"], group["initial_second_moment"]) == (
            3e-4,
            (0.99, 0.999),
            5e-6,
            0.0025,
        )


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["train.initial_second_moment=0.01"], r"train\.initial_second_moment = 0\.01.*'adam'"),
        (
            ['train.optimizer="adamax"', "train.initial_second_moment=0.01"],
            r"train\.initial_second_moment.*'adamax'",
        ),
        (
            ['train.optimizer="adam_iwae"', "train.initial_second_moment=-0.01"],
            r"train\.initial_second_moment must be >= 0",
        ),
        (
            [
                'train.optimizer="adam_iwae"',
                "train.initial_second_moment=1.0",
                "train.weight_decay=0.01",
            ],
            r"train\.weight_decay = 0\.01.*adam_iwae",
        ),
        (
            ['train.optimizer="adam_iwae"'],
            r"'adam_iwae' needs train\.initial_second_moment.*1 / batch_size\^2",
        ),
        (
            ["model.output_bias_from_data=true", 'model.decoder={name="gated_conv"}'],
            r"model\.output_bias_from_data.*'gated_conv'",
        ),
        (
            [
                "model.output_bias_from_data=true",
                'data.dataset="cifar10"',
                "model.x_shape=[3, 32, 32]",
                'model.likelihood="discretized_logistic"',
            ],
            r"model\.output_bias_from_data.*'discretized_logistic'",
        ),
        (['model.init="xavier"'], r"model\.init"),
    ],
)
def test_config_errors_name_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_the_protocol_settings_are_accepted():
    cfg = load_config(
        TWO_LAYER,
        [
            'train.optimizer="adam_iwae"',
            "train.initial_second_moment=0.0025",
            'model.init="glorot_uniform"',
            "model.output_bias_from_data=true",
        ],
    )
    assert cfg.train.initial_second_moment == 0.0025 and cfg.model.init == "glorot_uniform"
    assert cfg.model.output_bias_from_data
    default = load_config(None, [])
    assert (default.model.init, default.model.output_bias_from_data) == ("torch", False)
    assert default.train.initial_second_moment is None


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_glorot_init_of_a_conv_model_is_a_config_error(part):
    cfg = load_config(
        None,
        [
            f'model.{part}.name="gated_conv"',
            f"model.{part}.options={{}}",
            'model.init="glorot_uniform"',
        ],
    )
    with pytest.raises(ConfigError, match=r"model\.init = 'glorot_uniform'.*Conv"):
        build_model(cfg.model)


# ----------------------------------------------------------------------------- Glorot init


def _bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def _check_glorot(w: torch.Tensor, fan_in: int, fan_out: int, name: str) -> None:
    a = _bound(fan_in, fan_out)
    top = float(w.detach().abs().max())
    assert top <= a * (1 + 1e-6), (name, top, a)
    assert top > 0.9 * a, (name, top, a)  # the bound is used, not a smaller one


def test_glorot_uniform_two_layer_model():
    """Burda et al.'s two-stochastic-layer model with model.init = "glorot_uniform": every
    linear layer Glorot(fan_in, fan_out) with zero bias; the Gaussian heads Linear(H, 2D)
    as two Glorot(H, D) layers (mean rows, log-std rows)."""
    torch.manual_seed(0)
    model = build_model(load_config(TWO_LAYER, ['model.init="glorot_uniform"']).model)
    heads = {id(m.head) for m in (*model.posteriors, *model.conditionals)}
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 12 and len(heads) == 3
    for name, m in linear:
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        if id(m) in heads:
            d = m.out_features // 2
            for half in (m.weight[:d], m.weight[d:]):
                _check_glorot(half, m.in_features, d, name)
        else:
            _check_glorot(m.weight, m.in_features, m.out_features, name)
    # torch's default init is another (Kaiming-uniform: a bound of 1 / sqrt(fan_in))
    torch.manual_seed(0)
    plain = build_model(load_config(TWO_LAYER, ['model.init="torch"']).model)
    assert plain.encoders[0].net[0].weight.abs().max() < 0.5 * _bound(784, 200)


def _flow_model(init: str = "torch") -> nn.Module:
    cfg = load_config(
        None,
        [
            "model.latent_dim=4",
            "model.encoder.options={hidden=[16]}",
            "model.decoder.options={hidden=[16]}",
            'model.posterior.flow="iaf"',
            "model.posterior.num_layers=1",
            "model.posterior.hidden=8",
            "model.posterior.context_features=4",
            'model.prior.name="flow"',
            'model.prior.flow="realnvp"',
            "model.prior.num_layers=2",
            "model.prior.hidden=8",
            f'model.init="{init}"',
        ],
    )
    torch.manual_seed(0)
    return build_model(cfg.model)


def _kept(name: str) -> bool:
    """The parameters glorot_uniform_ must leave alone: the prior, the posterior's flow and
    the flow's context layer."""
    return name.startswith(("prior.", "posterior.flow.", "posterior.context."))


def test_glorot_uniform_leaves_flows_and_priors_alone():
    model = _flow_model()
    before = copy.deepcopy(model.state_dict())
    assert glorot_uniform_(model) == 4  # encoder, Gaussian head, decoder's two layers
    after = model.state_dict()
    kept = [k for k in before if _kept(k)]
    assert any(k.startswith("prior.") for k in kept) and any("made" in k for k in kept)
    for key in before:
        if _kept(key):
            assert torch.equal(after[key], before[key]), key
        elif key.endswith("weight"):
            assert not torch.equal(after[key], before[key]), key
        elif key.endswith("bias"):
            assert not after[key].any(), key
    # the base Gaussian's head: two Glorot(16, 4) halves
    head = model.posterior.base.head
    for half in (head.weight[:4], head.weight[4:]):
        _check_glorot(half, 16, 4, "posterior.base.head")
    _check_glorot(model.encoder.net[0].weight, 784, 16, "encoder")
    # build_model applies it, after building: the kept parts as torch initialised them
    built = _flow_model("glorot_uniform")
    state = built.state_dict()
    for key in before:
        if _kept(key):
            assert torch.equal(state[key], before[key]), key
        elif key.endswith("bias"):
            assert not state[key].any(), key
    _check_glorot(built.decoder.net[2].weight, 16, 784, "decoder")


# ----------------------------------------------------------------------------- output bias


def _expected_bias(x_uint8: torch.Tensor) -> torch.Tensor:
    """logit(clip(training mean, 1e-3, 1 - 1e-3)), from the uint8 images, in float64 (the
    float32 bias agrees to ~2e-6 relative: near the clip, logit' = 1 / (p (1 - p)) ~ 1000
    amplifies float32's rounding of 0.999)."""
    mean = x_uint8.double().div(255).mean(0).reshape(-1)
    p = mean.clamp(1e-3, 1 - 1e-3)
    return torch.log(p / (1 - p))


def _output_bias(model: nn.Module) -> torch.Tensor:
    last = [m for m in model.decoder.modules() if isinstance(m, nn.Linear)][-1]
    return last.bias.detach().clone()


def test_init_output_bias_from_data_on_uint8_images():
    x = torch.randint(0, 256, (37, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    x = x.to(torch.uint8)
    x[:, 0, 0, :3] = 0  # clipped to 0.001
    x[:, 0, 1, :3] = 255  # clipped to 0.999
    model = _flow_model()
    train_mod._init_output_bias_from_data(model, x)
    expected = _expected_bias(x)
    torch.testing.assert_close(_output_bias(model).double(), expected, rtol=1e-5, atol=1e-5)
    # the data reach both clips: logit(0.001) = -logit(0.999) ~ -6.9068
    lo = math.log(1e-3 / (1 - 1e-3))
    torch.testing.assert_close(expected[:3], torch.full((3,), lo, dtype=torch.float64))
    torch.testing.assert_close(expected[28:31], torch.full((3,), -lo, dtype=torch.float64))
    # a decoder of another size: said, not broadcast
    with pytest.raises(ValueError, match="784 logits"):
        output_bias_from_data_(model, torch.full((10,), 0.5))
    with pytest.raises(ConfigError, match="model.output_bias_from_data"):
        train_mod._init_output_bias_from_data(model, x[:, :, :14])


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    """A slice of MNIST whose first pixel is always on (the clip at 0.999 is exercised;
    the always-off corner pixels exercise the one at 0.001)."""
    full = load_splits("mnist", DATA, val_size=100)
    train = full.train[:240].clone()
    train[:, 0, 0, 0] = 255
    return DataSplits(train, full.val[:40], full.test[:40], (1, 28, 28), full.kind, "mnist")


RUN = [
    f'data.root="{DATA}"',
    "data.batch_size=16",
    "data.eval_batch_size=40",
    "model.latent_dim=4",
    'model.encoder.options={hidden=[16], activation="tanh"}',
    'model.decoder.options={hidden=[16], activation="tanh"}',
    'model.init="glorot_uniform"',
    "model.output_bias_from_data=true",
    'train.optimizer="adam_iwae"',
    "train.betas=[0.99, 0.999]",
    "train.eps=5e-6",
    "train.initial_second_moment=0.0025",
    "train.lr=1e-2",
    "train.steps=4",
    "train.val_every=2",
    "train.val_k=2",
    "train.ckpt_every=2",
    "train.log_every=2",
    'train.device="cpu"',
]


def test_output_bias_is_set_when_a_run_starts_not_on_resume(tmp_path, splits, monkeypatch):
    expected = _expected_bias(splits.train)
    assert expected.min() == pytest.approx(math.log(1e-3 / (1 - 1e-3)))  # an always-off pixel
    assert expected[0] == pytest.approx(math.log((1 - 1e-3) / 1e-3))  # the always-on one
    set_biases: list[torch.Tensor] = []
    after_setup: list[torch.Tensor] = []
    init_bias, setup = train_mod._init_output_bias_from_data, train_mod._setup_run

    def spy_init(model, x_train):
        init_bias(model, x_train)
        set_biases.append(_output_bias(model))

    def spy_setup(*args, **kwargs):
        run = setup(*args, **kwargs)
        after_setup.append(_output_bias(run.model))
        return run

    monkeypatch.setattr(train_mod, "_init_output_bias_from_data", spy_init)
    monkeypatch.setattr(train_mod, "_setup_run", spy_setup)
    cfg = load_config(None, RUN)

    train_mod.train(cfg, tmp_path / "full", splits=splits)
    # step 0 of a fresh run: the logit of the clipped training mean
    assert len(set_biases) == 1
    torch.testing.assert_close(set_biases[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(after_setup[0], set_biases[0])  # nothing overwrote it before step 1

    train_mod.train(cfg, tmp_path / "killed", splits=splits, stop_after_step=2)
    assert len(set_biases) == 2
    ckpt = load_checkpoint(tmp_path / "killed/checkpoints/last.pt")
    assert ckpt["step"] == 2
    saved = ckpt["model"]["decoder.net.2.bias"]
    assert (saved.double() - expected).abs().max() > 1e-4  # training moved it
    train_mod.train(cfg, tmp_path / "killed", resume=True, splits=splits)
    assert len(set_biases) == 2  # not set again on resume ...
    assert torch.equal(after_setup[-1], saved)  # ... the run continues from the checkpoint's
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "killed/checkpoints/last.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


# ----------------------------------------------------------------------------- review fixes


def test_iwae_code_init_has_the_codes_very_draws() -> None:
    """model.init = 'iwae_code': each layer is numpy RandomState(123).uniform(-a, a, (in,
    out)) transposed (the code seeds every layer alike), so a Gaussian head's mean and
    log-sigma halves start identical; independent of the torch seed."""
    import numpy as np

    cfg = load_config(TWO_LAYER, ['model.init="iwae_code"'])
    torch.manual_seed(0)
    a = build_model(cfg.model)
    torch.manual_seed(1)
    b = build_model(cfg.model)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name  # the torch seed plays no part
    lin = a.encoders[0].net[0]  # 784 -> 200
    bound = (6.0 / (784 + 200)) ** 0.5
    want = np.random.RandomState(123).uniform(-bound, bound, size=(784, 200)).T
    torch.testing.assert_close(lin.weight.double(), torch.from_numpy(want), rtol=0, atol=1e-7)
    head = a.posteriors[0].head  # 200 -> (100 mu, 100 log-std)
    mu_w, ls_w = head.weight.chunk(2, dim=0)
    assert torch.equal(mu_w, ls_w)
    bound = (6.0 / (200 + 100)) ** 0.5
    want = np.random.RandomState(123).uniform(-bound, bound, size=(200, 100)).T
    torch.testing.assert_close(mu_w.double(), torch.from_numpy(want), rtol=0, atol=1e-7)
    assert all(torch.count_nonzero(m.bias) == 0 for m in a.modules() if isinstance(m, nn.Linear))


def test_glorot_refuses_gated_layers() -> None:
    """A gated layer fuses value and gate in one Linear: no IWAE-code init for it."""
    cfg = load_config(
        None,
        [
            'model.encoder={name="mlp", options={hidden=[16], gated=true, activation="identity"}}',
            'model.init="glorot_uniform"',
        ],
    )
    with pytest.raises(ConfigError, match=r"model\.init = 'glorot_uniform'.*GatedLinear"):
        build_model(cfg.model)


def test_resume_refuses_another_optimizer(tmp_path: Path) -> None:
    """Adam and IWAEAdam keep state under the same names: resuming a run under the other
    optimiser is refused, naming both."""
    from vaeflow.run.train import _check_same_optimizer

    (tmp_path / "config.json").write_text(json.dumps({"train": {"optimizer": "adam"}}))
    _check_same_optimizer(tmp_path, "adam")
    with pytest.raises(ConfigError, match=r"'adam'.*'adam_iwae'"):
        _check_same_optimizer(tmp_path, "adam_iwae")
