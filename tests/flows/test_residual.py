"""Invertible residual flows: spectral norm, fixed-point inverse, exact and unbiased log-det."""

import functools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.flows.harness import (
    EXACT_TOL,
    check_finite,
    check_roundtrip,
    directions,
    full_check,
    make_inputs,
    perturb,
)
from vaeflow.flows.residual import (
    FixedPointWarning,
    InvertibleResidual,
    SpectralNormLinear,
    build_residual,
)

# The inverse is a fixed-point iteration stopped at tol=1e-10 (float64 default), so its
# round trip is only good to ~tol * L / (1 - L): we allow 1e-8. The forward log-det is
# exact (full Jacobian + slogdet) and the inverse log-det is its negation at the solved
# point, with the implicit gradient solved to the same tol: both keep EXACT_TOL.
FIXED_POINT_TOL = 1e-8


@pytest.mark.parametrize("context_features", [0, 3], ids=["uncond", "context"])
@pytest.mark.parametrize("kind", ["block", "builder", "builder_reverse", "elu", "tanh"])
def test_generic_checks(kind, context_features):
    c = context_features
    makers = {
        "block": lambda: InvertibleResidual(4, 8, c, num_hidden=1),
        "builder": lambda: build_residual(5, 2, 8, c),
        "builder_reverse": lambda: build_residual(5, 2, 8, c, permute="reverse"),
        "elu": lambda: build_residual(4, 1, 8, c, activation="elu", num_hidden=2),
        "tanh": lambda: build_residual(4, 1, 8, c, activation="tanh", coeff=0.9),
    }
    errs = full_check(
        makers[kind],
        roundtrip_atol=FIXED_POINT_TOL,
        logdet_atol=EXACT_TOL,
        # A feature reversal between blocks is a permutation even at init.
        identity_at_init=kind != "builder_reverse",
    )
    assert errs["logdet"] <= EXACT_TOL


def _linear_region_block(eigs, coeff=0.97, context_features=0):
    """A block that is affine near the origin, with a known Jacobian.

    ELU is the identity for positive inputs, so a large first bias keeps every
    pre-activation positive for |x| <~ 10: g(x) = W2 (W1 x + b1) + b2, J_g = W2 W1.
    W1 is symmetric with eigenvalues ``eigs`` (spectral norm < coeff: left unscaled) and
    W2 = I (spectral norm 1 > coeff: scaled to coeff I). So J_g = coeff * W1 exactly.
    """
    d = len(eigs)
    block = InvertibleResidual(d, d, context_features, num_hidden=1, activation="elu", coeff=coeff)
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    w1 = q @ torch.diag(torch.tensor(eigs)) @ q.T
    with torch.no_grad():
        block.linears[0].weight.copy_(w1)
        block.linears[0].bias.fill_(50.0)
        block.linears[1].weight.copy_(torch.eye(d))
        block.linears[1].bias.fill_(-50.0 * coeff)
    block.eval()
    return block, coeff * w1


def test_known_answer_affine_block():
    block, jac = _linear_region_block([0.6, 0.3, -0.2, -0.5])
    d = jac.shape[0]
    x = torch.randn(3, 2, d)
    u, ld = block(x)
    # g(x) = coeff W1 x (the biases cancel), so u = (I + coeff W1) x.
    expected_u = x @ (torch.eye(d) + jac).T
    assert torch.allclose(u, expected_u, atol=1e-12, rtol=0)
    expected_ld = torch.logdet(torch.eye(d) + jac)
    assert torch.allclose(ld, expected_ld.expand(3, 2), atol=1e-13, rtol=0)
    # The scaled weight is exactly coeff * I: the spectral norm hit the cap.
    w2 = block.linears[1].weight_normalized()
    assert torch.allclose(w2, 0.97 * torch.eye(d), atol=1e-12, rtol=0)
    x2, ld_inv = block.inverse(u)
    assert torch.allclose(x2, x, atol=FIXED_POINT_TOL) and torch.allclose(ld_inv, -ld)


def test_spectral_norm_caps_lipschitz_after_heavy_perturbation():
    coeff = 0.9
    block = perturb(InvertibleResidual(5, 16, 3, num_hidden=2, coeff=coeff), scale=10.0)
    block.eval()
    for lin in block.linears:
        raw = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
        eff = torch.linalg.matrix_norm(lin.weight_normalized().detach(), ord=2)
        assert raw > 5 * coeff  # the perturbation really broke the bound ...
        # ... and the normalisation restores it, tightly (the buffers were stale after
        # perturbing; eval-mode refinement converges them).
        assert abs(eff.item() - coeff) < 1e-9
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for _ in range(10):
        x = 3 * torch.randn(5, generator=g)
        c = torch.randn(3, generator=g)
        jac = torch.autograd.functional.jacobian(lambda v, c=c: block.residual(v, c), x)
        worst = max(worst, torch.linalg.matrix_norm(jac, ord=2).item())
    assert 0 < worst <= coeff


