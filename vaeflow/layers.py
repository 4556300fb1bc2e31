"""Network building blocks shared by the flows and the models (the bottom layer).

Flow conditioners (:class:`MLP`, :class:`MaskedLinear`, :class:`ResidualConvNet`), the
activation table, :func:`zero_init`, and the gated and residual layers the encoders and
decoders of :mod:`vaeflow.models.networks` are made of. Imports only torch: both
:mod:`vaeflow.flows` and :mod:`vaeflow.models` import it (docs/design.md §2).

Every conditioner network of a flow ends in a zero-initialised layer so that the flow
starts as the identity (docs/design.md §3.5; normflows ``init_zeros``, vdvae
``zero_last``). No BatchNorm anywhere: it would make per-example densities depend on the
rest of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MLP",
    "MaskedLinear",
    "ResidualConvNet",
    "zero_init",
    "ACTIVATIONS",
    "make_activation",
    "flatten_leading",
    "maybe_weight_norm",
    "fused_parameters",
    "GatedLinear",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "ResidualBlock",
    "WEIGHT_NORMS",
    "IAFCodeConv2d",
    "IAFCodeConvTranspose2d",
    "IAFCodeLinear",
    "check_weight_norm",
    "wn_conv",
    "wn_linear",
    "StridedResidualBlock",
    "weight_norm_data_init",
    "suspend_data_init",
    "data_init_active",
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

    def masked_weight(self) -> Tensor:
        """The weight the layer applies, ``weight * mask`` ``(out, in)``."""
        return self.weight * self.mask

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
# Gated and residual layers (the encoders' and decoders' parts)
# --------------------------------------------------------------------------------------


def _optional_activation(name: str | None) -> nn.Module:
    return nn.Identity() if name is None else make_activation(name)


def maybe_weight_norm(layer: nn.Module, enabled: bool, zero: bool = False) -> nn.Module:
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


def fused_parameters(model: nn.Module) -> dict[nn.Parameter, tuple[int, int]]:
    """The parameters of ``model`` that fuse two tensors of the papers' code into one,
    mapped to ``(parts, dim)``: each holds ``parts`` of them as equal slices along
    ``dim``.

    Not listed: a decoder's output layer for a likelihood of several parameters per
    pixel (means and scales in one layer; ``train.normgrad_split`` refuses such models).
    The modules say so themselves (a ``fused_parts()`` method): :class:`GatedLinear`,
    :class:`GatedConv2d` and :class:`GatedConvTranspose2d` (value and gate; the codes
    have two layers), the Gaussian heads of
    :class:`~vaeflow.models.posteriors.GaussianPosterior` and
    :class:`~vaeflow.models.hierarchy.ConditionalGaussian` (mean and scale; the codes
    have two). For optimisers whose rule depends on how the parameters are cut into
    tensors (:class:`~vaeflow.run.optim.AdamNormGrad` under ``train.normgrad_split``).
    """
    out: dict[nn.Parameter, tuple[int, int]] = {}
    for m in model.modules():
        parts = getattr(m, "fused_parts", None)
        if callable(parts):
            out.update(parts())
    return out


def halves(params: Iterator[nn.Parameter], dim: int = 0) -> dict[nn.Parameter, tuple[int, int]]:
    """``params`` as fused pairs along ``dim`` (a ``fused_parts()`` answer)."""
    return {p: (2, dim) for p in params}


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

    def fused_parts(self) -> dict[nn.Parameter, tuple[int, int]]:
        """Value and gate rows: two layers of the papers' code (:func:`fused_parameters`)."""
        return halves(self.linear.parameters())

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

    def fused_parts(self) -> dict[nn.Parameter, tuple[int, int]]:
        """Value and gate output channels (dim 0 of the weight and the bias): two convs of
        the papers' code (:func:`fused_parameters`)."""
        return halves(self.conv.parameters())

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.conv(x).chunk(2, dim=1)
        return self.act(value) * torch.sigmoid(gate)


