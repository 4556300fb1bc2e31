"""What a run shows of its model beside the learning curves: TensorBoard image grids
(reconstructions, reconstructions from the upper layers of a hierarchy, prior samples)
and posterior statistics (means, log-stds, flow log-dets, active units after Burda et
al. 2016), each in a side pass -- the EMA weights when kept, a forked RNG -- that leaves
the training trajectory as it was (:func:`_side_pass`, under which validation and the test
curve of :mod:`vaeflow.run.train` run too)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..data import eval_batches
from ..models.vae import VAE
from .ema import EMA
from .logger import RunLogger


def _eval_context(model: nn.Module, ema: EMA | None):
    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


@contextlib.contextmanager
def _side_pass(model: nn.Module, ema: EMA | None, x: Tensor) -> Iterator[None]:
    """A pass beside training (validation, test curve, image grids): the EMA weights when
    kept, and a forked RNG (CPU, and ``x``'s GPU), so its draws do not shift the training
    trajectory -- a run's result does not depend on how often it looks (and resume stays
    exact)."""
    devices = [torch.cuda.current_device()] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices), _eval_context(model, ema):
        yield


@torch.no_grad()
def _latent_statistics(model: VAE, x: Tensor, batch_size: int, samples: int = 8) -> dict:
    """Posterior statistics on ``x``: base means/log-stds, flow log-dets, active units.

    A unit is active when the variance over ``x`` of its posterior mean ``E_q[z_d|x]``
    exceeds 0.01 (Burda et al. 2016, section 5.2); the mean is estimated with
    ``samples`` draws so flow posteriors are covered.
    """
    model.eval()
    mus, log_stds, lds, means, noise = [], [], [], [], []
    for xb in eval_batches(x, batch_size):
        s = model.posterior.sample(model.encode(xb), samples)
        mus.append(s.mu)
        log_stds.append(s.log_std)
        lds.append(s.flow_logdet.reshape(-1))
        m, v = model.posterior_mean(xb, samples)
        means.append(m)
        noise.append(v)
    model.train()
    # Noise-corrected Var_x(E_q[z|x]) (see vaeflow.run.evaluate.active_units).
    variance = torch.cat(means).double().var(0) - torch.cat(noise).double().mean(0)
    active = (variance > 0.01).sum().item()
    sizes = getattr(model, "latent_dims", ())
    per_layer = variance.split(list(sizes)) if len(sizes) > 1 else ()
    return {
        "mu": torch.cat(mus),
        "log_std": torch.cat(log_stds),
        "flow_logdet": torch.cat(lds),
        "active_units": float(active),
        # per stochastic layer of a hierarchy, bottom first (empty for one layer)
        "active_units_layers": [float((part > 0.01).sum().item()) for part in per_layer],
    }


#: At most this many "reconstruction from layer l" grids per image log (the top-down
#: CIFAR-10 model has 20 groups: 19 grids each time would bury the other images).
MAX_LAYER_GRIDS = 4


def layers_to_show(num_layers: int, at_most: int = MAX_LAYER_GRIDS) -> list[int]:
    """The layers ``l >= 2`` whose reconstructions are logged: all of them up to
    ``at_most``, else ``at_most`` spread evenly from layer 2 to the top (top included)."""
    layers = list(range(2, num_layers + 1))
    if len(layers) <= at_most:
        return layers
    picks = {layers[round(i * (len(layers) - 1) / (at_most - 1))] for i in range(at_most)}
    return sorted(picks)


def _log_images(
    model: VAE,
    ema: EMA | None,
    x: Tensor,
    logger: RunLogger,
    step: int,
    split: str = "val",
) -> None:
    """Reconstructions of ``x[:32]`` (tagged ``<split>/reconstructions``) and prior samples
    (``<split>/prior_samples_t<T>``, temperatures 1 and 0.7). A hierarchy also logs, for
    the layers ``l >= 2`` of :func:`layers_to_show`,
    ``<split>/reconstructions_from_layer<l>``: the posterior
    samples of the layers ``l`` and above kept, the layers below sampled from the prior
    conditionals (``model.reconstruct_from_layer``): what those layers alone encode.

    Both sit in the ``<split>`` tag group, next to the curves they accompany: TensorBoard
    orders tag groups by name and opens the first two, so a group of their own
    (``samples/``) sorted before ``train/`` and ``val/`` and opened the dashboard on image
    grids instead of the curves (docs/design.md §6).
    """
    with _side_pass(model, ema, x), torch.no_grad():
        model.eval()
        torch.manual_seed(step)
        x = x[:32]
        rec = model.reconstruct(x)
        grid = torch.cat([x, rec]).clamp(0, 1)
        logger.log_images(f"{split}/reconstructions", grid, step, nrow=16)
        for layer in layers_to_show(getattr(model, "num_layers", 1)):
            rec = model.reconstruct_from_layer(x, layer)
            grid = torch.cat([x, rec]).clamp(0, 1)
            logger.log_images(f"{split}/reconstructions_from_layer{layer}", grid, step, nrow=16)
        for temperature in (1.0, 0.7):
            images = model.sample(64, temperature=temperature).clamp(0, 1)
            logger.log_images(f"{split}/prior_samples_t{temperature:g}", images, step, nrow=8)
        model.train()
