"""The MADE, IAF and posterior under ``weight_norm = "iaf_code"`` (Kingma et al. 2016,
appendix B: "The whole network is parametrized according to Weight Normalization ... and
data-dependent initialization is used"): the masks and the connectivity are the plain
MADE's, the flow stays exact (round trip, log-det against the brute-force Jacobian, with
and without context) after the data-dependent init pass, and that pass sets every layer to
the stated scales."""

from __future__ import annotations

import pytest
import torch

from tests.flows.harness import (
    EXACT_TOL,
    check_logdet_bruteforce,
    check_roundtrip,
    full_check,
    make_inputs,
)
from vaeflow.flows.autoregressive import MADE, build_iaf, build_maf
from vaeflow.layers import IAFCodeLinear, MaskedLinear, weight_norm_data_init

D, H = 5, 12


@pytest.fixture
def float32_default():
    """float32 for one test (the flow tests run in float64 by default): round-off is
    what the single-input-row test is about."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def _init(flow, ctx_features: int, seed: int = 5, features: int = D):
    """One data-init pass through the sampling direction on a random batch; returns it."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(64, features, generator=g)
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
def test_iaf_and_maf_are_exact_after_the_data_init(ctx):
    """Round trip and log-det against the brute-force Jacobian in float64 on flows whose
    scales come from the data-dependent init (IAF through its sampling pass, MAF through
    its density pass: each one's one-pass direction), as initialised and then perturbed."""

    def make_iaf():
        flow = build_iaf(D, 2, H, ctx, weight_norm="iaf_code", activation="elu")
        _init(flow, ctx)
        return flow

    def make_maf():
        flow = build_maf(D, 2, H, ctx, weight_norm="iaf_code")
        g = torch.Generator().manual_seed(6)
        x = torch.randn(64, D, generator=g)
        c = torch.randn(64, ctx, generator=g) if ctx else None
        with torch.no_grad(), weight_norm_data_init():
            flow(x, c)
        return flow

    for make in (make_iaf, make_maf):
        flow = make()
        gains = [m.gain for m in flow.modules() if isinstance(m, IAFCodeLinear)]
        assert gains and all(not torch.equal(g, torch.ones_like(g)) for g in gains)
        x, c = make_inputs(flow)
        assert check_roundtrip(flow, x, c) <= EXACT_TOL
        assert check_logdet_bruteforce(flow, x, c) <= EXACT_TOL
        assert check_logdet_bruteforce(flow, x, c, inverse=True) <= EXACT_TOL
        errs = full_check(make, identity_at_init=False)
        assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


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
    """weight_norm off: the plain layers (masked linears, a torch ``Linear`` context map),
    the state-dict keys of earlier checkpoints, and a zero output layer (the identity)."""
    made = MADE(D, 2, hidden=8, context_features=3)
    assert all(type(m) is MaskedLinear for m in [*made.hidden_layers, made.out])
    assert type(made.context) is torch.nn.Linear
    assert sorted(made.state_dict()) == [
        "context.bias",
        "context.weight",
        "hidden_layers.0.bias",
        "hidden_layers.0.mask",
        "hidden_layers.0.weight",
        "hidden_layers.1.bias",
        "hidden_layers.1.mask",
        "hidden_layers.1.weight",
        "order",
        "out.bias",
        "out.mask",
        "out.weight",
    ]
    x, c = torch.randn(4, D), torch.randn(4, 3)
    assert torch.equal(made(x, c), torch.zeros(4, D, 2))


def test_single_input_rows_do_not_drift(float32_default):
    """A row the mask leaves one input is sign(v): zero true gradient, so its weight is a
    constant; Adamax steps (the Kingma configs' optimiser) leave it exactly as it was."""
    torch.manual_seed(0)
    flow = build_iaf(8, 1, 32, 4, weight_norm="iaf_code", activation="elu")
    layers = [m for m in flow.modules() if isinstance(m, IAFCodeLinear) and m.mask is not None]
    single = [(m, (m.mask != 0).sum(1) == 1) for m in layers]
    assert any(rows.any() for _, rows in single)
    before = [m.weight[rows].clone() for m, rows in single]
    opt = torch.optim.Adamax(flow.parameters(), lr=2e-3)
    for _ in range(30):
        eps, c = torch.randn(16, 8), torch.randn(16, 4)
        z, ld = flow.inverse(eps, c)
        loss = (z**2).sum() - ld.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (m, rows), w in zip(single, before, strict=True):
        assert torch.equal(m.weight[rows], w)
        if rows.any():  # the gain carries those rows and learns
            assert m.gain.grad is not None and m.gain.grad[rows].abs().sum() > 0


def test_units_without_variance_keep_gain_one():
    """D = 1 without context: the first hidden layer is cut off from the input, so the
    next layers see constant inputs; none of them gets the 1 / sqrt(1e-10) gain."""
    flow = build_iaf(1, 1, 4, 0, weight_norm="iaf_code")
    _init(flow, 0, features=1)
    for m in flow.modules():
        if isinstance(m, IAFCodeLinear):
            assert torch.equal(m.gain, torch.ones_like(m.gain))


