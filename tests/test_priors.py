"""Tests for vaeflow.models.priors: normalisation, independent references, sampling, gradients,
state_dict ownership of the VampPrior encoder, and the registry's errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from tests.flows.harness import perturb
from vaeflow.flows.base import ShapeError
from vaeflow.models.priors import (
    PRIORS,
    FlowPrior,
    LearnedGaussianPrior,
    MixtureOfGaussiansPrior,
    Prior,
    StandardNormalPrior,
    VampPrior,
    build_prior,
)

D = 2
X_SHAPE = (3,)


class TinyEncoder(nn.Module):
    """Linear Gaussian encoder: x (K, 3) -> (mu, log_std) each (K, D)."""

    def __init__(self, latent_dim: int = D) -> None:
        super().__init__()
        self.net = nn.Linear(math.prod(X_SHAPE), 2 * latent_dim)

    def gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_std = self.net(x.flatten(1)).chunk(2, dim=-1)
        # Keep the components broad enough for a coarse integration grid.
        return mu, 0.3 * log_std

    forward = gaussian


class Model(nn.Module):
    """A container owning both the encoder and a VampPrior that uses it."""

    def __init__(self, as_module: bool = False) -> None:
        super().__init__()
        self.encoder = TinyEncoder()
        encode = self.encoder if as_module else self.encoder.gaussian
        self.prior = VampPrior(D, 4, X_SHAPE, encode)


@torch.no_grad()
def spread_vamp(prior: VampPrior, seed: int = 5) -> VampPrior:
    """Move pseudo-inputs to distinct points in (0, 1) so the components differ."""
    g = torch.Generator().manual_seed(seed)
    raw = prior.pseudo_inputs_raw
    raw.copy_(0.1 + 0.8 * torch.rand(raw.shape, generator=g, dtype=raw.dtype))
    return prior


def make_priors() -> dict[str, Prior]:
    """One of each kind, moved away from its initialisation (float64 default dtype)."""
    learned = perturb(LearnedGaussianPrior(D), 0.3)
    mog = perturb(MixtureOfGaussiansPrior(D, 3), 0.3)
    model = Model()
    perturb(model.encoder, 0.3)
    return {
        "standard": StandardNormalPrior(D),
        "learned": learned,
        "mog": mog,
        "vamp": spread_vamp(model.prior),
        "realnvp": perturb(FlowPrior.from_registry(D, "realnvp", 2, 8), 0.1),
        "maf": perturb(FlowPrior.from_registry(D, "maf", 2, 8), 0.1),
        "nsf_coupling": perturb(FlowPrior.from_registry(D, "nsf_coupling", 2, 8), 0.1),
    }


def grid(lim: float = 10.0, n: int = 400) -> tuple[Tensor, float]:
    """Midpoints of an n x n grid on [-lim, lim]^2 as (n*n, 2), and the cell area."""
    h = 2 * lim / n
    t = -lim + h * (torch.arange(n) + 0.5)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    return zz, h * h


# -- normalisation ----------------------------------------------------------------------


def test_every_prior_integrates_to_one(float64):
    zz, area = grid()
    for name, prior in make_priors().items():
        with torch.no_grad():
            mass = (prior.log_prob(zz).exp().sum() * area).item()
        assert abs(mass - 1) < 1e-3, f"{name}: mass {mass}"


# -- independent references -------------------------------------------------------------


def test_standard_and_learned_gaussian_match_torch_distributions(float64):
    z = 2 * torch.randn(5, 4, D)
    ref = Independent(Normal(torch.zeros(D), torch.ones(D)), 1)
    torch.testing.assert_close(StandardNormalPrior(D).log_prob(z), ref.log_prob(z))
    p = perturb(LearnedGaussianPrior(D), 0.5)
    ref = Independent(Normal(p.loc, p.log_scale.exp()), 1)
    out = p.log_prob(z)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out, ref.log_prob(z), rtol=0, atol=1e-12)


def test_mog_matches_mixture_same_family(float64):
    p = perturb(MixtureOfGaussiansPrior(D, 4), 0.5)
    ref = MixtureSameFamily(
        Categorical(logits=p.logits), Independent(Normal(p.loc, p.log_scale.exp()), 1)
    )
    z = 3 * torch.randn(6, 5, D)
    torch.testing.assert_close(p.log_prob(z), ref.log_prob(z), rtol=0, atol=1e-12)


def test_mog_init_is_spread_with_unit_marginal_scale(float64):
    p = MixtureOfGaussiansPrior(D, 50, mean_scale=0.5)
    # Distinct means (symmetry broken) and component variance + mean spread = 1.
    assert p.loc.std().item() > 0.3
    torch.testing.assert_close(p.log_scale.exp() ** 2, torch.full((50, D), 0.75))
    torch.testing.assert_close(p.logits, torch.zeros(50))


@pytest.mark.parametrize("name", ["realnvp", "maf", "nsf_coupling", "nice"])
def test_identity_flow_prior_equals_standard_normal(float64, name):
    z = 3 * torch.randn(4, 5, D)
    prior = FlowPrior.from_registry(D, name, 2, 8)
    torch.testing.assert_close(
        prior.log_prob(z), StandardNormalPrior(D).log_prob(z), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", ["realnvp", "maf", "nsf_coupling"])
def test_flow_prior_is_base_log_prob_plus_forward_logdet(float64, name):
    prior = perturb(FlowPrior.from_registry(D, name, 2, 8), 0.1)
    z = 2 * torch.randn(3, 4, D)
    u, ld = prior.flow(z)
    by_hand = Normal(0.0, 1.0).log_prob(u).sum(-1) + ld
    out = prior.log_prob(z)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-12)
    # The fused sampling path scores its own samples the same way.
    zs, lp = prior.sample_and_log_prob(7)
    torch.testing.assert_close(lp, prior.log_prob(zs), rtol=0, atol=1e-10)


def test_vamp_matches_explicit_mixture(float64):
    model = Model()
    perturb(model.encoder, 0.3)
    prior = spread_vamp(model.prior)
    z = 2 * torch.randn(3, 5, D)
    terms = []
    for k in range(prior.num_components):
        u_k = prior.pseudo_inputs_raw[k].clamp(0, 1)  # hardtanh(0, 1) by hand
        mu, log_std = model.encoder.gaussian(u_k[None])
        terms.append(Independent(Normal(mu[0], log_std[0].exp()), 1).log_prob(z))
    ref = torch.logsumexp(torch.stack(terms), 0) - math.log(prior.num_components)
    torch.testing.assert_close(prior.log_prob(z), ref, rtol=0, atol=1e-12)


def test_vamp_activations_keep_pseudo_inputs_in_range(float64):
    for act in ("hardtanh", "sigmoid"):
        prior = VampPrior(D, 6, X_SHAPE, TinyEncoder().gaussian, activation=act)
        with torch.no_grad():
            prior.pseudo_inputs_raw.mul_(0).add_(torch.linspace(-5, 5, 18).view(6, 3))
        u = prior.pseudo_inputs()
        assert u.min() >= 0 and u.max() <= 1
    with pytest.raises(ValueError, match="hardtanh"):
        VampPrior(D, 2, X_SHAPE, TinyEncoder(), activation="relu")


@pytest.mark.parametrize("activation", ["hardtanh", "sigmoid", "none"])
def test_vamp_default_init_and_init_from(float64, activation):
    prior = VampPrior(D, 4, X_SHAPE, TinyEncoder().gaussian, activation=activation)
    u = prior.pseudo_inputs()
    # The paper's default: pseudo-inputs ~ N(0.05, 0.01^2) in data space.
    assert abs(u.mean().item() - 0.05) < 0.01 and u.std().item() < 0.03
    x = torch.rand(10, *X_SHAPE) * 0.9 + 0.05
    prior.init_from(x, noise_std=0.0)
    torch.testing.assert_close(prior.pseudo_inputs(), x[:4])
    with pytest.raises(ShapeError):
        prior.init_from(x[:3])


# -- sampling ---------------------------------------------------------------------------


def test_sample_shapes_dtypes_and_fused_log_prob(float64):
    for name, prior in make_priors().items():
        z = prior.sample(5)
        assert z.shape == (5, D) and z.dtype == torch.float64, name
        assert prior.sample(0).shape == (0, D), name
        zs, lp = prior.sample_and_log_prob(6)
        assert zs.shape == (6, D) and lp.shape == (6,), name
        torch.testing.assert_close(lp, prior.log_prob(zs), rtol=0, atol=1e-10)


def test_samples_follow_module_dtype():
    for name, prior in make_priors().items():
        if isinstance(prior, VampPrior):
            # The encoder is not owned by the prior: move the model that owns both.
            enc = prior.encode.__self__
            enc.to(torch.float64)
        prior.to(torch.float64)
        z = prior.sample(3)
        assert z.dtype == torch.float64, name
        assert prior.log_prob(z).dtype == torch.float64, name


def _mixture_moments(w: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    mean = (w[:, None] * loc).sum(0)
    second = (w[:, None] * (scale**2 + loc**2)).sum(0)
    return mean, second - mean**2


def test_sample_moments_match_closed_forms(float64):
    torch.manual_seed(123)
    n = 40000
    priors = make_priors()
    mog, learned, vamp = priors["mog"], priors["learned"], priors["vamp"]
    with torch.no_grad():
        mu_v, ls_v = vamp.components()
        cases = {
            "mog": (mog, *_mixture_moments(mog.logits.softmax(-1), mog.loc, mog.log_scale.exp())),
            "vamp": (vamp, *_mixture_moments(torch.full((4,), 0.25), mu_v, ls_v.exp())),
            "learned": (learned, learned.loc, learned.log_scale.exp() ** 2),
            "standard": (priors["standard"], torch.zeros(D), torch.ones(D)),
        }
        for name, (prior, mean, var) in cases.items():
            z = prior.sample(n)
            se = (var / n).sqrt()
            assert ((z.mean(0) - mean).abs() < 5 * se).all(), name
            torch.testing.assert_close(z.var(0), var, rtol=0.05, atol=0, msg=name)
        # Flow priors: pushing samples back through the flow gives N(0, I) noise.
        for name in ("realnvp", "maf", "nsf_coupling"):
            u, _ = priors[name].flow(priors[name].sample(n))
            assert (u.mean(0).abs() < 5 / math.sqrt(n)).all(), name
            torch.testing.assert_close(u.var(0), torch.ones(D), rtol=0.05, atol=0, msg=name)


# -- gradients and ownership ------------------------------------------------------------


def test_gradients_reach_every_parameter(float64):
    model = Model()
    priors = make_priors()
    priors["vamp"] = spread_vamp(model.prior)
    assert not list(priors.pop("standard").parameters())
    for name, prior in priors.items():
        owner = model if name == "vamp" else prior
        owner.zero_grad()
        prior.log_prob(torch.randn(4, 3, D)).sum().backward()
        for pname, p in owner.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname}"
    assert len(list(model.named_parameters())) == 3  # pseudo-inputs, weight, bias


@pytest.mark.parametrize("as_module", [False, True])
def test_vamp_state_dict_lists_encoder_once(float64, as_module):
    model = Model(as_module=as_module)
    keys = list(model.state_dict())
    assert sorted(keys) == ["encoder.net.bias", "encoder.net.weight", "prior.pseudo_inputs_raw"]
    assert list(model.prior.state_dict()) == ["pseudo_inputs_raw"]
    # A round trip into a fresh model restores the same density.
    z = torch.randn(5, D)
    fresh = Model(as_module=as_module)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.prior.log_prob(z), model.prior.log_prob(z))


@pytest.mark.parametrize("as_module", [False, True])
def test_vamp_deepcopy_binds_to_the_copied_encoder(float64, as_module):
    # EMA/averaged models are deep copies: the copy's prior must use the copy's encoder.
    model = Model(as_module=as_module)
    twin = copy.deepcopy(model)
    enc = twin.prior.encode
    assert (enc if as_module else enc.__self__) is twin.encoder
    with torch.no_grad():
        twin.encoder.net.bias.add_(1.0)
    z = torch.randn(5, D)
    assert not torch.allclose(twin.prior.log_prob(z), model.prior.log_prob(z))


def test_gaussian_samples_are_reparameterised(float64):
    for prior in (perturb(LearnedGaussianPrior(D), 0.3), MixtureOfGaussiansPrior(D, 3)):
        (prior.sample(16) ** 2).sum().backward()
        for pname in ("loc", "log_scale"):
            grad = getattr(prior, pname).grad
            assert grad is not None and grad.abs().sum() > 0, (type(prior).__name__, pname)


def test_vamp_rejects_wrong_encoder_output(float64):
    prior = VampPrior(3, 2, X_SHAPE, TinyEncoder(latent_dim=2).gaussian)
    with pytest.raises(ShapeError, match="encode must return"):
        prior.log_prob(torch.randn(4, 3))


# -- factorisation ----------------------------------------------------------------------


def test_log_prob_dims_sum_or_none(float64):
    z = torch.randn(3, 4, D)
    for name, prior in make_priors().items():
        dims = prior.log_prob_dims(z)
        if name in ("standard", "learned"):
            assert dims.shape == (3, 4, D), name
            torch.testing.assert_close(dims.sum(-1), prior.log_prob(z), rtol=0, atol=1e-12)
        else:
            assert dims is None, name


def test_wrong_latent_shape_is_a_clear_error(float64):
    for prior in make_priors().values():
        with pytest.raises(ShapeError, match=r"\(\*, 2\)"):
            prior.log_prob(torch.randn(4, 3))
        with pytest.raises(ShapeError):
            prior.log_prob_dims(torch.randn(4, 3))


# -- registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["planar", "radial", "sylvester_orthogonal"])
def test_from_registry_rejects_sampling_only_flows(name):
    with pytest.raises(ValueError, match="only has a sampling direction") as err:
        FlowPrior.from_registry(D, name)
    assert "realnvp" in str(err.value)  # names the flows that do work


def test_from_registry_rejects_unknown_and_image_flows():
    with pytest.raises(ValueError, match="unknown flow 'nope'"):
        FlowPrior.from_registry(D, "nope")
    with pytest.raises(ValueError, match="image flow"):
        FlowPrior.from_registry(D, "glow")


def test_flow_prior_rejects_mismatched_or_conditional_flows():
    from vaeflow.flows.registry import build_flow

    with pytest.raises(ShapeError):
        FlowPrior(D, build_flow("realnvp", 3, 1, 4))
    with pytest.raises(ValueError, match="unconditional"):
        FlowPrior(D, build_flow("realnvp", D, 1, 4, context_features=2))


def test_build_prior_every_name(float64):
    enc = TinyEncoder()
    kwargs = {
        "flow": {"flow": "realnvp", "num_layers": 2, "hidden": 8},
        "mog": {"num_components": 3},
        "vamp": {"num_components": 2, "pseudo_input_shape": X_SHAPE, "encode": enc.gaussian},
    }
    for name in PRIORS:
        prior = build_prior(name, D, **kwargs.get(name, {}))
        assert isinstance(prior, Prior) and prior.latent_dim == D
        assert prior.log_prob(torch.zeros(2, D)).shape == (2,)
    assert isinstance(build_prior("mog", D, num_components=2), MixtureOfGaussiansPrior)


def test_build_prior_errors_name_the_alternatives():
    with pytest.raises(ValueError, match="registered priors: flow, learned_gaussian"):
        build_prior("gaussian", D)
    with pytest.raises(ValueError, match="unknown option.*num_comp.*allowed: num_components"):
        build_prior("mog", D, num_comp=3)
    with pytest.raises(ValueError, match="allowed: none"):
        build_prior("standard_normal", D, scale=2.0)
    with pytest.raises(ValueError, match="missing required option.*encode"):
        build_prior("vamp", D, num_components=2, pseudo_input_shape=X_SHAPE)
    with pytest.raises(ValueError, match="only has a sampling direction"):
        build_prior("flow", D, flow="planar")


@pytest.mark.parametrize("name", ["standard_normal", "learned_gaussian", "flow", "mog"])
def test_temperature_zero_collapses_the_noise(name, float64):
    """T scales the Gaussian noise: T = 0 gives the noise-free point of each draw."""
    kw = {"flow": "realnvp", "num_layers": 2, "hidden": 8} if name == "flow" else {}
    if name == "mog":
        kw = {"num_components": 1}
    prior = build_prior(name, 3, **kw)
    z0 = prior.sample(5, temperature=0.0)
    expected = {
        "standard_normal": torch.zeros(3),
        "learned_gaussian": prior.loc if name == "learned_gaussian" else None,
        "flow": prior.flow.inverse(torch.zeros(1, 3))[0][0] if name == "flow" else None,
        "mog": prior.loc[0] if name == "mog" else None,
    }[name]
    assert torch.allclose(z0, expected.expand(5, 3).detach())
    spread = prior.sample(4000, temperature=0.5).std(0)
    full = prior.sample(4000).std(0)
    assert torch.allclose(spread / full, torch.full((3,), 0.5), atol=0.06)


def test_mixture_log_prob_in_blocks_equals_one_pass(float64, monkeypatch):
    """Evaluation-size inputs are processed in row blocks (bounded memory), same values
    and gradients as one broadcast pass."""
    import vaeflow.models.priors as priors_module

    prior = build_prior("mog", 3, num_components=7)
    z = torch.randn(5, 11, 3, requires_grad=True)
    one_pass = prior.log_prob(z)
    (g_one,) = torch.autograd.grad(one_pass.sum(), z)
    monkeypatch.setattr(priors_module, "MIXTURE_BLOCK_ELEMENTS", 7 * 3 * 4)  # 4 rows a block
    blocked = prior.log_prob(z)
    (g_blocked,) = torch.autograd.grad(blocked.sum(), z)
    assert blocked.shape == (5, 11)
    torch.testing.assert_close(blocked, one_pass, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_blocked, g_one, rtol=0, atol=1e-12)


# -- every registered prior, automatically -------------------------------------------------

# Options a registry entry needs to be built in D = 2 (an entry missing here fails the
# test below with a message saying to add it: a new prior cannot slip past the checks).
REGISTRY_OPTIONS = {
    "flow": [
        {"flow": name, "num_layers": 2, "hidden": 8}
        for name in ("realnvp", "maf", "nsf_coupling", "nsf_autoregressive", "nice")
    ],
    "mog": [{"num_components": 3}],
    "vamp": [{"num_components": 4, "pseudo_input_shape": X_SHAPE}],
}


def _registry_priors() -> list[tuple[str, Prior]]:
    """One instance of every registry entry (every listed flow family for ``flow``),
    moved away from its initialisation so a wrong normaliser cannot hide at init."""
    out = []
    for name in PRIORS:
        for opts in REGISTRY_OPTIONS.get(name, [{}]):
            opts = dict(opts)
            if name == "vamp":
                enc = perturb(TinyEncoder(), 0.3)
                opts["encode"] = enc.gaussian
            try:
                prior = build_prior(name, D, **opts)
            except ValueError as e:
                raise AssertionError(
                    f"prior {name!r} needs options: add them to REGISTRY_OPTIONS ({e})"
                ) from e
            if name == "vamp":
                prior = spread_vamp(prior)
            elif name != "standard_normal":
                prior = perturb(prior, 0.1 if name == "flow" else 0.3)
            out.append((f"{name}:{opts.get('flow', '')}", prior))
    return out


def test_every_registered_prior_integrates_to_one_and_matches_its_sampler(float64):
    """For every entry of PRIORS: the density integrates to one on a grid (a wrong
    normaliser fails), and its sampler draws from that density (grid moments vs sample
    moments; a sampler of another distribution fails)."""
    zz, area = grid()
    torch.manual_seed(0)
    for label, prior in _registry_priors():
        with torch.no_grad():
            p = prior.log_prob(zz).exp() * area
            mass = p.sum().item()
            assert abs(mass - 1) < 2e-3, f"{label}: mass {mass}"
            mean = (p[:, None] * zz).sum(0) / mass
            second = (p[:, None] * zz**2).sum(0) / mass
            s = prior.sample(20000)
        assert s.shape == (20000, D)
        # Monte Carlo error of the sample moments: std / sqrt(n), with a 5-sigma margin.
        sd = (second - mean**2).sqrt()
        tol = 5 * sd / math.sqrt(20000)
        assert ((s.mean(0) - mean).abs() < tol).all(), (label, s.mean(0), mean)
        tol2 = 5 * (s**2).std(0) / math.sqrt(20000)
        assert (((s**2).mean(0) - second).abs() < tol2).all(), (label, (s**2).mean(0), second)


# -- mixture log-density: the float64 matrix-product form and the VampPrior cache ----------


def _brute_mixture(z: Tensor, loc: Tensor, log_scale: Tensor, log_w: Tensor) -> Tensor:
    """Term by term with torch.distributions, in float64."""
    comps = Independent(Normal(loc.double(), log_scale.double().exp()), 1)
    per = torch.stack([comps.log_prob(r) for r in z.double().reshape(-1, z.shape[-1])])
    return torch.logsumexp(per + log_w.double(), -1).reshape(z.shape[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixture_matmul_form_is_exact_far_from_narrow_components(dtype):
    """The expanded square is cancellation-prone where z is far from a narrow component
    (z^2 / sigma^2 ~ 1e7 here): computed in float64 it still matches the term-by-term
    reference to float64 precision, and float32 inputs lose only float32 rounding."""
    from vaeflow.models.priors import _mixture_log_prob

    g = torch.Generator().manual_seed(0)
    loc = 3 * torch.randn(9, 5, generator=g)
    log_scale = torch.linspace(-6, 2, 45).reshape(9, 5)  # sigma from 2.5e-3 to 7.4
    log_w = torch.log_softmax(torch.randn(9, generator=g), 0)
    near = loc[:3] + 1e-3 * torch.randn(3, 5, generator=g)
    z = torch.cat([near, 8 * torch.randn(40, 5, generator=g)])
    args = [t.to(dtype) for t in (z, loc, log_scale, log_w)]
    got = _mixture_log_prob(*args)
    assert got.dtype == dtype
    ref = _brute_mixture(*args)
    tol = 1e-9 if dtype == torch.float64 else 0
    # float32: compare with the reference on the same float32-rounded inputs, relative
    # to the magnitude of the result (log-densities reach -1e7 nats here).
    torch.testing.assert_close(got.double(), ref, rtol=1e-6 if tol == 0 else 1e-13, atol=tol)


def test_mixture_matmul_form_gradients_match_broadcast(float64):
    from vaeflow.models.priors import _mixture_blocks_broadcast, _mixture_log_prob

    loc = torch.randn(6, 4, requires_grad=True)
    log_scale = (0.5 * torch.randn(6, 4)).requires_grad_()
    log_w = torch.log_softmax(torch.randn(6), 0).requires_grad_()
    z = (2 * torch.randn(3, 7, 4)).requires_grad_()
    a = _mixture_log_prob(z, loc, log_scale, log_w)
    b = _mixture_blocks_broadcast(z.reshape(-1, 4), loc, log_scale, log_w).reshape(3, 7)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for ga, gb in zip(
        torch.autograd.grad(a.sum(), (z, loc, log_scale, log_w)),
        torch.autograd.grad(b.sum(), (z, loc, log_scale, log_w)),
        strict=True,
    ):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-10)


class CountingEncoder(TinyEncoder):
    """TinyEncoder that counts its calls."""

    calls = 0

    def gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        type(self).calls += 1
        return super().gaussian(x)

    forward = gaussian


@pytest.mark.parametrize("as_module", [False, True])
def test_vamp_components_cached_in_eval_until_a_parameter_changes(float64, as_module):
    """Evaluation encodes the pseudo-inputs once, not once per chunk; any change to a
    parameter the components depend on (an optimiser step on the encoder or the
    pseudo-inputs, load_state_dict) is seen at the next call."""
    encoder = CountingEncoder()
    prior = VampPrior(D, 4, X_SHAPE, encoder if as_module else encoder.gaussian)
    holder = nn.ModuleDict({"encoder": encoder, "prior": prior})
    z = torch.randn(5, D)

    def fresh() -> Tensor:  # the uncached value
        with torch.enable_grad():
            return prior.log_prob(z).detach()

    holder.eval()
    with torch.no_grad():
        CountingEncoder.calls = 0
        first = prior.log_prob(z)
        torch.testing.assert_close(prior.log_prob(z), first, rtol=0, atol=0)
        assert CountingEncoder.calls == 1
        for step in (encoder.net.bias, prior.pseudo_inputs_raw):
            step.add_(0.25)  # what an optimiser step does, in place
            torch.testing.assert_close(prior.log_prob(z), fresh(), rtol=0, atol=0)
            assert not torch.allclose(prior.log_prob(z), first)
            first = prior.log_prob(z)
        state = {k: v + 0.1 for k, v in holder.state_dict().items()}
        holder.load_state_dict(state)
        torch.testing.assert_close(prior.log_prob(z), fresh(), rtol=0, atol=0)
        # Training mode, or autograd on, never reads the cache.
        holder.train()
        CountingEncoder.calls = 0
        prior.log_prob(z), prior.log_prob(z)
        assert CountingEncoder.calls == 2
    holder.eval()
    CountingEncoder.calls = 0
    prior.log_prob(z).sum().backward()
    prior.log_prob(z)
    assert CountingEncoder.calls == 2
    assert encoder.net.weight.grad is not None


def test_vamp_built_from_config_caches_through_the_builder(float64):
    """The builder's encode (modules referenced, not owned) names what it reads, so a
    built model's VampPrior caches in evaluation and sees the encoder's updates."""
    from vaeflow.config import load_config
    from vaeflow.models.build import build_model

    cfg = load_config(
        None,
        [
            "model.latent_dim=3",
            'model.prior.name="vamp"',
            "model.prior.num_components=5",
            "model.encoder.options={hidden = [8]}",
            "model.decoder.options={hidden = [8]}",
        ],
    )
    model = build_model(cfg.model).double().eval()
    z = torch.randn(4, 3)
    with torch.no_grad():
        before = model.prior.log_prob(z)
        assert model.prior._cache_key() is not None
        next(model.encoder.parameters()).add_(0.5)
        after = model.prior.log_prob(z)
    with torch.enable_grad():
        torch.testing.assert_close(after, model.prior.log_prob(z).detach(), rtol=0, atol=0)
    assert not torch.allclose(before, after)


def _prefix_marginal(loc: Tensor, log_scale: Tensor, logits: Tensor, z: Tensor, d: int) -> Tensor:
    """``log p(z_1..z_d)`` of a diagonal-Gaussian mixture by torch.distributions: the
    mixture of the components' marginals over the first ``d`` dimensions."""
    comp = Independent(Normal(loc[:, :d], log_scale[:, :d].exp()), 1)
    return MixtureSameFamily(Categorical(logits=logits), comp).log_prob(z[..., :d])


