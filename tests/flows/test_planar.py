"""Planar, radial and Sylvester flows: sampling direction only, exact log-dets, constraints.

Generic checks (harness.full_check) cover every layer and builder with and without
context; the tests below pin the maths that the generic checks cannot see: the
invertibility constraints for arbitrary raw parameters, exact orthonormality of ``Q``,
hand-computed values, the NotImplementedError of ``forward``, and use inside a
FlowDensity.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.flows.harness import Directions, check_finite, full_check, perturb
from vaeflow.flows.density import FlowDensity
from vaeflow.flows.planar import (
    Planar,
    Radial,
    SylvesterHouseholder,
    SylvesterOrthogonal,
    SylvesterTriangular,
    build_planar,
    build_radial,
    build_sylvester_householder,
    build_sylvester_orthogonal,
    build_sylvester_triangular,
    orthonormalize,
    shifted_softplus,
)

D = 5
C = 3

LAYERS = {
    "planar": lambda c: Planar(D, c),
    "radial": lambda c: Radial(D, c),
    "sylvester_orthogonal": lambda c: SylvesterOrthogonal(D, 3, c),
    "sylvester_orthogonal_m1": lambda c: SylvesterOrthogonal(D, 1, c),
    "sylvester_orthogonal_polar": lambda c: SylvesterOrthogonal(
        D, 3, c, orthogonalization="polar"
    ),
    "sylvester_householder": lambda c: SylvesterHouseholder(D, 3, c),
    "sylvester_triangular": lambda c: SylvesterTriangular(D, reverse=False, context_features=c),
    "sylvester_triangular_rev": lambda c: SylvesterTriangular(D, reverse=True, context_features=c),
}
BUILDERS = {
    "build_planar": lambda c: build_planar(4, 3, 8, c),
    "build_radial": lambda c: build_radial(4, 3, 8, c),
    "build_sylvester_orthogonal": lambda c: build_sylvester_orthogonal(
        4, 2, 8, c, num_ortho_vectors=2
    ),
    "build_sylvester_householder": lambda c: build_sylvester_householder(
        4, 2, 8, c, num_householder=3
    ),
    "build_sylvester_triangular": lambda c: build_sylvester_triangular(4, 3, 8, c),
}
ALL = {**LAYERS, **BUILDERS}
# amortization = "linear": every parameter is Linear(C -> .)(context), no free parameters
# (van den Berg et al.'s code); it needs a context, so these take c >= 1 only.
LINEAR_LAYERS = {
    "planar_linear": lambda c: Planar(D, c, "linear"),
    "radial_linear": lambda c: Radial(D, c, "linear"),
    "sylvester_orthogonal_linear": lambda c: SylvesterOrthogonal(D, 3, c, "linear"),
    "sylvester_orthogonal_polar_linear": lambda c: SylvesterOrthogonal(D, 3, c, "linear", "polar"),
    "sylvester_householder_linear": lambda c: SylvesterHouseholder(D, 3, c, "linear"),
    "sylvester_triangular_linear": lambda c: SylvesterTriangular(D, True, c, "linear"),
}
LINEAR_BUILDERS = {
    "build_planar_linear": lambda c: build_planar(4, 3, 8, c, amortization="linear"),
    "build_radial_linear": lambda c: build_radial(4, 3, 8, c, amortization="linear"),
    "build_sylvester_orthogonal_linear": lambda c: build_sylvester_orthogonal(
        4, 2, 8, c, num_ortho_vectors=2, amortization="linear"
    ),
    "build_sylvester_householder_linear": lambda c: build_sylvester_householder(
        4, 2, 8, c, num_householder=3, amortization="linear"
    ),
    "build_sylvester_triangular_linear": lambda c: build_sylvester_triangular(
        4, 3, 8, c, amortization="linear"
    ),
}
LINEAR = {**LINEAR_LAYERS, **LINEAR_BUILDERS}
SAMPLING_ONLY = Directions(forward=False, inverse=True)


def _features(flow):
    return flow.event_shape[0]


def _per_sample_jacobian(flow, u, ctx):
    """``(B, D, D)`` Jacobians of ``inverse`` at each row of ``u (B, D)``.

    Samples do not mix (checked by full_check), so the Jacobian of the sum over the batch
    holds every per-sample Jacobian: D backward passes instead of B * D.
    """
    jac = torch.autograd.functional.jacobian(lambda v: flow.inverse(v, ctx)[0].sum(0), u)
    return jac.permute(1, 0, 2)  # (D_out, B, D_in) -> (B, D_out, D_in)


def _randomise(flow, scale, seed):
    """Overwrite every parameter with N(0, scale^2) noise: far from any initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return flow


