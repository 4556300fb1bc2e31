"""Continuous-time flows (FFJORD) and the small ODE solver behind them."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.flows.harness import check_finite, directions, full_check, make_inputs, perturb
from vaeflow.flows.continuous import (
    ContinuousFlow,
    ODEStepLimitError,
    build_ffjord,
    odeint,
    trace_exact,
    trace_hutchinson,
)

# Looser than EXACT_TOL because the map is an ODE solution computed by an adaptive
# solver: with dopri5 at rtol = atol = 1e-10 (float64) the round trip and the log-det
# (an integrated trace, compared with slogdet of the autograd Jacobian of the
# *discretised* map) are accurate to about the local error control, ~1e-10..1e-8.
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
ODE_ROUNDTRIP_TOL = 1e-8
ODE_LOGDET_TOL = 1e-7
# The builder's float64 defaults (rtol = atol = 1e-9) are about ten times looser.
DEFAULT_TOL = 1e-7


@pytest.mark.parametrize("context_features", [0, 3], ids=["uncond", "context"])
def test_generic_checks_block(context_features):
    errs = full_check(
        lambda: ContinuousFlow(3, 8, context_features, num_hidden=1, **TIGHT),
        lead=(2, 2),
        roundtrip_atol=ODE_ROUNDTRIP_TOL,
        logdet_atol=ODE_LOGDET_TOL,
    )
    assert errs["logdet"] <= ODE_LOGDET_TOL


@pytest.mark.parametrize("context_features", [0, 3], ids=["uncond", "context"])
def test_generic_checks_builder(context_features):
    errs = full_check(
        lambda: build_ffjord(2, 2, 8, context_features, activation="softplus"),
        lead=(2, 2),
        roundtrip_atol=DEFAULT_TOL,
        logdet_atol=DEFAULT_TOL,
    )
    assert errs["roundtrip"] <= DEFAULT_TOL


def test_generic_checks_rk4():
    # rk4 with fixed steps: the round trip is limited by the O(h^4) global error.
    errs = full_check(
        lambda: ContinuousFlow(2, 8, 3, num_hidden=1, solver="rk4", num_steps=40),
        lead=(2, 2),
        roundtrip_atol=1e-7,
        logdet_atol=1e-7,
    )
    assert errs["roundtrip"] <= 1e-7


def _linear_flow(a: torch.Tensor, T: float, **kw) -> ContinuousFlow:
    """``f(z, t) = A z`` exactly: a single linear layer with the time column zeroed."""
    d = a.shape[0]
    flow = ContinuousFlow(d, 8, num_hidden=0, T=T, **kw)
    lin = flow.net.net[0]
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, :d] = a
        lin.bias.zero_()
    return flow.eval()


def test_known_answer_linear_dynamics():
    """dz/dt = A z: u = expm(A T) x and log|det du/dx| = T tr(A)."""
    g = torch.Generator().manual_seed(4)
    a = 0.7 * torch.randn(3, 3, generator=g)
    T = 1.5
    flow = _linear_flow(a, T, **TIGHT)
    x = torch.randn(4, 2, 3, generator=g)
    u, ld = flow(x)
    expected = x @ torch.linalg.matrix_exp(a * T).T
    assert (u - expected).abs().max() < 1e-8
    assert (ld - T * torch.trace(a)).abs().max() < 1e-8
    x2, ld_inv = flow.inverse(u)
    assert (x2 - x).abs().max() < 1e-8
    assert (ld_inv + T * torch.trace(a)).abs().max() < 1e-8


def test_known_answer_scalar_ode_both_directions():
    decay = lambda t, y: (-y[0], y[0])  # noqa: E731  y' = -y, and its integral
    for method, kw in (("dopri5", TIGHT), ("rk4", {"num_steps": 200})):
        y, area = odeint(decay, (torch.ones(2), torch.zeros(2)), 0.0, 2.0, method=method, **kw)
        assert torch.allclose(y, torch.full((2,), math.exp(-2.0)), atol=1e-9, rtol=0)
        assert torch.allclose(area, torch.full((2,), 1 - math.exp(-2.0)), atol=1e-9, rtol=0)
        back, _ = odeint(decay, (y, area), 2.0, 0.0, method=method, **kw)
        assert torch.allclose(back, torch.ones(2), atol=1e-9, rtol=0)


def test_rk4_converges_to_dopri5_at_fourth_order():
    flow = perturb(ContinuousFlow(2, 8, 3, **TIGHT), scale=0.5).eval()
    x, ctx = make_inputs(flow, lead=(3,))
    ref_u, ref_ld = flow(x, ctx)
    errors = []
    for n in (5, 10, 200):
        flow.solver, flow.num_steps = "rk4", n
        u, ld = flow(x, ctx)
        errors.append(max((u - ref_u).abs().max().item(), (ld - ref_ld).abs().max().item()))
    assert errors[2] < 1e-9
    assert 8 < errors[0] / errors[1] < 32, errors  # halving h divides the error by ~2^4


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_trace_is_unbiased(noise):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    n = 4000
    z = torch.randn(3).expand(n, 3).clone().requires_grad_(True)
    f = net(z)
    exact = trace_exact(f, z)
    assert torch.allclose(exact, exact[0].expand(n))
    jac = torch.autograd.functional.jacobian(net, z[0].detach())
    assert torch.allclose(exact[0], torch.trace(jac), atol=1e-13)
    v = torch.randn(n, 3) if noise == "gaussian" else torch.randint(0, 2, (n, 3)) * 2.0 - 1
    est = trace_hutchinson(f, z, v)
    se = est.std() / math.sqrt(n)
    assert se > 0 and abs(est.mean() - exact[0]).item() < 4 * se.item()


def test_hutchinson_flow_logdet_is_unbiased():
    flow = perturb(ContinuousFlow(2, 8, num_hidden=1, trace="hutchinson"), scale=0.7)
    exact = ContinuousFlow(2, 8, num_hidden=1, trace="exact")
    exact.load_state_dict(flow.state_dict())
    x = torch.randn(2)
    n = 500
    flow.train()  # fresh probe per sample and per call
    with torch.no_grad():
        _, est = flow(x.expand(n, 2))
        _, ref = exact.eval()(x)
    se = est.std() / math.sqrt(n)
    assert se > 0 and abs(est.mean() - ref).item() < 4 * se.item()


def test_eval_mode_is_deterministic():
    flow = perturb(ContinuousFlow(2, 8, 3, trace="hutchinson"), scale=0.7)
    x, ctx = make_inputs(flow, lead=(3,))
    flow.eval()
    assert torch.equal(flow(x, ctx)[1], flow(x, ctx)[1])
    flow.train()
    assert not torch.equal(flow(x, ctx)[1], flow(x, ctx)[1])


def test_gradient_through_solver_matches_finite_differences():
    """Backprop through the rk4 steps, including the trace (create_graph), is exact."""
    flow = perturb(ContinuousFlow(2, 8, 3, num_hidden=1, solver="rk4", num_steps=8))
    flow.eval()
    x, ctx = make_inputs(flow, lead=(3,))
    w = flow.net.net[0].weight
    direction = torch.randn_like(w)

    def loss():
        u, ld = flow(x, ctx)
        return (u * torch.tensor([1.0, -2.0])).sum() + ld.sum()

    (grad,) = torch.autograd.grad(loss(), w)
    eps = 1e-6
    with torch.no_grad():
        w.add_(eps * direction)
        plus = loss()
        w.sub_(2 * eps * direction)
        minus = loss()
        w.add_(eps * direction)
    assert abs((grad * direction).sum() - (plus - minus) / (2 * eps)).item() < 1e-7


def test_max_steps_raises_a_clear_error():
    flow = perturb(ContinuousFlow(2, 8, rtol=1e-12, atol=1e-12, max_steps=3), scale=1.0)
    with pytest.raises(ODEStepLimitError, match="max_steps=3"):
        flow(torch.randn(2, 2))
    assert issubclass(ODEStepLimitError, RuntimeError)


def test_auto_trace_and_dtype_tolerances():
    assert ContinuousFlow(4, 8).trace == "exact"
    assert ContinuousFlow(17, 8).trace == "hutchinson"
    flow = ContinuousFlow(2, 8)
    assert flow._tolerances(torch.float64) == (1e-9, 1e-9)
    assert flow._tolerances(torch.float32) == (1e-5, 1e-5)
    flow32 = perturb(ContinuousFlow(2, 8)).float().eval()
    x = torch.randn(5, 2, dtype=torch.float32)
    u, ld = flow32(x)
    x2, ld2 = flow32.inverse(u)
    assert u.dtype == torch.float32 and (x2 - x).abs().max() < 1e-4
    assert (ld + ld2).abs().max() < 1e-4


def test_options_are_validated():
    with pytest.raises(TypeError, match="no_such_option"):
        build_ffjord(2, 1, 8, no_such_option=1)
    with pytest.raises(ValueError, match="solver"):
        build_ffjord(2, 1, 8, solver="euler")
    with pytest.raises(ValueError, match="trace"):
        build_ffjord(2, 1, 8, trace="skilling")
    with pytest.raises(ValueError, match="smooth"):
        build_ffjord(2, 1, 8, activation="relu")
    with pytest.raises(ValueError, match="T must"):
        build_ffjord(2, 1, 8, T=0.0)
    with pytest.raises(ValueError, match="method"):
        odeint(lambda t, y: y, (torch.ones(1),), 0.0, 1.0, method="euler")


@settings(max_examples=15, deadline=None)
@given(
    magnitude=st.floats(min_value=1e-3, max_value=1e3),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_extreme_inputs_stay_finite(magnitude, seed):
    torch.manual_seed(0)
    flow = perturb(ContinuousFlow(2, 8, 3).double(), scale=0.5).eval()
    x, ctx = make_inputs(flow, lead=(3,), scale=magnitude, seed=seed)
    x, ctx = x.double(), ctx.double()
    check_finite(flow, x, ctx, directions(flow, x, ctx))
