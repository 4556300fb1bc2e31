"""The bounds against a model whose log-likelihood is known in closed form.

Linear-Gaussian latent model (a probabilistic PCA):

    z ~ N(0, I_d),   x | z ~ N(W z + b, s^2 I_n)   =>   x ~ N(b, W W^T + s^2 I_n)
    p(z | x) = N(S W^T (x - b) / s^2, S),          S = (I + W^T W / s^2)^-1

With the exact posterior plugged in, every importance weight equals p(x), so the ELBO
and every IWAE_K equal log p(x) exactly (zero variance). With a wrong posterior,
ELBO <= IWAE_K <= IWAE_K' <= log p(x) in expectation, and IWAE_5000 approaches log p(x).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from tests.bound_checks import (
    assert_exact_posterior_makes_every_bound_tight,
    assert_mismatched_posterior_orders_the_bounds,
)
from vaeflow.flows.base import LULinear
from vaeflow.models.bounds import (
    Terms,
    elbo,
    free_bits_kl,
    iwae,
    log_likelihood,
    log_likelihood_from_sampler,
    nats_to_bits_per_dim,
)
from vaeflow.models.posteriors import LOG_STD_BOUND, FlowPosterior, GaussianPosterior
from vaeflow.models.vae import VAE

N_X, N_Z, NOISE = 5, 3, 0.7


class _StdNormal(nn.Module):
    """Reference prior written out by hand (independent of vaeflow.models.priors)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.latent_dim = d

    def log_prob_dims(self, z: Tensor) -> Tensor:
        return -0.5 * z**2 - 0.5 * math.log(2 * math.pi)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.log_prob_dims(z).sum(-1)

    def sample(self, n: int) -> Tensor:
        return torch.randn(n, self.latent_dim)


