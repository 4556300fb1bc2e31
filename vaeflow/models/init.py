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

Tomczak & Welling's VampPrior code (github.com/jmtomczak/vae_vampprior, ``utils/nn.py``
``he_init``, applied in ``models/VAE.py`` to every ``nn.Linear`` of the VAE before the
pseudo-inputs are added) draws the weights from ``N(0, 2 / fan_in)`` and leaves the
biases at torch's default: :func:`he_normal_`. Its standard deviation is sqrt(6) = 2.45x
that of torch's default (Kaiming-uniform, ``a = sqrt(5)``: ``U(-1/sqrt(fan_in), ...)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "IWAE_CODE_SEED",
    "LOGIT_CLIP",
    "glorot_uniform_",
    "he_normal_",
    "output_bias_from_data_",
]

#: The IWAE code draws every linear layer from a fresh ``numpy.random.RandomState(123)``.
IWAE_CODE_SEED = 123

#: The IWAE code clips the training mean to [0.001, 0.999] before its logit.
LOGIT_CLIP = 1e-3


def _iwae_code_draw(fan_in: int, fan_out: int) -> Tensor:
    """The IWAE code's weights of a ``fan_in -> fan_out`` layer, in torch's ``(out, in)``
    layout: ``RandomState(123).uniform(-a, a, size=(in, out))`` transposed (``nnet.py``
    ``Linear.random``: a fresh generator with the same seed for every layer)."""
    import numpy as np

    a = (6.0 / (fan_in + fan_out)) ** 0.5
    w = np.random.RandomState(IWAE_CODE_SEED).uniform(low=-a, high=a, size=(fan_in, fan_out))
    return torch.from_numpy(w.T.copy())


def _glorot_(linear: nn.Linear, halves: int = 1, code_draws: bool = False) -> None:
    """Glorot-uniform weights ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``, zero bias.

    ``halves = 2``: the rows are two layers of ``out / 2`` outputs each (a Gaussian head's
    mean and log-std), each initialised as its own layer. ``code_draws``: the IWAE code's
    draws (:func:`_iwae_code_draw`), so equal-shaped layers -- the two halves among them --
    start with identical weights."""
    fan_in = linear.in_features
    fan_out = linear.out_features // halves
    a = (6.0 / (fan_in + fan_out)) ** 0.5
    for rows in linear.weight.split(fan_out, dim=0):
        if code_draws:
            rows.copy_(_iwae_code_draw(fan_in, fan_out).to(rows.dtype))
        else:
            nn.init.uniform_(rows, -a, a)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _check_plain(m: nn.Linear, what: str) -> None:
    """Refuse a weight-normalised linear layer: its weight is computed (``g v / |v|``), so
    writing into ``m.weight`` would be lost (torch's parametrisation) or only set the
    direction (``IAFCodeLinear``), silently leaving the layer as built."""
    from ..layers import IAFCodeLinear

    if nn.utils.parametrize.is_parametrized(m) or isinstance(m, IAFCodeLinear):
        raise ValueError(
            f"{what} sets plain weights, but this model has a weight-normalised "
            f"{type(m).__name__} (weight = g v / |v|) outside its prior and flows; turn "
            "its weight_norm off or keep model.init = 'torch'"
        )


