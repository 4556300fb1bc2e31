"""Autoregressive flows: MADE, the affine autoregressive layer (MAF / IAF) and the gated IAF.

One class, two uses (MAF and, wrapped in ``Inverse``, IAF). An autoregressive layer computes the
parameters of feature ``i`` from the features that come before ``i`` in its order, so
one of its two directions is a single network pass and the other needs ``D`` passes:

* :class:`AffineAutoregressive` has the one-pass direction as ``forward`` (data ->
  noise): it is a MAF layer, cheap to score data with (flow priors, density models).
* ``Inverse(AffineAutoregressive(...))`` is an IAF layer: its ``inverse`` (noise ->
  data, the sampling direction a posterior needs) is that same single pass, and the
  log-determinant comes out of the pass that produced the sample.

:class:`GatedAutoregressive` is Kingma et al.'s LSTM-style update, with the same
convention: one-pass ``forward``, sequential ``inverse``; the IAF use is
``Inverse(GatedAutoregressive(...))``.

References:
    Germain et al. 2015, "MADE: Masked Autoencoder for Distribution Estimation",
    arXiv:1502.03509.
    Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
    Flow", arXiv:1606.04934.
    Papamakarios et al. 2017, "Masked Autoregressive Flow for Density Estimation",
    arXiv:1705.07057.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import IAFCodeLinear, MaskedLinear, data_init_active, make_activation, zero_init
from .base import (
    Composite,
    Inverse,
    Permutation,
    RandomPermutation,
    ReversePermutation,
    Transform,
)
from .conv_autoregressive import channel_ar_mask

__all__ = [
    "MADE",
    "AffineAutoregressive",
    "GatedAutoregressive",
    "make_order",
    "make_permutation",
    "undo_permutations",
    "soft_clip",
    "build_maf",
    "build_iaf",
    "build_gated_iaf",
]

ORDERS = ("natural", "random")
PERMUTATIONS = ("reverse", "random", "none", "reverse_every_other")
#: MADE styles: vaeflow's (degrees, context before the first activation, zero output
#: layer) and the MADE of van den Berg et al.'s released code (see :class:`MADE`)
MADE_STYLES = ("vaeflow", "sylvester_code")


def soft_clip(s: Tensor, bound: float | None) -> Tensor:
    """Smoothly squash ``s`` into ``(-bound, bound)``: ``bound * tanh(s / bound)``.

    Near zero it is the identity (slope 1), so a zero-initialised conditioner still gives
    an exactly zero log-scale; far away it saturates, so scales can never explode.
    ``bound=None`` disables the clip.
    """
    if bound is None:
        return s
    return bound * torch.tanh(s / bound)


def make_order(features: int, order: str | Tensor = "natural", seed: int = 0) -> Tensor:
    """The autoregressive order as ranks: feature ``d`` is the ``order[d]``-th to be generated.

    Args:
        features: number of features ``D``.
        order: ``"natural"`` (``0, 1, ..., D-1``), ``"random"`` (a permutation drawn from
            ``seed``) or an explicit permutation of ``range(D)``.
        seed: seed of the random order.

    Returns:
        A long tensor ``(D,)``, a permutation of ``range(D)``. Output ``i`` of a MADE with
        this order may depend on input ``j`` only if ``order[j] < order[i]``.
    """
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(features)
        if order == "random":
            return torch.randperm(features, generator=torch.Generator().manual_seed(seed))
        raise ValueError(f"order must be one of {ORDERS} or a permutation tensor, got {order!r}")
    ranks = torch.as_tensor(order, dtype=torch.long).reshape(-1)
    if ranks.numel() != features or not torch.equal(ranks.sort().values, torch.arange(features)):
        raise ValueError(f"order must be a permutation of range({features}), got {ranks.tolist()}")
    return ranks.clone()


class MADE(nn.Module):
    """Masked autoencoder: ``(*, D) -> (*, D, P)`` with output ``i`` a function of ``x_<i``.

    Every unit gets a degree. Inputs have degree ``order[d] + 1`` (1..D); a hidden unit
    sees the units below it of degree ``<=`` its own, and output ``i`` sees the hidden
    units of degree strictly ``<`` its input degree. Hence ``out[..., i, :]`` depends
    only on the inputs ``j`` with ``order[j] < order[i]``. Hidden degrees cycle
    deterministically (the paper draws them at random; a cycle guarantees that every
    degree is present whenever ``hidden`` is at least the number of degrees, so no
    allowed connection is silently lost) through ``1..D-1`` without context, and through
    ``0..D-1`` with context: degree-0 units see no input but do see the context, and
    they are the only hidden units the first feature in the order may use. Without them
    (as in a plain conditional MADE) the first feature's parameters would be constants
    that ignore the context.

    A context ``(*, C)`` enters through an *unmasked* linear map added to the first
    hidden pre-activation (Kingma et al. 2016, section 4). Context
    is not one of the autoregressive variables, so every output may depend on it
    without breaking the triangular structure.

    Args:
        features: ``D``.
        params_per_feature: ``P``, the number of outputs per feature.
        hidden: width of each hidden layer.
        num_hidden: number of hidden layers (0: one masked linear map ``x -> out``,
            with the context added to the output directly).
        context_features: ``C`` (0: no context).
        order: ``"natural"``, ``"random"`` or an explicit permutation (see
            :func:`make_order`).
        seed: seed of a random order.
        activation: hidden non-linearity (a name in :data:`vaeflow.layers.ACTIVATIONS`).
        zero_last: zero-initialise the output layer (and with ``num_hidden=0`` also the
            context map) so every output is exactly 0 at init.
        style: ``"vaeflow"`` (the above) or ``"sylvester_code"``, the MADE of van den
            Berg et al.'s IAF baseline: block masks (their ``MaskedLinear.build_mask``,
            :func:`~vaeflow.flows.conv_autoregressive.channel_ar_mask`; natural order
            only; at least one hidden layer), the context vector itself (no
            per-layer map: ``context_features`` must equal ``hidden``; the code projects
            it once, shared by every step, which is the posterior's context projection
            here) added *after* the first activation, and every masked weight drawn from
            ``N(0, 2 / fan_out)`` with zero biases (their ``kaiming_normal`` on an
            ``(in, out)`` weight takes its fan from the outputs; the output layer's fan is
            ``D``, as the code's separate mean and gate layers), so the layer does not
            start at a fixed point. ``zero_last`` is ignored.
        weight_norm: ``False`` (plain masked layers) or ``"iaf_code"``: every layer (the
            masked ones and the context map) weight-normalised as the IAF code's dense
            layer (:class:`~vaeflow.layers.IAFCodeLinear`, the mask applied before the
            norm) and initialised from data by the model's init pass: hidden layers to
            unit scale (the code's autoregressive layers), the output layer and the
            context map to 0.1 (the scale at which the code's IAF update starts: it
            multiplies its autoregressive outputs by 0.1, as its posterior's context
            comes out of a 0.1-scale layer). ``zero_last`` is ignored. Kingma et al.
            2016, appendix B: "The whole network is parametrized according to Weight
            Normalization ... and data-dependent initialization is used".
        output_scale: a constant factor on the outputs (default 1). The IAF code computes
            its update from ``0.1 *`` the autoregressive outputs (``z = (z - 0.1 m) /
            exp(0.1 s)``); with ``weight_norm = "iaf_code"`` the output layer's data init
            then targets ``0.1 / output_scale``, so the start is the same for any value,
            but the training dynamics are not: under Adam-type optimisers every parameter
            moves by about the learning rate per step, so the constant sets how fast the
            outputs move (``output_scale = 0.1`` is the code's parametrisation; 1 puts
            the 0.1 into the learned gain, whose output moves ten times faster).

    References:
        Germain et al. 2015, arXiv:1502.03509 (masks and degrees).
        Kingma et al. 2016, arXiv:1606.04934 (context in the autoregressive network).
    """

    def __init__(
        self,
        features: int,
        params_per_feature: int,
        hidden: int = 64,
        num_hidden: int = 2,
        context_features: int = 0,
        order: str | Tensor = "natural",
        seed: int = 0,
        activation: str = "relu",
        zero_last: bool = True,
        style: str = "vaeflow",
        weight_norm: bool | str = False,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if style not in MADE_STYLES:
            raise ValueError(f"MADE style {style!r} is not one of {MADE_STYLES}")
        if weight_norm not in (False, "iaf_code"):
            raise ValueError(
                f"MADE weight_norm must be false or 'iaf_code', got {weight_norm!r} (torch's "
                "weight norm would normalise the unmasked weight)"
            )
        if weight_norm and style != "vaeflow":
            raise ValueError("MADE weight_norm = 'iaf_code' is for the 'vaeflow' style")
        self.weight_norm = weight_norm
        if not output_scale > 0:
            raise ValueError(f"MADE output_scale must be > 0, got {output_scale}")
        if output_scale != 1.0 and style != "vaeflow":
            raise ValueError("MADE output_scale is for the 'vaeflow' style")
        self.output_scale = float(output_scale)
        if features < 1 or params_per_feature < 1:
            raise ValueError(
                f"MADE needs features >= 1 and params_per_feature >= 1, "
                f"got {features} and {params_per_feature}"
            )
        if num_hidden < 0 or (num_hidden > 0 and hidden < 1):
            raise ValueError(f"MADE: bad hidden={hidden} / num_hidden={num_hidden}")
        self.features = features
        self.params_per_feature = params_per_feature
        self.context_features = context_features
        ranks = make_order(features, order, seed)
        self.register_buffer("order", ranks)

        in_deg = ranks + 1
        if context_features:
            # Degree 0 carries the context to the first feature in the order.
            hid_deg = torch.arange(hidden) % features
        else:
            # 1..D-1 in a cycle (degree-0 units would only be constants); with D = 1 no
            # input can be used at all and every unit has degree 0.
            hid_deg = torch.arange(hidden) % max(features - 1, 1) + min(features - 1, 1)
        # Output unit (i, p) sits at index i * P + p, so a reshape gives (*, D, P).
        out_deg = in_deg.repeat_interleave(params_per_feature)

        layers: list[nn.Linear] = []
        self.style = style
        if style == "sylvester_code":
            self._check_sylvester_code(ranks, hidden, num_hidden, context_features)
            # The code's MaskedLinear.build_mask is the IAF code's get_linear_ar_mask (the
            # same block rule; between two hidden layers of one width it is unit-by-unit
            # lower-triangular, sparser than the degree rule). Output i reads x_<i only,
            # so the first feature's parameters are constants.
            width = features
            for _ in range(num_hidden):
                mask = channel_ar_mask(width, hidden, zero_diagonal=False)
                layers.append(MaskedLinear(width, hidden, mask))
                width = hidden
            # One (hidden -> D) mask per parameter, interleaved as output index i * P + p.
            out_mask = channel_ar_mask(hidden, features, zero_diagonal=True)
            out_mask = out_mask.repeat_interleave(params_per_feature, dim=0)
            self.out = MaskedLinear(hidden, features * params_per_feature, out_mask)
        else:

            def masked(n_in: int, n_out: int, mask: Tensor, scale: float) -> nn.Linear:
                if weight_norm:
                    return IAFCodeLinear(n_in, n_out, init_scale=scale, mask=mask)
                return MaskedLinear(n_in, n_out, mask)

            prev = in_deg
            for _ in range(num_hidden):
                mask = (hid_deg[:, None] >= prev[None, :]).to(torch.get_default_dtype())
                layers.append(masked(prev.numel(), hidden, mask, 1.0))
                prev = hid_deg
            out_mask = (out_deg[:, None] > prev[None, :]).to(torch.get_default_dtype())
            # The data init puts the outputs (after the constant factor) at scale 0.1.
            out_scale = 0.1 / self.output_scale
            self.out = masked(prev.numel(), features * params_per_feature, out_mask, out_scale)
        self.hidden_layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(make_activation(activation) for _ in layers)
        first_width = hidden if num_hidden > 0 else features * params_per_feature
        # The Sylvester code adds the (already projected) context after the first
        # activation; vaeflow maps it per layer and adds it before.
        self.context_after_activation = style == "sylvester_code"
        self.context_identity = style == "sylvester_code" and context_features > 0
        if not context_features or self.context_identity:
            self.context: nn.Linear | None = None
        elif weight_norm:
            self.context = IAFCodeLinear(context_features, first_width, init_scale=0.1)
        else:
            self.context = nn.Linear(context_features, first_width)
        if style == "sylvester_code":
            # The code's output is two (hidden -> D) layers (mean, gate), each with fan D:
            # one layer of 2 D outputs here must not halve their variance.
            fans = [layer.out_features for layer in layers] + [features]
            with torch.no_grad():
                for layer, fan in zip([*layers, self.out], fans, strict=True):
                    layer.weight.normal_(0.0, (2.0 / fan) ** 0.5)
                    layer.bias.zero_()
        elif zero_last and not weight_norm:
            zero_init(self.out)
            if num_hidden == 0 and self.context is not None:
                zero_init(self.context)

    @staticmethod
    def _check_sylvester_code(
        ranks: Tensor, hidden: int, num_hidden: int, context_features: int
    ) -> None:
        if not torch.equal(ranks, torch.arange(ranks.numel())):
            raise ValueError(
                "MADE style 'sylvester_code' has the code's natural order only; put "
                "permutations between layers instead (e.g. permutation = "
                "'reverse_every_other')"
            )
        if num_hidden < 1:
            raise ValueError("MADE style 'sylvester_code' needs num_hidden >= 1")
        if context_features and context_features != hidden:
            raise ValueError(
                f"MADE style 'sylvester_code' adds the context vector itself to the first "
                f"hidden layer, so context_features ({context_features}) must equal hidden "
                f"({hidden}): give the posterior context_features = {hidden} with its "
                f"context projection on (the code's one shared Linear of the encoder output)"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x (*, D)``, ``context (*, C)`` (same leading dims) ``-> (*, D, P)``."""
        if self.weight_norm and data_init_active():
            return self._init_pass(x, context)
        return self._pass(x, *self._frozen(context))

    def _init_pass(self, x: Tensor, context: Tensor | None) -> Tensor:
        """The data-dependent init (``weight_norm = "iaf_code"``): :meth:`_pass` with each
        layer called as a module, so that it sets its gain and bias from what it sees."""
        h = x
        ctx = None if self.context is None else self.context(context)
        for i, (layer, act) in enumerate(zip(self.hidden_layers, self.activations, strict=True)):
            h = layer(h)
            if i == 0 and ctx is not None:
                h = h + ctx
            h = act(h)
        out = self.out(h)
        if not self.hidden_layers and ctx is not None:
            out = out + ctx
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.reshape(*x.shape[:-1], self.features, self.params_per_feature)

    def conditioner(self, context: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """This MADE as a function of ``x`` alone, for one fixed ``context``.

        The masked weights and the context's contribution are computed here, once: a
        sequential inversion calls the result ``D`` times, and recomputing them on every
        pass would be four extra kernels per pass (``D = 784`` passes per MAF layer).
        The returned function computes exactly what :meth:`forward` computes (outside the
        data-dependent init pass, which only :meth:`forward` performs).
        """
        frozen = self._frozen(context)
        return lambda x: self._pass(x, *frozen)

    def _frozen(
        self, context: Tensor | None
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor, Tensor | None]:
        """Masked weights with biases, the output layer's, and the context projection."""
        weights = [(layer.masked_weight(), layer.bias) for layer in self.hidden_layers]
        if self.context_identity:
            ctx = context
        else:
            ctx = None if self.context is None else self.context(context)
        return weights, self.out.masked_weight(), self.out.bias, ctx

    def _pass(
        self,
        x: Tensor,
        weights: list[tuple[Tensor, Tensor]],
        out_w: Tensor,
        out_b: Tensor,
        ctx: Tensor | None,
    ) -> Tensor:
        """One network pass. The masked layers are applied with ``F.linear``, not called
        as modules (no per-call module overhead on this hot path; their hooks don't fire).
        The context projection ``(*c, H)`` is added with broadcasting."""
        h = x
        after = self.context_after_activation
        for i, ((w, b), act) in enumerate(zip(weights, self.activations, strict=True)):
            h = F.linear(h, w, b)
            if i == 0 and ctx is not None and not after:
                h = h + ctx
            h = act(h)
            if i == 0 and ctx is not None and after:
                h = h + ctx
        out = F.linear(h, out_w, out_b)
        if not weights and ctx is not None:
            out = out + ctx
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.reshape(*x.shape[:-1], self.features, self.params_per_feature)


class _Autoregressive(Transform):
    """Shared machinery: a MADE conditioner and the sequential inversion loop."""

    params_per_feature: int
    # The MADE adds its context projection with broadcasting (see Transform).
    broadcasts_context = True

    def __init__(
        self,
        features: int,
        *,
        hidden: int,
        num_hidden: int,
        context_features: int,
        order: str | Tensor,
        seed: int,
        activation: str,
        made_style: str = "vaeflow",
        weight_norm: bool | str = False,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__(features, context_features)
        self.features = features
        self.made = MADE(
            features,
            self.params_per_feature,
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            order=order,
            seed=seed,
            activation=activation,
            zero_last=True,
            style=made_style,
            weight_norm=weight_norm,
            output_scale=output_scale,
        )

    @property
    def order(self) -> Tensor:
        """Ranks ``(D,)`` of the features in the autoregressive order."""
        return self.made.order

    def _sequential_inverse(
        self,
        u: Tensor,
        context: Tensor | None,
        invert: Callable[[Tensor, Tensor], Tensor],
        logdet: Callable[[Tensor, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Invert by ``D`` passes: ``invert(u, params) -> x`` per pass, then the per-feature
        log-det ``logdet(u, params) -> (*, D)`` once, from the last pass's parameters."""
        # Pass t recomputes every feature from the current guess; features of rank < t
        # are already exact before pass t, so after pass t ranks <= t are exact, and after
        # D passes all are. The parameters of the last pass were computed from an x exact
        # at ranks <= D-2, which is all the last feature depends on, so the log-det from
        # them is exact too. Cost: D network passes (masked weights and the context term
        # computed once, the log-det only at the end).
        if self.made.weight_norm and data_init_active():
            raise RuntimeError(
                "the data-dependent init of a weight-normalised MADE runs in its one-pass "
                "direction only (IAF sampling, MAF density); this model inverts it "
                "sequentially (see vaeflow.models.build: the option is refused there)"
            )
        made = self.made.conditioner(context)
        x = torch.zeros_like(u)
        params = made(x)
        for _ in range(self.features - 1):
            x = invert(u, params)
            params = made(x)
        return invert(u, params), logdet(u, params)


class AffineAutoregressive(_Autoregressive):
    """Affine autoregressive layer: MAF as it stands, IAF when wrapped in ``Inverse``.

    ``forward`` (data -> noise, one network pass)::

        (m, s_raw) = MADE(x, context),   s = b * tanh(s_raw / b)
        u_i = (x_i - m_i(x_<i)) * exp(-s_i(x_<i)),   log|det du/dx| = -sum_i s_i

    ``inverse`` (noise -> data) solves ``x_i = u_i * exp(s_i) + m_i`` in ``D`` sequential
    network passes, with ``log|det dx/du| = +sum_i s_i``.

    The MADE output layer is zero at init, so ``m = s = 0`` and the layer is exactly the
    identity (not under ``weight_norm = "iaf_code"``, see below). The soft clip
    ``b * tanh(s / b)`` bounds every per-feature scale to ``(e^-b, e^b)``.

    ``Inverse(AffineAutoregressive(...))`` is the IAF of Kingma et al. 2016: its
    ``inverse`` (the sampling direction) is this class's one-pass ``forward`` applied to
    the noise, ``z = eps * exp(-s(eps)) - m(eps) * exp(-s(eps))``, which is the paper's
    ``z = mu(eps) + sigma(eps) * eps`` with ``sigma = exp(-s)`` and ``mu = -m * sigma``.

    Args:
        features: ``D``.
        hidden: MADE hidden width.
        num_hidden: number of MADE hidden layers.
        context_features: ``C`` (0: unconditional).
        order: ``"natural"``, ``"random"`` or an explicit permutation (ranks).
        seed: seed of a random order.
        scale_bound: ``b`` of the soft clip (``None``: unbounded).
        activation: MADE non-linearity.
        weight_norm: the MADE's (:class:`MADE`): ``False`` or ``"iaf_code"`` (then the
            layer is not the identity at init: the model's data-dependent init pass sets
            its scales, through the one-pass direction only: :meth:`forward`, i.e. IAF
            sampling and MAF density).
        output_scale: the MADE's constant factor on its outputs (:class:`MADE`; the IAF
            code's 0.1).

    References:
        Papamakarios et al. 2017, arXiv:1705.07057, section 3 (MAF).
        Kingma et al. 2016, arXiv:1606.04934 (IAF = the inverse of this layer).
    """

    params_per_feature = 2

    def __init__(
        self,
        features: int,
        *,
        hidden: int = 64,
        num_hidden: int = 2,
        context_features: int = 0,
        order: str | Tensor = "natural",
        seed: int = 0,
        scale_bound: float | None = 5.0,
        activation: str = "relu",
        weight_norm: bool | str = False,
        output_scale: float = 1.0,
    ) -> None:
        if scale_bound is not None and not scale_bound > 0:
            raise ValueError(f"scale_bound must be > 0 or None, got {scale_bound}")
        super().__init__(
            features,
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            order=order,
            seed=seed,
            activation=activation,
            weight_norm=weight_norm,
            output_scale=output_scale,
        )
        self.scale_bound = scale_bound

    def _shift_logscale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        m, raw = params.unbind(-1)
        return m, soft_clip(raw, self.scale_bound)

    splits_logdet = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise in one pass: ``x (*, D) -> u (*, D)``, ``log|det du/dx| (*)``."""
        u, neg_s = self.forward_dims(x, context)
        return u, neg_s.sum(-1)

    def forward_dims(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with the per-feature log-det ``-s (*, D)``."""
        _, context = self.check_input(x, context)
        # The hot path of MAF density and IAF sampling, written for few kernels: one
        # unbind (backward: one stack, where two selects cost two zeros + copies) and
        # the negation folded into the clip, -b tanh(r / b) = (-b) tanh(r / b), which is
        # bit-identical to negating soft_clip's output.
        m, raw = self.made(x, context).unbind(-1)
        b = self.scale_bound
        neg_s = -raw if b is None else torch.tanh(raw / b) * (-b)
        return (x - m) * torch.exp(neg_s), neg_s

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data in ``D`` sequential passes: ``u (*, D) -> x (*, D)``, log-det ``(*)``."""
        x, s = self.inverse_dims(u, context)
        return x, s.sum(-1)

    def inverse_dims(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` with the per-feature log-det ``s (*, D)``."""
        _, context = self.check_input(u, context, inverse=True)

        def invert(u: Tensor, params: Tensor) -> Tensor:
            m, s = self._shift_logscale(params)
            return torch.addcmul(m, u, torch.exp(s))

        def logdet(u: Tensor, params: Tensor) -> Tensor:
            return self._shift_logscale(params)[1]

        return self._sequential_inverse(u, context, invert, logdet)


class GatedAutoregressive(_Autoregressive):
    """Kingma et al.'s gated (LSTM-style) autoregressive update, one-pass as ``forward``.

    ``forward`` (one network pass)::

        (m, s_raw) = MADE(x, context),   sigma = sigmoid(b * tanh(s_raw / b) + forget_bias)
        y = sigma * x + (1 - sigma) * m,  log|det dy/dx| = sum_i log sigma_i

    ``inverse`` solves ``x = (y - (1 - sigma) * m) / sigma`` sequentially (``D`` passes).

    Used as ``Inverse(GatedAutoregressive(...))``, the sampling direction (its
    ``inverse``) is exactly the update of Kingma et al. 2016 (algorithm 1):
    ``z = sigma * eps + (1 - sigma) * m`` with ``m, sigma`` computed from ``eps``.

    Not the identity at init (a documented exception to docs/design.md §3.5): the
    MADE output is zero, so ``m = 0`` and ``sigma = sigmoid(forget_bias)``, i.e. the layer
    starts as the fixed scaling ``y = sigmoid(forget_bias) * x`` with log-det
    ``D * logsigmoid(forget_bias)``. Kingma et al. recommend a positive bias (+1 or +2)
    so that ``sigma`` starts near 1; the default 1.0 follows the reference IAF of
    van den Berg et al. 2018 (Sylvester flows); 2.0 starts closer to the identity
    (``sigmoid(2) = 0.88``).

    The gate pre-activation is soft-clipped like the affine layer's log-scale, so
    ``sigma`` stays in ``[sigmoid(forget_bias - b), sigmoid(forget_bias + b)]``: the
    paper's gate is bounded above by 1 but not away from 0, and a vanishing ``sigma``
    would make the inverse divide by zero.

    Args:
        features: ``D``.
        hidden: MADE hidden width.
        num_hidden: number of MADE hidden layers.
        context_features: ``C`` (0: unconditional).
        order: ``"natural"``, ``"random"`` or an explicit permutation (ranks).
        seed: seed of a random order.
        forget_bias: constant added to the gate pre-activation.
        scale_bound: ``b`` of the soft clip on the gate pre-activation (``None``: off).
        activation: MADE non-linearity.
        made_style: the MADE's style (:data:`MADE_STYLES`, see :class:`MADE`).

    References:
        Kingma et al. 2016, arXiv:1606.04934, section 4 and algorithm 1.
        van den Berg et al. 2018, "Sylvester Normalizing Flows", arXiv:1803.05649.
    """

    params_per_feature = 2

    def __init__(
        self,
        features: int,
        *,
        hidden: int = 64,
        num_hidden: int = 2,
        context_features: int = 0,
        order: str | Tensor = "natural",
        seed: int = 0,
        forget_bias: float = 1.0,
        scale_bound: float | None = 5.0,
        activation: str = "relu",
        made_style: str = "vaeflow",
    ) -> None:
        if scale_bound is not None and not scale_bound > 0:
            raise ValueError(f"scale_bound must be > 0 or None, got {scale_bound}")
        super().__init__(
            features,
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            order=order,
            seed=seed,
            activation=activation,
            made_style=made_style,
        )
        self.forget_bias = float(forget_bias)
        self.scale_bound = scale_bound

    def _mean_gate(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``m``, ``sigma`` and ``log sigma`` (via logsigmoid: no log(0))."""
        pre = soft_clip(params[..., 1], self.scale_bound) + self.forget_bias
        return params[..., 0], torch.sigmoid(pre), F.logsigmoid(pre)

    splits_logdet = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One pass: ``x (*, D) -> y (*, D)``, ``log|det dy/dx| (*)``."""
        y, log_sigma = self.forward_dims(x, context)
        return y, log_sigma.sum(-1)

    def forward_dims(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with the per-feature log-det ``log sigma (*, D)``."""
        _, context = self.check_input(x, context)
        m, sigma, log_sigma = self._mean_gate(self.made(x, context))
        return sigma * x + (1 - sigma) * m, log_sigma

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``D`` sequential passes: ``y (*, D) -> x (*, D)``, ``log|det dx/dy| (*)``."""
        x, ld = self.inverse_dims(u, context)
        return x, ld.sum(-1)

    def inverse_dims(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` with the per-feature log-det ``-log sigma (*, D)``."""
        _, context = self.check_input(u, context, inverse=True)

        def invert(y: Tensor, params: Tensor) -> Tensor:
            m, sigma, _ = self._mean_gate(params)
            return (y - (1 - sigma) * m) / sigma

        def logdet(y: Tensor, params: Tensor) -> Tensor:
            return -self._mean_gate(params)[2]

        return self._sequential_inverse(u, context, invert, logdet)


# -- builders ------------------------------------------------------------------------------


def _check_common(features: int, num_layers: int, hidden: int, context_features: int) -> None:
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"features must be a positive int, got {features!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    if context_features < 0:
        raise ValueError(f"context_features must be >= 0, got {context_features}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"option {name}={value!r} is not one of {choices}")


def make_permutation(kind: str, features: int, seed: int) -> Transform | None:
    """The feature permutation put between autoregressive layers (``None`` for ``"none"``)."""
    _check_choice("permutation", kind, PERMUTATIONS)
    if kind in ("reverse", "reverse_every_other"):
        return ReversePermutation(features)
    if kind == "random":
        return RandomPermutation(features, seed=seed)
    return None


def _stack(layer_fn, features: int, num_layers: int, permutation: str, seed: int) -> Composite:
    """``layer_0, perm, layer_1, ..., perm, layer_{n-1}[, undo]``.

    ``"reverse_every_other"`` reverses before layers 1, 3, 5, ... only (van den Berg et
    al.'s IAF: "reverse ordering" before every second step), so layers 1 and 2 share an
    order.

    Permutations go between layers. If they do not compose to the identity, a final
    fixed permutation puts every feature back in its original position, so that the
    whole stack is exactly the identity at init (docs/design.md §3.5) and output
    feature ``i`` of the flow corresponds to input feature ``i``.
    """
    layers: list[Transform] = []
    # where[p] = original index of the feature at position p after the permutations so far.
    where = torch.arange(features)
    for i in range(num_layers):
        if i > 0 and (permutation != "reverse_every_other" or i % 2 == 1):
            perm = make_permutation(permutation, features, seed + 1000 + i)
            if perm is not None:
                layers.append(perm)
                where = where[perm.perm]
        layers.append(layer_fn(i))
    return Composite(undo_permutations(layers, where))


def undo_permutations(layers: list[Transform], where: Tensor) -> list[Transform]:
    """Append the permutation that returns each feature to its original position, if needed.

    Args:
        layers: the layers built so far.
        where: ``(D,)``, original index of the feature at each position after ``layers``.
    """
    if not torch.equal(where, torch.arange(where.numel())):
        layers = [*layers, Permutation(torch.argsort(where))]
    return layers


def build_maf(
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    *,
    num_hidden: int = 2,
    order: str = "natural",
    permutation: str = "reverse",
    scale_bound: float | None = 5.0,
    activation: str = "relu",
    seed: int = 0,
    weight_norm: bool | str = False,
    output_scale: float = 1.0,
) -> Transform:
    """Masked autoregressive flow: a stack of :class:`AffineAutoregressive` layers.

    ``forward`` (density, data -> noise) is one MADE pass per layer; ``inverse``
    (sampling) costs ``D`` passes per layer.

    Args:
        features: ``D``.
        num_layers: number of autoregressive layers.
        hidden: MADE hidden width.
        context_features: ``C`` (0: unconditional).
        num_hidden: MADE hidden layers (default 2).
        order: ``"natural"`` (default) or ``"random"`` (layer ``i`` draws its order from
            ``seed + i``).
        permutation: between layers, ``"reverse"`` (default), ``"random"``, ``"none"`` or
            ``"reverse_every_other"`` (before layers 1, 3, ... only);
            a final fixed permutation undoes their composition, so feature ``i`` comes
            out at position ``i``.
        scale_bound: soft clip of the log-scales (default 5.0; ``None`` disables it).
        activation: MADE non-linearity (default ``"relu"``).
        seed: base seed for random orders and permutations.
        weight_norm: each MADE's (:class:`MADE`): ``False`` (default) or ``"iaf_code"``
            (the IAF code's dense weight norm, set up by the model's data-dependent init
            pass through the one-pass direction, here density: a MAF prior; the stack is
            then not the identity at init).
        output_scale: each MADE's constant factor on its outputs (default 1; the IAF
            code's 0.1: :class:`MADE`).

    Returns:
        A :class:`Composite`, exactly the identity at init (unless ``weight_norm``).

    References:
        Papamakarios et al. 2017, arXiv:1705.07057.
    """
    _check_common(features, num_layers, hidden, context_features)
    _check_choice("order", order, ORDERS)
    _check_choice("permutation", permutation, PERMUTATIONS)

    def layer(i: int) -> Transform:
        return AffineAutoregressive(
            features,
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            order=order,
            seed=seed + i,
            scale_bound=scale_bound,
            activation=activation,
            weight_norm=weight_norm,
            output_scale=output_scale,
        )

    return _stack(layer, features, num_layers, permutation, seed)


def build_iaf(
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    **options: object,
) -> Transform:
    """Inverse autoregressive flow: ``Inverse`` of a :func:`build_maf` stack.

    The sampling direction (``inverse``, noise -> data) is one MADE pass per layer, and
    its log-det comes from the same pass; ``forward`` (scoring a given ``z``) costs ``D``
    passes per layer. Same options as :func:`build_maf`: ``num_hidden``, ``order``,
    ``permutation``, ``scale_bound``, ``activation``, ``seed``, ``weight_norm``,
    ``output_scale``.

    Returns:
        An :class:`Inverse`, exactly the identity at init (unless ``weight_norm``).

    References:
        Kingma et al. 2016, arXiv:1606.04934.
    """
    return Inverse(build_maf(features, num_layers, hidden, context_features, **options))


def build_gated_iaf(
    features: int,
    num_layers: int,
    hidden: int,
    context_features: int = 0,
    *,
    num_hidden: int = 2,
    order: str = "natural",
    permutation: str = "reverse",
    forget_bias: float = 1.0,
    scale_bound: float | str | None = 5.0,
    activation: str = "relu",
    made: str = "vaeflow",
    seed: int = 0,
) -> Transform:
    """Gated IAF: ``Inverse`` of a stack of :class:`GatedAutoregressive` layers.

    The sampling direction (``inverse``) applies Kingma et al.'s update
    ``z = sigma * eps + (1 - sigma) * m`` layer by layer, one MADE pass each.
    Not the identity at init: it starts as the scaling ``sigmoid(forget_bias)^L``.

    Args:
        features: ``D``.
        num_layers: number of gated layers ``L``.
        hidden: MADE hidden width.
        context_features: ``C`` (0: unconditional).
        num_hidden: MADE hidden layers (default 2).
        order: ``"natural"`` (default) or ``"random"``.
        permutation: between layers, ``"reverse"`` (default), ``"random"``, ``"none"`` or
            ``"reverse_every_other"`` (before layers 1, 3, ... only);
            a final fixed permutation undoes their composition, so feature ``i`` comes
            out at position ``i``.
        forget_bias: gate bias (default 1.0, see :class:`GatedAutoregressive`).
        scale_bound: soft clip of the gate pre-activation (default 5.0; ``None`` or
            ``"none"`` (from a config file): off, the code's unbounded gate).
        activation: MADE non-linearity (default ``"relu"``).
        made: ``"vaeflow"`` (default) or ``"sylvester_code"``: van den Berg et al.'s
            MADE (block masks, the shared context added after the first activation,
            random output layers; see :class:`MADE`). Their full IAF baseline is
            ``made = "sylvester_code"``, ``permutation = "reverse_every_other"``,
            ``scale_bound = "none"``, ``forget_bias = 1``, ``activation = "elu"``,
            ``num_hidden = 2``, with the posterior's context projection to ``hidden``
            features.
        seed: base seed for random orders and permutations.

    References:
        Kingma et al. 2016, arXiv:1606.04934.
        van den Berg et al. 2018, arXiv:1803.05649 (the ``sylvester_code`` variant).
    """
    _check_common(features, num_layers, hidden, context_features)
    _check_choice("order", order, ORDERS)
    _check_choice("permutation", permutation, PERMUTATIONS)
    _check_choice("made", made, MADE_STYLES)
    if scale_bound == "none":
        scale_bound = None
    elif isinstance(scale_bound, str):
        raise ValueError(f"option scale_bound={scale_bound!r}: give a number > 0 or 'none'")

    def layer(i: int) -> Transform:
        return GatedAutoregressive(
            features,
            hidden=hidden,
            num_hidden=num_hidden,
            context_features=context_features,
            order=order,
            seed=seed + i,
            forget_bias=forget_bias,
            scale_bound=scale_bound,
            activation=activation,
            made_style=made,
        )

    return Inverse(_stack(layer, features, num_layers, permutation, seed))
