"""Glow building blocks: ActNorm, invertible 1x1 convolution, squeeze, multi-scale.

All layers follow the vaeflow direction (``forward``: data -> noise) and act on images
``(*, C, H, W)`` with any number of leading dimensions (ActNorm also on vectors).

References:
    Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions",
    arXiv:1807.03039.
    Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP",
    arXiv:1605.08803 (squeeze and the multi-scale architecture, section 3.6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Composite, LULinear, ShapeError, Transform, _as_event_shape
from .coupling import (
    AffineCoupling,
    _check_common,
    _check_depth,
    _image_shape,
    _resolve_options,
    _resolve_scales,
    channel_mask,
    checkerboard_mask,
)

__all__ = [
    "ActNorm",
    "Invertible1x1Conv",
    "Squeeze",
    "MultiScale",
    "build_glow",
    "build_realnvp_image",
]


class ActNorm(Transform):
    """Per-channel affine map ``u = x * exp(log_scale) + shift`` with data-dependent init.

    On the first ``forward`` call in training mode (while the buffer ``initialized`` is
    false), the parameters are set from that batch so that its outputs have zero mean
    and unit variance per channel: ``log_scale = -log(std + eps)``,
    ``shift = -mean * exp(log_scale)`` (statistics over every leading and spatial
    position, population variance). Until then the layer is the identity. The flag is a
    buffer, so a loaded ``state_dict`` keeps its parameters instead of re-initialising.

    Only ``forward`` (the data direction) initialises; ``inverse`` never does. Pass
    ``data_init=False`` for a plain identity-initialised per-channel affine layer (e.g.
    inside a VAE posterior, which only runs ``inverse``).

    Args:
        num_features: number of channels ``C`` (the first event dimension).
        event_shape: ``(C,)`` for vectors (default) or ``(C, H, W)`` for images.
        data_init: whether to initialise from the first training batch (default True).
        eps: added to the standard deviation so a constant channel stays finite.

    Shapes:
        ``forward(x (*, *event)) -> (u (*, *event), logabsdet (*))`` with
        ``logabsdet = (H*W) * sum(log_scale)``.

    References:
        Kingma & Dhariwal 2018, arXiv:1807.03039, section 3.1.
    """

    def __init__(
        self,
        num_features: int,
        event_shape: Sequence[int] | int | None = None,
        data_init: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__((num_features,) if event_shape is None else event_shape)
        if self.event_shape[0] != num_features:
            raise ValueError(
                f"ActNorm({num_features}): the first event dimension of {self.event_shape} "
                f"must be the {num_features} channels"
            )
        if not eps > 0:
            raise ValueError(f"ActNorm: eps must be > 0, got {eps}")
        self.num_features = num_features
        self.data_init = bool(data_init)
        self.eps = float(eps)
        self.positions = math.prod(self.event_shape) // num_features
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.shift = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: Tensor) -> Tensor:
        return p.view(self.num_features, *([1] * (self.event_ndim - 1)))

    def _logdet(self, x: Tensor, lead: torch.Size, sign: float) -> Tensor:
        return (sign * self.positions * self.log_scale.sum()).to(x.dtype).expand(lead)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters from ``x (*, *event)`` and mark the layer initialised."""
        channel_dim = x.dim() - self.event_ndim
        flat = x.detach().movedim(channel_dim, -1).reshape(-1, self.num_features)
        mean = flat.mean(dim=0)
        std = flat.var(dim=0, correction=0).sqrt()
        log_scale = -torch.log(std + self.eps)
        self.log_scale.copy_(log_scale)
        self.shift.copy_(-mean * torch.exp(log_scale))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise; initialises from ``x`` first if due (training mode only)."""
        lead, _ = self.check_input(x, context)
        # The flag is only read in training mode, so evaluation never synchronises.
        if self.training and self.data_init and not bool(self.initialized):
            self.initialize(x)
        u = x * torch.exp(self._view(self.log_scale)) + self._view(self.shift)
        return u, self._logdet(x, lead, 1.0)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data: ``x = (u - shift) * exp(-log_scale)``; never initialises."""
        lead, _ = self.check_input(u, context, inverse=True)
        x = (u - self._view(self.shift)) * torch.exp(-self._view(self.log_scale))
        return x, self._logdet(u, lead, -1.0)


