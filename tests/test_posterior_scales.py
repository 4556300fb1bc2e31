"""Posterior options from the papers' code: how the Gaussian's scale is parameterised
(``model.posterior.scale``), a flow that reads the encoder features without a projection
(``model.posterior.context_projection``), and the two together with linearly amortised
Sylvester layers in a whole VAE (the vandenberg2018_sylvester configuration).

The flows' own checks of ``amortization = "linear"`` are in tests/flows/test_planar.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

from vaeflow.config import ConfigError, PosteriorConfig, load_config
from vaeflow.flows.planar import build_planar, build_sylvester_orthogonal
from vaeflow.models.build import build_model, build_posterior
from vaeflow.models.posteriors import (
    LOG_STD_BOUND,
    SCALES,
    FlowPosterior,
    GaussianPosterior,
    log_std_from_raw,
)

REPO = Path(__file__).resolve().parents[1]
SYLVESTER = REPO / "experiments" / "vandenberg2018_sylvester" / "config.toml"
TOPDOWN = REPO / "experiments" / "kingma2016_iaf" / "topdown_cifar10.toml"

H, D = 6, 3


def _reference(raw: torch.Tensor, scale: str) -> torch.Tensor:
    """``log sigma`` from the stated formula, element by element in Python floats."""
    out = []
    for a in raw.tolist():
        if scale == "log_std":
            out.append(LOG_STD_BOUND * math.tanh(a / LOG_STD_BOUND))
        elif scale == "softplus_var":  # sigma^2 = softplus(a)
            out.append(0.5 * math.log(math.log1p(math.exp(a))))
        else:  # log sigma^2 = hardtanh(a, -6, 2)
            out.append(0.5 * min(max(a, -6.0), 2.0))
    return torch.tensor(out, dtype=torch.float64)


def _reference_grad(raw: torch.Tensor, scale: str) -> torch.Tensor:
    """``d log sigma / d raw`` by hand."""
    out = []
    for a in raw.tolist():
        if scale == "log_std":
            out.append(1 - math.tanh(a / LOG_STD_BOUND) ** 2)
        elif scale == "softplus_var":  # 0.5 sigmoid(a) / softplus(a)
            out.append(0.5 / (1 + math.exp(-a)) / math.log1p(math.exp(a)))
        else:
            out.append(0.5 if -6.0 < a < 2.0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


# Either side of the hardtanh bounds, softplus's linear branch and the tanh's knee.
RAW = torch.tensor(
    [-30.0, -19.9, -8.0, -6.5, -5.9, -3.0, -0.4, 0.0, 0.7, 1.9, 2.1, 4.0, 15.0, 19.9],
    dtype=torch.float64,
)


@pytest.mark.parametrize("scale", SCALES)
def test_log_std_from_raw_is_the_stated_formula(scale, float64):
    raw = RAW.clone().requires_grad_(True)
    out = log_std_from_raw(raw, scale)
    torch.testing.assert_close(out.detach(), _reference(RAW, scale), rtol=1e-14, atol=1e-15)
    (grad,) = torch.autograd.grad(out.sum(), raw)
    torch.testing.assert_close(grad, _reference_grad(RAW, scale), rtol=1e-12, atol=1e-15)


def test_default_scale_is_the_soft_clipped_log_std():
    raw = 30 * torch.randn(50)
    assert torch.equal(log_std_from_raw(raw), LOG_STD_BOUND * torch.tanh(raw / LOG_STD_BOUND))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_var_is_finite_everywhere(dtype):
    """log softplus never underflows to -inf: below -20 it is raw itself (softplus(a) =
    exp(a) to float precision), and the gradient stays finite on both branches."""
    values = [-1e4, -50.0, -20.5, -19.5, 0.0, 50.0, 1e4]
    raw = torch.tensor(values, dtype=dtype, requires_grad=True)
    out = log_std_from_raw(raw, "softplus_var")
    (grad,) = torch.autograd.grad(out.sum(), raw)
    assert out.isfinite().all() and grad.isfinite().all()
    # softplus(a) = max(a, 0) + log1p(exp(-|a|)); log softplus(a) = a + O(e^a) below -30.
    sp = [max(a, 0.0) + math.log1p(math.exp(-abs(a))) for a in values]
    ref = [0.5 * a if a < -30 else 0.5 * math.log(v) for a, v in zip(values, sp, strict=True)]
    ref_grad = [
        0.5 if a < -30 else 0.5 / (1 + math.exp(-a)) / v for a, v in zip(values, sp, strict=True)
    ]
    # float64: the linear branch drops O(e^a) of log softplus(a) and of its derivative,
    # 3e-11 and 6e-10 relative at -20.5 (float32 cannot see them).
    rtol = 1e-6 if dtype == torch.float32 else 1e-9
    f64 = torch.float64
    torch.testing.assert_close(out.double(), torch.tensor(ref, dtype=f64), rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double(), torch.tensor(ref_grad, dtype=f64), rtol=rtol, atol=0)
    # Continuous across the switch at -20 (where exp(a) and softplus(a) agree to 1e-9).
    edge = torch.tensor([-20.0 - 1e-6, -20.0 + 1e-6], dtype=dtype)
    lo, hi = log_std_from_raw(edge, "softplus_var").tolist()
    assert abs(hi - lo) < 1e-5


def test_log_var_hardtanh_has_zero_gradient_outside_its_bounds(float64):
    raw = torch.tensor([-100.0, -6.01, -5.99, 1.99, 2.01, 100.0], requires_grad=True)
    out = log_std_from_raw(raw, "log_var_hardtanh")
    (grad,) = torch.autograd.grad(out.sum(), raw)
    assert grad.tolist() == [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    assert out.tolist()[:2] == [-3.0, -3.0] and out.tolist()[-2:] == [1.0, 1.0]


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="unknown posterior scale 'exp'"):
        log_std_from_raw(torch.zeros(2), "exp")
    with pytest.raises(ValueError, match="unknown posterior scale 'exp'.*softplus_var"):
        GaussianPosterior(H, D, "exp")
    with pytest.raises(ValueError, match="unknown posterior scale"):
        FlowPosterior(H, D, build_planar(D, 1), scale="exp")


# -- GaussianPosterior ---------------------------------------------------------------------


def _spread_head(post: GaussianPosterior) -> GaussianPosterior:
    """Large head weights: raw outputs on both sides of every scale's kinks."""
    with torch.no_grad():
        post.head.weight.normal_(0.0, 3.0)
        post.head.bias.normal_(0.0, 3.0)
    return post


