"""Observation models ``p(x | z)``: the decoder's output parameters -> a distribution over x.

A likelihood is a (usually parameter-free) ``nn.Module`` with two methods:

- ``param_shape(x_shape)``: the per-example shape of the parameters the decoder must output
  for data of shape ``x_shape``;
- ``forward(params)``: a ``torch.distributions.Distribution`` over x whose ``log_prob(x)`` is
  fully normalised and summed over the event dimensions, with ``params`` of shape
  ``(*lead, *param_shape)`` and ``x`` of shape ``(*x_lead, *x_shape)`` broadcastable to
  ``lead`` (the VAE passes params ``(K, B, ...)`` and x ``(B, ...)``; the result is
  ``(K, B)``), ``sample()`` of shape ``(*lead, *x_shape)`` and a ``mean`` for
  reconstruction grids.

The number of event dimensions is a constructor argument (``event_ndim``, 3 for images
``(C, H, W)``, 1 for flat vectors) because ``forward`` sees only the parameters. Parameters
are split along the first event dimension (the channel axis of an image).

Data conventions:

- :class:`Bernoulli`: binary x in {0, 1}; parameters are logits.
- :class:`Gaussian`: real-valued x.
- :class:`DiscretizedLogistic`, :class:`DiscretizedLogisticMixture`: 8-bit data given as
  **floats in [0, 1] on the grid k/255** (``uint8 / 255``, as torchvision's ``ToTensor``
  gives it). Internally x is mapped to the [-1, 1] scale of PixelCNN++ (``y = 2x - 1``,
  bin half-width ``1/255``), and the decoder's means and log-scales live in that scale, so
  a zero output means mid-grey with scale 1. Samples come back on the same k/255 grid.

Because the 8-bit discretisation is inside the discrete likelihoods, bits/dim is simply
``-log p(x) / (D ln 2)`` (:func:`vaeflow.models.bounds.nats_to_bits_per_dim`), with no
``log 256`` offset.

References:
    Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114.
    Salimans et al. 2017, "PixelCNN++", arXiv:1701.05517 (discretised logistic mixture with
    linear channel dependence).
    Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow",
    arXiv:1606.04934 (discretised logistic likelihood for CIFAR-10 VAEs).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli as _TorchBernoulli
from torch.distributions import Distribution, Independent, Normal

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "DiscretizedLogistic",
    "DiscretizedLogisticDistribution",
    "DiscretizedLogisticMixture",
    "DiscretizedLogisticMixtureDistribution",
    "Gaussian",
    "build_likelihood",
    "likelihood_names",
]

NUM_BINS = 256
# Half-width of one 8-bit bin on the [-1, 1] scale: the grid 2k/255 - 1 has spacing 2/255.
_HALF_BIN = 1.0 / 255.0
_LOG_BIN_WIDTH = math.log(2.0 * _HALF_BIN)
# Below this bin width (in units of the scale) log(1 - e^-d) switches to its series in log d,
# whose first dropped term d^4/2880 is far below float64 resolution there.
_SMALL_D = 1e-4


# ----------------------------------------------------------------------------- helpers


def _check_event_ndim(event_ndim: int) -> int:
    if not isinstance(event_ndim, int) or event_ndim < 1:
        raise ValueError(f"event_ndim must be an int >= 1, got {event_ndim!r}")
    return event_ndim


def _check_x_shape(name: str, x_shape: Sequence[int], event_ndim: int) -> tuple[int, ...]:
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != event_ndim:
        raise ValueError(
            f"{name}: x_shape {x_shape} has {len(x_shape)} dims but the likelihood was built "
            f"with event_ndim={event_ndim}; pass event_ndim={len(x_shape)}"
        )
    return x_shape


def _check_params(name: str, params: Tensor, event_ndim: int) -> None:
    if params.dim() < event_ndim:
        raise ValueError(
            f"{name}: params of shape {tuple(params.shape)} have fewer than "
            f"event_ndim={event_ndim} dims"
        )


def _split_channels(params: Tensor, sizes: Sequence[int], event_ndim: int) -> list[Tensor]:
    """Split ``params`` along its first event dimension (the channel axis)."""
    dim = params.dim() - event_ndim
    if params.shape[dim] != sum(sizes):
        raise ValueError(
            f"expected {sum(sizes)} parameter channels along dim {dim}, "
            f"got params of shape {tuple(params.shape)}"
        )
    return list(torch.split(params, list(sizes), dim=dim))


def _sum_event(t: Tensor, event_ndim: int) -> Tensor:
    return t.sum(dim=tuple(range(-event_ndim, 0))) if event_ndim else t


def _check_grid_data(name: str, x: Tensor, event_shape: torch.Size, validate: bool) -> None:
    """Shape check always; value check (in [0, 1], on the k/255 grid) when ``validate``."""
    n = len(event_shape)
    if x.dim() < n or x.shape[x.dim() - n :] != event_shape:
        raise ValueError(f"{name}: expected x of shape (*, {tuple(event_shape)}), got {x.shape}")
    if validate:
        # One host sync; it catches the two common mistakes: 0..255 integers or [-1, 1]
        # data, and dequantised (off-grid) data fed to a discrete likelihood.
        k = x * 255.0
        bad = (x < 0) | (x > 1) | ((k - k.round()).abs() > 1e-3)
        if bool(bad.any()):
            raise ValueError(
                f"{name}: x must be floats in [0, 1] on the grid k/255 "
                f"(got min {x.min().item():.4g}, max {x.max().item():.4g}); "
                "pass validate=False to skip this check"
            )


def _bin_index(x: Tensor) -> Tensor:
    """k in {0..255} as a float tensor, from x on the k/255 grid."""
    return (x * 255.0).round().clamp(0.0, 255.0)


def _bin_centre(k: Tensor) -> Tensor:
    """Centre of bin k on the [-1, 1] scale."""
    return k * (2.0 / 255.0) - 1.0


def _log1mexp(d: Tensor, log_d: Tensor) -> Tensor:
    """``log(1 - exp(-d))`` for ``d > 0``, accurate for every d (``log_d = log d`` given).

    Uses ``log(-expm1(-d))`` for d <= ln 2 and ``log1p(-exp(-d))`` above (Maechler 2012,
    "Accurately computing log(1 - exp(-|a|))", CRAN Rmpfr vignette), and below 1e-4 the
    series ``log d - d/2 + d^2/24`` with ``log d`` taken from log space, because there d
    itself may underflow (huge scales).
    """
    # Each branch sees inputs clamped into its own range so that the branch not taken by
    # torch.where never produces inf/NaN (whose zero gradient would still turn into NaN).
    d_small = d.clamp(max=_SMALL_D)
    small = log_d - 0.5 * d_small + d_small * d_small / 24.0
    d_mid = d.clamp(min=_SMALL_D, max=math.log(2.0))
    mid = torch.log(-torch.expm1(-d_mid))
    d_big = d.clamp(min=math.log(2.0))
    big = torch.log1p(-torch.exp(-d_big))
    return torch.where(d < _SMALL_D, small, torch.where(d <= math.log(2.0), mid, big))


def _discretized_logistic_log_pmf(k: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability of bin k under a logistic(loc, exp(log_scale)) discretised
    on the 256-bin grid of [-1, 1], the edge bins extending to -inf and +inf.

    With ``a = (c + h - loc)/s`` and ``b = (c - h - loc)/s`` for bin centre c and half-width
    h, the mass of an interior bin is ``sigmoid(a) - sigmoid(b)``, which we evaluate as
    ``log sigmoid(a) + log sigmoid(-b) + log(1 - exp(-(a - b)))``: an exact identity whose
    three terms never cancel catastrophically, so no mid-point density fallback is needed
    (PixelCNN++ needs one because it subtracts CDFs). ``a - b = 2h/s`` is computed directly
    from ``log_scale`` rather than as a difference. The edge bins are ``log sigmoid(a)``
    (k = 0) and ``log sigmoid(-b)`` (k = 255).

    Args:
        k: bin indices in {0..255} (float), any shape broadcastable with loc/log_scale.
        loc: location on the [-1, 1] scale.
        log_scale: log of the logistic scale on the [-1, 1] scale.

    Returns:
        log P(k), the broadcast shape, in nats (exactly normalised over k).
    """
    centre = _bin_centre(k)
    inv_s = torch.exp(-log_scale)
    centred = centre - loc
    a = (centred + _HALF_BIN) * inv_s
    b = (centred - _HALF_BIN) * inv_s
    log_d = _LOG_BIN_WIDTH - log_scale
    log_width = _log1mexp(torch.exp(log_d), log_d)
    upper = F.logsigmoid(a)  # log P(X <= c + h)
    lower = F.logsigmoid(-b)  # log P(X > c - h)
    interior = upper + lower + log_width
    return torch.where(k < 0.5, upper, torch.where(k > 254.5, lower, interior))


