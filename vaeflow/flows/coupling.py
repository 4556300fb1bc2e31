"""Coupling layers: additive (NICE) and affine (RealNVP), their masks, and conditioning.

A coupling layer splits its input with a fixed binary mask into a part ``x_A`` that
passes through unchanged and a part ``x_B`` that is transformed elementwise, with
parameters computed from ``x_A`` (and an optional context ``c``) by a conditioner net:

    forward (data -> noise):  u_A = x_A,   u_B = x_B * exp(s(x_A, c)) + t(x_A, c)
    inverse (noise -> data):  x_A = u_A,   x_B = (u_B - t(u_A, c)) * exp(-s(u_A, c))

so ``log|det du/dx| = sum_B s`` (forward) and ``-sum_B s`` (inverse). This is the
direction of Dinh et al. 2017, eq. 4-5, whose ``f`` also maps data to latent. The
additive (NICE) layer is the special case ``s = 0``: volume preserving, log-det 0.

Conventions kept here (docs/design.md):

* **Masks** are boolean and follow RealNVP's ``b``: ``True`` marks the features that
  pass unchanged and feed the conditioner (``x_A``), ``False`` the transformed ones.
  A mask broadcasts to the event shape: ``(D,)`` for vectors, ``(1, H, W)`` for a
  checkerboard over images ``(C, H, W)``, ``(C, 1, 1)`` for a channel split.
* **Identity at init**: the conditioner's last layer is zero, so ``s = t = 0``.
* **Bounded scales**: ``s = bound * tanh(raw / bound)`` (soft clip, ``|s| < bound``).
* **Context** ``(*, C)`` is concatenated to the conditioner input (for images it is
  broadcast over ``H, W`` as extra input channels).
* **Time conditioning** (``time_features > 0``): the FIRST context column is a scalar
  time ``t``, i.e. ``context = [t, c_1, ..., c_{C-1}]`` with ``context_features = 1 +
  (number of extra features)``. ``t`` is expanded by :class:`TimeEmbedding` into Fourier
  features before it is concatenated with the remaining columns.

References:
    Dinh, Krueger & Bengio 2015, "NICE: Non-linear Independent Components Estimation",
    arXiv:1410.8516.
    Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP",
    arXiv:1605.08803.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import ACTIVATIONS, MLP, ResidualConvNet, flatten_leading
from .base import (
    Composite,
    LULinear,
    Permutation,
    RandomPermutation,
    ReversePermutation,
    Transform,
    merge_by_parity,
    parity_of,
    split_by_parity,
    sum_except_leading,
)

__all__ = [
    "alternating_mask",
    "checkerboard_mask",
    "channel_mask",
    "TimeEmbedding",
    "AdditiveCoupling",
    "AffineCoupling",
    "DiagonalScaling",
    "build_nice",
    "build_realnvp",
]


# -- masks ---------------------------------------------------------------------------


def alternating_mask(features: int, parity: int = 0) -> Tensor:
    """Vector mask ``(features,)``: ``True`` (unchanged part) where ``i % 2 == parity``.

    Args:
        features: vector length ``D``.
        parity: 0 keeps the even features, 1 the odd ones.

    Returns:
        bool tensor ``(D,)``.
    """
    _check_parity(parity)
    return torch.arange(features) % 2 == parity


def checkerboard_mask(height: int, width: int, parity: int = 0) -> Tensor:
    """Image mask ``(1, H, W)``: ``True`` (unchanged part) where ``(i + j) % 2 == parity``.

    The leading 1 broadcasts over channels, as in Dinh et al. 2017, section 3.4.

    Args:
        height: ``H``.
        width: ``W``.
        parity: which colour of the checkerboard passes unchanged.

    Returns:
        bool tensor ``(1, H, W)``.
    """
    _check_parity(parity)
    i = torch.arange(height).view(-1, 1)
    j = torch.arange(width).view(1, -1)
    return ((i + j) % 2 == parity).unsqueeze(0)


def channel_mask(channels: int, parity: int = 0) -> Tensor:
    """Image mask ``(C, 1, 1)`` splitting the channels in two halves.

    ``parity=0`` keeps the first ``ceil(C/2)`` channels unchanged, ``parity=1`` the last
    ``ceil(C/2)`` (the two parities are complements only for even ``C``).

    Args:
        channels: ``C >= 2``.
        parity: which half passes unchanged.

    Returns:
        bool tensor ``(C, 1, 1)``.
    """
    _check_parity(parity)
    if channels < 2:
        raise ValueError(f"channel_mask needs at least 2 channels, got {channels}")
    half = (channels + 1) // 2
    idx = torch.arange(channels)
    keep = idx < half if parity == 0 else idx >= channels - half
    return keep.view(channels, 1, 1)


def _check_parity(parity: int) -> None:
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")


# -- time embedding ------------------------------------------------------------------


class TimeEmbedding(nn.Module):
    """Fixed Fourier features of a scalar time: ``t (*, 1) -> (*, num_features)``.

    ``[sin(pi 2^k t), cos(pi 2^k t)]`` for ``k = 0 .. num_features/2 - 1``: octave-spaced
    frequencies resolve ``t`` in ``[0, 1]`` from the coarsest to a ``2^-(K-1)`` scale,
    and the first linear layer of the conditioner learns what to make of them. The
    features carry no parameters, so the embedding cannot drift away from a smooth
    function of ``t``.

    Args:
        num_features: even output width (default 16).

    References:
        Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762 (sinusoids).
        Tancik et al. 2020, "Fourier Features Let Networks Learn High Frequency
        Functions", arXiv:2006.10739.
    """

    def __init__(self, num_features: int = 16) -> None:
        super().__init__()
        if num_features < 2 or num_features % 2:
            raise ValueError(
                f"TimeEmbedding: num_features must be even and >= 2, got {num_features}"
            )
        self.num_features = int(num_features)

    def forward(self, t: Tensor) -> Tensor:
        """``(*, 1) -> (*, num_features)``."""
        # Frequencies are made from t's own dtype/device: exact powers of two, no float32
        # constant leaks into a float64 computation and no buffer has to follow .to().
        k = torch.arange(self.num_features // 2, device=t.device, dtype=t.dtype)
        angle = math.pi * t * torch.exp2(k)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


# -- coupling layers -----------------------------------------------------------------


class _Coupling(Transform):
    """Shared machinery: mask bookkeeping, conditioner, context; subclasses set the map.

    Three layouts, chosen from the event shape and the mask:

    * ``"split"`` along a dimension: vectors (dim -1) and channel masks on images
      (dim -3). ``x_A`` and ``x_B`` are gathered by index, the conditioner (an MLP for
      vectors, a conv net for images) maps ``x_A`` to parameters for ``x_B`` only.
    * ``"masked"``: spatial masks such as the checkerboard. The conv net sees
      ``x * mask`` and the mask itself (so it can tell a masked pixel from a zero pixel)
      and predicts parameters for every position; those on the unchanged part are
      zeroed, which makes ``u_A = x_A`` hold exactly.
    """

    _params_per_feature = 1

    def __init__(
        self,
        mask: Tensor,
        event_shape: Sequence[int] | int | None = None,
        hidden: int = 64,
        context_features: int = 0,
        depth: int = 2,
        activation: str = "relu",
        time_features: int = 0,
    ) -> None:
        mask = torch.as_tensor(mask).to(torch.bool)
        super().__init__(
            tuple(mask.shape) if event_shape is None else event_shape, context_features
        )
        name = type(self).__name__
        try:
            full = mask.expand(self.event_shape).clone()
        except RuntimeError:
            raise ValueError(
                f"{name}: mask of shape {tuple(mask.shape)} does not broadcast to the event "
                f"shape {self.event_shape}"
            ) from None
        n_keep = int(full.sum())
        if n_keep == 0 or n_keep == full.numel():
            raise ValueError(f"{name}: the mask must keep some features and transform others")

        # Context seen by the conditioner: optionally [embed(t), c_rest].
        if time_features:
            if context_features < 1:
                raise ValueError(
                    f"{name}: time conditioning reads t from the first context column, so "
                    f"context_features must be >= 1 (got {context_features})"
                )
            self.time_embedding: TimeEmbedding | None = TimeEmbedding(time_features)
            ctx_width = time_features + context_features - 1
        else:
            self.time_embedding = None
            ctx_width = context_features

        k = self._params_per_feature
        if self.event_ndim == 1:
            self.layout, self.dim = "split", -1
            keep = full
        elif self.event_ndim == 3:
            per_channel = full[:, :1, :1].expand_as(full)
            if torch.equal(full, per_channel):
                self.layout, self.dim = "split", -3
                keep = full[:, 0, 0]
            else:
                self.layout, self.dim = "masked", -3
                keep = None
        else:
            raise ValueError(f"{name}: events must be vectors (D,) or images (C, H, W)")

        if self.layout == "split":
            idx_a = torch.nonzero(keep).flatten()
            idx_b = torch.nonzero(~keep).flatten()
            n_a, n_b = idx_a.numel(), idx_b.numel()
            self.register_buffer("idx_a", idx_a)
            self.register_buffer("idx_b", idx_b)
            # Positions of [x_A, x_B] back in the original order.
            self.register_buffer("unsplit", torch.argsort(torch.cat([idx_a, idx_b])))
            # Alternating vector masks split by a view instead of index gathers.
            self.keep_parity = parity_of(keep) if self.dim == -1 else None
            n_in, n_out = n_a + ctx_width, k * n_b
        else:
            channels = self.event_shape[0]
            n_in, n_out = 2 * channels + ctx_width, k * channels
        self.register_buffer("mask", full)

        if self.event_ndim == 1:
            self.conditioner: nn.Module = MLP(
                n_in, n_out, hidden, depth, activation, zero_last=True
            )
            # A per-example context (B, C) with samples x (K, B, D) stays (B, C): the
            # conditioner's first layer takes it once per example (see _condition).
            self.broadcasts_context = True
            self._n_cond = n_a
        else:
            self.conditioner = ResidualConvNet(
                n_in, n_out, hidden, depth, activation, zero_last=True
            )

    # -- conditioner ---------------------------------------------------------------
    def _context(self, context: Tensor | None) -> Tensor | None:
        if context is None or self.time_embedding is None:
            return context
        return torch.cat([self.time_embedding(context[..., :1]), context[..., 1:]], dim=-1)

    def _condition(self, h: Tensor, context: Tensor | None) -> Tensor:
        """Conditioner output for the conditioning input ``h (*lead, *event_A)``."""
        if self.event_ndim == 1:
            if context is None:
                return self.conditioner(h)
            if context.shape[:-1] == h.shape[:-1]:
                return self.conditioner(torch.cat([h, context], dim=-1))
            # A context that broadcasts over samples (k importance samples of B examples):
            # the first layer W [h; c] + b split as W_h h + (W_c c + b), the context's
            # part computed for its own rows only -- with C = 400 context features and
            # 20 conditioning inputs it was 95 % of the first layer's work per sample.
            first, rest = self.conditioner.net[0], self.conditioner.net[1:]
            w_h, w_c = first.weight.split([self._n_cond, context.shape[-1]], dim=1)
            return rest(F.linear(h, w_h) + F.linear(context, w_c, first.bias))
        flat, lead = flatten_leading(h, 3)
        n, _, height, width = flat.shape
        pieces = [flat]
        if self.layout == "masked":
            pieces.append(self.mask.to(flat.dtype).expand(n, -1, -1, -1))
        if context is not None:
            c = context.reshape(n, context.shape[-1])
            pieces.append(c[:, :, None, None].expand(-1, -1, height, width))
        out = self.conditioner(torch.cat(pieces, dim=1))
        return out.reshape(*lead, *out.shape[1:])

    # -- the elementwise map on x_B, set by subclasses -------------------------------------
    def _map(self, x_b: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor | None]:
        """Return the mapped part and the elementwise log-scale (``None`` if zero)."""
        raise NotImplementedError

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        lead, context = self.check_input(x, context, inverse=inverse)
        context = self._context(context)
        if self.layout == "split":
            q = self.keep_parity
            if q is None:
                x_a = x.index_select(self.dim, self.idx_a)
                x_b = x.index_select(self.dim, self.idx_b)
            else:
                x_a, x_b = split_by_parity(x, q)
            y_b, s = self._map(x_b, self._condition(x_a, context), inverse)
            # x_A is copied, not recomputed: the unchanged part stays bit-exact.
            if q is None:
                y = torch.cat([x_a, y_b], dim=self.dim).index_select(self.dim, self.unsplit)
            else:
                y = merge_by_parity(x_a, y_b, q)
        else:
            keep = self.mask
            params = self._condition(x * keep.to(x.dtype), context)
            # Zero parameters on the kept positions: there x * exp(0) + 0 == x exactly.
            params = params.masked_fill(keep.repeat(self._params_per_feature, 1, 1), 0.0)
            y, s = self._map(x, params, inverse)
        if s is None:
            return y, x.new_zeros(lead)
        ld = sum_except_leading(s, self.event_ndim)
        return y, -ld if inverse else ld

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise: ``u (*, *event)`` and ``log|det du/dx| (*)``."""
        return self._run(x, context, inverse=False)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data: ``x (*, *event)`` and ``log|det dx/du| (*)``."""
        return self._run(u, context, inverse=True)


class AdditiveCoupling(_Coupling):
    """NICE additive coupling: ``u_B = x_B + t(x_A, c)``, ``u_A = x_A``; log-det 0.

    Args:
        mask: bool mask broadcastable to the event shape, ``True`` on the unchanged
            part (see :func:`alternating_mask`, :func:`checkerboard_mask`,
            :func:`channel_mask`).
        event_shape: ``(D,)`` or ``(C, H, W)``; defaults to ``mask.shape``.
        hidden: width of the conditioner (MLP units or conv channels).
        context_features: context width ``C`` (0: unconditional).
        depth: hidden layers of the MLP (vectors) or residual blocks of the conv net
            (images).
        activation: name from :data:`vaeflow.layers.ACTIVATIONS`.
        time_features: if > 0, read a time ``t`` from the first context column and embed
            it with :class:`TimeEmbedding` of this width.

    Shapes:
        ``forward(x (*, *event), context (*, C)) -> (u (*, *event), logabsdet (*))``.

    References:
        Dinh, Krueger & Bengio 2015, arXiv:1410.8516, section 3.
    """

    _params_per_feature = 1

    def _map(self, x_b: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor | None]:
        return (x_b - params if inverse else x_b + params), None


class AffineCoupling(_Coupling):
    """RealNVP affine coupling: ``u_B = x_B * exp(s) + t`` with ``(s, t) = net(x_A, c)``.

    The log-scale is soft-clipped, ``s = scale_bound * tanh(raw / scale_bound)``, so one
    layer can scale by at most ``exp(+-scale_bound)``. Forward log-det is ``sum_B s``.

    Args:
        mask: bool mask broadcastable to the event shape, ``True`` on the unchanged part.
        event_shape: ``(D,)`` or ``(C, H, W)``; defaults to ``mask.shape``.
        hidden: width of the conditioner (MLP units or conv channels).
        context_features: context width ``C`` (0: unconditional).
        depth: hidden layers of the MLP (vectors) or residual blocks of the conv net.
        activation: name from :data:`vaeflow.layers.ACTIVATIONS`.
        time_features: if > 0, time-conditioned: ``t`` = first context column, embedded
            with :class:`TimeEmbedding` of this width.
        scale_bound: bound of the soft clip (default 3).

    Shapes:
        ``forward(x (*, *event), context (*, C)) -> (u (*, *event), logabsdet (*))``.
        The conditioner's raw output stacks ``[raw_s, t]`` along the split dimension
        (features for vectors, channels for images).

    References:
        Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803, section 3.3-3.4.
    """

    _params_per_feature = 2

    def __init__(
        self,
        mask: Tensor,
        event_shape: Sequence[int] | int | None = None,
        hidden: int = 64,
        context_features: int = 0,
        depth: int = 2,
        activation: str = "relu",
        time_features: int = 0,
        scale_bound: float = 3.0,
    ) -> None:
        if not scale_bound > 0:
            raise ValueError(f"AffineCoupling: scale_bound must be > 0, got {scale_bound}")
        super().__init__(
            mask, event_shape, hidden, context_features, depth, activation, time_features
        )
        self.scale_bound = float(scale_bound)

    def log_scale(self, raw: Tensor) -> Tensor:
        """Soft clip ``raw -> bound * tanh(raw / bound)`` (identity near 0, ``|s| < bound``)."""
        return self.scale_bound * torch.tanh(raw / self.scale_bound)

    def _map(self, x_b: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor | None]:
        raw, shift = params.chunk(2, dim=self.dim)
        s = self.log_scale(raw)
        if inverse:
            return (x_b - shift) * torch.exp(-s), s
        return x_b * torch.exp(s) + shift, s


class DiagonalScaling(Transform):
    """Learned elementwise scaling ``u = x * exp(log_scale)`` (NICE's top layer ``S``).

    Additive couplings preserve volume; NICE ends with this diagonal scaling so the model
    can stretch dimensions (Dinh et al. 2015, section 3.3). Starts as the identity.

    Args:
        features: vector length ``D``.

    References:
        Dinh, Krueger & Bengio 2015, arXiv:1410.8516, section 3.3.
    """

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.log_scale = nn.Parameter(torch.zeros(features))

    def _ld(self, x: Tensor, lead: torch.Size, sign: float) -> Tensor:
        return (sign * self.log_scale.sum()).to(x.dtype).expand(lead)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, D) -> (*, D)``, log-det ``sum(log_scale)``."""
        lead, _ = self.check_input(x, context)
        return x * torch.exp(self.log_scale), self._ld(x, lead, 1.0)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(*, D) -> (*, D)``, log-det ``-sum(log_scale)``."""
        lead, _ = self.check_input(u, context, inverse=True)
        return u * torch.exp(-self.log_scale), self._ld(u, lead, -1.0)


# -- builders --------------------------------------------------------------------------


def _resolve_options(
    builder: str, options: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge ``options`` into ``defaults``; an unknown name is a TypeError naming it."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"{builder}: unknown option(s) {unknown}; valid options are {sorted(defaults)}"
        )
    return {**defaults, **options}


def _check_common(
    builder: str, num_layers: int, hidden: int, context_features: int, opts: dict[str, Any]
) -> int:
    """Validate the options every coupling builder shares; return ``time_features``."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{builder}: num_layers must be an int >= 1, got {num_layers!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{builder}: hidden must be an int >= 1, got {hidden!r}")
    if opts["activation"] not in ACTIVATIONS:
        raise ValueError(
            f"{builder}: option activation={opts['activation']!r} is not one of "
            f"{sorted(ACTIVATIONS)}"
        )
    if "scale_bound" in opts and not (
        isinstance(opts["scale_bound"], int | float) and opts["scale_bound"] > 0
    ):
        raise ValueError(f"{builder}: option scale_bound must be > 0, got {opts['scale_bound']!r}")
    if not isinstance(opts["time_conditioned"], bool):
        raise ValueError(f"{builder}: option time_conditioned must be a bool")
    tf = opts["time_features"]
    if not isinstance(tf, int) or tf < 2 or tf % 2:
        raise ValueError(f"{builder}: option time_features must be an even int >= 2, got {tf!r}")
    if opts["time_conditioned"] and context_features < 1:
        raise ValueError(
            f"{builder}: option time_conditioned=True reads t from the first context column; "
            f"context_features must be >= 1 (got {context_features})"
        )
    return tf if opts["time_conditioned"] else 0


