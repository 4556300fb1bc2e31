"""The IAF code's weight normalisation (openai/iaf ``tf_utils/layers.py`` ``conv2d`` and
``deconv2d``) and its data-dependent init, written out by hand, and the top-down VAE's
init pass (``tf_train.py``: ``CVAE1(hps, "init", init_x)``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from vaeflow.layers import (
    IAFCodeConv2d,
    IAFCodeConvTranspose2d,
    data_init_active,
    weight_norm_data_init,
)


def _per_out_norm(v):
    return v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)


def test_conv_is_exp_gain_times_unit_direction_plus_bias(float64):
    torch.manual_seed(0)
    conv = IAFCodeConv2d(3, 5, 3, stride=2, padding=1)
    # the code's initial draws: v ~ N(0, 0.05^2), g = 0, b = 0
    big = IAFCodeConv2d(64, 64, 3)
    assert abs(big.weight.std().item() - 0.05) < 0.002
    assert torch.equal(big.log_gain, torch.zeros(64)) and torch.equal(big.bias, torch.zeros(64))
    with torch.no_grad():
        conv.log_gain.normal_()
        conv.bias.normal_()
    x = torch.randn(4, 3, 8, 8)
    w = torch.exp(conv.log_gain).reshape(-1, 1, 1, 1) * conv.weight / _per_out_norm(conv.weight)
    want = F.conv2d(x, w, conv.bias, stride=2, padding=1)
    assert torch.allclose(conv(x), want, atol=1e-12)
    # a mask multiplies v before the norm
    mask = (torch.rand(5, 3, 3, 3) > 0.5).double()
    masked = IAFCodeConv2d(3, 5, 3, padding=1, mask=mask)
    vm = masked.weight * mask
    w = torch.exp(masked.log_gain).reshape(-1, 1, 1, 1) * vm / _per_out_norm(vm)
    assert torch.allclose(masked(x), F.conv2d(x, w, masked.bias, padding=1), atol=1e-12)


def test_transposed_conv_normalises_per_input_channel_and_gains_per_output(float64):
    torch.manual_seed(1)
    deconv = IAFCodeConvTranspose2d(4, 3, 5, 2, padding=2, output_padding=1)
    with torch.no_grad():
        deconv.log_gain.normal_()
    v = deconv.weight  # (in, out, k, k)
    w = torch.exp(deconv.log_gain).reshape(1, -1, 1, 1) * v / _per_out_norm(v)
    x = torch.randn(2, 4, 5, 5)
    want = F.conv_transpose2d(x, w, deconv.bias, 2, 2, 1)
    assert torch.allclose(deconv(x), want, atol=1e-12)
    assert deconv(x).shape == (2, 3, 10, 10)


@pytest.mark.parametrize("transposed", [False, True])
def test_data_init_is_the_codes(float64, transposed):
    """Inside the init block the output is normalised per channel to init_scale, and the
    layer stores g = log(scale) / 3 and b = -mean * scale; afterwards it computes
    scale^(1/3) y - mean * scale (the code's, not a normalised output)."""
    torch.manual_seed(2)
    if transposed:
        layer = IAFCodeConvTranspose2d(4, 3, 5, 2, padding=2, output_padding=1, init_scale=0.1)
        conv = lambda x, w: F.conv_transpose2d(x, w, None, 2, 2, 1)  # noqa: E731
    else:
        layer = IAFCodeConv2d(4, 3, 3, padding=1, init_scale=0.1)
        conv = lambda x, w: F.conv2d(x, w, None, padding=1)  # noqa: E731
    x = 3 * torch.randn(16, 4, 6, 6) + 1
    y0 = conv(x, layer.direction())
    mean, var = y0.mean((0, 2, 3)), y0.var((0, 2, 3), unbiased=False)
    scale = 0.1 / torch.sqrt(var + 1e-10)
    assert not data_init_active()
    with torch.no_grad(), weight_norm_data_init():
        assert data_init_active()
        out = layer(x)
    assert not data_init_active()
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-12)
    assert torch.allclose(out.std((0, 2, 3), unbiased=False), torch.full((3,), 0.1), atol=1e-9)
    assert torch.allclose(layer.log_gain, torch.log(scale) / 3, atol=1e-12)
    assert torch.allclose(layer.bias, -mean * scale, atol=1e-12)
    after = layer(x)
    want = scale.pow(1 / 3).reshape(1, -1, 1, 1) * y0 - (mean * scale).reshape(1, -1, 1, 1)
    assert torch.allclose(after, want, atol=1e-10)


def test_flag_is_reset_after_an_error():
    with pytest.raises(RuntimeError), weight_norm_data_init():
        raise RuntimeError("boom")
    assert not data_init_active()


def test_bad_options_are_refused():
    from vaeflow.flows.registry import build_flow
    from vaeflow.models.topdown import ConvHead, resnet_topdown_layers

    with pytest.raises(ValueError, match="weight_norm"):
        resnet_topdown_layers(8, 2, [1], (4, 4), lambda s: None, weight_norm="iaf-code")
    with pytest.raises(ValueError, match="weight_norm"):
        ConvHead(8, 1, "elu", "iaf-code")
    with pytest.raises(ValueError, match="scale_bound"):
        build_flow("conv_iaf", (2, 3, 3), 1, 4, scale_bound="off")


