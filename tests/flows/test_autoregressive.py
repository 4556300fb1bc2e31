"""MADE, the affine autoregressive layer (MAF / IAF) and the gated IAF: exact maths tests."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from tests.flows.harness import (
    EXACT_TOL,
    Directions,
    check_finite,
    check_roundtrip,
    count_made_passes,
    full_check,
    make_inputs,
    perturb,
)
from vaeflow.flows.autoregressive import (
    MADE,
    AffineAutoregressive,
    GatedAutoregressive,
    build_gated_iaf,
    build_iaf,
    build_maf,
    make_order,
)
from vaeflow.flows.base import Composite, Inverse, Permutation, ShapeError

D = 5
H = 12

LAYERS = {
    "affine_natural": lambda c: AffineAutoregressive(
        D, hidden=H, num_hidden=2, context_features=c
    ),
    "affine_random_order": lambda c: AffineAutoregressive(
        D, hidden=H, num_hidden=1, context_features=c, order="random", seed=4
    ),
    "affine_no_hidden": lambda c: AffineAutoregressive(
        D, hidden=H, num_hidden=0, context_features=c
    ),
    "affine_unbounded": lambda c: AffineAutoregressive(
        D, hidden=H, num_hidden=2, context_features=c, scale_bound=None
    ),
    "iaf_layer": lambda c: Inverse(
        AffineAutoregressive(D, hidden=H, num_hidden=2, context_features=c, order="random", seed=1)
    ),
    "gated": lambda c: GatedAutoregressive(D, hidden=H, num_hidden=2, context_features=c),
    "gated_iaf_layer": lambda c: Inverse(
        GatedAutoregressive(D, hidden=H, num_hidden=1, context_features=c, forget_bias=2.0)
    ),
}
BUILDERS = {
    "maf": lambda c: build_maf(D, 2, H, c),
    "maf_random": lambda c: build_maf(D, 3, H, c, order="random", permutation="random"),
    "maf_none": lambda c: build_maf(D, 2, H, c, permutation="none", num_hidden=1),
    "iaf": lambda c: build_iaf(D, 3, H, c),
    "iaf_random": lambda c: build_iaf(D, 2, H, c, permutation="random", order="random"),
    "gated_iaf": lambda c: build_gated_iaf(D, 2, H, c),
}
NOT_IDENTITY = {"gated", "gated_iaf_layer", "gated_iaf"}


@pytest.mark.parametrize("ctx", [0, 3])
@pytest.mark.parametrize("name", [*LAYERS, *BUILDERS])
def test_generic_checks(name, ctx):
    make = {**LAYERS, **BUILDERS}[name]
    errs = full_check(lambda: make(ctx), identity_at_init=name not in NOT_IDENTITY)
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


# -- MADE ------------------------------------------------------------------------------------


def _made_jacobians(made: MADE, x: torch.Tensor, c: torch.Tensor | None):
    def f(x, c=c):
        return made(x[None], None if c is None else c[None])[0]

    jx = torch.autograd.functional.jacobian(f, x)  # (D, P, D)
    jc = None
    if c is not None:
        jc = torch.autograd.functional.jacobian(lambda c: made(x[None], c[None])[0], c)
    return jx, jc


@pytest.mark.parametrize("num_hidden", [0, 1, 2])
@pytest.mark.parametrize("order", ["natural", "random", torch.tensor([2, 0, 4, 1, 3])])
def test_made_connectivity(order, num_hidden):
    """Output i depends on x_j iff order[j] < order[i]; the context reaches every output."""
    made = MADE(
        D,
        3,
        hidden=8,
        num_hidden=num_hidden,
        context_features=2,
        order=order,
        seed=7,
        activation="tanh",
    )
    # At init the (zero) output layer makes every output exactly 0, with or without context.
    x, c = torch.randn(D), torch.randn(2)
    assert torch.equal(made(x[None], c[None]), torch.zeros(1, D, 3))
    perturb(made, scale=0.5)
    rank = made.order
    jx, jc = _made_jacobians(made, x, c)
    depends = jx.abs().amax(dim=1) > 0  # (D out, D in)
    allowed = rank[None, :] < rank[:, None]
    assert not (depends & ~allowed).any(), "an output depends on a later or same-rank input"
    # hidden >= D - 1 keeps every degree, so every allowed connection is realised.
    assert torch.equal(depends, allowed)
    assert (jc.abs().amax(dim=-1) > 0).all(), "context does not reach every output"


def test_made_random_order_is_seeded_and_saved():
    a = make_order(6, "random", seed=3)
    assert torch.equal(a, make_order(6, "random", seed=3))
    assert not torch.equal(a, make_order(6, "random", seed=4))
    m1, m2 = MADE(6, 2, 8, order="random", seed=3), MADE(6, 2, 8, order="random", seed=4)
    m2.load_state_dict(m1.state_dict())  # order and masks live in buffers
    assert torch.equal(m2.order, a)
    perturb(m1)
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(m1(x), m2(x))


def test_made_rejects_bad_order():
    with pytest.raises(ValueError, match="order"):
        make_order(4, "backwards")
    with pytest.raises(ValueError, match="permutation"):
        make_order(4, torch.tensor([0, 1, 1, 2]))


# -- triangular Jacobians --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AffineAutoregressive, GatedAutoregressive])
@pytest.mark.parametrize("inverse", [False, True])
def test_jacobian_is_triangular_in_the_layer_order(cls, inverse):
    layer = perturb(cls(D, hidden=H, num_hidden=2, context_features=3, order="random", seed=5))
    x, c = torch.randn(D), torch.randn(3)
    fn = layer.inverse if inverse else layer
    jac = torch.autograd.functional.jacobian(lambda v: fn(v[None], c[None])[0][0], x)
    by_rank = torch.argsort(layer.order)  # by_rank[r] = feature with rank r
    jp = jac[by_rank][:, by_rank]
    assert torch.equal(torch.triu(jp, 1), torch.zeros_like(jp))
    assert (jp.diagonal().abs() > 0).all()
    assert torch.tril(jp, -1).abs().sum() > 0  # and it is not merely diagonal


# -- known answers -----------------------------------------------------------------------------


def test_maf_known_answer_pins_sign():
    """Constant shift m = 0.5 and log-scale s = log 2: u = (x - 0.5) / 2, log-det -D log 2."""
    layer = AffineAutoregressive(D, hidden=H, num_hidden=2, scale_bound=None)
    with torch.no_grad():
        layer.made.out.bias.view(D, 2)[:, 0] = 0.5
        layer.made.out.bias.view(D, 2)[:, 1] = math.log(2.0)
    x = torch.randn(3, D)
    u, ld = layer(x)
    assert torch.allclose(u, (x - 0.5) / 2, atol=1e-15, rtol=0)
    assert torch.allclose(ld, torch.full((3,), -D * math.log(2.0)), atol=1e-14, rtol=0)
    x2, ld_inv = layer.inverse(u)
    assert torch.allclose(x2, x, atol=1e-15, rtol=0) and torch.allclose(ld_inv, -ld)
    # Used as an IAF, sampling runs the same one-pass map on the noise.
    z, ld_z = Inverse(layer).inverse(u)
    assert torch.allclose(z, (u - 0.5) / 2, atol=1e-15, rtol=0)
    assert torch.allclose(ld_z, ld)


def test_scale_is_soft_bounded():
    layer = AffineAutoregressive(D, hidden=H, num_hidden=2, scale_bound=2.0)
    with torch.no_grad():
        layer.made.out.bias.view(D, 2)[:, 1] = 1e6
    _, ld = layer(torch.randn(2, D))
    assert torch.allclose(ld, torch.full((2,), -2.0 * D))


@pytest.mark.parametrize("forget_bias", [1.0, 2.0, -0.5])
def test_gated_starts_as_a_known_scaling(forget_bias):
    """Not the identity at init: m = 0, so y = sigmoid(b) x and log-det = D logsigmoid(b)."""
    layer = GatedAutoregressive(
        D, hidden=H, num_hidden=2, context_features=3, forget_bias=forget_bias
    )
    x, c = torch.randn(4, D), torch.randn(4, 3)
    b = torch.tensor(forget_bias)
    y, ld = layer(x, c)
    assert torch.allclose(y, torch.sigmoid(b) * x, atol=1e-15, rtol=0)
    expected = D * torch.nn.functional.logsigmoid(b)
    assert torch.allclose(ld, expected.expand(4), atol=1e-14, rtol=0)
    # The IAF sampling direction is Kingma's update z = sigma * eps + (1 - sigma) * m.
    z, ld_z = Inverse(layer).inverse(x, c)
    assert torch.equal(z, y) and torch.equal(ld_z, ld)


def test_gated_update_matches_kingma_formula_after_training():
    layer = perturb(
        GatedAutoregressive(D, hidden=H, num_hidden=2, context_features=2, forget_bias=1.0)
    )
    eps, c = torch.randn(6, D), torch.randn(6, 2)
    params = layer.made(eps, c)
    m = params[..., 0]
    sigma = torch.sigmoid(5.0 * torch.tanh(params[..., 1] / 5.0) + 1.0)
    z, ld = Inverse(layer).inverse(eps, c)
    assert torch.allclose(z, sigma * eps + (1 - sigma) * m, atol=1e-15)
    assert torch.allclose(ld, torch.log(sigma).sum(-1), atol=1e-13)


# -- IAF: the sampling direction is one pass ----------------------------------------------------


def _count_made_calls(flow, fn):
    """Network passes of every MADE in ``flow`` while running ``fn`` (the forward pass and
    the sequential inversion both evaluate the function made by ``MADE.conditioner``)."""
    return count_made_passes(fn)


def test_iaf_sampling_is_the_one_pass_forward_exactly():
    layer = perturb(AffineAutoregressive(D, hidden=H, num_hidden=2, context_features=3))
    iaf = Inverse(layer)
    eps, c = torch.randn(2, 4, D), torch.randn(4, 3)  # context broadcast over samples
    z, ld = iaf.inverse(eps, c)
    z_ref, ld_ref = layer(eps, c)
    assert torch.equal(z, z_ref) and torch.equal(ld, ld_ref)


@pytest.mark.parametrize("builder", [build_iaf, build_gated_iaf])
def test_iaf_builders_sample_with_one_made_pass_per_layer(builder):
    layers = 3
    flow = perturb(builder(D, layers, H, 2))
    eps, c = torch.randn(7, D), torch.randn(7, 2)
    assert _count_made_calls(flow, lambda: flow.inverse(eps, c)) == layers
    # Scoring a given z is the sequential direction: D passes per layer.
    assert _count_made_calls(flow, lambda: flow(eps, c)) == layers * D


def test_maf_scores_with_one_made_pass_per_layer():
    flow = build_maf(D, 2, H)
    x = torch.randn(3, D)
    assert _count_made_calls(flow, lambda: flow(x)) == 2
    assert _count_made_calls(flow, lambda: flow.inverse(x)) == 2 * D


def test_builders_undo_their_permutations():
    """Odd number of reversals or random permutations: a final permutation restores order."""
    flow = build_maf(D, 2, H, permutation="reverse")
    assert isinstance(flow.transforms[-1], Permutation)
    x = torch.randn(2, D)
    assert torch.equal(flow(x)[0], x)
    flow = build_maf(D, 3, H, permutation="reverse")  # two reversals cancel: no extra layer
    assert isinstance(flow.transforms[-1], AffineAutoregressive)
    flow = build_iaf(D, 4, H, permutation="random")
    assert torch.equal(flow.inverse(x)[0], x)


# -- options, shapes, context ------------------------------------------------------------------


@pytest.mark.parametrize("builder", [build_maf, build_iaf, build_gated_iaf])
def test_builders_validate_options(builder):
    with pytest.raises(TypeError, match="flavour"):
        builder(D, 2, H, flavour="x")
    with pytest.raises(ValueError, match="permutation"):
        builder(D, 2, H, permutation="shuffle")
    with pytest.raises(ValueError, match="order"):
        builder(D, 2, H, order="backwards")
    with pytest.raises(ValueError, match="num_layers"):
        builder(D, 0, H)


def test_forget_bias_only_for_gated():
    with pytest.raises(TypeError, match="forget_bias"):
        build_maf(D, 2, H, forget_bias=1.0)
    with pytest.raises(ValueError, match="scale_bound"):
        AffineAutoregressive(D, scale_bound=0.0)


def test_context_broadcasts_over_sample_dimension():
    flow = perturb(build_maf(D, 2, H, context_features=3))
    x, h = torch.randn(4, 2, D), torch.randn(2, 3)
    u, ld = flow(x, h)
    u2, ld2 = flow(x, h.expand(4, 2, 3))
    # Not bit-equal: the MADE projects the (2, 3) context once and broadcasts it, and a
    # matmul over 2 rows may round differently from one over 8.
    tol = {"rtol": 0, "atol": 1e-12 if x.dtype == torch.float64 else 1e-5}
    assert torch.allclose(u, u2, **tol) and torch.allclose(ld, ld2, **tol)
    assert ld.shape == (4, 2)
    with pytest.raises(ShapeError):
        flow(x, torch.randn(3, 3))


def test_single_feature_layer():
    """D = 1: the only parameters come from context and bias; still exact."""
    layer = perturb(AffineAutoregressive(1, hidden=H, num_hidden=2, context_features=2))
    x, c = make_inputs(layer)
    check_roundtrip(layer, x, c)


def test_composite_of_iaf_and_maf_layers():
    flow = perturb(Composite([build_iaf(D, 2, H), build_maf(D, 2, H)]))
    x, _ = make_inputs(flow)
    assert check_roundtrip(flow, x, None) <= EXACT_TOL


# -- extreme inputs ----------------------------------------------------------------------------

_FLOWS: dict[str, object] = {}


def _flow(name):
    if name not in _FLOWS:
        _FLOWS[name] = perturb({**LAYERS, **BUILDERS}[name](3)).eval()
    return _FLOWS[name]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["affine_natural", "gated", "maf_random", "iaf", "gated_iaf"]),
    magnitude=st.floats(1.0, 1e4),
    seed=st.integers(0, 2**16),
)
def test_extreme_inputs_stay_finite(name, magnitude, seed):
    flow = _flow(name)
    g = torch.Generator().manual_seed(seed)
    x = magnitude * torch.randn(3, D, generator=g)
    c = magnitude * torch.randn(3, 3, generator=g)
    check_finite(flow, x, c, Directions())


def test_made_projects_an_unexpanded_context_once_per_example():
    """(K, B, D) latents with a (B, C) context: each MADE projects the context for the B
    examples, not for K x B expanded copies (IWAE training, k = 5000 evaluation)."""
    flow = build_iaf(D, 2, H, context_features=3)
    shapes = []
    for m in flow.modules():
        if isinstance(m, MADE):
            m.context.register_forward_hook(lambda mod, inp, out: shapes.append(inp[0].shape))
    flow.inverse(torch.randn(50, 2, D), torch.randn(2, 3))
    assert shapes == [(2, 3), (2, 3)]


# -- the MADE of van den Berg et al.'s code (made = "sylvester_code") --------------------------

SYL_H = 10  # a multiple of D = 5, as the code's masks need


def _sylvester_iaf(ctx: int, num_layers: int = 4):
    return build_gated_iaf(
        D,
        num_layers,
        SYL_H,
        ctx,
        num_hidden=2,
        activation="elu",
        made="sylvester_code",
        permutation="reverse_every_other",
        scale_bound="none",
    )


@pytest.mark.parametrize("ctx", [0, SYL_H])
def test_sylvester_code_gated_iaf_is_exact(ctx):
    errs = full_check(lambda: _sylvester_iaf(ctx), identity_at_init=False)
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


def test_sylvester_code_masks_follow_the_codes_rule():
    """Block masks, written out by hand from the rule of the code's MaskedLinear (the IAF
    code's get_linear_ar_mask, which the conv IAF's channel mask also follows)."""
    from vaeflow.flows.conv_autoregressive import channel_ar_mask

    def sylvester_code_mask(n_in, n_out, diagonal_zeros=False):
        return channel_ar_mask(n_in, n_out, diagonal_zeros)

    widen = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1]])  # 2 -> 4: blocks of 2 units
    square = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]])  # 3 -> 3: unit by unit
    narrow_diag = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]])  # 4 -> 2, output i sees < i
    narrow = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(sylvester_code_mask(2, 4), widen.float())
    assert torch.equal(sylvester_code_mask(3, 3), square.float())
    assert torch.equal(sylvester_code_mask(4, 2, diagonal_zeros=True), narrow_diag.float())
    assert torch.equal(sylvester_code_mask(4, 2), narrow.float())
    with pytest.raises(ValueError, match="divide"):
        sylvester_code_mask(3, 4)


def test_sylvester_code_made_connectivity_and_forward():
    """Output i sees x_<i only (output 0: a constant, context or not); the context vector
    itself is added after the first activation; the forward is the code's, written out."""
    made = MADE(
        D,
        2,
        hidden=SYL_H,
        num_hidden=2,
        context_features=SYL_H,
        activation="elu",
        style="sylvester_code",
    )
    assert made.context is None  # no per-layer map: the posterior projects it, once
    x, c = torch.randn(D), torch.randn(SYL_H)
    jx, jc = _made_jacobians(made, x, c)
    depends = jx.abs().amax(dim=1) > 0
    allowed = torch.arange(D)[None, :] < torch.arange(D)[:, None]
    assert torch.equal(depends, allowed)
    reaches = jc.abs().amax(dim=(1, 2)) > 0
    assert not reaches[0] and reaches[1:].all()
    # The code: h = elu(z W1) + c; h = elu(h W2); (mean, gate) = h W3 (masks applied).
    l1, l2 = made.hidden_layers
    h = F.elu(F.linear(x, l1.weight * l1.mask, l1.bias)) + c
    h = F.elu(F.linear(h, l2.weight * l2.mask, l2.bias))
    out = F.linear(h, made.out.weight * made.out.mask, made.out.bias).reshape(D, 2)
    assert torch.allclose(made(x[None], c[None])[0], out, atol=1e-6)
    assert torch.equal(l2.mask, torch.tril(torch.ones(SYL_H, SYL_H)))


