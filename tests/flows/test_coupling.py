"""Tests of the coupling layers (NICE, RealNVP), their masks, time conditioning, builders."""

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
from vaeflow.flows.base import (
    FixedAffine,
    LULinear,
    Permutation,
    RandomPermutation,
    ReversePermutation,
)
from vaeflow.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    DiagonalScaling,
    TimeEmbedding,
    alternating_mask,
    build_nice,
    build_realnvp,
    channel_mask,
    checkerboard_mask,
)
from vaeflow.flows.glow import MultiScale, Squeeze, build_realnvp_image

CTX = 3


# -- masks ---------------------------------------------------------------------------


def test_alternating_mask_values():
    assert alternating_mask(5, 0).tolist() == [True, False, True, False, True]
    assert alternating_mask(5, 1).tolist() == [False, True, False, True, False]
    assert alternating_mask(4, 0).dtype == torch.bool


def test_checkerboard_mask_shape_and_values():
    m0, m1 = checkerboard_mask(3, 4, 0), checkerboard_mask(3, 4, 1)
    assert m0.shape == (1, 3, 4) and m0.dtype == torch.bool
    assert torch.equal(m0, ~m1)
    assert m0[0].tolist()[:2] == [[True, False, True, False], [False, True, False, True]]
    # Every pixel's 4-neighbours have the other colour.
    assert not (m0[0, 1:] & m0[0, :-1]).any() and not (m0[0, :, 1:] & m0[0, :, :-1]).any()


def test_channel_mask_shape_and_values():
    m0, m1 = channel_mask(4, 0), channel_mask(4, 1)
    assert m0.shape == (4, 1, 1) and m0.dtype == torch.bool
    assert m0.flatten().tolist() == [True, True, False, False]
    assert torch.equal(m0, ~m1)
    assert channel_mask(3, 0).flatten().tolist() == [True, True, False]
    with pytest.raises(ValueError):
        channel_mask(1)
    with pytest.raises(ValueError, match="parity"):
        alternating_mask(4, 2)


# -- generic checks on single layers ---------------------------------------------------


def _layer_cases(ctx: int):
    """Factories for every layer type and layout, unconditional (ctx=0) or conditional."""
    kw = {"hidden": 8, "context_features": ctx}
    img = {"hidden": 8, "depth": 1, "context_features": ctx}
    return {
        "additive_vector": lambda: AdditiveCoupling(alternating_mask(5, 0), **kw),
        "affine_vector": lambda: AffineCoupling(alternating_mask(5, 1), **kw),
        # Even D, alternating: split/merged by parity views instead of index gathers.
        "affine_vector_even_d": lambda: AffineCoupling(alternating_mask(6, 0), **kw),
        "additive_vector_even_d": lambda: AdditiveCoupling(alternating_mask(6, 1), **kw),
        "additive_checkerboard": lambda: AdditiveCoupling(
            checkerboard_mask(4, 4, 1), (2, 4, 4), **img
        ),
        "affine_checkerboard": lambda: AffineCoupling(
            checkerboard_mask(4, 4, 0), (2, 4, 4), **img
        ),
        "affine_channel": lambda: AffineCoupling(channel_mask(4, 1), (4, 2, 4), **img),
        "affine_time": lambda: AffineCoupling(
            alternating_mask(5, 0), hidden=8, context_features=ctx + 1, time_features=8
        ),
        "affine_time_image": lambda: AffineCoupling(
            checkerboard_mask(2, 2, 0),
            (3, 2, 2),
            hidden=8,
            depth=1,
            context_features=ctx + 1,
            time_features=4,
        ),
    }


LAYER_NAMES = list(_layer_cases(0))


@pytest.mark.parametrize("ctx", [0, CTX], ids=["noctx", "ctx"])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_layer_generic_checks(name, ctx):
    errs = full_check(_layer_cases(ctx)[name])
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


