"""Optimisers that papers used and torch does not ship.

:class:`AdamNormGrad` is the optimiser of Tomczak & Welling's VampPrior code (their
``utils/optimizer.py``): Adam applied to gradients that are first rescaled to unit L2 norm,
one parameter tensor at a time. It makes every tensor's step size independent of its
gradient's scale (the 500 x 784 pseudo-input matrix of a VampPrior moves like any other
tensor), which is a different dynamic from plain Adam at the same learning rate — so a
reproduction of that paper uses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["AdamNormGrad", "NORMGRAD_EPS"]

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
