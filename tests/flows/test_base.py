"""Tests of the contract pieces: wrappers, permutations, LU linear, fixed affine."""

import math

import pytest
import torch

from tests.flows.harness import EXACT_TOL, check_roundtrip, full_check, make_inputs, perturb
from vaeflow.flows.base import (
    Composite,
    FixedAffine,
    Inverse,
    LULinear,
    RandomPermutation,
    ReversePermutation,
    ShapeError,
    merge_by_parity,
    parity_of,
    split_by_parity,
)


def test_known_answer_scaling_by_two_pins_the_sign():
    """forward(x) = 2x in D dims has log|det du/dx| = D log 2; inverse gives -D log 2."""
    d = 5
    t = FixedAffine(d, scale=2.0)
    x = torch.randn(4, d)
    u, ld = t(x)
    assert torch.equal(u, 2 * x)
    assert torch.allclose(ld, torch.full((4,), d * math.log(2.0)), atol=0, rtol=1e-15)
    x2, ld_inv = Inverse(t)(u)
    assert torch.allclose(x2, x) and torch.allclose(ld_inv, -ld)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ReversePermutation(6),
        lambda: RandomPermutation(6, seed=3),
        lambda: LULinear(6),
        lambda: LULinear(3, event_shape=(3, 4, 4), dim=-3),
        lambda: Composite([LULinear(6), ReversePermutation(6), Inverse(LULinear(6))]),
    ],
    ids=["reverse", "random", "lu", "lu_1x1conv", "composite"],
)
def test_generic_checks(make):
    # Permutations have no parameters to start from identity, so only LU is checked there.
    flow = make()
    identity = not isinstance(flow, (ReversePermutation, RandomPermutation, Composite))
    errs = full_check(make, identity_at_init=identity)
    assert errs["roundtrip"] <= EXACT_TOL


def test_lu_linear_random_permutation_pivot_is_consistent():
    t = perturb(LULinear(5))
    t.perm.copy_(torch.randperm(5))
    x, _ = make_inputs(t)
    check_roundtrip(t, x, None)
    w = t.weight()
    assert torch.allclose(t(x)[1], torch.linalg.slogdet(w)[1].expand(2, 3), atol=1e-12)


def test_composite_sums_logdets_and_routes_context():
    a, b = FixedAffine(3, 2.0), FixedAffine(3, 3.0)
    u, ld = Composite([a, b])(torch.ones(2, 3))
    assert torch.allclose(u, torch.full((2, 3), 6.0))
    assert torch.allclose(ld, torch.full((2,), 3 * math.log(6.0)))


def test_composite_rejects_mismatched_shapes():
    with pytest.raises(ShapeError, match="outputs"):
        Composite([FixedAffine(3, 2.0), FixedAffine(4, 2.0)])


def test_unconditional_layer_rejects_context():
    with pytest.raises(ShapeError, match="without context"):
        FixedAffine(3, 2.0)(torch.zeros(2, 3), torch.zeros(2, 1))


def test_wrong_event_shape_is_a_clear_error():
    with pytest.raises(ShapeError, match=r"expected input of shape \(\*, 3\)"):
        LULinear(3)(torch.zeros(2, 4))


def test_parity_split_and_merge():
    assert parity_of(torch.tensor([True, False, True, False])) == 0
    assert parity_of(torch.tensor([False, True, False, True])) == 1
    assert parity_of(torch.tensor([True, False, True])) is None  # odd D
    assert parity_of(torch.tensor([True, True, False, False])) is None
    x = torch.arange(12.0).reshape(2, 6)
    for q in (0, 1):
        a, b = split_by_parity(x, q)
        assert torch.equal(a, x[:, q::2]) and torch.equal(b, x[:, 1 - q :: 2])
        assert torch.equal(merge_by_parity(a, b, q), x)


def test_zero_logdet_layers_apply_map_matches_their_directions():
    x = torch.randn(3, 2, 7)
    for layer in (ReversePermutation(7), RandomPermutation(7, seed=3)):
        for t in (layer, Inverse(layer)):
            assert t.zero_logdet
            assert torch.equal(t.apply_map(x), t(x)[0])
            assert torch.equal(t.apply_map(x, inverse=True), t.inverse(x)[0])
    # A composite of permutations only still returns a zero log-det of the leading shape.
    both = Composite([ReversePermutation(7), RandomPermutation(7, seed=1)])
    u, ld = both(x)
    assert ld.shape == (3, 2) and torch.equal(ld, torch.zeros(3, 2))
    assert torch.equal(both.inverse(u)[0], x)
