"""Reusable checks that every flow layer must pass (float64, exact where closed-form).

Each ``check_*`` function asserts and also returns the worst error it measured, so
``benchmarks/flow_exactness.py`` can print the same numbers as a table.

The checks (docs/design.md §3.7 and §7): round trip both ways, log-dets that cancel,
log-det against ``slogdet`` of a brute-force autograd Jacobian per sample, identity at
initialisation, a gradient for every parameter, no mixing across the batch, and clear
errors on wrong shapes or context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from vaeflow.flows.base import ShapeError, Transform

# Closed-form layers must agree to ~1e-13 in float64 (docs/design.md §3.1); we assert
# 1e-9 so a float32 accumulator or a dropped term fails loudly.
EXACT_TOL = 1e-9


@dataclass
class Directions:
    """Which directions a transform implements analytically."""

    forward: bool = True
    inverse: bool = True


def directions(flow: Transform, x: Tensor, context: Tensor | None) -> Directions:
    """Probe which directions exist (layers without an inverse raise NotImplementedError)."""
    d = Directions()
    try:
        flow(x, context)
    except NotImplementedError:
        d.forward = False
    try:
        flow.inverse(_out_like(flow, x), context)
    except NotImplementedError:
        d.inverse = False
    assert d.forward or d.inverse, "a transform must implement at least one direction"
    return d


def _out_like(flow: Transform, x: Tensor) -> Tensor:
    lead = x.shape[: x.dim() - flow.event_ndim]
    return torch.randn(*lead, *flow.out_event_shape, dtype=x.dtype)


@torch.no_grad()
def perturb(flow: nn.Module, scale: float = 0.3, seed: int = 1) -> nn.Module:
    """Move every parameter away from its (identity) initialisation, reproducibly.

    Identity-initialised layers would pass a log-det test trivially; the maths is only
    exercised once the conditioners produce non-zero shifts and scales.
    """
    g = torch.Generator().manual_seed(seed)
    for p in flow.parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.add_(scale * noise.to(p.device))
    for buf_name, buf in flow.named_buffers():
        # ActNorm-style flags: mark as initialised so perturbed params are not overwritten.
        if buf_name.endswith("initialized") or buf_name.endswith("initialised"):
            buf.fill_(1)
    return flow


def make_inputs(
    flow: Transform, lead: tuple[int, ...] = (2, 3), scale: float = 1.0, seed: int = 2
) -> tuple[Tensor, Tensor | None]:
    """Random ``x (*lead, *event)`` and, for conditional flows, ``context (*lead, C)``."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*lead, *flow.event_shape, generator=g)
    ctx = None
    if flow.context_features:
        ctx = torch.randn(*lead, flow.context_features, generator=g)
    return x, ctx


def check_roundtrip(
    flow: Transform, x: Tensor, context: Tensor | None, atol: float = EXACT_TOL
) -> float:
    """inverse(forward(x)) == x, forward(inverse(u)) == u, and the log-dets cancel.

    Returns the largest absolute error over points and log-dets.
    """
    u, ld_f = flow(x, context)
    x2, ld_i = flow.inverse(u, context)
    errs = [(x2 - x).abs().max().item(), (ld_f + ld_i).abs().max().item()]
    g = torch.Generator().manual_seed(3)
    u0 = torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device)
    x0, ld_i0 = flow.inverse(u0, context)
    u1, ld_f0 = flow(x0, context)
    errs += [(u1 - u0).abs().max().item(), (ld_f0 + ld_i0).abs().max().item()]
    err = max(errs)
    assert err <= atol, f"round trip error {err:.3e} > {atol:.1e} ({errs})"
    return err


def check_logdet_shape(flow: Transform, x: Tensor, context: Tensor | None, d: Directions) -> None:
    """Outputs keep every leading dim; log-dets have exactly the leading shape."""
    lead = x.shape[: x.dim() - flow.event_ndim]
    if d.forward:
        u, ld = flow(x, context)
        assert u.shape == (*lead, *flow.out_event_shape)
        assert ld.shape == lead, f"forward logabsdet shape {tuple(ld.shape)} != {tuple(lead)}"
    if d.inverse:
        xi, ld = flow.inverse(_out_like(flow, x), context)
        assert xi.shape == (*lead, *flow.event_shape)
        assert ld.shape == lead, f"inverse logabsdet shape {tuple(ld.shape)} != {tuple(lead)}"


