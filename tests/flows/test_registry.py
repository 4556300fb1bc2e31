"""Every registered flow family passes the generic checks, through ``build_flow``.

Family-specific maths (masks, triangular Jacobians, spline knots, constraints, solver
accuracy) is tested in each family's own file; this file guarantees that nothing in
``FLOWS`` escapes the contract: round trip, log-det against the brute-force Jacobian,
identity at init, gradients, no batch mixing, clear shape errors, normalised density.
"""

import pytest
import torch

from tests.flows.harness import EXACT_TOL, full_check, gaussian_grid_integral, perturb
from vaeflow.flows import FlowDensity
from vaeflow.flows.registry import FLOWS, build_flow, flow_names

IMAGE_SHAPE = (2, 4, 4)
VECTOR_D = 4

# Stated looser tolerances, only where the inverse or the log-det is iterative:
# (round trip, log-det vs brute-force Jacobian).
ITERATIVE_TOL = {
    "residual": (1e-8, EXACT_TOL),  # fixed-point inverse; the forward log-det is exact
    "ffjord": (1e-6, 1e-6),  # adaptive ODE solve (dopri5) at tight float64 tolerances
}
# Not the identity at init, on purpose (see each family's docstring):
NOT_IDENTITY = {
    "gated_iaf": "starts as the scaling x -> sigmoid(forget_bias) x (Kingma et al. 2016)",
    "realnvp_image": "squeeze + multi-scale flattening permute pixels even at init",
    "glow": "squeeze + multi-scale flattening permute pixels even at init",
}


# Conv conditioners amplify a 0.3-std perturbation of every weight ~40x per layer, which
# makes deep image stacks ill-conditioned (outputs ~1e4) rather than testing their maths;
# 0.1 still moves every layer far from the identity.
PERTURB = {"image": 0.1, "vector": 0.3}


def _make(name, context_features):
    feats = IMAGE_SHAPE if FLOWS[name].data == "image" else VECTOR_D
    return lambda: build_flow(
        name, feats, num_layers=2, hidden=8, context_features=context_features
    )


@pytest.mark.parametrize("context_features", [0, 3], ids=["uncond", "context"])
@pytest.mark.parametrize("name", flow_names())
def test_registered_flow_passes_generic_checks(name, context_features):
    rt_tol, ld_tol = ITERATIVE_TOL.get(name, (EXACT_TOL, EXACT_TOL))
    assert FLOWS[name].exact == (name not in ITERATIVE_TOL)
    errs = full_check(
        _make(name, context_features),
        perturb_scale=PERTURB[FLOWS[name].data],
        roundtrip_atol=rt_tol,
        logdet_atol=ld_tol,
        identity_at_init=name not in NOT_IDENTITY,
    )
    assert errs["logdet"] <= ld_tol


@pytest.mark.parametrize("name", [n for n in flow_names("vector") if FLOWS[n].density])
def test_flow_density_integrates_to_one(name):
    flow = perturb(build_flow(name, 2, num_layers=2, hidden=8), scale=0.1)
    flow.eval()
    total = gaussian_grid_integral(FlowDensity(flow).log_prob, lim=9.0, n=240)
    assert abs(total - 1.0) < 1e-2, f"{name}: density integrates to {total}"


@pytest.mark.parametrize("name", flow_names())
def test_direction_flags_match_behaviour(name):
    spec = FLOWS[name]
    flow = _make(name, 0)()
    x = torch.randn(3, *flow.event_shape)
    u = torch.randn(3, *flow.out_event_shape)
    for exists, call in (
        (spec.density, lambda: flow(x)),
        (spec.sampling, lambda: flow.inverse(u)),
    ):
        if exists:
            call()
        else:
            with pytest.raises(NotImplementedError):
                call()


