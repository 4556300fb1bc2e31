"""Bottom-up hierarchical VAEs: ``x -> z_1 -> ... -> z_L`` (Burda et al. 2016).

Generative model and inference model of Burda et al. 2016 (arXiv:1509.00519, section 5,
the two-stochastic-layer architecture), with any registered prior at the top and any
registered posterior (a diagonal Gaussian, optionally followed by a flow) at each layer:

    p(x, z) = p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1)
    q(z | x) = q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})

Posterior samples are drawn ancestrally, samples first (docs/design.md §3.2): ``k``
samples ``z_1 (K, B, D_1) ~ q(z_1|x)``, then one ``z_2 (K, B, D_2) ~ q(z_2|z_1)`` per
``z_1`` sample, and so on. The model returns the same :class:`~vaeflow.models.bounds.Terms`
as :class:`~vaeflow.models.vae.VAE`, with ``log p(z)`` and ``log q(z|x)`` summed over
the layers, so the bounds, the training loop and the evaluation work unchanged
(docs/design.md §4); ``Terms.layer_kl`` adds each layer's KL for logging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers import halves, make_activation
from .bounds import Terms
from .posteriors import LOG_STD_BOUND, FlowPosterior, PosteriorSample
from .priors import diag_normal_log_prob_dims
from .vae import ImportanceSampled

__all__ = ["BottomUpVAE", "ConditionalGaussian", "deterministic_net"]


def deterministic_net(
    in_features: int, widths: Sequence[int], activation: str = "tanh"
) -> nn.Module:
    """The deterministic layers between two stochastic layers: ``Linear -> activation``
    for every width (Burda et al. 2016: two tanh layers of 100 units below ``z_1``, two of
    50 between ``z_1`` and ``z_2``). ``(*, in) -> (*, widths[-1])``; its ``out_features``
    is the width of the features a posterior or conditional head reads."""
    layers: list[nn.Module] = []
    width = in_features
    for w in widths:
        layers += [nn.Linear(width, int(w)), make_activation(activation)]
        width = int(w)
    net = nn.Sequential(*layers) if layers else nn.Identity()
    net.out_features = width
    return net


class ConditionalGaussian(nn.Module):
    """A generative layer ``p(z_{l-1} | z_l) = N(mu(h), diag sigma(h)^2)``, ``h = net(z_l)``.

    The log-std is soft-clipped as the posteriors' (``LOG_STD_BOUND``); the density is
    fully normalised (docs/design.md §3.4).

    Args:
        net: ``(*, D_l) -> (*, H)`` (e.g. :func:`deterministic_net`).
        in_features: ``H``, the width of ``net``'s output.
        out_dim: ``D_{l-1}``, the dimension of the layer below.
    """

    def __init__(self, net: nn.Module, in_features: int, out_dim: int) -> None:
        super().__init__()
        self.net = net
        self.out_dim = int(out_dim)
        self.head = nn.Linear(in_features, 2 * self.out_dim)

    def fused_parts(self) -> dict[nn.Parameter, tuple[int, int]]:
        """The head's mean and scale rows: two layers of the papers' code
        (:func:`vaeflow.layers.fused_parameters`)."""
        return halves(self.head.parameters())

    def params(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z (*, D_l) -> (mu (*, D_{l-1}), log_std (*, D_{l-1}))``."""
        mu, raw = self.head(self.net(z)).chunk(2, dim=-1)
        return mu, LOG_STD_BOUND * torch.tanh(raw / LOG_STD_BOUND)

    def log_prob_dims(self, y: Tensor, z: Tensor) -> Tensor:
        """Per-dimension ``log p(y_d | z)``: ``y (*, D_{l-1})``, ``z (*, D_l)``
        -> ``(*, D_{l-1})``."""
        mu, log_std = self.params(z)
        return diag_normal_log_prob_dims(y, mu, log_std)

    def log_prob(self, y: Tensor, z: Tensor) -> Tensor:
        """``log p(y | z)`` ``(*)``."""
        return self.log_prob_dims(y, z).sum(-1)

    def sample(self, z: Tensor, temperature: float = 1.0) -> Tensor:
        """One draw ``y ~ p(y | z)`` per ``z (*, D_l)``: ``(*, D_{l-1})``; ``temperature``
        scales the noise as in :meth:`vaeflow.models.priors.Prior.sample`."""
        mu, log_std = self.params(z)
        return mu + temperature * torch.exp(log_std) * torch.randn_like(mu)