# -- generic checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, context",
    [
        *(
            pytest.param(n, c, id=f"{n}-{i}")
            for n in ALL
            for c, i in [(0, "uncond"), (C, "context")]
        ),
        *(pytest.param(n, C, id=f"{n}-context") for n in LINEAR),
    ],
)
def test_generic_checks(name, context):
    """Brute-force Jacobian log-dets (float64), per-sample independence, a gradient for
    every parameter (the linear heads' weights and biases too), shape errors. Linear
    amortisation is not the identity at init (test_linear_amortization_is_not_the_identity)."""
    errs = full_check(lambda: {**ALL, **LINEAR}[name](context), identity_at_init=name in ALL)
    assert "roundtrip" not in errs  # no forward: nothing to round-trip
    assert errs["logdet"] <= 1e-12


@pytest.mark.parametrize("name", [*ALL, *LINEAR])
def test_per_example_context_broadcasts_over_samples(name, float64):
    """``inverse(u (K, B, D), context (B, C))`` -- k importance samples of B examples --
    equals the same call with the context expanded to ``(K, B, C)``, while the layers'
    parameters (context head, QR) are computed for the B rows only."""
    flow = _randomise({**ALL, **LINEAR}[name](C), 0.5, seed=1)
    d = _features(flow)
    u, ctx = torch.randn(6, 4, d), torch.randn(4, C)
    x, ld = flow.inverse(u, ctx)
    x2, ld2 = flow.inverse(u, ctx.expand(6, 4, C))
    assert x.shape == (6, 4, d) and ld.shape == (6, 4)
    torch.testing.assert_close(x, x2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld, ld2, rtol=0, atol=1e-12)
    # Per-example parameters, not per sample: each example's samples through a flow
    # whose context is that example's alone give the same values.
    x3, ld3 = flow.inverse(u[:, 2], ctx[2])
    torch.testing.assert_close(x[:, 2], x3, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld[:, 2], ld3, rtol=0, atol=1e-12)
    seen = []
    for m in flow.modules():
        if hasattr(m, "params"):
            m.params.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    flow.inverse(u, ctx)
    assert seen and all(tuple(shape) == (4, C) for shape in seen), seen


@pytest.mark.parametrize(
    "amortization, context", [("residual", 0), ("residual", C), ("linear", C)]
)
def test_planar_softplus_constraint_generic_checks(amortization, context):
    """The paper's constraint: brute-force log-dets in float64 (not the identity at init;
    linear amortisation needs a context)."""
    errs = full_check(
        lambda: build_planar(
            D, 2, None, context, amortization=amortization, constraint="softplus"
        ),
        identity_at_init=False,
    )
    assert errs["logdet"] <= 1e-12


def test_planar_softplus_constraint_is_the_papers():
    """``constraint = "softplus"``: ``w . uhat = -1 + softplus(w . u)`` (Rezende & Mohamed's
    Appendix A.1, van den Berg et al.'s ``Planar``), so raw ``u = 0`` gives
    ``uhat = (log 2 - 1) w / |w|^2``, not the identity."""
    layer = Planar(D, constraint="softplus")
    p = layer.flow_params()
    w = layer.params.free["w"]
    assert torch.allclose(p.uhat, (math.log(2) - 1) * w / (w * w).sum(), atol=1e-14)
    with torch.no_grad():
        layer.params.free["u"].copy_(torch.randn(D))
    p = layer.flow_params()
    wu = (w * layer.params.free["u"]).sum()
    assert torch.allclose((p.uhat * w).sum(), -1 + torch.nn.functional.softplus(wu), atol=1e-14)
    assert torch.allclose(p.s, 1 + p.m, atol=1e-14)
    with pytest.raises(ValueError, match="constraint"):
        Planar(D, constraint="tanh")