class _FixedGaussian(nn.Module):
    """Likelihood N(params, s^2 I) summed over the event (torch.distributions reference)."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def param_shape(self, x_shape):
        return x_shape

    def forward(self, params: Tensor) -> torch.distributions.Distribution:
        return torch.distributions.Independent(torch.distributions.Normal(params, self.s), 1)


def _linear_gaussian(w: Tensor, b: Tensor, posterior: nn.Module) -> VAE:
    decoder = nn.Linear(N_Z, N_X)
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
    return VAE(nn.Identity(), posterior, _StdNormal(N_Z), decoder, _FixedGaussian(NOISE), (N_X,))


def _exact_log_px(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    cov = w @ w.T + NOISE**2 * torch.eye(N_X)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


def _set_log_std(head_bias: Tensor, log_std: Tensor) -> None:
    # The posterior soft-clips log sigma = B tanh(raw / B); invert it for the target.
    head_bias[N_Z:] = LOG_STD_BOUND * torch.atanh(log_std / LOG_STD_BOUND)


def _orthogonal_w() -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(N_X, N_Z))
    return q * torch.tensor([2.0, 1.0, 0.5])  # orthogonal columns => W^T W diagonal


def _exact_diag_model(w: Tensor, b: Tensor) -> VAE:
    """Diagonal Gaussian posterior set to the exact posterior (W^T W is diagonal)."""
    lam = (w * w).sum(0)
    s_diag = 1.0 / (1.0 + lam / NOISE**2)
    post = GaussianPosterior(N_X, N_Z)
    with torch.no_grad():
        a = s_diag[:, None] * w.T / NOISE**2  # mean = A (x - b)
        post.head.weight.zero_()
        post.head.weight[:N_Z] = a
        post.head.bias.zero_()
        post.head.bias[:N_Z] = -a @ b
        _set_log_std(post.head.bias, 0.5 * torch.log(s_diag))
    return _linear_gaussian(w, b, post)


def test_exact_diagonal_posterior_makes_every_bound_tight(float64):
    w, b = _orthogonal_w(), torch.randn(N_X)
    model = _exact_diag_model(w, b)
    x = torch.randn(8, N_X) * 2
    exact = _exact_log_px(x, w, b)
    # Every single importance weight equals p(x): ELBO and IWAE are exact per sample.
    assert_exact_posterior_makes_every_bound_tight(model, x, exact)


def test_exact_full_covariance_posterior_through_an_lu_flow(float64):
    """A general W has a full-covariance posterior: a FlowPosterior with a linear flow
    z = M eps (M = chol S) set by hand represents it exactly, so ELBO == log p(x)."""
    w, b = torch.randn(N_X, N_Z), torch.randn(N_X)
    s = torch.linalg.inv(torch.eye(N_Z) + w.T @ w / NOISE**2)
    m = torch.linalg.cholesky(s)  # z = M eps: covariance M M^T = S
    flow = LULinear(N_Z, bias=False)  # forward u = W_f z, inverse z = W_f^-1 u
    w_f = torch.linalg.inv(m)  # lower triangular
    d = torch.diagonal(w_f)
    post = FlowPosterior(N_X, N_Z, flow)
    with torch.no_grad():
        flow.lower.copy_(torch.tril(w_f / d, -1))
        flow.upper.zero_()
        flow.log_s.copy_(d.abs().log())
        flow.sign_s.copy_(d.sign())
        a = m.T @ w.T / NOISE**2  # base mean mu = A (x - b), unit variance
        post.base.head.weight.zero_()
        post.base.head.weight[:N_Z] = a
        post.base.head.bias.zero_()
        post.base.head.bias[:N_Z] = -a @ b
        _set_log_std(post.base.head.bias, torch.zeros(N_Z))
    model = _linear_gaussian(w, b, post)
    x = torch.randn(6, N_X)
    exact = _exact_log_px(x, w, b)
    terms = model(x, k=8)
    assert torch.allclose(terms.log_weights, exact.expand(8, -1), atol=1e-11, rtol=0)
    # The fused log q equals an independent evaluation through the forward direction.
    h = model.encode(x)
    sample = post.sample(h, 4)
    assert torch.allclose(sample.log_q, post.log_prob(sample.z, h), atol=1e-12)


def test_mismatched_posterior_orders_the_bounds(float64):
    """E[ELBO] <= E[IWAE_10] <= E[IWAE_100] <= log p(x), and IWAE_5000 ~ log p(x)."""
    w0, b = _orthogonal_w(), torch.randn(N_X)
    w = w0 + 0.3 * torch.randn(N_X, N_Z)
    # The exact posterior of a nearby W, widened 1.5x: a clear gap, but over-dispersed
    # so the importance weights have finite variance and IWAE_5000 converges.
    model = _exact_diag_model(w0, b)
    model.decoder.weight.data.copy_(w)
    with torch.no_grad():
        log_std = model.posterior.params(torch.zeros(1, N_X))[1][0] + math.log(1.5)
        _set_log_std(model.posterior.head.bias, log_std)
    x = torch.randn(3, N_X)
    exact = _exact_log_px(x, w, b)
    # The ELBO is the one-sample IWAE bound (compared in expectation) ...
    reps = 400
    xr = x.repeat(reps, 1)
    e, i1 = (f(model(xr, k=1)).view(reps, 3) for f in (elbo, iwae))
    assert torch.allclose(
        e.mean(0), i1.mean(0), atol=5 * (i1.std(0).max() / math.sqrt(reps)).item()
    )
    # ... and the bounds tighten with k, strictly (an iwae() that returned the ELBO fails),
    # up to log p(x), with the k = 5000 estimator within its standard error of it.
    assert_mismatched_posterior_orders_the_bounds(model, x, exact)
    ll = model.log_likelihood(x, k=5000, chunk=512)
    assert (ll.elbo < ll.log_px).all()


def test_chunked_estimator_equals_unchunked_exactly(float64):
    """The streaming log-sum-exp over chunks equals one logsumexp over all samples."""
    k, b = 1000, 4
    lpxz = torch.randn(k, b) * 30.0  # large spread: exercises the max shift across chunks
    lpz, lqz = torch.randn(k, b), torch.randn(k, b)
    full = Terms(lpxz, lpz, lqz)
    pos = [0]

    def terms_fn(n: int) -> Terms:
        sl = slice(pos[0], pos[0] + n)
        pos[0] += n
        return Terms(lpxz[sl], lpz[sl], lqz[sl])

    res = log_likelihood_from_sampler(terms_fn, k=k, chunk=77)
    assert torch.allclose(res.log_px, iwae(full), atol=1e-12, rtol=0)
    assert torch.allclose(res.elbo, elbo(full), atol=1e-12, rtol=0)
    assert torch.allclose(res.kl, (lqz - lpz).mean(0), atol=1e-12, rtol=0)
    assert torch.allclose(res.log_px_z, lpxz.mean(0), atol=1e-12, rtol=0)
    w = torch.softmax(full.log_weights, 0)
    assert torch.allclose(res.ess, 1.0 / (w**2).sum(0), rtol=1e-10)


def test_no_batch_mixing_in_the_terms(float64):
    w, b = torch.randn(N_X, N_Z), torch.randn(N_X)
    model = _exact_diag_model(_orthogonal_w(), b)
    model.decoder.weight.data.copy_(w)
    x = torch.randn(3, N_X, requires_grad=True)
    lw = model(x, k=2).log_weights
    for i in range(3):
        (g,) = torch.autograd.grad(lw[:, i].sum(), x, retain_graph=True)
        assert g[torch.arange(3) != i].abs().max() == 0


def test_elbo_beta_and_free_bits_known_answers():
    log_px_z = torch.tensor([[-10.0, -20.0]])
    qd = torch.tensor([[[1.0, 0.1], [3.0, 0.3]]])  # (K=1, B=2, D=2)
    pd = torch.zeros_like(qd)
    t = Terms(log_px_z, pd.sum(-1), qd.sum(-1), pd, qd)
    assert torch.allclose(elbo(t), torch.tensor([-11.1, -23.3]))
    assert torch.allclose(elbo(t, beta=0.5), torch.tensor([-10.55, -21.65]))
    # Batch-mean KL per dim: [2.0, 0.2]; with lambda = 0.5 the second dim is floored at
    # 0.5 for every example (a constant), the first keeps its per-example value.
    fb = free_bits_kl(t, 0.5)
    assert torch.allclose(fb, torch.tensor([1.5, 3.5]))
    assert torch.allclose(elbo(t, free_bits=0.5), log_px_z[0] - fb)
    # Groups of two dimensions: group KL [1.1, 3.3] (batch mean 2.2), floor lambda * 2.
    assert torch.allclose(free_bits_kl(t, 0.5, group_size=2), torch.tensor([1.1, 3.3]))
    assert torch.allclose(free_bits_kl(t, 2.0, group_size=2), torch.tensor([4.0, 4.0]))
    with pytest.raises(ValueError, match="divide D=2"):
        free_bits_kl(t, 0.5, group_size=3)
    # Without per-dimension terms only one group (the total KL) is possible, and only when
    # asked for: more groups are an error, never a silent switch of objective.
    t2 = Terms(log_px_z, pd.sum(-1), qd.sum(-1))
    with pytest.raises(ValueError, match="splits over dimensions"):
        free_bits_kl(t2, 0.5)
    one_group = elbo(t2, free_bits=2.0, num_dims=2, group_size=2)
    assert torch.allclose(one_group, log_px_z[0] - torch.tensor([4.0, 4.0]))
    assert torch.allclose(elbo(t2, free_bits=1.0, num_dims=2, group_size=2), elbo(t))
    # One group with per-dimension terms present: the same value either way.
    assert torch.allclose(
        elbo(t, free_bits=2.0, num_dims=2, group_size=2),
        free_bits_kl(t, 2.0, 2).neg() + log_px_z[0],
    )


def test_free_bits_floor_has_no_gradient():
    q = torch.tensor([[[0.1, 2.0]]], requires_grad=True)
    t = Terms(torch.zeros(1, 1), torch.zeros(1, 1), q.sum(-1), torch.zeros(1, 1, 2), q)
    free_bits_kl(t, 1.0).sum().backward()
    assert torch.equal(q.grad, torch.tensor([[[0.0, 1.0]]]))


def test_iwae_with_one_sample_is_the_elbo():
    t = Terms(torch.randn(1, 5), torch.randn(1, 5), torch.randn(1, 5))
    assert torch.allclose(iwae(t), elbo(t))


def test_terms_reject_wrong_shapes():
    with pytest.raises(ValueError, match="log_pz"):
        Terms(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        Terms(torch.zeros(6), torch.zeros(6), torch.zeros(6))


def test_log_likelihood_rejects_bad_k():
    with pytest.raises(ValueError, match="k and chunk"):
        log_likelihood(None, torch.zeros(1), k=0)


def test_bits_per_dim_known_answer():
    # A uniform distribution over 256 levels in each of D dims is exactly 8 bits/dim.
    d = 3072
    assert nats_to_bits_per_dim(d * math.log(256.0), d) == pytest.approx(8.0, abs=1e-12)


def test_estimate_does_not_depend_on_batch_composition(float64):
    """With the exact posterior the estimator has zero variance, so any difference between
    an example scored alone and inside a batch would be a cross-example leak."""
    w, b = _orthogonal_w(), torch.randn(N_X)
    model = _exact_diag_model(w, b)
    x = torch.randn(6, N_X)
    together = model.log_likelihood(x, k=50, chunk=20).log_px
    alone = torch.cat(
        [model.log_likelihood(x[i : i + 1], k=50, chunk=20).log_px for i in range(6)]
    )
    assert torch.allclose(together, alone, atol=1e-12, rtol=0)
    shuffled = model.log_likelihood(x.flip(0), k=50, chunk=20).log_px.flip(0)
    assert torch.allclose(together, shuffled, atol=1e-12, rtol=0)


def test_a_chunk_of_zero_weights_does_not_poison_the_estimate(float64):
    """An example whose log-weights are all -inf in one chunk (e.g. a prior with bounded
    support) contributes nothing from that chunk; if every chunk is -inf, log p = -inf."""
    k, b = 20, 3
    lpxz = torch.randn(k, b)
    lpxz[10:, 0] = -math.inf  # example 0: second chunk all -inf
    lpxz[:, 2] = -math.inf  # example 2: every sample -inf
    full = Terms(lpxz, torch.zeros(k, b), torch.zeros(k, b))
    pos = [0]

    def terms_fn(n: int) -> Terms:
        sl = slice(pos[0], pos[0] + n)
        pos[0] += n
        return Terms(lpxz[sl], torch.zeros(n, b), torch.zeros(n, b))

    res = log_likelihood_from_sampler(terms_fn, k=k, chunk=10)
    assert torch.allclose(res.log_px[:2], iwae(full)[:2], atol=1e-12, rtol=0)
    assert res.log_px[2] == -math.inf


#: A tiny MLP VAE on 4x4 images (latent 6) for the free-bits tests.
_TINY_SPEC = {
    "x_shape": [1, 4, 4],
    "latent_dim": 6,
    "encoder": {"name": "mlp", "options": {"hidden": [8]}},
    "decoder": {"name": "mlp", "options": {"hidden": [8]}},
}


def _build(spec: dict):
    """The model of ``spec`` with the weights seed 0 draws (the same for every spec)."""
    from vaeflow.config import ModelConfig, from_dict
    from vaeflow.models.build import build_model

    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, spec))


def test_free_bits_floors_are_the_same_for_gaussian_and_identity_iaf():
    """An IAF posterior at its identity init is the Gaussian: the same per-dimension KL
    terms, so the same free-bits floors bind on the same dimensions (Kingma et al. 2016
    group every posterior alike)."""
    spec = dict(_TINY_SPEC)
    gauss = _build(spec)
    iaf = _build({**spec, "posterior": {"flow": "iaf", "num_layers": 2, "hidden": 8}})
    # Same encoder, decoder and Gaussian head weights; the IAF is the identity at init.
    iaf.encoder.load_state_dict(gauss.encoder.state_dict())
    iaf.decoder.load_state_dict(gauss.decoder.state_dict())
    iaf.posterior.base.load_state_dict(gauss.posterior.state_dict())
    assert iaf.kl_splits_over_dimensions and gauss.kl_splits_over_dimensions
    x = (torch.rand(5, 1, 4, 4) < 0.5).float()
    torch.manual_seed(1)
    tg = gauss(x, k=3)
    torch.manual_seed(1)
    ti = iaf(x, k=3)
    torch.testing.assert_close(ti.kl_dims, tg.kl_dims)
    for group in (1, 2, 3, 6):
        torch.testing.assert_close(free_bits_kl(ti, 0.3, group), free_bits_kl(tg, 0.3, group))


def test_iaf_log_q_per_dimension_sums_to_log_q_after_training_moves_it():
    """Away from the identity (random MADE weights, permutations between layers) the
    per-dimension log q still sums to the flow posterior's log q, for IAF and gated IAF."""
    from vaeflow.flows import build_flow
    from vaeflow.models.posteriors import FlowPosterior

    torch.manual_seed(0)
    for name in ("iaf", "gated_iaf"):
        flow = build_flow(name, features=5, num_layers=3, hidden=16, context_features=4)
        for p in flow.parameters():
            p.data.normal_(0, 0.3)
        post = FlowPosterior(7, 5, flow).double()
        h = torch.randn(2, 7, dtype=torch.float64)
        s = post.sample(h, k=4)
        assert s.log_q_dims is not None and s.log_q_dims.shape == (4, 2, 5)
        torch.testing.assert_close(s.log_q_dims.sum(-1), s.log_q)
        # log q from the flow's density direction (D passes per layer) agrees.
        torch.testing.assert_close(post.log_prob(s.z, h), s.log_q)


