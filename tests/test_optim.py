"""The papers' optimisers: AdamNormGrad (the VampPrior code's) against Adam on
hand-normalised gradients, RMSprop with momentum, IAFAdamax (the IAF code's AdaMax)
against its update written out, and the batched update of stacked runs."""

from __future__ import annotations

import pytest
import torch

from vaeflow.run.optim import NORMGRAD_EPS, AdamNormGrad, IAFAdamax, init_state, update_unless


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
        for s in ((3, 4), (5,))
    ]


@pytest.mark.parametrize("fused", [False, True])
def test_steps_equal_adam_on_unit_norm_gradients(fused: bool) -> None:
    ours, ref = _params(0), _params(0)
    opt = AdamNormGrad(ours, lr=0.1, betas=(0.9, 0.99), eps=1e-6, fused=fused)
    ref_opt = torch.optim.Adam(ref, lr=0.1, betas=(0.9, 0.99), eps=1e-6)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) * 10**step for p in ours]
        for p, q, gr in zip(ours, ref, grads, strict=True):
            p.grad = gr.clone()
            q.grad = gr / (gr.norm() + NORMGRAD_EPS)
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_update_does_not_depend_on_the_gradient_scale() -> None:
    """With an eps that swamps a small raw gradient, a small gradient still moves its
    tensor as far as a large one (plain Adam's step shrinks with it)."""
    small, big = _params(0), _params(0)
    for params, scale in ((small, 1e-2), (big, 1e4)):
        opt = AdamNormGrad(params, lr=0.01, eps=1e-3)  # eps that would swamp a tiny raw gradient
        for p in params:
            p.grad = torch.ones_like(p) * scale
        opt.step()
    for p, q in zip(small, big, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8)  # up to the 1e-7 in the norm
    # Plain Adam with the same eps moves the tiny-gradient tensor far less.
    plain = _params(0)
    opt = torch.optim.Adam(plain, lr=0.01, eps=1e-3)
    for p in plain:
        p.grad = torch.ones_like(p) * 1e-6
    opt.step()  # step ~ lr * 1e-6 / 1e-3
    start = _params(0)
    assert (plain[0] - start[0]).abs().max() < 0.01 * (small[0] - start[0]).abs().max()


def test_rmsprop_with_momentum_follows_its_update_rule() -> None:
    """train.optimizer = "rmsprop" (Rezende & Mohamed 2015: RMSprop with momentum) builds
    torch's RMSprop with train.momentum / alpha / eps / lr, and three steps equal the
    update written out by hand: v = a v + (1 - a) g^2, b = m b + g / (sqrt(v) + eps),
    p -= lr b."""
    from vaeflow.config import load_config
    from vaeflow.run.train import _optimizer

    sets = ['train.optimizer="rmsprop"', "train.momentum=0.9", "train.alpha=0.95"]
    cfg = load_config(None, [*sets, "train.lr=0.01", "train.eps=1e-6"])
    params = _params(0)
    holder = torch.nn.ParameterList(params)  # _optimizer takes the model
    opt = _optimizer(cfg, holder)
    assert isinstance(opt, torch.optim.RMSprop)
    group = opt.param_groups[0]
    assert (group["momentum"], group["alpha"], group["eps"], group["lr"]) == (
        0.9,
        0.95,
        1e-6,
        0.01,
    )
    ref = [p.detach().clone() for p in params]
    v = [torch.zeros_like(p) for p in ref]
    buf = [torch.zeros_like(p) for p in ref]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ref]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        opt.step()
        for i, grad in enumerate(grads):
            v[i] = 0.95 * v[i] + 0.05 * grad**2
            buf[i] = 0.9 * buf[i] + grad / (v[i].sqrt() + 1e-6)
            ref[i] = ref[i] - 0.01 * buf[i]
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["adam", "normgrad", "iwae", "adamax", "adamax_iaf"])
@pytest.mark.parametrize("shape", [(5, 7), ()])
def test_masked_update_of_stacked_runs_equals_each_run_alone_in_float32(kind, shape) -> None:
    """``masked_update`` on ``(N, *shape)`` tensors with per-run float64 hyperparameters
    and skips (how ``stack_optim`` calls it) gives each run exactly what the call on its
    own tensor with Python-float hyperparameters gives (the solo compiled step's call):
    float32, where computing ``1 - beta`` after the cast to float32 would already differ."""
    from vaeflow.run.optim import masked_update

    g = torch.Generator().manual_seed(0)
    n = 3
    hyper = {  # per run: lr, beta1, beta2, eps, weight decay (IWAEAdam has none)
        "lr": [1e-3, 3e-4, 2e-2],
        "beta1": [0.9, 0.99, 0.5],
        "beta2": [0.999, 0.9999, 0.99],
        "eps": [1e-8, 1e-4, 1e-6],
        "wd": [0.0, 0.1, 1e-3],
    }
    skip = [False, True, False]
    p = torch.randn(n, *shape, generator=g)
    grad = torch.randn(n, *shape, generator=g)
    m = torch.randn(n, *shape, generator=g) * 0.1
    v = torch.rand(n, *shape, generator=g) + 0.5
    step = torch.tensor([0.0, 3.0, 10.0])
    solo = [(p[i].clone(), m[i].clone(), v[i].clone(), step[i].clone()) for i in range(n)]
    for i, (ps, ms, vs, ss) in enumerate(solo):
        masked_update(
            kind, ps, grad[i], ss, ms, vs,
            *(hyper[k][i] for k in ("lr", "beta1", "beta2", "eps", "wd")),
            torch.tensor(skip[i]),
        )  # fmt: skip
    view = (-1, *[1] * len(shape))
    per_run = [torch.tensor(hyper[k], dtype=torch.float64).view(view) for k in hyper]
    masked_update(
        kind, p, grad, step.view(view), m, v, *per_run, torch.tensor(skip).view(view),
        norm_dims=tuple(range(1, 1 + len(shape))),
    )  # fmt: skip
    for i, (ps, ms, vs, ss) in enumerate(solo):
        torch.testing.assert_close(p[i], ps, rtol=0, atol=0)
        torch.testing.assert_close(m[i], ms, rtol=0, atol=0)
        torch.testing.assert_close(v[i], vs, rtol=0, atol=0)
        assert step[i] == ss
    assert not torch.equal(p[0], solo[1][0])  # (the runs really differ)