def test_polar_orthonormalize_is_the_codes_iteration_to_its_limit():
    """The polar factor ``U V^T`` of the source's SVD (the orthonormal matrix nearest to
    it), orthonormal to rounding, reached by the code's own step from the Frobenius-
    normalised source; a rank-deficient source is a clear error."""
    from vaeflow.flows.planar import polar_orthonormalize

    src = torch.randn(3, 6, 4)
    q = polar_orthonormalize(src)
    assert (q.mT @ q - torch.eye(4)).abs().max() <= 1e-13
    u, _, vt = torch.linalg.svd(src, full_matrices=False)
    assert torch.allclose(q, u @ vt, atol=1e-12)
    # the code's loop, 100 steps from the Frobenius-normalised matrix, lands on it too
    a = src / torch.linalg.matrix_norm(src)[..., None, None]
    eye = torch.eye(4)
    for _ in range(100):
        a = a @ (eye + 0.5 * (eye - a.mT @ a))
    assert torch.allclose(q, a, atol=1e-12)
    assert not torch.allclose(q, orthonormalize(src), atol=1e-3)  # another map than QR
    # Like the code, never an exception mid-training: a rank-deficient source comes back
    # as the last iterate, a non-finite one non-finite (the step's guard then skips it).
    assert torch.isfinite(polar_orthonormalize(torch.zeros(6, 4))).all()
    bad = src.clone()
    bad[0, 0, 0] = float("nan")
    out = polar_orthonormalize(bad)
    assert out[0].isnan().any() and torch.allclose(out[1:], q[1:], atol=1e-12)
    # float32, an ill-conditioned source (condition number 1e6): still orthonormal
    u, _, vt = torch.linalg.svd(torch.randn(6, 4), full_matrices=False)
    ill = (u * torch.tensor([1.0, 1e-2, 1e-4, 1e-6]) @ vt).float()
    q32 = polar_orthonormalize(ill)
    assert q32.dtype == torch.float32
    assert (q32.mT @ q32 - torch.eye(4)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="orthogonalization"):
        SylvesterOrthogonal(D, 3, orthogonalization="gram")


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize("name", list(ALL))
def test_exact_identity_at_init(name, context):
    """Not just close: x == u bit for bit and the log-det is exactly 0."""
    flow = ALL[name](context)
    u = 3 * torch.randn(4, 2, _features(flow))
    ctx = torch.randn(4, 2, C) if context else None
    x, ld = flow.inverse(u, ctx)
    assert torch.equal(x, u)
    assert torch.equal(ld, torch.zeros(4, 2))


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize(
    "name, moving",
    [
        ("planar", "free.u"),
        ("radial", "free.beta"),
        ("sylvester_orthogonal", "free.r_diag"),
        ("sylvester_householder", "free.r_off"),
        ("sylvester_triangular", "free.r_diag"),
    ],
)
def test_training_can_leave_the_identity(name, moving, context):
    """At init the parameter that moves the layer off the identity gets a gradient (and,
    when amortised, so does the context head): the non-zero free parts (planar w, Q
    sources, Rtilde) keep gradients flowing although the head starts at zero."""
    flow = LAYERS[name](context)
    u = torch.randn(6, D)
    ctx = torch.randn(6, C) if context else None
    x, ld = flow.inverse(u, ctx)
    (x.pow(3).sum() + ld.sum()).backward()
    grads = dict(flow.params.named_parameters())
    assert grads[moving].grad.abs().sum() > 0
    if context:
        assert flow.params.head.weight.grad.abs().sum() > 0


# -- linear amortisation ------------------------------------------------------------------


def _residual_twin(name):
    """The same layer with residual amortisation: its free parameters give the names
    and shapes that the linear head's output is split into."""
    return LAYERS[name.removesuffix("_linear")](C)