@pytest.mark.parametrize(
    "name", ["additive_vector", "affine_vector", "affine_vector_even_d", "affine_time", "nice"]
)
def test_vector_coupling_context_broadcasts_over_samples(name):
    """Samples ``(K, B, D)`` with a per-example context ``(B, C)`` (k importance samples):
    both directions equal the call with the context expanded to ``(K, B, C)``, each
    example's samples equal that example alone, and the conditioner's first layer sees
    the context's B rows, not K x B."""
    make = _layer_cases(CTX).get(name) or (lambda: build_nice(5, 3, 8, CTX))
    flow = perturb(make())
    width = CTX + (1 if name == "affine_time" else 0)
    d = flow.event_shape[0]
    x, c = torch.randn(6, 4, d), torch.randn(4, width)
    tol = {"rtol": 0, "atol": 1e-12 if x.dtype == torch.float64 else 1e-5}
    for run in (flow.forward, flow.inverse):
        y, ld = run(x, c)
        y2, ld2 = run(x, c.expand(6, 4, width))
        assert y.shape == (6, 4, d) and ld.shape == (6, 4)
        torch.testing.assert_close(y, y2, **tol)
        torch.testing.assert_close(ld, ld2, **tol)
        y3, ld3 = run(x[:, 1], c[1])
        torch.testing.assert_close(y[:, 1], y3, **tol)
        torch.testing.assert_close(ld[:, 1], ld3, **tol)
    seen = []
    for m in flow.modules():
        if isinstance(m, (AdditiveCoupling, AffineCoupling)):
            m.conditioner.net[0].register_forward_hook(lambda mod, a, out: seen.append(a[0]))
    flow.inverse(x, c)
    assert not seen  # the split first layer: W_h h + (W_c c + b), never W [h; c]


def test_diagonal_scaling_generic_and_known_answer():
    full_check(lambda: DiagonalScaling(4))
    t = DiagonalScaling(3)
    with torch.no_grad():
        t.log_scale.fill_(math.log(2.0))
    u, ld = t(torch.ones(2, 3))
    assert torch.allclose(u, torch.full((2, 3), 2.0), rtol=1e-15, atol=0)
    assert torch.allclose(ld, torch.full((2,), 3 * math.log(2.0)), rtol=1e-15, atol=0)


# -- known answers: log-scale log 2 pins the sign ----------------------------------------------


def _set_log_scale(layer: AffineCoupling, value: float, n_scale_params: int) -> None:
    """Make the conditioner output a constant raw scale giving ``s = value``, ``t = 0``."""
    last = (
        layer.conditioner.net[-1] if hasattr(layer.conditioner, "net") else layer.conditioner.out
    )
    raw = layer.scale_bound * math.atanh(value / layer.scale_bound)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[:n_scale_params] = raw


def test_known_answer_vector_affine_log2():
    """u_B = 2 x_B with s = log 2: forward log-det = +#B log 2, inverse the negative."""
    layer = AffineCoupling(alternating_mask(5, 0), hidden=8)  # B = {1, 3}
    _set_log_scale(layer, math.log(2.0), 2)
    x = torch.randn(4, 5)
    u, ld = layer(x)
    assert torch.equal(u[:, 0::2], x[:, 0::2])
    assert torch.allclose(u[:, 1::2], 2 * x[:, 1::2], rtol=1e-14, atol=0)
    assert torch.allclose(ld, torch.full((4,), 2 * math.log(2.0)), rtol=1e-14, atol=0)
    x2, ld_inv = layer.inverse(u)
    assert torch.allclose(x2, x, rtol=1e-14, atol=0)
    assert torch.allclose(ld_inv, -ld, rtol=1e-14, atol=0)