class Invertible1x1Conv(LULinear):
    """Glow's invertible 1x1 convolution: an LU-parameterised channel mixing ``W``.

    A thin wrapper of :class:`~vaeflow.flows.base.LULinear` applied along the channels of
    ``(C, H, W)``; log-det ``H * W * log|det W|``. Starts as the identity (docs/design.md
    §3.5) instead of Glow's random rotation.

    Args:
        num_channels: ``C``.
        event_shape: ``(C, H, W)``.
        bias: learn a per-channel shift too (default False: ActNorm already has one).

    References:
        Kingma & Dhariwal 2018, arXiv:1807.03039, section 3.2.
    """

    def __init__(self, num_channels: int, event_shape: Sequence[int], bias: bool = False) -> None:
        shape = _as_event_shape(event_shape)
        if len(shape) != 3:
            raise ValueError(f"Invertible1x1Conv: event_shape must be (C, H, W), got {shape}")
        super().__init__(num_channels, shape, dim=-3, bias=bias)


class Squeeze(Transform):
    """Space-to-channel reshape ``(C, H, W) -> (4C, H/2, W/2)``; log-det 0.

    Output channel ``4c + 2i + j`` holds the pixels ``(c, 2y + i, 2x + j)``: each 2x2
    block becomes four channels (Dinh et al. 2017, section 3.6, figure 3).

    Args:
        event_shape: ``(C, H, W)`` with even ``H`` and ``W``.

    References:
        Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803, section 3.6.
    """

    def __init__(self, event_shape: Sequence[int]) -> None:
        shape = _as_event_shape(event_shape)
        if len(shape) != 3:
            raise ValueError(f"Squeeze: event_shape must be (C, H, W), got {shape}")
        c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze: H and W must be even, got {h}x{w}")
        super().__init__(shape, out_event_shape=(4 * c, h // 2, w // 2))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, C, H, W) -> (*, 4C, H/2, W/2)``."""
        lead, _ = self.check_input(x, context)
        c, h, w = self.event_shape
        n = len(lead)
        y = x.reshape(*lead, c, h // 2, 2, w // 2, 2)
        y = y.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)
        return y.reshape(*lead, *self.out_event_shape), x.new_zeros(lead)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, 4C, H/2, W/2) -> (*, C, H, W)``."""
        lead, _ = self.check_input(u, context, inverse=True)
        c, h, w = self.event_shape
        n = len(lead)
        y = u.reshape(*lead, c, 2, 2, h // 2, w // 2)
        y = y.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)
        return y.reshape(*lead, c, h, w), u.new_zeros(lead)


class MultiScale(Transform):
    """Multi-scale flow: run a level, factor out half its channels, continue on the rest.

    Level ``i`` maps ``(C_i, H_i, W_i)`` to ``(C'_i, H'_i, W'_i)``; for every level but
    the last, the FIRST ``C'_i // 2`` channels are factored out and the remaining
    ``C'_i - C'_i // 2`` channels are the input of level ``i + 1``, whose event shape must
    match. ``forward`` returns the flat concatenation
    ``[z_0, z_1, ..., z_last]`` of shape ``(*, C*H*W)`` (each part flattened in
    ``(C, H, W)`` order), so a ``StandardNormal((C*H*W,))`` base fits
    :class:`~vaeflow.flows.density.FlowDensity`. ``inverse`` undoes this exactly.

    The context goes to the levels that take one (``context_features > 0``).

    Args:
        levels: the per-level transforms (at least one), each dimension-preserving.

    Shapes:
        ``forward(x (*, C, H, W)) -> (u (*, C*H*W), logabsdet (*))``.

    References:
        Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803, section 3.6.
        Kingma & Dhariwal 2018, arXiv:1807.03039, section 2.
    """

    def __init__(self, levels: Sequence[Transform]) -> None:
        levels = list(levels)
        if not levels:
            raise ValueError("MultiScale needs at least one level")
        ctx = {t.context_features for t in levels if t.context_features > 0}
        if len(ctx) > 1:
            raise ValueError(f"MultiScale: levels disagree on context_features: {sorted(ctx)}")
        factored: list[tuple[int, int, int]] = []
        for i, level in enumerate(levels):
            if math.prod(level.event_shape) != math.prod(level.out_event_shape):
                raise ShapeError(f"MultiScale: level {i} changes the number of dimensions")
            if i == len(levels) - 1:
                break
            if len(level.out_event_shape) != 3:
                raise ShapeError(f"MultiScale: level {i} must output images (C, H, W)")
            c, h, w = level.out_event_shape
            if c < 2:
                raise ShapeError(f"MultiScale: level {i} outputs {c} channel(s); cannot split")
            factored.append((c // 2, h, w))
            expected = (c - c // 2, h, w)
            if levels[i + 1].event_shape != expected:
                raise ShapeError(
                    f"MultiScale: level {i + 1} expects {levels[i + 1].event_shape} but gets "
                    f"{expected} after factoring out half of level {i}'s {c} channels"
                )
        d = math.prod(levels[0].event_shape)
        super().__init__(levels[0].event_shape, ctx.pop() if ctx else 0, out_event_shape=(d,))
        self.levels = nn.ModuleList(levels)
        self.factored_shapes = factored
        self.sizes = [math.prod(s) for s in factored] + [math.prod(levels[-1].out_event_shape)]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, C, H, W) -> (*, C*H*W)`` and ``log|det du/dx| (*)``."""
        lead, context = self.check_input(x, context)
        total = x.new_zeros(lead)
        parts = []
        h = x
        for i, level in enumerate(self.levels):
            h, ld = level(h, context if level.context_features else None)
            total = total + ld
            if i < len(self.factored_shapes):
                f = self.factored_shapes[i][0]
                parts.append(h[..., :f, :, :].reshape(*lead, -1))
                h = h[..., f:, :, :]
        parts.append(h.reshape(*lead, -1))
        return torch.cat(parts, dim=-1), total

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, C*H*W) -> (*, C, H, W)`` and ``log|det dx/du| (*)``."""
        lead, context = self.check_input(u, context, inverse=True)
        parts = u.split(self.sizes, dim=-1)
        total = u.new_zeros(lead)
        h = parts[-1].reshape(*lead, *self.levels[-1].out_event_shape)
        for i in range(len(self.levels) - 1, -1, -1):
            level = self.levels[i]
            h, ld = level.inverse(h, context if level.context_features else None)
            total = total + ld
            if i > 0:
                z = parts[i - 1].reshape(*lead, *self.factored_shapes[i - 1])
                h = torch.cat([z, h], dim=-3)
        return h, total


def build_glow(
    features: Sequence[int],
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    **options: Any,
) -> Transform:
    """Glow: per scale, Squeeze then ``num_layers`` x (ActNorm, 1x1 conv, affine coupling).

    Between scales half of the channels are factored out (:class:`MultiScale`); the
    output is flat, ``(*, C*H*W)``. Couplings split the channels in halves, alternating
    which half is kept so that the layer starts as an identity that still mixes both.

    Args:
        features: image shape ``(C, H, W)``.
        num_layers: flow steps per scale (``K`` in the paper).
        hidden: conv channels of each coupling's conditioner.
        context_features: context width (0: unconditional); broadcast over ``H, W``.
        **options:
            num_scales: number of scales ``L`` (default 2, or fewer if the image is too
                small); ``H`` and ``W`` must be divisible by ``2^L``.
            num_blocks: residual blocks per conditioner (default 1).
            scale_bound: soft bound of each log-scale (default 3.0).
            activation: conditioner activation (default ``"relu"``).
            data_init: ActNorm data-dependent initialisation (default True).
            time_conditioned: read a time ``t`` from context column 0 (default False).
            time_features: width of the time embedding (default 16).

    Returns:
        A :class:`MultiScale` from ``(*, C, H, W)`` to ``(*, C*H*W)``. With
        ``data_init``, the first ``forward`` in training mode initialises every ActNorm
        (call it on a data batch before training); before that, and with
        ``data_init=False``, the flow only reorders the pixels (log-det 0).

    References:
        Kingma & Dhariwal 2018, arXiv:1807.03039, section 3 and figure 2.
    """
    builder = "build_glow"
    defaults = {
        "num_scales": None,
        "num_blocks": 1,
        "scale_bound": 3.0,
        "activation": "relu",
        "data_init": True,
        "time_conditioned": False,
        "time_features": 16,
    }
    opts = _resolve_options(builder, options, defaults)
    time_features = _check_common(builder, num_layers, hidden, context_features, opts)
    depth = _check_depth(builder, "num_blocks", opts["num_blocks"])
    if not isinstance(opts["data_init"], bool):
        raise ValueError(f"{builder}: option data_init must be a bool")
    c, h, w = _image_shape(builder, features)
    fits = 0
    while h % 2 ** (fits + 1) == 0 and w % 2 ** (fits + 1) == 0:
        fits += 1
    if fits == 0:
        raise ValueError(f"{builder}: H and W must be even to squeeze, got {h}x{w}")
    scales = _resolve_scales(
        builder, opts["num_scales"], fits, f"H={h}, W={w} must be divisible by 2^num_scales"
    )

    levels: list[Transform] = []
    for level in range(scales):
        steps: list[Transform] = [Squeeze((c, h, w))]
        c, h, w = 4 * c, h // 2, w // 2
        shape = (c, h, w)
        for k in range(num_layers):
            steps += [
                ActNorm(c, shape, data_init=opts["data_init"]),
                Invertible1x1Conv(c, shape),
                AffineCoupling(
                    channel_mask(c, k % 2),
                    shape,
                    hidden,
                    context_features,
                    depth,
                    opts["activation"],
                    time_features,
                    float(opts["scale_bound"]),
                ),
            ]
        levels.append(Composite(steps))
        if level < scales - 1:
            c = c - c // 2
    return MultiScale(levels)


def build_realnvp_image(
    features: Sequence[int],
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    **options: Any,
) -> Transform:
    """Multi-scale RealNVP on images ``(C, H, W)`` (Dinh et al. 2017, section 3.6).

    Each scale but the last: ``num_layers`` checkerboard couplings (alternating
    parity), a :class:`Squeeze` to ``(4C, H/2, W/2)``, ``num_layers``
    channel couplings (alternating halves); then half the channels are factored out.
    The last scale: ``num_layers`` checkerboard couplings. The output is the flat
    concatenation of all factored-out parts, ``(*, C*H*W)`` (see
    :class:`MultiScale`).

    Args:
        features: image shape ``(C, H, W)``.
        num_layers: couplings of each kind per scale.
        hidden: conv channels of each conditioner.
        context_features: context width (0: unconditional); broadcast over ``H, W``.
        **options:
            num_scales: number of scales (default 2, or fewer if the image is too small);
                ``H`` and ``W`` must be divisible by ``2^(num_scales-1)`` and the last
                scale must keep at least 2 pixels.
            num_blocks: residual blocks per conditioner (default 2).
            scale_bound: soft bound of each log-scale (default 3.0).
            activation: conditioner activation (default ``"relu"``).
            time_conditioned: read a time ``t`` from context column 0 (default False).
            time_features: width of the time embedding (default 16).

    Returns:
        A :class:`MultiScale` from ``(*, C, H, W)`` to
        ``(*, C*H*W)``; at init it only reorders the pixels (log-det 0).

    References:
        Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803, sections 3.4-3.6.
    """
    builder = "build_realnvp_image"
    defaults = {
        "num_scales": None,
        "num_blocks": 2,
        "scale_bound": 3.0,
        "activation": "relu",
        "time_conditioned": False,
        "time_features": 16,
    }
    opts = _resolve_options(builder, options, defaults)
    time_features = _check_common(builder, num_layers, hidden, context_features, opts)
    depth = _check_depth(builder, "num_blocks", opts["num_blocks"])
    c, h, w = _image_shape(builder, features)
    fits = 1
    while h % 2**fits == 0 and w % 2**fits == 0 and (h // 2**fits) * (w // 2**fits) >= 2:
        fits += 1
    if h * w < 2:
        raise ValueError(f"{builder}: a checkerboard needs at least 2 pixels, got {h}x{w}")
    scales = _resolve_scales(
        builder,
        opts["num_scales"],
        fits,
        f"H={h}, W={w} must be divisible by 2^(num_scales-1) with >= 2 pixels left",
    )

    def coupling(mask: Tensor, shape: tuple[int, int, int]) -> AffineCoupling:
        return AffineCoupling(
            mask,
            shape,
            hidden,
            context_features,
            depth,
            opts["activation"],
            time_features,
            float(opts["scale_bound"]),
        )

    levels: list[Transform] = []
    for level in range(scales):
        shape = (c, h, w)
        steps: list[Transform] = [
            coupling(checkerboard_mask(h, w, k % 2), shape) for k in range(num_layers)
        ]
        if level < scales - 1:
            steps.append(Squeeze(shape))
            c, h, w = 4 * c, h // 2, w // 2
            steps += [coupling(channel_mask(c, k % 2), (c, h, w)) for k in range(num_layers)]
            c = c - c // 2  # MultiScale factors out the first half of the channels
        levels.append(Composite(steps))
    return MultiScale(levels)
