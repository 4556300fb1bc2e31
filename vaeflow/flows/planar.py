"""Planar, radial and Sylvester flows: residual layers that only exist in the sampling direction.

Each layer here is a map ``x = u + g(u)`` from noise to data (``z0 -> z1`` in the papers'
notation) whose log-determinant is cheap, but whose inverse has no closed form. Following
docs/design.md §3.1 they implement only :meth:`~vaeflow.flows.base.Transform.inverse`
(noise -> data, returning ``log|det dx/du|``); :meth:`forward` raises
:class:`NotImplementedError`. That is exactly what a flow posterior needs
(``z, ld = flow.inverse(eps, context=h)``, ``log q(z|x) = log q0(eps|x) - ld``), and a
:class:`~vaeflow.flows.density.FlowDensity` built on them can still ``sample`` and
``sample_and_log_prob``; only ``log_prob`` of given data is out of reach.

Amortisation (van den Berg et al. 2018, section 4): with ``context_features > 0`` every
parameter of a layer is produced per example, as a free parameter plus the output of a
zero-initialised linear head of the context, so a VAE encoder can hand each data point its
own flow while the layer still starts as the identity. With ``context_features == 0`` the
free parameters alone are used and shared by every sample.

Every layer starts as the exact identity with log-det exactly zero, and keeps the
invertibility constraint of its paper for *all* raw parameter values, so no optimiser step
can make it non-invertible.

References:
    Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (planar and radial flows, Appendix A.1 for the planar constraint).
    van den Berg, Hasenclever, Tomczak & Welling 2018, "Sylvester Normalizing Flows for
    Variational Inference", arXiv:1803.05649.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import zero_init
from .base import Composite, Transform

__all__ = [
    "Planar",
    "Radial",
    "Sylvester",
    "SylvesterOrthogonal",
    "SylvesterHouseholder",
    "SylvesterTriangular",
    "PlanarParams",
    "RadialParams",
    "SylvesterParams",
    "shifted_softplus",
    "orthonormalize",
    "polar_orthonormalize",
    "build_planar",
    "build_radial",
    "build_sylvester_orthogonal",
    "build_sylvester_householder",
    "build_sylvester_triangular",
]

# softplus(_LOG_E_MINUS_1) == 1: the shift that makes m(0) = 0 below.
_LOG_E_MINUS_1 = math.log(math.expm1(1.0))
_ONE_MINUS_INV_E = -math.expm1(-1.0)
# torch's softplus switches to the identity above `threshold` (default 20), which is off by
# e^-20 ~ 2e-9; at 40 the switch is below float64 resolution, so the parametrisations
# below stay smooth and agree with their closed forms to rounding.
_SOFTPLUS_THRESHOLD = 40.0
# |R_ii| and |Rtilde_ii| are at most this, so every factor 1 + R_ii Rtilde_ii tanh'(.) of
# the Sylvester determinant is >= 1 - 0.999^2 ~ 2e-3: a bounded log-scale (>= -6.2 per
# dimension, docs/design.md §3.5), and strictly positive even after rounding. Plain
# tanh(raw) would round to exactly 1 for raw > 19 and give a zero determinant.
_DIAG_BOUND = 0.999

_NOT_INVERTIBLE = (
    "{name} only implements the sampling direction: inverse(u, context) maps noise -> data "
    "(z0 -> z1 in Rezende & Mohamed 2015 / van den Berg et al. 2018) and returns "
    "log|det dx/du|. Its map x = u + g(u) has no analytic inverse, so forward (data -> "
    "noise, density evaluation) is not available. Use it in a posterior (FlowPosterior "
    "calls inverse) or to sample from a FlowDensity (sample / sample_and_log_prob); for "
    "log_prob of given data use a coupling or autoregressive flow."
)


# -- shared helpers ---------------------------------------------------------------------


def _softplus(x: Tensor) -> Tensor:
    return F.softplus(x, threshold=_SOFTPLUS_THRESHOLD)


def shifted_softplus(a: Tensor) -> tuple[Tensor, Tensor]:
    """``m(a) = softplus(a + log(e - 1)) - 1`` and ``s(a) = 1 + m(a)``, computed stably.

    ``m`` maps the real line onto ``(-1, inf)`` smoothly and monotonically with
    ``m(0) = 0`` exactly. The textbook planar constraint (Rezende & Mohamed 2015, Appendix
    A.1) uses ``m(a) = -1 + softplus(a)``, whose ``m(0) = log 2 - 1 != 0``: a raw ``u = 0``
    would then *not* give ``uhat = 0`` and the layer would not start as the identity. The
    shift by ``log(e - 1)`` fixes that without changing the range.

    Near ``a = 0`` the subtraction ``softplus(.) - 1`` cancels, so there ``m`` is
    evaluated as ``log1p((1 - 1/e) * expm1(a))`` (the same function, algebraically), which
    is exactly 0 at ``a = 0`` and accurate to relative rounding around it. ``s`` is
    returned separately because ``1 + m`` itself loses all precision when ``m -> -1``.

    Args:
        a: any shape.

    Returns:
        ``m`` and ``s``, both of ``a``'s shape, with ``m >= -1`` and ``s >= 0`` exactly.
    """
    s = _softplus(a + _LOG_E_MINUS_1)
    inner = (a > -1.0) & (a < 20.0)
    # The clamp keeps the unselected branch finite, so torch.where's gradient stays finite.
    m_inner = torch.log1p(_ONE_MINUS_INV_E * torch.expm1(a.clamp(-1.0, 20.0)))
    return torch.where(inner, m_inner, s - 1.0), s


def _log_one_plus(x: Tensor, one_plus_x: Tensor) -> Tensor:
    """``log(1 + x)`` for ``x > -1``, given ``1 + x`` from a cancellation-free formula too.

    ``log1p(x)`` is accurate unless ``x`` is close to -1, where ``1 + x`` is tiny and its
    relative error blows up; there the separately computed ``one_plus_x`` is used instead.
    """
    tiny = torch.finfo(x.dtype).tiny
    # Both branches are clamped into their valid range so the unused one stays finite
    # (an inf there would turn torch.where's gradient into NaN).
    return torch.where(
        x > -0.5,
        torch.log1p(x.clamp(min=-0.5)),
        torch.log(one_plus_x.clamp(min=tiny)),
    )


def orthonormalize(source: Tensor) -> Tensor:
    """Exactly orthonormal columns from a full-rank ``(*, D, M)`` matrix, ``M <= D``.

    The reduced QR decomposition with the signs fixed so that ``diag(R) > 0``: that makes
    the result the Gram-Schmidt orthonormalisation of the columns, a smooth function of
    ``source`` (LAPACK's own sign choice can flip a column between nearby inputs).

    Args:
        source: ``(*, D, M)``.

    Returns:
        ``Q (*, D, M)`` with ``Q^T Q = I`` to rounding (~1e-15 in float64).
    """
    q, r = torch.linalg.qr(source, mode="reduced")
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))
    return q * sign.unsqueeze(-2)


#: Iterations at most of :func:`polar_orthonormalize` (van den Berg et al.'s ``steps``).
POLAR_MAX_STEPS = 100


def polar_orthonormalize(source: Tensor, max_steps: int = POLAR_MAX_STEPS) -> Tensor:
    """The orthonormal polar factor ``source (source^T source)^(-1/2)`` of a full-rank
    ``(*, D, M)`` matrix, by van den Berg et al.'s iteration.

    Their code (``models/VAE.py`` ``batch_construct_orthogonal``) divides each matrix by
    its Frobenius norm (so every singular value is at most 1) and repeats the
    Newton-Schulz step ``Q <- Q (I + (I - Q^T Q) / 2)``, which drives every singular value
    to 1 and keeps the singular vectors: the limit is the polar factor, the orthonormal
    matrix nearest to ``source``. The code stops at a tolerance of ``1e-6`` (``1e-5`` when
    ``M = D``); here the iteration stops when ``Q^T Q = I`` to a few ulps of float32 or
    float64 (the quadratic convergence makes that one or two steps more), so that the
    Sylvester determinant formula, which assumes orthonormal columns, stays exact: about
    8 steps for a well-conditioned source, 50 for a condition number of 1e8. A different
    map from the raw parameters than :func:`orthonormalize` (QR), onto the same set.

    Like the code, it never raises: after ``max_steps`` it returns the last iterate (a
    rank-deficient source is not orthonormalised; a non-finite one stays non-finite, so
    the training step's non-finite-loss guard skips the update). It runs in float32 or
    float64 even under autocast (a bfloat16 Gram matrix could not reach the tolerance).
    Under ``torch.compile`` it runs a fixed ``POLAR_COMPILED_STEPS`` steps without the
    convergence test (a data-dependent branch would break the graph); past convergence a
    step changes ``Q`` only by rounding.

    Args:
        source: ``(*, D, M)``, ``M <= D``, full column rank.
        max_steps: iterations at most (the code's ``steps = 100``).

    Returns:
        ``Q (*, D, M)``, in ``source``'s dtype.
    """
    dtype = source.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(source.device.type, enabled=False):
        src = source.to(work)
        m = src.shape[-1]
        eye = torch.eye(m, dtype=work, device=src.device)
        tol = 64 * m * torch.finfo(work).eps
        norm = torch.linalg.matrix_norm(src).clamp_min(torch.finfo(work).tiny)
        q = src / norm[..., None, None]
        compiling = torch.compiler.is_compiling()
        for _ in range(POLAR_COMPILED_STEPS if compiling else max_steps):
            gram = q.mT @ q
            # converged? (a non-finite matrix counts as done: it stays non-finite)
            err = torch.nan_to_num((gram - eye).abs(), nan=0.0, posinf=0.0)
            if not compiling and not bool(err.amax() > tol):
                break
            q = q @ (eye + 0.5 * (eye - gram))
    return q.to(dtype)


#: Fixed iterations of :func:`polar_orthonormalize` inside ``torch.compile`` (enough for a
#: condition number of about 1e8; the eager loop stops at convergence).
POLAR_COMPILED_STEPS = 60


#: How a Sylvester layer's ``Q`` is made orthonormal (``orthogonalization`` option).
ORTHOGONALIZATIONS = ("qr", "polar")


#: How an amortised layer's parameters depend on the context (``amortization`` option).
AMORTIZATIONS = ("residual", "linear")


def _check_amortization(name: str, amortization: object, context_features: int) -> None:
    if amortization not in AMORTIZATIONS:
        raise ValueError(
            f"{name}: amortization must be one of {AMORTIZATIONS}, got {amortization!r}"
        )
    if amortization == "linear" and context_features < 1:
        raise ValueError(
            f"{name}: amortization = 'linear' computes every parameter from the context, "
            "so it needs context_features >= 1"
        )


class _AmortisedParams(nn.Module):
    """Named layer parameters, shared or per example.

    ``amortization = "residual"`` (default): free parameters, plus (with a context) a
    zero-initialised, bias-free linear head: ``forward(None)`` returns the free
    parameters; ``forward(c)`` with ``c (*c, C)`` returns ``free + head(c)`` reshaped to
    ``(*c, *shape)``. A conditional layer then starts exactly where the unconditional one
    does (the identity, for the layers here).

    ``amortization = "linear"``: every parameter is ``Linear(C -> .)(c)`` with a bias and
    torch's default initialisation, nothing else (van den Berg et al.'s code: one
    ``nn.Linear`` of the encoder features per parameter). The function class is the same
    as ``residual``'s (affine in ``c``); the start and the optimisation path are not: the
    layer starts near a random transform set by the biases. ``init`` then only gives the
    shapes.
    """

    def __init__(
        self, init: dict[str, Tensor], context_features: int, amortization: str = "residual"
    ) -> None:
        super().__init__()
        self.shapes = {k: tuple(v.shape) for k, v in init.items()}
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.linear = amortization == "linear"
        if self.linear:
            self.free = None
            self.head = nn.Linear(context_features, sum(self.sizes))
            return
        self.free = nn.ParameterDict({k: nn.Parameter(v) for k, v in init.items()})
        self.head = (
            zero_init(nn.Linear(context_features, sum(self.sizes), bias=False))
            if context_features > 0
            else None
        )

    def forward(self, context: Tensor | None) -> dict[str, Tensor]:
        if self.linear and context is None:
            raise ValueError(
                "a layer with amortization = 'linear' has no parameters without a context"
            )
        if context is None or self.head is None:
            return dict(self.free.items())
        chunks = self.head(context).split(self.sizes, dim=-1)
        out = {}
        for (name, shape), chunk in zip(self.shapes.items(), chunks, strict=True):
            delta = chunk.squeeze(-1) if shape == () else chunk.unflatten(-1, shape)
            out[name] = delta if self.linear else self.free[name] + delta
        return out


def _check_features(name: str, features: object, context_features: object) -> None:
    if not isinstance(features, int) or isinstance(features, bool) or features < 1:
        raise ValueError(f"{name}: features must be a positive int, got {features!r}")
    if not isinstance(context_features, int) or context_features < 0:
        raise ValueError(f"{name}: context_features must be an int >= 0, got {context_features!r}")


def _check_num_vectors(name: str, num_vectors: object, features: int) -> None:
    if (
        isinstance(num_vectors, bool)
        or not isinstance(num_vectors, int)
        or not (1 <= num_vectors <= features)
    ):
        raise ValueError(
            f"{name}: the number of orthonormal vectors M must be an int in [1, {features}], "
            f"got {num_vectors!r}"
        )


def _check_builder(
    name: str, features: object, num_layers: object, context_features: object
) -> None:
    _check_features(name, features, context_features)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"{name}: num_layers must be an int >= 1, got {num_layers!r}")


class _SamplingOnly(Transform):
    """Base of the layers here: ``forward`` explains why it does not exist.

    A context broadcasts: ``inverse(u (K, B, D), context (B, C))`` computes the layer's
    per-example parameters (the context head, Sylvester's QR of ``Q``) once per example
    and broadcasts them over the K samples, instead of once per sample -- the k = 5000
    importance-sampled evaluation otherwise ran the head and the QR 5000 times per image.
    Every formula below is written for parameters ``(*c, ...)`` that broadcast against
    ``u (*lead, ...)``.
    """

    broadcasts_context = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Not available: these layers have no analytic data -> noise map (see ``inverse``)."""
        raise NotImplementedError(_NOT_INVERTIBLE.format(name=type(self).__name__))


# -- planar -----------------------------------------------------------------------------


#: ``m`` of the planar constraint ``w . uhat = m(w . u)``: ``"shifted"`` (vaeflow's,
#: :func:`shifted_softplus`, ``m(0) = 0``) or ``"softplus"`` (the paper's and van den Berg
#: et al.'s code's ``-1 + softplus``)
PLANAR_CONSTRAINTS = ("shifted", "softplus")


class PlanarParams(NamedTuple):
    """Constrained planar parameters; shapes ``(*c, D)`` or ``(*c)`` (no ``*c`` if shared).

    Attributes:
        uhat: the direction actually used, ``w . uhat = m > -1``.
        w: the normal of the hyperplane.
        b: the offset.
        m: ``w . uhat`` (in closed form, not from the dot product).
        s: ``1 + m >= 0``, computed without cancellation.
    """

    uhat: Tensor
    w: Tensor
    b: Tensor
    m: Tensor
    s: Tensor


class Planar(_SamplingOnly):
    """Planar flow ``x = u + uhat * tanh(w . u + b)`` (sampling direction only).

    The Jacobian is ``I + uhat psi^T`` with ``psi = tanh'(w . u + b) w``, so by the matrix
    determinant lemma ``log|det dx/du| = log|1 + tanh'(w . u + b) (w . uhat)|``. The map is
    invertible iff ``w . uhat >= -1`` (Rezende & Mohamed 2015, Appendix A.1); it is enforced
    for every raw ``u`` by projecting along ``w``::

        uhat = u + (m(w . u) - w . u) w / |w|^2,   so   w . uhat = m(w . u) > -1,

    with ``m`` the *shifted* softplus of :func:`shifted_softplus`, ``m(a) =
    softplus(a + log(e - 1)) - 1``, chosen so that ``m(0) = 0``: raw ``u = 0`` gives
    ``uhat = 0`` exactly, i.e. the identity at init (the paper's ``-1 + softplus(a)`` would
    give ``uhat = (log 2 - 1) w / |w|^2 != 0``). The determinant ``1 + m tanh'`` then lies
    in ``(0, 1 + m]``. No soft clip is needed: nothing is exponentiated, so ``x`` and the
    log-det grow at most linearly in the parameters.

    Parameters: ``u`` (zero at init), ``w`` (random, so gradients reach ``u``), ``b``
    (zero). With ``context_features = C > 0`` each is ``free + Linear(C -> ., zero init)``
    of the context, per example.

    Args:
        features: ``D``.
        context_features: ``C`` (0: shared, unconditional parameters).
        amortization: ``"residual"`` or ``"linear"`` (see ``_AmortisedParams``).
        constraint: ``"shifted"`` (default, above) or ``"softplus"``: the paper's
            ``m(a) = -1 + softplus(a)`` (Appendix A.1; van den Berg et al.'s code), not the
            identity at init.

    References:
        Rezende & Mohamed 2015, arXiv:1505.05770, section 4.1 and Appendix A.1.
    """

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        amortization: str = "residual",
        constraint: str = "shifted",
    ) -> None:
        _check_features("Planar", features, context_features)
        _check_amortization("Planar", amortization, context_features)
        if constraint not in PLANAR_CONSTRAINTS:
            raise ValueError(
                f"Planar: constraint must be one of {PLANAR_CONSTRAINTS}, got {constraint!r}"
            )
        super().__init__(features, context_features)
        self.features = features
        self.constraint = constraint
        dtype = torch.get_default_dtype()
        self.params = _AmortisedParams(
            {
                "u": torch.zeros(features, dtype=dtype),
                "w": torch.randn(features, dtype=dtype) / math.sqrt(features),
                "b": torch.zeros((), dtype=dtype),
            },
            context_features,
            amortization,
        )

    def flow_params(self, context: Tensor | None = None) -> PlanarParams:
        """The constrained parameters, shared (no context) or per context row ``(*c, C)``."""
        if context is not None:
            context = self.expand_context(context, context.shape[:-1])
        raw = self.params(context)
        u, w = raw["u"], raw["w"]
        wu = (w * u).sum(-1)
        if self.constraint == "softplus":  # the paper's m(a) = -1 + softplus(a)
            s = _softplus(wu)
            m = s - 1.0
        else:
            m, s = shifted_softplus(wu)
        # |w|^2 only vanishes for w = 0, where w.u = 0 and the correction (m - w.u) w is 0
        # too (whatever m(0) is); the clamp avoids 0/0 there.
        wsq = (w * w).sum(-1).clamp(min=torch.finfo(w.dtype).tiny)
        uhat = u + ((m - wu) / wsq).unsqueeze(-1) * w
        return PlanarParams(uhat, w, raw["b"], m, s)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. ``u (*, D)`` -> ``x (*, D)``, ``log|det dx/du| (*)``."""
        lead, context = self.check_input(u, context, inverse=True)
        p = self.flow_params(context)
        th = torch.tanh((u * p.w).sum(-1) + p.b)
        x = u + th.unsqueeze(-1) * p.uhat
        th2 = th * th
        deriv = 1.0 - th2  # tanh'
        # 1 + m tanh' = tanh^2 + s tanh': both terms >= 0, no cancellation when m -> -1.
        ld = _log_one_plus(p.m * deriv, th2 + p.s * deriv)
        return x, ld.expand(lead)


# -- radial -----------------------------------------------------------------------------


class RadialParams(NamedTuple):
    """Constrained radial parameters; shapes ``(*c, D)`` or ``(*c)``.

    Attributes:
        z0: the centre.
        alpha: ``> 0``, the length scale.
        beta: ``>= -alpha``, the strength (0 at init).
        gamma: ``alpha + beta >= 0``, computed without cancellation.
    """

    z0: Tensor
    alpha: Tensor
    beta: Tensor
    gamma: Tensor


class Radial(_SamplingOnly):
    """Radial flow ``x = u + beta h(alpha, r) (u - z0)`` (sampling direction only).

    With ``r = |u - z0|`` and ``h = 1 / (alpha + r)`` the Jacobian is
    ``(1 + beta h) I + beta h'(r) r e e^T`` (``e`` the unit radial vector, ``h' = -h^2``),
    so (Rezende & Mohamed 2015, eq. 14)::

        log|det dx/du| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)
                       = (D - 1) log(1 + beta h) + log(1 + alpha beta h^2).

    Constraints: ``alpha = softplus(alpha_raw) > 0`` and ``beta >= -alpha`` (invertibility).
    The brief suggested ``beta = -alpha + softplus(beta_raw + softplus^-1(alpha))``; we use
    the same constraint set written as ``beta = alpha * m(beta_raw)`` with the shifted
    softplus ``m > -1`` of :func:`shifted_softplus`, because it gives ``beta = 0`` *exactly*
    at ``beta_raw = 0`` (the other form only cancels to rounding), and
    ``gamma = alpha + beta = alpha * s(beta_raw)`` without cancellation, which keeps the
    log-det accurate when ``beta -> -alpha``: there ``1 + beta h = (r + gamma) h`` and
    ``1 + alpha beta h^2 = (alpha gamma + 2 alpha r + r^2) h^2`` are used.

    Parameters: ``z0`` (random, so stacked layers differ), ``alpha_raw`` (``alpha = 1`` at
    init), ``beta_raw`` (zero: the identity). With ``context_features > 0`` each is
    ``free + Linear(C -> ., zero init)`` of the context.

    Args:
        features: ``D``.
        context_features: ``C`` (0: shared parameters).

    References:
        Rezende & Mohamed 2015, arXiv:1505.05770, section 4.1 and Appendix A.2.
    """

    def __init__(
        self, features: int, context_features: int = 0, amortization: str = "residual"
    ) -> None:
        _check_features("Radial", features, context_features)
        _check_amortization("Radial", amortization, context_features)
        super().__init__(features, context_features)
        self.features = features
        dtype = torch.get_default_dtype()
        self.params = _AmortisedParams(
            {
                "z0": torch.randn(features, dtype=dtype),
                "alpha": torch.full((), _LOG_E_MINUS_1, dtype=dtype),  # softplus -> 1
                "beta": torch.zeros((), dtype=dtype),
            },
            context_features,
            amortization,
        )

    def flow_params(self, context: Tensor | None = None) -> RadialParams:
        """The constrained parameters, shared (no context) or per context row ``(*c, C)``."""
        if context is not None:
            context = self.expand_context(context, context.shape[:-1])
        raw = self.params(context)
        alpha = _softplus(raw["alpha"])
        m, s = shifted_softplus(raw["beta"])
        return RadialParams(raw["z0"], alpha, alpha * m, alpha * s)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. ``u (*, D)`` -> ``x (*, D)``, ``log|det dx/du| (*)``."""
        lead, context = self.check_input(u, context, inverse=True)
        p = self.flow_params(context)
        diff = u - p.z0
        # vector_norm's gradient at r = 0 is 0 (a subgradient), not NaN.
        r = torch.linalg.vector_norm(diff, dim=-1)
        h = 1.0 / (p.alpha + r)
        bh = p.beta * h
        x = u + bh.unsqueeze(-1) * diff
        radial = _log_one_plus(bh, (r + p.gamma) * h)
        normal = _log_one_plus(
            p.alpha * bh * h, (p.alpha * p.gamma + (2.0 * p.alpha + r) * r) * h * h
        )
        ld = (self.features - 1) * radial + normal
        return x, ld.expand(lead)