def test_training_updates_converge_power_iteration():
    lin = SpectralNormLinear(6, 4, coeff=0.5, n_power_iterations=3)
    with torch.no_grad():
        lin.weight.mul_(10).add_(torch.randn(4, 6))  # stale buffers now
    for _ in range(30):
        lin.weight_normalized(update=True)  # what a training-mode forward pass does
    u_svd, s, vh = torch.linalg.svd(lin.weight.detach())
    assert abs(torch.dot(lin.sn_u, u_svd[:, 0]).abs().item() - 1) < 1e-10
    assert abs(torch.dot(lin.sn_v, vh[0]).abs().item() - 1) < 1e-10
    eff = lin.weight_normalized(update=False, refine=False)
    assert abs(torch.linalg.matrix_norm(eff.detach(), ord=2).item() - 0.5) < 1e-10


def test_training_mode_round_trip_once_power_iteration_tracks_the_weights():
    flow = perturb(build_residual(5, 2, 8, 3)).train()
    x, ctx = make_inputs(flow)
    for _ in range(3):  # a few training steps: the buffers catch up with the perturbation
        flow(x, ctx)
    assert check_roundtrip(flow, x, ctx, atol=FIXED_POINT_TOL) <= FIXED_POINT_TOL


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def test_power_iteration_buffers_only_change_in_training_forward():
    flow = build_residual(4, 2, 8, 3, logdet="estimate")
    perturb(flow, scale=2.0)
    x, ctx = make_inputs(flow)
    before = _buffers(flow)
    flow.eval()
    flow(x, ctx)
    flow.inverse(x, ctx)
    flow.train()
    flow.inverse(x, ctx)  # training-mode inverse: still no update
    after = _buffers(flow)
    assert all(torch.equal(before[k], after[k]) for k in before)
    flow(x, ctx)  # training-mode forward: updates
    changed = _buffers(flow)
    assert any(not torch.equal(before[k], changed[k]) for k in before)


@pytest.mark.parametrize("logdet", ["exact", "estimate"])
def test_eval_mode_is_deterministic(logdet):
    flow = perturb(build_residual(4, 2, 8, 3, logdet=logdet))
    x, ctx = make_inputs(flow)
    flow.eval()
    u1, ld1 = flow(x, ctx)
    u2, ld2 = flow(x, ctx)
    assert torch.equal(u1, u2) and torch.equal(ld1, ld2)
    x1, ldi1 = flow.inverse(u1, ctx)
    x2, ldi2 = flow.inverse(u1, ctx)
    assert torch.equal(x1, x2) and torch.equal(ldi1, ldi2)
    if logdet == "estimate":
        # Training mode draws fresh noise: the estimate varies between calls.
        flow.train()
        assert not torch.equal(flow(x, ctx)[1], flow(x, ctx)[1])


def test_estimator_is_unbiased_and_differentiable():
    block, jac = _linear_region_block([0.6, 0.3, -0.2, -0.5])
    d = jac.shape[0]
    exact = torch.logdet(torch.eye(d) + jac)
    n = 2000
    x = 0.5 * torch.randn(d).expand(n, d)
    gen = torch.Generator().manual_seed(11)
    est = block.logabsdet(x, method="estimate", generator=gen)
    mean, se = est.mean(), est.std() / math.sqrt(n)
    assert se > 0  # it really is random
    assert abs(mean - exact).item() < 4 * se.item(), (mean.item(), exact.item(), se.item())
    # Gradients flow through the power series (create_graph), and their mean matches
    # the exact gradient (the estimator is unbiased for the gradient too).
    w1 = block.linears[0].weight
    (grad_est,) = torch.autograd.grad(est.mean(), w1)
    (grad_ex,) = torch.autograd.grad(block.logabsdet(x[:1], method="exact").sum(), w1)
    assert grad_est.isfinite().all() and grad_est.abs().sum() > 0
    rel = (grad_est - grad_ex).norm() / grad_ex.norm()
    assert rel < 0.1, rel