@pytest.mark.parametrize("name", list(LINEAR_LAYERS))
def test_linear_amortization_is_one_linear_map_of_the_context(name):
    """Every parameter is ``Linear(C -> .)(context)``, bias included: the head's output
    split in the residual layer's parameter order, and nothing else (no free part)."""
    layer = LINEAR_LAYERS[name](C)
    head = layer.params.head
    assert layer.params.free is None
    assert {n for n, _ in layer.named_parameters()} == {"params.head.weight", "params.head.bias"}
    assert isinstance(head, torch.nn.Linear) and head.bias is not None
    free = dict(_residual_twin(name).params.free.items())
    assert head.weight.shape == (sum(v.numel() for v in free.values()), C)
    # torch's default init: U(-1/sqrt(C), 1/sqrt(C)) for the weight and the bias.
    bound = 1 / math.sqrt(C)
    for p in (head.weight, head.bias):
        assert p.abs().max() <= bound and p.abs().min() > 0
    ctx = torch.randn(6, 2, C)
    flat = ctx @ head.weight.detach().T + head.bias.detach()
    got = layer.params(ctx)
    # The split follows the layer's own order (its init's; the free ParameterDict of the
    # residual twin sorts its names); names and shapes are the residual layer's.
    order = list(layer.params.shapes)
    assert sorted(got) == sorted(order) == sorted(free)
    offset = 0
    for key in order:
        n = free[key].numel()
        want = flat[..., offset : offset + n].reshape(6, 2, *free[key].shape)
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-15)
        offset += n
    assert offset == flat.shape[-1]
    # Without a context there are no parameters at all.
    with pytest.raises(ValueError, match="linear"):
        layer.params(None)


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_amortization_is_not_the_identity(name):
    """Linear starts near a random transform set by the biases (van den Berg et al.'s
    code); the residual twin of the same flow is exactly the identity at init."""
    flow = LINEAR[name](C)
    u = torch.randn(4, 2, _features(flow))
    ctx = torch.randn(4, 2, C)
    x, ld = flow.inverse(u, ctx)
    assert (x - u).abs().min() > 0 and (x - u).abs().max() > 1e-2
    assert ld.abs().min() > 0
    residual = {**LAYERS, **BUILDERS}[name.removesuffix("_linear")](C)
    x0, ld0 = residual.inverse(u, ctx)
    assert torch.equal(x0, u) and torch.equal(ld0, torch.zeros(4, 2))


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: Planar(D, **kw),
        lambda **kw: Radial(D, **kw),
        lambda **kw: SylvesterOrthogonal(D, 3, **kw),
        lambda **kw: SylvesterHouseholder(D, 3, **kw),
        lambda **kw: SylvesterTriangular(D, **kw),
        lambda **kw: build_planar(4, 2, 8, **kw),
        lambda **kw: build_radial(4, 2, 8, **kw),
        lambda **kw: build_sylvester_orthogonal(4, 2, 8, **kw),
        lambda **kw: build_sylvester_householder(4, 2, 8, **kw),
        lambda **kw: build_sylvester_triangular(4, 2, 8, **kw),
    ],
    ids=[
        "planar",
        "radial",
        "sylvester_orthogonal",
        "sylvester_householder",
        "sylvester_triangular",
        *BUILDERS,
    ],
)
def test_amortization_is_checked(make):
    with pytest.raises(ValueError, match="needs context_features >= 1"):
        make(context_features=0, amortization="linear")
    with pytest.raises(ValueError, match="amortization must be one of.*'affine'"):
        make(context_features=C, amortization="affine")
    make(context_features=C, amortization="linear")  # the checks let the valid ones through
    make(context_features=0, amortization="residual")


# -- direction ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL))
def test_forward_raises_a_helpful_error(name):
    flow = ALL[name](0)
    with pytest.raises(NotImplementedError, match="only implements the sampling direction") as e:
        flow(torch.randn(2, _features(flow)))
    msg = str(e.value)
    assert "inverse" in msg and "FlowPosterior" in msg and "density" in msg


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_flow_density_samples_with_the_right_log_prob(name, context):
    flow = perturb(BUILDERS[name](context))
    density = FlowDensity(flow)
    d = _features(flow)
    ctx = torch.randn(2, C) if context else None
    lead = (7, 2) if context else (7,)
    assert density.sample(7, ctx).shape == (*lead, d)

    torch.manual_seed(11)
    x, log_p = density.sample_and_log_prob(7, ctx)
    torch.manual_seed(11)
    u = torch.randn(*lead, d)  # the same base draw, by hand
    x_ref, ld = flow.inverse(u, ctx)
    log_base = -0.5 * (u * u).sum(-1) - 0.5 * d * math.log(2 * math.pi)
    assert torch.allclose(x, x_ref, atol=0, rtol=0)
    assert torch.allclose(log_p, log_base - ld, atol=1e-13, rtol=0)
    assert ld.abs().min() > 0  # perturbed: the flow really changed the density

    with pytest.raises(NotImplementedError, match="sampling direction"):
        density.log_prob(x, ctx)


# -- invertibility constraints -------------------------------------------------------------