def test_known_answer_checkerboard_affine_log2():
    """Checkerboard on (2, 4, 4): 2 channels x 8 transformed pixels -> 16 log 2."""
    layer = AffineCoupling(checkerboard_mask(4, 4, 1), (2, 4, 4), hidden=8, depth=1)
    _set_log_scale(layer, math.log(2.0), 2)  # the first C=2 output channels are raw s
    x = torch.randn(3, 2, 4, 4)
    u, ld = layer(x)
    keep = checkerboard_mask(4, 4, 1).expand(2, 4, 4)
    assert torch.equal(u[:, keep], x[:, keep])
    assert torch.allclose(u[:, ~keep], 2 * x[:, ~keep], rtol=1e-14, atol=0)
    assert torch.allclose(ld, torch.full((3,), 16 * math.log(2.0)), rtol=1e-14, atol=0)


def test_additive_logdet_is_exactly_zero_and_scale_is_bounded():
    add = perturb(AdditiveCoupling(alternating_mask(6, 0), hidden=8))
    _, ld = add(torch.randn(5, 6))
    assert torch.equal(ld, torch.zeros(5))
    aff = AffineCoupling(alternating_mask(6, 0), hidden=8, scale_bound=1.5)
    with torch.no_grad():
        aff.conditioner.net[-1].bias.fill_(1e6)  # a wildly large raw log-scale
    _, ld = aff(torch.randn(5, 6))
    assert ld.isfinite().all() and (ld <= 3 * 1.5).all() and (ld > 3 * 1.4).all()


# -- masks act as promised -------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,shape",
    [
        (alternating_mask(6, 1), (6,)),
        (checkerboard_mask(4, 4, 0), (2, 4, 4)),
        (channel_mask(4, 0), (4, 2, 2)),
        (channel_mask(5, 1), (5, 2, 2)),
    ],
    ids=["alternating", "checkerboard", "channel", "channel_odd"],
)
@pytest.mark.parametrize("cls", [AdditiveCoupling, AffineCoupling])
def test_untouched_part_is_exact_and_transformed_part_moves(cls, mask, shape):
    depth = {"depth": 1} if len(shape) == 3 else {}
    layer = perturb(cls(mask, shape, hidden=8, context_features=2, **depth))
    x = torch.randn(3, *shape)
    c = torch.randn(3, 2)
    keep = mask.expand(shape)
    for fn in (layer.forward, layer.inverse):
        y, _ = fn(x, c)
        assert torch.equal(y[:, keep], x[:, keep])
        assert ((y[:, ~keep] - x[:, ~keep]).abs() > 1e-6).all()
    # The transformed part depends on the kept part, never on itself except elementwise.
    xb = x.clone().requires_grad_(True)
    u, _ = layer(xb, c)
    g = torch.autograd.grad(u[0][~keep].sum(), xb)[0][0]
    assert (g[keep] != 0).any()


# -- time conditioning ------------------------------------------------------------------


def test_time_embedding_features():
    emb = TimeEmbedding(6)
    t = torch.tensor([[0.0], [0.25]])
    f = emb(t)
    assert f.shape == (2, 6)
    assert torch.allclose(f[0], torch.tensor([0.0, 0, 0, 1, 1, 1]), atol=1e-15)
    assert torch.allclose(f[1, 0], torch.tensor(math.sin(math.pi / 4)), atol=1e-15)
    with pytest.raises(ValueError):
        TimeEmbedding(5)


def test_time_conditioned_coupling_depends_on_t():
    layer = perturb(
        AffineCoupling(alternating_mask(5, 0), hidden=8, context_features=3, time_features=8)
    )
    x = torch.randn(4, 5)
    rest = torch.randn(4, 2)
    ctx_a = torch.cat([torch.full((4, 1), 0.1), rest], dim=-1)
    ctx_b = torch.cat([torch.full((4, 1), 0.7), rest], dim=-1)
    ua, lda = layer(x, ctx_a)
    ub, ldb = layer(x, ctx_b)
    assert (ua - ub).abs().max() > 1e-6 and (lda - ldb).abs().max() > 1e-6
    # The remaining context columns still reach the conditioner.
    uc, _ = layer(x, torch.cat([ctx_a[:, :1], rest + 1.0], dim=-1))
    assert (ua - uc).abs().max() > 1e-6