def test_bad_mask_and_scale_are_refused():
    with pytest.raises(ValueError, match="mask shape"):
        IAFCodeConv2d(3, 5, 3, mask=torch.ones(5, 3, 2, 2))
    with pytest.raises(ValueError, match="init_scale"):
        IAFCodeConv2d(3, 5, 3, init_scale=0.0)


# -- the top-down VAE -------------------------------------------------------------------------

TINY_CODE = [
    "model.topdown={channels=8, latent_channels=2, layers_per_resolution=[1, 1], "
    'weight_norm="iaf_code"}',
    'model.posterior.flow="conv_iaf"',
    "model.posterior.num_layers=1",
    "model.posterior.hidden=8",
    "model.posterior.context_features=8",
    'model.posterior.options={weight_norm="iaf_code", scale_bound="none"}',
]


def _code_model(flow: bool = True):
    from vaeflow.config import load_config
    from vaeflow.models.build import build_model

    sets = TINY_CODE if flow else TINY_CODE[:1]
    cfg = load_config(None, ["model.x_shape=[1, 28, 28]", *sets])
    return build_model(cfg.model)


def test_topdown_builds_the_codes_layers_and_the_init_pass_sets_them():
    from vaeflow.run.train import _data_dependent_init, needs_data_init

    torch.manual_seed(0)
    model = _code_model()
    assert needs_data_init(model)
    code_layers = [
        m for m in model.modules() if isinstance(m, (IAFCodeConv2d, IAFCodeConvTranspose2d))
    ]
    # every conv (stem, blocks, head, the flows' masked convs) is the code's
    plain = [m for m in model.modules() if type(m) in (torch.nn.Conv2d, torch.nn.ConvTranspose2d)]
    assert not plain and len(code_layers) >= 12
    x = (torch.rand(16, 1, 28, 28) > 0.5).float()
    before = torch.get_rng_state()
    _data_dependent_init(model, x, seed=0)
    assert torch.equal(torch.get_rng_state(), before)  # the training stream is untouched
    for m in code_layers:  # every layer initialised itself from the batch
        assert m.log_gain.abs().sum() > 0, m
    assert torch.isfinite(model(x, k=1).log_px_z).all()


def test_init_pass_draws_each_group_base_from_its_prior():
    """tf_train.py, mode "init": ``z = prior.sample``, scored under the posterior; the
    flag off, the posterior's draw."""
    from vaeflow.layers import _DATA_INIT

    torch.manual_seed(1)
    model = _code_model(flow=False)  # the base draw alone
    layer = model.layers[-1]
    x = (torch.rand(3, 1, 28, 28) > 0.5).float()
    a = model.encode(x)[-1]
    h = torch.randn(3, 8, 7, 7)
    noise = torch.randn(3, *layer.latent_shape)
    try:  # the flag as the init block sets it (the layers' init on the same input is
        # idempotent, so the maps below give what sample_posterior saw)
        _DATA_INIT[0] = True
        z, log_q, *_ = layer.sample_posterior(h, a, noise)
        p_mu, p_log_std = layer.prior(h)
        mu, log_std, _ = layer.posterior(h, a)
    finally:
        _DATA_INIT[0] = False
    assert torch.allclose(z, p_mu + torch.exp(p_log_std) * noise, atol=1e-6)
    want = -0.5 * ((z - mu) / torch.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(log_q, want.flatten(1).sum(-1), rtol=1e-5, atol=1e-3)
    z2, *_ = layer.sample_posterior(h, a, noise)
    mu, log_std, _ = layer.posterior(h, a)
    assert torch.allclose(z2, mu + torch.exp(log_std) * noise, atol=1e-6)


def test_config_accepts_the_codes_weight_norm_only():
    from vaeflow.config import ConfigError, load_config

    cfg = load_config(None, ["model.x_shape=[1, 28, 28]", *TINY_CODE])
    assert cfg.model.topdown.weight_norm == "iaf_code"
    with pytest.raises(ConfigError, match="weight_norm"):
        load_config(None, ['model.topdown={weight_norm="tf"}'])


def test_training_runs_the_init_pass_once_not_on_resume(tmp_path, data_init_calls):
    """``vaeflow train`` initialises from the first training batch at the start of a run;
    a resumed run keeps the trained weights; the trained run evaluates."""
    from tests.test_topdown import TINY
    from vaeflow.cli import main as cli_main

    calls = data_init_calls
    code = [s for s in TINY if not s.startswith("model.")] + TINY_CODE
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nname = "wn"\nroot = "{tmp_path}"\n')
    args = ["train", str(cfg), "--no-eval"] + [a for s in code for a in ("--set", s)]
    assert cli_main([*args, "--set", "train.steps=2"]) == 0
    assert calls == [(16, 1, 28, 28)]  # the first training batch (data.batch_size = 16)
    ckpt = torch.load(tmp_path / "wn/checkpoints/last.pt", weights_only=True)
    gains = [v for k, v in ckpt["model"].items() if k.endswith("log_gain")]
    assert gains and all(g.abs().sum() > 0 for g in gains)
    with pytest.warns(UserWarning, match="changed config"):
        assert cli_main([*args, "--set", "train.steps=4", "--resume"]) == 0
    assert len(calls) == 1  # not again on resume
    assert cli_main(["eval", str(tmp_path / "wn"), "--k", "4", "--chunk", "4"]) == 0
