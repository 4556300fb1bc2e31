"""The VAE: encoder -> posterior -> (prior, decoder -> likelihood) -> :class:`Terms`.

One class for every combination of posterior and prior (no subclass per flow type, a
pitfall of sylvester-flows): the model computes the three log-terms, the bounds in
:mod:`vaeflow.models.bounds` turn them into objectives, and the loop only sees
``model(x, k) -> Terms``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from .bounds import LogLikelihood, Terms, chunk_statistics, log_likelihood
from .posteriors import PosteriorSample

__all__ = ["VAE", "ImportanceSampled", "PosteriorLike", "PriorLike", "LikelihoodLike"]


class PosteriorLike(Protocol):
    """What the VAE needs from a posterior (see :mod:`vaeflow.models.posteriors`)."""

    latent_dim: int

    def sample(self, h: Tensor, k: int = 1) -> PosteriorSample: ...


class PriorLike(Protocol):
    """What the VAE needs from a prior: any :class:`vaeflow.models.priors.Prior` (the base class
    of the registered priors) has it, and so may a module of one's own."""

    latent_dim: int

    def log_prob(self, z: Tensor) -> Tensor: ...

    def log_prob_dims(self, z: Tensor) -> Tensor | None: ...

    def sample(self, n: int, temperature: float = 1.0) -> Tensor: ...

    # Optional: ``log_prob_chain(z) -> (*, D) | None``, the chain-rule terms
    # (``Prior.log_prob_chain``); a prior without it is used with ``log_prob_dims``.


class LikelihoodLike(Protocol):
    """``likelihood(params)`` returns a distribution whose ``log_prob`` sums the event."""

    def param_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def __call__(self, params: Tensor) -> torch.distributions.Distribution: ...


class ImportanceSampled:
    """The chunked ``k``-sample estimator for any model that encodes once and scores
    fresh samples from the encoder's features (shared by :class:`VAE` and
    :class:`vaeflow.models.hierarchy.BottomUpVAE`).

    The model provides ``encode(x) -> h``, ``log_terms_from_features(x, h, n) ->
    (log p(x|z), log p(z), log q(z|x))`` each ``(n, B)``, ``likelihood`` and ``x_shape``.

    ``kl_chain_rule`` (default False) chooses the prior's per-dimension terms in
    ``Terms.kl_dims``: False, the factorised prior's marginals (``log_prob_dims``; none for a
    prior that does not factorise); True, its chain-rule conditionals ``log p(z_d | z_<d)``
    (``log_prob_chain``), so that a mixture or VampPrior prior has per-group KL terms too:
    each group's ``log q(z_g) - log p(z_g | z_<g)``, the single-sample estimate Kingma et al.
    2016 (arXiv:1606.04934, appendix C.8) floor per group. Training sets it when free bits
    act on more than one group; it costs a ``(samples, components, D)`` pass, so evaluation
    leaves it off (:func:`vaeflow.run.evaluate.score_examples` turns it off while it scores,
    so a trained model object scores like a freshly built one). The chain pass costs a
    logsumexp over the components per dimension: with a 500-component VampPrior and one
    group per dimension (latent 40, batch 100) a CPU training step took ~3x as long.
    """

    kl_chain_rule: bool = False

    def _prior_dims(self, prior: nn.Module, z: Tensor) -> Tensor | None:
        """The prior's per-dimension terms under :attr:`kl_chain_rule` ``(*, D)``, or None."""
        if self.kl_chain_rule:
            # Optional in PriorLike: a prior of one's own without it is taken as factorised.
            chain = getattr(prior, "log_prob_chain", None)
            if chain is not None:
                return chain(z)
        return prior.log_prob_dims(z)

    def _check_x(self, x: Tensor) -> None:
        """``x`` must be ``(B, *x_shape)``; the message names the model class."""
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(
                f"{type(self).__name__} expects data of shape "
                f"(B, {', '.join(map(str, self.x_shape))}), got {tuple(x.shape)}"
            )

    def terms_sampler(self, x: Tensor) -> Callable[[int], Terms]:
        """Encode ``x`` once; return ``n -> Terms`` drawing ``n`` fresh samples per call.

        Used by the chunked log-likelihood estimator: the encoder does not rerun for every
        chunk of importance samples, and ``x`` is validated once here rather than in every
        chunk (each check is a host-device sync that leaves a GPU idle between chunks).
        The returned ``Terms`` carry ``log_px_z``, ``log_pz`` and ``log_qz`` only.
        """
        h = self.encode(x)
        self._check_data(x)

        def draw(n: int) -> Terms:
            with _data_validation_off(self.likelihood):
                return Terms(*self.log_terms_from_features(x, h, n))

        return draw

    def stats_sampler(self, x: Tensor, compile: bool = False) -> Callable[[int], Tensor]:
        """Like :meth:`terms_sampler`, but each call returns the chunk already reduced by
        :func:`~vaeflow.models.bounds.chunk_statistics` ``(6, B)``.

        ``compile``: run each chunk through ``torch.compile`` — the sampling, the decoder,
        the likelihood and the reduction become one graph, so the host issues one call per
        chunk (small chunks on a GPU are host-bound). One compilation per distinct
        ``(B, n)``. Compiled code draws its noise from its own random stream, so estimates
        differ from eager ones by Monte Carlo error only.
        """
        h = self.encode(x)
        self._check_data(x)
        chunk_fn = _compiled_chunk_statistics() if compile else _chunk_statistics

        def draw(n: int) -> Tensor:
            with _data_validation_off(self.likelihood):
                return chunk_fn(self, x, h, n)

        return draw

    def _check_data(self, x: Tensor) -> None:
        # A log-likelihood under all-zero parameters checks x's shape and values (binary,
        # on the 8-bit grid, ...) at the cost of one elementwise pass.
        params = x.new_zeros(x.shape[0], *self.likelihood.param_shape(self.x_shape))
        self.likelihood(params).log_prob(x)

    def log_likelihood(
        self, x: Tensor, k: int = 5000, chunk: int = 500, compile: bool = False
    ) -> LogLikelihood:
        """Importance-sampled ``log p(x)`` (and ELBO) per example, ``(B,)`` tensors.

        ``compile``: see :meth:`stats_sampler`.
        """
        return log_likelihood(self, x, k=k, chunk=chunk, compile=compile)