def _check_layer(layer: int, num_layers: int) -> None:
    """``layer`` is a stochastic layer's 1-based index (bottom = 1), or a ValueError."""
    if not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be in 1..{num_layers} (bottom = 1), got {layer}")


def _sample_one_each(posterior: nn.Module, h: Tensor) -> PosteriorSample:
    """One posterior sample per row of features ``h (K, B, H)``: every field ``(K, B, ...)``.

    The posteriors draw ``k`` samples per example of a ``(B, H)`` batch; here the ``K x B``
    rows are the batch and one sample is drawn for each.
    """
    lead = h.shape[:-1]
    s = posterior.sample(h.reshape(-1, h.shape[-1]), 1)

    def back(t: Tensor | None, sample_dim: bool = True) -> Tensor | None:
        # (1, K*B, *rest) for the sampled fields, (K*B, *rest) for mu, log_std -> (K, B, *rest)
        if t is None:
            return None
        t = t[0] if sample_dim else t
        return t.reshape(*lead, *t.shape[1:])

    return PosteriorSample(
        back(s.z),
        back(s.log_q),
        back(s.log_q_dims),
        back(s.flow_logdet),
        back(s.mu, False),
        back(s.log_std, False),
    )


class BottomUpVAE(ImportanceSampled, nn.Module):
    """A VAE with ``L`` stochastic layers in one chain (Burda et al.'s bottom-up hierarchy):
    inference runs up ``x -> z_1 -> ... -> z_L``, generation down ``z_L -> ... -> z_1 -> x``.

    Args:
        encoders: ``L`` networks: ``encoders[0]`` maps ``x (B, *x_shape) -> h_1 (B, H_1)``,
            ``encoders[l]`` maps ``z_l (*, D_l) -> h_{l+1} (*, H_{l+1})``.
        posteriors: ``L`` posteriors (:class:`~vaeflow.models.posteriors.GaussianPosterior`
            or :class:`~vaeflow.models.posteriors.FlowPosterior`): ``posteriors[l]`` reads
            ``h_{l+1}`` and gives ``q(z_{l+1} | z_l)`` (``z_0 = x``), any flow conditioned on
            those features.
        conditionals: ``L - 1`` generative layers: ``conditionals[l]`` is
            ``p(z_{l+1} | z_{l+2})`` (:class:`ConditionalGaussian`), bottom first.
        prior: ``p(z_L)``, any registered prior (``log_prob``, ``log_prob_dims``, ``sample``).
        decoder: ``z_1 (*, D_1) -> params (*, *param_shape)``.
        likelihood: ``likelihood(params).log_prob(x) -> (*)``.
        x_shape: shape of one example.

    ``latent_dims`` are the layers' sizes ``(D_1, ..., D_L)``; ``latent_dim`` is their sum,
    the length of the concatenated latent vector that ``Terms.kl_dims`` and
    :meth:`posterior_mean` describe (so free bits with one group,
    ``group_size = latent_dim``, floor the total KL). ``posterior`` is the first layer's
    posterior and ``encode`` gives its features (the loop logs their statistics).

    With ``L = 1`` this is exactly :class:`~vaeflow.models.vae.VAE`.

    References:
        Burda et al. 2016, "Importance Weighted Autoencoders", arXiv:1509.00519, sec. 5;
        Rezende et al. 2014, arXiv:1401.4082 (stochastic layers).
    """

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        posteriors: Sequence[nn.Module],
        conditionals: Sequence[nn.Module],
        prior: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        x_shape: Sequence[int],
    ) -> None:
        super().__init__()
        n = len(posteriors)
        if n < 1 or len(encoders) != n or len(conditionals) != n - 1:
            raise ValueError(
                f"BottomUpVAE: need L >= 1 encoders and posteriors and L - 1 conditionals, "
                f"got {len(encoders)}, {n} and {len(conditionals)}"
            )
        dims = tuple(int(p.latent_dim) for p in posteriors)
        if prior.latent_dim != dims[-1]:
            raise ValueError(f"prior latent_dim {prior.latent_dim} != top layer's {dims[-1]}")
        for i, c in enumerate(conditionals):
            if c.out_dim != dims[i]:
                raise ValueError(
                    f"conditionals[{i}] gives {c.out_dim} dims, layer {i + 1} has {dims[i]}"
                )
        self.encoders = nn.ModuleList(encoders)
        self.posteriors = nn.ModuleList(posteriors)
        self.conditionals = nn.ModuleList(conditionals)
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood
        self.x_shape = tuple(int(s) for s in x_shape)
        self.latent_dims = dims
        self.latent_dim = sum(dims)

    @property
    def num_layers(self) -> int:
        """Number of stochastic layers ``L``."""
        return len(self.latent_dims)

    @property
    def posterior(self) -> nn.Module:
        """The first layer's posterior ``q(z_1 | x)`` (reads :meth:`encode`'s features)."""
        return self.posteriors[0]

    def encode(self, x: Tensor) -> Tensor:
        """First-layer features ``h_1 (B, H_1)`` for data ``x (B, *x_shape)``."""
        self._check_x(x)
        return self.encoders[0](x)

    def sample_posterior(self, h: Tensor, k: int = 1) -> list[PosteriorSample]:
        """Ancestral posterior samples from first-layer features ``h (B, H_1)``: one
        :class:`PosteriorSample` per layer, bottom first, ``z_l (K, B, D_l)``."""
        samples = [self.posteriors[0].sample(h, k)]
        for enc, post in zip(self.encoders[1:], self.posteriors[1:], strict=True):
            samples.append(_sample_one_each(post, enc(samples[-1].z)))
        return samples

    def _log_prior_dims(self, zs: Sequence[Tensor], dims: bool) -> list[Tensor | None]:
        """Per layer ``log p(z_l | z_{l+1})`` ``(K, B)`` (top: the prior), or with
        ``dims`` the per-dimension terms ``(K, B, D_l)`` (None where the prior does not
        factorise)."""
        out: list[Tensor | None] = []
        for z, above, cond in zip(zs[:-1], zs[1:], self.conditionals, strict=True):
            out.append(cond.log_prob_dims(z, above) if dims else cond.log_prob(z, above))
        out.append(self._prior_dims(self.prior, zs[-1]) if dims else self.prior.log_prob(zs[-1]))
        return out

    def terms_from_features(
        self, x: Tensor, h: Tensor, k: int = 1
    ) -> tuple[Terms, list[PosteriorSample]]:
        """Draw ``k`` ancestral posterior samples and score them.

        Returns :class:`~vaeflow.models.bounds.Terms` (each ``(K, B)``; ``log_pz``,
        ``log_qz`` and ``flow_logdet`` summed over layers, ``layer_kl`` per layer) and the
        per-layer posterior samples. ``log_pz_dims``/``log_qz_dims`` ``(K, B, sum D_l)``,
        concatenated bottom first, exist only when every layer's posterior splits over
        dimensions and the top prior factorises (the conditionals always do): per-group
        free bits then group the concatenated vector, never a mix of split and unsplit
        layers.
        """
        samples = self.sample_posterior(h, k)
        zs = [s.z for s in samples]
        q_split = all(s.log_q_dims is not None for s in samples)
        log_p_dims = self._log_prior_dims(zs, dims=True) if q_split else None
        if log_p_dims is not None and all(d is not None for d in log_p_dims):
            log_p = [d.sum(-1) for d in log_p_dims]
            log_pz_dims = torch.cat(log_p_dims, -1)
            log_qz_dims = torch.cat([s.log_q_dims for s in samples], -1)
        else:
            log_p = self._log_prior_dims(zs, dims=False)
            log_pz_dims = log_qz_dims = None
        log_q = [s.log_q for s in samples]
        log_px_z = self.likelihood(self.decoder(zs[0])).log_prob(x)
        terms = Terms.from_layers(
            log_px_z, log_p, log_q, log_pz_dims, log_qz_dims, [s.flow_logdet for s in samples]
        )
        return terms, samples

    def forward(self, x: Tensor, k: int = 1) -> Terms:
        """``x (B, *x_shape) -> Terms`` with ``(K, B)`` log-terms from ``k`` samples."""
        return self.terms_from_features(x, self.encode(x), k)[0]

    def log_terms_from_features(
        self, x: Tensor, h: Tensor, n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``log p(x|z)``, ``log p(z)``, ``log q(z|x)`` (summed over layers) of ``n``
        fresh ancestral samples, each ``(n, B)`` (the chunked estimator's terms)."""
        samples = self.sample_posterior(h, n)
        zs = [s.z for s in samples]
        log_px_z = self.likelihood(self.decoder(zs[0])).log_prob(x)
        return log_px_z, sum(self._log_prior_dims(zs, dims=False)), sum(s.log_q for s in samples)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` data samples ``(n, *x_shape)`` ancestrally from the generative model
        (``temperature`` scales the noise of the prior and of every layer)."""
        z = self.prior.sample(n, temperature=temperature)
        for cond in reversed(self.conditionals):
            z = cond.sample(z, temperature)
        dist = self.likelihood(self.decoder(z))
        return dist.mean if mean else dist.sample()

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mean: bool = True) -> Tensor:
        """Reconstruct ``x (B, *x_shape)`` through one sample ``z_1 ~ q(z_1|x)``."""
        s = self.posteriors[0].sample(self.encode(x), 1)
        dist = self.likelihood(self.decoder(s.z[0]))
        return dist.mean if mean else dist.sample()

    @torch.no_grad()
    def reconstruct_from_layer(self, x: Tensor, layer: int, mean: bool = True) -> Tensor:
        """What ``z_layer`` alone encodes: ``x (B, *x_shape) -> (B, *x_shape)``.

        One ancestral posterior sample up to ``z_layer ~ q(z_layer | z_{layer-1})``, then
        the layers below regenerated from the prior conditionals ``p(z_{l-1} | z_l)``
        (samples, temperature 1) and decoded. ``layer = 1`` is :meth:`reconstruct`; the
        higher the layer, the less of ``x`` survives. The construction used to show what
        the upper layers of a hierarchy encode (e.g. Maaløe et al. 2019, BIVA,
        arXiv:1902.02102; Havtorn et al. 2021, arXiv:2102.08248; their figures were not
        re-read for this code).
        """
        _check_layer(layer, self.num_layers)
        samples = self.sample_posterior(self.encode(x), 1)[:layer]
        z = samples[-1].z[0]
        for cond in reversed(self.conditionals[: layer - 1]):
            z = cond.sample(z)
        dist = self.likelihood(self.decoder(z))
        return dist.mean if mean else dist.sample()

    @property
    def kl_splits_over_dimensions(self) -> bool:
        """Whether ``Terms.kl_dims`` exists: every layer's posterior splits over
        dimensions and the top prior has per-dimension terms (it factorises, or
        :attr:`kl_chain_rule` is set and its conditionals are tractable)."""
        q_splits = all(
            getattr(p, "flow", None) is None or p.flow.splits_logdet for p in self.posteriors
        )
        z = torch.zeros(1, self.latent_dims[-1], device=next(self.parameters()).device)
        with torch.no_grad():
            return q_splits and self._prior_dims(self.prior, z) is not None

    @torch.no_grad()
    def posterior_mean(self, x: Tensor, samples: int = 32) -> tuple[Tensor, Tensor]:
        """``E_q[z | x]`` of the concatenated latents and the variance of that estimate,
        each ``(B, sum D_l)``, bottom layer first.

        The first layer's mean is exact (``mu``, zero variance) for a diagonal Gaussian
        posterior; the upper layers' means (``E_{q(z_1|x)} E[z_2 | z_1]``, ...) and flow
        posteriors' are Monte Carlo means of ``samples`` draws with their sampling
        variance ``Var_q[z] / samples`` (see :meth:`vaeflow.models.vae.VAE.posterior_mean`).
        """
        draws = self.sample_posterior(self.encode(x), samples)
        means, variances = [], []
        for i, s in enumerate(draws):
            if i == 0 and not isinstance(self.posteriors[0], FlowPosterior):
                means.append(s.mu)
                variances.append(torch.zeros_like(s.mu))
            else:
                means.append(s.z.mean(0))
                variances.append(s.z.var(0) / samples)
        return torch.cat(means, -1), torch.cat(variances, -1)