def test_shifted_softplus_is_the_stated_function():
    """m(a) = softplus(a + log(e-1)) - 1 on both sides of the internal branch points."""
    a = torch.tensor(
        [
            -50.0,
            -3.0,
            -1.0001,
            -1.0,
            -0.999,
            -1e-3,
            -1e-12,
            0.0,
            1e-12,
            1e-3,
            0.5,
            5.0,
            19.999,
            20.0,
            20.001,
            35.0,
            100.0,
        ]
    )
    m, s = shifted_softplus(a)
    c = math.log(math.e - 1)
    for ai, mi, si in zip(a.tolist(), m.tolist(), s.tolist(), strict=True):
        ref_s = math.log1p(math.exp(ai + c))
        # 1 + m, m computed from its expm1 form to be accurate near 0
        ref_m = math.log1p(-math.expm1(-1.0) * math.expm1(ai)) if ai < 30 else ref_s - 1
        assert si == pytest.approx(ref_s, rel=1e-14)
        assert mi == pytest.approx(ref_m, rel=1e-13, abs=1e-300)
    assert m[a == 0].item() == 0.0  # exactly: raw u = 0 gives uhat = 0
    assert (m.diff() > 0).all()  # monotone


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e200])
def test_shifted_softplus_range(scale):
    a = scale * torch.randn(1000)
    m, s = shifted_softplus(a)
    assert (m >= -1).all() and (s >= 0).all() and m.isfinite().all()


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize("scale", [1.0, 10.0, 1e3])
def test_planar_constraint_w_dot_uhat_at_least_minus_one(scale, context):
    for seed in range(10):
        flow = _randomise(Planar(D, context), scale, seed)
        ctx = scale * torch.randn(50, C) if context else None
        p = flow.flow_params(ctx)
        assert (p.m >= -1).all() and (p.s >= 0).all()
        wu = (p.w * p.uhat).sum(-1)
        # w . uhat from the vectors equals m up to the rounding of the projection.
        raw = flow.params(ctx)
        slack = 1e-13 * (1 + (raw["w"] * raw["u"]).sum(-1).abs())
        assert ((wu - p.m).abs() <= slack).all()
        assert (wu >= -1 - slack).all()


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
def test_radial_constraint_beta_at_least_minus_alpha(scale, context):
    for seed in range(10):
        flow = _randomise(Radial(D, context), scale, seed)
        ctx = scale * torch.randn(50, C) if context else None
        p = flow.flow_params(ctx)
        assert (p.alpha >= 0).all() and (p.beta >= -p.alpha).all() and (p.gamma >= 0).all()
        # gamma = alpha + beta, computed without the cancellation of the sum.
        assert ((p.gamma - (p.alpha + p.beta)).abs() <= 1e-15 * (p.alpha + p.beta.abs())).all()


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize(
    "make",
    [
        lambda c: SylvesterOrthogonal(D, 3, c),
        lambda c: SylvesterHouseholder(D, 2, c),
        lambda c: SylvesterTriangular(D, True, c),
    ],
    ids=["orthogonal", "householder", "triangular"],
)
def test_sylvester_constraint_diagonal_product_below_one(make, scale, context):
    for seed in range(5):
        flow = _randomise(make(context), scale, seed)
        ctx = scale * torch.randn(20, C) if context else None
        p = flow.flow_params(ctx)
        prod = torch.diagonal(p.r, dim1=-2, dim2=-1) * torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)
        assert (prod.abs() < 1).all()
        assert prod.abs().max() <= 0.999**2 + 1e-15
        assert (torch.tril(p.r, -1) == 0).all() and (torch.tril(p.r_tilde, -1) == 0).all()


@pytest.mark.parametrize(
    "name, context",
    [
        *(
            pytest.param(n, c, id=f"{n}-{i}")
            for n in LAYERS
            for c, i in [(0, "uncond"), (C, "context")]
        ),
        *(pytest.param(n, C, id=f"{n}-context") for n in LINEAR_LAYERS),
    ],
)
def test_jacobian_determinant_never_changes_sign(name, context):
    """Injectivity in practice: det(dx/du) > 0 everywhere we look, for strongly perturbed
    parameters, and the returned log-det is its log (the brute force, over many points)."""
    for seed, (scale, spread) in enumerate([(1.0, 1.0), (3.0, 3.0), (6.0, 0.3)]):
        flow = _randomise({**LAYERS, **LINEAR_LAYERS}[name](context), scale, seed)
        u = spread * torch.randn(40, D)
        ctx = torch.randn(40, C) if context else None
        sign, logabs = torch.linalg.slogdet(_per_sample_jacobian(flow, u, ctx))
        assert (sign > 0).all(), f"{name}: the Jacobian determinant changed sign"
        ld = flow.inverse(u, ctx)[1]
        finite = logabs > -30  # near-singular points: compare only where slogdet is accurate
        assert torch.allclose(ld[finite], logabs[finite], atol=1e-8, rtol=0)