#: initialisations of :class:`GatedConvTranspose2d`
TRANSPOSED_CONV_INITS = ("torch", "torch_0_3")


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
        init: ``"torch"`` (torch's default: for a transposed conv its fan is the *output*
            channels, here ``2 * out_channels`` of the fused layer) or ``"torch_0_3"``:
            weight and bias uniform in ``+-1 / sqrt(in_channels * kh * kw)``, PyTorch
            0.3's rule (``_ConvNd.reset_parameters``), which van den Berg et al.'s code
            ran with two separate transposed convs (the bounds differ by
            ``sqrt(in / (2 out))``).

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
        init: str = "torch",
    ) -> None:
        super().__init__()
        if init not in TRANSPOSED_CONV_INITS:
            raise ValueError(f"init must be one of {TRANSPOSED_CONV_INITS}, got {init!r}")
        self.conv = nn.ConvTranspose2d(
            in_channels, 2 * out_channels, kernel_size, stride, padding, output_padding
        )
        if init == "torch_0_3":
            kh, kw = self.conv.kernel_size
            bound = 1.0 / math.sqrt(in_channels * kh * kw)
            with torch.no_grad():
                self.conv.weight.uniform_(-bound, bound)
                self.conv.bias.uniform_(-bound, bound)
        self.act = _optional_activation(activation)

    def fused_parts(self) -> dict[nn.Parameter, tuple[int, int]]:
        """Value and gate output channels -- dim 1 of a transposed conv's weight ``(in,
        out, kh, kw)``, dim 0 of the bias: two layers of the papers' code
        (:func:`fused_parameters`)."""
        return {self.conv.weight: (2, 1), self.conv.bias: (2, 0)}

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
        weight_norm: a :data:`WEIGHT_NORMS` setting for both convs (Salimans & Kingma
            2016); under ``"iaf_code"`` the last conv's data init, not a zero gain, sets
            its scale.
        residual_scale: a constant factor on the branch, ``x + a * branch(x)`` (default
            1). The IAF code multiplies every residual branch by 0.1 (``input + .1 *
            up_conv2(...)``); under ``"iaf_code"`` its data init sets the branch's scale
            before the factor, and under Adam-type optimisers the factor also slows how
            fast the branch's output moves.

    Shapes:
        ``(N, channels, H, W) -> (N, channels, H, W)``.

    References:
        He et al. 2016, "Identity mappings in deep residual networks", arXiv:1603.05027;
        Child 2021 (vdvae), arXiv:2011.10650; Salimans & Kingma 2016, arXiv:1602.07868.
    """

    def __init__(
        self,
        channels: int,
        activation: str = "silu",
        weight_norm: bool | str = False,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.residual_scale = _check_residual_scale(residual_scale)
        self.net = nn.Sequential(
            make_activation(activation),
            wn_conv(channels, channels, 3, 1, weight_norm),
            make_activation(activation),
            wn_conv(channels, channels, 3, 1, weight_norm, zero=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.residual_scale != 1.0:
            return x + self.residual_scale * self.net(x)
        return x + self.net(x)


def _check_residual_scale(scale: float) -> float:
    if not scale > 0:
        raise ValueError(f"residual_scale must be > 0, got {scale}")
    return float(scale)


# ----------------------------------------------------------------- the IAF code's weight norm

#: ``weight_norm`` settings of the convolutional networks (the top-down VAE, the ResNets,
#: the strided ResNets): ``True`` (torch's ``weight_norm``: ``w = g v / |v|``, ``g``
#: started at ``|v|`` of torch's init), ``False`` and ``"iaf_code"`` (the IAF code's:
#: :class:`IAFCodeConv2d`, :class:`IAFCodeConvTranspose2d`, :class:`IAFCodeLinear`)
WEIGHT_NORMS = (True, False, "iaf_code")

_DATA_INIT = [False]


@contextmanager
def weight_norm_data_init() -> Iterator[None]:
    """Within this block every :class:`IAFCodeConv2d` / :class:`IAFCodeConvTranspose2d` /
    :class:`IAFCodeLinear` initialises itself from the batch it sees (see each), and a
    top-down VAE draws each group's base sample from its prior (the code's ``"init"``
    mode). Use it for one forward pass under ``torch.no_grad()``."""
    _DATA_INIT[0] = True
    try:
        yield
    finally:
        _DATA_INIT[0] = False


def data_init_active() -> bool:
    """Whether a :func:`weight_norm_data_init` block is running."""
    return _DATA_INIT[0]


@contextmanager
def suspend_data_init() -> Iterator[None]:
    """Inside a :func:`weight_norm_data_init` block, run layers as initialised so far (no
    layer re-initialises itself here): for a second pass through layers that the first
    pass has set up, e.g. a VampPrior's pseudo-inputs through the encoder and the
    posterior's head, which must keep the statistics of the data."""
    was = _DATA_INIT[0]
    _DATA_INIT[0] = False
    try:
        yield
    finally:
        _DATA_INIT[0] = was


