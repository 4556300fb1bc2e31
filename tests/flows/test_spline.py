"""Rational-quadratic splines, spline coupling and autoregressive layers: exact maths tests."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.flows.harness import (
    EXACT_TOL,
    Directions,
    check_finite,
    count_made_passes,
    full_check,
    perturb,
)
from vaeflow.flows.autoregressive import MADE
from vaeflow.flows.base import LULinear, Permutation
from vaeflow.flows.spline import (
    RQSplineAutoregressive,
    RQSplineCoupling,
    _knot_table,
    _knots,
    _spline_from_params,
    build_nsf_autoregressive,
    build_nsf_coupling,
    rational_quadratic_spline,
)

B = 3.0
K = 5
D = 5
H = 12


def _params(n: int, k: int = K, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(n, k, generator=g),
        scale * torch.randn(n, k, generator=g),
        scale * torch.randn(n, k - 1, generator=g),
    )


def _expand(params, n):
    return [p[:1].expand(n, -1) for p in params]


def rqs(x, params, inverse=False, bound=B):
    return rational_quadratic_spline(x, *params, inverse=inverse, tail_bound=bound)


# -- the functional spline ---------------------------------------------------------------------


def test_zero_parameters_give_exactly_the_identity():
    x = torch.cat([torch.linspace(-6, 6, 1001), torch.tensor([-B, B, 0.0])])
    zeros = [torch.zeros(x.numel(), K), torch.zeros(x.numel(), K), torch.zeros(x.numel(), K - 1)]
    for inverse in (False, True):
        y, ld = rqs(x, zeros, inverse)
        assert (y - x).abs().max() <= 1e-15 and ld.abs().max() <= 1e-15


def test_single_bin_is_the_identity_whatever_its_parameters():
    """K = 1: one bin from (-B, -B) to (B, B) with unit end slopes is the identity."""
    x = torch.linspace(-4, 4, 101)
    params = [torch.randn(101, 1), torch.randn(101, 1), torch.zeros(101, 0)]
    y, ld = rqs(x, params)
    assert (y - x).abs().max() <= 1e-15 and ld.abs().max() <= 1e-15


def test_known_answer_knots_and_derivatives():
    """Knot x_k maps to y_k, with derivative d_k = min_d + softplus(raw + c) there."""
    uw = torch.tensor([[0.0, 0.0]])  # two equal bins: interior knot at x = 0
    uh = torch.tensor([[math.log(3.0), 0.0]])  # heights 3:1 (before the min-height floor)
    raw_d = torch.tensor([[0.7]])
    min_h = min_d = 1e-3
    frac0 = min_h + (1 - 2 * min_h) * 0.75
    y_knot = -B + 2 * B * frac0
    d_knot = min_d + math.log1p(math.exp(0.7 + math.log(math.expm1(1 - min_d))))
    y, ld = rational_quadratic_spline(torch.tensor([0.0]), uw, uh, raw_d, tail_bound=B)
    assert abs(y.item() - y_knot) <= 1e-14
    assert abs(ld.item() - math.log(d_knot)) <= 1e-14
    # And the end knots: -B -> -B and B -> B with unit slope.
    ends = torch.tensor([-B, B])
    y, ld = rational_quadratic_spline(
        ends, uw.expand(2, -1), uh.expand(2, -1), raw_d.expand(2, -1), tail_bound=B
    )
    assert torch.equal(y, ends) and ld.abs().max() <= 1e-14


def test_zero_raw_derivative_is_exactly_one():
    uw, uh = torch.zeros(1, 2), torch.zeros(1, 2)
    _, ld = rational_quadratic_spline(torch.zeros(1), uw, uh, torch.zeros(1, 1), tail_bound=B)
    assert abs(ld.item()) <= 1e-15


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_monotone_across_a_dense_grid_including_tails(scale):
    params = _params(1, scale=scale, seed=3)
    _, knots = _knots(params[0][:1], B, 1e-3)
    x = torch.cat([torch.linspace(-2 * B, 2 * B, 20001), knots.reshape(-1)]).sort().values
    x = x.unique()
    y, ld = rqs(x, _expand(params, x.numel()))
    assert (y.diff() > 0).all()
    assert ld.isfinite().all()


def test_identity_outside_the_bound_with_zero_logdet():
    params = _params(6, scale=2.0)
    x = torch.tensor([-1e6, -10.0, -B - 1e-9, B + 1e-9, 7.0, 1e6])
    for inverse in (False, True):
        y, ld = rqs(x, params, inverse)
        assert torch.equal(y, x) and torch.equal(ld, torch.zeros(6))


def test_continuity_at_knots_and_at_the_bound():
    params = _params(1, scale=1.5, seed=5)
    _, knots = _knots(params[0], B, 1e-3)
    knots = knots.reshape(-1)
    lo = torch.nextafter(knots, torch.full_like(knots, -math.inf))
    hi = torch.nextafter(knots, torch.full_like(knots, math.inf))
    n = knots.numel()
    p = _expand(params, n)
    (y_lo, ld_lo), (y_at, _), (y_hi, ld_hi) = (rqs(v, p) for v in (lo, knots, hi))
    assert (y_hi - y_lo).abs().max() <= 1e-13 and (y_at - y_lo).abs().max() <= 1e-13
    # The slope is continuous at every knot too (the interpolant shares d_k on both sides).
    assert (ld_hi - ld_lo).abs().max() <= 1e-9
    # At +-B the spline meets the identity tails: same value, unit slope (log-det 0).
    assert y_at[0] == -B and y_at[-1] == B
    assert ld_lo[0] == 0 and ld_hi[-1] == 0 and ld_hi[0].abs() <= 1e-9 and ld_lo[-1].abs() <= 1e-9


def test_inverse_exact_at_bounds_knots_and_random_points():
    params = _params(1, scale=1.0, seed=7)
    _, xk = _knots(params[0], B, 1e-3)
    _, yk = _knots(params[1], B, 1e-3)
    x = torch.cat([xk.reshape(-1), torch.tensor([-B, B]), 2 * B * torch.rand(200) - B])
    y, ld = rqs(x, _expand(params, x.numel()))
    x2, ld2 = rqs(y, _expand(params, x.numel()), inverse=True)
    assert (x2 - x).abs().max() <= 1e-12 and (ld + ld2).abs().max() <= 1e-12
    # Inverse first, starting exactly at the output knots (incl. +-B).
    y = torch.cat([yk.reshape(-1), 2 * B * torch.rand(200) - B])
    x, ld = rqs(y, _expand(params, y.numel()), inverse=True)
    y2, ld2 = rqs(x, _expand(params, y.numel()))
    assert (y2 - y).abs().max() <= 1e-12 and (ld + ld2).abs().max() <= 1e-12
    assert x[0] == -B and x[K] == B


@pytest.mark.parametrize("inverse", [False, True])
def test_derivative_matches_finite_differences(inverse):
    n = 400
    params = _params(n, scale=1.0, seed=11)
    x = 1.9 * B * torch.rand(n) - 0.95 * B
    h = 1e-6
    y_p, _ = rqs(x + h, params, inverse)
    y_m, _ = rqs(x - h, params, inverse)
    _, ld = rqs(x, params, inverse)
    fd = (y_p - y_m) / (2 * h)
    # Skip the few points within h of a knot, where the central difference straddles it.
    _, knots = _knots(params[1 if inverse else 0], B, 1e-3)
    near = ((x[:, None] - knots).abs() < 2 * h).any(-1)
    rel = ((fd - ld.exp()).abs() / ld.exp())[~near]
    assert rel.max() <= 1e-6


@pytest.mark.parametrize("inverse", [False, True])
def test_all_tail_empty_and_huge_inputs(inverse):
    params = _params(4, scale=2.0)
    x = torch.tensor([1e6, -1e6, 1e300, -4.0])
    y, ld = rqs(x, params, inverse)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(4))
    empty = [p[:0] for p in params]
    y, ld = rqs(torch.zeros(0), empty, inverse)
    assert y.shape == (0,) and ld.shape == (0,)
    # Multi-dimensional inputs, all in the tails.
    x = torch.full((2, 3), 5.0)
    y, ld = rqs(x, [p[:1].expand(6, -1).reshape(2, 3, -1) for p in params], inverse)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(2, 3))


def test_gradients_finite_at_edges_and_tails():
    """The clamped, discarded branch must not leak NaN into gradients."""
    params = [p.requires_grad_() for p in _params(6, scale=2.0)]
    x = torch.tensor([-B, B, 0.0, 1e6, -1e6, B + 1e-3], requires_grad=True)
    for inverse in (False, True):
        y, ld = rqs(x, params, inverse)
        grads = torch.autograd.grad((y + ld).sum(), [x, *params])
        assert all(g.isfinite().all() for g in grads)
        assert torch.equal(grads[0][3:5], torch.ones(2))  # identity tails


def test_shape_validation():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="derivatives"):
        rational_quadratic_spline(x, torch.zeros(3, K), torch.zeros(3, K), torch.zeros(3, K + 1))
    with pytest.raises(ValueError, match="widths"):
        rational_quadratic_spline(x, torch.zeros(3, K), torch.zeros(3, K - 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="min_bin_width"):
        rational_quadratic_spline(
            x, torch.zeros(3, K), torch.zeros(3, K), torch.zeros(3, K - 1), min_bin_width=0.3
        )


def test_ill_conditioned_round_trip_error_is_only_the_conditioning():
    """Large raw params give slopes down to ~1e-8; the round-trip error in x is then
    ``eps * |y| / slope``, so it is bounded once measured in output units."""
    n = 20000
    params = _params(n, k=8, scale=10.0, seed=13)
    x = 2.2 * B * torch.rand(n) - 1.1 * B
    y, ld = rqs(x, params)
    x2, _ = rqs(y, params, inverse=True)
    slope = ld.exp()
    assert ((x2 - x).abs() * slope.clamp(max=1.0)).max() <= 1e-13
    # Inverse first is well conditioned: the paper's root formula 2c / (-b - sqrt(disc))
    # alone cancels when b < 0 and loses ~4 digits here (4e-11); the sign-aware one does not.
    x, _ = rqs(y, params, inverse=True)
    y2, _ = rqs(x, params)
    assert (y2 - y).abs().max() <= 5e-12


# Raw parameters in [-2, 2] already span slopes from ~1e-5 to ~1e5. Much beyond that the
# x-space round trip is limited by conditioning (eps * |y| / slope), which the test above
# bounds in output units instead.
fin = st.floats(-2.0, 2.0, allow_nan=False)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    k=st.integers(1, 8),
    bound=st.sampled_from([1.0, 3.0, 5.0]),
    data=st.data(),
)
def test_hypothesis_round_trip(k, bound, data):
    n = 16
    raw = data.draw(st.lists(fin, min_size=n * (3 * k - 1), max_size=n * (3 * k - 1)))
    p = torch.tensor(raw).reshape(n, 3 * k - 1)
    params = (p[:, :k], p[:, k : 2 * k], p[:, 2 * k :])
    xs = data.draw(
        st.lists(
            st.one_of(st.floats(-2 * bound, 2 * bound), st.sampled_from([-bound, bound, 0.0])),
            min_size=n,
            max_size=n,
        )
    )
    x = torch.tensor(xs)
    for first in (False, True):  # forward then inverse, and inverse then forward
        y, ld = rqs(x, params, first, bound)
        x2, ld2 = rqs(y, params, not first, bound)
        assert (x2 - x).abs().max() <= EXACT_TOL
        assert (ld + ld2).abs().max() <= EXACT_TOL
        assert y.isfinite().all() and ld.isfinite().all()


# -- layers and builders -----------------------------------------------------------------------

LAYERS = {
    "coupling_even": lambda c: RQSplineCoupling(D, H, 2, c, num_bins=K),
    "coupling_odd": lambda c: RQSplineCoupling(D, H, 1, c, num_bins=4, parity=1, tail_bound=2.0),
    "coupling_mask": lambda c: RQSplineCoupling(
        D, H, 2, c, mask=torch.tensor([True, True, False, True, False])
    ),
    # Even D with an alternating mask: split/merged by parity views (fast path).
    "coupling_even_d_parity0": lambda c: RQSplineCoupling(6, H, 2, c, num_bins=K),
    "coupling_even_d_parity1": lambda c: RQSplineCoupling(6, H, 1, c, num_bins=4, parity=1),
    "autoregressive": lambda c: RQSplineAutoregressive(
        D, hidden=H, num_hidden=2, context_features=c, num_bins=4
    ),
    "autoregressive_random": lambda c: RQSplineAutoregressive(
        D, hidden=H, num_hidden=1, context_features=c, num_bins=3, order="random", seed=2
    ),
}
BUILDERS = {
    "nsf_coupling": lambda c: build_nsf_coupling(D, 2, H, c, num_bins=4),
    "nsf_coupling_even_d": lambda c: build_nsf_coupling(4, 3, H, c, num_bins=4),
    "nsf_coupling_lu": lambda c: build_nsf_coupling(4, 2, H, c, num_bins=4, permutation="lu"),
    "nsf_coupling_random": lambda c: build_nsf_coupling(D, 3, H, c, permutation="random"),
    "nsf_ar": lambda c: build_nsf_autoregressive(D, 2, H, c, num_bins=4),
    "nsf_ar_random": lambda c: build_nsf_autoregressive(
        4, 2, H, c, num_bins=3, order="random", permutation="random"
    ),
}


@pytest.mark.parametrize("ctx", [0, 3])
@pytest.mark.parametrize("name", [*LAYERS, *BUILDERS])
def test_generic_checks(name, ctx):
    errs = full_check(lambda: {**LAYERS, **BUILDERS}[name](ctx))
    assert errs["roundtrip"] <= EXACT_TOL and errs["logdet"] <= EXACT_TOL


@pytest.mark.parametrize("parity", [0, 1])
def test_coupling_parity_fast_path_equals_the_index_path(parity):
    """An even-D alternating mask splits by views; forcing the general gather path (the
    one every other mask takes) must give the same outputs, log-dets and gradients."""
    fast = perturb(RQSplineCoupling(6, H, 2, 3, num_bins=4, parity=parity))
    assert fast.transform_parity == 1 - parity
    slow = copy.deepcopy(fast)
    slow.transform_parity = None
    x, c = torch.randn(7, 6, requires_grad=True), torch.randn(7, 3)
    for inverse in (False, True):
        outs = []
        for layer in (fast, slow):
            y, ld = (layer.inverse if inverse else layer)(x, c)
            grads = torch.autograd.grad((y.sin().sum() + ld.sum()), [x, *layer.parameters()])
            outs.append((y, ld, grads))
        (y1, ld1, g1), (y2, ld2, g2) = outs
        assert torch.equal(y1, y2) and torch.equal(ld1, ld2)
        pairs = zip(g1, g2, strict=True)
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in pairs)


def test_coupling_leaves_the_identity_half_untouched():
    layer = perturb(RQSplineCoupling(D, H, 2, 3))
    x, c = torch.randn(4, D), torch.randn(4, 3)
    u, _ = layer(x, c)
    keep = ~layer.transform_mask
    assert torch.equal(u[:, keep], x[:, keep])
    assert not torch.allclose(u[:, ~keep], x[:, ~keep])
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None], c[:1])[0][0], x[0])
    tr = layer.transform_mask
    assert torch.equal(jac[tr][:, tr], torch.diag(jac.diagonal()[tr]))  # elementwise spline


@pytest.mark.parametrize("features", [4, 5])
@pytest.mark.parametrize("permutation", ["reverse", "none"])
def test_coupling_builder_alternates_the_transformed_features(features, permutation):
    """Every original feature is transformed in exactly one of two consecutive layers."""
    flow = build_nsf_coupling(features, 4, H, permutation=permutation)
    where = torch.arange(features)
    moved = []
    for t in flow.transforms:
        if isinstance(t, RQSplineCoupling):
            moved.append(set(where[t.transform_mask].tolist()))
        elif isinstance(t, Permutation):
            where = where[t.perm]
    assert len(moved) == 4
    for a, b in zip(moved, moved[1:], strict=False):
        assert a.isdisjoint(b) and a | b == set(range(features))
    assert torch.equal(where, torch.arange(features))  # final order restored


def test_coupling_builder_lu_mixes_between_layers():
    flow = build_nsf_coupling(4, 3, H, permutation="lu")
    assert sum(isinstance(t, LULinear) for t in flow.transforms) == 2


@pytest.mark.parametrize("inverse", [False, True])
def test_autoregressive_jacobian_is_triangular(inverse):
    layer = perturb(
        RQSplineAutoregressive(
            D, hidden=H, num_hidden=2, context_features=3, num_bins=4, order="random", seed=9
        )
    )
    x, c = 0.8 * torch.randn(D), torch.randn(3)
    fn = layer.inverse if inverse else layer
    jac = torch.autograd.functional.jacobian(lambda v: fn(v[None], c[None])[0][0], x)
    by_rank = torch.argsort(layer.order)
    jp = jac[by_rank][:, by_rank]
    assert torch.equal(torch.triu(jp, 1), torch.zeros_like(jp))
    assert (jp.diagonal() > 0).all() and torch.tril(jp, -1).abs().sum() > 0


def test_autoregressive_pass_counts():
    layer = RQSplineAutoregressive(D, hidden=H, num_hidden=2, num_bins=4)
    x = torch.randn(3, D)
    assert count_made_passes(lambda: layer(x)) == 1
    assert count_made_passes(lambda: layer.inverse(x)) == D
    assert isinstance(layer.made, MADE) and layer.made.params_per_feature == 3 * 4 - 1


def test_builders_validate_options():
    with pytest.raises(TypeError, match="flavour"):
        build_nsf_coupling(D, 2, H, flavour=1)
    with pytest.raises(TypeError, match="order"):
        build_nsf_coupling(D, 2, H, order="random")  # couplings have no order
    with pytest.raises(ValueError, match="permutation"):
        build_nsf_coupling(D, 2, H, permutation="shuffle")
    with pytest.raises(ValueError, match="permutation"):
        build_nsf_autoregressive(D, 2, H, permutation="lu")
    with pytest.raises(ValueError, match="num_bins"):
        build_nsf_autoregressive(D, 2, H, num_bins=0)
    with pytest.raises(ValueError, match="tail_bound"):
        build_nsf_coupling(D, 2, H, tail_bound=-1.0)
    with pytest.raises(ValueError, match="features"):
        build_nsf_coupling(1, 2, H)


_FLOWS: dict[str, object] = {}


def _flow(name):
    if name not in _FLOWS:
        _FLOWS[name] = perturb({**LAYERS, **BUILDERS}[name](3)).eval()
    return _FLOWS[name]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["coupling_even", "autoregressive", "nsf_coupling", "nsf_ar"]),
    magnitude=st.floats(1.0, 1e4),
    seed=st.integers(0, 2**16),
)
def test_extreme_inputs_stay_finite(name, magnitude, seed):
    flow = _flow(name)
    g = torch.Generator().manual_seed(seed)
    x = magnitude * torch.randn(3, flow.event_shape[0], generator=g)
    c = magnitude * torch.randn(3, 3, generator=g)
    check_finite(flow, x, c, Directions())


def test_knots_keep_the_minimum_bin_size_for_bf16_parameters():
    """Under bf16 autocast the conditioner's output is bf16; the knot constants must stay in
    float32, or neighbouring offsets (2 B m j - B) round together and a bin whose softmax
    weight is ~0 collapses to width 0 (s_k = 0, log-det -inf)."""
    raw = torch.zeros(2, 2, 8)
    raw[:, :, 0] = -30.0  # bin 0 gets only its minimum size
    knots = _knot_table(raw.to(torch.bfloat16), B, (1e-3, 1e-3))
    assert knots.dtype == torch.float32
    assert (knots.diff(dim=-1) >= 2 * B * 1e-3 * (1 - 1e-4)).all()
    y, ld = _spline_from_params(
        torch.full((2,), -B + 1e-3), torch.zeros(2, 23).to(torch.bfloat16), 8, B, False
    )
    assert ld.isfinite().all()