def _is_monotone(x):
    return bool((x.diff() >= -1e-13 * x.abs().max()).all())


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_planar_1d_map_is_monotone_on_a_dense_grid(scale):
    grid = torch.linspace(-20, 20, 40001).unsqueeze(-1)
    for seed in range(10):
        flow = _randomise(Planar(1), scale, seed)
        x, _ = flow.inverse(grid)
        assert _is_monotone(x.squeeze(-1)), f"seed {seed}: planar map not monotone"
    # The checker has teeth: the same map with an unconstrained w * uhat = -3 folds over.
    folded = grid + (-3.0) * torch.tanh(grid)
    assert not _is_monotone(folded.squeeze(-1))


def test_planar_nearly_singular_configuration_stays_monotone():
    """w . uhat -> -1 (raw w . u very negative): slope 0 at one point, never negative."""
    flow = Planar(1)
    with torch.no_grad():
        flow.params.free["w"].fill_(3.0)
        flow.params.free["u"].fill_(-15.0)  # w . u = -45: m = -1 + 1e-20
        flow.params.free["b"].fill_(0.5)
    grid = torch.linspace(-3, 3, 60001).unsqueeze(-1)
    x, ld = flow.inverse(grid)
    assert _is_monotone(x.squeeze(-1))
    assert ld.isfinite().all() and ld.min() < -15
    # At the fold point w.u + b = 0 the slope is s = 1 + m ~ 5e-20: deep, but finite
    # (1 + m tanh' is evaluated as tanh^2 + s tanh', which does not cancel to 0).
    x0, ld0 = flow.inverse(torch.tensor([-0.5 / 3]))
    assert ld0.isfinite() and ld0 < -40


# -- orthonormal Q ----------------------------------------------------------------------------


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize(
    "make",
    [lambda c: SylvesterOrthogonal(6, 4, c), lambda c: SylvesterHouseholder(6, 5, c)],
    ids=["orthogonal", "householder"],
)
def test_q_is_orthonormal_per_example(make, context):
    flow = _randomise(make(context), 2.0, 0)
    ctx = 3 * torch.randn(7, C) if context else None
    q = flow.flow_params(ctx).q
    assert q.shape == ((7,) if context else ()) + (6, flow.num_vectors)
    eye = torch.eye(flow.num_vectors)
    assert (q.mT @ q - eye).abs().max() <= 1e-12
    if context:  # per example: the rows really differ
        assert (q[0] - q[1]).abs().max() > 1e-3