def test_time_conditioning_needs_a_context_column():
    with pytest.raises(ValueError, match="first context column"):
        AffineCoupling(alternating_mask(4, 0), hidden=8, time_features=8)
    with pytest.raises(ValueError, match="time_conditioned"):
        build_realnvp(4, 2, 8, time_conditioned=True)


# -- builders ----------------------------------------------------------------------------


def _builder_cases(ctx: int):
    return {
        "nice": lambda: build_nice(5, 3, 8, ctx),
        "nice_noscale_reverse": lambda: build_nice(
            6, 3, 8, ctx, scaling=False, permutation="reverse"
        ),
        "realnvp_lu": lambda: build_realnvp(5, 3, 8, ctx),
        "realnvp_alternate": lambda: build_realnvp(5, 3, 8, ctx, permutation="alternate"),
        "realnvp_reverse": lambda: build_realnvp(6, 3, 8, ctx, permutation="reverse"),
        "realnvp_random": lambda: build_realnvp(
            5, 3, 8, ctx, permutation="random", num_hidden=1, activation="tanh"
        ),
        "realnvp_time": lambda: build_realnvp(
            5, 2, 8, ctx + 1, time_conditioned=True, time_features=4
        ),
        "realnvp_image": lambda: build_realnvp_image((2, 4, 4), 1, 8, ctx, num_blocks=1),
    }


BUILDER_NAMES = list(_builder_cases(0))


@pytest.mark.parametrize("ctx", [0, CTX], ids=["noctx", "ctx"])
@pytest.mark.parametrize("name", BUILDER_NAMES)
def test_builder_generic_checks(name, ctx):
    # Image builders reorder pixels and flatten, so their init is checked separately.
    errs = full_check(_builder_cases(ctx)[name], identity_at_init=name != "realnvp_image")
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


def test_realnvp_image_structure_and_init():
    flow = build_realnvp_image((2, 4, 4), 2, 8, num_blocks=1)
    assert isinstance(flow, MultiScale) and flow.out_event_shape == (32,)
    assert len(flow.levels) == 2
    first = list(flow.levels[0].transforms)
    assert [type(t).__name__ for t in first] == ["AffineCoupling"] * 2 + ["Squeeze"] + [
        "AffineCoupling"
    ] * 2
    assert first[0].layout == "masked" and first[3].layout == "split"
    assert flow.levels[1].event_shape == (4, 2, 2)
    # At init the flow is the bare squeeze/split/flatten: a pure reordering, log-det 0.
    reference = MultiScale([Squeeze((2, 4, 4)), FixedAffine((4, 2, 2), 1.0)])
    x = torch.randn(3, 2, 4, 4)
    u, ld = flow(x)
    u_ref, _ = reference(x)
    assert torch.equal(u, u_ref) and torch.equal(ld, torch.zeros(3))


def test_realnvp_image_num_scales_default_and_errors():
    assert len(build_realnvp_image((1, 2, 2), 1, 4).levels) == 1  # 2x2 fits one scale
    with pytest.raises(ValueError, match="num_scales"):
        build_realnvp_image((1, 4, 4), 1, 4, num_scales=3)
    with pytest.raises(ValueError, match="image shape"):
        build_realnvp_image(4, 1, 4)


@pytest.mark.parametrize("permutation", ["alternate", "reverse", "lu"])
@pytest.mark.parametrize("features", [4, 5])
def test_two_layers_transform_every_feature(permutation, features):
    """No feature passes two couplings untouched (reverse with even D needs the parity fix)."""
    flow = perturb(build_realnvp(features, 2, 8, permutation=permutation), scale=0.1)
    if permutation == "lu":
        for t in flow.transforms:  # keep only the couplings' effect visible
            if isinstance(t, LULinear):
                torch.nn.init.zeros_(t.lower), torch.nn.init.zeros_(t.upper)
    x = torch.randn(features)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x)
    assert ((jac.abs() > 0).sum(-1) >= 2).all(), jac


