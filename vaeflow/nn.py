"""Network building blocks: flow conditioners, and the VAE's encoders and decoders.

Every conditioner network of a flow ends in a zero-initialised layer so that the flow
starts as the identity (docs/design.md §3.5; normflows ``init_zeros``, vdvae
``zero_last``). No BatchNorm anywhere: it would make per-example densities depend on the
rest of the batch.

Encoders and decoders (second half of this module) share two interfaces that the VAE
relies on:

- encoder: ``forward(x) -> h`` with ``x`` of shape ``(*lead, *x_shape)`` (usually
  ``(B, C, H, W)`` or ``(B, D)``) and ``h`` of shape ``(*lead, out_features)``; the
  attribute ``out_features`` gives the width. Encoders end in a non-linearity: the
  posterior, not the encoder, maps ``h`` to its parameters.
- decoder: ``forward(z) -> params`` with ``z`` of shape ``(*lead, latent_dim)`` for any
  number of leading dims (e.g. ``(K, B, D)``) and ``params`` of shape
  ``(*lead, *param_shape)``; ``param_shape`` is chosen by the likelihood (e.g.
  ``(1, 28, 28)`` Bernoulli logits). Outputs are unconstrained (logits, means, log-scales).

Encoders take data as given: binary ``{0, 1}`` MNIST or images scaled to ``[0, 1]``. With
``center=True`` they map it to ``2 x - 1`` in ``[-1, 1]`` before the first layer. That affine
map could be absorbed by the first layer, so it changes no function class, only the
conditioning at init. It helps 8-bit images (CIFAR-10's mean is near 0.5, so the inputs
become roughly zero-mean) and hurts sparse binary ones: MNIST's mean is 0.13, so centring
turns mostly-zero inputs into mostly ``-1`` and slows training: Burda et al.'s tanh MLP VAE
after 20,000 steps had test NLL 118.8 centred vs 105.0 raw (k = 5000, 1000 test images;
``results/burda2016_iwae/README.md``, input-centring ablation). So the default is ``False`` for
the MLP and gated-conv encoders (the binary-MNIST architectures of the papers, which feed
raw ``x``) and ``True`` for the ResNet encoder (CIFAR-10).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "MLP",
    "MaskedLinear",
    "ResidualConvNet",
    "zero_init",
    "ACTIVATIONS",
    "make_activation",
    "flatten_leading",
    "GatedLinear",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "ResidualBlock",
    "MLPEncoder",
    "MLPDecoder",
    "GatedConvEncoder",
    "GatedConvDecoder",
    "ResNetEncoder",
    "ResNetDecoder",
    "ENCODERS",
    "DECODERS",
    "build_encoder",
    "build_decoder",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    # No non-linearity: the value half of a gated layer in the VampPrior code's GatedDense
    # (the sigmoid gate is the only non-linearity); TOML has no None to say it.
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}"
        ) from None


def zero_init(layer: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero in place and return it."""
    for name in ("weight", "bias"):
        p = getattr(layer, name, None)
        if isinstance(p, nn.Parameter):
            nn.init.zeros_(p)
    return layer


class MLP(nn.Module):
    """Fully connected network ``(*, in) -> (*, out)``.

    Args:
        in_features: input width.
        out_features: output width.
        hidden: width of each hidden layer.
        num_hidden: number of hidden layers (0 gives a single linear map).
        activation: name from :data:`ACTIVATIONS`.
        zero_last: zero-initialise the output layer (identity-at-init for conditioners).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 64,
        num_hidden: int = 2,
        activation: str = "relu",
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_hidden):
            layers += [nn.Linear(width, hidden), make_activation(activation)]
            width = hidden
        last = nn.Linear(width, out_features)
        if zero_last:
            zero_init(last)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed 0/1 mask ``(out, in)``.

    The building block of MADE (Germain et al. 2015, arXiv:1502.03509). The mask is a
    buffer, so it moves with the module and is saved in its state_dict.
    """

    def __init__(self, in_features: int, out_features: int, mask: Tensor, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != (out, in) = ({out_features}, {in_features})"
            )
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class ResidualConvNet(nn.Module):
    """Shape-preserving conv net ``(N, C_in, H, W) -> (N, C_out, H, W)``.

    A 3x3 input conv, ``num_blocks`` residual blocks, and a zero-initialisable 3x3
    output conv: the conditioner of image coupling layers (Dinh et al. 2017 use a
    ResNet here; no normalisation layers, see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        num_blocks: int = 2,
        activation: str = "relu",
        zero_last: bool = True,
    ) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(
            *[ResidualBlock(hidden, activation) for _ in range(num_blocks)]
        )
        self.act = make_activation(activation)
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        if zero_last:
            zero_init(self.out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.blocks(self.inp(x))))


def flatten_leading(x: Tensor, event_ndim: int) -> tuple[Tensor, torch.Size]:
    """Merge all leading dims into one: ``(*lead, *event) -> (N, *event)``; also return lead.

    Conv nets need exactly one batch dimension; flows accept any number.
    """
    lead = x.shape[: x.dim() - event_ndim]
    return x.reshape(-1, *x.shape[x.dim() - event_ndim :]), lead


# --------------------------------------------------------------------------------------
# Encoders and decoders
# --------------------------------------------------------------------------------------


def _positive_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a tuple of positive ints."""
    out = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not out or any(s < 1 for s in out):
        raise ValueError(f"a shape needs at least one dim, all >= 1; got {shape!r}")
    return out


