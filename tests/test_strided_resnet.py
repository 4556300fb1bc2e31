"""The strided residual network of Kingma et al. (2016), appendix B (their MNIST model):
``vaeflow.layers.StridedResidualBlock`` written out with plain convs, the paper's layer
plan and sizes (28 -> 14 -> 7 -> 4, [16, 32, 32] maps, a stride-1 block between strided
ones, a 450-unit dense layer), the IAF code's weight norm and data init on every layer,
and a training run through the CLI. Shapes, leading dims, batch independence and gradients
of the tiny versions are checked with every other network in ``tests/test_nn.py``."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vaeflow.layers import (
    IAFCodeConv2d,
    IAFCodeConvTranspose2d,
    IAFCodeLinear,
    ResidualBlock,
    StridedResidualBlock,
    weight_norm_data_init,
)
from vaeflow.models.networks import StridedResNetDecoder, StridedResNetEncoder


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_down_block_by_hand(float64):
    """``shortcut(x) + conv3x3(elu(conv3x3_s2(elu(x))))``, the shortcut a stride-2 1x1."""
    block = StridedResidualBlock(3, 5, activation="elu", weight_norm=False)
    _randomise(block)
    x = torch.randn(2, 3, 7, 6)
    c1, c2 = block.branch[1], block.branch[3]
    h = F.conv2d(F.elu(x), c1.weight, c1.bias, stride=2, padding=1)
    h = F.conv2d(F.elu(h), c2.weight, c2.bias, padding=1)
    skip = F.conv2d(x, block.shortcut.weight, block.shortcut.bias, stride=2)
    want = skip + h
    assert want.shape == (2, 5, 4, 3)  # ceil(7 / 2), ceil(6 / 2)
    assert torch.allclose(block(x), want, atol=1e-12)


def test_up_block_by_hand(float64):
    """Nearest upsampling + 1x1 on the shortcut; a stride-2 transposed 3x3 to the exact
    size (4 -> 7 needs no output padding, 7 -> 14 needs one) on the branch."""
    for size_in, size_out, pad in (((4, 4), (7, 7), 0), ((7, 4), (14, 8), 1)):
        block = StridedResidualBlock(
            4, 2, up=True, in_size=size_in, out_size=size_out, weight_norm=False
        )
        _randomise(block)
        x = torch.randn(3, 4, *size_in)
        c1, c2 = block.branch[1], block.branch[3]
        h = F.conv_transpose2d(
            F.elu(x), c1.weight, c1.bias, stride=2, padding=1, output_padding=pad
        )
        h = F.conv2d(F.elu(h), c2.weight, c2.bias, padding=1)
        up = x.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., : size_out[0], : size_out[1]]
        skip = F.conv2d(up, block.shortcut.weight, block.shortcut.bias)
        assert torch.allclose(block(x), skip + h, atol=1e-12)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_blocks_start_as_their_shortcut(float64, weight_norm):
    down = StridedResidualBlock(2, 3, weight_norm=weight_norm)
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(down(x), down.shortcut(x))
    up = StridedResidualBlock(3, 2, up=True, in_size=(3, 3), out_size=(6, 6))
    y = torch.randn(2, 3, 3, 3)
    assert torch.equal(up(y), up.shortcut(F.interpolate(y, size=(6, 6))))


def test_the_papers_mnist_plan():
    """Appendix B: stride-2 blocks to 16, 32, 32 maps with a stride-1 block between
    strided ones (28 -> 14 -> 7 -> 4), a 450-unit dense layer; the decoder its mirror."""
    enc = StridedResNetEncoder()  # the defaults are the paper's
    kinds = [type(m).__name__ for m in enc.net if isinstance(m, torch.nn.Module)][:5]
    assert kinds == ["StridedResidualBlock", "ResidualBlock"] * 2 + ["StridedResidualBlock"]
    sizes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
        for m in enc.net[:5]
    ]
    assert enc(torch.rand(2, 1, 28, 28).round()).shape == (2, 450)
    for h in hooks:
        h.remove()
    assert sizes == [(16, 14, 14), (16, 14, 14), (32, 7, 7), (32, 7, 7), (32, 4, 4)]

    dec = StridedResNetDecoder(32)
    sizes.clear()
    blocks = [m for m in dec.net if isinstance(m, (StridedResidualBlock, ResidualBlock))]
    for m in blocks:
        m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
    assert dec(torch.randn(5, 32)).shape == (5, 1, 28, 28)
    assert sizes == [(32, 7, 7), (32, 7, 7), (16, 14, 14), (16, 14, 14), (16, 28, 28)]
    assert dec.net[0].in_features == 32 and dec.net[0].out_features == 450


def test_iaf_code_weight_norm_on_every_layer_and_the_data_init_sets_them():
    enc = StridedResNetEncoder(weight_norm="iaf_code")
    dec = StridedResNetDecoder(32, weight_norm="iaf_code")
    code = (IAFCodeConv2d, IAFCodeConvTranspose2d, IAFCodeLinear)
    for net in (enc, dec):
        plain = [
            m
            for m in net.modules()
            if type(m) in (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
        ]
        assert not plain
        layers = [m for m in net.modules() if isinstance(m, code)]
        assert layers
    x = torch.rand(64, 1, 28, 28).round()
    with torch.no_grad(), weight_norm_data_init():
        h = enc(x)
        dec(torch.randn(64, 32))
    for net in (enc, dec):
        for m in net.modules():
            if isinstance(m, code):
                assert m.log_gain.abs().sum() > 0, m
    # in init mode the dense layer's output is normalised per unit: mean 0, std 0.1,
    # before the last ELU
    lin = enc.net[-2]
    with torch.no_grad(), weight_norm_data_init():
        y = lin(enc.net[:-2](x))
    assert torch.allclose(y.mean(0), torch.zeros(450), atol=1e-5)
    assert torch.allclose(y.std(0, unbiased=False), torch.full((450,), 0.1), rtol=1e-3)
    assert torch.isfinite(h).all()


def test_iaf_code_linear_is_exp_gain_times_unit_rows(float64):
    lin = IAFCodeLinear(5, 3)
    with torch.no_grad():
        lin.log_gain.copy_(torch.randn(3))
        lin.bias.copy_(torch.randn(3))
    x = torch.randn(4, 5)
    w = torch.exp(lin.log_gain)[:, None] * lin.weight / lin.weight.norm(dim=1, keepdim=True)
    assert torch.allclose(lin(x), x @ w.T + lin.bias, atol=1e-12)
    # the data init: moments of x v^T / |v| per unit, g = log(0.1 / s) / 3, b = -m 0.1 / s
    y = x @ (lin.weight / lin.weight.norm(dim=1, keepdim=True)).T
    m, s = y.mean(0), y.std(0, unbiased=False)
    with torch.no_grad(), weight_norm_data_init():
        out = lin(x)
    assert torch.allclose(out, 0.1 * (y - m) / s, atol=1e-8)
    assert torch.allclose(lin.log_gain, torch.log(0.1 / s) / 3, atol=1e-8)
    assert torch.allclose(lin.bias, -m * 0.1 / s, atol=1e-8)
    # a model whose only such layer is dense still gets the init pass
    from vaeflow.run.train import needs_data_init

    assert needs_data_init(torch.nn.Sequential(torch.nn.Linear(2, 2), IAFCodeLinear(2, 2)))
    assert not needs_data_init(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="weight_norm"):
        StridedResNetEncoder(weight_norm="iaf-code")
    with pytest.raises(ValueError, match="weight_norm"):
        StridedResNetDecoder(4, weight_norm="tf")
    with pytest.raises(ValueError, match="unstrided"):
        StridedResNetEncoder(unstrided=-1)
    with pytest.raises(ValueError, match="zero_last"):
        StridedResNetDecoder(4, weight_norm="iaf_code", zero_last=True)
    with pytest.raises(ValueError, match="channels"):
        StridedResNetEncoder(channels=())
    with pytest.raises(ValueError, match="cannot upsample"):
        StridedResidualBlock(2, 2, up=True, in_size=(4, 4), out_size=(9, 8))
    with pytest.raises(ValueError, match="in_size and out_size"):
        StridedResidualBlock(2, 2, up=True)


def test_trains_with_the_data_init_and_evaluates_through_the_cli(tmp_path, data_init_calls):
    """A flat VAE with the strided ResNet and the code's weight norm: ``vaeflow train``
    runs the init pass on the first batch (its layers are detected), trains, evaluates."""
    from tests.test_topdown import DATA
    from vaeflow.cli import main as cli_main

    calls = data_init_calls
    net = 'channels=[4, 4], out_features=16, weight_norm="iaf_code"'

    sets = [
        f'data.root="{DATA}"',
        "data.dataset=mnist",
        "data.binarization=dynamic",
        "data.batch_size=8",
        "train.val_size=16",
        "train.val_k=2",
        'train.device="cpu"',
        "eval.n_test=8",
        "model.x_shape=[1, 28, 28]",
        "model.latent_dim=4",
        f"model.encoder={{name='strided_resnet', options={{{net}}}}}",
        "model.decoder={name='strided_resnet', options={channels=[4, 4], hidden=16, "
        'weight_norm="iaf_code"}}',
        "model.posterior.flow=iaf",
        "model.posterior.num_layers=1",
        "model.posterior.hidden=8",
        "train.steps=2",
        "train.val_every=2",
        "train.log_every=1",
        "train.image_every=0",
        "train.ckpt_every=2",
    ]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nname = "s"\nroot = "{tmp_path}"\n')
    args = ["train", str(cfg), "--no-eval"] + [a for s in sets for a in ("--set", s)]
    assert cli_main(args) == 0
    assert calls == [(8, 1, 28, 28)]
    ckpt = torch.load(tmp_path / "s/checkpoints/last.pt", weights_only=True)
    gains = [v for k, v in ckpt["model"].items() if k.endswith("log_gain")]
    assert len(gains) >= 20 and all(g.abs().sum() > 0 for g in gains)
    assert (
        cli_main(["eval", str(tmp_path / "s"), "--k", "2", "--chunk", "2", "--n-test", "8"]) == 0
    )