def _single(
    fn: Callable, point: Tensor, ctx: Tensor | None, in_shape: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    y, ld = fn(point.reshape(1, *in_shape), None if ctx is None else ctx.reshape(1, -1))
    return y.reshape(-1), ld.reshape(())


def check_logdet_bruteforce(
    flow: Transform,
    x: Tensor,
    context: Tensor | None,
    inverse: bool = False,
    atol: float = EXACT_TOL,
) -> float:
    """Each sample's log-det equals ``slogdet`` of its autograd Jacobian.

    ``x`` has the direction's input shape ``(*lead, *in_event)``. Returns the worst error.
    """
    fn = flow.inverse if inverse else flow
    in_shape = flow.out_event_shape if inverse else flow.event_shape
    n_ev = len(in_shape)
    flat = x.reshape(-1, *in_shape)
    ctx = None if context is None else context.reshape(-1, context.shape[-1])
    worst = 0.0
    for i in range(flat.shape[0]):
        c = None if ctx is None else ctx[i]
        point = flat[i].reshape(-1)
        jac = torch.autograd.functional.jacobian(
            lambda v, c=c: _single(fn, v, c, in_shape)[0], point
        )
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign.abs() > 0, "Jacobian is singular"
        _, ld = _single(fn, point, c, in_shape)
        worst = max(worst, (ld - logabs).abs().item())
    assert n_ev >= 1
    assert worst <= atol, f"log-det differs from brute-force slogdet by {worst:.3e} > {atol:.1e}"
    return worst


def check_identity_at_init(
    flow: Transform, x: Tensor, context: Tensor | None, d: Directions, atol: float = 1e-12
) -> None:
    """A freshly built flow is the identity with zero log-det (docs/design.md §3.5)."""
    if d.forward:
        u, ld = flow(x, context)
        assert (u - x).abs().max().item() <= atol, "forward is not the identity at init"
        assert ld.abs().max().item() <= atol, "forward log-det is not 0 at init"
    if d.inverse:
        xi, ld = flow.inverse(x, context)
        assert (xi - x).abs().max().item() <= atol, "inverse is not the identity at init"
        assert ld.abs().max().item() <= atol, "inverse log-det is not 0 at init"


def check_gradients(flow: Transform, x: Tensor, context: Tensor | None, d: Directions) -> None:
    """Every trainable parameter gets a finite, non-zero gradient from some direction."""
    if not any(p.requires_grad for p in flow.parameters()):
        return
    flow.zero_grad()
    loss = x.new_zeros(())
    if d.forward:
        u, ld = flow(x, context)
        loss = loss + (u**2).sum() + ld.sum()
    if d.inverse:
        xi, ld = flow.inverse(_out_like(flow, x), context)
        loss = loss + (xi**2).sum() + ld.sum()
    loss.backward()
    missing = [n for n, p in flow.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    zero = [
        n
        for n, p in flow.named_parameters()
        if p.requires_grad and p.grad.abs().sum().item() == 0.0
    ]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    bad = [
        n for n, p in flow.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    assert not bad, f"non-finite gradients: {bad}"


def check_no_batch_mixing(
    flow: Transform, x: Tensor, context: Tensor | None, inverse: bool = False
) -> None:
    """Output ``b`` and log-det ``b`` depend on input ``b`` only (no BatchNorm-like leaks)."""
    fn = flow.inverse if inverse else flow
    in_shape = flow.out_event_shape if inverse else flow.event_shape
    xb = x.reshape(-1, *in_shape)[:3].detach().clone().requires_grad_(True)
    cb = None if context is None else context.reshape(-1, context.shape[-1])[:3]
    y, ld = fn(xb, cb)
    b = xb.shape[0]
    for i in range(b):
        target = y[i].sum() + ld[i]
        (g,) = torch.autograd.grad(target, xb, retain_graph=True)
        others = torch.cat([g[:i], g[i + 1 :]])
        assert others.abs().max().item() == 0.0, f"sample {i} depends on other samples"


def check_errors(flow: Transform, x: Tensor, context: Tensor | None, d: Directions) -> None:
    """Wrong shapes or context give a ShapeError that says what was expected."""
    fn = flow if d.forward else flow.inverse
    good = x if d.forward else _out_like(flow, x)
    bad = torch.cat([good, good[..., :1]], dim=-1)  # one extra trailing feature
    with pytest.raises(ShapeError, match="expected"):
        fn(bad, context)
    if flow.context_features:
        with pytest.raises(ShapeError):
            fn(good, None)
        with pytest.raises(ShapeError):
            fn(good, torch.cat([context, context[..., :1]], dim=-1))
    else:
        lead = good.shape[: good.dim() - len(flow.event_shape)]
        with pytest.raises(ShapeError):
            fn(good, torch.zeros(*lead, 2))


def check_finite(flow: Transform, x: Tensor, context: Tensor | None, d: Directions) -> None:
    """Outputs and log-dets are finite (used with large-magnitude, hypothesis-drawn inputs)."""
    if d.forward:
        u, ld = flow(x, context)
        assert u.isfinite().all() and ld.isfinite().all(), "non-finite forward output"
    if d.inverse:
        lead = x.shape[: x.dim() - flow.event_ndim]
        xi, ld = flow.inverse(x.reshape(*lead, *flow.out_event_shape), context)
        assert xi.isfinite().all() and ld.isfinite().all(), "non-finite inverse output"


def full_check(
    make: Callable[[], Transform],
    lead: tuple[int, ...] = (2, 3),
    roundtrip_atol: float = EXACT_TOL,
    logdet_atol: float = EXACT_TOL,
    identity_at_init: bool = True,
    train_mode: bool = False,
    perturb_scale: float = 0.3,
) -> dict[str, float]:
    """Run every generic check on a flow built by ``make`` and return measured errors.

    Args:
        make: builds a fresh flow (identity-initialised, float64).
        lead: leading shape of the test batch (several dims, to test broadcasting).
        roundtrip_atol: tolerance for round trips (looser only for iterative inverses).
        logdet_atol: tolerance for log-det against the brute-force Jacobian.
        identity_at_init: whether the fresh flow must be the identity.
        train_mode: run the checks with the flow in training mode (default: eval).
        perturb_scale: std of the noise added to every parameter before the checks.
    """
    fresh = make().eval()  # eval: no data-dependent init may fire during the identity check
    x, ctx = make_inputs(fresh, lead)
    d = directions(fresh, x, ctx)
    if identity_at_init:
        check_identity_at_init(fresh, x, ctx, d)
    flow = perturb(make(), scale=perturb_scale)
    flow.train(train_mode)
    check_logdet_shape(flow, x, ctx, d)
    out: dict[str, float] = {}
    if d.forward and d.inverse:
        out["roundtrip"] = check_roundtrip(flow, x, ctx, roundtrip_atol)
    errs = []
    if d.forward:
        errs.append(check_logdet_bruteforce(flow, x, ctx, atol=logdet_atol))
        check_no_batch_mixing(flow, x, ctx)
    if d.inverse:
        ui = _out_like(flow, x)
        errs.append(check_logdet_bruteforce(flow, ui, ctx, inverse=True, atol=logdet_atol))
        check_no_batch_mixing(flow, ui, ctx, inverse=True)
    out["logdet"] = max(errs)
    check_gradients(flow, x, ctx, d)
    check_errors(flow, x, ctx, d)
    return out


def gaussian_grid_integral(
    log_prob: Callable[[Tensor], Tensor], lim: float = 8.0, n: int = 400
) -> float:
    """Integrate ``exp(log_prob)`` over ``[-lim, lim]^2`` with the midpoint rule."""
    h = 2 * lim / n
    g = torch.linspace(-lim + h / 2, lim - h / 2, n)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    with torch.no_grad():
        lp = log_prob(pts)
    return (torch.exp(lp).sum() * h * h).item() if math.isfinite(h) else float("nan")


def count_made_passes(fn) -> int:
    """Number of MADE network passes while running ``fn()`` (``MADE.forward`` and the
    sequential inversions' reused conditioners both run ``MADE._pass`` once per pass)."""
    from unittest import mock

    from vaeflow.flows.autoregressive import MADE

    calls = []
    original = MADE._pass

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    with mock.patch.object(MADE, "_pass", counting):
        fn()
    return len(calls)