@pytest.mark.parametrize("scale", SCALES)
def test_gaussian_posterior_density_under_each_scale(scale, float64):
    post = _spread_head(GaussianPosterior(H, D, scale))
    assert post.scale == scale
    h = torch.randn(40, H)
    s = post.sample(h, k=4)
    # mu and log sigma from the head by hand.
    out = h @ post.head.weight.detach().T + post.head.bias.detach()
    mu, raw = out[:, :D], out[:, D:]
    log_std = _reference(raw.reshape(-1), scale).reshape(raw.shape)
    if scale == "log_var_hardtanh":  # the batch really reaches both clamps
        assert (raw < -6).any() and (raw > 2).any()
    torch.testing.assert_close(s.mu, mu, rtol=0, atol=1e-13)
    # (softplus_var's linear branch below -20 is exact to O(e^raw) only: rtol 1e-9)
    torch.testing.assert_close(s.log_std, log_std, rtol=1e-9, atol=1e-13)
    ref = Normal(mu, log_std.exp()).log_prob(s.z).sum(-1)
    assert s.log_q.shape == (4, 40)
    torch.testing.assert_close(s.log_q, ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(s.log_q_dims.sum(-1), s.log_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(post.log_prob(s.z, h), s.log_q, rtol=1e-12, atol=1e-10)


def test_gaussian_posterior_default_is_the_old_formula():
    post = _spread_head(GaussianPosterior(H, D))
    h = torch.randn(8, H)
    mu, log_std = post.params(h)
    out = post.head(h)
    assert post.scale == "log_std"
    assert torch.equal(mu, out[:, :D])
    assert torch.equal(log_std, LOG_STD_BOUND * torch.tanh(out[:, D:] / LOG_STD_BOUND))


# -- FlowPosterior without a context projection -----------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
def test_flow_posterior_passes_the_scale_to_its_base(scale):
    post = FlowPosterior(H, D, build_planar(D, 1, None, 4), scale=scale)
    assert post.base.scale == scale
    h = torch.randn(5, H)
    raw = post.base.head(h)[:, D:]
    assert torch.equal(post.sample(h).log_std, log_std_from_raw(raw, scale))


def test_flow_reads_the_encoder_features_without_a_projection(float64):
    flow = build_sylvester_orthogonal(D, 2, None, H, num_ortho_vectors=2, amortization="linear")
    post = FlowPosterior(H, D, flow, context_projection=False)
    h = torch.randn(5, H)
    assert post._context(h) is h
    assert post.context is None
    names = [n for n, _ in post.named_parameters()]
    assert not [n for n in names if n.startswith("context")], names
    assert sum(p.numel() for p in post.parameters()) == sum(
        p.numel() for p in [*post.base.parameters(), *flow.parameters()]
    )
    # The samples are the flow applied to the base draws with h as context.
    torch.manual_seed(3)
    s = post.sample(h, k=2)
    torch.manual_seed(3)
    base = post.base.sample(h, k=2)
    z, ld = flow.inverse(base.z, h)
    torch.testing.assert_close(s.z, z, rtol=0, atol=0)
    torch.testing.assert_close(s.log_q, base.log_q - ld, rtol=0, atol=0)
    # With the projection (the default) the context is a learned Linear of h.
    projected = FlowPosterior(H, D, build_planar(D, 1, None, 4))
    assert isinstance(projected.context, torch.nn.Linear)
    assert projected.context.in_features == H and projected.context.out_features == 4
    assert projected._context(h).shape == (5, 4)
    # An unconditional flow needs no context either way.
    assert FlowPosterior(H, D, build_planar(D, 1), context_projection=False)._context(h) is None


def test_flow_without_projection_must_read_the_encoder_width():
    with pytest.raises(ValueError, match=f"context_features must be {H}, got 4"):
        FlowPosterior(H, D, build_planar(D, 1, None, 4), context_projection=False)
    FlowPosterior(H, D, build_planar(D, 1, None, 4), context_projection=True)  # projected: fine


# -- through the config -----------------------------------------------------------------------


def test_build_posterior_passes_scale_and_projection():
    cfg = PosteriorConfig(flow=None, scale="log_var_hardtanh")
    assert build_posterior(cfg, H, D).scale == "log_var_hardtanh"
    cfg = PosteriorConfig(
        flow="planar",
        num_layers=2,
        context_features=H,
        scale="softplus_var",
        context_projection=False,
        options={"amortization": "linear"},
    )
    post = build_posterior(cfg, H, D)
    assert post.base.scale == "softplus_var" and post.context is None
    assert all(layer.params.free is None for layer in post.flow.transforms)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (
            PosteriorConfig(flow="planar", context_features=32, context_projection=False),
            r"^model\.posterior: .*context_features must be 6, got 32",
        ),
        (
            PosteriorConfig(flow="planar", context_features=0, options={"amortization": "linear"}),
            r"^model\.posterior: .*needs context_features >= 1",
        ),
        (
            PosteriorConfig(flow="radial", options={"amortization": "both"}),
            r"^model\.posterior: .*amortization must be one of",
        ),
    ],
)
def test_build_posterior_errors_name_the_section(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_posterior(cfg, H, D)


def test_config_errors_name_model_posterior():
    with pytest.raises(ConfigError, match=r"model\.posterior\.scale"):
        load_config(SYLVESTER, ['model.posterior.scale="exp"'])
    cfg = load_config(
        SYLVESTER,
        ["model.posterior.context_projection=false", "model.posterior.context_features=32"],
    )
    with pytest.raises(ConfigError, match=r"model\.posterior: .*must be 256, got 32"):
        build_model(cfg.model)


def test_topdown_model_refuses_a_posterior_scale():
    cfg = load_config(TOPDOWN, ['model.posterior.scale="softplus_var"'])
    assert cfg.model.topdown is not None
    with pytest.raises(ConfigError, match=r"model\.posterior\.scale = 'softplus_var'.*top-down"):
        build_model(cfg.model)


def test_sylvester_code_settings_train_a_vae():
    """The vandenberg2018_sylvester settings: softplus variance, the flow reading the
    encoder's 256 features, every Sylvester parameter a Linear of them."""
    cfg = load_config(
        SYLVESTER,
        [
            'model.posterior.scale="softplus_var"',
            "model.posterior.context_projection=false",
            'model.posterior.options={num_ortho_vectors=8, amortization="linear"}',
        ],
    )
    model = build_model(cfg.model)
    post = model.posterior
    assert isinstance(post, FlowPosterior) and post.context is None
    assert post.base.scale == "softplus_var"
    layers = list(post.flow.transforms)
    assert len(layers) == 4
    assert all(layer.params.free is None and layer.num_vectors == 8 for layer in layers)
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    terms = model(x, k=2)
    for t in (terms.log_px_z, terms.log_pz, terms.log_qz, terms.flow_logdet):
        assert t.shape == (2, 2) and t.isfinite().all()
    assert terms.flow_logdet.abs().min() > 0  # a random transform at init, not the identity
    (terms.log_qz - terms.log_px_z - terms.log_pz).mean().backward()
    for layer in layers:
        for p in (layer.params.head.weight, layer.params.head.bias):
            assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0


def test_upper_layer_posterior_errors_name_their_section() -> None:
    """A hierarchy's upper-layer posterior reports its own config section, not
    model.posterior."""
    cfg = load_config(
        REPO / "experiments/burda2016_iwae/two_layer.toml",
        [
            "model.upper_layers=[{latent_dim=50, hidden=[100, 100], activation='tanh', "
            "posterior={flow='planar', context_features=7, context_projection=false}}]"
        ],
    )
    with pytest.raises(ConfigError, match=r"^model\.upper_layers\[0\]\.posterior: .*100"):
        build_model(cfg.model)