@pytest.mark.parametrize("group_size", [1, 2, 6])
def test_free_bits_per_sub_batch_is_each_sub_batch_alone(group_size):
    """``batch_splits = S``: each of S strided sub-batches is floored on its own mean,
    exactly as if it were the whole batch (Kingma et al.'s code, one mean per GPU); the
    same per-example values through ``elbo`` and for one group (group_size = D)."""
    from vaeflow.models.bounds import Terms, elbo, free_bits_kl

    g = torch.Generator().manual_seed(0)
    k, b, d = 3, 8, 6
    q = torch.randn(k, b, d, generator=g) * 0.3
    # the first half of the batch has a small KL (floored), the second a large one
    q[:, 0::2] *= 0.5  # sub-batch 0 of two strided ones: a small KL (floored)
    q[:, 1::2] *= 8  # sub-batch 1: a large one
    terms = Terms(
        log_px_z=torch.randn(k, b, generator=g) - 80,
        log_pz=(-0.5 * q * q).sum(-1),
        log_qz=torch.zeros(k, b),
        log_pz_dims=-0.5 * q * q,
        log_qz_dims=torch.zeros(k, b, d),
    )
    halves = [
        Terms(
            *(
                None if t is None else t[:, sl]
                for t in (
                    terms.log_px_z,
                    terms.log_pz,
                    terms.log_qz,
                    terms.log_pz_dims,
                    terms.log_qz_dims,
                )
            )
        )
        for sl in (slice(0, b, 2), slice(1, b, 2))
    ]

    def interleave(a, c):  # examples back in batch order
        return torch.stack([a, c], dim=1).reshape(-1)

    fb = 0.05
    split = elbo(terms, free_bits=fb, num_dims=d, group_size=group_size, batch_splits=2)
    alone = interleave(*(elbo(h, free_bits=fb, num_dims=d, group_size=group_size) for h in halves))
    assert torch.allclose(split, alone)
    whole = elbo(terms, free_bits=fb, num_dims=d, group_size=group_size)
    assert not torch.allclose(split, whole)  # the split changes which groups are floored
    if group_size < d:
        assert torch.allclose(
            free_bits_kl(terms, fb, group_size, batch_splits=2),
            interleave(*(free_bits_kl(h, fb, group_size) for h in halves)),
        )
    with pytest.raises(ValueError, match="batch_splits"):
        elbo(terms, free_bits=fb, num_dims=d, group_size=group_size, batch_splits=3)


