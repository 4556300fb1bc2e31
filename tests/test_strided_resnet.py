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
from vaeflow.models.networks import (
    ResNetDecoder,
    ResNetEncoder,
    StridedResNetDecoder,
    StridedResNetEncoder,
)


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_down_block_by_hand(float64):
    """``shortcut(x) + conv3x3(elu(conv3x3_s2(elu(x))))``, the shortcut a stride-2 3x3
    conv (the paper: "strided convolution ... to replace the identity connection")."""
    block = StridedResidualBlock(3, 5, activation="elu", weight_norm=False)
    _randomise(block)
    x = torch.randn(2, 3, 7, 6)
    c1, c2 = block.branch[1], block.branch[3]
    h = F.conv2d(F.elu(x), c1.weight, c1.bias, stride=2, padding=1)
    h = F.conv2d(F.elu(h), c2.weight, c2.bias, padding=1)
    skip = F.conv2d(x, block.shortcut.weight, block.shortcut.bias, stride=2, padding=1)
    want = skip + h
    assert want.shape == (2, 5, 4, 3)  # ceil(7 / 2), ceil(6 / 2)
    assert block.shortcut.weight.shape == (5, 3, 3, 3)
    assert torch.allclose(block(x), want, atol=1e-12)


def test_up_block_by_hand(float64):
    """A stride-2 transposed 3x3 to the exact size on the branch and on the shortcut
    (the paper: "transposed convolution"); 4 -> 7 needs no output padding, 7 -> 14 one,
    per axis."""
    for size_in, size_out, pad in (((4, 4), (7, 7), (0, 0)), ((7, 4), (14, 7), (1, 0))):
        block = StridedResidualBlock(
            4, 2, up=True, in_size=size_in, out_size=size_out, weight_norm=False
        )
        _randomise(block)
        x = torch.randn(3, 4, *size_in)
        c1, c2, sc = block.branch[1], block.branch[3], block.shortcut
        h = F.conv_transpose2d(
            F.elu(x), c1.weight, c1.bias, stride=2, padding=1, output_padding=pad
        )
        h = F.conv2d(F.elu(h), c2.weight, c2.bias, padding=1)
        skip = F.conv_transpose2d(x, sc.weight, sc.bias, stride=2, padding=1, output_padding=pad)
        assert skip.shape[-2:] == size_out and sc.weight.shape == (4, 2, 3, 3)
        assert torch.allclose(block(x), skip + h, atol=1e-12)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_blocks_start_as_their_shortcut(float64, weight_norm):
    down = StridedResidualBlock(2, 3, weight_norm=weight_norm)
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(down(x), down.shortcut(x))
    up = StridedResidualBlock(
        3, 2, up=True, in_size=(3, 3), out_size=(6, 6), weight_norm=weight_norm
    )
    y = torch.randn(2, 3, 3, 3)
    assert torch.equal(up(y), up.shortcut(y))
    assert up(y).shape == (2, 2, 6, 6)


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


def _layers(net):
    """(the IAF code's layers, every other conv or dense layer) of ``net``."""
    from torch.nn.utils import parametrize

    code = (IAFCodeConv2d, IAFCodeConvTranspose2d, IAFCodeLinear)
    plain_types = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    mods = list(net.modules())
    ours = [m for m in mods if isinstance(m, code)]
    other = [
        m
        for m in mods
        if (isinstance(m, plain_types) and not isinstance(m, code))
        or parametrize.is_parametrized(m)
    ]
    return ours, other


def test_iaf_code_weight_norm_on_every_layer_and_the_data_init_sets_them():
    """The defaults are the paper's weight norm: the IAF code's, on every conv and dense
    layer (encoder: 5 blocks x 2-3 convs + 1 dense = 14; decoder: 2 dense + 5 blocks +
    the output conv = 16), none torch's or plain; the init pass sets every scale."""
    enc = StridedResNetEncoder()
    dec = StridedResNetDecoder(32)
    for net, count in ((enc, 3 * 3 + 2 * 2 + 1), (dec, 2 + 3 * 3 + 2 * 2 + 1)):
        ours, other = _layers(net)
        assert len(ours) == count and not other, (len(ours), other)
    x = torch.rand(64, 1, 28, 28).round()
    with torch.no_grad(), weight_norm_data_init():
        h = enc(x)
        dec(torch.randn(64, 32))
    for net in (enc, dec):
        for m in _layers(net)[0]:
            gain = m.gain if isinstance(m, IAFCodeLinear) else m.log_gain
            assert not torch.equal(
                gain, torch.full_like(gain, float(isinstance(m, IAFCodeLinear)))
            ), m
    # in init mode the dense layer's output is normalised per unit to the code's
    # init_scale 1 (mean 0, std 1) before the last ELU; afterwards the layer gives the
    # same numbers on the same batch (g = scale, linear: no /3 as in the convs)
    lin = enc.net[-2]
    feats = enc.net[:-2](x)
    with torch.no_grad(), weight_norm_data_init():
        y = lin(feats)
    assert torch.allclose(y.mean(0), torch.zeros(450), atol=1e-5)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(450), rtol=1e-3)
    with torch.no_grad():
        assert torch.allclose(lin(feats), y, atol=1e-5)
    assert torch.isfinite(h).all()


