"""Shared pieces of the closed-form hierarchy tests (tests/test_hierarchy.py, bottom-up;
tests/test_topdown.py, top-down): the linear-Gaussian two-layer model's parameters and
exact log p(x), and the checks of the bounds against it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vaeflow.models.bounds import elbo, iwae
from vaeflow.models.posteriors import LOG_STD_BOUND

#: data size, z1 size, z2 size and the fixed std of p(x | z1) of the linear-Gaussian model
N_X, D1, D2, NOISE = 5, 3, 2, 0.7


def raw_log_std(log_std: Tensor) -> Tensor:
    """The raw head output whose soft clip (``L tanh(raw / L)``) is ``log_std``."""
    return LOG_STD_BOUND * torch.atanh(log_std / LOG_STD_BOUND)


def linear_gaussian_params() -> dict[str, Tensor]:
    """p(z2) = N(0, I), p(z1 | z2) = N(A z2 + a, diag s1^2), p(x | z1) = N(B z1 + b,
    NOISE^2 I), with A and B chosen so that the exact posterior factorises diagonally."""
    a_mat = torch.zeros(D1, D2)
    a_mat[torch.tensor([2, 0]), torch.tensor([0, 1])] = torch.tensor([1.5, -0.8])
    q, _ = torch.linalg.qr(torch.randn(N_X, D1))
    return {
        "A": a_mat,
        "a": torch.randn(D1),
        "s1": torch.tensor([0.6, 1.3, 0.9]),  # std of p(z1 | z2)
        "B": q * torch.tensor([2.0, 1.0, 0.5]),
        "b": torch.randn(N_X),
    }


def linear_gaussian_log_px(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """Exact ``log p(x)`` ``(B,)`` of the linear-Gaussian model: x is Gaussian with mean
    ``B a + b`` and covariance ``B (A A^T + diag s1^2) B^T + NOISE^2 I``."""
    c1 = p["A"] @ p["A"].T + torch.diag(p["s1"] ** 2)
    cov = p["B"] @ c1 @ p["B"].T + NOISE**2 * torch.eye(N_X)
    return torch.distributions.MultivariateNormal(p["B"] @ p["a"] + p["b"], cov).log_prob(x)


def diagonal_of(m: Tensor) -> Tensor:
    """The diagonal of ``m``, asserting that ``m`` is diagonal."""
    assert torch.allclose(m, torch.diag(torch.diagonal(m)), atol=1e-12), "not diagonal"
    return torch.diagonal(m)


def assert_mismatched_posterior_orders_the_bounds(model, x: Tensor, exact: Tensor) -> None:  # noqa: ANN001
    """With a posterior that is clearly not the exact one: E[ELBO] <= E[IWAE_10] <=
    E[IWAE_100] <= log p(x) (Monte Carlo means over 400 repeats, 3 standard errors of
    slack), the ELBO gap is visible, and the k = 5000 estimator lands within its own
    standard error (from the effective sample size) of ``exact`` (``(B,)``)."""
    reps = 400
    xr = x.repeat(reps, *([1] * (x.dim() - 1)))
    b = x.shape[0]
    means, errs = {}, {}
    for k in (1, 10, 100):
        vals = iwae(model(xr, k=k)).view(reps, b)
        means[k], errs[k] = vals.mean(0), vals.std(0) / math.sqrt(reps)
    for lo, hi in ((1, 10), (10, 100)):
        assert (means[lo] < means[hi] + 3 * (errs[lo] + errs[hi])).all(), (lo, hi, means)
    assert (means[100] > means[1] + 3 * (errs[1] + errs[100])).all(), means
    assert (means[100] <= exact + 3 * errs[100]).all()
    gap = exact - means[1]
    assert (gap > 0.05).all(), "the posterior should be clearly mismatched"
    ll = model.log_likelihood(x, k=5000, chunk=512)
    tol = 4 * torch.sqrt((ll.k / ll.ess - 1) / ll.k)
    assert (tol < 0.1 * gap).all(), "the estimator should be far tighter than the ELBO"
    assert ((ll.log_px - exact).abs() < tol).all(), (ll.log_px, exact, tol)


def assert_exact_posterior_makes_every_bound_tight(model, x: Tensor, exact: Tensor) -> None:  # noqa: ANN001
    """With the exact posterior written into ``model``: every importance weight equals
    log p(x) (``exact``, ``(B,)``), so the ELBO, the IWAE bound and the k-sample estimator
    are all exact, and the effective sample size is k."""
    terms = model(x, k=16)
    assert terms.log_weights.shape == (16, x.shape[0])
    assert torch.allclose(terms.log_weights, exact.expand(16, -1), atol=1e-12, rtol=0)
    assert torch.allclose(elbo(terms), exact, atol=1e-12, rtol=0)
    assert torch.allclose(iwae(terms), exact, atol=1e-12, rtol=0)
    ll = model.log_likelihood(x, k=100, chunk=30)
    assert torch.allclose(ll.log_px, exact, atol=1e-12, rtol=0)
    assert torch.allclose(ll.ess, torch.full_like(ll.ess, 100.0), atol=1e-8)


def assert_compiled_estimate_matches_eager(model, x: Tensor) -> Tensor:  # noqa: ANN001
    """``log_likelihood(..., compile=True)`` equals the eager estimate (same noise: inductor
    falls back to torch's random stream) to 1e-4; returns the eager ``log p(x)`` ``(B,)``."""
    from unittest import mock

    from torch._inductor import config as inductor_config

    torch.manual_seed(3)
    eager = model.log_likelihood(x, k=40, chunk=20)
    with mock.patch.object(inductor_config, "fallback_random", True):
        torch.manual_seed(3)
        compiled = model.log_likelihood(x, k=40, chunk=20, compile=True)
    for a, b in [(eager.log_px, compiled.log_px), (eager.elbo, compiled.elbo)]:
        assert torch.allclose(a, b, rtol=0, atol=1e-4), (a, b)
    return eager.log_px