def test_sylvester_code_made_init():
    """Every masked weight ~ N(0, 2 / fan_out) (the code's kaiming_normal on an (in, out)
    weight), biases zero, the output layer not zero; its fan is D = 64, as each of the
    code's two (320 -> 64) output layers, not the 128 outputs of vaeflow's fused one."""
    torch.manual_seed(0)
    made = MADE(64, 2, hidden=320, num_hidden=2, activation="elu", style="sylvester_code")
    for layer, fan in zip([*made.hidden_layers, made.out], (320, 320, 64), strict=True):
        want = (2.0 / fan) ** 0.5
        assert abs(layer.weight.std().item() / want - 1) < 0.02, layer
        assert abs(layer.weight.mean().item()) < 0.1 * want
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_reverse_every_other():
    """Reversals before layers 1 and 3 only (the code's '(i + 1) % 2 == 0'); an odd count
    is undone at the end."""
    kinds = [type(t).__name__ for t in _sylvester_iaf(0).transform.transforms]
    assert kinds == [
        "GatedAutoregressive",
        "ReversePermutation",
        "GatedAutoregressive",
        "GatedAutoregressive",
        "ReversePermutation",
        "GatedAutoregressive",
    ]
    kinds = [type(t).__name__ for t in _sylvester_iaf(0, 3).transform.transforms]
    assert kinds == [
        "GatedAutoregressive",
        "ReversePermutation",
        "GatedAutoregressive",
        "GatedAutoregressive",
        "Permutation",
    ]
    x = torch.randn(2, D)
    flow = perturb(_sylvester_iaf(0, 3))
    assert torch.allclose(flow.forward(flow.inverse(x)[0])[0], x, atol=1e-5)


def test_sylvester_code_options_are_checked():
    with pytest.raises(ValueError, match="context_features"):
        build_gated_iaf(D, 2, SYL_H, 3, made="sylvester_code")
    with pytest.raises(ValueError, match="natural order"):
        build_gated_iaf(D, 2, SYL_H, made="sylvester_code", order="random")
    with pytest.raises(ValueError, match="num_hidden"):
        build_gated_iaf(D, 2, SYL_H, made="sylvester_code", num_hidden=0)
    with pytest.raises(ValueError, match="made"):
        build_gated_iaf(D, 2, SYL_H, made="nflows")
    with pytest.raises(ValueError, match="scale_bound"):
        build_gated_iaf(D, 2, SYL_H, scale_bound="off")
    flow = build_gated_iaf(D, 2, SYL_H, scale_bound="none")
    assert flow.transform.transforms[0].scale_bound is None