def _check_depth(builder: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{builder}: option {key} must be an int >= 0, got {value!r}")
    return value


_PERMUTATIONS = ("alternate", "reverse", "random", "lu")


def _build_vector(
    builder: str,
    coupling: type[_Coupling],
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int,
    options: Mapping[str, Any],
    extra_defaults: Mapping[str, Any],
) -> tuple[list[Transform], dict[str, Any]]:
    defaults = {
        "permutation": "lu",
        "num_hidden": 2,
        "activation": "relu",
        "time_conditioned": False,
        "time_features": 16,
        **extra_defaults,
    }
    opts = _resolve_options(builder, options, defaults)
    time_features = _check_common(builder, num_layers, hidden, context_features, opts)
    depth = _check_depth(builder, "num_hidden", opts["num_hidden"])
    if not isinstance(features, int) or features < 2:
        raise ValueError(f"{builder}: features must be an int >= 2, got {features!r}")
    perm = opts["permutation"]
    if perm not in _PERMUTATIONS:
        raise ValueError(f"{builder}: option permutation={perm!r} is not one of {_PERMUTATIONS}")
    extra = {"scale_bound": float(opts["scale_bound"])} if "scale_bound" in opts else {}

    layers: list[Transform] = []
    # origin[i] = which input feature sits at position i after the permutations so far;
    # used to pick mask parities that alternate in terms of the ORIGINAL features.
    origin = torch.arange(features)
    prev_b: set[int] = set()
    for k in range(num_layers):
        parity = k % 2
        if k > 0 and perm != "alternate":
            if perm == "lu":
                layers.append(LULinear(features))
            else:
                p: Permutation = (
                    ReversePermutation(features)
                    if perm == "reverse"
                    else RandomPermutation(features, seed=k)
                )
                layers.append(p)
                origin = origin[p.perm]
                # A fixed permutation can move the features just transformed onto the
                # positions the next mask would transform again (reverse with even D
                # does exactly that); take the parity that transforms the most new ones.
                overlaps = [
                    len(prev_b & set(origin[~alternating_mask(features, q)].tolist()))
                    for q in (0, 1)
                ]
                if overlaps[1 - parity] < overlaps[parity]:
                    parity = 1 - parity
        mask = alternating_mask(features, parity)
        prev_b = set(origin[~mask].tolist())
        layers.append(
            coupling(
                mask,
                hidden=hidden,
                context_features=context_features,
                depth=depth,
                activation=opts["activation"],
                time_features=time_features,
                **extra,
            )
        )
    if not torch.equal(origin, torch.arange(features)):
        # Undo the fixed permutations at the end: the flow then starts as the exact
        # identity (docs/design.md §3.5) and u_i stays aligned with x_i.
        layers.append(Permutation(torch.argsort(origin)))
    return layers, opts


def build_nice(
    features: int, num_layers: int, hidden: int, context_features: int = 0, **options: Any
) -> Transform:
    """NICE: additive couplings on alternating masks, then a diagonal scaling.

    Args:
        features: vector length ``D >= 2``.
        num_layers: number of coupling layers.
        hidden: MLP width of each conditioner.
        context_features: context width (0: unconditional).
        **options:
            permutation: ``"lu"`` (default; learned LU-linear mixing between couplings),
                ``"alternate"`` (only flip the mask parity), ``"reverse"`` or
                ``"random"`` (fixed permutations; mask parities chosen so successive
                couplings transform different original features, and a last
                permutation restores the input order so the flow starts as the identity).
            num_hidden: hidden layers per conditioner MLP (default 2).
            activation: conditioner activation (default ``"relu"``).
            scaling: end with :class:`DiagonalScaling` (default True, as in NICE).
            time_conditioned: read a time ``t`` from context column 0 (default False).
            time_features: width of the time embedding (default 16).

    Returns:
        A :class:`~vaeflow.flows.base.Composite` on ``(*, D)``, identity at init.

    References:
        Dinh, Krueger & Bengio 2015, arXiv:1410.8516.
    """
    layers, opts = _build_vector(
        "build_nice",
        AdditiveCoupling,
        features,
        num_layers,
        hidden,
        context_features,
        options,
        {"scaling": True},
    )
    if not isinstance(opts["scaling"], bool):
        raise ValueError("build_nice: option scaling must be a bool")
    if opts["scaling"]:
        layers.append(DiagonalScaling(features))
    return Composite(layers)


def build_realnvp(
    features: int, num_layers: int, hidden: int, context_features: int = 0, **options: Any
) -> Transform:
    """RealNVP on vectors: affine couplings on alternating masks with mixing in between.

    Args:
        features: vector length ``D >= 2``.
        num_layers: number of affine coupling layers.
        hidden: MLP width of each conditioner.
        context_features: context width (0: unconditional).
        **options:
            permutation: ``"lu"`` (default), ``"alternate"``, ``"reverse"`` or
                ``"random"`` (see :func:`build_nice`).
            num_hidden: hidden layers per conditioner MLP (default 2).
            scale_bound: soft bound of each log-scale (default 3.0).
            activation: conditioner activation (default ``"relu"``).
            time_conditioned: read a time ``t`` from context column 0 (default False).
            time_features: width of the time embedding (default 16).

    Returns:
        A :class:`~vaeflow.flows.base.Composite` on ``(*, D)``, identity at init.

    References:
        Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803.
    """
    layers, _ = _build_vector(
        "build_realnvp",
        AffineCoupling,
        features,
        num_layers,
        hidden,
        context_features,
        options,
        {"scale_bound": 3.0},
    )
    return Composite(layers)


def _image_shape(builder: str, features: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(int(f) for f in features)
    except TypeError:
        raise ValueError(f"{builder}: features must be an image shape (C, H, W)") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{builder}: features must be an image shape (C, H, W), got {features!r}")
    return shape  # type: ignore[return-value]


def _resolve_scales(builder: str, requested: Any, fits: int, what: str) -> int:
    """The number of scales: ``None`` -> ``min(2, fits)``; too many is a ValueError."""
    if requested is None:
        return min(2, fits)
    if not isinstance(requested, int) or requested < 1:
        raise ValueError(f"{builder}: option num_scales must be an int >= 1, got {requested!r}")
    if requested > fits:
        raise ValueError(f"{builder}: option num_scales={requested} does not fit: {what}")
    return requested
