"""Two-dimensional toy densities for flow demos and tests.

The four standard benchmarks of the flow literature (two moons, concentric rings, a
checkerboard and eight Gaussians on a circle, as used by e.g. Grathwohl et al. 2019,
arXiv:1810.01367, and Durkan et al. 2019, arXiv:1906.04032). Each sampler draws from a
``torch.Generator`` so train and test sets are reproducible and disjoint by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TOY_DATASETS", "sample_toy", "true_log_prob"]


def _two_moons(n: int, g: torch.Generator) -> Tensor:
    half = n // 2
    t = math.pi * torch.rand(n, generator=g)
    upper = torch.stack([torch.cos(t[:half]), torch.sin(t[:half])], dim=-1)
    lower = torch.stack([1 - torch.cos(t[half:]), 0.5 - torch.sin(t[half:])], dim=-1)
    x = torch.cat([upper, lower]) + 0.1 * torch.randn(n, 2, generator=g)
    # Centre and scale to roughly [-3, 3]^2, like the other sets.
    return (x - torch.tensor([0.5, 0.25])) * 2.0


def _rings(n: int, g: torch.Generator) -> Tensor:
    radii = torch.tensor([0.75, 1.5, 2.25, 3.0])
    which = torch.randint(0, 4, (n,), generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    r = radii[which]
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)
    return x + 0.08 * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    x1 = 4 * torch.rand(n, generator=g) - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g).to(x1.dtype)
    x2 = x2 + torch.floor(x1) % 2
    return 1.5 * torch.stack([x1, x2], dim=-1)


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = 2.5 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    which = torch.randint(0, 8, (n,), generator=g)
    return centres[which] + 0.25 * torch.randn(n, 2, generator=g)


TOY_DATASETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "two_moons": _two_moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "eight_gaussians": _eight_gaussians,
}


def sample_toy(name: str, n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw ``n`` points ``(n, 2)`` from toy density ``name`` with a fixed seed."""
    try:
        fn = TOY_DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown toy dataset {name!r}; choose from {sorted(TOY_DATASETS)}"
        ) from None
    g = torch.Generator().manual_seed(seed)
    x = fn(n, g)
    return x[torch.randperm(n, generator=g)].to(dtype)


def true_log_prob(name: str, x: Tensor) -> Tensor | None:
    """Exact log-density ``(N, 2) -> (N,)`` where it has a closed form, else ``None``.

    Known for ``eight_gaussians`` (an equal mixture of isotropic Gaussians) and
    ``checkerboard`` (uniform on 8 squares of side 1.5, so ``-log 18`` on the support).
    These give the toy experiments a ceiling to compare test log-likelihoods against.
    """
    if name == "eight_gaussians":
        angles = torch.arange(8, dtype=x.dtype) * (2 * math.pi / 8)
        centres = 2.5 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        comp = torch.distributions.Normal(centres, 0.25).log_prob(x[:, None, :]).sum(-1)
        return torch.logsumexp(comp, dim=-1) - math.log(8)
    if name == "checkerboard":
        return torch.full(x.shape[:1], -math.log(18.0), dtype=x.dtype)
    return None
