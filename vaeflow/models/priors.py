"""Priors ``p(z)`` over the latent space of a VAE.

Every prior is an :class:`nn.Module` with ``latent_dim`` and the same small interface,
which the VAE relies on:

- ``log_prob(z)``: ``(*lead, D) -> (*lead)``, fully normalised (docs/design.md §3.4),
  so Gaussian, mixture and flow priors give comparable bounds in nats.
- ``log_prob_dims(z)``: ``(*lead, D) -> (*lead, D)`` per-dimension terms whose sum over the
  last dimension is ``log_prob(z)``, for priors that factorise over dimensions (used for
  per-dimension free bits); ``None`` for priors that do not factorise (mixtures, flows).
  The method exists on every prior so callers test the result, never ``hasattr``.
- ``log_prob_chain(z)``: ``(*lead, D) -> (*lead, D)`` the chain-rule terms
  ``log p(z_d | z_<d)`` (dimension order), whose sum is also ``log_prob(z)``; for factorised
  priors they are ``log_prob_dims``, mixtures of diagonal Gaussians compute them exactly,
  ``None`` where the conditionals are not tractable (flows). Used for free bits per group
  with a prior that does not factorise (Kingma et al. 2016: each group's KL is measured
  against the prior conditioned on the groups before it, as in a hierarchy).
- ``sample(n)``: ``(n, D)`` on the module's device and dtype.
- ``sample_and_log_prob(n)``: ``(n, D)`` samples and their ``(n,)`` log-density.

Priors are unconditional: latents are samples-first ``(K, B, D)`` and give ``(K, B)``.
Use :func:`build_prior` (the ``PRIORS`` registry) to build one by name from a config.

References:
    Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114.
    Tomczak & Welling 2018, "VAE with a VampPrior", arXiv:1705.07120.
    Papamakarios et al. 2021, "Normalizing Flows for Probabilistic Modeling and
    Inference", arXiv:1912.02762 (flows as density models, section 2).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..flows.base import ShapeError, Transform
from ..flows.density import FlowDensity
from ..flows.registry import FLOWS, build_flow

__all__ = [
    "Prior",
    "StandardNormalPrior",
    "LearnedGaussianPrior",
    "FlowPrior",
    "MixtureOfGaussiansPrior",
    "VampPrior",
    "PRIORS",
    "build_prior",
    "prior_names",
    "diag_normal_log_prob_dims",
]

_LOG_2PI = math.log(2 * math.pi)


def diag_normal_log_prob_dims(z: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """Per-dimension log-density of a diagonal Gaussian, constants included.

    Args:
        z: points, any shape broadcastable with ``loc`` and ``log_scale``.
        loc: means.
        log_scale: log standard deviations.

    Returns:
        ``log N(z_d | loc_d, exp(log_scale_d)^2)`` elementwise, the broadcast shape.
    """
    eps = (z - loc) * torch.exp(-log_scale)
    return -0.5 * eps * eps - log_scale - 0.5 * _LOG_2PI


class Prior(nn.Module):
    """Base class of the priors: shape checks and the shared default methods.

    Subclasses implement :meth:`log_prob` and :meth:`sample`; factorised ones also
    :meth:`log_prob_dims`. Calling the module is the same as :meth:`log_prob`.

    Args:
        latent_dim: dimension ``D`` of the latent space.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if int(latent_dim) < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = int(latent_dim)

    def check_latent(self, z: Tensor) -> None:
        """Raise :class:`ShapeError` unless ``z`` has shape ``(*lead, latent_dim)``."""
        if not isinstance(z, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a Tensor, got {type(z)}")
        if z.dim() < 1 or z.shape[-1] != self.latent_dim:
            raise ShapeError(
                f"{type(self).__name__}: expected latents of shape (*, {self.latent_dim}), "
                f"got {tuple(z.shape)}"
            )

    def log_prob(self, z: Tensor) -> Tensor:
        """Fully normalised ``log p(z)``: ``(*lead, D) -> (*lead)`` in nats."""
        raise NotImplementedError

    def log_prob_dims(self, z: Tensor) -> Tensor | None:
        """Per-dimension ``log p(z_d)``: ``(*lead, D) -> (*lead, D)``, or ``None``.

        ``None`` (this default) means the prior does not factorise over dimensions, so
        per-dimension terms do not exist; callers then fall back to ``log_prob``.
        """
        self.check_latent(z)
        return None

    def log_prob_chain(self, z: Tensor) -> Tensor | None:
        """Chain-rule terms ``log p(z_d | z_1, ..., z_{d-1})``: ``(*lead, D) -> (*lead, D)``.

        Their sum over the last dimension is ``log_prob(z)``, and the sum over a block of
        consecutive dimensions ``g`` is ``log p(z_g | z_<g)``. This default is
        :meth:`log_prob_dims` (for a factorised prior the conditionals are the marginals),
        so ``None`` where the prior does not factorise and does not override this.
        """
        return self.log_prob_dims(z)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` latents ``(n, D)`` on the module's device and dtype.

        ``temperature`` scales the standard deviation of the Gaussian noise the sample is
        built from (reduced-temperature sampling, Kingma & Dhariwal 2018, arXiv:1807.03039);
        ``1.0`` samples the prior itself.
        """
        raise NotImplementedError

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw ``n`` latents and score them.

        Returns:
            ``z (n, D)`` and ``log p(z) (n,)``.
        """
        z = self.sample(n)
        return z, self.log_prob(z)

    def forward(self, z: Tensor) -> Tensor:
        """Alias of :meth:`log_prob`, so hooks and ``prior(z)`` behave as expected."""
        return self.log_prob(z)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"


def _check_n(n: int) -> int:
    if int(n) < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    return int(n)


class StandardNormalPrior(Prior):
    """The standard normal prior ``N(0, I)`` of the original VAE.

    Args:
        latent_dim: dimension ``D``.

    References:
        Kingma & Welling 2014, arXiv:1312.6114.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        # No parameters: this non-persistent buffer only follows ``.to()`` so sampling
        # knows the device and dtype; it never appears in the state_dict.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob_dims(self, z: Tensor) -> Tensor:
        """``log N(z_d | 0, 1)``: ``(*lead, D) -> (*lead, D)``."""
        self.check_latent(z)
        return -0.5 * z * z - 0.5 * _LOG_2PI

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(z | 0, I)``: ``(*lead, D) -> (*lead)``, ``-D/2 log 2 pi`` included."""
        return self.log_prob_dims(z).sum(-1)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``(n, D)`` standard normal draws (scaled by ``temperature``)."""
        a = self._anchor
        return temperature * torch.randn(
            _check_n(n), self.latent_dim, device=a.device, dtype=a.dtype
        )


class LearnedGaussianPrior(Prior):
    """Diagonal Gaussian prior with a learned mean and log-std per dimension.

    Starts as ``N(0, I)``. The log-std is unconstrained (``std = exp(log_std)``), so
    no clamping is needed for the density to stay normalised.

    Args:
        latent_dim: dimension ``D``.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.loc = nn.Parameter(torch.zeros(self.latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(self.latent_dim))

    def log_prob_dims(self, z: Tensor) -> Tensor:
        """``log N(z_d | mu_d, sigma_d^2)``: ``(*lead, D) -> (*lead, D)``."""
        self.check_latent(z)
        return diag_normal_log_prob_dims(z, self.loc, self.log_scale)

    def log_prob(self, z: Tensor) -> Tensor:
        """``(*lead, D) -> (*lead)``, fully normalised."""
        return self.log_prob_dims(z).sum(-1)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``(n, D)`` reparameterised draws ``mu + sigma * T * eps``."""
        eps = torch.randn(
            _check_n(n), self.latent_dim, device=self.loc.device, dtype=self.loc.dtype
        )
        return self.loc + torch.exp(self.log_scale) * (temperature * eps)


class FlowPrior(Prior):
    """A standard normal base pushed through a normalising flow.

    With ``u, ld = flow(z)`` (data -> noise, docs/design.md §3.1),
    ``log p(z) = log N(u | 0, I) + ld``: a single parallel pass for couplings and MAF,
    which is the direction a prior is evaluated in at every training step. Sampling
    draws ``u ~ N(0, I)`` and runs ``flow.inverse`` (sequential for MAF). Because every
    registered flow is the identity at initialisation, a fresh flow prior is exactly
    :class:`StandardNormalPrior`. Internally this is a
    :class:`~vaeflow.flows.density.FlowDensity`.

    The flow must implement ``forward`` (the density direction). Planar, radial and
    Sylvester layers do not (they exist only noise -> data), so :meth:`log_prob` would
    raise their ``NotImplementedError``; :meth:`from_registry` refuses them up front.

    Args:
        latent_dim: dimension ``D``.
        flow: an unconditional :class:`~vaeflow.flows.base.Transform` on vectors of
            size ``D`` (``event_shape == out_event_shape == (D,)``).

    References:
        Papamakarios et al. 2021, arXiv:1912.02762, section 2.
        Chen et al. 2017, "Variational Lossy Autoencoder", arXiv:1611.02731 (flow priors
        in VAEs).
    """

    def __init__(self, latent_dim: int, flow: Transform) -> None:
        super().__init__(latent_dim)
        if not isinstance(flow, Transform):
            raise TypeError(f"FlowPrior: flow must be a Transform, got {type(flow).__name__}")
        shape = (self.latent_dim,)
        if tuple(flow.event_shape) != shape or tuple(flow.out_event_shape) != shape:
            raise ShapeError(
                f"FlowPrior: flow maps {tuple(flow.event_shape)} -> "
                f"{tuple(flow.out_event_shape)}, expected {shape} -> {shape}"
            )
        if flow.context_features:
            raise ValueError(
                "FlowPrior: priors are unconditional, but the flow expects a context of "
                f"width {flow.context_features}; build it with context_features=0"
            )
        self.density = FlowDensity(flow)

    @property
    def flow(self) -> Transform:
        """The transform (data -> noise)."""
        return self.density.transform

    @classmethod
    def from_registry(
        cls,
        latent_dim: int,
        name: str,
        num_layers: int = 4,
        hidden: int = 64,
        **options: object,
    ) -> FlowPrior:
        """Build a flow prior from a registered vector flow with a density direction.

        Args:
            latent_dim: dimension ``D``.
            name: a key of :data:`vaeflow.flows.registry.FLOWS` whose spec has
                ``density=True`` and ``data="vector"``. Families whose density direction
                is sequential (``one_pass="sampling"``, e.g. IAF) are accepted but make
                every ``log_prob`` cost ``D`` passes; inexact ones (residual, FFJORD)
                give estimated log-densities.
            num_layers: number of flow layers.
            hidden: width of the conditioner networks.
            **options: family-specific options passed on to ``build_flow``.

        Returns:
            A :class:`FlowPrior`, equal to ``N(0, I)`` at initialisation.

        Raises:
            ValueError: for an unknown name, an image flow, or a flow without a density
                direction (planar, radial, Sylvester).
        """
        spec = FLOWS.get(name)
        if spec is None:
            raise ValueError(
                f"unknown flow {name!r}; flows usable as priors: {', '.join(_prior_flows())}"
            )
        if not spec.density:
            raise ValueError(
                f"flow {name!r} cannot be used as a prior: it only has a sampling "
                "direction (noise -> data), with no analytic inverse to map an arbitrary "
                "z back to the base, so log p(z) of a posterior sample cannot be "
                f"computed. Flows usable as priors: {', '.join(_prior_flows())}"
            )
        if spec.data != "vector":
            raise ValueError(
                f"flow {name!r} is an image flow; a prior needs a vector flow: "
                f"{', '.join(_prior_flows())}"
            )
        flow = build_flow(name, latent_dim, num_layers, hidden, 0, **options)
        return cls(latent_dim, flow)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(u) + log|det du/dz|`` with ``u = flow(z)``: ``(*lead, D) -> (*lead)``."""
        self.check_latent(z)
        return self.density.log_prob(z)

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """One inverse pass: ``z (n, D)`` and ``log p(z) = log N(u) - log|det dz/du|`` ``(n,)``."""
        return self.density.sample_and_log_prob(_check_n(n))

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``(n, D)`` draws ``z = flow.inverse(T u)``, ``u ~ N(0, I)``."""
        if temperature == 1.0:
            return self.sample_and_log_prob(n)[0]
        u = temperature * self.density.base.sample((_check_n(n),))
        return self.flow.inverse(u)[0]


def _prior_flows() -> list[str]:
    return sorted(n for n, s in FLOWS.items() if s.density and s.data == "vector")


MIXTURE_BLOCK_ELEMENTS = 2**24
"""Largest (rows x components) block of a mixture log-density in float64 (128 MiB), and
(rows x components x dims) block of the broadcast fallback (64 MiB in float32)."""


def _mixture_log_prob(z: Tensor, loc: Tensor, log_scale: Tensor, log_weights: Tensor) -> Tensor:
    """``log sum_k w_k N(z | loc_k, diag(exp(log_scale_k))^2)``.

    Args:
        z: ``(*lead, D)``.
        loc, log_scale: ``(C, D)`` component parameters.
        log_weights: ``(C,)`` normalised log mixture weights.

    Returns:
        ``(*lead)``, in ``z``'s dtype.
    """
    lead = z.shape[:-1]
    rows = z.reshape(-1, z.shape[-1])
    if rows.device.type == "mps":  # no float64 there: the exact broadcast form
        out = _mixture_blocks_broadcast(rows, loc, log_scale, log_weights)
    else:
        out = _mixture_blocks_matmul(rows, loc, log_scale, log_weights)
    return out.reshape(lead)


def _mixture_blocks_matmul(
    rows: Tensor, loc: Tensor, log_scale: Tensor, log_weights: Tensor
) -> Tensor:
    # The squared Mahalanobis distances of all (row, component) pairs as two matrix
    # products: sum_d p_kd (z_d - m_kd)^2 = (z*z) @ p_k - 2 z @ (p_k m_k) + sum_d p_kd m_kd^2,
    # p = exp(-2 log_scale). The (rows, C, D) broadcast it replaces moved 40x more memory
    # and made evaluation of a 500-component VampPrior at k = 5000 take ~2 s per image on
    # one CPU core. Expanding the square cancels terms of size ~ z^2 p, so it is done in
    # float64: the cancellation then costs ~1e-16 * z^2 p (about 1e-10 nats at p = 1e6),
    # far below float32's own rounding of the result.
    out_dtype = rows.dtype
    wide = torch.promote_types(out_dtype, torch.float64)
    z = rows.to(wide)
    prec = torch.exp(-2.0 * log_scale.to(wide))  # (C, D)
    m = loc.to(wide)
    const = (
        -0.5 * (prec * m * m).sum(-1)
        - log_scale.to(wide).sum(-1)
        - 0.5 * loc.shape[-1] * _LOG_2PI
        + log_weights.to(wide)
    )  # (C,)
    a, b = -0.5 * prec.T, (prec * m).T  # (D, C) each
    block = max(1, MIXTURE_BLOCK_ELEMENTS // max(1, loc.shape[0]))
    out = [
        torch.logsumexp(torch.addmm(torch.addmm(const, r * r, a), r, b), dim=-1)
        for r in z.split(block)
    ]
    return (out[0] if len(out) == 1 else torch.cat(out)).to(out_dtype)


def _mixture_blocks_broadcast(
    rows: Tensor, loc: Tensor, log_scale: Tensor, log_weights: Tensor
) -> Tensor:
    # Exact per-term form over a (rows, C, D) intermediate, in row blocks so memory stays
    # bounded (k = 100 x 500 images x 500 components x 40 dims is 4 GB in float32).
    block = max(1, MIXTURE_BLOCK_ELEMENTS // max(1, loc.numel()))
    out = [
        torch.logsumexp(
            diag_normal_log_prob_dims(r.unsqueeze(-2), loc, log_scale).sum(-1) + log_weights,
            dim=-1,
        )
        for r in rows.split(block)
    ]
    return out[0] if len(out) == 1 else torch.cat(out)


def _mixture_log_prob_chain(
    z: Tensor, loc: Tensor, log_scale: Tensor, log_weights: Tensor
) -> Tensor:
    """Chain-rule terms ``log p(z_d | z_<d)`` of a mixture of diagonal Gaussians, exactly.

    The marginal of the first ``d`` dimensions is the mixture of the components' marginals
    (same weights), so ``log p(z_<=d) = logsumexp_k (log w_k + sum_{j<=d} log N_kj)`` for
    every ``d`` at once (a cumulative sum over dimensions), and the conditional is the
    difference of consecutive marginals (``log p(z_<=0) = 0``: normalised weights).

    Args:
        z: ``(*lead, D)``.
        loc, log_scale: ``(C, D)`` component parameters.
        log_weights: ``(C,)`` normalised log mixture weights.

    Returns:
        ``(*lead, D)`` in ``z``'s dtype (computed in at least float32); the sum over ``D``
        is the mixture's ``log p(z)``.
    """
    lead, d = z.shape[:-1], z.shape[-1]
    # At least float32: the terms are differences of running sums (bf16 under autocast
    # would lose whole nats).
    wide = torch.promote_types(z.dtype, torch.float32)
    rows = z.reshape(-1, d).to(wide)
    loc, log_scale, log_weights = loc.to(wide), log_scale.to(wide), log_weights.to(wide)
    # A (rows, C, D) intermediate: cost C * D per row, like the broadcast log-density; in
    # row blocks so that memory stays bounded.
    block = max(1, MIXTURE_BLOCK_ELEMENTS // max(1, loc.numel()))
    out = []
    for r in rows.split(block):
        comp = diag_normal_log_prob_dims(r.unsqueeze(-2), loc, log_scale)  # (R, C, D)
        marginal = torch.logsumexp(comp.cumsum(-1) + log_weights.unsqueeze(-1), dim=-2)
        out.append(torch.diff(marginal, dim=-1, prepend=marginal.new_zeros(len(r), 1)))
    chain = out[0] if len(out) == 1 else torch.cat(out)
    return chain.reshape(*lead, d).to(z.dtype)


def _sample_mixture(
    n: int, loc: Tensor, log_scale: Tensor, logits: Tensor | None, temperature: float = 1.0
) -> Tensor:
    """``(n, D)`` draws: a component per draw (uniform if ``logits`` is None), then a
    reparameterised Gaussian sample from it."""
    num = loc.shape[0]
    if logits is None:
        idx = torch.randint(num, (n,), device=loc.device)
    else:
        # Gumbel-max: an exact categorical draw that, unlike torch.multinomial, also
        # handles n = 0.
        u = torch.rand(n, num, device=logits.device, dtype=logits.dtype)
        idx = torch.argmax(logits.detach() - torch.log(-torch.log(u)), dim=-1)
    eps = torch.randn(n, loc.shape[-1], device=loc.device, dtype=loc.dtype)
    return loc[idx] + torch.exp(log_scale[idx]) * (temperature * eps)


class MixtureOfGaussiansPrior(Prior):
    """Mixture of ``C`` diagonal Gaussians with learned means, log-stds and weights.

    ``p(z) = sum_c softmax(logits)_c N(z | mu_c, diag(sigma_c^2))``.

    Initialisation: the means are drawn from ``N(0, mean_scale^2 I)`` (random, to break
    the symmetry between components: identical components get identical gradients and
    never separate), the weights are uniform, and every component has the same std
    ``sqrt(1 - mean_scale^2)``, so that in expectation over the initial draw the
    marginal covariance is ``I`` and the prior starts comparable to ``N(0, I)``.

    Args:
        latent_dim: dimension ``D``.
        num_components: number of components ``C``.
        mean_scale: spread of the initial means, in ``[0, 1)`` (default 0.5).

    References:
        Tomczak & Welling 2018, arXiv:1705.07120 (the mixture-of-Gaussians prior as the
        non-amortised baseline of the VampPrior, section 2.2).
    """

    def __init__(self, latent_dim: int, num_components: int, mean_scale: float = 0.5) -> None:
        super().__init__(latent_dim)
        if int(num_components) < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if not 0.0 <= mean_scale < 1.0:
            raise ValueError(f"mean_scale must be in [0, 1), got {mean_scale}")
        self.num_components = int(num_components)
        c, d = self.num_components, self.latent_dim
        self.loc = nn.Parameter(mean_scale * torch.randn(c, d))
        self.log_scale = nn.Parameter(torch.full((c, d), 0.5 * math.log1p(-(mean_scale**2))))
        self.logits = nn.Parameter(torch.zeros(c))

    def log_prob(self, z: Tensor) -> Tensor:
        """``(*lead, D) -> (*lead)``, fully normalised."""
        self.check_latent(z)
        log_w = torch.log_softmax(self.logits, -1)
        return _mixture_log_prob(z, self.loc, self.log_scale, log_w)

    def log_prob_chain(self, z: Tensor) -> Tensor:
        """Exact chain-rule terms ``log p(z_d | z_<d)`` ``(*lead, D)`` (see
        :meth:`Prior.log_prob_chain`)."""
        self.check_latent(z)
        log_w = torch.log_softmax(self.logits, -1)
        return _mixture_log_prob_chain(z, self.loc, self.log_scale, log_w)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``(n, D)`` draws (the component choice is discrete, so not reparameterised)."""
        return _sample_mixture(_check_n(n), self.loc, self.log_scale, self.logits, temperature)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}"


Encode = Callable[[Tensor], tuple[Tensor, Tensor]]

_ACTIVATIONS = ("hardtanh", "sigmoid", "none")


class VampPrior(Prior):
    """Variational mixture of posteriors: ``p(z) = (1/K) sum_k q0(z | u_k)``.

    The components are the encoder's diagonal Gaussian evaluated at ``K`` learned
    pseudo-inputs ``u_k``. For a flow posterior the components are the flow's *base*
    Gaussian ``q0(z | u_k)``, not the full flow posterior: that keeps ``log p(z)`` a
    closed-form mixture (the paper's Gaussian-posterior formulation).

    Pseudo-inputs are stored unconstrained and passed through ``activation`` so they
    stay in the data range: ``"hardtanh"`` clips to ``[0, 1]`` as in the paper,
    ``"sigmoid"`` squashes smoothly, ``"none"`` leaves them free. The initial values
    are the paper's default ``N(init_mean, init_std^2)`` (0.05, 0.01) in data space; use
    :meth:`init_from` to start from training data instead.

    The encoder is *not* owned by the prior: ``encode`` is kept outside ``_modules``
    (stored with ``object.__setattr__``), so a model holding both the encoder and this
    prior lists every encoder parameter once in ``state_dict()`` and ``parameters()``.
    Consequently the owner of the encoder must register it, and ``.to()`` on the prior
    alone does not move the encoder; ``.to()`` on the model moves both.

    Args:
        latent_dim: dimension ``D``.
        num_components: number of pseudo-inputs ``K``.
        pseudo_input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        encode: a callable (a bound method, or an ``nn.Module``) mapping inputs
            ``(K, *pseudo_input_shape)`` to the Gaussian ``(mu, log_std)``, each ``(K, D)``.
        activation: ``"hardtanh"`` (default), ``"sigmoid"`` or ``"none"``.
        init_mean: mean of the initial pseudo-inputs (data space).
        init_std: std of the initial pseudo-inputs (data space).

    References:
        Tomczak & Welling 2018, "VAE with a VampPrior", arXiv:1705.07120, section 2.2.
    """

    def __init__(
        self,
        latent_dim: int,
        num_components: int,
        pseudo_input_shape: Sequence[int],
        encode: Encode,
        activation: str = "hardtanh",
        init_mean: float = 0.05,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(latent_dim)
        if int(num_components) < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if not callable(encode):
            raise TypeError(f"VampPrior: encode must be callable, got {type(encode).__name__}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}"
            )
        self.num_components = int(num_components)
        self.pseudo_input_shape = tuple(int(s) for s in pseudo_input_shape)
        self.activation = activation
        # Bypass nn.Module.__setattr__: registering an nn.Module (or the module behind a
        # bound method) here would duplicate the encoder's parameters in state_dict.
        object.__setattr__(self, "_encode", encode)
        init = init_mean + init_std * torch.randn(self.num_components, *self.pseudo_input_shape)
        self.pseudo_inputs_raw = nn.Parameter(self._to_raw(init))

    @property
    def encode(self) -> Encode:
        """The encoder callable (not a registered sub-module)."""
        return self._encode

    def _to_raw(self, values: Tensor) -> Tensor:
        # Inverse of the activation on its range: hardtanh is the identity on [0, 1].
        if self.activation == "sigmoid":
            eps = torch.finfo(values.dtype).eps
            return torch.logit(values.clamp(eps, 1 - eps))
        return values.clone()

    def pseudo_inputs(self) -> Tensor:
        """The pseudo-inputs in data space: ``(K, *pseudo_input_shape)``."""
        raw = self.pseudo_inputs_raw
        if self.activation == "hardtanh":
            return F.hardtanh(raw, 0.0, 1.0)
        if self.activation == "sigmoid":
            return torch.sigmoid(raw)
        return raw

    @torch.no_grad()
    def init_from(self, x: Tensor, noise_std: float = 0.01) -> None:
        """Set the pseudo-inputs to the first ``K`` rows of ``x`` plus Gaussian noise.

        As in the paper's data initialisation: shuffle ``x`` first if it is ordered.

        Args:
            x: data ``(N, *pseudo_input_shape)`` with ``N >= K``.
            noise_std: std of the noise added in data space (0.01 in the paper).
        """
        k = self.num_components
        if tuple(x.shape[1:]) != self.pseudo_input_shape or x.shape[0] < k:
            raise ShapeError(
                f"VampPrior.init_from: expected at least {k} inputs of shape "
                f"{self.pseudo_input_shape}, got {tuple(x.shape)}"
            )
        raw = self.pseudo_inputs_raw
        values = x[:k].to(device=raw.device, dtype=raw.dtype)
        values = values + noise_std * torch.randn_like(values)
        raw.copy_(self._to_raw(values))

    def components(self) -> tuple[Tensor, Tensor]:
        """Encode the pseudo-inputs: ``(mu, log_std)``, each ``(K, D)``.

        Without autograd and in eval mode the result is cached until a parameter it reads
        changes (see :meth:`_cache_key`): evaluation at k = 5000 scores every test image
        in several chunks, and re-encoding the K pseudo-inputs for each chunk cost more
        than scoring the chunk.
        """
        if torch.is_grad_enabled() or self.training:
            return self._encode_components()
        key = self._cache_key()
        if key is None:
            return self._encode_components()
        cached = self.__dict__.get("_components_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        value = self._encode_components()
        self.__dict__["_components_cache"] = (key, value)
        return value

    def _encode_parameters(self) -> list[Tensor] | None:
        """Every tensor ``encode`` reads (parameters and buffers), or None if unknown.

        ``encode`` may name them with ``read_tensors()`` (the builder's encode, which
        references modules without owning them); an ``nn.Module`` or a bound method of
        one is asked for its parameters and buffers; any other callable is unknown.
        """
        named = getattr(self._encode, "read_tensors", None)
        if callable(named):
            return list(named())
        owner = self._encode if isinstance(self._encode, nn.Module) else None
        owner = owner or getattr(self._encode, "__self__", None)
        if isinstance(owner, nn.Module):
            return [*owner.parameters(), *owner.buffers()]
        return None

    def _cache_key(self) -> tuple | None:
        # A tensor's version counter grows with every in-place change (optimiser steps,
        # load_state_dict's copy_), and a new tensor (.to(), reassignment) has a new data
        # pointer, so an unchanged key means unchanged parameters.
        tensors = self._encode_parameters()
        if tensors is None:
            return None
        tensors = [self.pseudo_inputs_raw, *tensors]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def _encode_components(self) -> tuple[Tensor, Tensor]:
        mu, log_std = self._encode(self.pseudo_inputs())
        expected = (self.num_components, self.latent_dim)
        if tuple(mu.shape) != expected or tuple(log_std.shape) != expected:
            raise ShapeError(
                f"VampPrior: encode must return (mu, log_std) each of shape {expected}, got "
                f"{tuple(mu.shape)} and {tuple(log_std.shape)}"
            )
        return mu, log_std

    def log_prob(self, z: Tensor) -> Tensor:
        """``log (1/K) sum_k q0(z | u_k)``: ``(*lead, D) -> (*lead)``, fully normalised."""
        self.check_latent(z)
        mu, log_std = self.components()
        log_w = z.new_full((self.num_components,), -math.log(self.num_components))
        return _mixture_log_prob(z, mu, log_std, log_w)

    def log_prob_chain(self, z: Tensor) -> Tensor:
        """Exact chain-rule terms ``log p(z_d | z_<d)`` ``(*lead, D)`` of the mixture (see
        :meth:`Prior.log_prob_chain`)."""
        self.check_latent(z)
        mu, log_std = self.components()
        log_w = z.new_full((self.num_components,), -math.log(self.num_components))
        return _mixture_log_prob_chain(z, mu, log_std, log_w)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``(n, D)`` draws: a uniformly chosen pseudo-input, then ``q0(z | u_k)``."""
        mu, log_std = self.components()
        return _sample_mixture(_check_n(n), mu, log_std, None, temperature)

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, num_components={self.num_components}, "
            f"pseudo_input_shape={self.pseudo_input_shape}, activation={self.activation!r}, "
            f"encode={getattr(self._encode, '__qualname__', type(self._encode).__name__)}"
        )


def _flow_prior(
    latent_dim: int, flow: str, num_layers: int = 4, hidden: int = 64, **options: object
) -> FlowPrior:
    """``PRIORS["flow"]``: :meth:`FlowPrior.from_registry` with the family as ``flow``."""
    return FlowPrior.from_registry(latent_dim, flow, num_layers, hidden, **options)


PRIORS: dict[str, Callable[..., Prior]] = {
    "standard_normal": StandardNormalPrior,
    "learned_gaussian": LearnedGaussianPrior,
    "flow": _flow_prior,
    "mog": MixtureOfGaussiansPrior,
    "vamp": VampPrior,
}
"""Name -> constructor ``(latent_dim, **kw) -> Prior``; see :func:`build_prior`."""


def prior_names() -> list[str]:
    """The registered prior names, sorted."""
    return sorted(PRIORS)


def build_prior(name: str, latent_dim: int, **kw: object) -> Prior:
    """Build a registered prior by name.

    Keyword arguments per name: ``standard_normal`` and ``learned_gaussian`` take none;
    ``flow`` takes ``flow`` (a registered family with a density direction),
    ``num_layers``, ``hidden`` and that family's options; ``mog`` takes
    ``num_components`` and ``mean_scale``; ``vamp`` takes ``num_components``,
    ``pseudo_input_shape`` and ``encode`` (required) and ``activation``, ``init_mean``,
    ``init_std``.

    Args:
        name: a key of :data:`PRIORS`.
        latent_dim: dimension ``D``.
        **kw: constructor arguments (see above).

    Returns:
        The prior, a :class:`Prior` with ``latent_dim == D``.

    Raises:
        ValueError: for an unknown name, an unknown keyword (naming the allowed ones), or
            a missing required keyword.
    """
    try:
        ctor = PRIORS[name]
    except KeyError:
        raise ValueError(
            f"unknown prior {name!r}; registered priors: {', '.join(prior_names())}"
        ) from None
    params = list(inspect.signature(ctor).parameters.values())[1:]  # skip latent_dim
    named = {p.name: p for p in params if p.kind is not p.VAR_KEYWORD}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = sorted(set(kw) - set(named))
    if unknown and not open_ended:
        raise ValueError(
            f"prior {name!r}: unknown option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(named) or 'none'}"
        )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in kw]
    if missing:
        raise ValueError(f"prior {name!r}: missing required option(s) {', '.join(missing)}")
    return ctor(latent_dim, **kw)
