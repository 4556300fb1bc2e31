"""Top-down hierarchical VAEs with bidirectional inference (Kingma et al. 2016).

The "ResNet VAE with bidirectional inference" of Kingma et al. 2016 (arXiv:1606.04934,
section 6 and appendix C; the idea of Sønderby et al. 2016's Ladder VAE,
arXiv:1602.02282): ``L`` groups of latents ``z_1 ... z_L`` (``z_L`` at the top), with
the generative model and the inference model factorised in the *same* top-down order:

    p(x, z) = p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_{>1}) p(x | z)
    q(z | x) = q(z_L | x) q(z_{L-1} | x, z_L) ... q(z_1 | x, z_{>1})

A deterministic bottom-up pass over ``x`` (:meth:`TopDownVAE.encode`) stores each
layer's activations ``a_l``. The top-down pass starts from a learned input ``h_top``;
at each layer a top-down block reads the stream ``h`` and gives the prior
``p(z_l | z_{>l})`` (a diagonal Gaussian) and, with ``a_l``, the posterior
``q(z_l | x, z_{>l})``: a diagonal Gaussian, optionally followed by a flow (IAF)
conditioned on a context computed from both passes. The sample is merged back into the
stream (a residual update), and the stream after the bottom layer is decoded into the
likelihood's parameters. The prior and posterior share the top-down computation, so the
posterior of every layer sees the samples of all layers above it.

Shapes, samples first (docs/design.md §3.2): ``encode`` runs once per batch and gives
``a_l (B, ...)``; ``n`` posterior samples per example run the top-down pass on
``(n * B, ...)`` rows, ordered sample-major (row ``i * B + b`` is sample ``i`` of example
``b``), so a reshape gives ``(n, B, ...)``. Each group's latent ``z_l`` has a per-example
shape (``(Z, H_l, W_l)`` in the convolutional model, ``(D_l,)`` in a vector one); its
terms are flattened (channel-major) to ``(n, B, D_l)`` and concatenated bottom group
first, as :class:`~vaeflow.models.hierarchy.BottomUpVAE` does (docs/design.md §4).

Every layer's maps (``up``, ``prior``, ``posterior``, ``merge``) are separate modules with
small documented contracts, so a test can swap in linear maps and compare the bounds with
a closed form (``tests/test_topdown.py``); :func:`resnet_topdown_layers` builds the
paper's convolutional ones.

References:
    Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
    Flow", arXiv:1606.04934, sec. 6, appendix C (ResNet VAE, bidirectional inference);
    the authors' code github.com/openai/iaf, ``tf_train.py`` (``IAFLayer``, ``CVAE1``).
    Sønderby et al. 2016, "Ladder Variational Autoencoders", arXiv:1602.02282.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..flows.base import Transform
from ..layers import (
    data_init_active,
    make_activation,
    wn_conv,
)
from .bounds import Terms
from .posteriors import LOG_STD_BOUND, PosteriorSample
from .priors import diag_normal_log_prob_dims
from .vae import ImportanceSampled

__all__ = [
    "TopDownVAE",
    "TopDownLayer",
    "GroupSample",
    "ConvUp",
    "ConvPrior",
    "ConvPosterior",
    "ConvMerge",
    "LearnedTop",
    "ConvStem",
    "ConvHead",
    "resnet_topdown_layers",
    "add_per_example",
    "soft_clip_log_std",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def soft_clip_log_std(raw: Tensor) -> Tensor:
    """``LOG_STD_BOUND * tanh(raw / LOG_STD_BOUND)``: the posteriors' guard on log sigma."""
    return LOG_STD_BOUND * torch.tanh(raw / LOG_STD_BOUND)


def add_per_example(t: Tensor, a: Tensor) -> Tensor:
    """``t (n * B, *s)`` (sample-major rows) plus ``a (B, *s)`` for each of the ``n``
    samples: ``(n * B, *s)``, without repeating ``a`` in memory."""
    return (t.unflatten(0, (-1, a.shape[0])) + a).flatten(0, 1)


# ----------------------------------------------------------------------------- layer