def _excluded(model: nn.Module) -> set[int]:
    """Ids of the modules :func:`glorot_uniform_` and :func:`he_normal_` leave alone: the
    prior's and every posterior flow's (and its context layer's)."""
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
def glorot_uniform_(model: nn.Module, code_draws: bool = False) -> int:
    """Re-initialise ``model``'s networks as the IWAE code does; returns the number of
    linear layers set.

    Every ``nn.Linear`` outside the prior and the posterior flows gets Glorot-uniform
    weights and zero biases. A Gaussian head that emits ``(mu, raw log-std)`` from one
    ``Linear(H, 2D)`` (:class:`~vaeflow.models.posteriors.GaussianPosterior`,
    :class:`~vaeflow.models.hierarchy.ConditionalGaussian`) is initialised as the code's two
    separate ``Glorot(H, D)`` layers (rows ``[:D]`` and ``[D:]``).

    ``code_draws``: not only the code's distribution but its very draws: every layer's
    weights come from a fresh ``numpy.random.RandomState(123)`` (its ``nnet.py`` seeds each
    layer alike), so layers of equal shape start identical -- a Gaussian layer's mean and
    log-sigma weights among them (log sigma = mu, unit by unit, at init) -- and the
    others share their leading draws. Deterministic: the torch seed plays no part.

    Only for models whose networks are plain linear layers: a convolution or a gated
    layer (value and gate fused in one ``Linear``; the IWAE code has neither) is an error,
    as a mixed init would be neither the code's nor torch's.

    References:
        Glorot & Bengio 2010, AISTATS; Burda et al. 2016, arXiv:1509.00519 (code:
        ``nnet.py`` ``Linear.random``, ``iwae.py`` ``GaussianSampler.random``).
    """
    from ..layers import GatedLinear
    from .hierarchy import ConditionalGaussian
    from .posteriors import GaussianPosterior

    skip = _excluded(model)
    heads = {
        id(m.head)
        for m in model.modules()
        if isinstance(m, GaussianPosterior | ConditionalGaussian) and id(m) not in skip
    }
    count = 0
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.modules.conv._ConvNd | GatedLinear):
            raise ValueError(
                "glorot_uniform_ re-initialises plain fully connected networks (the IWAE "
                f"code's); this model has a {type(m).__name__}: keep model.init = 'torch'"
            )
        if not isinstance(m, nn.Linear):
            continue
        _check_plain(m, "glorot_uniform_")
        # A Gaussian head is two layers of the code in one: each half of the rows is a
        # Glorot(H, D) layer of its own.
        _glorot_(m, halves=2 if id(m) in heads else 1, code_draws=code_draws)
        count += 1
    return count


@torch.no_grad()
def he_normal_(model: nn.Module) -> int:
    """Re-initialise ``model``'s networks as the VampPrior code does; returns the number of
    linear layers set.

    Every ``nn.Linear`` outside the prior and the posterior flows -- the encoder's, the
    decoder's, the posterior's Gaussian head, the hierarchy's conditional layers -- gets
    weights ``N(0, 2 / fan_in)``; biases keep their initialisation. A gated layer's one
    ``Linear`` (value and gate fused) and a Gaussian head's one ``Linear`` (mean and scale
    fused) are the code's two layers each: every row has the same ``fan_in``, so the
    fused draw is the code's distribution. The VampPrior's pseudo-inputs belong to the
    prior and keep their own init (the code adds them after ``he_init``); its encoder is
    the VAE's, initialised here once.

    Convolutions keep their initialisation, as in the code's convolutional models, which
    apply ``he_init`` to ``nn.Linear`` alone. A weight-normalised linear layer is an
    error (its weight is computed; see :func:`_check_plain`).

    References:
        He et al. 2015, "Delving deep into rectifiers", ICCV, arXiv:1502.01852; Tomczak &
        Welling 2018, arXiv:1705.07120 (code: ``utils/nn.py`` ``he_init``).
    """
    skip = _excluded(model)
    count = 0
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Linear):
            _check_plain(m, "he_normal_")
            nn.init.normal_(m.weight, 0.0, (2.0 / m.in_features) ** 0.5)
            count += 1
    return count


def _output_linear(decoder: nn.Module) -> nn.Linear:
    """The decoder's last module, which must be the ``nn.Linear`` emitting the logits."""
    last = list(decoder.modules())[-1]
    if not isinstance(last, nn.Linear):
        raise ValueError(
            "the output bias is set on a decoder whose last layer is nn.Linear (the 'mlp' "
            f"decoder), got {type(last).__name__}"
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
