"""Config -> model: assemble any encoder x posterior x prior x decoder x likelihood by name.

Each piece is looked up in its own small registry (``ENCODERS``/``DECODERS`` in
:mod:`vaeflow.models.networks`, ``FLOWS``, ``PRIORS``, ``LIKELIHOODS``): no if/elif ladders, and an
unknown name is an error that lists the names that exist.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, PosteriorConfig, PriorConfig
from ..flows.base import Transform
from ..flows.registry import FLOWS, build_flow, flow_names
from ..layers import ACTIVATIONS, suspend_data_init
from .hierarchy import BottomUpVAE, ConditionalGaussian, deterministic_net
from .init import glorot_uniform_, he_normal_
from .likelihoods import build_likelihood
from .networks import build_decoder, build_encoder
from .posteriors import FlowPosterior, GaussianPosterior
from .priors import FlowPrior, build_prior
from .topdown import ConvHead, ConvStem, LearnedTop, TopDownVAE, resnet_topdown_layers
from .vae import VAE

__all__ = ["build_model", "build_posterior", "build_prior_for"]


def _check_data_init_direction(flow: str, options: dict, direction: str, where: str) -> None:
    """A flow's ``options.weight_norm`` (a data-initialised MADE) needs the model to use
    the flow in its one-pass direction: the init pass sets each layer from one network
    pass, and a sequential inversion would only read the layers, never set them."""
    if not options.get("weight_norm"):
        return
    one_pass = FLOWS[flow].one_pass if flow in FLOWS else "both"
    if one_pass not in ("both", direction):
        use = "a posterior samples" if direction == "sampling" else "a prior scores densities"
        raise ConfigError(
            f"{where}.options.weight_norm = {options['weight_norm']!r}: {use} through "
            f"{flow!r} sequentially, where its data-dependent init cannot run; use the flow "
            f"whose {direction} direction is one pass (iaf for a posterior, maf for a "
            "prior) or drop the option"
        )


def build_posterior(
    cfg: PosteriorConfig, in_features: int, latent_dim: int, where: str = "model.posterior"
) -> nn.Module:
    """A diagonal Gaussian (``cfg.flow is None``) or a Gaussian + registry flow; ``where``
    names the config section in errors (``model.upper_layers[i].posterior`` for a
    hierarchy's upper layer)."""
    if cfg.flow is None:
        return GaussianPosterior(in_features, latent_dim, cfg.scale, cfg.weight_norm)
    _check_data_init_direction(cfg.flow, cfg.options, "sampling", where)
    try:
        flow = _posterior_flow(cfg, latent_dim)
    except ConfigError:
        raise  # already names its key
    except (ValueError, TypeError) as e:  # the flow's own argument checks (and options)
        raise ConfigError(f"{where}: {e}") from None
    try:
        return FlowPosterior(
            in_features, latent_dim, flow, cfg.scale, cfg.context_projection, cfg.weight_norm
        )
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _posterior_flow(cfg: PosteriorConfig, latent_dim: int) -> Transform:
    """The registry flow of ``cfg`` on ``latent_dim`` features: a vector flow with a
    sampling direction (``cfg.flow`` must be set)."""
    sampling = [n for n in flow_names("vector") if FLOWS[n].sampling]
    if cfg.flow not in sampling:
        raise ConfigError(
            f"model.posterior.flow = {cfg.flow!r} is not a vector flow with a sampling "
            f"direction; choose from {sampling}"
        )
    return build_flow(
        cfg.flow, latent_dim, cfg.num_layers, cfg.hidden, cfg.context_features, **cfg.options
    )


def _group_flow(cfg: PosteriorConfig, latent_shape: tuple[int, int, int]) -> Transform:
    """A top-down group's posterior flow: an image flow that takes a context map on the
    whole ``(Z, H, W)`` group (``conv_iaf``, the paper's), or a vector flow on its ``Z``
    channels run at every position (:class:`~vaeflow.models.topdown.TopDownLayer`)."""
    name = cfg.flow
    if name in FLOWS and FLOWS[name].data == "image" and FLOWS[name].sampling:
        try:
            flow = build_flow(
                name, latent_shape, cfg.num_layers, cfg.hidden, cfg.context_features, **cfg.options
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.posterior ({name!r} on {latent_shape}): {e}") from None
        if flow.takes_context_map or not cfg.context_features:
            return flow
    if name in FLOWS and FLOWS[name].data == "image":
        maps = [n for n in flow_names("image") if FLOWS[n].sampling]
        raise ConfigError(
            f"model.posterior.flow = {name!r}: a group's context is a feature map, which "
            f"this image flow does not take; use a vector flow or one of {maps} that takes "
            "maps (conv_iaf), or context_features = 0"
        )
    return _posterior_flow(cfg, latent_shape[0])


class _BaseEncode(nn.Module):
    """Maps pseudo-inputs to the posterior base's Gaussian ``(mu, log_std)`` (VampPrior).

    Holds references to modules owned by the VAE without registering them, so the VAE's
    ``state_dict`` lists every parameter once.
    """

    def __init__(self, encoder: nn.Module, base: GaussianPosterior) -> None:
        super().__init__()
        object.__setattr__(self, "_refs", (encoder, base))

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        encoder, base = self._refs
        # The data-dependent init pass sets these layers from the data; the pseudo-inputs
        # must not set them again (the last call would win).
        with suspend_data_init():
            return base.params(encoder(u))

    def read_tensors(self) -> list[Tensor]:
        """The parameters and buffers it reads (VampPrior keys its cache on them)."""
        return [t for m in self._refs for t in (*m.parameters(), *m.buffers())]


def build_prior_for(
    cfg: PriorConfig,
    latent_dim: int,
    x_shape: tuple[int, ...],
    encoder: nn.Module,
    posterior: nn.Module,
) -> nn.Module:
    """The prior of ``cfg``; a VampPrior reuses the encoder and the posterior's base."""
    if cfg.name == "flow":
        if cfg.flow is None:
            raise ConfigError("model.prior.name = 'flow' needs model.prior.flow (a flow name)")
        _check_data_init_direction(cfg.flow, cfg.options, "density", "model.prior")
        return FlowPrior.from_registry(
            latent_dim, cfg.flow, cfg.num_layers, cfg.hidden, **cfg.options
        )
    if cfg.flow is not None:
        raise ConfigError(
            f"model.prior.flow = {cfg.flow!r} is only used with model.prior.name = 'flow'"
        )
    kwargs = dict(cfg.options)
    if cfg.name in ("mog", "vamp"):
        kwargs["num_components"] = cfg.num_components
    if cfg.name == "vamp":
        base = posterior.base if isinstance(posterior, FlowPosterior) else posterior
        kwargs["encode"] = _BaseEncode(encoder, base)
        kwargs["pseudo_input_shape"] = x_shape
    return build_prior(cfg.name, latent_dim, **kwargs)


def build_model(cfg: ModelConfig) -> VAE | BottomUpVAE | TopDownVAE:
    """Assemble the VAE described by ``cfg`` (see :class:`~vaeflow.config.ModelConfig`):
    a :class:`~vaeflow.models.hierarchy.BottomUpVAE` when ``cfg.upper_layers`` is set, a
    :class:`~vaeflow.models.topdown.TopDownVAE` when ``cfg.topdown`` is; ``cfg.init``
    re-initialises its networks (the data-dependent output bias is set by the training
    run, which has the data)."""
    model = _build_model(cfg)
    if cfg.init in ("glorot_uniform", "iwae_code"):
        try:
            glorot_uniform_(model, code_draws=cfg.init == "iwae_code")
        except ValueError as e:
            raise ConfigError(f"model.init = {cfg.init!r}: {e}") from None
    elif cfg.init == "he_normal":
        try:
            he_normal_(model)
        except ValueError as e:
            raise ConfigError(f"model.init = {cfg.init!r}: {e}") from None
    return model


def _build_model(cfg: ModelConfig) -> VAE | BottomUpVAE | TopDownVAE:
    options = {"event_ndim": len(cfg.x_shape), **cfg.likelihood_options}
    if cfg.likelihood_options.get("scale") == "per_channel":
        # A likelihood with one learned parameter per channel learns its count from the data.
        options.setdefault("num_channels", cfg.x_shape[0])
    likelihood = build_likelihood(cfg.likelihood, **options)
    param_shape = likelihood.param_shape(tuple(cfg.x_shape))
    if cfg.topdown is not None:
        return _build_topdown(cfg, likelihood, param_shape)
    encoder = build_encoder(cfg.encoder.name, tuple(cfg.x_shape), **cfg.encoder.options)
    decoder = build_decoder(cfg.decoder.name, cfg.latent_dim, param_shape, **cfg.decoder.options)
    posterior = build_posterior(cfg.posterior, encoder.out_features, cfg.latent_dim)
    if cfg.upper_layers:
        return _build_hierarchy(cfg, encoder, posterior, decoder, likelihood)
    prior = build_prior_for(cfg.prior, cfg.latent_dim, tuple(cfg.x_shape), encoder, posterior)
    return VAE(encoder, posterior, prior, decoder, likelihood, cfg.x_shape)


def _build_hierarchy(
    cfg: ModelConfig,
    encoder: nn.Module,
    posterior: nn.Module,
    decoder: nn.Module,
    likelihood: nn.Module,
) -> BottomUpVAE:
    """The bottom-up hierarchy of ``cfg.upper_layers`` above ``z_1`` (Burda et al. 2016):
    per layer an inference network ``z_{l-1} -> h`` with ``layer.posterior`` on top, and a
    generative network ``z_l -> h`` (the widths reversed) with a conditional Gaussian."""
    if cfg.prior.name == "vamp":
        raise ConfigError(
            "model.prior.name = 'vamp' is not supported with model.upper_layers (its "
            "pseudo-inputs are encoded into z_1, not into the top layer); choose another prior"
        )
    encoders, posteriors, conditionals = [encoder], [posterior], []
    below = cfg.latent_dim
    for i, layer in enumerate(cfg.upper_layers):
        where = f"model.upper_layers[{i}]"
        if layer.latent_dim < 1 or not layer.hidden or min(layer.hidden) < 1:
            raise ConfigError(
                f"{where}: latent_dim and every hidden width must be >= 1 (and hidden "
                f"non-empty), got latent_dim={layer.latent_dim}, hidden={list(layer.hidden)}"
            )
        try:
            up = deterministic_net(below, layer.hidden, layer.activation)
            down = deterministic_net(layer.latent_dim, layer.hidden[::-1], layer.activation)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{where}.activation: {e}") from None
        encoders.append(up)
        posteriors.append(
            build_posterior(
                layer.posterior, up.out_features, layer.latent_dim, f"{where}.posterior"
            )
        )
        conditionals.append(ConditionalGaussian(down, down.out_features, below))
        below = layer.latent_dim
    prior = build_prior_for(cfg.prior, below, tuple(cfg.x_shape), encoder, posterior)
    return BottomUpVAE(encoders, posteriors, conditionals, prior, decoder, likelihood, cfg.x_shape)


def _build_topdown(
    cfg: ModelConfig, likelihood: nn.Module, param_shape: tuple[int, ...]
) -> TopDownVAE:
    """The ResNet VAE with bidirectional inference of ``cfg.topdown`` (Kingma et al. 2016,
    appendix C; github.com/openai/iaf ``tf_train.py``): a 5x5 stride-2 input conv, the
    stochastic layers of ``layers_per_resolution``, a 5x5 stride-2 transposed output conv;
    every group's posterior is ``cfg.posterior`` on its ``latent_channels``."""
    td, post = cfg.topdown, cfg.posterior
    if post.scale != "log_std":
        raise ConfigError(
            f"model.posterior.scale = {post.scale!r}: the top-down model's groups "
            "parameterise their scales themselves (log sigma); remove model.posterior.scale"
        )
    if post.weight_norm is not False:
        raise ConfigError(
            f"model.posterior.weight_norm = {post.weight_norm!r}: the top-down model's "
            "groups have no dense head (their convs follow model.topdown.weight_norm); "
            "remove model.posterior.weight_norm"
        )
    c, h, w = cfg.x_shape
    if td.activation not in ACTIVATIONS:
        raise ConfigError(
            f"model.topdown.activation = {td.activation!r}; choose from {sorted(ACTIVATIONS)}"
        )
    flow = post.flow is not None

    def make_flow(latent_shape: tuple[int, int, int]) -> Transform | None:
        return _group_flow(post, latent_shape) if flow else None

    layers = resnet_topdown_layers(
        td.channels,
        td.latent_channels,
        td.layers_per_resolution,
        (h // 2, w // 2),
        make_flow,
        post.context_features if flow else 0,
        td.activation,
        td.weight_norm,
        td.residual_scale,
    )
    top_size = (h // 2 ** len(td.layers_per_resolution), w // 2 ** len(td.layers_per_resolution))
    return TopDownVAE(
        ConvStem(c, td.channels, td.weight_norm, td.center),
        layers,
        LearnedTop(td.channels, top_size),
        ConvHead(td.channels, param_shape[0], td.activation, td.weight_norm),
        likelihood,
        cfg.x_shape,
    )