def test_iaf_code_linear_is_the_codes_linear(float64):
    """openai/iaf tf_utils/layers.py ``linear``: ``x V * g / |V|_col + b``; its init pass
    stores ``g = init_scale / s`` and ``b = -m init_scale / s`` (moments per unit over the
    batch, init_scale 1 by default) and returns the normalised output."""
    lin = IAFCodeLinear(5, 3)
    with torch.no_grad():
        lin.gain.copy_(torch.randn(3))
        lin.bias.copy_(torch.randn(3))
    x = torch.randn(4, 5)
    v = lin.weight.T  # the code's V: (in, out)
    want = (x @ v) * (lin.gain / v.square().sum(0).sqrt()) + lin.bias
    assert torch.allclose(lin(x), want, atol=1e-12)
    y = x @ (v / v.norm(dim=0))
    m, s = y.mean(0), y.std(0, unbiased=False)
    with torch.no_grad(), weight_norm_data_init():
        out = lin(x)
    assert torch.allclose(out, (y - m) / s, atol=1e-8)
    assert torch.allclose(lin.gain, 1.0 / s, atol=1e-8)
    assert torch.allclose(lin.bias, -m / s, atol=1e-8)
    assert torch.allclose(lin(x), out, atol=1e-8)  # the init is what the layer now does
    # leading dims: the moments are over all of them, per unit
    lin2 = IAFCodeLinear(5, 3, init_scale=0.5)
    x3 = torch.randn(4, 2, 5)
    with torch.no_grad(), weight_norm_data_init():
        out3 = lin2(x3)
    flat = out3.reshape(-1, 3)
    assert torch.allclose(flat.std(0, unbiased=False), torch.full((3,), 0.5), rtol=1e-6)
    assert len(set(lin2.gain.tolist())) == 3
    # a model whose only such layer is dense still gets the init pass
    from vaeflow.run.train import needs_data_init

    assert needs_data_init(torch.nn.Sequential(torch.nn.Linear(2, 2), IAFCodeLinear(2, 2)))
    assert not needs_data_init(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_resnet_takes_the_codes_weight_norm_on_every_layer():
    """The one-width ``resnet`` networks: ``"iaf_code"`` reaches the stem, the resampling
    convs, the dense layers and the output conv, not only the residual blocks."""
    from vaeflow.models.networks import ResNetDecoder, ResNetEncoder

    enc = ResNetEncoder((1, 8, 8), 4, 1, 1, 6, weight_norm="iaf_code")
    dec = ResNetDecoder(3, (1, 8, 8), 4, 1, 1, weight_norm="iaf_code")
    for net in (enc, dec):
        ours, other = _layers(net)
        assert ours and not other, other
    with pytest.raises(ValueError, match="weight_norm"):
        ResNetEncoder((1, 8, 8), 4, 1, 1, 6, weight_norm="iaf-code")
    with pytest.raises(ValueError, match="zero_last"):
        ResNetDecoder(3, (1, 8, 8), 4, 1, 1, weight_norm="iaf_code", zero_last=True)


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
    with pytest.raises(ValueError, match="up=True"):
        StridedResidualBlock(2, 2, out_size=(4, 4), in_size=(2, 2))


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
        "model.posterior.context_features=4",
        'model.posterior.weight_norm="iaf_code"',
        'model.posterior.options={weight_norm="iaf_code"}',
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
    logs = [v for k, v in ckpt["model"].items() if k.endswith("log_gain")]
    lins = {k: v for k, v in ckpt["model"].items() if k.endswith(".gain")}
    # two widths, one stride-1 block between: encoder 3 + 2 + 3 convs and 1 dense layer,
    # decoder 2 dense layers, 3 + 2 + 3 convs and the output conv: 17 log gains; dense:
    # those 3, the posterior's head and context projection, the MADE's two masked hidden
    # layers (default num_hidden 2), its output and its context map: 9 gains
    assert (len(logs), len(lins)) == (17, 9), sorted(lins)
    assert all(g.abs().sum() > 0 for g in logs)
    # every dense unit the init pass could scale moved off gain 1 (a MADE unit the mask
    # cuts off from every input keeps it)
    masks = {k[: -len("mask")]: v for k, v in ckpt["model"].items() if k.endswith(".mask")}
    for k, g in lins.items():
        live = masks[k[: -len("gain")]].sum(1) > 0 if k[: -len("gain")] in masks else g == g
        assert (g[live] != 1).all(), k
    assert (
        cli_main(["eval", str(tmp_path / "s"), "--k", "2", "--chunk", "2", "--n-test", "8"]) == 0
    )


def test_residual_scale_multiplies_the_branch_only(float64):
    """``residual_scale = a`` (the IAF code's ``input + .1 * branch``): ``x + a net(x)`` and
    ``shortcut(x) + a branch(x)``, the same weights as the unscaled blocks."""
    x = torch.randn(2, 4, 7, 6)
    plain, scaled = ResidualBlock(4, "elu"), ResidualBlock(4, "elu", residual_scale=0.1)
    _randomise(plain)
    scaled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(scaled(x), x + 0.1 * plain.net(x))
    for up in (False, True):
        kw = dict(up=True, in_size=(7, 6), out_size=(14, 12)) if up else {}
        plain = StridedResidualBlock(4, 3, activation="elu", **kw)
        scaled = StridedResidualBlock(4, 3, activation="elu", residual_scale=0.1, **kw)
        _randomise(plain)
        scaled.load_state_dict(plain.state_dict())
        torch.testing.assert_close(scaled(x), plain.shortcut(x) + 0.1 * plain.branch(x))


def test_the_networks_pass_residual_and_output_scales_on(float64):
    """Every residual block of the strided encoder and decoder gets ``residual_scale``; the
    decoder's output is ``output_scale`` x the unscaled decoder's (the code's logits)."""
    enc = StridedResNetEncoder(residual_scale=0.1, weight_norm=False)
    blocks = [m for m in enc.modules() if isinstance(m, ResidualBlock | StridedResidualBlock)]
    assert len(blocks) == 5 and all(b.residual_scale == 0.1 for b in blocks)
    z = torch.randn(3, 32)
    plain = StridedResNetDecoder(32, weight_norm=False, residual_scale=0.1)
    scaled = StridedResNetDecoder(32, weight_norm=False, residual_scale=0.1, output_scale=0.1)
    _randomise(plain)
    scaled.load_state_dict(plain.state_dict())
    blocks = [m for m in scaled.modules() if isinstance(m, ResidualBlock | StridedResidualBlock)]
    assert len(blocks) == 5 and all(b.residual_scale == 0.1 for b in blocks)
    torch.testing.assert_close(scaled(z), 0.1 * plain(z))
    for bad in (dict(residual_scale=0.0), dict(output_scale=-1.0)):
        with pytest.raises(ValueError, match="_scale must be > 0"):
            StridedResNetDecoder(32, weight_norm=False, **bad)


def test_the_cifar_resnet_passes_the_scales_on(float64):
    """The one-layer CIFAR-10 ResNet (``resnet``): every block gets ``residual_scale``, the
    decoder's output is ``output_scale`` x the unscaled one's."""
    enc = ResNetEncoder((3, 8, 8), channels=4, num_blocks=1, num_downsamples=1, out_features=6,
                        residual_scale=0.1)  # fmt: skip
    blocks = [m for m in enc.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2 and all(b.residual_scale == 0.1 for b in blocks)
    kw = dict(param_shape=(3, 8, 8), channels=4, num_blocks=1, num_upsamples=1, residual_scale=0.1)
    plain, scaled = ResNetDecoder(5, **kw), ResNetDecoder(5, output_scale=0.1, **kw)
    _randomise(plain)
    scaled.load_state_dict(plain.state_dict())
    assert all(b.residual_scale == 0.1 for b in scaled.modules() if isinstance(b, ResidualBlock))
    z = torch.randn(2, 5)
    torch.testing.assert_close(scaled(z), 0.1 * plain(z))
