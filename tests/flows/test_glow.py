"""Tests of the Glow pieces: ActNorm, 1x1 convolution, squeeze, multi-scale, build_glow."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.flows.harness import (
    EXACT_TOL,
    check_finite,
    check_logdet_bruteforce,
    check_roundtrip,
    directions,
    full_check,
    make_inputs,
    perturb,
)
from vaeflow.flows.base import Composite, FixedAffine, ShapeError
from vaeflow.flows.coupling import AffineCoupling, channel_mask, checkerboard_mask
from vaeflow.flows.density import FlowDensity
from vaeflow.flows.glow import ActNorm, Invertible1x1Conv, MultiScale, Squeeze, build_glow

CTX = 3


# -- ActNorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", [(4,), (2, 4, 4)], ids=["vector", "image"])
def test_actnorm_generic_checks(shape, train_mode):
    # A fresh layer is the identity until data-dependent init, which only runs in training
    # mode: eval() here checks "identity before init"; the perturbed copy has its
    # `initialized` flag set by the harness, so train mode must not re-initialise it.
    errs = full_check(lambda: ActNorm(shape[0], shape).eval(), train_mode=train_mode)
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


@pytest.mark.parametrize("shape", [(3,), (3, 4, 2)], ids=["vector", "image"])
def test_actnorm_data_dependent_init(shape):
    layer = ActNorm(shape[0], shape)
    x = 3.0 + 5.0 * torch.randn(4, 5, *shape)
    assert not layer.initialized
    u, ld = layer(x)  # training mode by default
    assert layer.initialized
    per_channel = u.movedim(2, -1).reshape(-1, shape[0])
    assert per_channel.mean(0).abs().max() < 1e-12
    assert (per_channel.var(0, correction=0) - 1).abs().max() < 1e-5
    positions = math.prod(shape[1:])
    assert torch.allclose(ld, (positions * layer.log_scale.sum()).expand(4, 5))
    # The second batch does not re-initialise.
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.randn(2, *shape))
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))


def test_actnorm_identity_before_init_and_no_init_outside_training():
    layer = ActNorm(2, (2, 3, 3))
    x = 4.0 + torch.randn(5, 2, 3, 3)
    # Inverse never initialises, even in training mode.
    xi, ld = layer.inverse(x)
    assert torch.equal(xi, x) and torch.equal(ld, torch.zeros(5)) and not layer.initialized
    layer.eval()
    u, ld = layer(x)
    assert torch.equal(u, x) and torch.equal(ld, torch.zeros(5)) and not layer.initialized
    plain = ActNorm(2, (2, 3, 3), data_init=False)
    u, _ = plain(x)
    assert torch.equal(u, x) and not plain.initialized


def test_actnorm_flag_survives_state_dict_round_trip():
    layer = ActNorm(3, (3, 2, 2))
    layer(2.0 + 3.0 * torch.randn(8, 3, 2, 2))
    state = layer.state_dict()
    assert "initialized" in state and bool(state["initialized"])
    fresh = ActNorm(3, (3, 2, 2))
    fresh.load_state_dict(state)
    fresh.train()
    x = torch.randn(6, 3, 2, 2)  # very different statistics from the first batch
    u_fresh, ld_fresh = fresh(x)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, state[name]), f"{name} was re-initialised after loading"
    u, ld = layer(x)
    assert torch.equal(u_fresh, u) and torch.equal(ld_fresh, ld)


def test_actnorm_rejects_wrong_channels():
    with pytest.raises(ValueError, match="channels"):
        ActNorm(3, (4, 2, 2))


# -- 1x1 convolution and squeeze -----------------------------------------------------------


def test_invertible_1x1_conv_generic_and_logdet():
    errs = full_check(lambda: Invertible1x1Conv(3, (3, 4, 2)))
    assert errs["logdet"] <= EXACT_TOL
    conv = perturb(Invertible1x1Conv(3, (3, 4, 2)))
    assert conv.bias is None
    _, ld = conv(torch.randn(2, 3, 4, 2))
    expected = 8 * torch.linalg.slogdet(conv.weight())[1]
    assert torch.allclose(ld, expected.expand(2), rtol=1e-13, atol=0)
    with pytest.raises(ValueError):
        Invertible1x1Conv(3, (3,))


def test_squeeze_known_answer_and_errors():
    sq = Squeeze((1, 2, 4))
    x = torch.arange(8.0).view(1, 1, 2, 4)  # [[0, 1, 2, 3], [4, 5, 6, 7]]
    u, ld = sq(x)
    assert u.shape == (1, 4, 1, 2)
    # channel 2i + j holds pixel (2y + i, 2x + j)
    assert u[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert u[0, :, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert torch.equal(ld, torch.zeros(1))
    assert torch.equal(sq.inverse(u)[0], x)
    with pytest.raises(ValueError, match="even"):
        Squeeze((1, 3, 4))
    with pytest.raises(ShapeError, match="expected"):
        sq(torch.zeros(2, 1, 4, 2))


def test_squeeze_generic_checks():
    errs = full_check(lambda: Squeeze((2, 4, 4)), identity_at_init=False)
    assert errs["roundtrip"] == 0.0 and errs["logdet"] == 0.0


# -- MultiScale ---------------------------------------------------------------------------


def _multiscale(ctx: int) -> MultiScale:
    """Two levels; only the second is conditional when ctx > 0 (context must thread)."""
    first = Composite(
        [
            AffineCoupling(checkerboard_mask(4, 4, 0), (2, 4, 4), hidden=8, depth=1),
            Squeeze((2, 4, 4)),
            AffineCoupling(channel_mask(8, 1), (8, 2, 2), hidden=8, depth=1),
        ]
    )
    second = AffineCoupling(
        checkerboard_mask(2, 2, 1), (4, 2, 2), hidden=8, depth=1, context_features=ctx
    )
    return MultiScale([first, second])


@pytest.mark.parametrize("ctx", [0, CTX], ids=["noctx", "ctx"])
def test_multiscale_generic_checks(ctx):
    errs = full_check(lambda: _multiscale(ctx), identity_at_init=False)
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


def test_multiscale_layout_and_context_threading():
    flow = perturb(_multiscale(CTX))
    assert flow.context_features == CTX and flow.out_event_shape == (32,)
    x = torch.randn(2, 2, 4, 4)
    c = torch.randn(2, CTX)
    u, ld = flow(x, c)
    assert u.shape == (2, 32) and ld.shape == (2,)
    # The first 16 outputs are the factored-out half of level 0, untouched by level 1,
    # so they do not depend on the context; the last 16 do.
    u2, _ = flow(x, c + 1.0)
    assert torch.equal(u[:, :16], u2[:, :16])
    assert (u[:, 16:] - u2[:, 16:]).abs().max() > 1e-6
    h, _ = flow.levels[0](x)
    assert torch.equal(u[:, :16], h[:, :4].reshape(2, 16))


def test_multiscale_rejects_mismatched_levels():
    with pytest.raises(ShapeError, match="level 1 expects"):
        MultiScale([Squeeze((2, 4, 4)), FixedAffine((8, 2, 2), 1.0)])
    with pytest.raises(ValueError):
        MultiScale([])


# -- build_glow ---------------------------------------------------------------------------


def _glow_cases(ctx: int):
    # eval(): a fresh Glow is a pure reordering until ActNorm's data init (training mode).
    return {
        "glow": lambda: build_glow((2, 4, 4), 1, 8, ctx).eval(),
        "glow_one_scale": lambda: build_glow((1, 4, 2), 2, 8, ctx, num_scales=1).eval(),
        "glow_time": lambda: build_glow(
            (2, 4, 4), 1, 8, ctx + 1, time_conditioned=True, time_features=4, num_blocks=0
        ).eval(),
    }


@pytest.mark.parametrize("ctx", [0, CTX], ids=["noctx", "ctx"])
@pytest.mark.parametrize("name", list(_glow_cases(0)))
def test_glow_generic_checks(name, ctx):
    errs = full_check(_glow_cases(ctx)[name], identity_at_init=False)
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


def test_glow_generic_checks_in_training_mode():
    full_check(lambda: build_glow((2, 4, 4), 1, 8, CTX), identity_at_init=False, train_mode=True)


def test_glow_structure_and_init_is_a_reordering():
    flow = build_glow((2, 4, 4), 2, 8)
    assert isinstance(flow, MultiScale) and len(flow.levels) == 2
    kinds = [type(t).__name__ for t in flow.levels[0].transforms]
    assert kinds == ["Squeeze"] + ["ActNorm", "Invertible1x1Conv", "AffineCoupling"] * 2
    assert flow.levels[1].event_shape == (4, 2, 2)
    assert flow.levels[1].out_event_shape == (16, 1, 1)
    reference = MultiScale(
        [Squeeze((2, 4, 4)), Squeeze((4, 2, 2))]  # what is left at init: squeeze and split
    )
    x = torch.randn(3, 2, 4, 4)
    flow.eval()
    u, ld = flow(x)
    assert torch.equal(u, reference(x)[0]) and torch.equal(ld, torch.zeros(3))


def test_glow_data_init_standardises_first_batch():
    flow = build_glow((2, 4, 4), 1, 8, num_scales=1)
    x = 2.0 + 3.0 * torch.randn(16, 2, 4, 4)
    flow(x)  # training mode: ActNorm initialises
    act = flow.levels[0].transforms[1]
    assert isinstance(act, ActNorm) and act.initialized
    squeezed = Squeeze((2, 4, 4))(x)[0]
    out = act(squeezed)[0].movedim(1, -1).reshape(-1, 8)
    assert out.mean(0).abs().max() < 1e-12 and (out.var(0, correction=0) - 1).abs().max() < 1e-5
    plain = build_glow((2, 4, 4), 1, 8, num_scales=1, data_init=False)
    plain(x)
    assert not plain.levels[0].transforms[1].initialized


def test_glow_deeper_stack_stays_exact():
    """Two steps per scale, moderately perturbed: exact to ~1e-14 (see test_coupling)."""
    flow = perturb(build_glow((2, 4, 4), 2, 8, CTX), scale=0.1).eval()
    x, c = make_inputs(flow, lead=(2,))
    check_roundtrip(flow, x, c)
    check_logdet_bruteforce(flow, x, c)


def test_glow_options_are_validated():
    with pytest.raises(ValueError, match="num_scales"):
        build_glow((1, 4, 4), 1, 8, num_scales=3)
    with pytest.raises(ValueError, match="even"):
        build_glow((1, 3, 4), 1, 8)
    with pytest.raises(TypeError, match="permutation"):
        build_glow((1, 4, 4), 1, 8, permutation="lu")
    with pytest.raises(ValueError, match="data_init"):
        build_glow((1, 4, 4), 1, 8, data_init="yes")
    assert len(build_glow((1, 2, 2), 1, 8).levels) == 1  # default 2 shrinks to fit


def test_flow_density_with_glow():
    flow = perturb(build_glow((2, 4, 4), 1, 8), scale=0.1)
    density = FlowDensity(flow)
    x = torch.rand(5, 2, 4, 4)
    lp = density.log_prob(x)
    assert lp.shape == (5,) and lp.isfinite().all()
    samples = density.sample(3)
    assert samples.shape == (3, 2, 4, 4) and samples.isfinite().all()
    cond = FlowDensity(perturb(build_glow((2, 4, 4), 1, 8, CTX), scale=0.1))
    c = torch.randn(4, CTX)
    assert cond.sample(2, c).shape == (2, 4, 2, 4, 4)
    assert cond.log_prob(torch.rand(4, 2, 4, 4), c).isfinite().all()


# -- extreme inputs ----------------------------------------------------------------------


_FINITE_CASES = {
    "actnorm": lambda: ActNorm(2, (2, 4, 4)),
    "conv1x1": lambda: Invertible1x1Conv(2, (2, 4, 4)),
    "glow": lambda: build_glow((2, 4, 4), 1, 8, 2),
}


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(sorted(_FINITE_CASES)),
    log_mag=st.floats(-3.0, 4.0),
    seed=st.integers(0, 2**16),
)
def test_extreme_inputs_give_finite_outputs(name, log_mag, seed):
    flow = perturb(_FINITE_CASES[name](), seed=seed).eval()
    x, c = make_inputs(flow, lead=(3,), scale=10.0**log_mag, seed=seed)
    if c is not None:
        c = c * 10.0**log_mag
    check_finite(flow, x, c, directions(flow, x, c))


def test_actnorm_data_init_on_constant_channel_is_finite():
    layer = ActNorm(2, (2, 2, 2))
    u, ld = layer(torch.full((3, 2, 2, 2), 7.0))  # zero variance: eps keeps it finite
    assert u.isfinite().all() and ld.isfinite().all()


@pytest.mark.parametrize("device,dtype", [("meta", torch.float64), ("cpu", torch.float32)])
def test_device_and_dtype_follow_the_module(device, dtype):
    """No tensor is created on a fixed device or dtype (docs/design.md §3.6)."""
    from vaeflow.flows.coupling import build_realnvp
    from vaeflow.flows.glow import build_realnvp_image

    cases = [
        (build_glow((2, 4, 4), 1, 8, 4, time_conditioned=True), (2, 4, 4), 4),
        (build_realnvp_image((2, 4, 4), 1, 8, 3), (2, 4, 4), 3),
        (build_realnvp(5, 2, 8, 3, permutation="random", time_conditioned=True), (5,), 3),
    ]
    for flow, shape, ctx in cases:
        flow = flow.to(device=device, dtype=dtype).eval()
        x = torch.randn(2, *shape, device=device, dtype=dtype)
        c = torch.randn(2, ctx, device=device, dtype=dtype)
        u, ld = flow(x, c)
        x2, ld2 = flow.inverse(u, c)
        assert u.device.type == device and u.dtype == dtype and ld.dtype == dtype
        assert x2.shape == x.shape and ld2.shape == (2,)