def test_orthonormalize_is_a_smooth_sign_fixed_qr():
    src = torch.randn(3, 6, 4)
    q = orthonormalize(src)
    assert (q.mT @ q - torch.eye(4)).abs().max() <= 1e-13
    # Gram-Schmidt convention: R = Q^T src is upper triangular with a positive diagonal.
    r = q.mT @ src
    assert torch.allclose(torch.tril(r, -1), torch.zeros_like(r), atol=1e-13)
    assert (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()
    # Smooth: a small change of the source gives a small change of Q (no sign flips).
    assert (orthonormalize(src + 1e-7 * torch.randn_like(src)) - q).abs().max() < 1e-5


@pytest.mark.parametrize("context", [0, C], ids=["uncond", "context"])
@pytest.mark.parametrize("name", [n for n in LAYERS if n.startswith("sylvester")])
def test_sylvester_matches_the_dense_formula(name, context):
    """x = u + Q R tanh(Rtilde Q^T u + b) from the dense matrices (Householder and the
    triangular flips are applied without forming Q inside inverse)."""
    flow = perturb(LAYERS[name](context), scale=0.7)
    u = torch.randn(6, D)
    ctx = torch.randn(6, C) if context else None
    q, r, rt, b = flow.flow_params(ctx)
    pre = ((rt @ q.mT) @ u.unsqueeze(-1)).squeeze(-1) + b
    x_ref = u + ((q @ r) @ torch.tanh(pre).unsqueeze(-1)).squeeze(-1)
    ld_ref = torch.log(1 + torch.diagonal(r @ rt, dim1=-2, dim2=-1) * (1 - torch.tanh(pre) ** 2))
    x, ld = flow.inverse(u, ctx)
    assert (x - x_ref).abs().max() <= 1e-13
    assert (ld - ld_ref.sum(-1)).abs().max() <= 1e-13


def test_triangular_q_is_identity_or_reversal_and_builder_alternates():
    flow = build_sylvester_triangular(4, 4, None)
    flags = [layer.reverse for layer in flow.transforms]
    assert flags == [False, True, False, True]
    q0 = flow.transforms[0].flow_params().q
    q1 = flow.transforms[1].flow_params().q
    assert torch.equal(q0, torch.eye(4))
    assert torch.equal(q1 @ torch.arange(4.0), torch.arange(4.0).flip(0))


# -- known answers ------------------------------------------------------------------------------


def _set(flow, **values):
    with torch.no_grad():
        for k, v in values.items():
            flow.params.free[k].copy_(torch.as_tensor(v))
    return flow


# raw value with m(raw) = 1: softplus(raw + log(e-1)) = 2  <=>  raw = log(e + 1)
_M_ONE = math.log(math.e + 1)


def test_planar_known_answer_1d():
    # w = 1, b = 0, raw u = log(e+1): w.u = log(e+1), m = 1, so uhat = 1 and
    # x = z + tanh(z), dx/dz = 1 + (1 - tanh(z)^2).
    flow = _set(Planar(1), u=[_M_ONE], w=[1.0], b=0.0)
    x, ld = flow.inverse(torch.tensor([[0.5], [-2.0]]))
    t05, t2 = math.tanh(0.5), math.tanh(-2.0)
    assert x.squeeze(-1).tolist() == pytest.approx([0.5 + t05, -2.0 + t2], rel=1e-15)
    assert ld.tolist() == pytest.approx([math.log(2 - t05**2), math.log(2 - t2**2)], rel=1e-14)


def test_planar_known_answer_2d():
    # w = (1, 0), raw u = (log(e+1), 0.7): m = 1 and uhat = (1, 0.7).
    flow = _set(Planar(2), u=[_M_ONE, 0.7], w=[1.0, 0.0], b=0.25)
    assert flow.flow_params().uhat.tolist() == pytest.approx([1.0, 0.7], rel=1e-15)
    z = torch.tensor([0.3, -1.2])
    x, ld = flow.inverse(z)
    th = math.tanh(0.3 + 0.25)
    assert x.tolist() == pytest.approx([0.3 + th, -1.2 + 0.7 * th], rel=1e-15)
    assert ld.item() == pytest.approx(math.log(1 + (1 - th**2)), rel=1e-14)
    assert ld.shape == ()


def test_radial_known_answer_2d():
    # z0 = 0, alpha = softplus(log(e-1)) = 1, beta = alpha * m(log(e+1)) = 1;
    # u = (3, 4): r = 5, h = 1/6, x = (7/6) u,
    # log det = (D-1) log(1 + beta h) + log(1 + beta h + beta h' r)
    #         = log(7/6) + log(7/6 - 5/36) = log(7/6) + log(37/36).
    flow = _set(Radial(2), z0=[0.0, 0.0], alpha=math.log(math.e - 1), beta=_M_ONE)
    p = flow.flow_params()
    assert (p.alpha.item(), p.beta.item()) == pytest.approx((1.0, 1.0), rel=1e-15)
    x, ld = flow.inverse(torch.tensor([[3.0, 4.0]]))
    assert x.squeeze(0).tolist() == pytest.approx([3.5, 14 / 3], rel=1e-15)
    assert ld.item() == pytest.approx(math.log(7 / 6) + math.log(37 / 36), rel=1e-14)


def test_radial_known_answer_contracting():
    # beta = -alpha/2 (m = -1/2: raw = log(softplus^-1(1/2)) - log(e-1)), z0 = (1, 0),
    # alpha = 1, u = (1, 2): r = 2, h = 1/3, beta h = -1/6, x = z0 + (5/6)(u - z0).
    raw_beta = math.log(math.expm1(0.5)) - math.log(math.e - 1)
    flow = _set(Radial(2), z0=[1.0, 0.0], alpha=math.log(math.e - 1), beta=raw_beta)
    x, ld = flow.inverse(torch.tensor([1.0, 2.0]))
    assert x.tolist() == pytest.approx([1.0, 5 / 3], rel=1e-14)
    # 1 + alpha beta h^2 = 1 - 1/18
    assert ld.item() == pytest.approx(math.log(5 / 6) + math.log(17 / 18), rel=1e-13)


def test_sylvester_triangular_known_answer_2d():
    # Q = I, R = [[0.5, 0.3], [0, 0.2]], Rtilde = [[0.4, -1], [0, 0.6]], b = (0.1, -0.2).
    def raw_diag(*d):
        return [math.atanh(v / 0.999) for v in d]

    flow = _set(
        SylvesterTriangular(2),
        r_diag=raw_diag(0.5, 0.2),
        r_off=[0.3],
        rt_diag=raw_diag(0.4, 0.6),
        rt_off=[-1.0],
        b=[0.1, -0.2],
    )
    u1, u2 = 0.7, -0.4
    h1 = math.tanh(0.4 * u1 - 1.0 * u2 + 0.1)
    h2 = math.tanh(0.6 * u2 - 0.2)
    x_ref = [u1 + 0.5 * h1 + 0.3 * h2, u2 + 0.2 * h2]
    ld_ref = math.log(1 + 0.5 * 0.4 * (1 - h1**2)) + math.log(1 + 0.2 * 0.6 * (1 - h2**2))
    x, ld = flow.inverse(torch.tensor([u1, u2]))
    assert x.tolist() == pytest.approx(x_ref, rel=1e-14)
    assert ld.item() == pytest.approx(ld_ref, rel=1e-14)


# -- builders -----------------------------------------------------------------------------------


def test_builders_validate_their_options():
    with pytest.raises(TypeError, match="num_householder"):
        build_sylvester_orthogonal(4, 2, 8, num_householder=2)
    with pytest.raises(TypeError, match="no_such_option"):
        build_planar(4, 2, 8, no_such_option=1)
    with pytest.raises(ValueError, match="num_ortho_vectors"):
        build_sylvester_orthogonal(4, 2, 8, num_ortho_vectors=5)
    with pytest.raises(ValueError, match="num_householder"):
        build_sylvester_householder(4, 2, 8, num_householder=0)
    with pytest.raises(ValueError, match="num_layers"):
        build_radial(4, 0, 8)
    with pytest.raises(ValueError, match="features"):
        build_planar((1, 4, 4), 2, 8)
    # Defaults: min(D, 8) orthonormal vectors / reflections; hidden is ignored.
    assert build_sylvester_orthogonal(12, 1, 999).transforms[0].num_vectors == 8
    assert build_sylvester_orthogonal(3, 1, None).transforms[0].num_vectors == 3
    assert build_sylvester_householder(5, 1, 8).transforms[0].num_householder == 5
    assert len(build_planar(4, 6, 8).transforms) == 6


def test_state_dict_round_trip_keeps_the_flow():
    flow = perturb(build_sylvester_householder(4, 2, 8, C))
    fresh = build_sylvester_householder(4, 2, 8, C)
    fresh.load_state_dict(flow.state_dict())
    u, ctx = torch.randn(5, 4), torch.randn(5, C)
    assert torch.equal(fresh.inverse(u, ctx)[0], flow.inverse(u, ctx)[0])


def test_works_in_float32():
    torch.set_default_dtype(torch.float32)  # restored by the autouse fixture
    for make in [*ALL.values(), *LINEAR.values()]:
        flow = perturb(make(C))
        d = _features(flow)
        x, ld = flow.inverse(torch.randn(3, d), torch.randn(3, C))
        assert x.dtype == ld.dtype == torch.float32 and ld.isfinite().all()


# -- extreme inputs -------------------------------------------------------------------------------


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(list(ALL)),
    magnitude=st.floats(1.0, 1e4),
    context_magnitude=st.floats(0.0, 1e3),
    seed=st.integers(0, 2**16),
)
def test_extreme_inputs_stay_finite(name, magnitude, context_magnitude, seed):
    torch.manual_seed(seed)
    flow = perturb(ALL[name](C), seed=seed)
    g = torch.Generator().manual_seed(seed)
    u = magnitude * torch.randn(4, _features(flow), generator=g)
    ctx = context_magnitude * torch.randn(4, C, generator=g)
    check_finite(flow, u, ctx, SAMPLING_ONLY)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=3 * D, max_size=3 * D),
    name=st.sampled_from(list(LAYERS)),
)
def test_extreme_unconditional_inputs_stay_finite(values, name):
    torch.manual_seed(0)
    flow = perturb(LAYERS[name](0))
    u = torch.tensor(values, dtype=torch.float64).reshape(3, D)
    check_finite(flow, u, None, SAMPLING_ONLY)