def test_estimator_on_generic_block_matches_exact():
    block = perturb(InvertibleResidual(5, 16, 3, num_hidden=2), scale=1.0).eval()
    x, c = torch.randn(5), torch.randn(3)
    n = 2000
    est = block.logabsdet(
        x.expand(n, 5), c, method="estimate", generator=torch.Generator().manual_seed(3)
    )
    exact = block.logabsdet(x, c, method="exact")
    se = est.std() / math.sqrt(n)
    assert abs(est.mean() - exact).item() < 4 * se.item()


def test_auto_logdet_picks_by_dimension():
    assert InvertibleResidual(4, 8).logdet_method == "exact"
    assert InvertibleResidual(17, 8).logdet_method == "estimate"
    assert InvertibleResidual(4, 8, exact_max_dim=3).logdet_method == "estimate"


def test_inverse_gradient_matches_finite_differences():
    """The implicit-function gradient of the fixed point w.r.t. parameters and context."""
    flow = perturb(InvertibleResidual(4, 8, 3, num_hidden=1), scale=1.0).eval()
    u, ctx = make_inputs(flow, lead=(3,))
    ctx = ctx.clone().requires_grad_(True)
    w = flow.linears[0].weight
    direction = torch.randn_like(w)

    def loss(c=ctx):
        x, ld = flow.inverse(u, c)
        return (x * torch.arange(1.0, 5.0)).sum() + ld.sum()

    gw, gc = torch.autograd.grad(loss(), (w, ctx))
    eps = 1e-6
    with torch.no_grad():
        w.add_(eps * direction)
        plus = loss()
        w.sub_(2 * eps * direction)
        minus = loss()
        w.add_(eps * direction)
        fd_w = (plus - minus) / (2 * eps)
        dc = torch.zeros_like(ctx)
        dc[1, 2] = eps
        fd_c = (loss(ctx + dc) - loss(ctx - dc)) / (2 * eps)
    assert abs((gw * direction).sum() - fd_w).item() < 1e-6
    assert abs(gc[1, 2] - fd_c).item() < 1e-6


def test_fixed_point_warns_when_not_converged():
    flow = perturb(InvertibleResidual(4, 8, max_iter=2), scale=1.0).eval()
    with pytest.warns(FixedPointWarning, match="max_iter=2"):
        flow.inverse(torch.randn(3, 4))
    # With the default budget it converges silently.
    flow = perturb(InvertibleResidual(4, 8), scale=1.0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.inverse(torch.randn(3, 4))


def test_state_dict_round_trip_gives_identical_outputs():
    a = perturb(build_residual(4, 2, 8, 3)).eval()
    b = build_residual(4, 2, 8, 3).eval()
    b.load_state_dict(a.state_dict())
    x, ctx = make_inputs(a)
    ua, lda = a(x, ctx)
    ub, ldb = b(x, ctx)
    assert torch.equal(ua, ub) and torch.equal(lda, ldb)


def test_options_are_validated():
    with pytest.raises(TypeError, match="no_such_option"):
        build_residual(4, 2, 8, no_such_option=1)
    with pytest.raises(ValueError, match="coeff"):
        build_residual(4, 2, 8, coeff=1.0)
    with pytest.raises(ValueError, match="logdet"):
        build_residual(4, 2, 8, logdet="approx")
    with pytest.raises(ValueError, match="activation"):
        build_residual(4, 2, 8, activation="relu6")
    with pytest.raises(ValueError, match="permute"):
        build_residual(4, 2, 8, permute="random")
    with pytest.raises(ValueError, match="features"):
        build_residual((1, 4, 4), 2, 8)


def test_float32_default_tolerance_round_trip():
    flow = perturb(build_residual(4, 2, 8, 3)).float().eval()
    x, ctx = make_inputs(flow)
    x, ctx = x.float(), ctx.float()
    u, ld = flow(x, ctx)
    x2, ld2 = flow.inverse(u, ctx)
    assert u.dtype == torch.float32 and ld.dtype == torch.float32
    assert (x2 - x).abs().max() < 1e-5 and (ld + ld2).abs().max() < 1e-5


@functools.cache
def _finite_flow():
    torch.manual_seed(0)
    return perturb(build_residual(4, 2, 8, 3).double(), scale=1.0).eval()


@settings(max_examples=20, deadline=None)
@given(
    magnitude=st.floats(min_value=1e-3, max_value=1e4),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_extreme_inputs_stay_finite(magnitude, seed):
    flow = _finite_flow()
    x, ctx = make_inputs(flow, lead=(3,), scale=magnitude, seed=seed)
    d = directions(flow, x, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # also: the inverse converges at this scale
        check_finite(flow, x, ctx, d)