def test_iaf_adamax_follows_the_iaf_codes_update_rule() -> None:
    """IAFAdamax against the IAF code's AdaMax written out (Theano ``AdaMaxAvg``, in torch's
    sign convention): ``m = b1 m + (1 - b1) g``, ``u = max(b2 u, |g| + eps)``,
    ``w -= lr m / u``, no bias correction; float64, five steps with weight decay. Its
    first step moves each weight by ``(1 - b1) lr sign(g)``, a tenth of torch's Adamax."""
    lr, b1, b2, eps, wd = 2e-3, 0.9, 0.999, 1e-8, 0.01
    params = _params(0)
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(r) for r in ref]
    u = [torch.zeros_like(r) for r in ref]
    opt = IAFAdamax(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    torch_adamax = [p.detach().clone().requires_grad_() for p in _params(0)]
    plain = torch.optim.Adamax(torch_adamax, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [
            torch.randn(r.shape, generator=g, dtype=torch.float64) * 10**i
            for i, r in enumerate(ref)
        ]
        for p, q, gr in zip(params, torch_adamax, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        first = [p.detach().clone() for p in params]
        opt.step()
        plain.step()
        for i, gr in enumerate(grads):
            gr = gr + wd * ref[i]
            m[i] = b1 * m[i] + (1 - b1) * gr
            u[i] = torch.maximum(b2 * u[i], gr.abs() + eps)
            ref[i] = ref[i] - lr * m[i] / u[i]
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-13, atol=1e-15)
        if step == 0:
            for p, f, q in zip(params, first, torch_adamax, strict=True):
                moved = (p.detach() - f).abs()
                torch.testing.assert_close(
                    moved, torch.full_like(moved, (1 - b1) * lr), rtol=1e-6, atol=0
                )
                assert not torch.allclose(q.detach(), p.detach())  # torch's moved 10x as far
    assert opt.state[params[0]]["step"] == 5


def test_iaf_adamax_update_unless_equals_its_step() -> None:
    """The compiled step's update (``update_unless``, rule ``"adamax_iaf"``) gives what
    ``IAFAdamax.step`` gives, and a skipped update changes nothing."""
    a, b = _params(2), _params(2)
    opt_a = IAFAdamax(a, lr=1e-2, weight_decay=0.1)
    opt_b = IAFAdamax(b, lr=1e-2, weight_decay=0.1)
    init_state(opt_b)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in a]
        for p, gr in zip(a, grads, strict=True):
            p.grad = gr
        opt_a.step()
        skip = torch.tensor(step == 2)
        before = [p.detach().clone() for p in b]
        update_unless(opt_b, [b], [grads], skip)
        if step == 2:  # skipped: redo it unskipped so that both saw the same updates
            for p, q in zip(b, before, strict=True):
                assert torch.equal(p.detach(), q)
            update_unless(opt_b, [b], [grads], torch.tensor(False))
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"])
        torch.testing.assert_close(opt_a.state[p]["exp_inf"], opt_b.state[q]["exp_inf"])
