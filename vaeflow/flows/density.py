"""Flows as density models: a base distribution pushed through a transform.

``FlowDensity(base, transform)`` models ``x`` with ``u = transform.forward(x)`` and
``u ~ base``, so ``log p(x) = log p_base(u) + log|det du/dx|`` (one parallel pass for
couplings and MAF). Sampling draws ``u`` and runs ``transform.inverse``.

References:
    Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows", arXiv:1505.05770.
    Papamakarios et al. 2021, arXiv:1912.02762, section 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import ShapeError, Transform, _as_event_shape, sum_except_leading

__all__ = ["StandardNormal", "DiagonalNormal", "FlowDensity"]


class StandardNormal(nn.Module):
    """Fully normalised standard normal over an event of shape ``event_shape``."""

    def __init__(self, event_shape: Sequence[int] | int) -> None:
        super().__init__()
        self.event_shape = _as_event_shape(event_shape)
        # A buffer only so that ``.to(device/dtype)`` tells us where to sample.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, u: Tensor) -> Tensor:
        """``(*, *event) -> (*)``, including the ``-D/2 log(2 pi)`` constant."""
        n = len(self.event_shape)
        if tuple(u.shape[u.dim() - n :]) != self.event_shape:
            raise ShapeError(f"StandardNormal: expected (*, {self.event_shape}), got {u.shape}")
        d = math.prod(self.event_shape)
        return -0.5 * sum_except_leading(u * u, n) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, shape: Sequence[int]) -> Tensor:
        """Draw ``(*shape, *event)`` standard normal noise on the module's device/dtype."""
        a = self._anchor
        return torch.randn(*shape, *self.event_shape, device=a.device, dtype=a.dtype)


class DiagonalNormal(StandardNormal):
    """Normal with learned per-dimension mean and log-std (initialised to N(0, I))."""

    def __init__(self, event_shape: Sequence[int] | int) -> None:
        super().__init__(event_shape)
        self.loc = nn.Parameter(torch.zeros(self.event_shape))
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    def log_prob(self, u: Tensor) -> Tensor:
        eps = (u - self.loc) * torch.exp(-self.log_scale)
        n = len(self.event_shape)
        return super().log_prob(eps) - self.log_scale.sum().expand(eps.shape[: eps.dim() - n])

    def sample(self, shape: Sequence[int]) -> Tensor:
        return self.loc + torch.exp(self.log_scale) * super().sample(shape)


class FlowDensity(nn.Module):
    """Density ``p(x | context)`` defined by a base distribution and a transform.

    Args:
        base: a module with ``log_prob(u) -> (*)`` and ``sample(shape) -> (*shape, *event)``
            whose event shape equals ``transform.out_event_shape``
            (default: :class:`StandardNormal`).
        transform: any :class:`~vaeflow.flows.base.Transform` (data -> noise).
    """

    def __init__(self, transform: Transform, base: nn.Module | None = None) -> None:
        super().__init__()
        self.transform = transform
        self.base = StandardNormal(transform.out_event_shape) if base is None else base
        if tuple(self.base.event_shape) != tuple(transform.out_event_shape):
            raise ShapeError(
                f"base event shape {self.base.event_shape} != transform output "
                f"{transform.out_event_shape}"
            )

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Exact log-density ``(*, *event) -> (*)`` in nats."""
        u, logabsdet = self.transform(x, context)
        return self.base.log_prob(u) + logabsdet

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples per context row and their log-density in one pass.

        Returns ``x (n, *ctx_lead, *event)`` and ``log p(x) (n, *ctx_lead)``, where
        ``ctx_lead`` is ``context.shape[:-1]`` (empty without context): samples first.
        """
        if n == 1 and context is not None and context.dim() > 1:
            # One sample per context row: run the flow on (*ctx_lead, *event), not on a
            # leading singleton dim (the same arithmetic with fewer reshapes per layer).
            u = self.base.sample(context.shape[:-1])
            x, ld = self.transform.inverse(u, context)
            return x.unsqueeze(0), (self.base.log_prob(u) - ld).unsqueeze(0)
        lead = (n,) if context is None else (n, *context.shape[:-1])
        u = self.base.sample(lead)
        x, ld = self.transform.inverse(u, context)
        return x, self.base.log_prob(u) - ld

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        """Draw ``n`` samples per context row: ``(n, *ctx_lead, *event)``."""
        return self.sample_and_log_prob(n, context)[0]