# -- Sylvester --------------------------------------------------------------------------


class SylvesterParams(NamedTuple):
    """Sylvester parameters; shapes ``(*c, D, M)``, ``(*c, M, M)``, ``(*c, M)``.

    Attributes:
        q: ``Q`` with orthonormal columns.
        r: upper-triangular ``R``.
        r_tilde: upper-triangular ``Rtilde``.
        b: the bias.
    """

    q: Tensor
    r: Tensor
    r_tilde: Tensor
    b: Tensor


class Sylvester(_SamplingOnly):
    """Sylvester flow ``x = u + Q R tanh(Rtilde Q^T u + b)`` (sampling direction only).

    ``Q`` is ``D x M`` with orthonormal columns, ``R`` and ``Rtilde`` are ``M x M`` upper
    triangular. By Sylvester's determinant identity and ``Q^T Q = I``::

        det(I_D + Q R diag(tanh') Rtilde Q^T) = det(I_M + diag(tanh') Rtilde R)
                                              = prod_i (1 + tanh'_i Rtilde_ii R_ii),

    since ``Rtilde R`` is upper triangular. The formula is only exact when ``Q^T Q = I``
    holds exactly, which is why the subclasses build ``Q`` as an exact orthonormal matrix.
    Invertibility: ``R_ii Rtilde_ii > -1`` suffices for ``tanh``; here
    ``diag(R) = 0.999 tanh(raw)`` (same for ``Rtilde``), so ``|R_ii Rtilde_ii| <= 0.998``
    strictly even after rounding, and each log-det term is bounded below by ``log(2e-3)``.

    Identity at init: ``R = 0`` (so ``A = Q R = 0``); ``Rtilde`` starts random so that
    gradients reach ``R``. With ``context_features > 0`` all parameters (``R``,
    ``Rtilde``, ``b`` and the source of ``Q``) are ``free + Linear(C -> ., zero init)``
    of the context, per example (the amortised flows of van den Berg et al. 2018).

    Subclasses choose ``Q``: :class:`SylvesterOrthogonal`, :class:`SylvesterHouseholder`,
    :class:`SylvesterTriangular`.

    Args:
        features: ``D``.
        num_vectors: ``M`` (columns of ``Q``).
        context_features: ``C``.
        q_init: initial values of the free parameters that define ``Q``.

    References:
        van den Berg et al. 2018, arXiv:1803.05649, sections 3 and 4.
    """

    def __init__(
        self,
        features: int,
        num_vectors: int,
        context_features: int = 0,
        q_init: dict[str, Tensor] | None = None,
        amortization: str = "residual",
    ) -> None:
        _check_features(type(self).__name__, features, context_features)
        _check_amortization(type(self).__name__, amortization, context_features)
        _check_num_vectors(type(self).__name__, num_vectors, features)
        super().__init__(features, context_features)
        self.features = features
        self.num_vectors = m = num_vectors
        dtype = torch.get_default_dtype()
        n_off = m * (m - 1) // 2
        init: dict[str, Tensor] = {"r_diag": torch.zeros(m, dtype=dtype)}
        if n_off:  # M = 1 has no off-diagonal entries (and no empty parameter)
            init["r_off"] = torch.zeros(n_off, dtype=dtype)
        init["rt_diag"] = torch.randn(m, dtype=dtype) / math.sqrt(m)
        if n_off:
            init["rt_off"] = torch.randn(n_off, dtype=dtype) / math.sqrt(m)
        init["b"] = torch.zeros(m, dtype=dtype)
        init.update(q_init or {})
        self.params = _AmortisedParams(init, context_features, amortization)
        rows, cols = torch.triu_indices(m, m, offset=1)
        self.register_buffer("off_index", rows * m + cols, persistent=False)

    # -- Q, to be chosen by subclasses -----------------------------------------------------
    def _q_state(self, raw: dict[str, Tensor]) -> Tensor | None:
        """Whatever the subclass needs to apply ``Q`` (a matrix, reflection vectors...)."""
        raise NotImplementedError

    def _apply_qt(self, q: Tensor | None, u: Tensor) -> Tensor:
        """``Q^T u``: ``(*, D) -> (*, M)``."""
        raise NotImplementedError

    def _apply_q(self, q: Tensor | None, y: Tensor) -> Tensor:
        """``Q y``: ``(*, M) -> (*, D)``."""
        raise NotImplementedError

    def _q_matrix(self, q: Tensor | None, like: Tensor) -> Tensor:
        """The dense ``Q (*c, D, M)``."""
        raise NotImplementedError

    # -- shared maths ----------------------------------------------------------------------
    def _triangular(self, raw: dict[str, Tensor], prefix: str) -> Tensor:
        diag = _DIAG_BOUND * torch.tanh(raw[f"{prefix}_diag"])
        mat = torch.diag_embed(diag)
        if f"{prefix}_off" in raw:
            off = raw[f"{prefix}_off"]
            flat = off.new_zeros(*off.shape[:-1], self.num_vectors**2)
            flat = flat.index_copy(-1, self.off_index, off)
            mat = mat + flat.unflatten(-1, (self.num_vectors, self.num_vectors))
        return mat

    def flow_params(self, context: Tensor | None = None) -> SylvesterParams:
        """``Q, R, Rtilde, b``, shared (no context) or per context row ``(*c, C)``."""
        if context is not None:
            context = self.expand_context(context, context.shape[:-1])
        raw = self.params(context)
        r = self._triangular(raw, "r")
        return SylvesterParams(
            self._q_matrix(self._q_state(raw), r), r, self._triangular(raw, "rt"), raw["b"]
        )

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data. ``u (*, D)`` -> ``x (*, D)``, ``log|det dx/du| (*)``."""
        lead, context = self.check_input(u, context, inverse=True)
        raw = self.params(context)
        q = self._q_state(raw)
        r = self._triangular(raw, "r")
        rt = self._triangular(raw, "rt")
        v = self._apply_qt(q, u)  # (*lead, M)
        th = torch.tanh(_matvec(rt, v) + raw["b"])
        x = u + self._apply_q(q, _matvec(r, th))
        scale = torch.diagonal(r, dim1=-2, dim2=-1) * torch.diagonal(rt, dim1=-2, dim2=-1)
        # 1 + tanh' R_ii Rtilde_ii >= 1 - 0.998: log1p is accurate and finite here.
        ld = torch.log1p((1.0 - th * th) * scale).sum(-1)
        return x, ld.expand(lead)


def _matvec(mat: Tensor, vec: Tensor) -> Tensor:
    """``(*a, M, N) @ (*b, N) -> (*broadcast(a, b), M)``."""
    return (mat @ vec.unsqueeze(-1)).squeeze(-1)


class SylvesterOrthogonal(Sylvester):
    """Orthogonal Sylvester flow: ``Q`` is ``D x M`` with exactly orthonormal columns.

    ``Q`` comes from a free (or amortised) ``D x M`` matrix through
    :func:`orthonormalize` (reduced QR with a sign fix; ``orthogonalization = "qr"``, the
    default) or :func:`polar_orthonormalize` (``"polar"``: van den Berg et al.'s
    iteration ``Q <- Q (I + (I - Q^T Q)/2)``, run to convergence: the polar factor). Both
    are orthonormal to rounding, differentiable and batched, so the determinant formula
    ``prod (1 + tanh' Rtilde_ii R_ii)`` stays exact (~1e-13 in float64); they are
    different maps from the raw matrix onto the same set, so training can differ.

    Args:
        features: ``D``.
        num_vectors: ``M <= D`` (the bottleneck; van den Berg et al. use ``M = 8`` or
            ``32`` for ``D = 64``).
        context_features: ``C``.
        amortization: see :class:`Sylvester`.
        orthogonalization: ``"qr"`` or ``"polar"`` (above).

    References:
        van den Berg et al. 2018, arXiv:1803.05649, section 4.1.
    """

    def __init__(
        self,
        features: int,
        num_vectors: int,
        context_features: int = 0,
        amortization: str = "residual",
        orthogonalization: str = "qr",
    ) -> None:
        _check_features("SylvesterOrthogonal", features, context_features)
        _check_num_vectors("SylvesterOrthogonal", num_vectors, features)
        if orthogonalization not in ORTHOGONALIZATIONS:
            raise ValueError(
                f"SylvesterOrthogonal: orthogonalization must be one of "
                f"{ORTHOGONALIZATIONS}, got {orthogonalization!r}"
            )
        source = torch.randn(features, num_vectors, dtype=torch.get_default_dtype())
        super().__init__(
            features, num_vectors, context_features, {"q_source": source}, amortization
        )
        self.orthogonalization = orthogonalization

    def _q_state(self, raw: dict[str, Tensor]) -> Tensor:
        if self.orthogonalization == "polar":
            return polar_orthonormalize(raw["q_source"])
        return orthonormalize(raw["q_source"])

    def _apply_qt(self, q: Tensor | None, u: Tensor) -> Tensor:
        return (u.unsqueeze(-2) @ q).squeeze(-2)

    def _apply_q(self, q: Tensor | None, y: Tensor) -> Tensor:
        return _matvec(q, y)

    def _q_matrix(self, q: Tensor | None, like: Tensor) -> Tensor:
        return q


class SylvesterHouseholder(Sylvester):
    """Householder Sylvester flow: ``Q = H_1 H_2 ... H_T``, ``M = D``.

    ``H_k = I - 2 v_k v_k^T / |v_k|^2`` are reflections, so ``Q`` is orthogonal to rounding
    for any vectors ``v_k`` (free, or amortised from the context). ``Q`` is never formed
    inside :meth:`inverse`: ``Q^T u`` and ``Q y`` are ``T`` reflections of a vector each,
    ``O(T D)`` per sample instead of ``O(D^2)``.

    Args:
        features: ``D``.
        num_householder: ``T >= 1`` reflections (van den Berg et al. use up to 8).
        context_features: ``C``.

    References:
        van den Berg et al. 2018, arXiv:1803.05649, section 4.2; Tomczak & Welling 2016,
        "Improving Variational Auto-Encoders using Householder Flow", arXiv:1611.09630.
    """

    def __init__(
        self,
        features: int,
        num_householder: int,
        context_features: int = 0,
        amortization: str = "residual",
    ) -> None:
        _check_features("SylvesterHouseholder", features, context_features)
        if (
            isinstance(num_householder, bool)
            or not isinstance(num_householder, int)
            or (num_householder < 1)
        ):
            raise ValueError(
                f"SylvesterHouseholder: num_householder must be an int >= 1, "
                f"got {num_householder!r}"
            )
        vectors = torch.randn(num_householder, features, dtype=torch.get_default_dtype())
        super().__init__(
            features, features, context_features, {"q_vectors": vectors}, amortization
        )
        self.num_householder = num_householder

    def _q_state(self, raw: dict[str, Tensor]) -> Tensor:
        return raw["q_vectors"]  # (*c, T, D)

    @staticmethod
    def _reflect(z: Tensor, v: Tensor) -> Tensor:
        """``H z = z - 2 (v . z) / |v|^2 v`` for ``z (*, D)``, ``v`` broadcastable to it."""
        vv = (v * v).sum(-1, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)
        return z - (2.0 * (v * z).sum(-1, keepdim=True) / vv) * v

    def _apply_qt(self, q: Tensor | None, u: Tensor) -> Tensor:
        # Q^T = H_T ... H_1 (each H_k is symmetric): H_1 acts first.
        for k in range(self.num_householder):
            u = self._reflect(u, q[..., k, :])
        return u

    def _apply_q(self, q: Tensor | None, y: Tensor) -> Tensor:
        for k in reversed(range(self.num_householder)):
            y = self._reflect(y, q[..., k, :])
        return y

    def _q_matrix(self, q: Tensor | None, like: Tensor) -> Tensor:
        eye = torch.eye(self.features, dtype=q.dtype, device=q.device)
        mat = eye.expand(*q.shape[:-2], self.features, self.features)
        for k in range(self.num_householder):
            # Q <- Q H_k, so that Q = H_1 H_2 ... H_T at the end.
            v = q[..., k, :]
            vv = (v * v).sum(-1).clamp(min=torch.finfo(v.dtype).tiny)
            qv = _matvec(mat, v)
            mat = mat - 2.0 * (qv / vv.unsqueeze(-1)).unsqueeze(-1) * v.unsqueeze(-2)
        return mat


class SylvesterTriangular(Sylvester):
    """Triangular Sylvester flow: ``Q`` is the identity or the reversal permutation, ``M = D``.

    With ``Q = I`` the map is ``x = u + R tanh(Rtilde u + b)``; stacking layers that
    alternate ``Q = I`` and ``Q = reversal`` (``reverse=True``) lets every dimension
    influence every other one, as in van den Berg et al. The permutation is applied by
    flipping, never by a matrix product.

    Args:
        features: ``D``.
        reverse: use the reversal permutation as ``Q``.
        context_features: ``C``.

    References:
        van den Berg et al. 2018, arXiv:1803.05649, section 4.3.
    """

    def __init__(
        self,
        features: int,
        reverse: bool = False,
        context_features: int = 0,
        amortization: str = "residual",
    ) -> None:
        super().__init__(features, features, context_features, None, amortization)
        self.reverse = bool(reverse)

    def _q_state(self, raw: dict[str, Tensor]) -> None:
        return None

    def _apply_qt(self, q: Tensor | None, u: Tensor) -> Tensor:
        return u.flip(-1) if self.reverse else u

    def _apply_q(self, q: Tensor | None, y: Tensor) -> Tensor:
        return y.flip(-1) if self.reverse else y

    def _q_matrix(self, q: Tensor | None, like: Tensor) -> Tensor:
        eye = torch.eye(self.features, dtype=like.dtype, device=like.device)
        return eye.flip(-1) if self.reverse else eye

    def extra_repr(self) -> str:
        return f"features={self.features}, reverse={self.reverse}"


# -- builders ---------------------------------------------------------------------------


def build_planar(
    features: int,
    num_layers: int,
    hidden: int | None = None,
    context_features: int = 0,
    *,
    amortization: str = "residual",
    constraint: str = "shifted",
) -> Transform:
    """A stack of ``num_layers`` :class:`Planar` layers (sampling direction only).

    Args:
        features: ``D``.
        num_layers: number of planar layers.
        hidden: ignored (planar layers have no conditioner network); accepted so every
            family shares one builder signature.
        context_features: ``C``; with ``C > 0`` every layer is amortised (its parameters
            are per-example functions of the context).
        amortization: ``residual`` (free parameters + a zero-initialised context head:
            the identity at init) or ``linear`` (each parameter a ``Linear`` of the
            context, torch's init: van den Berg et al.'s code); see ``_AmortisedParams``.
        constraint: ``"shifted"`` (default: the identity at init) or ``"softplus"`` (the
            paper's ``-1 + softplus``); see :class:`Planar`.

    Options: ``amortization`` and ``constraint`` (any other keyword is a ``TypeError``
    naming it).

    Returns:
        A :class:`Composite` whose ``inverse`` is the flow, exactly the identity at init
        with ``residual`` amortisation and the ``shifted`` constraint.

    References:
        Rezende & Mohamed 2015, arXiv:1505.05770.
    """
    _check_builder("build_planar", features, num_layers, context_features)
    return Composite(
        Planar(features, context_features, amortization, constraint) for _ in range(num_layers)
    )


def build_radial(
    features: int,
    num_layers: int,
    hidden: int | None = None,
    context_features: int = 0,
    *,
    amortization: str = "residual",
) -> Transform:
    """A stack of ``num_layers`` :class:`Radial` layers (sampling direction only).

    Args:
        features: ``D``.
        num_layers: number of radial layers.
        hidden: ignored (no conditioner network); kept for the shared builder signature.
        context_features: ``C``; with ``C > 0`` every layer is amortised.
        amortization: ``residual`` (free parameters + a zero-initialised context head:
            the identity at init) or ``linear`` (each parameter a ``Linear`` of the
            context, torch's init: van den Berg et al.'s code); see ``_AmortisedParams``.

    Options: ``amortization`` only (any other keyword is a ``TypeError`` naming it).

    Returns:
        A :class:`Composite`, exactly the identity at init (``residual``).

    References:
        Rezende & Mohamed 2015, arXiv:1505.05770.
    """
    _check_builder("build_radial", features, num_layers, context_features)
    return Composite(Radial(features, context_features, amortization) for _ in range(num_layers))


def build_sylvester_orthogonal(
    features: int,
    num_layers: int,
    hidden: int | None = None,
    context_features: int = 0,
    *,
    num_ortho_vectors: int | None = None,
    amortization: str = "residual",
    orthogonalization: str = "qr",
) -> Transform:
    """A stack of :class:`SylvesterOrthogonal` layers (sampling direction only).

    Args:
        features: ``D``.
        num_layers: number of Sylvester layers.
        hidden: ignored (no conditioner network); kept for the shared builder signature.
        context_features: ``C``; with ``C > 0`` every layer is amortised.
        amortization: ``residual`` (free parameters + a zero-initialised context head:
            the identity at init) or ``linear`` (each parameter a ``Linear`` of the
            context, torch's init: van den Berg et al.'s code); see ``_AmortisedParams``.
        num_ortho_vectors: ``M``, columns of each ``Q`` (default ``min(D, 8)``, the
            setting of van den Berg et al.'s released examples); ``1 <= M <= D``.
        orthogonalization: ``"qr"`` (default) or ``"polar"`` (van den Berg et al.'s
            iteration, to convergence); see :class:`SylvesterOrthogonal`.

    Returns:
        A :class:`Composite`, exactly the identity at init (``residual``).

    References:
        van den Berg et al. 2018, arXiv:1803.05649.
    """
    _check_builder("build_sylvester_orthogonal", features, num_layers, context_features)
    m = min(features, 8) if num_ortho_vectors is None else num_ortho_vectors
    _check_num_vectors("build_sylvester_orthogonal: num_ortho_vectors", m, features)
    return Composite(
        SylvesterOrthogonal(features, m, context_features, amortization, orthogonalization)
        for _ in range(num_layers)
    )


def build_sylvester_householder(
    features: int,
    num_layers: int,
    hidden: int | None = None,
    context_features: int = 0,
    *,
    num_householder: int | None = None,
    amortization: str = "residual",
) -> Transform:
    """A stack of :class:`SylvesterHouseholder` layers (sampling direction only).

    Args:
        features: ``D``.
        num_layers: number of Sylvester layers.
        hidden: ignored (no conditioner network); kept for the shared builder signature.
        context_features: ``C``; with ``C > 0`` every layer is amortised.
        amortization: ``residual`` (free parameters + a zero-initialised context head:
            the identity at init) or ``linear`` (each parameter a ``Linear`` of the
            context, torch's init: van den Berg et al.'s code); see ``_AmortisedParams``.
        num_householder: ``T``, reflections per ``Q`` (default ``min(D, 8)``: ``D``
            reflections already reach every orthogonal matrix up to the sign of its
            determinant, which the flow does not depend on).

    Returns:
        A :class:`Composite`, exactly the identity at init (``residual``).

    References:
        van den Berg et al. 2018, arXiv:1803.05649.
    """
    _check_builder("build_sylvester_householder", features, num_layers, context_features)
    t = min(features, 8) if num_householder is None else num_householder
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(
            f"build_sylvester_householder: num_householder must be an int >= 1, "
            f"got {num_householder!r}"
        )
    return Composite(
        SylvesterHouseholder(features, t, context_features, amortization)
        for _ in range(num_layers)
    )


def build_sylvester_triangular(
    features: int,
    num_layers: int,
    hidden: int | None = None,
    context_features: int = 0,
    *,
    amortization: str = "residual",
) -> Transform:
    """A stack of :class:`SylvesterTriangular` layers, ``Q`` alternating identity/reversal.

    Layer ``i`` uses the reversal permutation when ``i`` is odd.

    Args:
        features: ``D``.
        num_layers: number of Sylvester layers.
        hidden: ignored (no conditioner network); kept for the shared builder signature.
        context_features: ``C``; with ``C > 0`` every layer is amortised.
        amortization: ``residual`` (free parameters + a zero-initialised context head:
            the identity at init) or ``linear`` (each parameter a ``Linear`` of the
            context, torch's init: van den Berg et al.'s code); see ``_AmortisedParams``.

    Options: ``amortization`` only (any other keyword is a ``TypeError`` naming it).

    Returns:
        A :class:`Composite`, exactly the identity at init (``residual``).

    References:
        van den Berg et al. 2018, arXiv:1803.05649.
    """
    _check_builder("build_sylvester_triangular", features, num_layers, context_features)
    return Composite(
        SylvesterTriangular(
            features,
            reverse=i % 2 == 1,
            context_features=context_features,
            amortization=amortization,
        )
        for i in range(num_layers)
    )