class _IAFCodeWeightNorm:
    """Shared by the two conv classes: ``v ~ N(0, 0.05^2)``, a log gain, the data init
    (:class:`IAFCodeLinear`, the code's dense layer, has a linear gain and its own)."""

    init_scale: float
    log_gain: nn.Parameter
    weight: nn.Parameter
    bias: nn.Parameter
    _gain_shape: tuple[int, ...]
    _norm_dims: tuple[int, ...]

    def _setup(self, out_channels: int, init_scale: float, mask: Tensor | None) -> None:
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.init_scale = float(init_scale)
        with torch.no_grad():
            self.weight.normal_(0.0, 0.05)
            self.bias.zero_()
        self.log_gain = nn.Parameter(torch.zeros(out_channels))
        if mask is not None and tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != weight {tuple(self.weight.shape)}"
            )
        self.register_buffer("mask", None if mask is None else mask.to(self.weight.dtype))

    def direction(self) -> Tensor:
        """``v / |v|`` (masked first), the norm over every dimension but the normalised one."""
        v = self.weight if self.mask is None else self.weight * self.mask
        norm = v.square().sum(self._norm_dims, keepdim=True).clamp_min(1e-12).sqrt()
        return v / norm

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        v = self.direction()
        if not _DATA_INIT[0]:
            return self._conv(x, torch.exp(self.log_gain).reshape(self._gain_shape) * v, self.bias)
        # The code's data-dependent init: normalise this batch's outputs per channel to
        # init_scale, and store g = log(scale) / 3 and b = -mean * scale (not the g that
        # would reproduce that normalisation: the code applies exp(g), i.e. scale^(1/3)).
        y = self._conv(x, v, None)
        mean = y.mean((0, 2, 3))
        var = y.var((0, 2, 3), unbiased=False)
        scale = self.init_scale / torch.sqrt(var + 1e-10)
        with torch.no_grad():
            self.log_gain.copy_(torch.log(scale) / 3.0)
            self.bias.copy_(-mean * scale)
        return scale.reshape(1, -1, 1, 1) * (y - mean.reshape(1, -1, 1, 1))


class IAFCodeConv2d(_IAFCodeWeightNorm, nn.Conv2d):
    """A conv weight-normalised as in Kingma et al.'s released IAF code (``tf_utils/layers.py``
    ``conv2d``): ``w = exp(g) v / |v|`` per output filter, with a **log** gain ``g``;
    ``v`` drawn from ``N(0, 0.05^2)``, bias zero.

    Its data-dependent init (inside :func:`weight_norm_data_init`) computes the batch's
    per-channel mean ``m`` and variance ``s^2`` of ``conv(x, v / |v|)``, returns the
    normalised output ``init_scale (y - m) / s`` (so the layers above initialise on
    normalised inputs), and stores ``g = log(init_scale / s) / 3`` and
    ``b = -m init_scale / s``, exactly as the code does; since the forward pass applies
    ``exp(g)``, the layer afterwards outputs ``(init_scale / s)^(1/3) y - m init_scale / s``,
    not the normalised output: reproduced, not corrected. ``mask`` (the weight's shape)
    multiplies ``v`` before the norm (the code's autoregressive convs).

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as ``nn.Conv2d``.
        init_scale: the data init's target scale (the code: 0.1; 1.0 for its
            autoregressive convs).
        mask: optional 0/1 mask of the weight ``(out, in, k, k)``.

    References:
        Salimans & Kingma 2016, arXiv:1602.07868 (weight normalisation, data init).
        Kingma et al. 2016, arXiv:1606.04934, appendix C.6; github.com/openai/iaf.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        init_scale: float = 0.1,
        mask: Tensor | None = None,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding)
        self._gain_shape = (-1, 1, 1, 1)
        self._norm_dims = (1, 2, 3)
        self._setup(out_channels, init_scale, mask)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding)


class IAFCodeConvTranspose2d(_IAFCodeWeightNorm, nn.ConvTranspose2d):
    """The transposed conv of the same code (``deconv2d``): the direction is normalised per
    *input* channel (its filter ``[k, k, out, in]`` over the first three axes; torch's
    weight is ``(in, out, k, k)``), the gain ``exp(g)`` is per output channel; the data
    init as :class:`IAFCodeConv2d`'s."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        output_padding: int | tuple[int, int] = 0,
        init_scale: float = 0.1,
    ) -> None:
        nn.ConvTranspose2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, output_padding
        )
        self._gain_shape = (1, -1, 1, 1)
        self._norm_dims = (1, 2, 3)
        self._setup(out_channels, init_scale, None)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding)


