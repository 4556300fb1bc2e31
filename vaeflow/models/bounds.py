"""Log-likelihood bounds from the three log-terms of a VAE, and the test-NLL estimator.

Everything here is a *bound* on ``log p(x)``: higher is better, in nats per example
(docs/design.md §3.3). Only the training loop negates. The model returns
:class:`Terms`, each ``(K, B)`` with ``K`` importance samples first:

    log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x),   z_k ~ q(z | x)
    ELBO    = mean_k log w_k                        (Kingma & Welling 2014, arXiv:1312.6114)
    IWAE_K  = logsumexp_k log w_k - log K           (Burda et al. 2016, arXiv:1509.00519)

``ELBO <= IWAE_K <= IWAE_{K'} <= log p(x)`` in expectation for ``K <= K'``;
:func:`log_likelihood` evaluates ``IWAE_K`` with large ``K`` (5000 by convention, as in
Burda et al. and van den Berg et al.) in chunks so memory stays flat in ``K``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Terms",
    "elbo",
    "iwae",
    "kl",
    "free_bits_kl",
    "log_likelihood",
    "log_likelihood_from_sampler",
    "log_likelihood_from_stats",
    "chunk_statistics",
    "LogLikelihood",
    "nats_to_bits_per_dim",
    "bits_per_dim_to_nats",
]


@dataclass(frozen=True)
class Terms:
    """The per-sample log-terms of a VAE.

    Attributes:
        log_px_z: ``log p(x | z_k)`` ``(K, B)``.
        log_pz: ``log p(z_k)`` ``(K, B)``.
        log_qz: ``log q(z_k | x)`` ``(K, B)``.
        log_pz_dims: per-dimension ``log p(z_k)`` ``(K, B, D)`` when the prior factorises
            over dimensions, else ``None``.
        log_qz_dims: per-dimension ``log q(z_k | x)`` ``(K, B, D)`` when the posterior
            factorises (diagonal Gaussian, no flow), else ``None``. Together with
            ``log_pz_dims`` they allow per-dimension free bits and KL-per-dimension plots.
        flow_logdet: ``log|det dz/d eps|`` of the posterior flow ``(K, B)`` (zeros
            without a flow), for logging how far the flow moves from its base; summed over
            the stochastic layers of a hierarchical model.
        layer_kl: for a hierarchical model (:mod:`vaeflow.models.hierarchy`), the
            single-sample KL of each stochastic layer, bottom (``z_1``) first, each
            ``(K, B)``: ``log q(z_l | z_{l-1}) - log p(z_l | z_{l+1})`` (the top layer's
            against the prior); they sum to :attr:`kl`. ``None`` for a one-layer VAE.
    """

    log_px_z: Tensor
    log_pz: Tensor
    log_qz: Tensor
    log_pz_dims: Tensor | None = None
    log_qz_dims: Tensor | None = None
    flow_logdet: Tensor | None = None
    layer_kl: tuple[Tensor, ...] | None = None

    def __post_init__(self) -> None:
        shape = self.log_px_z.shape
        if self.log_px_z.dim() != 2:
            raise ValueError(f"Terms must be (K, B); log_px_z has shape {tuple(shape)}")
        for name in ("log_pz", "log_qz"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"Terms: {name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {tuple(shape)} like log_px_z"
                )
        for i, t in enumerate(self.layer_kl or ()):
            if t.shape != shape:
                raise ValueError(
                    f"Terms: layer_kl[{i}] has shape {tuple(t.shape)}, expected "
                    f"{tuple(shape)} like log_px_z"
                )

    @classmethod
    def from_layers(
        cls,
        log_px_z: Tensor,
        log_p: Sequence[Tensor],
        log_q: Sequence[Tensor],
        log_p_dims: Tensor | None,
        log_q_dims: Tensor | None,
        flow_logdets: Sequence[Tensor],
    ) -> Terms:
        """The terms of a hierarchy from its layers' (or groups') terms, each ``(K, B)``:
        ``log p(z)`` and ``log q(z|x)`` summed over layers, ``layer_kl`` the per-layer
        ``log q - log p``; ``log_p_dims`` / ``log_q_dims`` already concatenated over the
        layers (or ``None``)."""
        return cls(
            log_px_z,
            sum(log_p),
            sum(log_q),
            log_p_dims,
            log_q_dims,
            sum(flow_logdets),
            tuple(q - p for q, p in zip(log_q, log_p, strict=True)),
        )

    @property
    def log_weights(self) -> Tensor:
        """``log w = log p(x|z) + log p(z) - log q(z|x)`` ``(K, B)``."""
        return self.log_px_z + self.log_pz - self.log_qz

    @property
    def kl(self) -> Tensor:
        """Single-sample KL estimates ``log q(z|x) - log p(z)`` ``(K, B)``."""
        return self.log_qz - self.log_pz

    @property
    def kl_dims(self) -> Tensor | None:
        """Per-dimension KL estimates ``(K, B, D)`` when both sides factorise, else None."""
        if self.log_pz_dims is None or self.log_qz_dims is None:
            return None
        return self.log_qz_dims - self.log_pz_dims


def kl(terms: Terms) -> Tensor:
    """Monte Carlo ``KL(q(z|x) || p(z))`` averaged over the K samples: ``(B,)``."""
    return terms.kl.mean(0)


def _batch_mean(per_example: Tensor, batch_splits: int) -> Tensor:
    """Mean over the batch ``(B, *)`` -> ``(1, *)``, or with ``batch_splits = S`` over each of
    ``S`` strided sub-batches (example ``i`` in sub-batch ``i mod S``), broadcast back to
    ``(B, *)``: Kingma et al.'s code floors each GPU's mean (its batch of 256 is 8 GPUs x 32
    images). Strided, not consecutive, so that under DDP a rank's strided shard
    ``x[rank::world]`` split ``S / world`` ways gives exactly its global sub-batches."""
    if batch_splits == 1:
        return per_example.mean(0, keepdim=True)
    b = per_example.shape[0]
    if batch_splits < 1 or b % batch_splits:
        raise ValueError(f"free bits: batch_splits={batch_splits} must be >= 1 and divide B={b}")
    parts = per_example.reshape(b // batch_splits, batch_splits, *per_example.shape[1:])
    return parts.mean(0, keepdim=True).expand_as(parts).reshape(per_example.shape)


def free_bits_kl(
    terms: Terms, free_bits: float | Tensor, group_size: int = 1, batch_splits: int = 1
) -> Tensor:
    """KL with "free bits" (Kingma et al. 2016, arXiv:1606.04934, appendix C.8).

    The latent dimensions are split into consecutive groups of ``group_size``; each
    group's KL ``KL_j`` (the single-sample estimate ``log q - log p`` summed over its
    dimensions, averaged over the K samples) is replaced by ``max(lambda_j,
    E_batch[KL_j])``: a group whose batch-averaged KL is below its floor contributes the
    constant floor (no gradient, so the encoder is not pushed to collapse it further).
    The floor is ``lambda_j = free_bits * group_size``: ``free_bits`` always means nats per
    latent dimension. One rule for every posterior: the per-dimension terms exist for a
    diagonal Gaussian and for autoregressive flow posteriors (``Terms.kl_dims``); with
    ``group_size == D`` (one group) the total KL is used and any posterior and prior work.

    Args:
        terms: log-terms ``(K, B)`` with ``kl_dims`` ``(K, B, D)`` unless one group.
        free_bits: floor per latent dimension, nats (a 0-dim tensor in a stack of runs:
            :mod:`vaeflow.run.stack` vmaps it, one floor per run).
        group_size: dimensions per group; must divide ``D``.
        batch_splits: the batch mean of each group's KL is taken over this many
            strided sub-batches separately (example ``i`` in sub-batch ``i mod S``; 1: the
            whole batch; ``S`` must divide ``B``).

    Returns:
        A per-example ``(B,)`` tensor whose batch mean equals the free-bits KL.

    Raises:
        ValueError: more than one group but the KL does not split over dimensions (a
            posterior or prior that does not factorise) — never a silent switch to a
            single group, which would be another objective.
    """
    kl_dims = terms.kl_dims
    if kl_dims is None:
        raise ValueError(
            "free bits per group of latent dimensions need a KL that splits over dimensions "
            "(a diagonal Gaussian or autoregressive-flow posterior and a prior with "
            "per-dimension terms: factorised, or split by the chain rule); "
            "this model's does not: set train.free_bits_group_size to the latent dimension "
            "(one group) or train.free_bits = 0"
        )
    d = kl_dims.shape[-1]
    if group_size < 1 or d % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide D={d}")
    groups = kl_dims.reshape(*kl_dims.shape[:-1], d // group_size, group_size).sum(-1)
    lam = free_bits * group_size  # a number, or a 0-dim tensor (one per run of a stack)
    per_example = groups.mean(0)  # (B, G)
    batch_mean = _batch_mean(per_example, batch_splits)  # (1 or B, G)
    floor = torch.zeros_like(per_example) + lam
    return torch.where(batch_mean < lam, floor, per_example).sum(-1)


def _free_bits_one_group(
    terms: Terms, free_bits: float | Tensor, num_dims: int, batch_splits: int = 1
) -> Tensor:
    """The whole latent vector as one group: ``max(free_bits * D, E_batch[KL])``."""
    per_example = terms.kl.mean(0)  # (B,)
    lam = free_bits * num_dims
    floor = torch.zeros_like(per_example) + lam
    return torch.where(_batch_mean(per_example, batch_splits) < lam, floor, per_example)


def elbo(
    terms: Terms,
    beta: float | Tensor = 1.0,
    free_bits: float | Tensor = 0.0,
    num_dims: int | None = None,
    group_size: int = 1,
    batch_splits: int = 1,
) -> Tensor:
    """Evidence lower bound ``E_q[log p(x|z)] - beta * KL``, per example ``(B,)``.

    Args:
        terms: the model's log-terms, each ``(K, B)``; the expectation averages over K.
        beta: weight of the KL term (KL warm-up anneals it 0 -> 1; Bowman et al. 2016,
            arXiv:1511.06349). With ``beta != 1`` or ``free_bits > 0`` the value is a
            training objective, not a bound: report ``elbo(terms)``.
        free_bits: "free bits" floor per latent dimension in nats (see
            :func:`free_bits_kl`); 0 disables it.
        num_dims: latent dimension ``D`` (needed with free bits when ``group_size`` is
            ``D``, i.e. one group, where the per-dimension terms are not used).
        group_size: free-bits group size (:func:`free_bits_kl`).
        batch_splits: sub-batches whose KL means are floored separately
            (:func:`free_bits_kl`).
    """
    rec = terms.log_px_z.mean(0)
    if isinstance(free_bits, Tensor) or free_bits > 0:  # a tensor floor: always applied
        if num_dims is not None and group_size == num_dims:
            return rec - beta * _free_bits_one_group(terms, free_bits, num_dims, batch_splits)
        return rec - beta * free_bits_kl(terms, free_bits, group_size, batch_splits)
    return rec - beta * kl(terms)


def iwae(terms: Terms) -> Tensor:
    """Importance-weighted bound ``logsumexp_k log w_k - log K``, per example ``(B,)``.

    With ``K = 1`` it equals the ELBO. Burda et al. 2016, arXiv:1509.00519, eq. 8.
    """
    k = terms.log_px_z.shape[0]
    return torch.logsumexp(terms.log_weights, dim=0) - math.log(k)


@dataclass(frozen=True)
class LogLikelihood:
    """Result of :func:`log_likelihood`, each ``(B,)`` in nats per example.

    Attributes:
        log_px: importance-sampled estimate ``IWAE_K`` of ``log p(x)`` (the test "NLL" is
            its negative).
        elbo: the ELBO averaged over the same ``K`` samples.
        kl: the Monte Carlo KL averaged over the same samples.
        log_px_z: the reconstruction term averaged over the same samples.
        ess: effective sample size of the normalised importance weights, in ``[1, K]``.
        k: number of importance samples.
    """

    log_px: Tensor
    elbo: Tensor
    kl: Tensor
    log_px_z: Tensor
    ess: Tensor
    k: int


class SupportsTermsSampler(Protocol):
    """Anything that can encode ``x`` once and then draw posterior samples in chunks."""

    def terms_sampler(self, x: Tensor) -> Callable[[int], Terms]: ...


def log_likelihood(
    model: SupportsTermsSampler,
    x: Tensor,
    k: int = 5000,
    chunk: int = 500,
    compile: bool = False,
) -> LogLikelihood:
    """Importance-sampled test log-likelihood of a batch ``x`` ``(B, *x_shape)``.

    The standard estimator of Burda et al. 2016 (``k = 5000`` as in their and van den
    Berg et al.'s tables): batched across examples, chunked over ``k``, the encoder run
    once, under ``torch.inference_mode`` (``no_grad`` for models with FFJORD or residual
    flows, which need autograd inside their passes). See
    :func:`log_likelihood_from_sampler`; returns ``(B,)`` tensors. ``compile``: use the
    model's compiled ``stats_sampler`` (see :meth:`vaeflow.models.vae.VAE.stats_sampler`).
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    if compile and not hasattr(model, "stats_sampler"):
        raise ValueError(
            f"compile=True needs a model with a stats_sampler (a vaeflow VAE); "
            f"{type(model).__name__} has none"
        )
    with _no_autograd(model):
        if compile:
            # The whole chunk, its reduction included, in one compiled graph.
            return log_likelihood_from_stats(model.stats_sampler(x, compile=True), k, chunk)
        return log_likelihood_from_sampler(model.terms_sampler(x), k=k, chunk=chunk)


def _no_autograd(model: object) -> contextlib.AbstractContextManager:
    """``inference_mode`` (no autograd bookkeeping at all), or ``no_grad`` when a layer of
    ``model`` calls ``torch.autograd.grad`` in its own passes (FFJORD, residual flows):
    inside ``inference_mode`` their ``enable_grad`` blocks could not track anything."""
    if isinstance(model, torch.nn.Module) and any(
        getattr(m, "needs_autograd", False) for m in model.modules()
    ):
        return torch.no_grad()
    return torch.inference_mode()


@torch.no_grad()
def log_likelihood_from_sampler(
    terms_fn: Callable[[int], Terms],
    k: int = 5000,
    chunk: int = 500,
) -> LogLikelihood:
    """Importance-sampled ``log p(x)`` with ``k`` samples, ``chunk`` at a time.

    Memory is bounded by ``chunk`` whatever ``k`` is: each chunk is reduced at once to six
    float64 numbers per example (its max log-weight, the max-shifted sums of the weights
    and of their squares, and the sums of the log-weights, KL and reconstruction terms),
    and the chunks' numbers are combined at the end with one max-shifted log-sum-exp, so
    nothing overflows. (The ``ceil(k / chunk) x 6 x B`` numbers kept are the only memory
    that grows with ``k``: 24 KB per example at k = 50000, chunk = 100.) Few small
    operations per chunk matter because small chunks on a GPU are bound by the host
    (benchmarks/README.md has the measurements).

    The encoder is meant to run once; ``terms_fn(n)`` should reuse its features and draw
    ``n`` fresh posterior samples (see :meth:`vaeflow.models.vae.VAE.terms_sampler`).

    Args:
        terms_fn: ``n -> Terms`` with ``(n, B)`` tensors, fresh samples on every call.
        k: total number of importance samples.
        chunk: samples per call.

    Returns:
        :class:`LogLikelihood` with ``(B,)`` tensors.
    """

    def stats_fn(n: int) -> Tensor:
        t = terms_fn(n)
        if t.log_px_z.shape[0] != n:
            raise ValueError(f"terms_fn({n}) returned {t.log_px_z.shape[0]} samples")
        return chunk_statistics(t.log_px_z, t.log_pz, t.log_qz)

    return log_likelihood_from_stats(stats_fn, k, chunk)


@torch.no_grad()
def log_likelihood_from_stats(
    stats_fn: Callable[[int], Tensor], k: int = 5000, chunk: int = 500
) -> LogLikelihood:
    """:func:`log_likelihood_from_sampler` for a sampler that reduces its own chunks.

    ``stats_fn(n)`` draws ``n`` fresh samples and returns their
    :func:`chunk_statistics` ``(6, B)``; a compiled model fuses that reduction into the
    chunk (see :meth:`vaeflow.models.vae.VAE.stats_sampler`).
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    stats: Tensor | None = None
    done = i = 0
    while done < k:
        n = min(chunk, k - done)
        s = stats_fn(n)
        if stats is None:
            stats = s.new_empty(math.ceil(k / chunk), *s.shape)
        stats[i] = s
        done += n
        i += 1
    assert stats is not None
    m, s1, s2, lw_sum, kl_sum, rec_sum = stats.unbind(1)  # each (chunks, B)
    top = m.amax(0)
    # A chunk (or all of them) with every weight zero has m = -inf and s1 = s2 = 0: shift
    # by a finite number so that its scale is exp(-inf) = 0, not exp(nan).
    scale = torch.exp(m - _finite_or_zero(top))
    total = (s1 * scale).sum(0)
    total_sq = (s2 * scale * scale).sum(0)
    return LogLikelihood(
        log_px=top + torch.log(total) - math.log(k),
        elbo=lw_sum.sum(0) / k,
        kl=kl_sum.sum(0) / k,
        log_px_z=rec_sum.sum(0) / k,
        ess=total**2 / total_sq,
        k=k,
    )


def chunk_statistics(log_px_z: Tensor, log_pz: Tensor, log_qz: Tensor) -> Tensor:
    """Reduce one chunk of ``n`` importance samples, each term ``(n, B)``, to ``(6, B)``
    float64: the max log-weight ``m``, ``sum exp(lw - m)``, ``sum exp(2 (lw - m))``,
    ``sum lw``, ``sum (log q - log p)`` and ``sum log p(x|z)`` over the samples."""
    lw = (log_px_z + log_pz - log_qz).double()  # float64 accumulation for k = 5000+
    m = lw.amax(0)
    w = torch.exp(lw - _finite_or_zero(m))  # all weights zero (m = -inf): w = 0, not nan
    kl = (log_qz - log_pz).double()
    return torch.stack(
        [m, w.sum(0), (w * w).sum(0), lw.sum(0), kl.sum(0), log_px_z.double().sum(0)]
    )


def nats_to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert a log-likelihood or NLL in nats per example to bits per dimension.

    ``bpd = nats / (D * ln 2)``, any shape ``(*)`` (docs/design.md §3.3); the 8-bit
    discretisation is already inside the likelihood, so no offset is added here.
    The one bits/dim converter of the package (with its inverse below).
    """
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return nats / (num_dims * math.log(2.0))


def bits_per_dim_to_nats(bpd: Tensor | float, num_dims: int) -> Tensor | float:
    """Inverse of :func:`nats_to_bits_per_dim`: bits per dimension -> nats per example."""
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return bpd * (num_dims * math.log(2.0))


def _finite_or_zero(t: Tensor) -> Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
