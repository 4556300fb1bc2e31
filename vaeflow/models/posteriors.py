"""Amortised posteriors q(z | x): a diagonal Gaussian, optionally sharpened by a flow.

Both take encoder features ``h`` ``(B, H)`` and draw ``K`` reparameterised samples
first-dimension-first: ``z (K, B, D)`` with ``log q(z|x) (K, B)`` from the same pass
(docs/design.md §3.2). The flow posterior follows docs/design.md §3.1:

    eps ~ q0(. | x) = N(mu(h), diag sigma(h)^2)
    z, ld = flow.inverse(eps, context=c(h))          # sampling direction
    log q(z | x) = log q0(eps | x) - ld

so an IAF (``Inverse`` of an autoregressive layer) samples in one pass, and amortised
planar/radial/Sylvester layers receive their per-example parameters through the context.

References:
    Kingma & Welling 2014, arXiv:1312.6114 (reparameterisation);
    Rezende & Mohamed 2015, arXiv:1505.05770 (flow posteriors);
    Kingma et al. 2016, arXiv:1606.04934 (IAF, context from the encoder);
    van den Berg et al. 2018, arXiv:1803.05649 (amortised Sylvester flows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..flows.base import Transform
from ..layers import halves, wn_linear

__all__ = ["PosteriorSample", "GaussianPosterior", "FlowPosterior", "SCALES", "log_std_from_raw"]

# log sigma is soft-clipped to +-LOG_STD_BOUND: sigma in [4.5e-5, 2.2e4]. It never binds
# in healthy training and keeps a diverging encoder from producing inf/NaN samples.
LOG_STD_BOUND = 10.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: How a Gaussian head's second output becomes ``log sigma`` (see :func:`log_std_from_raw`).
SCALES = ("log_std", "softplus_var", "log_var_hardtanh")
# Below this pre-activation softplus(a) = exp(a) to float32 precision (float64: to about
# 1e-10 relative): log softplus(a) is taken as a, so softplus never underflows to 0.
_SOFTPLUS_LOG_LINEAR = -20.0


def log_std_from_raw(raw: Tensor, scale: str = "log_std") -> Tensor:
    """``log sigma`` from a Gaussian head's raw output, by parameterisation.

    - ``log_std``: ``raw`` is ``log sigma``, soft-clipped to ``+-LOG_STD_BOUND``
      (vaeflow's default).
    - ``softplus_var``: ``sigma^2 = softplus(raw)``, unclamped (van den Berg et al.'s
      Sylvester-flow code, ``q_z_var = Softplus(Linear(h))``). ``log softplus`` is taken
      as ``raw`` itself below -20, where ``softplus(raw) = exp(raw)`` to float32
      precision, so ``log sigma`` is finite for every finite input (not bounded below: far
      below -200, ``1 / sigma`` overflows in float32, as the variance underflows to 0 in
      the Sylvester code).
    - ``log_var_hardtanh``: ``log sigma^2 = hardtanh(raw, -6, 2)`` (Tomczak & Welling's
      VampPrior code): sigma in [0.050, 2.72], zero gradient outside.

    The parameterisation changes the optimiser's dynamics, not the model family: a step of
    Adam moves ``raw`` by about ``lr`` whatever it means, so the variances move twice as fast
    per step under ``log_std`` as under ``log_var_hardtanh``.
    """
    if scale == "log_std":
        return LOG_STD_BOUND * torch.tanh(raw / LOG_STD_BOUND)
    if scale == "softplus_var":
        linear = raw < _SOFTPLUS_LOG_LINEAR
        safe = torch.where(linear, torch.zeros_like(raw), raw)
        return 0.5 * torch.where(linear, raw, torch.nn.functional.softplus(safe).log())
    if scale == "log_var_hardtanh":
        return 0.5 * torch.clamp(raw, -6.0, 2.0)
    raise ValueError(f"unknown posterior scale {scale!r}; choose from {SCALES}")


@dataclass(frozen=True)
class PosteriorSample:
    """One batch of posterior samples and everything the VAE and the logger need.

    Attributes:
        z: samples ``(K, B, D)``.
        log_q: ``log q(z | x)`` ``(K, B)``.
        log_q_dims: per-dimension terms ``(K, B, D)`` whose sum is ``log_q``: for a
            diagonal Gaussian, and for flows whose log-det splits over dimensions (IAF,
            gated IAF: see ``Transform.splits_logdet``); else ``None``.
        flow_logdet: ``log|det dz/d eps|`` ``(K, B)`` (zeros without a flow).
        mu: base mean ``(B, D)``.
        log_std: base log standard deviation ``(B, D)``.
    """

    z: Tensor
    log_q: Tensor
    log_q_dims: Tensor | None
    flow_logdet: Tensor
    mu: Tensor
    log_std: Tensor


class GaussianPosterior(nn.Module):
    """Diagonal Gaussian ``q(z|x) = N(mu(h), diag sigma(h)^2)`` with a linear head on ``h``.

    Args:
        in_features: encoder feature width ``H``.
        latent_dim: ``D``.
        scale: how the head's second half gives ``log sigma`` (:func:`log_std_from_raw`:
            ``log_std``, ``softplus_var`` or ``log_var_hardtanh``).
        weight_norm: the head's (:func:`~vaeflow.layers.wn_linear`): ``False``, ``True``
            or ``"iaf_code"`` (data init to outputs of scale 0.1: mu near 0, the raw scale
            near 0, so sigma near 1 for ``log_std``, near 0.83 for ``softplus_var``).
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        scale: str = "log_std",
        weight_norm: bool | str = False,
    ) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unknown posterior scale {scale!r}; choose from {SCALES}")
        self.latent_dim = latent_dim
        self.scale = scale
        self.head = wn_linear(in_features, 2 * latent_dim, weight_norm, init_scale=0.1)

    def fused_parts(self) -> dict[nn.Parameter, tuple[int, int]]:
        """The head's mean and scale rows: two layers of the papers' code
        (:func:`vaeflow.layers.fused_parameters`)."""
        return halves(self.head.parameters())

    def params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``h (B, H) -> (mu (B, D), log_std (B, D))``."""
        mu, raw = self.head(h).chunk(2, dim=-1)
        return mu, log_std_from_raw(raw, self.scale)

    @staticmethod
    def _log_normal_dims(eps_std: Tensor, log_std: Tensor) -> Tensor:
        # log N(mu + sigma e; mu, sigma) per dimension, from the standardised value e.
        return -0.5 * eps_std**2 - log_std - _HALF_LOG_2PI

    def sample(self, h: Tensor, k: int = 1, noise: Tensor | None = None) -> PosteriorSample:
        """Draw ``k`` samples per example: see :class:`PosteriorSample` for shapes.

        ``noise``: the standard-normal draws ``(K, B, D)`` to use; ``None`` draws them from
        the global generator. Stacked training (``vaeflow.run.stack``) passes each run's
        own draws, so the sampling itself stays free of random state (and vmaps).
        """
        mu, log_std = self.params(h)
        if noise is None:
            noise = torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)
        z = mu + torch.exp(log_std) * noise
        dims = self._log_normal_dims(noise, log_std)
        return PosteriorSample(z, dims.sum(-1), dims, z.new_zeros(z.shape[:-1]), mu, log_std)

    def rsample_and_log_prob(self, h: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """``z (K, B, D)`` and ``log q(z|x) (K, B)`` in one reparameterised pass."""
        s = self.sample(h, k)
        return s.z, s.log_q

    def log_prob(self, z: Tensor, h: Tensor) -> Tensor:
        """``log q(z | x)`` for given ``z (*, B, D)`` and features ``h (B, H)``: ``(*, B)``."""
        mu, log_std = self.params(h)
        return self._log_normal_dims((z - mu) * torch.exp(-log_std), log_std).sum(-1)


class FlowPosterior(nn.Module):
    """A Gaussian base conditioned on ``x`` followed by a flow conditioned on ``h``.

    Args:
        in_features: encoder feature width ``H``.
        latent_dim: ``D``.
        flow: a :class:`~vaeflow.flows.base.Transform` on ``(D,)`` with a sampling
            (``inverse``) direction; its ``context_features`` (if any) is the width of
            the context vector ``c = Linear(h)`` it receives.
        scale: the base Gaussian's parameterisation (:class:`GaussianPosterior`).
        context_projection: ``True``: the context is ``c = Linear(h)``, which decouples
            its width from the encoder's; ``False``: the flow reads ``h`` itself (its
            ``context_features`` must be ``H``), as van den Berg et al.'s code computes
            every flow parameter as one linear map of the encoder output.
        weight_norm: the base head's and the context projection's (see
            :class:`GaussianPosterior`; the projection's data init also to scale 0.1).
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        flow: Transform,
        scale: str = "log_std",
        context_projection: bool = True,
        weight_norm: bool | str = False,
    ) -> None:
        super().__init__()
        if flow.event_shape != (latent_dim,) or flow.out_event_shape != (latent_dim,):
            raise ValueError(
                f"FlowPosterior: flow acts on {flow.event_shape}, latents are ({latent_dim},)"
            )
        self.latent_dim = latent_dim
        self.base = GaussianPosterior(in_features, latent_dim, scale, weight_norm)
        self.flow = flow
        c = flow.context_features
        if c and not context_projection and c != in_features:
            raise ValueError(
                f"FlowPosterior: without a context projection the flow reads the encoder "
                f"features, so its context_features must be {in_features}, got {c}"
            )
        # A learned projection decouples the flow's context width from the encoder's.
        self.context = (
            wn_linear(in_features, c, weight_norm, init_scale=0.1)
            if c and context_projection
            else None
        )
        self.reads_features = bool(c) and not context_projection

    def _context(self, h: Tensor) -> Tensor | None:
        if self.reads_features:
            return h
        return None if self.context is None else self.context(h)

    def sample(self, h: Tensor, k: int = 1, noise: Tensor | None = None) -> PosteriorSample:
        """Draw ``k`` samples per example; ``log_q`` comes from the same pass.

        ``noise``: the base's standard-normal draws ``(K, B, D)`` (see
        :meth:`GaussianPosterior.sample`); ``None`` draws them.
        """
        base = self.base.sample(h, k, noise)
        # A flow whose log-det splits over positions (IAF, gated IAF) gives log q per
        # dimension too: log q0(eps_d) minus the log-scales that moved position d, which
        # per-dimension free bits floor exactly as they floor a Gaussian's (Kingma et al.
        # 2016 apply the same grouping to every posterior).
        run = self.flow.inverse_dims if self.flow.splits_logdet else self.flow.inverse
        # One sample (the usual training step): run the flow on (B, D), not on a leading
        # singleton dim (the same arithmetic with fewer reshapes per layer).
        z, ld = run(base.z[0] if k == 1 else base.z, self._context(h))
        if k == 1:
            z, ld = z.unsqueeze(0), ld.unsqueeze(0)
        if not self.flow.splits_logdet:
            return PosteriorSample(z, base.log_q - ld, None, ld, base.mu, base.log_std)
        log_q_dims = base.log_q_dims - ld
        return PosteriorSample(
            z, log_q_dims.sum(-1), log_q_dims, ld.sum(-1), base.mu, base.log_std
        )

    def rsample_and_log_prob(self, h: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """``z (K, B, D)`` and ``log q(z|x) (K, B)`` in one reparameterised pass."""
        s = self.sample(h, k)
        return s.z, s.log_q

    def log_prob(self, z: Tensor, h: Tensor) -> Tensor:
        """``log q(z|x)`` of given ``z (*, B, D)`` through the flow's forward direction.

        Raises NotImplementedError for flows that only have a sampling direction
        (planar, radial, Sylvester).
        """
        eps, ld = self.flow(z, self._context(h))
        return self.base.log_prob(eps, h) + ld