def test_a_sequential_direction_is_refused_for_the_data_init():
    """An iaf prior scores densities, a maf posterior samples, sequentially: the init
    pass could not set their MADEs, so the configs are refused (and the flow raises)."""
    from vaeflow.config import ConfigError, load_config
    from vaeflow.models.build import build_model

    wn = "options={weight_norm='iaf_code'}"
    for sets in (
        ['model.posterior.flow="maf"', f"model.posterior.{wn}"],
        ['model.prior.name="flow"', 'model.prior.flow="iaf"', f"model.prior.{wn}"],
    ):
        with pytest.raises(ConfigError, match="sequentially"):
            build_model(load_config(None, sets).model)
    flow = build_maf(D, 1, H, 0, weight_norm="iaf_code")
    with pytest.raises(RuntimeError, match="one-pass"), weight_norm_data_init():
        flow.inverse(torch.randn(3, D))


def test_the_models_init_pass_sets_every_layer():
    """``vaeflow train``'s init pass on a built model: every dense unit that can vary moves
    off gain 1 (an IAF posterior and a MAF prior); with a VampPrior the pseudo-inputs do
    not re-initialise the head, whose outputs on the data keep scale 0.1."""
    from vaeflow.config import load_config
    from vaeflow.models.build import build_model
    from vaeflow.run.train import _data_dependent_init, needs_data_init

    base = [
        "model.x_shape=[1, 28, 28]",
        "model.latent_dim=3",
        "model.encoder.options={hidden=[16]}",
        "model.decoder.options={hidden=[16]}",
        'model.posterior.weight_norm="iaf_code"',
        "model.posterior.context_features=4",
    ]
    x = (torch.rand(64, 1, 28, 28) > 0.5).to(torch.get_default_dtype())
    flows = [
        'model.posterior.flow="iaf"',
        "model.posterior.options={weight_norm='iaf_code'}",
        'model.prior.name="flow"',
        'model.prior.flow="maf"',
        "model.prior.options={weight_norm='iaf_code'}",
    ]
    model = build_model(load_config(None, base + flows).model)
    assert needs_data_init(model)
    _data_dependent_init(model, x, seed=0)
    for name, m in model.named_modules():
        if isinstance(m, IAFCodeLinear):
            live = (m.mask != 0).sum(1) > 0 if m.mask is not None else m.gain == m.gain
            assert (m.gain[live] != 1).all(), name
    vamp = build_model(
        load_config(None, [*base, 'model.prior.name="vamp"', "model.prior.num_components=5"]).model
    )
    _data_dependent_init(vamp, x, seed=0)
    with torch.no_grad():
        raw = vamp.posterior.head(vamp.encoder(x))
    assert torch.allclose(raw.std(0, unbiased=False), torch.full((6,), 0.1), rtol=1e-4)


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


def test_output_scale_keeps_the_start_and_scales_the_outputs_rate():
    """``output_scale = 0.1`` (the IAF code's constant factor on the MADE outputs): after
    the data init the flow computes what it computes with the factor 1 (the output layer
    targets 0.1 / 0.1 = 1 before the factor), and a change of the output layer's bias
    moves the outputs by a tenth as much (what sets their pace under Adam-type updates)."""
    flows = {}
    for a in (1.0, 0.1):
        torch.manual_seed(0)
        flow = build_iaf(D, 2, H, 3, weight_norm="iaf_code", activation="elu", output_scale=a)
        eps, ctx = _init(flow, 3)
        flows[a] = flow
    z1, ld1 = flows[1.0].inverse(eps, ctx)
    z01, ld01 = flows[0.1].inverse(eps, ctx)
    torch.testing.assert_close(z01, z1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld01, ld1, rtol=1e-10, atol=1e-10)
    made = {a: next(m for m in f.modules() if isinstance(m, MADE)) for a, f in flows.items()}
    torch.testing.assert_close(made[0.1].out.gain, 10 * made[1.0].out.gain)
    x = torch.randn(4, D, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    moved = {}
    for a, m in made.items():
        before = m(x, c)
        with torch.no_grad():
            m.out.bias.add_(1.0)
        moved[a] = (m(x, c) - before).abs().amax()
    torch.testing.assert_close(moved[0.1], torch.tensor(0.1, dtype=torch.float64))
    torch.testing.assert_close(moved[1.0], torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("ctx", [0, 3])
def test_iaf_with_output_scale_is_exact(ctx):
    """Round trip and log-det against the brute-force Jacobian (float64) with the
    outputs scaled, after the data init and perturbed."""

    def make():
        flow = build_iaf(D, 2, H, ctx, weight_norm="iaf_code", activation="elu", output_scale=0.1)
        _init(flow, ctx)
        return flow

    errs = full_check(make, identity_at_init=False)
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_output_scale_must_be_positive(bad):
    with pytest.raises(ValueError, match="output_scale must be > 0"):
        MADE(D, 2, output_scale=bad)
