"""FlowDensity: exact normalisation, sampling shapes, and agreement of its two paths."""

import math

import pytest
import torch

from tests.flows.harness import gaussian_grid_integral, perturb
from vaeflow.flows import (
    Composite,
    DiagonalNormal,
    FixedAffine,
    FlowDensity,
    LULinear,
    ShapeError,
    StandardNormal,
)


def test_standard_normal_is_fully_normalised():
    base = StandardNormal(3)
    u = torch.zeros(2, 3)
    assert torch.allclose(base.log_prob(u), torch.full((2,), -1.5 * math.log(2 * math.pi)))
    x = torch.randn(4, 3)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    assert torch.allclose(base.log_prob(x), ref, atol=1e-14)


def test_diagonal_normal_matches_torch():
    base = perturb(DiagonalNormal(3))
    x = torch.randn(5, 3)
    ref = torch.distributions.Normal(base.loc, base.log_scale.exp()).log_prob(x).sum(-1)
    assert torch.allclose(base.log_prob(x), ref, atol=1e-13)


def test_known_answer_scaled_gaussian():
    """x = u / 2 with u ~ N(0, I) is N(0, I/4): the change of variables must say so."""
    d = FlowDensity(FixedAffine(2, scale=2.0))
    x = torch.randn(7, 2)
    ref = torch.distributions.Normal(0.0, 0.5).log_prob(x).sum(-1)
    assert torch.allclose(d.log_prob(x), ref, atol=1e-13)


def test_density_integrates_to_one_on_a_grid():
    flow = perturb(Composite([LULinear(2), LULinear(2)]), scale=0.2)
    density = FlowDensity(flow, DiagonalNormal(2))
    total = gaussian_grid_integral(density.log_prob, lim=10.0, n=400)
    assert abs(total - 1.0) < 1e-3, total


def test_sample_and_log_prob_agrees_with_log_prob():
    density = FlowDensity(perturb(Composite([LULinear(3), LULinear(3)])))
    x, lp = density.sample_and_log_prob(11)
    assert x.shape == (11, 3) and lp.shape == (11,)
    assert torch.allclose(lp, density.log_prob(x), atol=1e-12)


def test_sample_shapes_are_samples_first_with_context():
    from vaeflow.flows.base import Transform

    class Shift(Transform):
        """Conditional shift u = x - c (a context-dependent known answer)."""

        def __init__(self):
            super().__init__(2, context_features=2)

        def forward(self, x, context=None):
            lead, c = self.check_input(x, context)
            return x - c, x.new_zeros(lead)

        def inverse(self, u, context=None):
            lead, c = self.check_input(u, context, inverse=True)
            return u + c, u.new_zeros(lead)

    density = FlowDensity(Shift())
    ctx = torch.randn(4, 2)
    x = density.sample(5, ctx)
    assert x.shape == (5, 4, 2)
    assert torch.allclose(density.log_prob(x, ctx), StandardNormal(2).log_prob(x - ctx))
    with pytest.raises(ShapeError):
        density.log_prob(x, torch.randn(3, 2))


def test_base_shape_must_match_transform_output():
    with pytest.raises(ShapeError):
        FlowDensity(LULinear(3), StandardNormal(2))
