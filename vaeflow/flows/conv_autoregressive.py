"""The convolutional IAF of Kingma et al. 2016: autoregressive over a latent feature map.

The ResNet VAE of Kingma et al. 2016 (arXiv:1606.04934, section 6, appendix C) follows
each latent group's Gaussian posterior, a feature map ``(C, H, W)``, with one IAF step
whose conditioner is a stack of *masked 3x3 convolutions* conditioned on a context feature
map from the bottom-up and top-down passes. This module follows the authors' TensorFlow
code (github.com/openai/iaf), where the paper gives no more detail:

* ``tf_utils/layers.py`` ``get_conv_ar_mask``: a kernel tap is zero at every spatial
  offset *before* the centre in raster order (the rows above, the taps left of the centre
  in its row), all ones at every offset *after* it, and at the centre the channel mask
  ``get_linear_ar_mask``. The conditioner is therefore autoregressive over positions
  *and* channels: output ``(c, i, j)`` reads the inputs at positions after ``(i, j)`` in
  raster order (all channels) and, at ``(i, j)`` itself, the channels before ``c``. The
  generation order runs through the positions in reverse raster order, channels in
  order within a position (:func:`conv_ar_ranks`), and the Jacobian is triangular in it.
* ``get_linear_ar_mask(n_in, n_out, zerodiagonal)``: units are grouped in blocks of
  ``max(n_in, n_out) / min(n_in, n_out)`` (one block per latent channel); a unit of block
  ``d`` reads the units of blocks ``<= d`` (``< d`` with ``zerodiagonal``, the output
  layers), so widths must divide each other (:func:`channel_ar_mask`).
* ``ar_multiconv2d``: hidden masked convs (centre not zeroed) with ELU, the context added
  to the first hidden layer's pre-activation, then the output convs (centre zeroed).
* ``tf_train.py`` ``IAFLayer.down``: ``m, s = 0.1 * out``; ``z = (z - m) / exp(s)``;
  ``log q += s``. That is this module's :class:`ConvAffineAutoregressive` ``forward``
  (one pass) applied to the posterior's noise, so the IAF is
  ``Inverse(ConvAffineAutoregressive(...))`` as for the vector IAF (docs/design.md §3.1).

Differences from the code (each a vaeflow rule or a generalisation): the output conv is
zero-initialised, so a step starts as the identity (docs/design.md §3.5; the code starts
from a data-dependent init); the log-scale is soft-clipped (``scale_bound``, the
guard of every vaeflow affine flow); no weight normalisation in the masked convs; the
context enters through a learned 1x1 projection to the hidden width (the code adds a
context of exactly the hidden width, which a projection can represent), and may be a
vector broadcast over the positions as well as a feature map.

References:
    Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
    Flow", arXiv:1606.04934, section 6 and appendix C; github.com/openai/iaf
    ``tf_utils/layers.py`` (``get_linear_ar_mask``, ``get_conv_ar_mask``, ``ar_conv2d``,
    ``ar_multiconv2d``) and ``tf_train.py`` (``IAFLayer.down``).
    van den Oord et al. 2016, "Pixel Recurrent Neural Networks", arXiv:1601.06759 (masked
    convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import IAFCodeConv2d, make_activation
from .base import Composite, Inverse, ShapeError, Transform

__all__ = [
    "channel_ar_mask",
    "conv_ar_mask",
    "conv_ar_ranks",
    "ConvAffineAutoregressive",
    "ConvAutoregressiveStack",
    "build_conv_iaf",
]


def channel_ar_mask(n_in: int, n_out: int, zero_diagonal: bool) -> Tensor:
    """The channel mask ``(n_out, n_in)`` (1: connected) at a masked conv's centre tap.

    As the code's ``get_linear_ar_mask``: the wider side is split into blocks of
    ``k = max / min`` consecutive units, block ``d`` standing for latent channel ``d``.
    With ``n_out >= n_in`` output ``o`` reads input ``i`` iff ``i <= o // k``; with
    ``n_out < n_in`` iff ``i // k <= o``; ``zero_diagonal`` makes both strict (output
    layers: a channel's parameters never read the channel itself).

    Raises:
        ValueError: if neither width divides the other (the blocks would not be whole).
    """
    if n_in < 1 or n_out < 1 or (n_in % n_out and n_out % n_in):
        raise ValueError(
            f"masked conv widths must divide each other (the code's get_linear_ar_mask), "
            f"got n_in={n_in}, n_out={n_out}"
        )
    i = torch.arange(n_in)[None, :]
    o = torch.arange(n_out)[:, None]
    if n_out >= n_in:
        d_in, d_out = i, o // (n_out // n_in)
    else:
        d_in, d_out = i // (n_in // n_out), o
    allowed = d_in < d_out if zero_diagonal else d_in <= d_out
    return allowed.to(torch.get_default_dtype())


def conv_ar_mask(kernel_size: int, n_in: int, n_out: int, zero_diagonal: bool) -> Tensor:
    """The weight mask ``(n_out, n_in, k, k)`` of a masked conv (the code's
    ``get_conv_ar_mask``): zero at the taps before the centre in raster order, one at the
    taps after it, :func:`channel_ar_mask` at the centre.

    A tap ``(a, b)`` multiplies the input at offset ``(a - r, b - r)`` (``r = k // 2``;
    convolutions here are cross-correlations, as in the code), so output ``(i, j)`` reads
    the rows below ``i`` and, in row ``i``, the columns right of ``j``.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    r = kernel_size // 2
    mask = torch.ones(n_out, n_in, kernel_size, kernel_size)
    mask[:, :, :r, :] = 0
    mask[:, :, r, :r] = 0
    mask[:, :, r, r] = channel_ar_mask(n_in, n_out, zero_diagonal)
    return mask