def _widths(hidden: int | Sequence[int], num_layers: int | None) -> tuple[int, ...]:
    """Hidden widths from either a tuple ``(200, 200)`` or ``hidden=200, num_layers=2``."""
    if isinstance(hidden, int):
        return (hidden,) * (2 if num_layers is None else num_layers)
    if num_layers is not None:
        raise ValueError("num_layers is only used with an int hidden width")
    return tuple(int(h) for h in hidden)


def _optional_activation(name: str | None) -> nn.Module:
    return nn.Identity() if name is None else make_activation(name)


def _check_trailing(x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape[x.dim() - len(shape) :]) != shape or x.dim() < len(shape):
        raise ValueError(f"{what}: expected trailing shape {shape}, got {tuple(x.shape)}")


def _weight_norm(layer: nn.Module, enabled: bool, zero: bool = False) -> nn.Module:
    """Optionally weight-normalise ``layer``; ``zero`` makes it output exactly 0 at init.

    Under weight norm ``w = g v / |v|`` a zero ``v`` would give 0/0, so a zero layer keeps
    a random direction ``v`` and gets a zero magnitude ``g`` instead.
    """
    if not enabled:
        return zero_init(layer) if zero else layer
    layer = nn.utils.parametrizations.weight_norm(layer)
    if zero:
        with torch.no_grad():
            layer.parametrizations.weight.original0.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    return layer


class GatedLinear(nn.Module):
    """Gated dense layer ``h = act(W_a x + b_a) * sigmoid(W_b x + b_b)``.

    Both halves come from one ``nn.Linear`` of width ``2 * out_features`` (value first,
    gate second), so the layer is a single matmul.

    Args:
        in_features: input width.
        out_features: output width.
        activation: optional name from :data:`ACTIVATIONS` applied to the value half
            (``None``: the gate is the only non-linearity, as in Dauphin et al.).

    Shapes:
        ``(*, in_features) -> (*, out_features)``.

    References:
        Dauphin et al. 2017, "Language modeling with gated convolutional networks",
        arXiv:1612.08083; Tomczak & Welling 2018 (VampPrior), arXiv:1705.07120.
    """

    def __init__(self, in_features: int, out_features: int, activation: str | None = None):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)
        self.act = _optional_activation(activation)
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return self.act(value) * torch.sigmoid(gate)


