"""Encoders, decoders and their building blocks (vaeflow/models/networks.py, and the
gated and residual layers of vaeflow/layers.py).

References are independent of the implementation: closed-form parameter counts, gated
convolutions computed with explicit loops, per-sample evaluation for leading dims, and
autograd for batch independence.
"""

import math

import pytest
import torch
from torch import nn

from vaeflow.layers import GatedConv2d, GatedConvTranspose2d, GatedLinear, ResidualBlock
from vaeflow.models.networks import (
    DECODERS,
    ENCODERS,
    GatedConvDecoder,
    GatedConvEncoder,
    MLPDecoder,
    MLPEncoder,
    ResNetDecoder,
    ResNetEncoder,
    build_decoder,
    build_encoder,
)

# Tiny configurations of every network, keyed by registry name: (x_shape, encoder kwargs)
# and (param_shape, decoder kwargs). Small widths keep the file fast on CPU.
TINY_ENC = {
    "mlp": ((1, 4, 4), {"hidden": (7, 5)}),
    "mlp_gated": ((6,), {"hidden": 5, "num_layers": 2, "gated": True, "activation": None}),
    "gated_conv": ((1, 8, 8), {"channels": (3, 4), "strides": (2, 2), "out_features": 6}),
    "resnet": ((3, 8, 8), {"channels": 4, "num_blocks": 1, "num_downsamples": 2}),
    "resnet_wn": (
        (2, 4, 4),
        {"channels": 3, "num_blocks": 2, "num_downsamples": 1, "weight_norm": True},
    ),
    "strided_resnet": ((1, 7, 7), {"channels": (3, 4), "out_features": 5, "weight_norm": False}),
    "strided_resnet_wn": (
        (2, 6, 5),
        {"channels": (3, 4, 2), "unstrided": 2, "out_features": 6, "weight_norm": "iaf_code"},
    ),
}
TINY_DEC = {
    "mlp": ((1, 4, 4), {"hidden": (7, 5)}),
    "mlp_linear": ((3,), {"hidden": ()}),
    "mlp_gated": ((2, 3), {"hidden": (5,), "gated": True, "activation": "elu"}),
    "gated_conv": ((2, 8, 8), {"channels": (4, 3, 3), "strides": (2, 2)}),
    "resnet": ((5, 8, 8), {"channels": 4, "num_blocks": 1, "num_upsamples": 2}),
    "resnet_wn": (
        (2, 4, 4),
        {"channels": 3, "num_blocks": 2, "num_upsamples": 1, "weight_norm": True},
    ),
    "strided_resnet": ((1, 7, 7), {"channels": (3, 4), "hidden": 5, "weight_norm": True}),
    "strided_resnet_wn": (
        (2, 6, 5),
        {"channels": (3, 4, 2), "unstrided": 2, "hidden": 6, "weight_norm": "iaf_code"},
    ),
}
LATENT = 3


def make_encoder(key: str) -> nn.Module:
    x_shape, kw = TINY_ENC[key]
    return build_encoder(key.split("_wn")[0].replace("mlp_gated", "mlp"), x_shape, **kw)


def make_decoder(key: str) -> nn.Module:
    param_shape, kw = TINY_DEC[key]
    name = {
        "mlp_linear": "mlp",
        "mlp_gated": "mlp",
        "resnet_wn": "resnet",
        "strided_resnet_wn": "strided_resnet",
    }.get(key, key)
    return build_decoder(name, LATENT, param_shape, **kw)