@pytest.mark.parametrize("kind", ["mog", "vamp"])
def test_mixture_chain_rule_terms_are_the_exact_conditionals(float64, kind):
    """``log_prob_chain``: term d is ``log p(z_<=d) - log p(z_<d)`` (each prefix marginal
    from torch.distributions), so a block of terms is ``log p(z_g | z_<g)`` and the sum is
    ``log_prob``; in blocks of rows it is the same as in one pass."""
    torch.manual_seed(0)
    d = 5
    if kind == "mog":
        prior = MixtureOfGaussiansPrior(d, 7)
        with torch.no_grad():
            prior.log_scale.uniform_(-0.7, 0.3)
            prior.logits.normal_()
        loc, log_scale, logits = prior.loc, prior.log_scale, prior.logits
    else:
        enc = TinyEncoder(d)
        prior = spread_vamp(VampPrior(d, 6, X_SHAPE, enc.gaussian))
        loc, log_scale = prior.components()
        logits = torch.zeros(6)
    z = 1.5 * torch.randn(4, 3, d)
    chain = prior.log_prob_chain(z)
    assert chain.shape == (4, 3, d)
    torch.testing.assert_close(chain.sum(-1), prior.log_prob(z))
    previous = torch.zeros(4, 3)
    for j in range(1, d + 1):
        marginal = _prefix_marginal(loc, log_scale, logits, z, j)
        torch.testing.assert_close(chain[..., j - 1], marginal - previous)
        previous = marginal
    # Conditionals differ from the marginals for a mixture (it does not factorise).
    first_marginal = _prefix_marginal(loc[:, 1:], log_scale[:, 1:], logits, z[..., 1:], 1)
    assert not torch.allclose(chain[..., 1], first_marginal)


