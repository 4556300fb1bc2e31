"""Optimisers that papers used and torch does not ship.

:class:`AdamNormGrad` is the optimiser of Tomczak & Welling's VampPrior code (their
``utils/optimizer.py``): Adam applied to gradients that are first rescaled to unit L2 norm,
one parameter tensor at a time. It makes every tensor's step size independent of its
gradient's scale (the 500 x 784 pseudo-input matrix of a VampPrior moves like any other
tensor), which is a different dynamic from plain Adam at the same learning rate — so a
reproduction of that paper uses it.

:func:`adam_update_unless` is Adam's update (either optimiser's) written in plain tensor
operations, applied unless a device flag says skip: the optimiser step of the compiled
training step (``train.compile_step``), where torch's fused kernel cannot go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["AdamNormGrad", "NORMGRAD_EPS", "adam_update_unless"]

#: added to each gradient's norm before dividing (the VampPrior code's constant)
NORMGRAD_EPS = 1e-7


class AdamNormGrad(torch.optim.Adam):
    """Adam on per-tensor normalised gradients: ``g <- g / (||g||_2 + 1e-7)``, then Adam.

    The gradients are rescaled in place before the update (after any clipping, which
    then has no effect on the direction and none on the size), so a caller that reads
    ``p.grad`` after :meth:`step` sees the normalised gradient. Everything else — state,
    ``state_dict``, fused/foreach kernels, weight decay (applied by Adam after the
    rescaling, as in the reference code) — is :class:`torch.optim.Adam`'s.

    References:
        Tomczak & Welling 2018, "VAE with a VampPrior", AISTATS, arXiv:1705.07120 (code:
        jmtomczak/vae_vampprior, ``AdamNormGrad``).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        if grads:
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, NORMGRAD_EPS)
            torch._foreach_div_(grads, norms)
        super().step()
        return loss


@torch.no_grad()
def adam_update_unless(
    opt: torch.optim.Adam,
    params: Sequence[Sequence[Tensor]],
    grads: Sequence[Sequence[Tensor]],
    skip: Tensor,
) -> None:
    """Adam's update of ``params`` with ``grads`` (one list of each per param group of
    ``opt``), in plain tensor operations, applied only where the 0-d bool ``skip`` is false.

    The same rule as ``opt.step()`` for :class:`torch.optim.Adam` with L2 weight decay
    (``weight_decay`` added to the gradient), no ``amsgrad``, no ``maximize``, no
    decoupled decay; for :class:`AdamNormGrad` each gradient is first divided by its norm
    (+ :data:`NORMGRAD_EPS`). Bias corrections are computed in float64 from the step
    count, as the fused kernel does, so the result differs from ``opt.step()`` by float
    rounding only. It reads and writes ``opt``'s own state (``step``, ``exp_avg``,
    ``exp_avg_sq``), which must exist for every parameter (checkpoints interchange with
    ``opt.step()``); the learning rate may be a 0-d tensor (a schedule then changes it
    without recompiling). A skipped update leaves parameters, moments and step counts
    as they were, as the fused kernel does under ``found_inf``; no value is read on the
    host.

    Why not ``opt.step()``: under ``torch.compile`` dynamo does not trace into the fused
    kernel (torch 2.14 marks it ``torch.compiler.disable``; called directly its
    tensor-lr variant has no meta kernel), and only the fused kernel takes a skip flag.
    Written per tensor, the update compiles into a few fused loops. The gradients are not
    modified (the compiled step clips them functionally).

    Args:
        opt: the optimiser whose hyperparameters (``lr``, ``betas``, ``eps``,
            ``weight_decay``, per param group) and state are used.
        params: per param group, the parameters to update.
        grads: per param group, their gradients (clipped), same order.
        skip: 0-d bool tensor on the parameters' device: true leaves everything as it was.
    """
    normgrad = isinstance(opt, AdamNormGrad)
    for group, group_params, group_grads in zip(opt.param_groups, params, grads, strict=True):
        if group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay"):
            raise ValueError(
                "adam_update_unless implements Adam without amsgrad, maximize or decoupled "
                "weight decay"
            )
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for p, grad in zip(group_params, group_grads, strict=True):
            state = opt.state[p]
            step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            if normgrad:
                grad = grad / (torch.linalg.vector_norm(grad) + NORMGRAD_EPS)
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            new_step = step + 1
            m = exp_avg.lerp(grad, 1 - beta1)
            v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
            n = new_step.double()
            step_size = lr / (1 - beta1**n)
            denom = v.sqrt() / (1 - beta2**n).sqrt() + eps
            new_p = p - step_size * m / denom
            p.copy_(torch.where(skip, p, new_p))
            exp_avg.copy_(torch.where(skip, exp_avg, m))
            exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v))
            step.copy_(torch.where(skip, step, new_step))