def _discretized_logistic_mean(loc: Tensor, log_scale: Tensor, chunk: int = 32) -> Tensor:
    """Exact mean (on the [0, 1] grid scale) of the discretised logistic.

    ``E[k] = sum_{j=1}^{255} P(k >= j) = sum_j sigmoid((loc - e_j)/s)`` with ``e_j`` the
    lower edge of bin j; the sum runs in chunks of edges to bound memory.
    """
    inv_s = torch.exp(-log_scale)
    total = torch.zeros_like(loc * inv_s)
    edges = _bin_centre(torch.arange(1, NUM_BINS, dtype=loc.dtype, device=loc.device)) - _HALF_BIN
    for start in range(0, edges.numel(), chunk):
        e = edges[start : start + chunk].reshape(-1, *([1] * total.dim()))
        total = total + torch.sigmoid((loc - e) * inv_s).sum(0)
    return total / 255.0


def _sample_discretized_logistic(loc: Tensor, log_scale: Tensor) -> Tensor:
    """Exact sample of bin indices k (float, {0..255}) for each element of loc/log_scale."""
    # Rounding a continuous logistic draw to the nearest bin centre, with clamping for the
    # open-ended edge bins, is exactly the discretised distribution.
    # torch.rand draws from [0, 1): only u = 0 needs guarding against log(0).
    tiny = torch.finfo(loc.dtype).tiny
    u = torch.rand(loc.shape, dtype=loc.dtype, device=loc.device).clamp(min=tiny)
    y = loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return ((y + 1.0) * 127.5).round().clamp(0.0, 255.0)