def perturb(module: nn.Module, scale: float = 0.1) -> None:
    """Add noise to every parameter, so zero-initialised layers stop blocking gradients."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("key", sorted(TINY_ENC))
@pytest.mark.parametrize("lead", [(2,), (3, 2)])
def test_encoder_shapes(key, lead):
    enc = make_encoder(key)
    x_shape = TINY_ENC[key][0]
    h = enc(torch.rand(*lead, *x_shape))
    assert h.shape == (*lead, enc.out_features)
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("key", sorted(TINY_DEC))
@pytest.mark.parametrize("lead", [(), (2,), (4, 2)])
def test_decoder_shapes(key, lead):
    dec = make_decoder(key)
    out = dec(torch.randn(*lead, LATENT))
    assert dec.param_shape == TINY_DEC[key][0]
    assert out.shape == (*lead, *dec.param_shape)
    assert torch.isfinite(out).all()


def test_paper_default_shapes():
    # van den Berg et al. 2018 MNIST networks and the CIFAR ResNet at their defaults.
    x = torch.rand(2, 1, 28, 28)
    assert GatedConvEncoder()(x).shape == (2, 256)
    assert GatedConvDecoder(8)(torch.randn(3, 2, 8)).shape == (3, 2, 1, 28, 28)
    assert ResNetEncoder()(torch.rand(1, 3, 32, 32)).shape == (1, 512)
    assert ResNetDecoder(8, (30, 32, 32))(torch.randn(1, 8)).shape == (1, 30, 32, 32)


# ----------------------------------------------------------------- parameter counts


def test_iwae_mlp_sizes():
    # Burda et al. 2016: 784-200-200-(50) encoder, 50-200-200-784 decoder, tanh.
    enc = build_encoder("mlp", (1, 28, 28), hidden=(200, 200), activation="tanh")
    dec = build_decoder("mlp", 50, (1, 28, 28), hidden=200, num_layers=2, activation="tanh")
    n_enc = (784 * 200 + 200) + (200 * 200 + 200)
    n_dec = (50 * 200 + 200) + (200 * 200 + 200) + (200 * 784 + 784)
    assert sum(p.numel() for p in enc.parameters()) == n_enc
    assert sum(p.numel() for p in dec.parameters()) == n_dec
    assert enc.out_features == 200
    assert sum(isinstance(m, nn.Tanh) for m in enc.modules()) == 2
    # tanh features: the encoder ends in its non-linearity
    assert enc(torch.rand(3, 1, 28, 28)).abs().max() < 1


def test_sylvester_gated_conv_sizes():
    # van den Berg et al. 2018, MNIST: each gated layer holds two convs (value, gate).
    def gated(c_in, c_out, k):
        return 2 * (c_in * c_out * k * k + c_out)

    enc_layers = [(1, 32, 5), (32, 32, 5), (32, 64, 5), (64, 64, 5), (64, 64, 5), (64, 256, 7)]
    dec_layers = [(40, 64, 7), (64, 64, 5), (64, 32, 5), (32, 32, 5), (32, 32, 5), (32, 32, 5)]
    n_enc = sum(gated(*layer) for layer in enc_layers)
    n_dec = sum(gated(*layer) for layer in dec_layers) + (32 * 1 + 1)  # 1x1 output conv
    assert sum(p.numel() for p in GatedConvEncoder().parameters()) == n_enc
    assert sum(p.numel() for p in GatedConvDecoder(40).parameters()) == n_dec


# ----------------------------------------------------------------- gating, by hand


def _conv_by_hand(x, w, b, stride):
    """Valid cross-correlation of one (H, W) map with one (k, k) kernel, by loops."""
    k = w.shape[0]
    rows = (x.shape[0] - k) // stride + 1
    cols = (x.shape[1] - k) // stride + 1
    out = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            patch = x[i * stride : i * stride + k, j * stride : j * stride + k]
            out[i, j] = (patch * w).sum() + b
    return out


def _conv_transpose_by_hand(x, w, b, stride):
    """Transposed conv (no padding) of one map: scatter x[i, j] * w into the output."""
    k = w.shape[0]
    out = torch.zeros((x.shape[0] - 1) * stride + k, (x.shape[1] - 1) * stride + k)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i * stride : i * stride + k, j * stride : j * stride + k] += x[i, j] * w
    return out + b


@pytest.mark.parametrize("activation", [None, "tanh"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gated_conv_by_hand(float64, activation, stride):
    layer = GatedConv2d(1, 1, 2, stride=stride, activation=activation)
    wa, wb = torch.randn(2, 2), torch.randn(2, 2)
    ba, bb = 0.3, -0.7
    with torch.no_grad():
        layer.conv.weight.copy_(torch.stack([wa, wb])[:, None])
        layer.conv.bias.copy_(torch.tensor([ba, bb]))
    x = torch.randn(5, 5)
    a = _conv_by_hand(x, wa, ba, stride)
    g = _conv_by_hand(x, wb, bb, stride)
    a = a if activation is None else torch.tanh(a)
    torch.testing.assert_close(
        layer(x[None, None])[0, 0], a * torch.sigmoid(g), rtol=0, atol=1e-14
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_gated_conv_transpose_by_hand(float64, stride):
    layer = GatedConvTranspose2d(1, 1, 3, stride=stride)
    wa, wb = torch.randn(3, 3), torch.randn(3, 3)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.stack([wa, wb])[None])  # (in, 2*out, k, k)
        layer.conv.bias.copy_(torch.tensor([0.2, 0.5]))
    x = torch.randn(3, 4)
    a = _conv_transpose_by_hand(x, wa, 0.2, stride)
    g = _conv_transpose_by_hand(x, wb, 0.5, stride)
    torch.testing.assert_close(
        layer(x[None, None])[0, 0], a * torch.sigmoid(g), rtol=0, atol=1e-14
    )


def test_gated_linear_by_hand(float64):
    layer = GatedLinear(4, 3, activation="elu")
    x = torch.randn(2, 4)
    w, b = layer.linear.weight, layer.linear.bias
    a = x @ w[:3].T + b[:3]
    g = x @ w[3:].T + b[3:]
    expected = torch.where(a > 0, a, torch.expm1(a)) * torch.sigmoid(g)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-14)


def test_gated_transpose_upsamples_exactly():
    # padding k//2 with output_padding s-1 multiplies the size by s exactly
    layer = GatedConvTranspose2d(2, 3, 5, stride=2, padding=2, output_padding=1)
    assert layer(torch.randn(1, 2, 7, 6)).shape == (1, 3, 14, 12)


# ---------------------------------------------------------------- per-sample behaviour


@pytest.mark.parametrize("key", sorted(TINY_ENC))
def test_encoder_no_batch_mixing(float64, key):
    enc = make_encoder(key)
    perturb(enc)
    x = torch.rand(3, *TINY_ENC[key][0], requires_grad=True)
    enc(x)[1].square().sum().backward()
    assert (x.grad[[0, 2]] == 0).all()
    assert x.grad[1].abs().sum() > 0


@pytest.mark.parametrize("key", sorted(TINY_DEC))
def test_decoder_no_batch_mixing(float64, key):
    dec = make_decoder(key)
    perturb(dec)
    z = torch.randn(2, 3, LATENT, requires_grad=True)
    dec(z)[1, 2].square().sum().backward()
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert (z.grad[mask] == 0).all()
    assert z.grad[1, 2].abs().sum() > 0


@pytest.mark.parametrize("key", sorted(TINY_DEC))
def test_decoder_leading_dims_equal_per_sample(float64, key):
    dec = make_decoder(key)
    perturb(dec)
    z = torch.randn(3, 2, LATENT)
    out = dec(z)
    per_sample = torch.stack(
        [torch.stack([dec(z[k, b][None])[0] for b in range(2)]) for k in range(3)]
    )
    torch.testing.assert_close(out, per_sample, rtol=0, atol=1e-12)
    torch.testing.assert_close(dec(z[0, 0]), per_sample[0, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("key", sorted(TINY_ENC))
def test_encoder_leading_dims_equal_flat_batch(float64, key):
    enc = make_encoder(key)
    x = torch.rand(2, 3, *TINY_ENC[key][0])
    flat = enc(x.reshape(6, *TINY_ENC[key][0])).reshape(2, 3, -1)
    torch.testing.assert_close(enc(x), flat, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ init


@pytest.mark.parametrize("weight_norm", [False, True])
def test_residual_block_identity_at_init(float64, weight_norm):
    block = ResidualBlock(4, "gelu", weight_norm=weight_norm)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x), x)
    # ... and stops being the identity once trained away from init
    perturb(block)
    assert not torch.allclose(block(x), x)


@pytest.mark.parametrize("cls", [ResNetEncoder, ResNetDecoder])
@pytest.mark.parametrize("weight_norm", [False, True])
def test_resnet_blocks_identity_at_init(cls, weight_norm):
    net = cls(8 if cls is ResNetDecoder else (3, 8, 8), channels=4, weight_norm=weight_norm)
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2 * 4  # num_blocks per resolution, 3 resampling steps
    for block in blocks:
        x = torch.randn(1, 4, 3, 3)
        assert torch.equal(block(x), x)


@pytest.mark.parametrize(
    "dec",
    [
        lambda: MLPDecoder(LATENT, (1, 2, 2), hidden=(4,), zero_last=True),
        lambda: GatedConvDecoder(LATENT, (2, 4, 4), (3, 3), (2,), zero_last=True),
        lambda: ResNetDecoder(LATENT, (2, 4, 4), 3, 1, 1, zero_last=True),
        lambda: ResNetDecoder(LATENT, (2, 4, 4), 3, 1, 1, weight_norm=True, zero_last=True),
    ],
)
def test_zero_last_gives_zero_params(dec):
    out = dec()(torch.randn(5, LATENT))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("key", sorted(TINY_DEC))
def test_default_decoder_output_depends_on_z(key):
    # the documented choice: no zero init of the output, so params depend on z from step 0
    dec = make_decoder(key)
    out = dec(torch.randn(2, LATENT))
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_center_maps_unit_interval_to_symmetric():
    """center=True feeds 2x - 1; the binary-data encoders default to raw x (see nn's doc)."""
    x = torch.rand(4, 2, 3)
    flat = x.reshape(4, 6)
    torch.testing.assert_close(MLPEncoder((2, 3), hidden=(), center=True)(x), 2 * flat - 1)
    torch.testing.assert_close(MLPEncoder((2, 3), hidden=())(x), flat)
    assert MLPEncoder((2, 3)).center is False and GatedConvEncoder((1, 8, 8)).center is False
    assert ResNetEncoder((3, 8, 8), 4, 1, 1, 4).center is True
    centred = GatedConvEncoder((1, 8, 8), (3,), (2,), 3, 4, center=True)
    raw = GatedConvEncoder((1, 8, 8), (3,), (2,), 3, 4)
    weights = {k: v for k, v in centred.state_dict().items() if k != "center_inputs"}
    raw.load_state_dict(weights, strict=False)  # same weights, raw keeps center=False
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(centred(x), raw(2 * x - 1))


# ------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("key", sorted(TINY_ENC))
def test_encoder_gradients_reach_every_parameter(key):
    enc = make_encoder(key)
    perturb(enc)
    h = enc(torch.rand(2, *TINY_ENC[key][0]))
    (h * torch.randn_like(h)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("key", sorted(TINY_DEC))
def test_decoder_gradients_reach_every_parameter(key):
    dec = make_decoder(key)
    perturb(dec)
    z = torch.randn(2, 2, LATENT, requires_grad=True)
    out = dec(z)
    (out * torch.randn_like(out)).sum().backward()
    assert z.grad.abs().sum() > 0
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", ["mlp", "gated_conv", "resnet_wn"])
def test_dtypes(dtype, key):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        enc, dec = make_encoder(key), make_decoder(key)
        h = enc(torch.rand(2, *TINY_ENC[key][0]))
        out = dec(torch.randn(2, LATENT))
    finally:
        torch.set_default_dtype(old)
    assert h.dtype == out.dtype == dtype
    assert torch.isfinite(h).all() and torch.isfinite(out).all()
    # a float32 module moved to float64 follows its inputs' dtype
    dec64 = make_decoder(key).to(torch.float64)
    assert dec64(torch.randn(2, LATENT, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------- registry


def test_registries_list_every_family():
    assert set(ENCODERS) == set(DECODERS) == {"mlp", "gated_conv", "resnet", "strided_resnet"}
    assert isinstance(
        build_encoder("gated_conv", (1, 8, 8), channels=(2,), strides=(2,)), GatedConvEncoder
    )
    assert isinstance(
        build_decoder("resnet", 2, (1, 4, 4), channels=2, num_upsamples=1), ResNetDecoder
    )


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match="gated_conv.*mlp.*resnet"):
        build_encoder("vgg", (1, 28, 28))
    with pytest.raises(ValueError, match="gated_conv.*mlp.*resnet"):
        build_decoder("vgg", 2, (1, 28, 28))


def test_registry_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"'widht'.*'hidden'"):
        build_encoder("mlp", 784, widht=3)
    with pytest.raises(ValueError, match=r"'depth'.*'num_blocks'"):
        build_decoder("resnet", 2, (3, 32, 32), depth=3)


# ---------------------------------------------------------------------------- errors


def test_shape_errors():
    with pytest.raises(ValueError, match="trailing shape"):
        MLPEncoder((1, 28, 28))(torch.rand(2, 784))
    with pytest.raises(ValueError, match="trailing shape"):
        MLPDecoder(4, 3, hidden=())(torch.randn(2, 5))
    with pytest.raises(ValueError, match="divisible"):
        GatedConvDecoder(4, (1, 30, 30))
    with pytest.raises(ValueError, match="divisible"):
        ResNetEncoder((3, 20, 20), num_downsamples=3)
    with pytest.raises(ValueError, match="num_layers"):
        MLPEncoder(784, hidden=(20, 20), num_layers=2)
    with pytest.raises(ValueError, match="gated"):
        MLPDecoder(4, 3, activation=None)


def test_int_hidden_builds_num_layers():
    enc = MLPEncoder(10, hidden=6, num_layers=3)
    widths = [m.out_features for m in enc.modules() if isinstance(m, nn.Linear)]
    assert widths == [6, 6, 6]
    assert math.prod(enc(torch.rand(2, 10)).shape) == 12


def test_center_flag_travels_with_the_state_dict():
    """A checkpoint restores its encoder's input centring whatever the new default is, and
    a checkpoint without the flag (written before it was recorded) cannot load silently."""
    from vaeflow.run.checkpoint import CheckpointError, load_model_state

    for make in (
        lambda c: MLPEncoder((1, 4, 4), hidden=(8,), center=c),
        lambda c: GatedConvEncoder((1, 8, 8), (3,), (2,), 3, 4, center=c),
    ):
        trained = make(True)
        fresh = make(False)
        x = torch.rand(3, 1, *((4, 4) if isinstance(trained, MLPEncoder) else (8, 8)))
        load_model_state(fresh, trained.state_dict())
        assert fresh.center is True
        torch.testing.assert_close(fresh(x), trained(x))
        old = {k: v for k, v in trained.state_dict().items() if k != "center_inputs"}
        with pytest.raises(CheckpointError, match="center_inputs"):
            load_model_state(make(False), old)


def test_gated_transposed_conv_can_start_as_pytorch_0_3_did():
    """``init = "torch_0_3"``: weight and bias uniform in +-1/sqrt(in * k * k) (van den
    Berg et al.'s code ran on PyTorch 0.3); torch's default takes the fan from the fused
    layer's 2 * out channels, sqrt(2) smaller for in = out."""
    import math

    from vaeflow.layers import GatedConvTranspose2d

    torch.manual_seed(0)
    old = GatedConvTranspose2d(64, 64, 5, 2, 2, 1, init="torch_0_3")
    new = GatedConvTranspose2d(64, 64, 5, 2, 2, 1)
    bound = 1 / math.sqrt(64 * 25)
    for layer, b in ((old, bound), (new, bound / math.sqrt(2))):
        w = layer.conv.weight
        assert w.abs().max() <= b and w.abs().max() > 0.99 * b  # uniform up to the bound
        assert abs(w.std().item() - b / math.sqrt(3)) < 0.02 * b
    assert old.conv.bias.abs().max() <= bound and old.conv.bias.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="init"):
        GatedConvTranspose2d(4, 4, 3, init="lecun")