def test_builder_layer_types():
    kinds = [type(t) for t in build_realnvp(4, 3, 8, permutation="reverse").transforms]
    assert kinds.count(ReversePermutation) == 2 and kinds.count(AffineCoupling) == 3
    kinds = [type(t) for t in build_realnvp(4, 3, 8, permutation="random").transforms]
    assert kinds.count(RandomPermutation) == 2 and kinds[-1] is Permutation  # restores order
    kinds = [type(t) for t in build_nice(4, 2, 8).transforms]
    assert kinds == [AdditiveCoupling, LULinear, AdditiveCoupling, DiagonalScaling]


@pytest.mark.parametrize(
    "builder,args,bad,match",
    [
        (build_realnvp, (4, 2, 8), {"colour": 1}, "colour"),
        (build_nice, (4, 2, 8), {"scale_bound": 2.0}, "scale_bound"),
        (build_realnvp_image, ((1, 4, 4), 1, 8), {"num_hidden": 2}, "num_hidden"),
    ],
)
def test_builders_reject_unknown_options(builder, args, bad, match):
    with pytest.raises(TypeError, match=match):
        builder(*args, **bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"permutation": "shuffle"}, "permutation"),
        ({"scale_bound": -1.0}, "scale_bound"),
        ({"activation": "nope"}, "activation"),
        ({"num_hidden": -1}, "num_hidden"),
    ],
)
def test_builders_reject_bad_option_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_realnvp(4, 2, 8, **kwargs)
    with pytest.raises(ValueError, match="features"):
        build_realnvp(1, 2, 8)


def test_deep_stacks_stay_exact():
    """Eight layers, moderately perturbed: still exact to ~1e-14 in float64.

    (The harness's default perturbation, 0.3 on every weight, gives conv/MLP
    conditioners gains of ~40 per layer; deep stacks then amplify rounding in the round
    trip far beyond 1e-9 even though each layer is exact, so depth is tested here.)
    """
    for make in (
        lambda: build_realnvp(6, 8, 16, CTX),
        lambda: build_realnvp_image((2, 4, 4), 2, 8, CTX, num_blocks=1),
    ):
        flow = perturb(make(), scale=0.1)
        flow.eval()
        x, c = make_inputs(flow, lead=(2,))
        check_roundtrip(flow, x, c)
        check_logdet_bruteforce(flow, x, c)


# -- extreme inputs ----------------------------------------------------------------------


_FINITE_CASES = {
    "affine_vector": lambda: AffineCoupling(alternating_mask(5, 0), hidden=8, context_features=2),
    "additive_vector": lambda: AdditiveCoupling(alternating_mask(5, 1), hidden=8),
    "affine_checkerboard": lambda: AffineCoupling(
        checkerboard_mask(4, 4, 0), (2, 4, 4), hidden=8, depth=1, context_features=2
    ),
    "realnvp": lambda: build_realnvp(5, 3, 8, 2, time_conditioned=True),
    "nice": lambda: build_nice(5, 3, 8),
    "realnvp_image": lambda: build_realnvp_image((2, 4, 4), 1, 8, num_blocks=1),
}


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(sorted(_FINITE_CASES)),
    log_mag=st.floats(-3.0, 4.0),
    seed=st.integers(0, 2**16),
)
def test_extreme_inputs_give_finite_outputs(name, log_mag, seed):
    flow = perturb(_FINITE_CASES[name](), seed=seed)
    x, c = make_inputs(flow, lead=(3,), scale=10.0**log_mag, seed=seed)
    if c is not None:
        c = c * 10.0**log_mag
    check_finite(flow, x, c, directions(flow, x, c))
