"""Weight initialisations that papers' code used and torch's defaults do not give.

Burda et al.'s IWAE code (github.com/yburda/iwae, ``nnet.py`` and ``iwae.py``) starts
every linear layer of its networks at Glorot-uniform weights and zero biases, its Gaussian
layers with *separate* mean and log-sigma layers (each ``Glorot(H, D)``), and the
Bernoulli decoder's output bias at the logit of the training set's mean pixel. With its
Adam (beta1 = 0.99) this start matters: from torch's default init (Kaiming-uniform,
``a = sqrt(5)``) and a zero output bias, vaeflow's IWAE-architecture runs collapsed the
posterior within the first few thousand steps (validation ELBO stuck at the pixel-marginal
model's ~-206 nats); with this start they learn (experiments/burda2016_iwae/README.md).

:func:`glorot_uniform_` re-initialises the encoders, the posteriors' Gaussian heads, the
hierarchy's conditional layers and the decoder; flows and priors keep their own
initialisation (an IAF's zero-initialised last layer is what makes it start as the
identity). :func:`output_bias_from_data_` sets the Bernoulli output bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LOGIT_CLIP", "glorot_uniform_", "output_bias_from_data_"]

#: The IWAE code clips the training mean to [0.001, 0.999] before its logit.
LOGIT_CLIP = 1e-3


def _glorot_(linear: nn.Linear, fan_out: int | None = None) -> None:
    """Glorot-uniform weights ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``, zero bias.
    ``fan_out`` overrides the layer's own (for one half of a two-headed layer)."""
    fan_in = linear.in_features
    fan_out = linear.out_features if fan_out is None else fan_out
    a = (6.0 / (fan_in + fan_out)) ** 0.5
    nn.init.uniform_(linear.weight, -a, a)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _excluded(model: nn.Module) -> set[int]:
    """Ids of the modules :func:`glorot_uniform_` leaves alone: the prior's and every
    posterior flow's (and its context layer's)."""
    out: set[int] = set()
    roots: list[nn.Module] = []
    if getattr(model, "prior", None) is not None:
        roots.append(model.prior)
    for m in model.modules():
        for name in ("flow", "context"):
            sub = getattr(m, name, None)
            if isinstance(sub, nn.Module) and hasattr(m, "base"):  # a FlowPosterior
                roots.append(sub)
    for root in roots:
        out.update(id(m) for m in root.modules())
    return out


@torch.no_grad()
def glorot_uniform_(model: nn.Module) -> int:
    """Re-initialise ``model``'s networks as the IWAE code does; returns the number of
    linear layers set.

    Every ``nn.Linear`` outside the prior and the posterior flows gets Glorot-uniform
    weights and zero biases. A Gaussian head that emits ``(mu, raw log-std)`` from one
    ``Linear(H, 2D)`` (:class:`~vaeflow.models.posteriors.GaussianPosterior`,
    :class:`~vaeflow.models.hierarchy.ConditionalGaussian`) is initialised as the code's two
    separate ``Glorot(H, D)`` layers (rows ``[:D]`` and ``[D:]``).

    Only for models whose networks are linear: a convolution is an error (the code has
    none, and a mixed init would be neither the code's nor torch's).

    References:
        Glorot & Bengio 2010, AISTATS; Burda et al. 2016, arXiv:1509.00519 (code:
        ``nnet.py`` ``Linear.random``, ``iwae.py`` ``GaussianSampler.random``).
    """
    from .hierarchy import ConditionalGaussian
    from .posteriors import GaussianPosterior

    skip = _excluded(model)
    heads: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, GaussianPosterior | ConditionalGaussian) and id(m) not in skip:
            heads[id(m.head)] = m.head.out_features // 2
    count = 0
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            raise ValueError(
                "glorot_uniform_ re-initialises fully connected networks (the IWAE code's); "
                f"this model has a {type(m).__name__}: keep model.init = 'torch'"
            )
        if not isinstance(m, nn.Linear):
            continue
        half = heads.get(id(m))
        if half is None:
            _glorot_(m)
        else:
            # Two layers of the code in one: each half of the rows is a Glorot(H, D) layer.
            _glorot_(m, fan_out=half)
        count += 1
    return count


def _output_linear(decoder: nn.Module) -> nn.Linear:
    """The decoder's last module, which must be the ``nn.Linear`` emitting the logits."""
    last = list(decoder.modules())[-1]
    if not isinstance(last, nn.Linear):
        raise ValueError(
            "model.output_bias_from_data needs a decoder whose last layer is nn.Linear (the "
            f"'mlp' decoder), got {type(last).__name__}"
        )
    return last


@torch.no_grad()
def output_bias_from_data_(model: nn.Module, mean_pixel: Tensor) -> None:
    """Set the Bernoulli decoder's output bias to ``logit(clip(mean_pixel, 1e-3, 1 - 1e-3))``.

    With zero weights into it the decoder then starts as the best pixel-independent model,
    so the first steps need not spend the latent code on the marginal (the IWAE code's
    ``get_train_bias_np``).

    Args:
        model: a model whose ``decoder`` ends in the ``nn.Linear`` of the logits.
        mean_pixel: the training set's mean, in ``[0, 1]``, of the decoder's output shape
            or flattened to its ``out_features``.
    """
    last = _output_linear(model.decoder)
    p = mean_pixel.reshape(-1).to(last.bias.dtype).clamp(LOGIT_CLIP, 1 - LOGIT_CLIP)
    if p.numel() != last.out_features:
        raise ValueError(
            f"output_bias_from_data_: {p.numel()} mean pixels for {last.out_features} logits"
        )
    last.bias.copy_(torch.log(p) - torch.log1p(-p))
