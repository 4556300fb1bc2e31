"""Tests for vaeflow.models.likelihoods: exact normalisation, independent references,
shapes, grads.

References used here are independent of the implementation: exhaustive sums over every
8-bit value, mpmath at 50 digits for the discretised logistic, a per-pixel scalar
re-implementation of the PixelCNN++ mixture from its documented parameter layout, and
``torch.distributions`` for Bernoulli/Gaussian.
"""

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaeflow.models.bounds import bits_per_dim_to_nats, nats_to_bits_per_dim
from vaeflow.models.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    Gaussian,
    build_likelihood,
)

mpmath.mp.dps = 50


def _grid(dtype=None) -> torch.Tensor:
    return torch.arange(256, dtype=dtype or torch.get_default_dtype()) / 255.0


def _all_pairs() -> torch.Tensor:
    """All 65536 (x0, x1) values of a 2-channel pixel, shape (65536, 2)."""
    g = _grid()
    return torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)


# ------------------------------------------------------------------ mpmath references


def _mp_sigmoid(t):
    return 1 / (1 + mpmath.exp(-t))


def _mp_dl_prob(k: int, mu: float, log_s: float):
    """P(bin k) of a logistic(mu, e^log_s) on the [-1, 1] scale, as a plain CDF difference.

    800 digits, so that the difference of two CDFs within e^-1100 of each other (the tail at
    the floor scale) still keeps more than 50 significant digits.
    """
    with mpmath.workdps(800):
        s = mpmath.exp(mpmath.mpf(log_s))
        c = mpmath.mpf(2 * k) / 255 - 1
        h = mpmath.mpf(1) / 255
        hi = mpmath.mpf(1) if k == 255 else _mp_sigmoid((c + h - mu) / s)
        lo = mpmath.mpf(0) if k == 0 else _mp_sigmoid((c - h - mu) / s)
        return +(hi - lo)


def _ref_mixture_log_prob(params: list[float], x: list[int], m_count: int) -> float:
    """Scalar PixelCNN++ log p(x) for one pixel (C = len(x)) from the documented layout."""
    c_count = len(x)
    base_loc, base_ls, base_co = m_count, m_count * (1 + c_count), m_count * (1 + 2 * c_count)
    pairs = [(c, j) for c in range(c_count) for j in range(c)]
    logits = [mpmath.mpf(params[m]) for m in range(m_count)]
    log_norm = mpmath.log(sum(mpmath.exp(v) for v in logits))
    y = [mpmath.mpf(2 * k) / 255 - 1 for k in x]
    total = mpmath.mpf(0)
    for m in range(m_count):
        prob = mpmath.exp(logits[m] - log_norm)
        for c in range(c_count):
            mu = mpmath.mpf(params[base_loc + c * m_count + m])
            for p, (cc, j) in enumerate(pairs):
                if cc == c:
                    mu += mpmath.tanh(params[base_co + p * m_count + m]) * y[j]
            log_s = max(params[base_ls + c * m_count + m], -7.0)
            prob *= _mp_dl_prob(x[c], mu, log_s)
        total += prob
    return float(mpmath.log(total))


# ------------------------------------------------------------------ discretised logistic

EXTREME_DL = [
    (0.3, -2.0),
    (0.0, 0.0),
    (-0.9, -7.0),
    (1.0 - 1 / 255, -7.0),  # mean on a bin edge, floor scale
    (5.0, -30.0),  # far above range, tiny scale: all mass at 255
    (-1e3, 3.0),  # far below range
    (1e4, 50.0),  # huge scale: ~half the mass in each edge bin
    (0.2, 300.0),  # scale so huge that the bin width underflows
    (0.4, -300.0),  # scale so tiny that one bin takes everything
]


