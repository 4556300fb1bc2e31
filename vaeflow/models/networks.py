"""The VAE's encoders and decoders, built from :mod:`vaeflow.layers`.

Encoders and decoders share two interfaces that the VAE relies on:

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
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers import (
    GatedConv2d,
    GatedConvTranspose2d,
    GatedLinear,
    ResidualBlock,
    StridedResidualBlock,
    check_weight_norm,
    flatten_leading,
    make_activation,
    wn_conv,
    wn_linear,
    zero_init,
)

__all__ = [
    "MLPEncoder",
    "MLPDecoder",
    "GatedConvEncoder",
    "GatedConvDecoder",
    "ResNetEncoder",
    "ResNetDecoder",
    "StridedResNetEncoder",
    "StridedResNetDecoder",
    "ENCODERS",
    "DECODERS",
    "build_encoder",
    "build_decoder",
]


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


def _check_trailing(x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape[x.dim() - len(shape) :]) != shape or x.dim() < len(shape):
        raise ValueError(f"{what}: expected trailing shape {shape}, got {tuple(x.shape)}")


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
        init: of the gated transposed convs, ``"torch"`` or ``"torch_0_3"`` (the
            authors' code's, see :class:`~vaeflow.layers.GatedConvTranspose2d`).

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
        init: str = "torch",
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
                latent_dim, channels[0], (h // scale, w // scale), 1, 0, 0, activation, init
            )
        ]
        for c_in, c_out, s in zip(channels[:-1], channels[1:], strides, strict=True):
            # padding k//2 with output_padding s-1 makes each layer upsample by exactly s
            layers.append(
                GatedConvTranspose2d(
                    c_in, c_out, kernel_size, s, kernel_size // 2, s - 1, activation, init
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
        weight_norm: a :data:`~vaeflow.layers.WEIGHT_NORMS` setting for every conv and
            linear layer (``True``: torch's weight norm; ``"iaf_code"``: the IAF code's).
        center: map inputs from ``[0, 1]`` to ``[-1, 1]`` first (see the module doc).
        residual_scale: a constant factor on every residual branch
            (:class:`~vaeflow.layers.ResidualBlock`; the IAF code's 0.1).

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
        weight_norm: bool | str = False,
        center: bool = True,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.x_shape = _positive_shape(x_shape)
        if len(self.x_shape) != 3:
            raise ValueError(f"x_shape must be (C, H, W), got {self.x_shape}")
        check_weight_norm(weight_norm)
        c, h, w = self.x_shape
        scale = 2**num_downsamples
        if h % scale or w % scale:
            raise ValueError(f"image size {(h, w)} is not divisible by 2**{num_downsamples}")
        self._set_center(center)
        wn = weight_norm
        layers: list[nn.Module] = [wn_conv(c, channels, 3, 1, wn)]
        for stage in range(num_downsamples + 1):
            layers += [
                ResidualBlock(channels, activation, wn, residual_scale) for _ in range(num_blocks)
            ]
            if stage < num_downsamples:
                layers.append(wn_conv(channels, channels, 3, 2, wn))
        layers += [
            make_activation(activation),
            nn.Flatten(),
            wn_linear(channels * (h // scale) * (w // scale), out_features, wn),
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
        weight_norm: a :data:`~vaeflow.layers.WEIGHT_NORMS` setting for every conv and
            linear layer (``True``: torch's weight norm; ``"iaf_code"``: the IAF code's).
        zero_last: zero-initialise the output conv.
        residual_scale: a constant factor on every residual branch
            (:class:`~vaeflow.layers.ResidualBlock`; the IAF code's 0.1).
        output_scale: a constant factor on the output parameters (the IAF code's 0.1:
            ``output = .1 * x_dec(...)``).

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
        weight_norm: bool | str = False,
        zero_last: bool = False,
        residual_scale: float = 1.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.param_shape = _positive_shape(param_shape)
        if len(self.param_shape) != 3:
            raise ValueError(f"param_shape must be (P, H, W), got {self.param_shape}")
        _check_zero_last(zero_last, weight_norm)
        if not output_scale > 0:
            raise ValueError(f"output_scale must be > 0, got {output_scale}")
        self.output_scale = float(output_scale)
        p, h, w = self.param_shape
        scale = 2**num_upsamples
        if h % scale or w % scale:
            raise ValueError(f"image size {(h, w)} is not divisible by 2**{num_upsamples}")
        wn = weight_norm
        base = (channels, h // scale, w // scale)
        layers: list[nn.Module] = [
            wn_linear(latent_dim, math.prod(base), wn),
            nn.Unflatten(1, base),
        ]
        for stage in range(num_upsamples + 1):
            if stage > 0:
                up = wn_conv(channels, channels, 3, 1, wn)
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), up]
            layers += [
                ResidualBlock(channels, activation, wn, residual_scale) for _ in range(num_blocks)
            ]
        layers += [
            make_activation(activation),
            wn_conv(channels, p, 3, 1, wn, zero=zero_last),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Map ``z`` of shape ``(*lead, latent_dim)`` to ``(*lead, P, H, W)``."""
        _check_trailing(z, (self.latent_dim,), type(self).__name__)
        z, lead = flatten_leading(z, 1)
        out = self.net(z)
        if self.output_scale != 1.0:  # the IAF code's .1 * x_dec(...)
            out = out * self.output_scale
        return out.reshape(*lead, *self.param_shape)