class VAE(ImportanceSampled, nn.Module):
    """Variational autoencoder with a (flow) posterior and a (flow) prior.

    Args:
        encoder: ``x (B, *x_shape) -> h (B, H)``.
        posterior: ``sample(h, k) -> PosteriorSample`` with ``z (K, B, D)``.
        prior: ``log_prob(z (*, D)) -> (*)``, ``sample(n) -> (n, D)``.
        decoder: ``z (*, D) -> params (*, *param_shape)``.
        likelihood: ``likelihood(params).log_prob(x) -> (*)`` summed over the event.
        x_shape: shape of one example, e.g. ``(1, 28, 28)``.

    References:
        Kingma & Welling 2014, arXiv:1312.6114; Rezende et al. 2014, arXiv:1401.4082.
    """

    def __init__(
        self,
        encoder: nn.Module,
        posterior: nn.Module,
        prior: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        x_shape: Sequence[int],
    ) -> None:
        super().__init__()
        if posterior.latent_dim != prior.latent_dim:
            raise ValueError(
                f"posterior latent_dim {posterior.latent_dim} != prior latent_dim "
                f"{prior.latent_dim}"
            )
        self.encoder = encoder
        self.posterior = posterior
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood
        self.x_shape = tuple(int(s) for s in x_shape)
        self.latent_dim = posterior.latent_dim

    def encode(self, x: Tensor) -> Tensor:
        """Encoder features ``h (B, H)`` for data ``x (B, *x_shape)``."""
        self._check_x(x)
        return self.encoder(x)

    def terms_from_features(
        self, x: Tensor, h: Tensor, k: int = 1, noise: Tensor | None = None
    ) -> tuple[Terms, PosteriorSample]:
        """Draw ``k`` posterior samples given encoder features and score them.

        ``noise``: the posterior's standard-normal draws ``(K, B, D)``; ``None`` draws them
        from the global generator.

        Returns the :class:`~vaeflow.models.bounds.Terms` (each ``(K, B)``) and the posterior
        sample (for logging latent statistics).
        """
        # Only when given: a posterior of one's own (PosteriorLike) need not take noise.
        s = self.posterior.sample(h, k) if noise is None else self.posterior.sample(h, k, noise)
        log_pz_dims = self._prior_dims(self.prior, s.z) if s.log_q_dims is not None else None
        # The chain-rule terms sum to log p(z): no second pass (a VampPrior would encode its
        # pseudo-inputs twice). A factorised prior's own log_prob is as cheap as the sum.
        chain = self.kl_chain_rule and log_pz_dims is not None
        log_pz = log_pz_dims.sum(-1) if chain else self.prior.log_prob(s.z)
        log_px_z = self.likelihood(self.decoder(s.z)).log_prob(x)
        terms = Terms(log_px_z, log_pz, s.log_q, log_pz_dims, s.log_q_dims, s.flow_logdet)
        return terms, s

    def forward(self, x: Tensor, k: int = 1, noise: Tensor | None = None) -> Terms:
        """``x (B, *x_shape) -> Terms`` with ``(K, B)`` log-terms from ``k`` samples.

        ``noise``: the posterior's standard-normal draws ``(K, B, D)`` (stacked training
        passes each run's own); ``None`` draws them from the global generator.
        """
        return self.terms_from_features(x, self.encode(x), k, noise)[0]

    def log_terms_from_features(
        self, x: Tensor, h: Tensor, n: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``log p(x|z)``, ``log p(z)``, ``log q(z|x)`` of ``n`` fresh samples, each
        ``(n, B)``: the three terms the chunked estimator needs, nothing more."""
        s = self.posterior.sample(h, n)
        log_px_z = self.likelihood(self.decoder(s.z)).log_prob(x)
        return log_px_z, self.prior.log_prob(s.z), s.log_q

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` data samples ``(n, *x_shape)`` from the generative model.

        Args:
            n: number of samples.
            mean: return the likelihood's mean (clean images) instead of a sample of x.
            temperature: scale of the prior's noise (``< 1`` gives cleaner, less diverse
                samples; Kingma & Dhariwal 2018).
        """
        z = self.prior.sample(n, temperature=temperature)
        dist = self.likelihood(self.decoder(z))
        return dist.mean if mean else dist.sample()

    @property
    def kl_splits_over_dimensions(self) -> bool:
        """Whether ``Terms.kl_dims`` exists: log q splits over dimensions (a diagonal
        Gaussian, or a flow with ``splits_logdet``) and the prior has per-dimension terms
        (it factorises, or :attr:`kl_chain_rule` is set and its conditionals are
        tractable)."""
        flow = getattr(self.posterior, "flow", None)
        q_splits = flow is None or flow.splits_logdet
        z = torch.zeros(1, self.latent_dim, device=next(self.parameters()).device)
        with torch.no_grad():
            return q_splits and self._prior_dims(self.prior, z) is not None

    @torch.no_grad()
    def posterior_mean(self, x: Tensor, samples: int = 32) -> tuple[Tensor, Tensor]:
        """``E_q[z | x]`` per example and the variance of that estimate, each ``(B, D)``.

        Exact (``mu``, zero variance) for a diagonal Gaussian posterior; for a flow
        posterior a Monte Carlo mean of ``samples`` draws, with its sampling variance
        ``Var_q[z] / samples`` so callers can remove that noise (active units).
        """
        s = self.posterior.sample(self.encode(x), samples)
        if getattr(self.posterior, "flow", None) is None:  # the Gaussian is the posterior
            return s.mu, torch.zeros_like(s.mu)
        return s.z.mean(0), s.z.var(0) / samples

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mean: bool = True) -> Tensor:
        """Reconstruct ``x (B, *x_shape)`` through one posterior sample: ``(B, *x_shape)``."""
        s = self.posterior.sample(self.encode(x), 1)
        dist = self.likelihood(self.decoder(s.z[0]))
        return dist.mean if mean else dist.sample()


def _chunk_statistics(model: ImportanceSampled, x: Tensor, h: Tensor, n: int) -> Tensor:
    """:func:`~vaeflow.models.bounds.chunk_statistics` ``(6, B)`` of ``n`` fresh samples."""
    return chunk_statistics(*model.log_terms_from_features(x, h, n))


@functools.cache
def _compiled_chunk_statistics() -> Callable[[ImportanceSampled, Tensor, Tensor, int], Tensor]:
    # Built on first use: importing vaeflow must not import the compiler stack. Shapes are
    # static (each distinct (B, n) compiles once: typically the full and the last chunk).
    return torch.compile(_chunk_statistics, dynamic=False)


@contextlib.contextmanager
def _data_validation_off(likelihood: nn.Module) -> Iterator[None]:
    """Skip the likelihood's per-call data check (for data already checked once)."""
    flag = getattr(likelihood, "validate", None)
    if flag is None:
        yield
        return
    likelihood.validate = False
    try:
        yield
    finally:
        likelihood.validate = flag