class TopDownLayer(nn.Module):
    """One stochastic layer (group) ``z_l`` of a :class:`TopDownVAE`: four swappable maps
    and an optional posterior flow.

    Args:
        up: the bottom-up step ``u (B, *u_in) -> (u_next (B, *u_out), a (B, *a_shape))``;
            ``a`` are this layer's stored activations, read by ``posterior``.
        prior: ``h (N, *h_shape) -> (mu, log_std)``, each ``(N, *latent_shape)``:
            ``p(z_l | z_{>l})``.
        posterior: ``(h (N, *h_shape), a (B, *a_shape)) -> (mu, log_std, context)``
            with ``N = n * B`` sample-major rows (``a`` is added per example, see
            :func:`add_per_example`): the Gaussian base of ``q(z_l | x, z_{>l})``, each
            ``(N, *latent_shape)``, and the flow's context ``(N, C, *spatial)`` (``None``
            without a flow).
        merge: ``(h (N, *h_shape), z (N, *latent_shape)) -> h_next (N, *h_next_shape)``:
            the sample merged into the top-down stream (for the layer below, or the head).
        latent_shape: per-example shape of ``z_l``: ``(Z, H, W)`` or ``(D,)``.
        flow: a :class:`~vaeflow.flows.base.Transform` with a sampling direction, or
            ``None`` for a diagonal Gaussian posterior. Either an image flow on the whole
            group, ``event_shape == latent_shape`` (the paper's convolutional IAF,
            ``conv_iaf``), given the context map ``(N, C, *spatial)`` itself (with a
            context it must take maps, ``takes_context_map``); or a vector flow on the
            ``Z`` channels, ``event_shape == (Z,)`` (e.g. ``iaf``), applied independently
            at every spatial position (channels last) with the context's channels there.
    """

    def __init__(
        self,
        up: nn.Module,
        prior: nn.Module,
        posterior: nn.Module,
        merge: nn.Module,
        latent_shape: Sequence[int],
        flow: Transform | None = None,
    ) -> None:
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if not self.latent_shape or min(self.latent_shape) < 1:
            raise ValueError(f"latent_shape must be non-empty and positive, got {latent_shape}")
        if flow is not None and flow.event_shape not in (self.latent_shape, self.latent_shape[:1]):
            raise ValueError(
                f"TopDownLayer: the flow acts on {flow.event_shape}, the latent is "
                f"{self.latent_shape} (a flow acts on all of it or on its "
                f"{self.latent_shape[0]} channels at every position)"
            )
        # (a vector latent (D,) takes a vector flow: the per-position path is the same map)
        self.flow_on_group = (
            flow is not None
            and len(self.latent_shape) > 1
            and flow.event_shape == self.latent_shape
        )
        if self.flow_on_group and flow.context_features and not flow.takes_context_map:
            raise ValueError(
                f"TopDownLayer: the image flow {type(flow).__name__} takes a context vector "
                "only, but a group's context is a feature map; use one that takes maps "
                "(conv_iaf) or no context"
            )
        self.up = up
        self.prior = prior
        self.posterior = posterior
        self.merge = merge
        self.flow = flow

    @property
    def latent_size(self) -> int:
        """``D_l``, the number of latent dimensions of this group."""
        return math.prod(self.latent_shape)

    @property
    def splits_log_q(self) -> bool:
        """Whether ``log q`` splits over the group's dimensions (no flow, or a flow with
        ``splits_logdet`` such as IAF)."""
        return self.flow is None or self.flow.splits_logdet

    def sample_posterior(
        self, h: Tensor, a: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        """One draw ``z ~ q(z_l | x, z_{>l})`` per row of ``h (N, *h_shape)``, scored.

        ``noise``: the standard normal draw ``(N, *latent_shape)`` that ``z`` is a function
        of (``None``: a fresh one), so that a test can differentiate ``z`` with respect to it.

        Returns ``z``, ``log q`` ``(N,)``, ``log q`` per dimension (``None`` when the flow's
        log-det does not split), ``log p(z | z_{>l})`` per dimension, the flow's log-det
        ``(N,)``, and the base's ``mu`` and ``log_std``; the others ``(N, *latent_shape)``.
        """
        mu, log_std, context = self.posterior(h, a)
        noise = torch.randn_like(mu) if noise is None else noise
        if data_init_active():
            # The IAF code's data-dependent init pass (tf_train.py, mode "init") draws the
            # base sample from the prior and scores it under the posterior.
            p_mu, p_log_std = self.prior(h)
            eps = p_mu + torch.exp(p_log_std) * noise
            log_q_dims: Tensor | None = diag_normal_log_prob_dims(eps, mu, log_std)
        else:
            eps = mu + torch.exp(log_std) * noise
            # log N(eps; mu, sigma) from the standardised noise (no (eps - mu) / sigma
            # round off)
            log_q_dims = -0.5 * noise * noise - log_std - _HALF_LOG_2PI
        z, ld = eps, eps.new_zeros(eps.shape[0])
        if self.flow_on_group:
            # An image flow on the whole group (N, Z, H, W), its context map as it is.
            if self.flow.splits_logdet:
                z, ld_dims = self.flow.inverse_dims(eps, context)
                log_q_dims = log_q_dims - ld_dims
                ld = ld_dims.flatten(1).sum(-1)
            else:
                z, ld = self.flow.inverse(eps, context)
                log_q = log_q_dims.flatten(1).sum(-1) - ld
                log_q_dims = None
        elif self.flow is not None:
            # A vector flow over the Z channels, run at every position: channels last,
            # (N, Z, H, W) -> (N, H, W, Z), its context alike (log q = log q0 - ld).
            ctx = None if context is None else context.movedim(1, -1)
            if self.flow.splits_logdet:
                z_last, ld_last = self.flow.inverse_dims(eps.movedim(1, -1), ctx)
                ld_dims = ld_last.movedim(-1, 1)
                log_q_dims = log_q_dims - ld_dims
                ld = ld_dims.flatten(1).sum(-1)
            else:
                z_last, ld_pos = self.flow.inverse(eps.movedim(1, -1), ctx)
                ld = ld_pos.reshape(ld_pos.shape[0], -1).sum(-1)
                log_q = log_q_dims.flatten(1).sum(-1) - ld
                log_q_dims = None
            z = z_last.movedim(-1, 1)
        if log_q_dims is not None:
            log_q = log_q_dims.flatten(1).sum(-1)
        p_mu, p_log_std = self.prior(h)
        log_p_dims = diag_normal_log_prob_dims(z, p_mu, p_log_std)
        return z, log_q, log_q_dims, log_p_dims, ld, mu, log_std

    def sample_prior(self, h: Tensor, temperature: float = 1.0) -> Tensor:
        """One draw ``z ~ p(z_l | z_{>l})`` per row of ``h``; ``temperature`` scales the
        noise (Kingma & Dhariwal 2018)."""
        mu, log_std = self.prior(h)
        return mu + temperature * torch.exp(log_std) * torch.randn_like(mu)


@dataclass(frozen=True)
class GroupSample:
    """One group's posterior draws, flattened channel-major, samples first.

    Attributes:
        z: ``(n, B, D_l)``.
        log_q: ``log q(z_l | x, z_{>l})`` ``(n, B)``.
        log_q_dims: its per-dimension terms ``(n, B, D_l)``, ``None`` when the flow's
            log-det does not split.
        log_p_dims: ``log p(z_l | z_{>l})`` per dimension ``(n, B, D_l)`` (the conditional
            priors are diagonal Gaussians: they always split).
        flow_logdet: ``log|det dz/d eps|`` ``(n, B)`` (zeros without a flow).
        mu: the Gaussian base's means ``(n, B, D_l)`` (they depend on the samples above).
        log_std: the base's log standard deviations ``(n, B, D_l)``.
    """

    z: Tensor
    log_q: Tensor
    log_q_dims: Tensor | None
    log_p_dims: Tensor
    flow_logdet: Tensor
    mu: Tensor
    log_std: Tensor

    @property
    def log_p(self) -> Tensor:
        """``log p(z_l | z_{>l})`` ``(n, B)``."""
        return self.log_p_dims.sum(-1)


# ----------------------------------------------------------------------------- model


class TopDownVAE(ImportanceSampled, nn.Module):
    """A hierarchical VAE whose inference runs top-down, sharing the generative pass
    (Kingma et al. 2016, "ResNet VAE with bidirectional inference").

    Args:
        stem: ``x (B, *x_shape) -> u_0 (B, *u_shape)``, the input of the bottom-up pass.
        layers: the stochastic layers, **bottom first** (``layers[0]`` holds ``z_1``,
            the one next to ``x``; ``layers[-1]`` holds ``z_L``). The bottom-up pass runs
            ``layers[0].up`` first, the top-down pass ``layers[-1]`` first.
        top: ``n -> h_top (n, *h_shape)``, the learned input of the top-down pass
            (:class:`LearnedTop`).
        head: ``h (N, *h_shape) -> params (N, *param_shape)``, the likelihood's parameters
            from the stream after the bottom layer.
        likelihood: ``likelihood(params).log_prob(x) -> (*)``.
        x_shape: shape of one example.

    ``latent_dims`` are the groups' sizes ``D_l`` bottom first, ``latent_dim`` their sum:
    the concatenated latent vector that ``Terms.kl_dims`` and :meth:`posterior_mean`
    describe (a group's dimensions flattened channel-major, so consecutive runs of
    ``H_l W_l`` dimensions are its feature maps: free bits with ``group_size = H W`` are
    the paper's free bits per feature map).

    References:
        Kingma et al. 2016, arXiv:1606.04934, sec. 6 and appendix C; Sønderby et al. 2016,
        arXiv:1602.02282.
    """

    def __init__(
        self,
        stem: nn.Module,
        layers: Sequence[TopDownLayer],
        top: nn.Module,
        head: nn.Module,
        likelihood: nn.Module,
        x_shape: Sequence[int],
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("TopDownVAE needs at least one stochastic layer")
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.top = top
        self.head = head
        self.likelihood = likelihood
        self.x_shape = tuple(int(s) for s in x_shape)
        self.latent_dims = tuple(layer.latent_size for layer in layers)
        self.latent_dim = sum(self.latent_dims)

    @property
    def num_layers(self) -> int:
        """Number of stochastic layers (groups) ``L``."""
        return len(self.layers)

    # -------------------------------------------------------------- the two passes

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        """The bottom-up pass: each layer's activations ``a_l (B, ...)``, bottom first."""
        self._check_x(x)
        u = self.stem(x)
        feats = []
        for layer in self.layers:
            u, a = layer.up(u)
            feats.append(a)
        return tuple(feats)

    def sample_posterior(
        self, feats: Sequence[Tensor], n: int = 1
    ) -> tuple[Tensor, list[GroupSample]]:
        """The top-down pass with posterior samples: ``n`` per example.

        Args:
            feats: :meth:`encode`'s activations, bottom first, each ``(B, ...)``.
            n: samples per example.

        Returns:
            The final stream ``h (n * B, *h_shape)`` (sample-major rows) and one
            :class:`GroupSample` per layer, **bottom first**.
        """
        if len(feats) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers' features, got {len(feats)}")
        b = feats[0].shape[0]
        h = self.top(n * b)
        groups: list[GroupSample] = []
        for layer, a in zip(reversed(self.layers), reversed(feats), strict=True):
            z, log_q, log_q_dims, log_p_dims, ld, mu, log_std = layer.sample_posterior(h, a)
            h = layer.merge(h, z)
            dims = None if log_q_dims is None else log_q_dims.reshape(n, b, -1)
            groups.append(
                GroupSample(
                    z.reshape(n, b, -1),
                    log_q.reshape(n, b),
                    dims,
                    log_p_dims.reshape(n, b, -1),
                    ld.reshape(n, b),
                    mu.reshape(n, b, -1),
                    log_std.reshape(n, b, -1),
                )
            )
        return h, groups[::-1]

    def _log_px_z(self, x: Tensor, h: Tensor, n: int) -> Tensor:
        """``log p(x | z)`` ``(n, B)`` from the final stream ``h (n * B, ...)``."""
        params = self.head(h)
        return self.likelihood(params.unflatten(0, (n, x.shape[0]))).log_prob(x)

    # -------------------------------------------------------------- Terms

    def terms_from_features(
        self, x: Tensor, feats: Sequence[Tensor], k: int = 1
    ) -> tuple[Terms, list[GroupSample]]:
        """Draw ``k`` posterior samples per example and score them.

        Returns :class:`~vaeflow.models.bounds.Terms` (each ``(K, B)``; ``log_pz``,
        ``log_qz`` and ``flow_logdet`` summed over the groups, ``layer_kl`` per group,
        bottom first) and the groups' samples. ``log_pz_dims``/``log_qz_dims``
        ``(K, B, sum D_l)`` exist when every group's ``log q`` splits (every conditional
        prior does), so free bits per group of dimensions work (docs/design.md §4).
        """
        h, groups = self.sample_posterior(feats, k)
        log_p = [g.log_p for g in groups]
        log_q = [g.log_q for g in groups]
        if all(g.log_q_dims is not None for g in groups):
            log_pz_dims = torch.cat([g.log_p_dims for g in groups], -1)
            log_qz_dims = torch.cat([g.log_q_dims for g in groups], -1)
        else:
            log_pz_dims = log_qz_dims = None
        terms = Terms.from_layers(
            self._log_px_z(x, h, k),
            log_p,
            log_q,
            log_pz_dims,
            log_qz_dims,
            [g.flow_logdet for g in groups],
        )
        return terms, groups

    def forward(self, x: Tensor, k: int = 1) -> Terms:
        """``x (B, *x_shape) -> Terms`` with ``(K, B)`` log-terms from ``k`` samples."""
        return self.terms_from_features(x, self.encode(x), k)[0]

    def log_terms_from_features(
        self, x: Tensor, h: Sequence[Tensor], n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``log p(x|z)``, ``log p(z)``, ``log q(z|x)`` (summed over groups) of ``n`` fresh
        samples, each ``(n, B)`` (the chunked estimator's terms: the top-down pass sees
        one chunk of ``n * B`` rows at a time, the bottom-up pass ran once)."""
        out, groups = self.sample_posterior(h, n)
        log_pz = sum(g.log_p for g in groups)
        log_qz = sum(g.log_q for g in groups)
        return self._log_px_z(x, out, n), log_pz, log_qz

    # -------------------------------------------------------------- generation

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` data samples ``(n, *x_shape)`` ancestrally from the generative model
        (``temperature`` scales the noise of every layer's prior)."""
        h = self.top(n)
        for layer in reversed(self.layers):
            h = layer.merge(h, layer.sample_prior(h, temperature))
        dist = self.likelihood(self.head(h))
        return dist.mean if mean else dist.sample()

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mean: bool = True) -> Tensor:
        """Reconstruct ``x (B, *x_shape)`` through one posterior sample of every group."""
        h, _ = self.sample_posterior(self.encode(x), 1)
        dist = self.likelihood(self.head(h))
        return dist.mean if mean else dist.sample()

    @torch.no_grad()
    def reconstruct_from_layer(self, x: Tensor, layer: int, mean: bool = True) -> Tensor:
        """What the groups from ``z_layer`` up encode: ``x (B, *x_shape) -> (B, *x_shape)``.

        The top-down pass takes posterior samples for the groups ``z_L ... z_layer`` and
        samples the groups below from their prior conditionals ``p(z_l | z_{>l})``
        (temperature 1), then decodes. ``layer = 1`` is :meth:`reconstruct`; the higher
        the layer, the less of ``x`` is kept. The same construction as
        :meth:`vaeflow.models.hierarchy.BottomUpVAE.reconstruct_from_layer`.
        """
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers} (bottom = 1), got {layer}")
        feats = self.encode(x)
        h = self.top(x.shape[0])
        for index in reversed(range(self.num_layers)):
            group = self.layers[index]
            if index + 1 >= layer:
                z = group.sample_posterior(h, feats[index])[0]
            else:
                z = group.sample_prior(h)
            h = group.merge(h, z)
        dist = self.likelihood(self.head(h))
        return dist.mean if mean else dist.sample()

    # -------------------------------------------------------------- what the loop logs

    @property
    def posterior(self) -> _JointPosterior:
        """``q(z | x)`` of all groups as one posterior over the concatenated latents:
        ``posterior.sample(encode(x), k)`` (the loop's latent statistics read it)."""
        return _JointPosterior(self)

    @property
    def kl_splits_over_dimensions(self) -> bool:
        """Whether ``Terms.kl_dims`` exists: every group's ``log q`` splits (the
        conditional priors always do)."""
        return all(layer.splits_log_q for layer in self.layers)

    @torch.no_grad()
    def posterior_mean(self, x: Tensor, samples: int = 32) -> tuple[Tensor, Tensor]:
        """``E_q[z | x]`` of the concatenated latents (bottom group first) and the variance
        of that estimate, each ``(B, sum D_l)``: a Monte Carlo mean of ``samples`` draws
        with its sampling variance ``Var_q[z] / samples`` (every group below the top
        depends on the samples above it)."""
        _, groups = self.sample_posterior(self.encode(x), samples)
        z = torch.cat([g.z for g in groups], -1)
        return z.mean(0), z.var(0) / samples


class _JointPosterior:
    """The posterior of a :class:`TopDownVAE` seen as one: ``sample(feats, k)`` gives a
    :class:`~vaeflow.models.posteriors.PosteriorSample` over the concatenated latents (its
    ``mu``/``log_std`` are the Gaussian bases' ``(K, B, D)``: they depend on the sample)."""

    def __init__(self, model: TopDownVAE) -> None:
        self.model = model
        self.latent_dim = model.latent_dim

    def sample(self, feats: Sequence[Tensor], k: int = 1) -> PosteriorSample:
        _, groups = self.model.sample_posterior(feats, k)

        def cat(name: str) -> Tensor:
            return torch.cat([getattr(g, name) for g in groups], -1)

        split = all(g.log_q_dims is not None for g in groups)
        return PosteriorSample(
            cat("z"),
            sum(g.log_q for g in groups),
            cat("log_q_dims") if split else None,
            sum(g.flow_logdet for g in groups),
            cat("mu"),
            cat("log_std"),
        )


# ----------------------------------------------------------------------------- ResNet blocks


def _conv(
    c_in: int, c_out: int, weight_norm: bool | str, kernel: int = 3, stride: int = 1
) -> nn.Module:
    """A conv of the ResNet blocks; ``weight_norm``: see :data:`~vaeflow.layers.WEIGHT_NORMS`."""
    return wn_conv(c_in, c_out, kernel, stride, weight_norm)


class ConvUp(nn.Module):
    """The bottom-up half of a ResNet VAE layer (the code's ``IAFLayer.up``):

        t = conv(act(u))  ->  (q_mean, q_log_std, q_context, r) ;  u' = u + s conv(act(r))

    ``a = (q_mean, q_log_std, q_context)`` is stored for the top-down pass (added to the
    top-down block's own posterior terms). With ``downsample`` the first conv has stride 2
    and ``u`` is subsampled (nearest) for the residual sum, halving the resolution.
    ``last``: the top layer, whose ``u'`` nobody reads (the top-down pass starts from the
    learned ``h_top``), computes only ``a`` and returns ``u'`` as ``u`` subsampled.

    Shapes: ``u (B, C, H, W) -> (u' (B, C, H', W'), a (B, 2 Z + C_ctx, H', W'))``.
    """

    def __init__(
        self,
        channels: int,
        latent_channels: int,
        context_channels: int,
        downsample: bool,
        activation: str,
        weight_norm: bool | str,
        residual_scale: float,
        last: bool = False,
    ) -> None:
        super().__init__()
        self.n_a = 2 * latent_channels + context_channels
        self.downsample = downsample
        self.residual_scale = residual_scale
        self.act = make_activation(activation)
        n_r = 0 if last else channels
        self.conv1 = _conv(channels, self.n_a + n_r, weight_norm, stride=2 if downsample else 1)
        self.conv2 = None if last else _conv(channels, channels, weight_norm)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        t = self.conv1(self.act(u))
        skip = u[:, :, ::2, ::2] if self.downsample else u
        if self.conv2 is None:
            return skip, t
        a, r = t.split([self.n_a, u.shape[1]], dim=1)
        return skip + self.residual_scale * self.conv2(self.act(r)), a


class ConvPrior(nn.Module):
    """``p(z_l | z_{>l}) = N(mu(h), sigma(h)^2)`` from one conv of ``act(h)`` (part of the
    code's ``down_conv1``). Shapes: ``h (N, C, H, W) -> 2 x (N, Z, H, W)``."""

    def __init__(
        self, channels: int, latent_channels: int, activation: str, weight_norm: bool | str
    ):
        super().__init__()
        self.act = make_activation(activation)
        self.conv = _conv(channels, 2 * latent_channels, weight_norm)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw = self.conv(self.act(h)).chunk(2, dim=1)
        return mu, soft_clip_log_std(raw)


class ConvPosterior(nn.Module):
    """The Gaussian base of ``q(z_l | x, z_{>l})`` and the flow's context: a conv of
    ``act(h)`` (the rest of the code's ``down_conv1``) plus the bottom-up ``a`` of the same
    layer, per example: ``mean = r_mean + q_mean``, ``log_std = r_log_std + q_log_std``,
    ``context = down_context + up_context`` (Kingma et al. 2016, appendix C; ``IAFLayer``).

    Shapes: ``h (n B, C, H, W)``, ``a (B, 2 Z + C_ctx, H, W) -> mu, log_std (n B, Z, H, W),
    context (n B, C_ctx, H, W)`` (``None`` when ``C_ctx = 0``).
    """

    def __init__(
        self,
        channels: int,
        latent_channels: int,
        context_channels: int,
        activation: str,
        weight_norm: bool | str,
    ) -> None:
        super().__init__()
        self.z = latent_channels
        self.c = context_channels
        self.act = make_activation(activation)
        self.conv = _conv(channels, 2 * latent_channels + context_channels, weight_norm)

    def forward(self, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        t = add_per_example(self.conv(self.act(h)), a)
        mu, raw, context = t.split([self.z, self.z, self.c], dim=1)
        return mu, soft_clip_log_std(raw), context if self.c else None


class ConvMerge(nn.Module):
    """The sample merged into the top-down stream (the code's ``down`` residual):

        h' = up(h) + s conv(up(act([z, conv(act(h))])))

    ``conv(act(h))`` is the code's deterministic ``h_det`` path beside the latent. With
    ``upsample`` (the layer that downsampled on the way up) the stream doubles its
    resolution: nearest upsampling followed by a 3x3 conv (the code uses a transposed
    conv; nearest + conv avoids checkerboard artefacts, as ``ResNetDecoder``).

    Shapes: ``h (N, C, H, W)``, ``z (N, Z, H, W) -> (N, C, H', W')``.
    """

    def __init__(
        self,
        channels: int,
        latent_channels: int,
        upsample: bool,
        activation: str,
        weight_norm: bool | str,
        residual_scale: float,
    ) -> None:
        super().__init__()
        self.act = make_activation(activation)
        self.det = _conv(channels, channels, weight_norm)
        self.out = _conv(channels + latent_channels, channels, weight_norm)
        self.upsample = upsample
        self.residual_scale = residual_scale

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        t = self.act(torch.cat([z, self.det(self.act(h))], dim=1))
        if self.upsample:
            h, t = _up2(h), _up2(t)
        return h + self.residual_scale * self.out(t)


def _up2(t: Tensor) -> Tensor:
    return nn.functional.interpolate(t, scale_factor=2, mode="nearest")


class LearnedTop(nn.Module):
    """The learned input of the top-down pass: a vector of ``channels`` (zeros at init, as
    the code's ``h_top``), the same at every position of a ``spatial`` map.

    Shapes: ``n -> (n, channels, *spatial)``.
    """

    def __init__(self, channels: int, spatial: Sequence[int] = ()) -> None:
        super().__init__()
        self.spatial = tuple(int(s) for s in spatial)
        self.h_top = nn.Parameter(torch.zeros(channels))

    def forward(self, n: int) -> Tensor:
        view = self.h_top.reshape(1, -1, *(1 for _ in self.spatial))
        return view.expand(n, -1, *self.spatial)


class ConvStem(nn.Module):
    """``x (B, C, H, W) -> (B, channels, H/2, W/2)``: a 5x5 stride-2 conv (the code's
    ``x_enc``); ``center`` maps inputs from [0, 1] to [-1, 1] first (see networks.py)."""

    def __init__(self, in_channels: int, channels: int, weight_norm: bool | str, center: bool):
        super().__init__()
        self.center = center
        self.conv = _conv(in_channels, channels, weight_norm, kernel=5, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(2 * x - 1 if self.center else x)


class ConvHead(nn.Module):
    """``h (N, channels, H/2, W/2) -> params (N, P, H, W)``: the activation and a 5x5
    stride-2 transposed conv (the code's ``x_dec``)."""

    def __init__(
        self, channels: int, param_channels: int, activation: str, weight_norm: bool | str
    ):
        super().__init__()
        self.act = make_activation(activation)
        self.deconv = wn_conv(
            channels, param_channels, 5, 2, weight_norm, transpose=True, output_padding=1
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.deconv(self.act(h))


def resnet_topdown_layers(
    channels: int,
    latent_channels: int,
    layers_per_resolution: Sequence[int],
    stem_size: tuple[int, int],
    make_flow: Callable[[tuple[int, int, int]], Transform | None],
    context_channels: int = 0,
    activation: str = "elu",
    weight_norm: bool | str = True,
    residual_scale: float = 0.1,
) -> list[TopDownLayer]:
    """The convolutional layers of the ResNet VAE, bottom first.

    ``layers_per_resolution[i]`` layers work at ``stem_size / 2^i``; the first layer of
    every resolution after the first downsamples on the way up (and upsamples on the way
    down), as the code's ``downsample = (i > 0) and (j == 0)``.

    Args:
        channels: width of both streams (the code's ``h_size``).
        latent_channels: ``Z`` latent feature maps per layer (``z_size``).
        layers_per_resolution: layers at each resolution, highest first (``depths``).
        stem_size: ``(H, W)`` after the stem.
        make_flow: ``(Z, H, W) ->`` a fresh posterior flow for the layer's latent (on the
            whole group or on its ``Z`` channels, see :class:`TopDownLayer`), or ``None``.
        context_channels: channels of the flow's context (0 without a flow).
        activation: of every block (the paper: ELU).
        weight_norm: weight-normalise every conv (the paper: yes): ``True`` (torch's),
            ``False`` or ``"iaf_code"`` (the authors' code's, with its data-dependent
            init: :class:`~vaeflow.layers.IAFCodeConv2d`).
        residual_scale: the residual branches' factor (the code: 0.1).
    """
    out: list[TopDownLayer] = []
    h, w = stem_size
    total = sum(layers_per_resolution)
    for i, depth in enumerate(layers_per_resolution):
        for j in range(depth):
            down = i > 0 and j == 0
            last = len(out) == total - 1
            if down:
                h, w = h // 2, w // 2
            out.append(
                TopDownLayer(
                    ConvUp(
                        channels,
                        latent_channels,
                        context_channels,
                        down,
                        activation,
                        weight_norm,
                        residual_scale,
                        last,
                    ),
                    ConvPrior(channels, latent_channels, activation, weight_norm),
                    ConvPosterior(
                        channels, latent_channels, context_channels, activation, weight_norm
                    ),
                    ConvMerge(
                        channels, latent_channels, down, activation, weight_norm, residual_scale
                    ),
                    (latent_channels, h, w),
                    make_flow((latent_channels, h, w)),
                )
            )
    return out