class GatedConv2d(nn.Module):
    """Gated convolution ``h = act(conv_a(x)) * sigmoid(conv_b(x))``.

    ``conv_a`` and ``conv_b`` are the two halves (value first, gate second) of one
    ``nn.Conv2d`` with ``2 * out_channels`` outputs.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel size (int or ``(kh, kw)``).
        stride: convolution stride.
        padding: zero padding.
        activation: optional name from :data:`ACTIVATIONS` for the value half; ``None``
            (the default) as in van den Berg et al. 2018's binary-data networks.

    Shapes:
        ``(N, in_channels, H, W) -> (N, out_channels, H', W')`` with the usual conv
        arithmetic.

    References:
        Dauphin et al. 2017, arXiv:1612.08083 (gated linear units); van den Berg et al.
        2018, "Sylvester normalizing flows for variational inference", arXiv:1803.05649.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2 * out_channels, kernel_size, stride, padding)
        self.act = _optional_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.conv(x).chunk(2, dim=1)
        return self.act(value) * torch.sigmoid(gate)


class GatedConvTranspose2d(nn.Module):
    """Gated transposed convolution ``h = act(deconv_a(x)) * sigmoid(deconv_b(x))``.

    The upsampling counterpart of :class:`GatedConv2d` (one ``nn.ConvTranspose2d`` with
    ``2 * out_channels`` outputs, value half first).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size (int or ``(kh, kw)``).
        stride: stride (the upsampling factor).
        padding: implicit padding removed from the output.
        output_padding: extra size added to one side of the output (``stride - 1`` with
            ``padding = kernel_size // 2`` gives exactly ``H' = stride * H``).
        activation: optional name from :data:`ACTIVATIONS` for the value half.

    Shapes:
        ``(N, in_channels, H, W) -> (N, out_channels, H', W')``,
        ``H' = (H - 1) * stride - 2 * padding + kernel_size + output_padding``.

    References:
        Dauphin et al. 2017, arXiv:1612.08083; van den Berg et al. 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            in_channels, 2 * out_channels, kernel_size, stride, padding, output_padding
        )
        self.act = _optional_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.conv(x).chunk(2, dim=1)
        return self.act(value) * torch.sigmoid(gate)