def test_build_flow_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown flow 'realnpv'.*realnvp"):
        build_flow("realnpv", 4)
    with pytest.raises(ValueError, match="for images"):
        build_flow("glow", 4)
    with pytest.raises(ValueError, match="for vectors"):
        build_flow("maf", (1, 4, 4))
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        build_flow("realnvp", 4, no_such_option=1)


@pytest.mark.parametrize("name", flow_names())
def test_state_dict_round_trip_and_dtype_moves(name):
    """A reloaded flow computes the same thing; ``.to(dtype)`` reaches every sub-module."""
    flow = perturb(_make(name, 3)(), scale=PERTURB[FLOWS[name].data]).eval()
    clone = _make(name, 3)().eval()
    clone.load_state_dict(flow.state_dict())
    x = torch.randn(2, *flow.event_shape)
    ctx = torch.randn(2, 3)
    fn, arg = (
        (flow, x) if FLOWS[name].density else (flow.inverse, torch.randn(2, *flow.out_event_shape))
    )
    fn2 = clone if FLOWS[name].density else clone.inverse
    a, b = fn(arg, ctx), fn2(arg, ctx)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    flow32 = flow.to(torch.float32)
    y, ld = (flow32 if FLOWS[name].density else flow32.inverse)(arg.float(), ctx.float())
    assert y.dtype == torch.float32 and ld.dtype == torch.float32
    assert torch.allclose(y.double(), a[0], atol=1e-3, rtol=1e-3)


# Families whose log-det is a sum of per-position terms (elementwise-scaling layers and
# permutations); every other family must say it does not split.
SPLITS_LOGDET = {"maf", "iaf", "gated_iaf", "conv_iaf"}


@pytest.mark.parametrize("context_features", [0, 3], ids=["uncond", "context"])
@pytest.mark.parametrize("name", flow_names())
def test_per_dimension_logdets_sum_to_the_logdet(name, context_features):
    """forward_dims / inverse_dims give the same outputs as forward / inverse and
    per-position log-dets ``(*, *event_shape)`` summing to theirs (float64, perturbed weights,
    permutations between layers); flows that do not split refuse clearly."""
    flow = perturb(_make(name, context_features)(), scale=PERTURB[FLOWS[name].data]).double()
    assert flow.splits_logdet == (name in SPLITS_LOGDET)
    spec = FLOWS[name]
    x = torch.randn(2, 3, *flow.event_shape, dtype=torch.float64)
    c = torch.randn(3, context_features, dtype=torch.float64) if context_features else None
    for exists, whole, dims in (
        (spec.density, flow.forward, flow.forward_dims),
        (spec.sampling, flow.inverse, flow.inverse_dims),
    ):
        if not exists:
            continue
        if not flow.splits_logdet:
            with pytest.raises(NotImplementedError, match="does not split its log-det"):
                dims(x, c)
            continue
        y, ld = whole(x, c)
        y2, ld_dims = dims(x, c)
        assert ld_dims.shape == x.shape
        torch.testing.assert_close(y2, y, rtol=0, atol=EXACT_TOL)
        ld_sum = ld_dims.flatten(x.dim() - flow.event_ndim).sum(-1)
        torch.testing.assert_close(ld_sum, ld, rtol=0, atol=EXACT_TOL)


def test_split_logdets_only_when_the_permutations_cancel():
    """A per-position log-det is attributed to the position its feature ends at; a
    posterior adds log q0(eps_j) at position j, which is right only if the flow's
    permutations put every feature back (the registry's stacks do). A stack that leaves
    features permuted must not offer the split."""
    from vaeflow.flows.base import Composite, Permutation

    iaf = build_flow("iaf", 3, num_layers=2, hidden=8)
    assert iaf.splits_logdet
    moved = Composite([iaf, Permutation(torch.tensor([2, 0, 1]))])
    assert not moved.splits_logdet
    perm = torch.tensor([2, 0, 1])
    undone = Composite([iaf, Permutation(perm), Permutation(torch.argsort(perm))])
    assert undone.splits_logdet
