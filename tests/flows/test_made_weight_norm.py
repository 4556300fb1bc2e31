"""The MADE, IAF and posterior under ``weight_norm = "iaf_code"`` (Kingma et al. 2016,
appendix B: "The whole network is parametrized according to Weight Normalization ... and
data-dependent initialization is used"): the masks and the connectivity are the plain
MADE's, the flow stays exact (round trip, log-det against the brute-force Jacobian, with
and without context) after the data-dependent init pass, and that pass sets every layer to
the stated scales."""

from __future__ import annotations

import pytest
import torch

from tests.flows.harness import EXACT_TOL, full_check, make_inputs
from vaeflow.flows.autoregressive import MADE, build_iaf, build_maf
from vaeflow.layers import IAFCodeLinear, MaskedLinear, weight_norm_data_init

D, H = 5, 12


def _init(flow, ctx_features: int, seed: int = 5):
    """One data-init pass through the sampling direction on a random batch; returns it."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(64, D, generator=g)
    ctx = torch.randn(64, ctx_features, generator=g) if ctx_features else None
    with torch.no_grad(), weight_norm_data_init():
        flow.inverse(eps, ctx)
    return eps, ctx


@pytest.mark.parametrize("num_hidden", [0, 1, 2])
def test_made_keeps_the_plain_masks_and_connectivity(num_hidden):
    """Same masks as the plain MADE; output i depends on x_j iff order[j] < order[i], the
    context reaches every output."""
    kw = dict(hidden=8, num_hidden=num_hidden, context_features=2, order="random", seed=7)
    plain = MADE(D, 2, **kw)
    made = MADE(D, 2, weight_norm="iaf_code", activation="tanh", **kw)
    pairs = [*zip(plain.hidden_layers, made.hidden_layers, strict=True), (plain.out, made.out)]
    for p, w in pairs:
        assert isinstance(p, MaskedLinear) and isinstance(w, IAFCodeLinear)
        assert torch.equal(p.mask, w.mask)
    assert isinstance(made.context, IAFCodeLinear)
    with torch.no_grad():
        for m in made.modules():
            if isinstance(m, IAFCodeLinear):
                m.gain.normal_()
                m.bias.normal_()
    x, c = torch.randn(D), torch.randn(2)
    jx = torch.autograd.functional.jacobian(lambda v: made(v[None], c[None])[0], x)
    jc = torch.autograd.functional.jacobian(lambda v: made(x[None], v[None])[0], c)
    depends = jx.abs().amax(dim=1) > 0
    rank = made.order
    assert torch.equal(depends, rank[None, :] < rank[:, None])
    assert (jc.abs().amax(dim=-1) > 0).all()


@pytest.mark.parametrize("ctx", [0, 3])
def test_iaf_is_exact_after_the_data_init(ctx):
    """Round trip and log-det against the brute-force Jacobian in float64, on a flow whose
    scales come from the data-dependent init (not the identity), then perturbed."""

    def make():
        flow = build_iaf(D, 2, H, ctx, weight_norm="iaf_code", activation="elu")
        _init(flow, ctx)
        return flow

    errs = full_check(make, identity_at_init=False)
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL
    errs = full_check(
        lambda: build_maf(D, 2, H, ctx, weight_norm="iaf_code"), identity_at_init=False
    )
    assert errs["logdet"] <= EXACT_TOL


def test_the_init_pass_sets_the_stated_scales():
    """Hidden layers to unit scale, the output layer and the context map to 0.1 (on the
    init batch, per unit); afterwards the layers compute what the init pass returned."""
    flow = build_iaf(D, 1, H, 3, weight_norm="iaf_code", activation="elu", num_hidden=2)
    made = next(m for m in flow.modules() if isinstance(m, MADE))
    outs = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, out, name=name: outs.setdefault(name, out))
        for name, m in made.named_modules()
        if isinstance(m, IAFCodeLinear)
    ]
    eps, ctx = _init(flow, 3)
    for h in hooks:
        h.remove()
    scales = {"hidden_layers.0": 1.0, "hidden_layers.1": 1.0, "out": 0.1, "context": 0.1}
    assert set(outs) == set(scales)
    mods = dict(made.named_modules())
    for name, scale in scales.items():
        flat = outs[name].reshape(-1, outs[name].shape[-1])
        mask = mods[name].mask
        live = torch.ones(flat.shape[-1], dtype=torch.bool) if mask is None else mask.sum(1) > 0
        assert not live.all() or name != "hidden_layers.0"  # degree-0 units exist
        std = flat.std(0, unbiased=False)
        assert torch.allclose(flat.mean(0), torch.zeros(flat.shape[-1]), atol=1e-8), name
        assert torch.allclose(std[live], torch.full_like(std[live], scale)), name
        # a unit the mask cuts off keeps gain 1 (its output is its bias alone)
        assert torch.equal(mods[name].gain[~live], torch.ones_like(mods[name].gain[~live]))
    for name, m in mods.items():
        if isinstance(m, IAFCodeLinear):
            assert not torch.equal(m.gain, torch.ones_like(m.gain)), name
    # the trained-mode pass (frozen masked weights) now gives the init pass's numbers
    with torch.no_grad(), weight_norm_data_init():
        z_init, ld_init = flow.inverse(eps, ctx)
    z, ld = flow.inverse(eps, ctx)
    assert torch.allclose(z, z_init, atol=1e-10) and torch.allclose(ld, ld_init, atol=1e-10)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="weight_norm"):
        MADE(D, 2, weight_norm=True)
    with pytest.raises(ValueError, match="weight_norm"):
        MADE(D, 2, weight_norm="iaf-code")
    with pytest.raises(ValueError, match="'vaeflow' style"):
        MADE(D, 2, hidden=8, num_hidden=1, weight_norm="iaf_code", style="sylvester_code")
    with pytest.raises(ValueError, match="mask shape"):
        IAFCodeLinear(3, 2, mask=torch.ones(3, 2))


def test_default_made_is_unchanged():
    """weight_norm off builds exactly the plain layers, from the same random draws."""
    torch.manual_seed(0)
    a = MADE(D, 2, hidden=8, context_features=3)
    torch.manual_seed(0)
    b = MADE(D, 2, hidden=8, context_features=3, weight_norm=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, c = make_inputs(build_iaf(D, 1, 8, 3))
    assert torch.equal(a(x, c), b(x, c))


def test_posterior_head_and_context_projection_take_the_codes_weight_norm():
    """``model.posterior.weight_norm = "iaf_code"``: the Gaussian head and the context
    projection are the code's dense layers; the init pass starts mu and the raw scale at
    0.1 per unit on the init batch (q near N(0, I)); the top-down model refuses it."""
    from vaeflow.config import ConfigError, load_config
    from vaeflow.models.build import build_model, build_posterior
    from vaeflow.models.posteriors import GaussianPosterior

    cfg = load_config(
        None,
        [
            'model.posterior.flow="iaf"',
            "model.posterior.context_features=4",
            'model.posterior.weight_norm="iaf_code"',
        ],
    )
    post = build_posterior(cfg.model.posterior, 10, 3)
    assert isinstance(post.base.head, IAFCodeLinear) and isinstance(post.context, IAFCodeLinear)
    gauss = GaussianPosterior(10, 3, weight_norm="iaf_code")
    h = torch.randn(256, 10)
    with torch.no_grad(), weight_norm_data_init():
        raw = gauss.head(h)
    assert torch.allclose(raw.std(0, unbiased=False), torch.full((6,), 0.1))
    mu, log_std = gauss.params(h)  # log_std: the default head, raw soft-clipped
    assert mu.abs().max() < 1.0 and log_std.abs().max() < 1.0
    # torch's weight norm and none stay available; a typo does not
    assert not isinstance(GaussianPosterior(10, 3, weight_norm=True).head, IAFCodeLinear)
    with pytest.raises(ValueError, match="weight_norm"):
        GaussianPosterior(10, 3, weight_norm="iaf-code")
    with pytest.raises(ConfigError, match="weight_norm"):
        load_config(None, ['model.posterior.weight_norm="tf"'])
    td = load_config(
        None,
        [
            "model.x_shape=[1, 28, 28]",
            "model.topdown={channels=8, latent_channels=2, layers_per_resolution=[1]}",
            'model.posterior.weight_norm="iaf_code"',
        ],
    )
    with pytest.raises(ConfigError, match="model.posterior.weight_norm"):
        build_model(td.model)
