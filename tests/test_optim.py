"""AdamNormGrad (the VampPrior code's optimiser) against Adam on hand-normalised gradients."""

from __future__ import annotations

import pytest
import torch

from vaeflow.run.optim import NORMGRAD_EPS, AdamNormGrad


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


@pytest.mark.parametrize("kind", ["adam", "normgrad", "iwae", "adamax"])
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