def test_free_bits_with_a_mixture_prior_measure_each_group_against_its_conditional():
    """With ``kl_chain_rule`` a mixture prior's per-dimension KL terms are ``log q(z_d) -
    log p(z_d | z_<d)``: they add up to the KL, and a mixture whose components all equal
    N(0, I) gives exactly N(0, I)'s terms and free-bits floors."""
    spec = dict(_TINY_SPEC)
    gauss = _build(spec)
    mog = _build({**spec, "prior": {"name": "mog", "options": {"num_components": 3}}})
    mog.load_state_dict(gauss.state_dict(), strict=False)  # all but the prior
    x = (torch.rand(5, 1, 4, 4) < 0.5).float()
    torch.manual_seed(1)
    off = mog(x, k=2)
    assert off.kl_dims is None  # off: a mixture does not factorise
    mog.kl_chain_rule = True
    torch.manual_seed(1)
    spread = mog(x, k=2)
    torch.testing.assert_close(spread.kl_dims.sum(-1), spread.kl)
    torch.testing.assert_close(spread.log_pz, off.log_pz)  # the same samples, the same p(z)
    with torch.no_grad():
        mog.prior.loc.zero_()
        mog.prior.log_scale.zero_()
    torch.manual_seed(1)
    tm = mog(x, k=2)
    torch.manual_seed(1)
    tg = gauss(x, k=2)
    torch.testing.assert_close(tm.kl_dims, tg.kl_dims)
    for group in (1, 2, 3):
        torch.testing.assert_close(free_bits_kl(tm, 0.3, group), free_bits_kl(tg, 0.3, group))