@pytest.mark.parametrize("mu,log_s", EXTREME_DL)
def test_discretized_logistic_pixel_sums_to_one(float64, mu, log_s):
    lik = DiscretizedLogistic(event_ndim=1, min_log_scale=None)
    dist = lik(torch.tensor([mu, log_s]))
    log_p = dist.log_prob(_grid()[:, None])  # (256,)
    assert log_p.shape == (256,)
    assert torch.isfinite(log_p).any() and not torch.isnan(log_p).any()
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-10
    assert abs(torch.logsumexp(log_p, 0).item()) < 1e-10


def test_discretized_logistic_random_params_sum_to_one(float64):
    n = 64
    loc = torch.cat([torch.randn(n // 2), 100 * torch.randn(n // 2)])
    log_s = torch.empty(n).uniform_(-7.0, 10.0)
    dist = DiscretizedLogistic(event_ndim=1)(torch.stack([loc, log_s], -1))  # batch (n,)
    log_p = dist.log_prob(_grid()[:, None, None])  # x batch (256, 1) -> (256, n)
    assert log_p.shape == (256, n)
    assert (log_p.exp().sum(0) - 1).abs().max().item() < 1e-10


@pytest.mark.parametrize(
    "mu,log_s,k",
    [
        (0.1, -2.0, 140),
        (0.0, -7.0, 0),
        (0.0, -7.0, 255),
        (0.0, -7.0, 127),
        (0.0, -7.0, 128),  # neighbouring bin at the floor scale
        (0.0, -7.0, 200),  # ~1e3 scale units into the tail: P ~ e^-640
        (-0.5, -7.0, 3),  # left tail, below the mean
        (0.3, 8.0, 77),  # huge scale: tiny CDF difference (PixelCNN++ fallback regime)
        (0.3, 40.0, 255),
        (30.0, -1.0, 10),  # mean far outside [-1, 1]
        (-30.0, -1.0, 0),
    ],
)
def test_discretized_logistic_matches_mpmath(float64, mu, log_s, k):
    dist = DiscretizedLogistic(event_ndim=1)(torch.tensor([mu, log_s]))
    got = dist.log_prob(torch.tensor([k / 255.0])).item()
    want = float(mpmath.log(_mp_dl_prob(k, mu, max(log_s, -7.0))))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_discretized_logistic_float32_close_to_float64():
    params = torch.stack([torch.randn(500), torch.empty(500).uniform_(-7, 3)], -1)[..., None]
    x = torch.randint(0, 256, (500, 1, 1)) / 255.0
    lik = DiscretizedLogistic(event_ndim=2)
    lp32 = lik(params.float()).log_prob(x.float())
    lp64 = lik(params.double()).log_prob(x.double())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-4, atol=1e-4)


def test_discretized_logistic_floor_on_log_scale(float64):
    lik = DiscretizedLogistic(event_ndim=1)
    x = torch.tensor([128 / 255])
    lp_low = lik(torch.tensor([0.0, -20.0])).log_prob(x)
    lp_floor = lik(torch.tensor([0.0, -7.0])).log_prob(x)
    assert lp_low.item() == lp_floor.item()
    no_floor = DiscretizedLogistic(event_ndim=1, min_log_scale=None)
    assert no_floor(torch.tensor([0.0, -20.0])).log_prob(x).item() != lp_floor.item()


def test_discretized_logistic_sums_over_event_dims(float64):
    lik = DiscretizedLogistic()  # event (C, H, W)
    params = torch.randn(4, 6, 2, 3)
    x = torch.randint(0, 256, (4, 3, 2, 3)) / 255.0
    per_element = [
        lik(params[..., i : i + 1, j : j + 1]).log_prob(x[..., i : i + 1, j : j + 1])
        for i in range(2)
        for j in range(3)
    ]
    torch.testing.assert_close(lik(params).log_prob(x), torch.stack(per_element).sum(0))


def test_discretized_logistic_mean_is_exact(float64):
    params = torch.stack([3 * torch.randn(20), torch.empty(20).uniform_(-7, 4)], -1)
    dist = DiscretizedLogistic(event_ndim=2)(params[:, :, None])  # (20, 2, 1): event (1, 1)
    probs = dist.log_prob(_grid()[:, None, None, None]).exp()  # (256, 20)
    brute = (probs * _grid()[:, None]).sum(0)
    torch.testing.assert_close(dist.mean.reshape(20), brute, rtol=0, atol=1e-12)
    assert dist.mean.min() >= 0 and dist.mean.max() <= 1


@pytest.mark.parametrize("mu,log_s", [(0.1, -3.0), (-0.95, -1.0), (0.0, 2.0)])
def test_discretized_logistic_samples_follow_pmf(float64, mu, log_s):
    n = 20000
    dist = DiscretizedLogistic(event_ndim=1)(torch.tensor([mu, log_s]))
    x = dist.sample((n,))
    assert x.shape == (n, 1)
    k = (x * 255).round()
    assert (x * 255 - k).abs().max() < 1e-9 and k.min() >= 0 and k.max() <= 255
    emp_cdf = torch.bincount(k.long().flatten(), minlength=256).cumsum(0) / n
    cdf = dist.log_prob(_grid()[:, None]).exp().cumsum(0)
    # DKW: P(sup |F_n - F| > 0.015) <= 2 exp(-2 n 0.015^2) ~ 2e-4.
    assert (emp_cdf - cdf).abs().max().item() < 0.015


# ------------------------------------------------------------------ learned log-scales


@pytest.mark.parametrize("scale", ["per_channel", "global"])
@pytest.mark.parametrize("mu,log_s", EXTREME_DL)
def test_learned_scale_pixel_sums_to_one(float64, scale, mu, log_s):
    """One learned log-scale (per channel or for the image): still exactly normalised over
    the 256 bins, for every scale the per-pixel tests cover."""
    lik = DiscretizedLogistic(event_ndim=1, min_log_scale=None, scale=scale, num_channels=1)
    assert lik.param_shape((1,)) == (1,)  # the decoder outputs the means only
    with torch.no_grad():
        lik.log_scale.fill_(log_s)
    log_p = lik(torch.tensor([mu])).log_prob(_grid()[:, None])  # (256,)
    assert log_p.shape == (256,) and not torch.isnan(log_p).any()
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-10


def test_per_channel_scale_matches_mpmath_per_channel(float64):
    """Each channel uses its own learned log-scale, every pixel of the channel the same
    one: log p of a (3, 2, 2) image is the sum of the 12 mpmath bin masses."""
    lik = DiscretizedLogistic(event_ndim=3, scale="per_channel", num_channels=3)
    log_s = [-7.0, -2.5, 1.5]
    with torch.no_grad():
        lik.log_scale.copy_(torch.tensor(log_s))
    loc = torch.tensor([0.3, -0.9, 0.0, 0.7] * 3).reshape(3, 2, 2)
    k = torch.tensor([140, 3, 127, 255, 0, 10, 200, 77, 128, 255, 1, 90]).reshape(3, 2, 2)
    got = lik(loc).log_prob(k / 255.0).item()
    want = sum(
        float(mpmath.log(_mp_dl_prob(int(k[c, i, j]), float(loc[c, i, j]), log_s[c])))
        for c in range(3)
        for i in range(2)
        for j in range(2)
    )
    assert got == pytest.approx(want, rel=1e-12)
    # The same as the decoder-scale likelihood given those log-scales as maps.
    maps = torch.tensor(log_s)[:, None, None].expand(3, 2, 2)
    per_pixel = DiscretizedLogistic(event_ndim=3)(torch.cat([loc, maps]))
    assert per_pixel.log_prob(k / 255.0).item() == pytest.approx(got, rel=1e-14)


@pytest.mark.parametrize("scale, shape", [("per_channel", (3,)), ("global", ())])
def test_learned_scale_is_a_trained_parameter(scale, shape):
    """The log-scale is a module parameter (the optimiser trains it, checkpoints and the
    EMA hold it), starts at the IAF code's value, and receives gradients."""
    lik = DiscretizedLogistic(scale=scale, num_channels=3)
    assert [n for n, _ in lik.named_parameters()] == ["log_scale"]
    assert lik.log_scale.shape == shape
    torch.testing.assert_close(lik.log_scale.detach(), torch.full(shape, math.log(512 / 255)))
    loc = torch.zeros(2, 3, 4, 4, requires_grad=True)
    lik(loc).log_prob(torch.randint(0, 256, (2, 3, 4, 4)) / 255.0).sum().backward()
    assert lik.log_scale.grad.shape == shape and (lik.log_scale.grad != 0).all()
    assert loc.grad.abs().sum() > 0


def test_learned_scale_options_are_checked():
    with pytest.raises(ValueError, match="scale must be one of"):
        DiscretizedLogistic(scale="per_image")
    with pytest.raises(ValueError, match="needs num_channels"):
        DiscretizedLogistic(scale="per_channel")
    with pytest.raises(ValueError, match="3 per-channel log-scales.*1 channels"):
        DiscretizedLogistic(scale="per_channel", num_channels=3).param_shape((1, 28, 28))


def test_build_model_gives_per_channel_scales_the_data_channels():
    from vaeflow.config import ModelConfig, NetConfig
    from vaeflow.models.build import build_model

    cfg = ModelConfig(
        x_shape=(3, 32, 32),
        latent_dim=8,
        encoder=NetConfig("resnet", {"channels": 8, "num_blocks": 1, "out_features": 16}),
        decoder=NetConfig("resnet", {"channels": 8, "num_blocks": 1}),
        likelihood="discretized_logistic",
        likelihood_options={"scale": "per_channel"},
    )
    model = build_model(cfg)
    assert model.likelihood.log_scale.shape == (3,)
    assert "likelihood.log_scale" in model.state_dict()
    x = torch.randint(0, 256, (2, 3, 32, 32)) / 255.0
    assert model(x, k=1).log_px_z.shape == (1, 2)


# ------------------------------------------------------------------ mixture


def _mixture_params(m: int, c: int, scale_loc: float = 1.0, scale_co: float = 1.0):
    lik = DiscretizedLogisticMixture(m, event_ndim=1)
    (n,) = lik.param_shape((c,))
    p = torch.randn(n)
    p[m : m + c * m] *= scale_loc
    p[m + c * m : m + 2 * c * m] = torch.empty(c * m).uniform_(-5, 2)
    p[m + 2 * c * m :] *= scale_co
    return lik, p


def test_mixture_param_layout_sizes():
    assert DiscretizedLogisticMixture(10).param_shape((3, 32, 32)) == (100, 32, 32)
    assert DiscretizedLogisticMixture(5, event_ndim=1).param_shape((1,)) == (15,)
    assert DiscretizedLogisticMixture(4, event_ndim=1).param_shape((2,)) == (24,)
    uncoupled = DiscretizedLogisticMixture(10, channel_coupling=False)
    assert uncoupled.param_shape((3, 8, 8)) == (70, 8, 8)


@pytest.mark.parametrize(
    "kind", ["random", "far_means", "tiny_scales", "huge_scales", "saturated_coupling"]
)
def test_mixture_two_channels_exhaustive_sum_to_one(float64, kind):
    lik, p = _mixture_params(3, 2)
    m, c = 3, 2
    if kind == "far_means":
        p[m : m + c * m] = torch.tensor([50.0, -40.0, 0.9, -3.0, 7.0, 1.2])
    elif kind == "tiny_scales":
        p[m + c * m : m + 2 * c * m] = -30.0
    elif kind == "huge_scales":
        p[m + c * m : m + 2 * c * m] = torch.tensor([40.0, 5.0, 300.0, 12.0, 0.0, 60.0])
    elif kind == "saturated_coupling":
        p[m + 2 * c * m :] = torch.tensor([1e3, -1e3, 20.0])
        p[:m] = torch.tensor([1e3, -1e3, 0.0])  # a saturated softmax as well
    log_p = lik(p).log_prob(_all_pairs())
    assert log_p.shape == (65536,)
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-10


def test_mixture_three_channels_exhaustive_sum_to_one(float64):
    # All 256^3 RGB values, in 16 chunks (M = 1 keeps this to a few seconds).
    lik, p = _mixture_params(1, 3, scale_co=2.0)
    lik.validate = False
    dist = lik(p)
    g, pairs = _grid(), _all_pairs()
    total = 0.0
    for start in range(0, 256, 16):
        x = torch.cat(
            [pairs.repeat_interleave(16, 0), g[start : start + 16].repeat(65536)[:, None]], 1
        )
        total += dist.log_prob(x).exp().sum().item()
    assert abs(total - 1.0) < 1e-10


def test_mixture_matches_scalar_reference(float64):
    # Three channels, four components, a 2x2 image: checks the documented layout, the tanh
    # coupling on discrete values, the log-scale floor and the sum over pixels.
    m, c = 4, 3
    lik = DiscretizedLogisticMixture(m)
    params = torch.randn(2, *lik.param_shape((c, 2, 2)))
    params[:, m + c * m : m + 2 * c * m] -= 3.0  # some log-scales below the -7 floor
    params[:, m + c * m] = -9.0
    x = torch.randint(0, 256, (2, c, 2, 2))
    got = lik(params).log_prob(x / 255.0)
    want = torch.zeros(2)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                pix = params[b, :, i, j].tolist()
                want[b] += _ref_mixture_log_prob(pix, x[b, :, i, j].tolist(), m)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mixture_with_one_component_equals_discretized_logistic(float64):
    params_dl = torch.randn(5, 6, 3, 3)  # C = 3: [means | log-scales]
    x = torch.randint(0, 256, (5, 3, 3, 3)) / 255.0
    lp_dl = DiscretizedLogistic()(params_dl).log_prob(x)
    for coupling in (True, False):
        lik = DiscretizedLogisticMixture(1, channel_coupling=coupling)
        extra = torch.zeros(5, 3 if coupling else 0, 3, 3)  # tanh(0) = 0: no coupling
        params = torch.cat([torch.randn(5, 1, 3, 3), params_dl, extra], 1)
        torch.testing.assert_close(lik(params).log_prob(x), lp_dl)


def test_mixture_mean(float64):
    # Exact without coupling (C = 1, or zero coefficients), close to exact with coupling.
    for c, zero_coupling in [(1, False), (2, True), (2, False)]:
        lik, p = _mixture_params(3, c, scale_loc=0.5)
        if zero_coupling:
            p[3 + 2 * c * 3 :] = 0.0
        dist = lik(p)
        x = _grid()[:, None] if c == 1 else _all_pairs()
        brute = (dist.log_prob(x).exp()[:, None] * x).sum(0)
        tol = 1e-12 if (c == 1 or zero_coupling) else 1e-2
        torch.testing.assert_close(dist.mean, brute, rtol=0, atol=tol)


def test_mixture_samples_follow_pmf(float64):
    n = 20000
    lik, p = _mixture_params(3, 2, scale_loc=0.5, scale_co=2.0)
    dist = lik(p)
    x = dist.sample((n,))
    assert x.shape == (n, 2)
    k = (x * 255).round().long()
    assert (x * 255 - k).abs().max() < 1e-9
    joint = dist.log_prob(_all_pairs()).exp().reshape(256, 256)
    # Marginal CDFs of both channels (channel 1 depends on channel 0 through the coupling),
    # each within the DKW band, and the probability of the upper triangle {x1 > x0}.
    for ch, marg in [(0, joint.sum(1)), (1, joint.sum(0))]:
        emp = torch.bincount(k[:, ch], minlength=256).cumsum(0) / n
        assert (emp - marg.cumsum(0)).abs().max().item() < 0.015
    upper = torch.triu(joint, diagonal=1).sum().item()
    assert abs((k[:, 1] > k[:, 0]).double().mean().item() - upper) < 0.015


# ------------------------------------------------------------------ Bernoulli / Gaussian


def test_bernoulli_matches_torch_and_formula(float64):
    logits = (3 * torch.randn(4, 5, 1, 3, 3)).requires_grad_()  # autograd: torch's formula
    x = torch.randint(0, 2, (5, 1, 3, 3)).double()
    got = Bernoulli()(logits).log_prob(x)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((-3, -2, -1))
    assert torch.equal(got, ref)
    formula = (x * logits - torch.nn.functional.softplus(logits)).sum((-3, -2, -1))
    torch.testing.assert_close(got, formula, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_bernoulli_no_grad_fast_path_matches_float64_reference(dtype, tol):
    """The in-place evaluation path (no autograd) agrees with an exact float64 softplus,
    per pixel, across logit magnitudes from 0 to 1e4 and for binary and fractional x."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(2000, generator=gen) * s for s in (0.01, 1, 10, 100)])
    logits = torch.cat([logits, torch.tensor([0.0, 1e4, -1e4, 88.0, -88.0])])
    x = torch.cat(
        [
            torch.randint(0, 2, (logits.numel() - 5,), generator=gen).double(),
            torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]),
        ]
    )
    ld = logits.double()  # float64 softplus without torch's threshold-20 shortcut
    exact = x * ld - (ld.clamp_min(0) + torch.log1p(torch.exp(-ld.abs())))
    lik = Bernoulli(event_ndim=1)
    with torch.no_grad():
        per_pixel = lik(logits.to(dtype)[:, None]).log_prob(x.to(dtype)[:, None])
        whole = lik(logits.to(dtype)[None]).log_prob(x.to(dtype))
    torch.testing.assert_close(per_pixel.double(), exact, rtol=0, atol=tol)
    torch.testing.assert_close(whole.double(), exact.sum()[None], rtol=1e-6, atol=1e-3)
    frac = torch.rand(50, generator=gen).to(dtype)  # fractional targets use the same formula
    with torch.no_grad():
        got = Bernoulli(event_ndim=1, validate=False)(logits[:50].to(dtype)[None]).log_prob(frac)
    ref = frac.double() * logits[:50].double() - torch.nn.functional.softplus(logits[:50].double())
    torch.testing.assert_close(got.double(), ref.sum()[None], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_extreme_logits_finite(dtype):
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=dtype, requires_grad=True)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=dtype)
    lik = Bernoulli(event_ndim=1)
    lp = lik(logits[None]).log_prob(x)
    # Right with certainty costs nothing; wrong costs |logit| nats - and stays finite.
    assert lp.item() == pytest.approx(-2e4)
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_gaussian_variants_match_torch_normal(float64):
    x = torch.randn(5, 3, 2, 2)
    params = torch.randn(4, 5, 6, 2, 2)
    ref = torch.distributions.Normal(params[:, :, :3], params[:, :, 3:].exp())
    got = Gaussian()(params).log_prob(x)
    torch.testing.assert_close(got, ref.log_prob(x).sum((-3, -2, -1)), rtol=1e-13, atol=1e-12)

    fixed = Gaussian(fixed_std=0.3)(params[:, :, :3]).log_prob(x)
    ref = torch.distributions.Normal(params[:, :, :3], 0.3).log_prob(x).sum((-3, -2, -1))
    torch.testing.assert_close(fixed, ref, rtol=1e-13, atol=1e-12)

    glob = Gaussian(learn_global_std=True)
    with torch.no_grad():
        glob.log_std.fill_(-0.7)
    lp = glob(params[:, :, :3]).log_prob(x)
    ref = torch.distributions.Normal(params[:, :, :3], math.exp(-0.7)).log_prob(x)
    torch.testing.assert_close(lp, ref.sum((-3, -2, -1)), rtol=1e-13, atol=1e-12)
    lp.sum().backward()
    assert glob.log_std.grad is not None and glob.log_std.grad != 0


def test_gaussian_rejects_conflicting_options():
    with pytest.raises(ValueError, match="either"):
        Gaussian(fixed_std=1.0, learn_global_std=True)
    with pytest.raises(ValueError, match="positive"):
        Gaussian(fixed_std=0.0)


# ------------------------------------------------------------------ shared interface

ALL = [
    ("bernoulli", {}),
    ("gaussian", {}),
    ("gaussian", {"fixed_std": 0.5}),
    ("gaussian", {"learn_global_std": True}),
    ("discretized_logistic", {}),
    ("discretized_logistic", {"scale": "global"}),
    ("discretized_logistic_mixture", {"num_mixtures": 4}),
    ("discretized_logistic_mixture", {"num_mixtures": 2, "channel_coupling": False}),
]


def _data(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name == "bernoulli":
        return torch.randint(0, 2, shape).float()
    if name == "gaussian":
        return torch.randn(shape)
    return torch.randint(0, 256, shape) / 255.0


@pytest.mark.parametrize("x_shape", [(3, 4, 5), (7,)], ids=["image", "flat"])
@pytest.mark.parametrize("name,kw", ALL, ids=[f"{n}{kw}" for n, kw in ALL])
def test_shapes_samples_and_means(name, kw, x_shape):
    k, b = 2, 3
    lik = build_likelihood(name, event_ndim=len(x_shape), **kw)
    params = torch.randn(k, b, *lik.param_shape(x_shape), requires_grad=True)
    x = _data(name, (b, *x_shape))
    dist = lik(params)
    lp = dist.log_prob(x)
    assert lp.shape == (k, b) and torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(params.grad).all() and params.grad.abs().sum() > 0
    sample, mean = dist.sample(), dist.mean
    assert sample.shape == (k, b, *x_shape) and mean.shape == (k, b, *x_shape)
    assert dist.sample((4,)).shape == (4, k, b, *x_shape)
    assert torch.isfinite(dist.log_prob(sample)).all()  # samples lie in the support
    if name == "bernoulli":
        assert set(sample.unique().tolist()) <= {0.0, 1.0}
    if name != "gaussian":
        assert mean.min() >= 0 and mean.max() <= 1
    if name.startswith("discretized"):
        assert (sample * 255 - (sample * 255).round()).abs().max() < 1e-4
        assert sample.min() >= 0 and sample.max() <= 1


def test_tensors_follow_params_dtype():
    for name, kw in ALL:
        lik = build_likelihood(name, **kw)
        params = torch.randn(2, *lik.param_shape((3, 2, 2)), dtype=torch.float64)
        dist = lik(params)
        assert dist.sample().dtype == torch.float64
        assert dist.log_prob(_data(name, (2, 3, 2, 2)).double()).dtype == torch.float64


def test_discrete_likelihoods_validate_data():
    for lik in [DiscretizedLogistic(), DiscretizedLogisticMixture(2)]:
        dist = lik(torch.randn(2, *lik.param_shape((3, 2, 2))))
        good = torch.randint(0, 256, (2, 3, 2, 2)) / 255.0
        dist.log_prob(good)
        with pytest.raises(ValueError, match="k/255"):
            dist.log_prob(good * 255)  # 0..255 integers
        with pytest.raises(ValueError, match="k/255"):
            dist.log_prob(good * 2 - 1)  # [-1, 1] data
        with pytest.raises(ValueError, match="k/255"):
            dist.log_prob(good + 0.3 / 255)  # dequantised
        with pytest.raises(ValueError, match="shape"):
            dist.log_prob(good[..., :1])
        with pytest.raises(ValueError, match="event_ndim"):
            lik.param_shape((3 * 2 * 2,))
    with pytest.raises(ValueError, match="channels"):
        DiscretizedLogisticMixture(3)(torch.randn(2, 31, 2, 2))


# ------------------------------------------------------------------ bits/dim and registry


def test_bits_per_dim_known_answers():
    d = 3 * 32 * 32
    assert nats_to_bits_per_dim(d * math.log(256), d) == pytest.approx(8.0, rel=1e-15)
    assert bits_per_dim_to_nats(8.0, d) == pytest.approx(d * math.log(256), rel=1e-15)
    nats = torch.tensor([100.0, 2000.0], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim_to_nats(nats_to_bits_per_dim(nats, 784), 784), nats)
    with pytest.raises(ValueError):
        nats_to_bits_per_dim(1.0, 0)


def test_bits_per_dim_of_known_discretized_logistics(float64):
    d = 12
    lik = DiscretizedLogistic(event_ndim=1, min_log_scale=None)
    # A centred logistic with an enormous scale puts half its mass in each edge bin: data
    # at 0 or 255 then costs exactly 1 bit per dimension.
    spread = lik(torch.cat([torch.zeros(d), torch.full((d,), 300.0)]))
    x = torch.randint(0, 2, (d,)) * 1.0
    assert nats_to_bits_per_dim(-spread.log_prob(x), d).item() == pytest.approx(1.0, abs=1e-12)
    # A point mass (scale far below the bin width, mean on the bin centre) costs 0 bits.
    point = lik(torch.cat([torch.full((d,), 2 * 100 / 255 - 1), torch.full((d,), -40.0)]))
    nll = -point.log_prob(torch.full((d,), 100 / 255))
    assert nats_to_bits_per_dim(nll, d).item() == pytest.approx(0.0, abs=1e-12)


def test_registry():
    assert set(LIKELIHOODS) == {
        "bernoulli",
        "gaussian",
        "discretized_logistic",
        "discretized_logistic_mixture",
    }
    assert isinstance(build_likelihood("discretized_logistic_mixture"), DiscretizedLogisticMixture)
    with pytest.raises(ValueError, match="bernoulli, discretized_logistic"):
        build_likelihood("poisson")
    with pytest.raises(ValueError, match="num_mixtures") as err:
        build_likelihood("discretized_logistic_mixture", n_mix=5)
    assert "n_mix" in str(err.value)


# ------------------------------------------------------------------ gradients (hypothesis)

_FINITE = {"allow_nan": False, "allow_infinity": False}


@settings(max_examples=60, deadline=None)
@given(
    loc=st.floats(-1e4, 1e4, **_FINITE),
    log_s=st.floats(-50.0, 80.0, **_FINITE),
    k=st.integers(0, 255),
    double=st.booleans(),
)
def test_discretized_logistic_grads_finite(loc, log_s, k, double):
    dtype = torch.float64 if double else torch.float32
    params = torch.tensor([loc, log_s], dtype=dtype, requires_grad=True)
    for floor in (-7.0, None):
        lp = DiscretizedLogistic(event_ndim=1, min_log_scale=floor)(params).log_prob(
            torch.tensor([k / 255.0], dtype=dtype)
        )
        (grad,) = torch.autograd.grad(lp, params)
        assert torch.isfinite(lp) and lp <= 0
        assert torch.isfinite(grad).all()


@settings(max_examples=40, deadline=None)
@given(
    raw=st.lists(st.floats(-1e3, 1e3, **_FINITE), min_size=20, max_size=20),
    ks=st.lists(st.integers(0, 255), min_size=3, max_size=3),
    double=st.booleans(),
)
def test_mixture_grads_finite(raw, ks, double):
    dtype = torch.float64 if double else torch.float32
    lik = DiscretizedLogisticMixture(2, event_ndim=1)
    params = torch.tensor(raw, dtype=dtype, requires_grad=True)
    lp = lik(params).log_prob(torch.tensor(ks, dtype=dtype) / 255.0)
    (grad,) = torch.autograd.grad(lp, params)
    assert torch.isfinite(lp) and lp <= 1e-6
    assert torch.isfinite(grad).all()