def conv_ar_ranks(shape: Sequence[int]) -> Tensor:
    """The generation order of the masked conv stack on ``(C, H, W)``: rank ``(C, H, W)``.

    Positions in reverse raster order (the bottom-right one first), channels in order
    within a position: ``rank = (H W - 1 - (i W + j)) C + c``. Output ``(c, i, j)`` of the
    conditioner depends only on inputs of lower rank.
    """
    c, h, w = shape
    raster = torch.arange(h * w).reshape(1, h, w)
    return (h * w - 1 - raster) * c + torch.arange(c).reshape(c, 1, 1)


class _MaskedConv2d(nn.Conv2d):
    """A ``same``-padded conv whose weight is multiplied by a fixed mask (a buffer)."""

    def __init__(self, n_in: int, n_out: int, mask: Tensor) -> None:
        k = mask.shape[-1]
        super().__init__(n_in, n_out, k, padding=k // 2)
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class _ContextMap:
    """Mixin: besides a context vector ``(*, C_ctx)`` (broadcast over the positions),
    accept a context feature map ``(*, C_ctx, H, W)`` with the input's ``H, W``."""

    takes_context_map = True
    event_shape: tuple[int, ...]
    context_features: int

    def is_context_map(self, context: Tensor) -> bool:
        """Whether ``context`` is a map ``(*, C_ctx, H, W)`` rather than a vector."""
        return context.dim() >= 3 and tuple(context.shape[-3:]) == (
            self.context_features,
            *self.event_shape[1:],
        )

    def expand_context(self, context: Tensor | None, lead: torch.Size) -> Tensor | None:
        if context is None or not self.context_features or not self.is_context_map(context):
            return super().expand_context(context, lead)  # type: ignore[misc]
        # A map is validated (its leading shape must broadcast to the input's) and
        # returned unexpanded: the layer adds its projection with broadcasting.
        c_lead = context.shape[:-3]
        offset = len(lead) - len(c_lead)
        if offset < 0 or any(c not in (1, lead[offset + i]) for i, c in enumerate(c_lead)):
            raise ShapeError(
                f"{type(self).__name__}: context map leading shape {tuple(c_lead)} does not "
                f"broadcast to the input's leading shape {tuple(lead)}"
            )
        return context


class ConvAffineAutoregressive(_ContextMap, Transform):
    """Affine autoregressive layer on a feature map; the convolutional IAF when wrapped in
    ``Inverse`` (see the module docstring for the masks and the order).

    ``forward`` (one conditioner pass; on the posterior's noise it is the code's IAF step)::

        (m_raw, s_raw) = net(x, context),   m = a m_raw,   s = b tanh(a s_raw / b)
        u = (x - m) * exp(-s),   log|det du/dx| = -sum s

    with ``a = output_scale`` (the code's 0.1) and ``b = scale_bound``. ``inverse`` solves
    ``x = u exp(s) + m`` in ``C H W`` sequential passes (``log|det dx/du| = +sum s``).
    Both directions offer their log-det per position, ``(*, C, H, W)``.

    Args:
        shape: ``(C, H, W)`` of the feature map.
        hidden: channels of each hidden masked conv (the code: ``h_size``); ``hidden`` and
            ``C`` must divide each other.
        num_hidden: hidden masked convs (the code: 2), at least 1.
        context_features: ``C_ctx`` of the context (0: none): a vector ``(*, C_ctx)`` or a
            map ``(*, C_ctx, H, W)``, projected to ``hidden`` channels and added to the
            first hidden layer's pre-activation (the code's ``x += context``).
        kernel_size: of every masked conv (the code: 3).
        reverse: run the conditioner on the flipped map (channels and both spatial axes),
            i.e. in the opposite order, so stacked layers alternate orders.
        output_scale: ``a``, the factor on the conditioner's outputs (the code: 0.1).
        scale_bound: ``b`` of the log-scale's soft clip (``None``: off).
        activation: of the hidden layers (the code: ELU).
    """

    splits_logdet = True
    broadcasts_context = True

    def __init__(
        self,
        shape: Sequence[int],
        *,
        hidden: int,
        num_hidden: int = 2,
        context_features: int = 0,
        kernel_size: int = 3,
        reverse: bool = False,
        output_scale: float = 0.1,
        scale_bound: float | None = 5.0,
        activation: str = "elu",
        weight_norm: bool | str = False,
    ) -> None:
        if weight_norm not in (False, "iaf_code"):
            raise ValueError(
                f"option weight_norm={weight_norm!r} is not one of (False, 'iaf_code')"
            )
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
        if num_hidden < 1 or hidden < 1:
            raise ValueError(
                f"the conv IAF needs num_hidden >= 1 and hidden >= 1, got {num_hidden}, {hidden}"
            )
        if not output_scale > 0:
            raise ValueError(f"output_scale must be > 0, got {output_scale}")
        if scale_bound is not None and not scale_bound > 0:
            raise ValueError(f"scale_bound must be > 0 or None, got {scale_bound}")
        code = weight_norm == "iaf_code"
        if code and context_features and context_features != hidden:
            raise ValueError(
                f"with weight_norm='iaf_code' the context map is added as it is (the code's "
                f"ar_multiconv2d), so context_features ({context_features}) must equal "
                f"hidden ({hidden})"
            )
        super().__init__(tuple(shape), context_features)
        c = self.event_shape[0]
        widths = [c] + [hidden] * num_hidden

        def masked(n_in: int, n_out: int, mask: Tensor) -> nn.Module:
            if code:  # the code's ar_conv2d: weight norm, data init at scale 1
                k = mask.shape[-1]
                return IAFCodeConv2d(n_in, n_out, k, padding=k // 2, init_scale=1.0, mask=mask)
            return _MaskedConv2d(n_in, n_out, mask)

        self.hidden_layers = nn.ModuleList(
            masked(a, b, conv_ar_mask(kernel_size, a, b, zero_diagonal=False))
            for a, b in zip(widths, widths[1:], strict=False)
        )
        self.activations = nn.ModuleList(make_activation(activation) for _ in widths[1:])
        # Two output maps per channel, m then s (2 C channels); each half has the code's
        # output mask (it has two separate output convs; their weight norm and data init
        # are per channel, so one conv of both is the same).
        out_mask = conv_ar_mask(kernel_size, hidden, c, zero_diagonal=True)
        self.out = masked(hidden, 2 * c, torch.cat([out_mask, out_mask]))
        if not code:  # vaeflow's: the step starts as the identity
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.context_identity = code and context_features > 0
        self.context = (
            nn.Linear(context_features, hidden)
            if context_features and not self.context_identity
            else None
        )
        self.reverse = reverse
        self.output_scale = float(output_scale)
        self.scale_bound = scale_bound

    def ranks(self) -> Tensor:
        """The layer's generation order, ``(C, H, W)`` ranks (see :func:`conv_ar_ranks`)."""
        r = conv_ar_ranks(self.event_shape)
        return r.flip(0, 1, 2) if self.reverse else r

    def _params(
        self, x: Tensor, lead: torch.Size, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``m`` and ``s`` ``(*lead, C, H, W)`` from ``x``; ``context`` as validated."""
        ctx = None
        if context is not None and self.context_identity:
            ctx = context if self.is_context_map(context) else context[..., None, None]
            ctx = ctx.flip(-2, -1) if self.reverse and ctx.shape[-1] > 1 else ctx
        elif context is not None and self.context is not None:
            if self.is_context_map(context):
                ctx = self.context(context.movedim(-3, -1)).movedim(-1, -3)
                # The conditioner sees the flipped map: the context must line up with it
                # (its channels are not autoregressive, so only the positions flip).
                ctx = ctx.flip(-2, -1) if self.reverse else ctx
            else:
                ctx = self.context(context)[..., None, None]
        h = x.flip(-3, -2, -1) if self.reverse else x
        h = h.reshape(-1, *self.event_shape)
        for i, (layer, act) in enumerate(zip(self.hidden_layers, self.activations, strict=True)):
            h = layer(h)
            if i == 0 and ctx is not None:
                h = (h.reshape(*lead, *h.shape[1:]) + ctx).reshape(-1, *h.shape[1:])
            h = act(h)
        m_raw, s_raw = self.out(h).reshape(*lead, 2, *self.event_shape).unbind(-4)
        if self.reverse:
            m_raw, s_raw = m_raw.flip(-3, -2, -1), s_raw.flip(-3, -2, -1)
        a, b = self.output_scale, self.scale_bound
        s = a * s_raw if b is None else b * torch.tanh(a * s_raw / b)
        return a * m_raw, s

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise in one pass: ``x (*, C, H, W) -> u``, ``log|det du/dx| (*)``."""
        u, ld = self.forward_dims(x, context)
        return u, ld.flatten(-3).sum(-1)

    def forward_dims(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with the log-det per position ``-s (*, C, H, W)``."""
        lead, context = self.check_input(x, context)
        m, s = self._params(x, lead, context)
        return (x - m) * torch.exp(-s), -s

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data in ``C H W`` passes: ``u (*, C, H, W) -> x``, log-det ``(*)``."""
        x, ld = self.inverse_dims(u, context)
        return x, ld.flatten(-3).sum(-1)

    def inverse_dims(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` with the log-det per position ``s (*, C, H, W)``."""
        lead, context = self.check_input(u, context, inverse=True)
        # As the vector layer's sequential inverse: after pass t every element of rank < t
        # is exact, so C H W passes make all exact, and the last pass's s is exact too.
        x = torch.zeros_like(u)
        m, s = self._params(x, lead, context)
        for _ in range(math.prod(self.event_shape) - 1):
            x = u * torch.exp(s) + m
            m, s = self._params(x, lead, context)
        return u * torch.exp(s) + m, s


class ConvAutoregressiveStack(_ContextMap, Composite):
    """A :class:`~vaeflow.flows.base.Composite` of :class:`ConvAffineAutoregressive`
    layers that also takes a context map and splits its log-det per position
    ``(*, C, H, W)`` (the layers keep every element where it is: their alternating orders
    are flips inside each layer, not permutations between them)."""

    def __init__(self, layers: Sequence[ConvAffineAutoregressive]) -> None:
        super().__init__(layers)
        self.splits_logdet = all(t.splits_logdet and not t.zero_logdet for t in layers)


def build_conv_iaf(
    features: Sequence[int],
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    *,
    num_hidden: int = 2,
    kernel_size: int = 3,
    permutation: str = "reverse",
    output_scale: float = 0.1,
    scale_bound: float | str | None = 5.0,
    activation: str = "elu",
    weight_norm: bool | str = False,
) -> Transform:
    """The convolutional IAF of Kingma et al. 2016 on a ``(C, H, W)`` feature map:
    ``Inverse`` of a stack of :class:`ConvAffineAutoregressive` layers.

    The sampling direction (``inverse``) is one conditioner pass per layer, the code's
    ``ar_multiconv2d`` + ``z = (z - m) / exp(s)``; ``forward`` (scoring a given ``z``)
    costs ``C H W`` passes per layer.

    Args:
        features: ``(C, H, W)``.
        num_layers: IAF steps (the paper's CIFAR-10 model: 1).
        hidden: channels of the hidden masked convs (the code: ``h_size`` = 160).
        context_features: context channels (0: none; a map or a vector, see the layer).
        num_hidden: hidden masked convs per step (the code: 2).
        kernel_size: of the masked convs (the code: 3).
        permutation: ``"reverse"`` (default): every second step runs in the reversed order
            (flipped channels and positions); ``"none"``: all steps in the code's order.
        output_scale: factor on the conditioner's outputs (the code: 0.1).
        scale_bound: soft clip of the log-scales (default 5.0; ``None`` or ``"none"``: off).
        activation: hidden non-linearity (the code: ELU).
        weight_norm: ``False`` (default) or ``"iaf_code"``: the code's weight-normalised
            masked convs (:class:`~vaeflow.layers.IAFCodeConv2d`, data init at scale 1
            inside :func:`~vaeflow.layers.weight_norm_data_init`, output convs not
            zero) and the context map added as it is (``context_features == hidden``).

    Returns:
        An :class:`~vaeflow.flows.base.Inverse`, exactly the identity at init (not with
        ``weight_norm = "iaf_code"``).
    """
    if isinstance(features, int) or len(features) != 3:
        raise ValueError(f"the conv IAF is for (C, H, W) feature maps, got {features!r}")
    if permutation not in ("reverse", "none"):
        raise ValueError(f"option permutation={permutation!r} is not one of ('reverse', 'none')")
    if scale_bound == "none":  # a config file's way to say None (the code's: no bound)
        scale_bound = None
    elif isinstance(scale_bound, str):
        raise ValueError(f"option scale_bound={scale_bound!r}: give a number > 0 or 'none'")

    def layer(i: int) -> ConvAffineAutoregressive:
        return ConvAffineAutoregressive(
            features,
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            kernel_size=kernel_size,
            reverse=permutation == "reverse" and i % 2 == 1,
            output_scale=output_scale,
            scale_bound=scale_bound,
            activation=activation,
            weight_norm=weight_norm,
        )

    return Inverse(ConvAutoregressiveStack([layer(i) for i in range(num_layers)]))
