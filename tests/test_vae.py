"""The assembled VAE: every posterior x prior combination, identity init, gradients."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from tests.bound_checks import assert_compiled_estimate_matches_eager
from tests.flows.harness import perturb
from vaeflow.config import ConfigError, ModelConfig, from_dict
from vaeflow.flows.registry import FLOWS
from vaeflow.models.bounds import elbo, iwae
from vaeflow.models.build import build_model

X_SHAPE = (1, 8, 8)
LATENT = 4

SMALL_MLP = {"name": "mlp", "options": {"hidden": [16]}}


def _cfg(posterior: dict | None = None, prior: dict | None = None, **kw) -> ModelConfig:
    d = {
        "x_shape": list(X_SHAPE),
        "latent_dim": LATENT,
        "encoder": SMALL_MLP,
        "decoder": SMALL_MLP,
        "posterior": {"hidden": 8, "num_layers": 2, "context_features": 6, **(posterior or {})},
        "prior": {"hidden": 8, "num_layers": 2, "num_components": 3, **(prior or {})},
        **kw,
    }
    return from_dict(ModelConfig, d)


def _binary(b: int = 5) -> torch.Tensor:
    return torch.bernoulli(torch.full((b, *X_SHAPE), 0.3))


POSTERIOR_FLOWS = [None] + sorted(n for n, s in FLOWS.items() if s.data == "vector" and s.sampling)
PRIORS = [
    {"name": "standard_normal"},
    {"name": "learned_gaussian"},
    {"name": "mog"},
    {"name": "vamp"},
    {"name": "flow", "flow": "realnvp"},
    {"name": "flow", "flow": "maf"},
    {"name": "flow", "flow": "nsf_coupling"},
]


@pytest.mark.parametrize("flow", POSTERIOR_FLOWS, ids=str)
def test_every_posterior_flow_trains_end_to_end(flow):
    """Terms have (K, B) shape, are finite, and gradients reach every parameter."""
    model = build_model(_cfg({"flow": flow}, {"name": "flow", "flow": "realnvp"}))
    perturb(model.posterior, 0.1)
    perturb(model.prior, 0.1)
    x = _binary()
    terms = model(x, k=3)
    for t in (terms.log_px_z, terms.log_pz, terms.log_qz):
        assert t.shape == (3, 5) and t.isfinite().all()
    (-elbo(terms).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches: {missing}"


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p.get("flow") or p["name"])
def test_every_prior_with_gaussian_and_iaf_posteriors(prior):
    for flow in (None, "iaf"):
        model = build_model(_cfg({"flow": flow}, prior))
        terms = model(_binary(), k=2)
        assert terms.log_pz.shape == (2, 5) and terms.log_pz.isfinite().all()
        iwae(terms).sum().backward()
        assert model.sample(3).shape == (3, *X_SHAPE)


def test_identity_initialised_flows_give_the_plain_vae_terms_exactly(float64):
    """IAF posterior + RealNVP prior at init == diagonal Gaussian + N(0, I), term by term."""
    plain = build_model(_cfg())
    flowy = build_model(_cfg({"flow": "iaf"}, {"name": "flow", "flow": "realnvp"}))
    flowy.encoder.load_state_dict(plain.encoder.state_dict())
    flowy.decoder.load_state_dict(plain.decoder.state_dict())
    flowy.posterior.base.load_state_dict(plain.posterior.state_dict())
    x = _binary()
    torch.manual_seed(7)
    a = plain(x, k=4)
    torch.manual_seed(7)
    b = flowy(x, k=4)
    assert torch.equal(a.log_px_z, b.log_px_z)
    assert torch.equal(a.log_qz, b.log_qz)
    assert torch.allclose(a.log_pz, b.log_pz, atol=1e-13, rtol=0)  # summation order only
    assert torch.equal(b.flow_logdet, torch.zeros_like(b.flow_logdet))


@pytest.mark.parametrize("flow", ["iaf", "gated_iaf", "realnvp", "nsf_coupling", "maf"])
def test_fused_log_q_equals_density_through_the_forward_direction(flow, float64):
    model = build_model(_cfg({"flow": flow}))
    perturb(model.posterior.flow, 0.2)
    h = model.encode(_binary())
    s = model.posterior.sample(h, 3)
    assert torch.allclose(s.log_q, model.posterior.log_prob(s.z, h), atol=1e-10, rtol=0)


def test_flow_prior_at_identity_equals_gaussian_prior(float64):
    g = build_model(_cfg())
    f = build_model(_cfg(prior={"name": "flow", "flow": "maf"}))
    z = torch.randn(3, 5, LATENT)
    assert torch.allclose(g.prior.log_prob(z), f.prior.log_prob(z), atol=1e-13, rtol=0)


def test_log_likelihood_reuses_the_encoder_and_is_batched():
    model = build_model(_cfg({"flow": "iaf"}, {"name": "flow", "flow": "realnvp"}))
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    ll = model.log_likelihood(_binary(4), k=64, chunk=16)
    assert len(calls) == 1, "the encoder must run once, not once per chunk"
    assert ll.log_px.shape == (4,) and (ll.elbo <= ll.log_px).all()


def test_log_likelihood_checks_the_data_once_per_batch_not_per_chunk():
    model = build_model(_cfg())
    seen = []
    original = type(model.likelihood).forward

    def spy(self, params):
        seen.append(self.validate)
        return original(self, params)

    with mock.patch.object(type(model.likelihood), "forward", spy):
        model.log_likelihood(_binary(3), k=40, chunk=10)
    # One validating call (the check under zero parameters), then four chunks without.
    assert seen == [True, False, False, False, False]
    assert model.likelihood.validate is True  # restored
    bad = _binary(3)
    bad[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError):
        model.log_likelihood(bad, k=40, chunk=10)
    assert model.likelihood.validate is True  # restored after the error too


@pytest.mark.parametrize(
    "where, flow",
    [(w, f) for w in ("posterior", "prior") for f in ("residual", "ffjord")],
)
def test_log_likelihood_of_models_whose_flows_need_autograd(where, flow):
    """FFJORD and residual flows call torch.autograd.grad inside their passes, which
    inference_mode would forbid: the estimator must fall back to no_grad for them (and
    keep inference_mode for everything else). latent_dim 20 > 16 puts the residual flow on
    its stochastic log-det estimator."""
    opts = {"flow": flow, "num_layers": 1}
    cfg = (
        _cfg(posterior=opts, latent_dim=20)
        if where == "posterior"
        else _cfg(prior={"name": "flow", **opts}, latent_dim=20)
    )
    model = build_model(cfg).eval()
    ll = model.log_likelihood(_binary(2), k=4, chunk=2)
    assert ll.log_px.isfinite().all() and (ll.elbo <= ll.log_px + 1e-6).all()


def test_stats_sampler_reduces_the_same_samples_as_terms_sampler():
    from vaeflow.models.bounds import chunk_statistics, log_likelihood

    model = build_model(_cfg({"flow": "iaf"}, {"name": "flow", "flow": "realnvp"})).eval()
    x = _binary(3)
    with torch.no_grad():
        torch.manual_seed(5)
        t = model.terms_sampler(x)(7)
        torch.manual_seed(5)
        s = model.stats_sampler(x)(7)
    assert s.shape == (6, 3) and s.dtype == torch.float64
    assert torch.equal(s, chunk_statistics(t.log_px_z, t.log_pz, t.log_qz))

    class OnlyTerms:  # a sampler without stats_sampler cannot be compiled
        def terms_sampler(self, x):
            return model.terms_sampler(x)

    with pytest.raises(ValueError, match="stats_sampler"):
        log_likelihood(OnlyTerms(), x, k=4, chunk=2, compile=True)


def test_compiled_log_likelihood_equals_eager():
    """torch.compile of the per-chunk step and its reduction (eval.compile) computes the
    same estimator; with inductor's fallback_random the compiled code draws the same noise
    as eager, so the estimates agree to float32 rounding (fused kernels round differently)."""

    model = build_model(_cfg({"flow": "iaf"}, {"name": "flow", "flow": "realnvp"})).eval()
    x = _binary(4)
    eager_log_px = assert_compiled_estimate_matches_eager(model, x)
    # And it is a different estimate under another seed (the noise is really drawn).
    torch.manual_seed(4)
    other = model.log_likelihood(x, k=40, chunk=20)
    assert not torch.equal(other.log_px, eager_log_px)


def test_conv_and_cifar_models_build_and_score():
    mnist = build_model(
        from_dict(
            ModelConfig,
            {
                "x_shape": [1, 28, 28],
                "latent_dim": 8,
                "encoder": {"name": "gated_conv", "options": {"channels": [4, 4, 4, 4, 4]}},
                "decoder": {"name": "gated_conv", "options": {"channels": [4, 4, 4, 4, 4, 4]}},
                "posterior": {"flow": "sylvester_orthogonal", "num_layers": 2},
            },
        )
    )
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.2))
    assert mnist(x, k=2).log_px_z.shape == (2, 2)
    cifar = build_model(
        from_dict(
            ModelConfig,
            {
                "x_shape": [3, 32, 32],
                "latent_dim": 8,
                "encoder": {"name": "resnet", "options": {"channels": 8, "num_blocks": 1}},
                "decoder": {"name": "resnet", "options": {"channels": 8, "num_blocks": 1}},
                "likelihood": "discretized_logistic_mixture",
                "likelihood_options": {"num_mixtures": 2},
                "posterior": {"flow": "iaf", "num_layers": 1},
            },
        )
    )
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 255
    t = cifar(x, k=2)
    assert t.log_px_z.shape == (2, 2) and t.log_px_z.isfinite().all()
    assert cifar.sample(2).shape == (2, 3, 32, 32)


def test_flat_vector_data_uses_a_one_dimensional_event():
    cfg = from_dict(
        ModelConfig,
        {"x_shape": [64], "latent_dim": 3, "encoder": SMALL_MLP, "decoder": SMALL_MLP},
    )
    model = build_model(cfg)
    x = torch.bernoulli(torch.full((5, 64), 0.5))
    assert model(x, k=2).log_px_z.shape == (2, 5)


def test_bad_model_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="sampling direction"):
        build_model(_cfg({"flow": "glow"}))
    with pytest.raises(ValueError, match="sampling direction"):
        build_model(_cfg(prior={"name": "flow", "flow": "planar"}))
    with pytest.raises(ConfigError, match="needs model.prior.flow"):
        build_model(_cfg(prior={"name": "flow"}))
    with pytest.raises(ValueError, match="expects data of shape"):
        build_model(_cfg())(torch.zeros(2, 1, 28, 28))


@pytest.mark.parametrize("flow", [None, "iaf"])
def test_collapsed_posterior_has_no_active_units(flow, float64):
    """q(z|x) = N(0, I) for every x (head zeroed): no unit may count as active, even
    though Monte Carlo means of a flow posterior carry sampling noise."""
    from vaeflow.run.evaluate import active_units

    model = build_model(_cfg({"flow": flow}))
    head = model.posterior.head if flow is None else model.posterior.base.head
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    assert (active_units(model, _binary(500), samples=32) <= 0.01).all()
    # An informative encoder does have active units.
    torch.nn.init.normal_(head.weight, std=0.5)
    assert (active_units(model, _binary(500), samples=32) > 0.01).sum() >= 1