class ResidualBlock(nn.Module):
    """Pre-activation residual block ``x + conv(act(conv(act(x))))``, identity at init.

    The branch's last 3x3 conv is zero-initialised (its magnitude ``g`` under weight norm),
    so a stack of blocks starts as the identity and the signal scale does not grow with
    depth (as vdvae's ``zero_last``). Also the block of :class:`ResidualConvNet`.

    Args:
        channels: channels in and out.
        activation: name from :data:`ACTIVATIONS`.
        weight_norm: weight-normalise both convs (Salimans & Kingma 2016).

    Shapes:
        ``(N, channels, H, W) -> (N, channels, H, W)``.

    References:
        He et al. 2016, "Identity mappings in deep residual networks", arXiv:1603.05027;
        Child 2021 (vdvae), arXiv:2011.10650; Salimans & Kingma 2016, arXiv:1602.07868.
    """

    def __init__(self, channels: int, activation: str = "silu", weight_norm: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            make_activation(activation),
            _weight_norm(nn.Conv2d(channels, channels, 3, padding=1), weight_norm),
            make_activation(activation),
            _weight_norm(nn.Conv2d(channels, channels, 3, padding=1), weight_norm, zero=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class _CentredInputs(nn.Module):
    """Holds an encoder's ``center`` flag as a persistent buffer as well as an attribute.

    The flag changes what the weights mean, so it travels with the checkpoint: loading a
    state dict restores it (whatever the constructor's default), and a checkpoint without
    it (written before vaeflow recorded it, when MLP and gated-conv encoders centred their
    inputs by default) fails to load with a missing-key error instead of silently
    evaluating the weights on differently scaled inputs. The attribute mirrors the buffer
    so ``forward`` never reads a tensor (no device sync).
    """

    center: bool

    def _set_center(self, center: bool) -> None:
        self.center = bool(center)
        self.register_buffer("center_inputs", torch.tensor(self.center))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        flag = state_dict.get(prefix + "center_inputs")
        if flag is not None:
            self.center = bool(flag)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MLPEncoder(_CentredInputs):
    """Fully connected encoder: flattened input -> hidden layers -> feature vector.

    ``MLPEncoder((1, 28, 28))`` is the inference network of Burda et al. 2016's
    one-stochastic-layer MNIST model (two deterministic layers of 200 tanh units; the
    posterior adds the 50-d Gaussian heads). ``hidden=(300, 300), gated=True,
    activation=None`` gives the gated dense layers of Tomczak & Welling's VampPrior code
    base, of which van den Berg et al. 2018's networks are the convolutional version.

    Args:
        x_shape: shape of one example, e.g. ``(1, 28, 28)`` or ``784``.
        hidden: widths of the hidden layers, or one int width used ``num_layers`` times.
            ``()`` gives no hidden layer: ``h`` is then the (centred) flattened input.
        num_layers: number of hidden layers when ``hidden`` is an int (default 2).
        activation: name from :data:`ACTIVATIONS`; ``None`` only with ``gated=True``.
        gated: use :class:`GatedLinear` hidden layers instead of linear + activation.
        center: map inputs from ``[0, 1]`` to ``[-1, 1]`` first (see the module doc).

    Shapes:
        ``(*lead, *x_shape) -> (*lead, out_features)``, ``out_features = hidden[-1]``
        (``prod(x_shape)`` without hidden layers).

    References:
        Burda et al. 2016, "Importance weighted autoencoders", arXiv:1509.00519;
        Kingma & Welling 2014, arXiv:1312.6114.
    """

    def __init__(
        self,
        x_shape: int | Sequence[int],
        hidden: int | Sequence[int] = (200, 200),
        num_layers: int | None = None,
        activation: str | None = "tanh",
        gated: bool = False,
        center: bool = False,
    ) -> None:
        super().__init__()
        self.x_shape = _positive_shape(x_shape)
        self._set_center(center)
        widths = _widths(hidden, num_layers)
        if activation is None and not gated and widths:
            raise ValueError("activation=None needs gated=True (the gate is the non-linearity)")
        layers: list[nn.Module] = []
        width = math.prod(self.x_shape)
        for w in widths:
            if gated:
                layers.append(GatedLinear(width, w, activation))
            else:
                layers += [nn.Linear(width, w), make_activation(activation)]
            width = w
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` of shape ``(*lead, *x_shape)`` to features ``(*lead, out_features)``."""
        _check_trailing(x, self.x_shape, type(self).__name__)
        x = x.reshape(*x.shape[: x.dim() - len(self.x_shape)], -1)
        if self.center:
            x = 2 * x - 1
        return self.net(x)


class MLPDecoder(nn.Module):
    """Fully connected decoder: latent -> hidden layers -> likelihood parameters.

    ``MLPDecoder(50, (1, 28, 28))`` is Burda et al. 2016's MNIST generative network
    (two layers of 200 tanh units, then 784 Bernoulli logits). ``hidden=()`` is a linear
    (affine) decoder, as in a linear-Gaussian model.

    Args:
        latent_dim: ``D``, the width of ``z``.
        param_shape: shape of the parameters of one example, e.g. ``(1, 28, 28)``.
        hidden: hidden widths, or one int width used ``num_layers`` times.
        num_layers: number of hidden layers when ``hidden`` is an int (default 2).
        activation: name from :data:`ACTIVATIONS`; ``None`` only with ``gated=True``.
        gated: use :class:`GatedLinear` hidden layers.
        zero_last: zero-initialise the output layer (all parameters 0 at init).

    Shapes:
        ``(*lead, latent_dim) -> (*lead, *param_shape)``.

    References:
        Burda et al. 2016, arXiv:1509.00519.
    """

    def __init__(
        self,
        latent_dim: int,
        param_shape: int | Sequence[int],
        hidden: int | Sequence[int] = (200, 200),
        num_layers: int | None = None,
        activation: str | None = "tanh",
        gated: bool = False,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.param_shape = _positive_shape(param_shape)
        widths = _widths(hidden, num_layers)
        if activation is None and not gated and widths:
            raise ValueError("activation=None needs gated=True (the gate is the non-linearity)")
        layers: list[nn.Module] = []
        width = latent_dim
        for w in widths:
            if gated:
                layers.append(GatedLinear(width, w, activation))
            else:
                layers += [nn.Linear(width, w), make_activation(activation)]
            width = w
        last = nn.Linear(width, math.prod(self.param_shape))
        layers.append(zero_init(last) if zero_last else last)
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Map ``z`` of shape ``(*lead, latent_dim)`` to ``(*lead, *param_shape)``."""
        _check_trailing(z, (self.latent_dim,), type(self).__name__)
        return self.net(z).reshape(*z.shape[:-1], *self.param_shape)


class _ImageEncoder(_CentredInputs):
    """Shared forward of the convolutional encoders: check, flatten leading dims, centre,
    run ``self.net`` to ``(N, out_features)``, restore the leading dims."""

    x_shape: tuple[int, ...]
    center: bool
    out_features: int
    net: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(*lead, C, H, W)`` to features ``(*lead, out_features)``."""
        _check_trailing(x, self.x_shape, type(self).__name__)
        x, lead = flatten_leading(x, 3)
        if self.center:
            x = 2 * x - 1
        return self.net(x).reshape(*lead, self.out_features)


class GatedConvEncoder(_ImageEncoder):
    """Gated convolutional encoder of van den Berg et al. 2018 (their MNIST network).

    A stack of 5x5 :class:`GatedConv2d` layers with strides ``(1, 2, 1, 2, 1)`` and
    channels ``(32, 32, 64, 64, 64)`` takes 28x28 to 7x7; a final gated conv whose kernel
    covers the whole remaining map (7x7, no padding) gives a 256-d feature vector.

    Args:
        x_shape: ``(C, H, W)`` of one image.
        channels: output channels of the strided stack.
        strides: stride of each layer of the stack (same length as ``channels``).
        kernel_size: odd kernel size of the stack (padding ``kernel_size // 2``).
        out_features: channels of the final full-map gated conv = feature width.
        activation: optional activation of the value halves (paper: none).
        center: map inputs from ``[0, 1]`` to ``[-1, 1]`` first (see the module doc).

    Shapes:
        ``(*lead, C, H, W) -> (*lead, out_features)``.

    References:
        van den Berg et al. 2018, arXiv:1803.05649; Dauphin et al. 2017, arXiv:1612.08083.
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        channels: Sequence[int] = (32, 32, 64, 64, 64),
        strides: Sequence[int] = (1, 2, 1, 2, 1),
        kernel_size: int = 5,
        out_features: int = 256,
        activation: str | None = None,
        center: bool = False,
    ) -> None:
        super().__init__()
        self.x_shape = _positive_shape(x_shape)
        if len(self.x_shape) != 3:
            raise ValueError(f"x_shape must be (C, H, W), got {self.x_shape}")
        if len(channels) != len(strides):
            raise ValueError(f"channels {channels} and strides {strides} differ in length")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self._set_center(center)
        c, h, w = self.x_shape
        layers: list[nn.Module] = []
        for c_out, s in zip(channels, strides, strict=True):
            layers.append(GatedConv2d(c, c_out, kernel_size, s, kernel_size // 2, activation))
            # "same" padding with odd kernels: output size is ceil(size / stride)
            c, h, w = c_out, (h - 1) // s + 1, (w - 1) // s + 1
        layers.append(GatedConv2d(c, out_features, (h, w), 1, 0, activation))
        self.net = nn.Sequential(*layers)
        self.out_features = out_features


class GatedConvDecoder(nn.Module):
    """Gated transposed-convolutional decoder of van den Berg et al. 2018 (MNIST).

    ``z`` is read as a 1x1 map; a gated transposed conv with a full-size kernel expands it
    to the base map (7x7 for 28x28 images), 5x5 :class:`GatedConvTranspose2d` layers with
    strides ``(1, 2, 1, 2, 1)`` upsample to full size, and a 1x1 conv gives the parameter
    channels (the paper's sigmoid is left to the likelihood: outputs are logits).

    Args:
        latent_dim: ``D``.
        param_shape: ``(P, H, W)``: parameter channels and image size.
        channels: channels of the first (1x1 -> base map) layer, then of each layer of
            the upsampling stack; ``len(channels) == len(strides) + 1``.
        strides: stride of each upsampling layer; ``H`` and ``W`` must be divisible by
            their product.
        kernel_size: odd kernel size of the upsampling stack.
        activation: optional activation of the value halves (paper: none).
        zero_last: zero-initialise the output conv (all parameters 0 at init).

    Shapes:
        ``(*lead, latent_dim) -> (*lead, P, H, W)``.

    References:
        van den Berg et al. 2018, arXiv:1803.05649; Dauphin et al. 2017, arXiv:1612.08083.
    """

    def __init__(
        self,
        latent_dim: int,
        param_shape: Sequence[int] = (1, 28, 28),
        channels: Sequence[int] = (64, 64, 32, 32, 32, 32),
        strides: Sequence[int] = (1, 2, 1, 2, 1),
        kernel_size: int = 5,
        activation: str | None = None,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.param_shape = _positive_shape(param_shape)
        if len(self.param_shape) != 3:
            raise ValueError(f"param_shape must be (P, H, W), got {self.param_shape}")
        if len(channels) != len(strides) + 1:
            raise ValueError(
                f"need len(channels) == len(strides) + 1, got {channels} and {strides}"
            )
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        p, h, w = self.param_shape
        scale = math.prod(strides)
        if h % scale or w % scale:
            raise ValueError(f"image size {(h, w)} is not divisible by prod(strides) = {scale}")
        layers: list[nn.Module] = [
            GatedConvTranspose2d(
                latent_dim, channels[0], (h // scale, w // scale), 1, 0, 0, activation
            )
        ]
        for c_in, c_out, s in zip(channels[:-1], channels[1:], strides, strict=True):
            # padding k//2 with output_padding s-1 makes each layer upsample by exactly s
            layers.append(
                GatedConvTranspose2d(
                    c_in, c_out, kernel_size, s, kernel_size // 2, s - 1, activation
                )
            )
        out = nn.Conv2d(channels[-1], p, 1)
        layers.append(zero_init(out) if zero_last else out)
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Map ``z`` of shape ``(*lead, latent_dim)`` to ``(*lead, P, H, W)``."""
        _check_trailing(z, (self.latent_dim,), type(self).__name__)
        z, lead = flatten_leading(z, 1)
        return self.net(z[:, :, None, None]).reshape(*lead, *self.param_shape)


class ResNetEncoder(_ImageEncoder):
    """Residual convolutional encoder for CIFAR-size images (no normalisation layers).

    A 3x3 input conv, then ``num_downsamples`` stages of ``num_blocks``
    :class:`ResidualBlock` followed by a stride-2 3x3 conv, then ``num_blocks`` more
    blocks at the lowest resolution; the map is flattened, passed through a linear layer
    and the activation. The width is constant, as in vdvae; blocks start as the identity.

    Args:
        x_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** num_downsamples``.
        channels: width of every conv.
        num_blocks: residual blocks per resolution.
        num_downsamples: number of stride-2 convs (3: 32x32 -> 4x4).
        out_features: feature width.
        activation: name from :data:`ACTIVATIONS`.
        weight_norm: weight-normalise every conv and linear layer.
        center: map inputs from ``[0, 1]`` to ``[-1, 1]`` first (see the module doc).

    Shapes:
        ``(*lead, C, H, W) -> (*lead, out_features)``.

    References:
        He et al. 2016, arXiv:1603.05027; Child 2021 (vdvae), arXiv:2011.10650;
        Kingma et al. 2016 (IAF, ResNet VAE on CIFAR-10), arXiv:1606.04934.
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (3, 32, 32),
        channels: int = 64,
        num_blocks: int = 2,
        num_downsamples: int = 3,
        out_features: int = 512,
        activation: str = "silu",
        weight_norm: bool = False,
        center: bool = True,
    ) -> None:
        super().__init__()
        self.x_shape = _positive_shape(x_shape)
        if len(self.x_shape) != 3:
            raise ValueError(f"x_shape must be (C, H, W), got {self.x_shape}")
        c, h, w = self.x_shape
        scale = 2**num_downsamples
        if h % scale or w % scale:
            raise ValueError(f"image size {(h, w)} is not divisible by 2**{num_downsamples}")
        self._set_center(center)
        wn = weight_norm
        layers: list[nn.Module] = [_weight_norm(nn.Conv2d(c, channels, 3, padding=1), wn)]
        for stage in range(num_downsamples + 1):
            layers += [ResidualBlock(channels, activation, wn) for _ in range(num_blocks)]
            if stage < num_downsamples:
                down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
                layers.append(_weight_norm(down, wn))
        layers += [
            make_activation(activation),
            nn.Flatten(),
            _weight_norm(nn.Linear(channels * (h // scale) * (w // scale), out_features), wn),
            make_activation(activation),
        ]
        self.net = nn.Sequential(*layers)
        self.out_features = out_features


class ResNetDecoder(nn.Module):
    """Residual convolutional decoder mirroring :class:`ResNetEncoder`.

    A linear layer maps ``z`` to a ``channels`` x ``H/2^n`` x ``W/2^n`` map; then
    ``num_blocks`` :class:`ResidualBlock` per resolution, separated by nearest-neighbour
    2x upsampling followed by a 3x3 conv (no checkerboard artefacts of transposed convs);
    finally the activation and a 3x3 conv to the ``P`` parameter channels.

    The output conv keeps PyTorch's default (small random) init unless ``zero_last``:
    every likelihood here takes unconstrained parameters (logits, means, log-scales), so
    any output is a valid distribution, and a random last layer keeps ``params``
    dependent on ``z`` from the first step (with a zero last layer no gradient reaches
    ``z`` at step 0). ``zero_last=True`` gives all-zero parameters at init (e.g.
    Bernoulli p = 0.5), equally valid.

    Args:
        latent_dim: ``D``.
        param_shape: ``(P, H, W)``; ``H`` and ``W`` divisible by ``2 ** num_upsamples``.
        channels: width of every conv.
        num_blocks: residual blocks per resolution.
        num_upsamples: number of 2x upsamplings (3: 4x4 -> 32x32).
        activation: name from :data:`ACTIVATIONS`.
        weight_norm: weight-normalise every conv and linear layer.
        zero_last: zero-initialise the output conv.

    Shapes:
        ``(*lead, latent_dim) -> (*lead, P, H, W)``.

    References:
        He et al. 2016, arXiv:1603.05027; Child 2021 (vdvae), arXiv:2011.10650;
        Odena et al. 2016, "Deconvolution and checkerboard artifacts", Distill.
    """

    def __init__(
        self,
        latent_dim: int,
        param_shape: Sequence[int] = (3, 32, 32),
        channels: int = 64,
        num_blocks: int = 2,
        num_upsamples: int = 3,
        activation: str = "silu",
        weight_norm: bool = False,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.param_shape = _positive_shape(param_shape)
        if len(self.param_shape) != 3:
            raise ValueError(f"param_shape must be (P, H, W), got {self.param_shape}")
        p, h, w = self.param_shape
        scale = 2**num_upsamples
        if h % scale or w % scale:
            raise ValueError(f"image size {(h, w)} is not divisible by 2**{num_upsamples}")
        wn = weight_norm
        base = (channels, h // scale, w // scale)
        layers: list[nn.Module] = [
            _weight_norm(nn.Linear(latent_dim, math.prod(base)), wn),
            nn.Unflatten(1, base),
        ]
        for stage in range(num_upsamples + 1):
            if stage > 0:
                up = nn.Conv2d(channels, channels, 3, padding=1)
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), _weight_norm(up, wn)]
            layers += [ResidualBlock(channels, activation, wn) for _ in range(num_blocks)]
        layers += [
            make_activation(activation),
            _weight_norm(nn.Conv2d(channels, p, 3, padding=1), wn, zero=zero_last),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Map ``z`` of shape ``(*lead, latent_dim)`` to ``(*lead, P, H, W)``."""
        _check_trailing(z, (self.latent_dim,), type(self).__name__)
        z, lead = flatten_leading(z, 1)
        return self.net(z).reshape(*lead, *self.param_shape)


ENCODERS: dict[str, type[nn.Module]] = {
    "mlp": MLPEncoder,
    "gated_conv": GatedConvEncoder,
    "resnet": ResNetEncoder,
}
DECODERS: dict[str, type[nn.Module]] = {
    "mlp": MLPDecoder,
    "gated_conv": GatedConvDecoder,
    "resnet": ResNetDecoder,
}


def _build(
    kind: str,
    table: dict[str, type[nn.Module]],
    name: str,
    fixed: tuple[str, ...],
    args: tuple[object, ...],
    kwargs: dict[str, object],
) -> nn.Module:
    try:
        cls = table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose from {sorted(table)}") from None
    allowed = [n for n in inspect.signature(cls).parameters if n not in fixed]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{kind} {name!r} got unknown options {unknown}; allowed: {allowed}")
    return cls(*args, **kwargs)


def build_encoder(name: str, x_shape: int | Sequence[int], **kwargs: object) -> nn.Module:
    """Build a registered encoder.

    Args:
        name: a key of :data:`ENCODERS` (``"mlp"``, ``"gated_conv"``, ``"resnet"``).
        x_shape: shape of one example, ``(C, H, W)`` or ``D``.
        **kwargs: constructor options of that encoder; unknown ones are an error that
            lists the allowed ones.

    Returns:
        An encoder mapping ``(*lead, *x_shape) -> (*lead, out_features)``.
    """
    return _build("encoder", ENCODERS, name, ("x_shape",), (x_shape,), kwargs)


def build_decoder(
    name: str, latent_dim: int, param_shape: int | Sequence[int], **kwargs: object
) -> nn.Module:
    """Build a registered decoder.

    Args:
        name: a key of :data:`DECODERS` (``"mlp"``, ``"gated_conv"``, ``"resnet"``).
        latent_dim: ``D``.
        param_shape: shape of the likelihood parameters of one example, e.g. ``(P, H, W)``.
        **kwargs: constructor options of that decoder; unknown ones are an error that
            lists the allowed ones.

    Returns:
        A decoder mapping ``(*lead, latent_dim) -> (*lead, *param_shape)``.
    """
    return _build(
        "decoder", DECODERS, name, ("latent_dim", "param_shape"), (latent_dim, param_shape), kwargs
    )