class IAFCodeLinear(nn.Linear):
    """The dense layer of the same code (``tf_utils/layers.py`` ``linear``), which is *not*
    parametrised as its convs: ``w = g v / |v|`` with a **linear** gain ``g`` per output
    unit (torch's weight ``(out, in)`` normalised over ``in``), ``v ~ N(0, 0.05^2)``, bias
    zero, ``init_scale`` 1 by default.

    Its data-dependent init (inside :func:`weight_norm_data_init`) takes the moments ``m``,
    ``s^2`` of ``x v^T / |v|`` per unit over every leading dim, returns the normalised
    output ``init_scale (y - m) / s`` and stores ``g = init_scale / s`` and
    ``b = -m init_scale / s``, so that afterwards the layer outputs exactly that
    normalisation on the init batch (no ``log`` and no ``/ 3``: those are the convs').

    Args:
        in_features, out_features: as ``nn.Linear``.
        init_scale: the data init's target scale (the code's default: 1.0).
        mask: optional 0/1 mask ``(out, in)`` applied to ``v`` before the norm (a MADE
            layer under ``weight_norm = "iaf_code"``).

    Shapes:
        ``(*lead, in_features) -> (*lead, out_features)``.

    References:
        Salimans & Kingma 2016, arXiv:1602.07868; github.com/openai/iaf
        ``tf_utils/layers.py`` ``linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init_scale: float = 1.0,
        mask: Tensor | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if mask is not None and tuple(mask.shape) != (out_features, in_features):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != (out, in) = ({out_features}, {in_features})"
            )
        self.init_scale = float(init_scale)
        with torch.no_grad():
            self.weight.normal_(0.0, 0.05)
            self.bias.zero_()
        self.gain = nn.Parameter(torch.ones(out_features))
        self.register_buffer("mask", None if mask is None else mask.to(self.weight.dtype))
        # rows the mask leaves exactly one input (see direction); derived from the mask, so
        # not saved with it
        single = None if mask is None else (mask != 0).sum(1) == 1
        self.register_buffer("single_input", single, persistent=False)

    def direction(self) -> Tensor:
        """``v / |v|`` (``v`` masked first, as a MADE layer's), each output unit's row
        normalised; a row the mask empties stays zero.

        A row the mask leaves one input is ``sign(v)``, whose true gradient is zero: it is
        taken as a constant, because round-off gradients rescaled by Adam-type optimisers
        would otherwise move (and could flip the sign of) that one weight; the gain
        carries the row's magnitude and sign."""
        if self.mask is None:
            return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = self.weight * self.mask
        d = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.where(self.single_input[:, None], torch.sign(v).detach(), d)

    def masked_weight(self) -> Tensor:
        """The weight the layer applies, ``g v / |v|`` ``(out, in)``."""
        return self.gain[:, None] * self.direction()

    def forward(self, x: Tensor) -> Tensor:
        v = self.direction()
        if not _DATA_INIT[0]:
            return F.linear(x, self.gain[:, None] * v, self.bias)
        y = F.linear(x, v)
        flat = y.reshape(-1, y.shape[-1])
        mean = flat.mean(0)
        var = flat.var(0, unbiased=False)
        scale = self.init_scale / torch.sqrt(var + 1e-10)
        # A unit whose output does not vary over the init batch (a MADE's degree-0 units,
        # cut off from every input by the mask; or all-zero inputs) has no scale to
        # normalise: 1 / sqrt(1e-10) would park a huge gain on it, which blows up as soon
        # as its input starts to vary. It keeps gain 1.
        scale = torch.where(var > 0, scale, torch.ones_like(scale))
        with torch.no_grad():
            self.gain.copy_(scale)
            self.bias.copy_(-mean * scale)
        return scale * (y - mean)


# -------------------------------------------------- layers that take any WEIGHT_NORMS setting


def check_weight_norm(weight_norm: bool | str) -> None:
    """A typo such as ``"iaf-code"`` must not quietly become torch's weight norm."""
    if not (isinstance(weight_norm, bool) or weight_norm == "iaf_code"):
        raise ValueError(f"weight_norm={weight_norm!r} is not one of {WEIGHT_NORMS}")


def wn_conv(
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int = 1,
    weight_norm: bool | str = False,
    transpose: bool = False,
    output_padding: int | tuple[int, int] = 0,
    zero: bool = False,
) -> nn.Module:
    """A ``kernel x kernel`` conv (padding ``kernel // 2``: size-preserving at stride 1 for
    the odd kernels used here), or its transpose, under a :data:`WEIGHT_NORMS` setting.
    ``zero`` (ignored under ``"iaf_code"``, whose data init sets the gain) starts it at an
    all-zero output, as :func:`maybe_weight_norm`."""
    check_weight_norm(weight_norm)
    pad = kernel // 2
    if weight_norm == "iaf_code":
        if transpose:
            return IAFCodeConvTranspose2d(c_in, c_out, kernel, stride, pad, output_padding)
        return IAFCodeConv2d(c_in, c_out, kernel, stride, pad)
    if transpose:
        conv: nn.Module = nn.ConvTranspose2d(c_in, c_out, kernel, stride, pad, output_padding)
    else:
        conv = nn.Conv2d(c_in, c_out, kernel, stride, pad)
    return maybe_weight_norm(conv, bool(weight_norm), zero=zero)


def wn_linear(
    n_in: int, n_out: int, weight_norm: bool | str = False, init_scale: float = 1.0
) -> nn.Module:
    """A dense layer under a :data:`WEIGHT_NORMS` setting (``init_scale``: the data init's
    target scale under ``"iaf_code"``)."""
    check_weight_norm(weight_norm)
    if weight_norm == "iaf_code":
        return IAFCodeLinear(n_in, n_out, init_scale)
    return maybe_weight_norm(nn.Linear(n_in, n_out), bool(weight_norm))


class StridedResidualBlock(nn.Module):
    """Pre-activation residual block that halves or doubles the resolution and may change
    the width: ``shortcut(x) + conv3x3(act(conv3x3_s2(act(x))))``.

    Kingma et al. 2016 (appendix B): "When there is a change in dimensionality, we use
    strided convolution or transposed convolution to replace the identity connection in
    ResNet blocks." Down (``up=False``): the branch's first conv and the shortcut are
    stride-2 3x3 convs (``H -> ceil(H / 2)``, so 28 -> 14 -> 7 -> 4). Up (``up=True``):
    both are stride-2 3x3 *transposed* convs to exactly ``out_size`` (``output_padding``
    chosen per axis: 4 -> 7 needs 0, 7 -> 14 needs 1). The paper gives no kernel for the
    shortcut; 3x3 is the network's filter size (a 1x1 transposed conv of stride 2 would
    leave every other pixel zero). The branch's last conv starts at zero (torch weight
    norm or none), so the block starts as its shortcut, as :class:`ResidualBlock`; under
    ``"iaf_code"`` the data init sets every scale.

    Args:
        c_in, c_out: channels in and out.
        up: upsample instead of downsample.
        out_size: ``(H, W)`` of the output; with ``in_size``, required when ``up`` and
            refused otherwise.
        in_size: ``(H, W)`` of the input (see ``out_size``).
        activation: name from :data:`ACTIVATIONS`.
        weight_norm: a :data:`WEIGHT_NORMS` setting.
        residual_scale: a constant factor on the branch (not the shortcut), as
            :class:`ResidualBlock`'s (the IAF code: ``input + .1 * branch`` with the
            strided conv as ``input``).

    Shapes:
        ``(N, c_in, H, W) -> (N, c_out, ceil(H / 2), ceil(W / 2))`` down,
        ``(N, c_in, H, W) -> (N, c_out, *out_size)`` up.

    References:
        Kingma et al. 2016, arXiv:1606.04934, appendix B; He et al. 2016, arXiv:1603.05027.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        up: bool = False,
        out_size: Sequence[int] | None = None,
        in_size: Sequence[int] | None = None,
        activation: str = "elu",
        weight_norm: bool | str = False,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.residual_scale = _check_residual_scale(residual_scale)
        wn = weight_norm
        if up:
            if out_size is None or in_size is None:
                raise ValueError("an upsampling block needs in_size and out_size")
            # A stride-2, padding-1, 3x3 transposed conv gives 2 H - 1 (+ output_padding).
            pads = tuple(int(o) - (2 * int(i) - 1) for i, o in zip(in_size, out_size, strict=True))
            if len(pads) != 2 or any(pad not in (0, 1) for pad in pads):
                raise ValueError(
                    f"cannot upsample {tuple(in_size)} to {tuple(out_size)} by a factor of 2"
                )
            first = wn_conv(c_in, c_out, 3, 2, wn, transpose=True, output_padding=pads)
            self.shortcut = wn_conv(c_in, c_out, 3, 2, wn, transpose=True, output_padding=pads)
        else:
            if out_size is not None or in_size is not None:
                raise ValueError("in_size and out_size are for upsampling blocks (up=True)")
            first = wn_conv(c_in, c_out, 3, 2, wn)
            self.shortcut = wn_conv(c_in, c_out, 3, 2, wn)
        self.branch = nn.Sequential(
            make_activation(activation),
            first,
            make_activation(activation),
            wn_conv(c_out, c_out, 3, 1, wn, zero=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.residual_scale != 1.0:
            return self.shortcut(x) + self.residual_scale * self.branch(x)
        return self.shortcut(x) + self.branch(x)