def _clamp_log_scale(log_scale: Tensor, min_log_scale: float | None) -> Tensor:
    return log_scale if min_log_scale is None else log_scale.clamp(min=min_log_scale)


# ----------------------------------------------------------------------------- distributions


class DiscretizedLogisticDistribution(Distribution):
    """Independent discretised logistics over 8-bit data given as floats on the k/255 grid.

    Args:
        loc: locations on the [-1, 1] scale, shape ``(*batch, *event)``.
        log_scale: log-scales on the [-1, 1] scale (already floored), same shape as ``loc``.
        event_ndim: how many trailing dims form one example.
        validate: check in ``log_prob`` that x lies on the k/255 grid in [0, 1].

    ``log_prob(x)``: x ``(*x_batch, *event)`` broadcastable to batch -> ``(*batch)``.
    ``sample(shape)``: ``(*shape, *batch, *event)`` on the k/255 grid. ``mean``: exact,
    ``(*batch, *event)`` in [0, 1].

    References:
        Kingma et al. 2016, arXiv:1606.04934; Salimans et al. 2017, arXiv:1701.05517.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self, loc: Tensor, log_scale: Tensor, event_ndim: int, validate: bool = True
    ) -> None:
        _check_event_ndim(event_ndim)
        loc, log_scale = torch.broadcast_tensors(loc, log_scale)
        self.loc, self.log_scale, self.validate = loc, log_scale, validate
        n = loc.dim() - event_ndim
        super().__init__(loc.shape[:n], loc.shape[n:], validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        _check_grid_data("DiscretizedLogistic", value, self.event_shape, self.validate)
        log_p = _discretized_logistic_log_pmf(_bin_index(value), self.loc, self.log_scale)
        return _sum_event(log_p, len(self.event_shape))

    @torch.no_grad()
    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.loc.shape
        k = _sample_discretized_logistic(self.loc.expand(shape), self.log_scale.expand(shape))
        return k / 255.0

    @property
    def mean(self) -> Tensor:
        return _discretized_logistic_mean(self.loc, self.log_scale)


def _coupling_pairs(num_channels: int) -> list[tuple[int, int]]:
    """Pairs (c, j), j < c, in the order their coefficients appear: (1,0), (2,0), (2,1), ..."""
    return [(c, j) for c in range(num_channels) for j in range(c)]


class DiscretizedLogisticMixtureDistribution(Distribution):
    """PixelCNN++ mixture of discretised logistics with linear dependence between channels.

    Per pixel, ``p(x) = sum_m pi_m prod_c DL(k_c; mu_{c,m} + sum_{j<c} alpha_{c,j,m} y_j,
    s_{c,m})`` where ``y_j = 2 x_j - 1`` is the (discrete) value of an earlier channel, so
    the joint over the C channels of a pixel is exactly normalised.

    Args:
        logits: mixture logits, shape ``(*batch, M, *spatial)``.
        loc: means on the [-1, 1] scale, ``(*batch, C, M, *spatial)``.
        log_scale: floored log-scales on the [-1, 1] scale, same shape as ``loc``.
        coeffs: coupling coefficients in (-1, 1), ``(*batch, P, M, *spatial)`` with
            ``P = C(C-1)/2`` in the pair order (c, j) = (1,0), (2,0), (2,1), ..., or
            ``P = 0`` for independent channels.
        event_ndim: dims of one example, ``1 + len(spatial)`` (the event is
            ``(C, *spatial)``).
        validate: check in ``log_prob`` that x lies on the k/255 grid in [0, 1].

    ``log_prob(x)``: x ``(*x_batch, C, *spatial)`` broadcastable to batch -> ``(*batch)``.
    ``sample(shape)``: ``(*shape, *batch, C, *spatial)`` on the k/255 grid (exact ancestral
    sampling: component, then channels in order, conditioning on the sampled bins).
    ``mean``: ``(*batch, C, *spatial)`` in [0, 1]. Exact without channel coupling (C = 1,
    ``P = 0`` or all coefficients zero); otherwise each component feeds the mean of the
    earlier channels through the coupling, ``E[x_c | m] ~ E_DL[mu_cm + sum_j alpha_cjm
    E[y_j | m]]``, which ignores the curvature of the conditional mean: good for
    reconstruction grids, not for metrics.

    References:
        Salimans et al. 2017, "PixelCNN++", arXiv:1701.05517, sections 2.1-2.2.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        log_scale: Tensor,
        coeffs: Tensor,
        event_ndim: int,
        validate: bool = True,
    ) -> None:
        _check_event_ndim(event_ndim)
        batch_ndim = logits.dim() - event_ndim
        if batch_ndim < 0 or loc.dim() != logits.dim() + 1 or loc.shape != log_scale.shape:
            raise ValueError(
                f"inconsistent mixture parameter shapes: logits {tuple(logits.shape)}, "
                f"loc {tuple(loc.shape)}, log_scale {tuple(log_scale.shape)}"
            )
        c = loc.shape[batch_ndim]
        if coeffs.shape[batch_ndim] not in (0, c * (c - 1) // 2):
            raise ValueError(
                f"expected 0 or {c * (c - 1) // 2} coupling channels, got {coeffs.shape}"
            )
        self.logits, self.loc, self.log_scale, self.coeffs = logits, loc, log_scale, coeffs
        self.validate = validate
        self._spatial_ndim = event_ndim - 1
        super().__init__(
            logits.shape[:batch_ndim],
            loc.shape[batch_ndim : batch_ndim + 1] + logits.shape[batch_ndim + 1 :],
            validate_args=False,
        )

    @property
    def num_channels(self) -> int:
        return self.event_shape[0]

    def _pairs(self) -> list[tuple[int, int]]:
        return (
            _coupling_pairs(self.num_channels)
            if self.coeffs.shape[-self._spatial_ndim - 2]
            else []
        )

    def _coupled_locs(self, y: Tensor) -> Tensor:
        """Means after channel coupling, ``(*, C, M, *spatial)``, given ``y (*, C, 1, *sp)``."""
        cdim = -self._spatial_ndim - 2  # the channel axis of loc, coeffs and y
        locs = [self.loc.select(cdim, c) for c in range(self.num_channels)]
        for p, (c, j) in enumerate(self._pairs()):
            locs[c] = locs[c] + self.coeffs.select(cdim, p) * y.select(cdim, j)
        # Channel 0 has no coupling term, so its mean lacks x's batch dims: broadcast first.
        return torch.stack(torch.broadcast_tensors(*locs), dim=cdim)

    def log_prob(self, value: Tensor) -> Tensor:
        _check_grid_data("DiscretizedLogisticMixture", value, self.event_shape, self.validate)
        mdim = -self._spatial_ndim - 1  # the mixture axis once channels are summed out
        k = _bin_index(value).unsqueeze(mdim)  # (*, C, 1, *spatial)
        loc = self._coupled_locs(_bin_centre(k))
        log_p = _discretized_logistic_log_pmf(k, loc, self.log_scale).sum(mdim - 1)
        log_p = log_p + torch.log_softmax(self.logits, dim=mdim)
        return _sum_event(torch.logsumexp(log_p, dim=mdim), self._spatial_ndim)

    @torch.no_grad()
    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        lead = len(sample_shape) + len(self.batch_shape)
        logits = self.logits.expand(sample_shape + self.logits.shape)
        # Gumbel-max picks one component per pixel.
        u = torch.rand_like(logits).clamp(min=torch.finfo(logits.dtype).tiny)  # [tiny, 1)
        comp = torch.argmax(logits - torch.log(-torch.log(u)), dim=lead)
        one_hot = F.one_hot(comp, logits.shape[lead]).movedim(-1, lead).unsqueeze(lead)
        one_hot = one_hot.to(logits.dtype)  # (*S, *batch, 1, M, *spatial)

        def pick(t: Tensor) -> Tensor:  # (*batch, X, M, *sp) -> (*S, *batch, X, *sp)
            return (t * one_hot).sum(lead + 1)

        loc, log_scale, coeffs = pick(self.loc), pick(self.log_scale), pick(self.coeffs)
        ks: list[Tensor] = []
        pairs = self._pairs()
        for c in range(self.num_channels):
            mu = loc.select(lead, c)
            for p, (cc, j) in enumerate(pairs):
                if cc == c:
                    mu = mu + coeffs.select(lead, p) * _bin_centre(ks[j])
            ks.append(_sample_discretized_logistic(mu, log_scale.select(lead, c)))
        return torch.stack(ks, dim=lead) / 255.0

    @property
    def mean(self) -> Tensor:
        cdim = -self._spatial_ndim - 2
        pairs = self._pairs()
        means: list[Tensor] = []  # per channel, (*batch, M, *spatial) on the [0, 1] scale
        for c in range(self.num_channels):
            mu = self.loc.select(cdim, c)
            for p, (cc, j) in enumerate(pairs):
                if cc == c:
                    mu = mu + self.coeffs.select(cdim, p) * (2.0 * means[j] - 1.0)
            means.append(_discretized_logistic_mean(mu, self.log_scale.select(cdim, c)))
        weights = torch.softmax(self.logits, dim=cdim + 1)
        return torch.stack([(w_m * weights).sum(cdim + 1) for w_m in means], dim=cdim + 1)


# ----------------------------------------------------------------------------- likelihoods


class _LogitBernoulli(_TorchBernoulli):
    """``torch.distributions.Bernoulli`` with a faster ``log_prob`` when no gradient is needed.

    ``log p(x | l) = x l - softplus(l)``. torch computes ``softplus`` with ``log1p``, which is
    not vectorised in its CPU kernels (about 20 ns per element on one core against 1 ns for
    ``exp``), and in the k = 5000 test-NLL estimator this likelihood (784 terms per
    importance sample) costs more than the decoder's matrix products. Without autograd
    this evaluates ``x l - max(l, 0) - log(1 + exp(-|l|))`` with in-place operations
    (about 4 ns per element): ``log(1 + e)`` for ``e = exp(-|l|)`` in ``(0, 1]`` is within
    one float32 ulp of ``log1p(e)``, so the result matches torch's to ~3e-7 nats per pixel
    (tested against float64). With autograd, torch's own (exact-gradient) formula is used:
    the decomposition above has the wrong subgradient at ``l = 0`` exactly. "With
    autograd" is grad mode, not ``requires_grad``: under ``torch.func.vmap`` (stacked
    training) the per-run tensors do not report the outer graph's ``requires_grad``, and
    the in-place path would overwrite values that graph saved.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        logits = self.logits
        if torch.is_grad_enabled():
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        t = logits.abs().neg_().exp_().add_(1.0).log_()  # log(1 + exp(-|l|))
        out = torch.mul(logits, value)  # broadcasts value to the logits' shape
        return out.sub_(logits.clamp_min(0.0)).sub_(t)


class Bernoulli(nn.Module):
    """Bernoulli likelihood for binary data, parameterised by logits (never probabilities).

    Args:
        event_ndim: trailing dims of one example (3 for ``(C, H, W)``, 1 for flat vectors).
        validate: let ``torch.distributions`` check that x is in {0, 1}.

    ``param_shape(x_shape) == x_shape``; ``forward(params (*lead, *x_shape))`` returns
    ``Independent(torch.distributions.Bernoulli(logits=params), event_ndim)``: ``log_prob``
    ``-> (*lead)`` (stable for any finite logits: it is ``-BCE-with-logits``), ``mean`` are
    the probabilities ``(*lead, *x_shape)``.

    References:
        Kingma & Welling 2014, arXiv:1312.6114, appendix C.1.
    """

    def __init__(self, event_ndim: int = 3, validate: bool = True) -> None:
        super().__init__()
        self.event_ndim = _check_event_ndim(event_ndim)
        self.validate = validate

    def param_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        return _check_x_shape("Bernoulli", x_shape, self.event_ndim)

    def forward(self, params: Tensor) -> Independent:
        _check_params("Bernoulli", params, self.event_ndim)
        # Parameters are not validated (a NaN-check pass over every logit, which the
        # training loop's non-finite-loss check already covers); the data still are: with
        # ``validate`` log_prob rejects x outside {0, 1}.
        base = _LogitBernoulli(logits=params, validate_args=False)
        base._validate_args = self.validate
        return Independent(base, self.event_ndim, validate_args=False)


class Gaussian(nn.Module):
    """Diagonal Gaussian likelihood for real-valued data, fully normalised.

    Args:
        event_ndim: trailing dims of one example.
        fixed_std: if given, a fixed standard deviation and the decoder outputs means only.
        learn_global_std: if True, one learned log-std shared by every dimension (a module
            parameter, initialised to std 1) and the decoder outputs means only.

    With neither option the decoder outputs per-dimension means and log-stds, stacked along
    the first event dim: ``param_shape((C, *rest)) == (2C, *rest)``, layout
    ``[means (C) | log-stds (C)]``. Otherwise ``param_shape(x_shape) == x_shape``.
    ``forward(params)`` returns ``Independent(Normal(mean, std), event_ndim)``; ``log_prob``
    ``-> (*lead)``, ``mean`` ``(*lead, *x_shape)``.

    Note that a learned per-dimension std makes the likelihood unbounded on continuous data;
    prefer 8-bit likelihoods for images.

    References:
        Kingma & Welling 2014, arXiv:1312.6114, appendix C.2.
    """

    def __init__(
        self,
        event_ndim: int = 3,
        fixed_std: float | None = None,
        learn_global_std: bool = False,
    ) -> None:
        super().__init__()
        self.event_ndim = _check_event_ndim(event_ndim)
        if fixed_std is not None and learn_global_std:
            raise ValueError("Gaussian: give either fixed_std or learn_global_std, not both")
        if fixed_std is not None and not fixed_std > 0:
            raise ValueError(f"Gaussian: fixed_std must be positive, got {fixed_std}")
        self.fixed_std = fixed_std
        self.log_std = nn.Parameter(torch.zeros(())) if learn_global_std else None

    @property
    def _per_dim_std(self) -> bool:
        return self.fixed_std is None and self.log_std is None

    def param_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        x_shape = _check_x_shape("Gaussian", x_shape, self.event_ndim)
        if self._per_dim_std:
            return (2 * x_shape[0], *x_shape[1:])
        return x_shape

    def forward(self, params: Tensor) -> Independent:
        _check_params("Gaussian", params, self.event_ndim)
        if self._per_dim_std:
            c = params.shape[params.dim() - self.event_ndim]
            if c % 2:
                raise ValueError(f"Gaussian: expected an even channel count, got {params.shape}")
            loc, log_std = _split_channels(params, [c // 2, c // 2], self.event_ndim)
            std = torch.exp(log_std)
        elif self.log_std is not None:
            loc, std = params, torch.exp(self.log_std.to(params)).expand_as(params)
        else:
            loc, std = params, torch.full_like(params, self.fixed_std)
        return Independent(Normal(loc, std, validate_args=False), self.event_ndim)


# Initial learned log-scale: the IAF code's ``dec_log_stdv = 0`` (scale 1 on its data scale,
# where one 8-bit bin is 1/256 wide) in vaeflow's [-1, 1] units (one bin is 2/255 wide).
_IAF_INIT_LOG_SCALE = math.log((2.0 / 255.0) / (1.0 / 256.0))
_DL_SCALES = ("per_pixel", "per_channel", "global")


class DiscretizedLogistic(nn.Module):
    """Discretised logistic likelihood for 8-bit data (x as floats on the k/255 grid).

    Each dimension is a logistic on the [-1, 1] scale, integrated over its bin
    ``[y - 1/255, y + 1/255]``; the bins of 0 and 255 extend to -inf and +inf, so the 256
    probabilities sum to exactly one.

    Args:
        event_ndim: trailing dims of one example.
        min_log_scale: floor on the log-scale (the [-1, 1] scale; -7 as in PixelCNN++), or
            None for no floor.
        validate: check in ``log_prob`` that x lies in [0, 1] on the k/255 grid.
        scale: where the log-scales come from. ``per_pixel`` (default): the decoder
            outputs one per dimension. ``per_channel``: one learned scalar per input
            channel, a parameter of this module (Kingma et al. 2016, appendix C.5: "the
            log-scales log s_i are learned scalar parameter per input channel").
            ``global``: one learned scalar for the whole image (the IAF authors'
            TensorFlow code, ``dec_log_stdv``). Learned log-scales start at the code's
            initial value (scale 1 where a bin is 1/256 wide: ``log(512/255)`` here).
        num_channels: channels ``C`` of the data, the size of the ``per_channel``
            parameter (``vaeflow.models.build.build_model`` passes ``x_shape[0]``); ignored
            otherwise.

    ``param_shape((C, *rest))`` is ``(2C, *rest)`` for ``per_pixel``, layout ``[means (C) |
    log-scales (C)]`` on the [-1, 1] scale, and ``(C, *rest)`` (means only) with a learned
    scale. ``forward(params)`` returns a :class:`DiscretizedLogisticDistribution`.

    Unlike the IAF code, the edge bins extend to +-inf (so the pmf is normalised and the
    code's clipping of the means to the edge-bin centres is not needed), there is no
    ``1e-7`` added to each bin's mass, and data are on the k/255 grid of [-1, 1] rather
    than the code's ``(k + 0.5)/256 - 0.5``.

    References:
        Kingma et al. 2016, arXiv:1606.04934, appendix C.5; Salimans et al. 2017,
        arXiv:1701.05517, section 2.1.
    """

    def __init__(
        self,
        event_ndim: int = 3,
        min_log_scale: float | None = -7.0,
        validate: bool = True,
        scale: str = "per_pixel",
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.event_ndim = _check_event_ndim(event_ndim)
        self.min_log_scale = min_log_scale
        self.validate = validate
        if scale not in _DL_SCALES:
            raise ValueError(
                f"DiscretizedLogistic: scale must be one of {list(_DL_SCALES)}, got {scale!r}"
            )
        self.scale = scale
        self.log_scale: nn.Parameter | None = None
        if scale == "per_channel":
            if not isinstance(num_channels, int) or num_channels < 1:
                raise ValueError(
                    "DiscretizedLogistic: scale = 'per_channel' needs num_channels (the "
                    f"data's channel count), got {num_channels!r}"
                )
            self.log_scale = nn.Parameter(torch.full((num_channels,), _IAF_INIT_LOG_SCALE))
        elif scale == "global":
            self.log_scale = nn.Parameter(torch.tensor(_IAF_INIT_LOG_SCALE))

    def param_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        x_shape = _check_x_shape("DiscretizedLogistic", x_shape, self.event_ndim)
        if self.scale == "per_channel" and x_shape[0] != self.log_scale.shape[0]:
            raise ValueError(
                f"DiscretizedLogistic: {self.log_scale.shape[0]} per-channel log-scales but "
                f"data of shape {x_shape} have {x_shape[0]} channels"
            )
        if self.scale != "per_pixel":
            return x_shape
        return (2 * x_shape[0], *x_shape[1:])

    def forward(self, params: Tensor) -> DiscretizedLogisticDistribution:
        _check_params("DiscretizedLogistic", params, self.event_ndim)
        if self.log_scale is not None:
            loc = params
            # (C,) -> (C, 1, ..., 1) against the event (C, *spatial); () broadcasts as is.
            shape = (-1,) + (1,) * (self.event_ndim - 1) if self.log_scale.dim() else ()
            log_scale = self.log_scale.to(params).reshape(shape).expand_as(params)
        else:
            c = params.shape[params.dim() - self.event_ndim]
            if c % 2:
                raise ValueError(
                    f"DiscretizedLogistic: expected even channels, got {params.shape}"
                )
            loc, log_scale = _split_channels(params, [c // 2, c // 2], self.event_ndim)
        log_scale = _clamp_log_scale(log_scale, self.min_log_scale)
        return DiscretizedLogisticDistribution(loc, log_scale, self.event_ndim, self.validate)


class DiscretizedLogisticMixture(nn.Module):
    """PixelCNN++ mixture of M discretised logistics with linear channel coupling.

    Args:
        num_mixtures: M, the number of components per pixel.
        event_ndim: trailing dims of one example, ``(C, *spatial)``.
        channel_coupling: PixelCNN++'s linear dependence of channel c's mean on channels
            j < c (True), or independent channels given the component (False).
        min_log_scale: floor on the log-scales ([-1, 1] scale), or None.
        validate: check in ``log_prob`` that x lies in [0, 1] on the k/255 grid.

    Parameter layout along the first event dim, with ``P = C(C-1)/2`` (0 without coupling)
    and ``param_shape((C, *spatial)) == (M (1 + 2C + P), *spatial)`` (``10 M`` for RGB):

    - ``[0, M)``: mixture logits, component m at ``m``;
    - ``[M, M + CM)``: means on the [-1, 1] scale, channel c and component m at ``M + cM + m``;
    - ``[M + CM, M + 2CM)``: log-scales, same ordering;
    - ``[M + 2CM, M(1 + 2C + P))``: raw coupling coefficients, pair p at ``M + 2CM + pM + m``
      with pairs (c, j) = (1,0), (2,0), (2,1), ...; squashed by ``tanh`` into (-1, 1).

    References:
        Salimans et al. 2017, "PixelCNN++", arXiv:1701.05517, sections 2.1-2.2.
    """

    def __init__(
        self,
        num_mixtures: int = 10,
        event_ndim: int = 3,
        channel_coupling: bool = True,
        min_log_scale: float | None = -7.0,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(f"num_mixtures must be an int >= 1, got {num_mixtures!r}")
        self.num_mixtures = num_mixtures
        self.event_ndim = _check_event_ndim(event_ndim)
        self.channel_coupling = channel_coupling
        self.min_log_scale = min_log_scale
        self.validate = validate

    def _num_params(self, channels: int) -> int:
        pairs = channels * (channels - 1) // 2 if self.channel_coupling else 0
        return self.num_mixtures * (1 + 2 * channels + pairs)

    def param_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        x_shape = _check_x_shape("DiscretizedLogisticMixture", x_shape, self.event_ndim)
        return (self._num_params(x_shape[0]), *x_shape[1:])

    def forward(self, params: Tensor) -> DiscretizedLogisticMixtureDistribution:
        _check_params("DiscretizedLogisticMixture", params, self.event_ndim)
        cdim = params.dim() - self.event_ndim
        n = params.shape[cdim]
        channels = 1
        while self._num_params(channels) < n:
            channels += 1
        if self._num_params(channels) != n:
            raise ValueError(
                f"DiscretizedLogisticMixture: {n} parameter channels do not match any channel "
                f"count for num_mixtures={self.num_mixtures} (expected M(1 + 2C + P))"
            )
        m = self.num_mixtures
        pairs = n // m - 1 - 2 * channels
        logits, loc, log_scale, coeffs = _split_channels(
            params, [m, channels * m, channels * m, pairs * m], self.event_ndim
        )

        def per_channel(
            t: Tensor, count: int
        ) -> Tensor:  # (.., count*M, *sp) -> (.., count, M, *sp)
            return t.unflatten(cdim, (count, m))

        return DiscretizedLogisticMixtureDistribution(
            logits,
            per_channel(loc, channels),
            _clamp_log_scale(per_channel(log_scale, channels), self.min_log_scale),
            torch.tanh(per_channel(coeffs, pairs)),
            self.event_ndim,
            self.validate,
        )


# ----------------------------------------------------------------------------- registry

LIKELIHOODS: dict[str, Callable[..., nn.Module]] = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "discretized_logistic": DiscretizedLogistic,
    "discretized_logistic_mixture": DiscretizedLogisticMixture,
}


def likelihood_names() -> list[str]:
    """Registered likelihood names, sorted."""
    return sorted(LIKELIHOODS)


def build_likelihood(name: str, **kwargs: object) -> nn.Module:
    """Build a registered likelihood by name.

    Args:
        name: one of :data:`LIKELIHOODS` (``bernoulli``, ``gaussian``,
            ``discretized_logistic``, ``discretized_logistic_mixture``).
        **kwargs: constructor options of that class; unknown ones are an error naming the
            allowed ones.

    Returns:
        The likelihood module.
    """
    if name not in LIKELIHOODS:
        raise ValueError(
            f"unknown likelihood {name!r}; registered likelihoods: {', '.join(likelihood_names())}"
        )
    cls = LIKELIHOODS[name]
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"likelihood {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    return cls(**kwargs)