def _check_zero_last(zero_last: bool, weight_norm: bool | str) -> None:
    check_weight_norm(weight_norm)
    if zero_last and weight_norm == "iaf_code":
        raise ValueError('zero_last does not apply with weight_norm = "iaf_code"')


def _halvings(size: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Spatial sizes after 0..n stride-2, padding-1 3x3 convs: ``H -> ceil(H / 2)``."""
    sizes = [(int(size[0]), int(size[1]))]
    for _ in range(n):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _strided_plan(
    what: str,
    shape: Sequence[int],
    channels: int | Sequence[int],
    unstrided: int,
    weight_norm: bool | str,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the options of the strided ResNets; return the image or parameter shape
    ``(C, H, W)`` and the widths, one per stride."""
    image = _positive_shape(shape)
    if len(image) != 3:
        raise ValueError(f"{what} must be (C, H, W), got {image}")
    if unstrided < 0:
        raise ValueError(f"unstrided must be >= 0, got {unstrided}")
    check_weight_norm(weight_norm)
    widths = (int(channels),) if isinstance(channels, int) else tuple(int(c) for c in channels)
    if not widths or any(c < 1 for c in widths):
        raise ValueError(f"channels needs at least one width, all >= 1; got {channels!r}")
    return image, widths


class StridedResNetEncoder(_ImageEncoder):
    """Residual encoder whose downsampling is done by strided residual blocks, one width
    per resolution: Kingma et al.'s MNIST network (2016, appendix B).

    For ``channels = (16, 32, 32)`` and ``unstrided = 1``: a stride-2 block to 16 maps,
    a stride-1 block, a stride-2 block to 32, a stride-1 block, a stride-2 block to 32
    (28x28 -> 14 -> 7 -> 4; any size works, each stride halves it rounding up), then the
    activation, flatten and a dense layer of ``out_features`` (450) with the activation.
    ``unstrided`` stride-1 :class:`~vaeflow.layers.ResidualBlock` sit *between* strided
    ones (the paper: "a stride-1 block between strided ones"), not after the last.

    Args:
        x_shape: ``(C, H, W)``.
        channels: width after each strided block (its length = number of halvings).
        unstrided: stride-1 residual blocks between two strided ones.
        out_features: feature width (the dense layer).
        activation: name from :data:`~vaeflow.layers.ACTIVATIONS` (paper: ELU).
        weight_norm: a :data:`~vaeflow.layers.WEIGHT_NORMS` setting: ``True`` (torch's),
            ``False`` or ``"iaf_code"`` (the IAF code's weight norm with its data-dependent
            init, which the paper's networks use: run by ``vaeflow train`` on the first
            batch).
        center: map inputs from ``[0, 1]`` to ``[-1, 1]`` first (see the module doc).
        residual_scale: a constant factor on every residual branch
            (:class:`~vaeflow.layers.ResidualBlock`; the IAF code's 0.1).

    Shapes:
        ``(*lead, C, H, W) -> (*lead, out_features)``.

    References:
        Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
        Flow", arXiv:1606.04934, appendix B; He et al. 2016, arXiv:1603.05027.
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        channels: int | Sequence[int] = (16, 32, 32),
        unstrided: int = 1,
        out_features: int = 450,
        activation: str = "elu",
        weight_norm: bool | str = "iaf_code",
        center: bool = False,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.x_shape, widths = _strided_plan("x_shape", x_shape, channels, unstrided, weight_norm)
        c, h, w = self.x_shape
        self._set_center(center)
        wn = weight_norm
        layers: list[nn.Module] = []
        c_in = c
        for i, c_out in enumerate(widths):
            if i > 0:
                layers += [
                    ResidualBlock(c_in, activation, wn, residual_scale) for _ in range(unstrided)
                ]
            layers.append(
                StridedResidualBlock(
                    c_in,
                    c_out,
                    activation=activation,
                    weight_norm=wn,
                    residual_scale=residual_scale,
                )
            )
            c_in = c_out
        last = _halvings((h, w), len(widths))[-1]
        layers += [
            make_activation(activation),
            nn.Flatten(),
            wn_linear(c_in * last[0] * last[1], out_features, wn),
            make_activation(activation),
        ]
        self.net = nn.Sequential(*layers)
        self.out_features = out_features


class StridedResNetDecoder(nn.Module):
    """The mirror of :class:`StridedResNetEncoder` (the paper's "symmetric" decoder).

    ``z`` -> dense ``hidden`` (450) -> activation -> dense to the encoder's last map
    (``channels[-1]`` x 4 x 4 for MNIST) -> activation; then, for the widths in reverse
    order, a strided *up* block (transposed 3x3 conv, exact output size: 4 -> 7 -> 14 ->
    28) with ``unstrided`` stride-1 blocks between up blocks; finally the activation and a
    3x3 conv to the ``P`` parameter channels. Widths: ``(16, 32, 32)`` decodes as 32 -> 32
    (to 7x7), 32 -> 16 (to 14x14), 16 -> 16 (to 28x28), each up block ending at the width
    the encoder had at that resolution's input side.

    Args:
        latent_dim: ``D``.
        param_shape: ``(P, H, W)``.
        channels: the encoder's widths (same order as the encoder's).
        unstrided: stride-1 residual blocks between two up blocks.
        hidden: width of the first dense layer (paper: 450).
        activation: name from :data:`~vaeflow.layers.ACTIVATIONS`.
        weight_norm: a :data:`~vaeflow.layers.WEIGHT_NORMS` setting.
        zero_last: zero-initialise the output conv (not with ``"iaf_code"``).
        residual_scale: a constant factor on every residual branch
            (:class:`~vaeflow.layers.ResidualBlock`; the IAF code's 0.1).
        output_scale: a constant factor on the output parameters (the IAF code's 0.1:
            ``output = .1 * x_dec(...)``).

    Shapes:
        ``(*lead, latent_dim) -> (*lead, P, H, W)``.

    References:
        Kingma et al. 2016, arXiv:1606.04934, appendix B.
    """

    def __init__(
        self,
        latent_dim: int,
        param_shape: Sequence[int] = (1, 28, 28),
        channels: int | Sequence[int] = (16, 32, 32),
        unstrided: int = 1,
        hidden: int = 450,
        activation: str = "elu",
        weight_norm: bool | str = "iaf_code",
        zero_last: bool = False,
        residual_scale: float = 1.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.param_shape, widths = _strided_plan(
            "param_shape", param_shape, channels, unstrided, weight_norm
        )
        _check_zero_last(zero_last, weight_norm)
        if not output_scale > 0:
            raise ValueError(f"output_scale must be > 0, got {output_scale}")
        self.output_scale = float(output_scale)
        p, h, w = self.param_shape
        wn = weight_norm
        sizes = _halvings((h, w), len(widths))
        base = (widths[-1], *sizes[-1])
        layers: list[nn.Module] = [
            wn_linear(latent_dim, hidden, wn),
            make_activation(activation),
            wn_linear(hidden, math.prod(base), wn),
            make_activation(activation),
            nn.Unflatten(1, base),
        ]
        # Up block j goes from resolution n - j to n - j - 1 and ends at the width the
        # encoder had there: widths[n - j - 2], or widths[0] at full resolution.
        n = len(widths)
        c_in = widths[-1]
        for j in range(n):
            if j > 0:
                layers += [
                    ResidualBlock(c_in, activation, wn, residual_scale) for _ in range(unstrided)
                ]
            c_out = widths[max(n - j - 2, 0)]
            layers.append(
                StridedResidualBlock(
                    c_in,
                    c_out,
                    up=True,
                    in_size=sizes[n - j],
                    out_size=sizes[n - j - 1],
                    activation=activation,
                    weight_norm=wn,
                    residual_scale=residual_scale,
                )
            )
            c_in = c_out
        layers += [
            make_activation(activation),
            wn_conv(c_in, p, 3, 1, wn, zero=zero_last),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Map ``z`` of shape ``(*lead, latent_dim)`` to ``(*lead, P, H, W)``."""
        _check_trailing(z, (self.latent_dim,), type(self).__name__)
        z, lead = flatten_leading(z, 1)
        out = self.net(z)
        if self.output_scale != 1.0:  # the IAF code's .1 * x_dec(...)
            out = out * self.output_scale
        return out.reshape(*lead, *self.param_shape)


ENCODERS: dict[str, type[nn.Module]] = {
    "mlp": MLPEncoder,
    "gated_conv": GatedConvEncoder,
    "resnet": ResNetEncoder,
    "strided_resnet": StridedResNetEncoder,
}
DECODERS: dict[str, type[nn.Module]] = {
    "mlp": MLPDecoder,
    "gated_conv": GatedConvDecoder,
    "resnet": ResNetDecoder,
    "strided_resnet": StridedResNetDecoder,
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