def test_mixture_chain_rule_in_row_blocks_equals_one_pass(float64, monkeypatch):
    import vaeflow.models.priors as priors_mod

    torch.manual_seed(1)
    prior = MixtureOfGaussiansPrior(4, 3)
    z = torch.randn(10, 4)
    whole = prior.log_prob_chain(z)
    monkeypatch.setattr(priors_mod, "MIXTURE_BLOCK_ELEMENTS", 12)  # one row per block
    torch.testing.assert_close(prior.log_prob_chain(z), whole, rtol=0, atol=0)


def test_chain_rule_terms_of_factorised_and_flow_priors(float64):
    """A factorised prior's conditionals are its marginals; a one-component mixture's are
    its Gaussian's; a flow prior has none."""
    torch.manual_seed(2)
    z = torch.randn(3, 4)
    for prior in (StandardNormalPrior(4), LearnedGaussianPrior(4)):
        torch.testing.assert_close(prior.log_prob_chain(z), prior.log_prob_dims(z))
    one = MixtureOfGaussiansPrior(4, 1)
    gauss = Independent(Normal(one.loc[0], one.log_scale[0].exp()), 0)
    torch.testing.assert_close(one.log_prob_chain(z), gauss.log_prob(z))
    assert FlowPrior.from_registry(4, "realnvp", 2, 8).log_prob_chain(z) is None
