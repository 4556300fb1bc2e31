"""Typed, frozen configuration: dataclasses with defaults, built from plain dicts.

Plain dicts (from TOML or JSON) become nested frozen dataclasses through
:func:`from_dict`, which rejects unknown keys and wrong types with a message naming the
key and what is allowed — never vdvae's silent ``None`` for a typo, never ``eval``.
:func:`to_dict` goes back to plain dicts for ``config.json`` and checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "ConfigError",
    "NetConfig",
    "PosteriorConfig",
    "PriorConfig",
    "ModelConfig",
    "StochasticLayerConfig",
    "TopDownConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "Config",
    "from_dict",
    "to_dict",
    "load_config",
    "read_toml",
    "apply_overrides",
    "validate",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the allowed values."""


@dataclass(frozen=True)
class NetConfig:
    """An encoder or decoder network: a name from ``vaeflow.models.networks.ENCODERS``/``DECODERS``
    and keyword options passed to its constructor."""

    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PosteriorConfig:
    """q(z|x): a diagonal Gaussian, optionally followed by a flow from the registry.

    Attributes:
        flow: a name from ``vaeflow.flows.FLOWS`` with a sampling direction, or ``None``
            for the plain diagonal Gaussian.
        num_layers: flow layers.
        hidden: width of the flow's conditioner networks.
        context_features: width of the context vector the flow receives (a learned
            projection of the encoder features); 0 for an unconditional flow.
        options: family-specific flow options.
        scale: how the Gaussian's scale is parameterised (the head's output):
            ``log_std`` (soft-clipped log sigma, the default), ``softplus_var`` (sigma^2 =
            softplus, the Sylvester-flow code) or ``log_var_hardtanh`` (log sigma^2 clamped
            to [-6, 2], the VampPrior code); :func:`vaeflow.models.posteriors.log_std_from_raw`.
            Not for the top-down model (its groups have their own heads).
        context_projection: ``true``: the flow's context is a learned ``Linear`` of the
            encoder features; ``false``: the features themselves (``context_features``
            must equal the encoder's width; van den Berg et al.'s code).
        weight_norm: the Gaussian head's and the context projection's: ``false`` (plain
            ``Linear``), ``true`` (torch's weight norm) or ``"iaf_code"`` (the IAF code's
            dense layer, :class:`~vaeflow.layers.IAFCodeLinear`, initialised from the first
            training batch to outputs of scale 0.1, so that q starts near N(0, I); Kingma
            et al. 2016, appendix B: "the whole network" weight-normalised; sigma starts
            near 1 with the ``log_std`` and ``log_var_hardtanh`` heads, near 0.83 with
            ``softplus_var``). A flow's own networks take theirs in ``options``
            (``iaf``/``maf``: ``weight_norm``, in their one-pass direction: an ``iaf``
            posterior, a ``maf`` prior). Not for the top-down model (its groups have their
            own heads).
    """

    flow: str | None = None
    num_layers: int = 4
    hidden: int = 64
    context_features: int = 32
    options: dict[str, Any] = field(default_factory=dict)
    scale: Literal["log_std", "softplus_var", "log_var_hardtanh"] = "log_std"
    context_projection: bool = True
    weight_norm: bool | Literal["iaf_code"] = False


@dataclass(frozen=True)
class PriorConfig:
    """p(z): ``standard_normal``, ``learned_gaussian``, ``mog``, ``vamp`` or ``flow``.

    Attributes:
        name: prior family (see ``vaeflow.models.priors.PRIORS``).
        flow: for ``name = "flow"``: a registry flow with a density direction.
        num_layers: flow layers.
        hidden: flow conditioner width.
        num_components: mixture components (``mog``) or pseudo-inputs (``vamp``).
        init_from_data: ``vamp`` only: the pseudo-inputs start as ``K`` random training
            images plus N(0, 0.01) noise (the VampPrior code's ``use_training_data_init``)
            instead of N(init_mean, init_std) pixels.
        options: family-specific options (flow options for ``flow``).
    """

    name: str = "standard_normal"
    flow: str | None = None
    num_layers: int = 4
    hidden: int = 64
    num_components: int = 500
    init_from_data: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StochasticLayerConfig:
    """A stochastic layer above ``z_1`` of a bottom-up hierarchy (Burda et al. 2016,
    arXiv:1509.00519, section 5; :class:`vaeflow.models.hierarchy.BottomUpVAE`).

    Attributes:
        latent_dim: size ``D_l`` of this layer's latent ``z_l``.
        hidden: widths of the deterministic layers between ``z_{l-1}`` and ``z_l``: the
            inference network of ``q(z_l | z_{l-1})`` uses them bottom-up, the generative
            network of ``p(z_{l-1} | z_l)`` in reverse (Burda: ``[50, 50]`` both ways).
        activation: of those deterministic layers.
        posterior: ``q(z_l | z_{l-1})``: a diagonal Gaussian, optionally with a flow
            conditioned on the inference network's features.
    """

    latent_dim: int = 50
    hidden: tuple[int, ...] = (50, 50)
    activation: str = "tanh"
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)


@dataclass(frozen=True)
class TopDownConfig:
    """The ResNet VAE with bidirectional (top-down) inference of Kingma et al. 2016
    (arXiv:1606.04934, sec. 6, appendix C; :class:`vaeflow.models.topdown.TopDownVAE`).

    A ``[model.topdown]`` table selects it; ``model.posterior`` then describes every
    group's posterior (a diagonal Gaussian, or one followed by the paper's convolutional
    IAF on the whole group, ``flow = "conv_iaf"``, or by a vector flow run over the latent
    channels at every position; ``context_features`` the context map's channels), and
    ``model.latent_dim``, ``model.encoder``, ``model.decoder``, ``model.prior`` and
    ``model.upper_layers`` must stay unset (the groups' priors are the top-down blocks).

    Attributes:
        channels: width of the bottom-up and top-down streams (the code's ``h_size``).
        latent_channels: latent feature maps per stochastic layer (``z_size``; paper: 32).
        layers_per_resolution: stochastic layers at each resolution, highest first (the
            Theano code's ``depths``); after the 5x5 stride-2 input conv every further
            resolution halves the size, so ``H`` and ``W`` must be divisible by
            ``2 ** len(layers_per_resolution)``.
        activation: of every block (paper: ELU).
        weight_norm: weight-normalise every conv: ``true`` (torch's ``weight_norm``, no
            data-dependent init), ``false``, or ``"iaf_code"``: the authors' released
            code's (:class:`~vaeflow.layers.IAFCodeConv2d`: a log gain, directions from
            N(0, 0.05^2), and its data-dependent init on the first training batch, run
            at the start of training, not on resume; a ``conv_iaf`` posterior gets the
            same in its masked convs).
        center: map inputs from [0, 1] to [-1, 1] (the code centres CIFAR-10 to
            [-0.5, 0.5]; binary MNIST trains better raw, see ``vaeflow.models.networks``).
        residual_scale: factor of every residual branch (the code: 0.1).
    """

    channels: int = 160
    latent_channels: int = 32
    layers_per_resolution: tuple[int, ...] = (2, 2)
    activation: str = "elu"
    weight_norm: bool | Literal["iaf_code"] = True
    center: bool = False
    residual_scale: float = 0.1

    def latent_sizes(self, x_shape: Sequence[int]) -> list[int]:
        """Each layer's latent size ``Z H_l W_l``, bottom (highest resolution) first."""
        h, w = (int(s) // 2 for s in x_shape[1:])
        sizes = []
        for i, depth in enumerate(self.layers_per_resolution):
            if i > 0:
                h, w = h // 2, w // 2
            sizes += [self.latent_channels * h * w] * depth
        return sizes


@dataclass(frozen=True)
class ModelConfig:
    """Everything :func:`vaeflow.models.build.build_model` needs.

    Attributes:
        x_shape: shape of one example, e.g. ``[1, 28, 28]``.
        latent_dim: ``D``.
        encoder: encoder network.
        decoder: decoder network.
        likelihood: a name from ``vaeflow.models.likelihoods.LIKELIHOODS``.
        likelihood_options: options of the likelihood.
        posterior: q(z|x) (with ``upper_layers``: ``q(z_1|x)``).
        prior: p(z) (with ``upper_layers``: the top layer's ``p(z_L)``).
        upper_layers: stochastic layers above ``z_1`` (``latent_dim``), bottom first
            (``[[model.upper_layers]]`` tables): empty for the one-layer VAE, else a
            bottom-up hierarchical VAE whose latent vector (for free bits and active units)
            is all layers' latents concatenated.
        topdown: a ``[model.topdown]`` table: the top-down (bidirectional inference)
            ResNet VAE of Kingma et al. 2016 instead of the models above; its latent vector
            is every group's latents concatenated, bottom group first.
        init: ``torch`` (each layer's default) or ``glorot_uniform``: Glorot-uniform
            weights and zero biases for every linear layer outside the prior and the
            posterior flows, Gaussian heads as separate mean and log-std layers (Burda et
            al.'s IWAE code; :func:`vaeflow.models.init.glorot_uniform_`), or
            ``iwae_code``: the same with the code's very draws (each layer from a fresh
            ``RandomState(123)``: equal-shaped layers start identical). Plain fully
            connected models only. Or ``he_normal``: weights ``N(0, 2 / fan_in)``,
            biases as built, for the same layers, gated ones included (Tomczak &
            Welling's VampPrior code, ``he_init``; :func:`vaeflow.models.init.he_normal_`);
            convolutions keep their initialisation, as in that code.
        output_bias_from_data: a Bernoulli decoder's output bias starts at the logit of
            the training images' mean pixel, clipped to [0.001, 0.999] (the IWAE code's
            ``get_train_bias_np``; :func:`vaeflow.models.init.output_bias_from_data_`);
            set when a run starts, not on resume.
    """

    x_shape: tuple[int, ...] = (1, 28, 28)
    latent_dim: int = 32
    encoder: NetConfig = field(default_factory=NetConfig)
    decoder: NetConfig = field(default_factory=NetConfig)
    likelihood: str = "bernoulli"
    likelihood_options: dict[str, Any] = field(default_factory=dict)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    upper_layers: tuple[StochasticLayerConfig, ...] = ()
    topdown: TopDownConfig | None = None
    init: Literal["torch", "glorot_uniform", "iwae_code", "he_normal"] = "torch"
    output_bias_from_data: bool = False

    @property
    def total_latent_dim(self) -> int:
        """Size of the whole latent vector: ``latent_dim`` plus every upper layer's (a
        top-down model: every group's)."""
        return sum(_layer_sizes(self))


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and preprocessed.

    Attributes:
        dataset: ``mnist``, ``fashion_mnist`` (grey, binarised here), ``binarized_mnist``
            (Larochelle & Murray's fixed binarisation: the papers' "static MNIST") or
            ``cifar10`` (8-bit).
        root: data root; ``None`` resolves ``$VAEFLOW_DATA`` then ``./data``.
        binarization: for grey data ``dynamic`` (a fresh Bernoulli draw per training batch,
            a fixed-seed draw for validation/test) or ``fixed_seed`` (one fixed-seed draw
            for every split — vaeflow's own, *not* the papers' static MNIST); for
            ``binarized_mnist`` ``given`` (the files are binary; used as they are).
            Ignored for 8-bit data.
        val_size: validation examples taken from the end of the training file
            (``None``: 10000 for MNIST-like data, 5000 for CIFAR-10). ``0``: no validation
            split — train on the whole training file for a fixed budget (Burda et al. 2016,
            the IAF code): no validation passes, no ``best.pt``, evaluation of ``last.pt``;
            ``train.early_stopping`` and ``train.val_size`` need a validation split.
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test evaluation.
        seed: seed of the fixed binarisations (training with ``fixed_seed``; validation
            and test always) and, unless ``batch_seed`` is set, of the training batches.
        shuffle: ``false``: every epoch visits the training images in their stored order
            (Burda et al.'s IWAE code); ``true``: a new random order per epoch.
        batch_seed: seed of the training batches -- their order and, under ``dynamic``
            binarisation, their Bernoulli draws (``None``: ``seed``). ``vaeflow sweep``
            sets it to each point's seed together with ``train.seed``, so seeds vary the
            initial weights, the posterior noise, the batch order and the training
            binarisation draws while the validation and test data stay the same bits.
    """

    dataset: Literal["mnist", "fashion_mnist", "binarized_mnist", "cifar10"] = "mnist"
    root: str | None = None
    binarization: Literal["dynamic", "fixed_seed", "given"] = "dynamic"
    val_size: int | None = None
    batch_size: int = 100
    eval_batch_size: int = 500
    seed: int = 0
    batch_seed: int | None = None
    shuffle: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: objective, schedules, robustness, validation, devices.

    Attributes:
        steps: total optimiser steps.
        objective: ``elbo`` or ``iwae`` (Burda et al. 2016) with ``k`` samples.
        k: importance samples per example during training.
        optimizer: ``adam``, ``adamax``, ``adamax_iaf`` (AdaMax as Kingma et al.'s IAF
            code writes it: no bias correction of the first moment, so the first ~20
            updates ramp up from a tenth of the rate; ``vaeflow.run.optim.IAFAdamax``),
            ``adam_normgrad`` (Adam on gradients
            rescaled to unit L2 norm per parameter tensor, the optimiser of Tomczak &
            Welling's VampPrior code, ``vaeflow.run.optim.AdamNormGrad``), ``adam_iwae``
            (Adam as Burda et al.'s IWAE code writes it: second moment started at
            ``initial_second_moment``, epsilon not bias-corrected, each update from the
            previous step's moments; ``vaeflow.run.optim.IWAEAdam``) or ``rmsprop``
            (``torch.optim.RMSprop``: Rezende & Mohamed 2015 train with RMSprop with
            momentum).
        lr: peak learning rate.
        betas: Adam's (and Adamax's) betas.
        initial_second_moment: where ``adam_iwae``'s second-moment estimate starts;
            required with that optimiser, refused with any other. The IWAE code starts it
            at 1 on the gradient of the batch *sum*; vaeflow's loss is the batch mean, so
            the same dynamics need ``1 / batch_size^2``.
        normgrad_split: with ``adam_normgrad``, normalise each tensor of the VampPrior
            code where vaeflow fuses two into one parameter (a gated layer's value and
            gate, a Gaussian head's mean and scale; ``vaeflow.layers.fused_parameters``)
            by its own norm, as the code does; ``false`` (the default) normalises the
            fused parameter as one tensor. Refused with any other optimiser, and with a
            likelihood of more than one parameter per pixel (whose decoder output layer
            would be fused too: not split).
        momentum: RMSprop's momentum (only with ``optimizer = "rmsprop"``).
        alpha: RMSprop's smoothing constant of the squared-gradient average (torch's
            default 0.99; only with ``optimizer = "rmsprop"``).
        eps: the optimiser's epsilon (Burda et al. 2016: 1e-4; the Sylvester-flow code:
            1e-7; torch's default 1e-8).
        weight_decay: L2 weight decay (decoupled only for adamw-style; here plain).
        lr_warmup_steps: linear learning-rate warm-up from 0.
        lr_schedule: ``constant``, ``cosine`` (to ``min_lr_ratio * lr``),
            ``exponential`` (multiply by ``lr_decay`` every ``lr_decay_every`` steps) or
            ``multistep`` (multiply by ``lr_decay`` at each step in ``lr_milestones``;
            Burda et al. 2016's 3^i-epoch stages are milestones with decay 10^(-1/7)).
        lr_decay: factor of the exponential and multistep schedules.
        lr_decay_every: steps between exponential decays.
        lr_milestones: increasing steps at which the multistep schedule decays.
        min_lr_ratio: final learning rate of the cosine schedule, relative to ``lr``.
        kl_warmup_steps: the KL weight rises linearly, ``beta = min(1, kl_warmup_start +
            step / kl_warmup_steps)`` (0: beta = 1 throughout).
        kl_warmup_start: beta at step 0 (Rezende & Mohamed 2015's ``beta_t = min(1, 0.01 +
            t/10000)`` is ``kl_warmup_start = 0.01``, ``kl_warmup_steps = 10000``: it reaches 1
            at step 9,900); needs ``kl_warmup_steps > 0``.
        kl_warmup_target: what beta weighs. ``"kl"`` (default): the KL term, the
            objective ``log p(x|z) + beta (log p(z) - log q(z|x))`` (Bowman et al. 2016).
            ``"joint"``: the log-joint, ``beta (log p(x|z) + log p(z)) - log q(z|x)``, as
            Rezende & Mohamed 2015's annealed free energy (eq. 20) is described by a
            reading note of the paper (its text could not be read here). The same bound
            at beta = 1; refused with free bits.
        prior_lr_scale: the prior's parameters learn at ``lr * prior_lr_scale`` (a slower
            prior against the co-adaptation of a learned prior with the encoder).
        prior_freeze_steps: the prior's parameters do not move for the first steps (a
            delayed prior: it starts learning once the posterior has settled).
        free_bits: free-bits floor in nats per latent dimension (Kingma et al. 2016).
        free_bits_group_size: latent dimensions per free-bits group (consecutive; must
            divide the whole latent dimension: ``model.latent_dim`` plus the
            ``model.upper_layers``' sizes, and in a hierarchy either be that whole (one
            group) or divide every layer's size, so no group straddles two layers); each
            group's floor is ``free_bits * size``. The
            same rule for every posterior: groups smaller than the latent vector need a
            log q that splits over dimensions (a diagonal Gaussian or (gated) IAF
            posterior) and per-dimension prior terms: N(0, I) and a learned Gaussian
            factorise; a mixture or VampPrior prior is split by the chain rule (each
            group's KL is ``log q(z_g) - log p(z_g | z_<g)``, as each layer's in a
            hierarchy); a flow prior cannot be -- otherwise a config error at the start of
            training; ``latent_dim`` (one group) works with any model.
        free_bits_batch_splits: the floor compares each group's KL averaged over this many
            sub-batches of the global batch separately (strided: example ``i`` in
            sub-batch ``i mod S``; 1: the whole batch). Kingma et al.'s code averages over
            each GPU's share (8 x 32 images in a batch of 256). Must divide
            ``data.batch_size``; under DDP also be a multiple of the process count (each
            rank then floors its own ``S / world`` sub-batches, the same as one process).
        clip_norm: clip the global gradient norm to this value (``None``, the default: no
            clipping — none of the reproduced papers' codes clips unless its config says
            so; TOML has no null, so a config that clips states it and one that does not
            leaves the key out).
        skip_grad_norm: skip the update when the gradient norm exceeds this (vdvae).
        max_consecutive_skips: stop the run (with a usable checkpoint) after this many
            skipped updates in a row.
        ema_decay: keep an exponential moving average of the weights for evaluation
            (Polyak averaging); ``None`` disables it.
        val_every: steps between validations.
        val_k: importance samples of the validation IWAE bound.
        val_size: validation examples used (``None``: all; needs ``data.val_size != 0``).
        early_stopping: validations without improvement before stopping (``None``: never).
        test_every: steps between test-set learning-curve points (0: none). Logs the
            test split's ELBO and IWAE-``test_k`` bound as ``test_curve/elbo_nats`` and
            ``test_curve/iwae_k<K>_nats`` (metrics.jsonl, TensorBoard) for a learning
            curve of the test bound against training time (``vaeflow report`` draws it
            as ``test_curves.png``). Only ever logged: the best checkpoint, early
            stopping and divergence use the validation split alone, and the draws come
            from a forked RNG, so a run trains identically with or without it.
        test_size: test examples of that curve (``None``: all): a fixed random subset
            (:func:`vaeflow.data.batches.test_subset`, the one ``eval.n_test`` scores).
        test_k: importance samples of the curve's IWAE bound (``None``: ``val_k``).
        divergence_nats: stop the run as diverged (``TrainingDiverged``, ``last.pt``
            saved, no test evaluation) when a validation bound falls more than this many
            nats below the best one so far (``None``: never). A loss that explodes
            without turning NaN otherwise trains to the end: planar K = 40 at too high a
            learning rate fell to -20,000 nats and trained on for 24,000 steps. Set it far
            above ordinary overfitting (a few nats).
        early_stopping_delay: steps before validations without improvement start to count
            (the VampPrior and Sylvester-flow codes count only after the KL warm-up: set it
            to ``kl_warmup_steps``); the best checkpoint is kept from the start.
        log_every: steps between training-scalar logs.
        image_every: steps between reconstruction/sample grids (0: only at the end).
        ckpt_every: steps between ``last.pt`` checkpoints.
        seed: global seed.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: bf16 autocast on CUDA (ignored on CPU with a warning).
        tf32: TF32 matmuls and convolutions in training on CUDA (ignored on CPU with a
            warning). Off: strict float32 for both (torch's default would run cuDNN
            convolutions in TF32). Validation and test-curve points follow it; the test
            evaluation (``vaeflow eval``) is always strict float32
            (:func:`vaeflow.run.utils.strict_float32`); ``benchmarks/gpu_check.py``
            measures how far TF32 and bf16 move the bounds.
        compile: wrap the model in ``torch.compile`` (its forward; backward, optimiser and
            EMA stay eager; ``compile_step`` compiles all of it).
        channels_last: keep conv weights and image batches in NHWC memory layout (the
            same maths, faster convolutions on many CPUs and GPUs; measurements in
            benchmarks/README.md). Also used by ``vaeflow eval`` for the run unless
            ``eval.channels_last`` says otherwise.
        sync_free: a training step without host-device synchronisation (for small models
            on a GPU, which otherwise wait on the host every step). The skip decision is a
            device tensor applied through the fused Adam kernel's ``found_inf`` (a
            skipped update leaves parameters, optimiser state and EMA as they were, as
            without the switch; results are bit-identical); the skip counters live on
            the device and are read at the steps where anything periodic happens (at
            least every ``log_every`` steps), so ``max_consecutive_skips`` stops the run
            at the next read, not at the failing step (skipped updates do not move the
            parameters, so the checkpoint then written is the one the failure left).
            Needs ``optimizer = "adam"`` or ``"adam_normgrad"`` (the fused kernel: float32
            or float64 parameters on CPU or CUDA); not with ``sweep --stack``.
        compile_step: compile the whole update -- forward, loss, backward, gradient norm
            and clipping, skip decision, optimiser step, EMA -- as one ``torch.compile``d
            graph (``compile`` covers the model's forward only): on CUDA captured as a CUDA
            graph (inductor's ``reduce-overhead`` mode), on the CPU inductor's default
            mode. Implies ``sync_free``'s semantics (no host read in the step: skip
            decision and counters on the device, read at periodic steps). Learning rate and
            KL weight enter as device tensors, so schedules and warm-up change them without
            recompiling; batches have a fixed shape (the loop drops each epoch's ragged
            last batch). The optimiser's update is written in tensor operations
            (``vaeflow.run.optim.update_unless``: torch's fused kernel cannot be
            compiled), its state created (zero) for every parameter before the first
            step; the posterior noise is torch's own random stream, as in eager. The
            same training as the eager step to float rounding (tested on the CPU; the
            CUDA graph path has not run on a GPU yet: ``benchmarks/gpu_check.py`` checks
            it). The first step compiles (about a minute on a 2-core CPU); a delayed
            prior (``prior_freeze_steps``) compiles once more when it starts. Measured on
            the CPU: 1.18x for the quickstart MLP's step, 1.07x for the Sylvester
            gated-conv VAE's loop with ``channels_last`` (its convolutions are ~90 % of
            the step; benchmarks/README.md). Needs ``optimizer = "adam"``,
            ``"adam_normgrad"``, ``"adam_iwae"``, ``"adamax"`` or ``"adamax_iaf"`` (not
            the fused kernel ``sync_free``
            needs); not with ``compile`` (this compiles the model too), ``amp``
            (untested) or data-parallel runs (torchrun). In a stack (``sweep --stack``)
            it compiles the stack's own step instead: the vmapped forward and backward
            of all runs and their one batched update (``vaeflow.run.stack_optim``),
            with the stack's host-side skip decisions.
    """

    steps: int = 10000
    objective: Literal["elbo", "iwae"] = "elbo"
    k: int = 1
    optimizer: Literal["adam", "adamax", "adamax_iaf", "adam_normgrad", "adam_iwae", "rmsprop"] = (
        "adam"
    )
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    initial_second_moment: float | None = None
    normgrad_split: bool = False
    momentum: float = 0.0
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "exponential", "multistep"] = "constant"
    lr_decay: float = 0.5
    lr_decay_every: int = 100000
    lr_milestones: tuple[int, ...] = ()
    min_lr_ratio: float = 0.0
    kl_warmup_steps: int = 0
    prior_lr_scale: float = 1.0
    prior_freeze_steps: int = 0
    kl_warmup_start: float = 0.0
    kl_warmup_target: Literal["kl", "joint"] = "kl"
    free_bits: float = 0.0
    free_bits_group_size: int = 1
    free_bits_batch_splits: int = 1
    clip_norm: float | None = None
    skip_grad_norm: float | None = None
    max_consecutive_skips: int = 50
    ema_decay: float | None = None
    val_every: int = 1000
    val_k: int = 100
    val_size: int | None = None
    early_stopping: int | None = None
    early_stopping_delay: int = 0
    divergence_nats: float | None = None
    test_every: int = 0
    test_size: int | None = None
    test_k: int | None = None
    log_every: int = 50
    image_every: int = 0
    ckpt_every: int = 1000
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False
    tf32: bool = False
    compile: bool = False
    channels_last: bool = False
    sync_free: bool = False
    compile_step: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Final test evaluation.

    Attributes:
        k: importance samples of the test log-likelihood (5000 as in Burda et al. 2016).
        chunk: samples per example per pass (memory is flat in ``k``); ``None``: chosen
            for the device (``vaeflow.run.evaluate.eval_pass_shape``).
        batch_size: test examples per pass; ``None``: chosen for the device. A pass
            scores ``batch_size x chunk`` samples: about 1,000 was best on the 2-core CPU
            and >= 100,000 on an H200 (benchmarks/README.md), which the automatic choice
            targets; set both to override.
        n_test: evaluate on a fixed random subset of ``n_test`` test examples, the same
            for every run (``None``: all; see ``vaeflow.data.test_subset``).
        use_ema: evaluate the EMA weights when they exist.
        checkpoint: which checkpoint ``vaeflow eval`` (and the evaluation at the end of
            ``vaeflow train``) scores: ``best`` (best validation bound), ``last`` (the final
            model, as the papers that train for a fixed budget report it) or ``auto``
            (``best`` with a validation split, ``last`` with ``data.val_size = 0``, where
            no ``best.pt`` exists).
        compile: run each chunk of importance samples through ``torch.compile`` (fuses
            the elementwise work; worth it on a GPU for long evaluations; the first
            batch pays the compilation).
        channels_last: score in NHWC memory layout. ``None``: NHWC for convolutional
            models on the CPU (measured 1.4-2.2x faster there for the Sylvester gated-conv
            VAE at k = 5000: oneDNN's transposed convolutions are far slower in NCHW;
            benchmarks/nll_eval.py), else ``train.channels_last``. The layout changes
            float rounding only, not the estimate.
    """

    k: int = 5000
    chunk: int | None = None
    batch_size: int | None = None
    n_test: int | None = None
    use_ema: bool = True
    checkpoint: Literal["auto", "best", "last"] = "auto"
    compile: bool = False
    channels_last: bool | None = None


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives: ``<root>/<name>/``."""

    name: str = "run"
    root: str = "runs"


@dataclass(frozen=True)
class Config:
    """The whole experiment: one TOML file with these five tables."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# The config layer imports no other vaeflow module, so it keeps its own copy of what it
# validates about each dataset; tests/test_config.py checks it against vaeflow.data.DATASETS.
_DATA_SHAPES = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "binarized_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
_DATA_LIKELIHOODS = {
    "mnist": {"bernoulli"},
    "fashion_mnist": {"bernoulli"},
    "binarized_mnist": {"bernoulli"},
    "cifar10": {"discretized_logistic", "discretized_logistic_mixture"},
}
# data.binarization values each dataset accepts (None: the setting is ignored, 8-bit data).
DATA_BINARIZATIONS: dict[str, tuple[str, ...] | None] = {
    "mnist": ("dynamic", "fixed_seed"),
    "fashion_mnist": ("dynamic", "fixed_seed"),
    "binarized_mnist": ("given",),
    "cifar10": None,
}
# Values that once meant something else: the error says what to use now.
_RETIRED_VALUES = {
    ("data.binarization", "static"): (
        'data.binarization = "static" is retired: it was a fixed-seed Bernoulli draw of grey '
        "MNIST, not the papers' static MNIST. For the standard static MNIST (Larochelle & "
        'Murray\'s files) use data.dataset = "binarized_mnist" with data.binarization = '
        '"given"; for vaeflow\'s own fixed-seed draw use data.binarization = "fixed_seed"'
    ),
}


def validate(cfg: Config) -> Config:
    """Reject impossible combinations with a message naming the keys involved."""
    shape = _DATA_SHAPES[cfg.data.dataset]
    if tuple(cfg.model.x_shape) != shape:
        raise ConfigError(
            f"model.x_shape = {list(cfg.model.x_shape)} but data.dataset = "
            f"{cfg.data.dataset!r} has examples of shape {list(shape)}"
        )
    allowed = _DATA_LIKELIHOODS[cfg.data.dataset]
    if cfg.model.likelihood not in allowed:
        raise ConfigError(
            f"model.likelihood = {cfg.model.likelihood!r} does not fit data.dataset = "
            f"{cfg.data.dataset!r}; use one of {sorted(allowed)}"
        )
    binarizations = DATA_BINARIZATIONS[cfg.data.dataset]
    if binarizations is not None and cfg.data.binarization not in binarizations:
        raise ConfigError(
            f"data.binarization = {cfg.data.binarization!r} does not fit data.dataset = "
            f"{cfg.data.dataset!r}; use one of {list(binarizations)}"
            + (
                " (its files are binary already: the standard static MNIST)"
                if binarizations == ("given",)
                else ' ("given" is for data binary in its files, e.g. binarized_mnist)'
            )
        )
    if cfg.model.topdown is not None:
        _check_topdown(cfg)
    t = cfg.train
    positive = {
        "train.steps": t.steps,
        "train.k": t.k,
        "train.val_every": t.val_every,
        "train.val_k": t.val_k,
        "train.log_every": t.log_every,
        "train.ckpt_every": t.ckpt_every,
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "eval.k": cfg.eval.k,
        "eval.chunk": 1 if cfg.eval.chunk is None else cfg.eval.chunk,
        "eval.batch_size": 1 if cfg.eval.batch_size is None else cfg.eval.batch_size,
        "model.latent_dim": cfg.model.latent_dim,
        **{
            f"model.upper_layers[{i}].latent_dim": layer.latent_dim
            for i, layer in enumerate(cfg.model.upper_layers)
        },
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    checks = [
        ("train.clip_norm", t.clip_norm, t.clip_norm is None or t.clip_norm > 0, "> 0 or none"),
        (
            "train.skip_grad_norm",
            t.skip_grad_norm,
            t.skip_grad_norm is None or t.skip_grad_norm > 0,
            "> 0 or none",
        ),
        (
            "train.early_stopping",
            t.early_stopping,
            t.early_stopping is None or t.early_stopping >= 1,
            ">= 1 or none",
        ),
        (
            "train.divergence_nats",
            t.divergence_nats,
            t.divergence_nats is None or t.divergence_nats > 0,
            "> 0 or none",
        ),
        (
            "train.max_consecutive_skips",
            t.max_consecutive_skips,
            t.max_consecutive_skips >= 1,
            ">= 1",
        ),
        ("train.lr_decay_every", t.lr_decay_every, t.lr_decay_every >= 1, ">= 1"),
        (
            "train.lr_milestones",
            list(t.lr_milestones),
            all(m >= 1 for m in t.lr_milestones)
            and all(a < b for a, b in itertools.pairwise(t.lr_milestones)),
            "strictly increasing steps >= 1",
        ),
        ("train.lr_decay", t.lr_decay, 0 < t.lr_decay <= 1, "in (0, 1]"),
        ("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("train.free_bits", t.free_bits, t.free_bits >= 0, ">= 0"),
        ("train.kl_warmup_steps", t.kl_warmup_steps, t.kl_warmup_steps >= 0, ">= 0"),
        (
            "train.kl_warmup_start",
            t.kl_warmup_start,
            0 <= t.kl_warmup_start <= 1,
            "in [0, 1]",
        ),
        ("train.momentum", t.momentum, 0 <= t.momentum < 1, "in [0, 1)"),
        ("train.alpha", t.alpha, 0 <= t.alpha < 1, "in [0, 1)"),
        ("train.eps", t.eps, t.eps > 0, "> 0"),
        ("train.prior_lr_scale", t.prior_lr_scale, t.prior_lr_scale >= 0, ">= 0"),
        ("train.prior_freeze_steps", t.prior_freeze_steps, t.prior_freeze_steps >= 0, ">= 0"),
        (
            "train.free_bits_group_size",
            t.free_bits_group_size,
            _free_bits_groups_fit(cfg.model, t.free_bits_group_size),
            f">= 1 and divide the latent dimension {cfg.model.total_latent_dim}, or with "
            "model.upper_layers either equal it (one group) or divide every layer's size "
            f"{_layer_sizes(cfg.model)} so that no group straddles two layers",
        ),
        (
            "train.free_bits_batch_splits",
            t.free_bits_batch_splits,
            t.free_bits_batch_splits >= 1
            and cfg.data.batch_size % t.free_bits_batch_splits == 0
            and (t.free_bits_batch_splits == 1 or t.free_bits > 0),
            f">= 1, divide data.batch_size = {cfg.data.batch_size}, and be 1 without "
            "train.free_bits",
        ),
        (
            "train.early_stopping_delay",
            t.early_stopping_delay,
            t.early_stopping_delay >= 0,
            ">= 0",
        ),
        ("train.lr_warmup_steps", t.lr_warmup_steps, t.lr_warmup_steps >= 0, ">= 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.betas", list(t.betas), all(0 <= b < 1 for b in t.betas), "each in [0, 1)"),
        ("train.val_size", t.val_size, t.val_size is None or t.val_size >= 1, ">= 1 or none"),
        ("train.test_every", t.test_every, t.test_every >= 0, ">= 0 (0: no test curve)"),
        ("train.test_size", t.test_size, t.test_size is None or t.test_size >= 1, ">= 1 or none"),
        ("train.test_k", t.test_k, t.test_k is None or t.test_k >= 1, ">= 1 or none"),
        (
            "data.val_size",
            cfg.data.val_size,
            cfg.data.val_size is None or cfg.data.val_size >= 0,
            ">= 0 or none (0: no validation split, a fixed training budget)",
        ),
        (
            "eval.n_test",
            cfg.eval.n_test,
            cfg.eval.n_test is None or cfg.eval.n_test >= 1,
            ">= 1 or none",
        ),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key} must be {allowed}, got {value}")
    if cfg.data.val_size == 0:
        _check_without_validation(cfg)
    if t.lr_milestones and t.lr_schedule != "multistep":
        raise ConfigError(
            f"train.lr_milestones = {list(t.lr_milestones)} is only used by "
            f'lr_schedule = "multistep" (got {t.lr_schedule!r}); set lr_milestones = [] '
            "or change the schedule"
        )
    if t.lr_schedule == "multistep" and not t.lr_milestones:
        raise ConfigError(
            'train.lr_schedule = "multistep" needs train.lr_milestones (steps at which the '
            "learning rate is multiplied by train.lr_decay), e.g. lr_milestones = [2500, 10000]"
        )
    if t.objective == "iwae" and (t.free_bits > 0 or t.kl_warmup_steps > 0):
        raise ConfigError(
            "train.objective = 'iwae' cannot use train.free_bits or train.kl_warmup_steps "
            "(they modify the ELBO's KL term, which the IWAE bound does not have)"
        )
    if t.kl_warmup_target == "joint" and t.free_bits > 0:
        raise ConfigError(
            'train.kl_warmup_target = "joint" weighs log p(x|z) + log p(z), which has no '
            "per-dimension KL for train.free_bits to floor; use one of them"
        )
    if t.kl_warmup_target != "kl" and t.kl_warmup_steps == 0:
        raise ConfigError(
            f"train.kl_warmup_target = {t.kl_warmup_target!r} says what the warm-up weighs, "
            "but train.kl_warmup_steps = 0 (no warm-up); set train.kl_warmup_steps"
        )
    if t.kl_warmup_start > 0 and t.kl_warmup_steps == 0:
        raise ConfigError(
            f"train.kl_warmup_start = {t.kl_warmup_start} is the KL weight at the start of a "
            "warm-up, but train.kl_warmup_steps = 0 (no warm-up: beta = 1 throughout); set "
            "train.kl_warmup_steps"
        )
    defaults = TrainConfig()
    if t.optimizer != "rmsprop":
        for key in ("momentum", "alpha"):
            if getattr(t, key) != getattr(defaults, key):
                raise ConfigError(
                    f"train.{key} = {getattr(t, key)} is an RMSprop setting, but "
                    f'train.optimizer = {t.optimizer!r}; use optimizer = "rmsprop" or '
                    f"remove train.{key}"
                )
    elif tuple(t.betas) != defaults.betas:
        raise ConfigError(
            f"train.betas = {list(t.betas)} are Adam's, but train.optimizer = 'rmsprop' "
            "(its settings are train.momentum and train.alpha); remove train.betas"
        )
    if t.optimizer == "adam_iwae" and t.initial_second_moment is None:
        raise ConfigError(
            "train.optimizer = 'adam_iwae' needs train.initial_second_moment (the IWAE code "
            "starts the second moment at 1 on the gradient of the batch sum: 1 / "
            f"batch_size^2 = {1 / cfg.data.batch_size**2:g} on vaeflow's batch-mean loss; "
            "0 starts it as torch's Adam does)"
        )
    if t.initial_second_moment is not None and t.optimizer != "adam_iwae":
        raise ConfigError(
            f"train.initial_second_moment = {t.initial_second_moment} starts the second "
            f'moment of optimizer = "adam_iwae", but train.optimizer = {t.optimizer!r}; use '
            '"adam_iwae" or remove train.initial_second_moment'
        )
    if t.normgrad_split and t.optimizer != "adam_normgrad":
        raise ConfigError(
            "train.normgrad_split = true splits the per-tensor normalisation of "
            f'optimizer = "adam_normgrad", but train.optimizer = {t.optimizer!r}; use '
            '"adam_normgrad" or remove train.normgrad_split'
        )
    if t.normgrad_split and cfg.model.likelihood != "bernoulli":
        raise ConfigError(
            f"train.normgrad_split = true with model.likelihood = {cfg.model.likelihood!r}: "
            "the decoder's output layer then fuses the likelihood's parameters (the "
            "VampPrior code's separate mean and log-variance layers) and is not split; "
            "it is implemented for the Bernoulli decoder (one output per pixel)"
        )
    if t.optimizer == "adam_iwae" and t.weight_decay != 0.0:
        raise ConfigError(
            f"train.weight_decay = {t.weight_decay}: optimizer = 'adam_iwae' (the IWAE "
            "code's Adam) has no weight decay; remove train.weight_decay"
        )
    if t.initial_second_moment is not None and t.initial_second_moment < 0:
        raise ConfigError(
            f"train.initial_second_moment must be >= 0 (a second moment), got "
            f"{t.initial_second_moment}"
        )
    if t.sync_free and t.optimizer not in ("adam", "adam_normgrad"):
        raise ConfigError(
            f"train.sync_free = true needs train.optimizer = 'adam' or 'adam_normgrad' (the "
            f"fused Adam kernel skips an update on a device flag), got {t.optimizer!r}; "
            "set train.sync_free = false"
        )
    if t.compile_step:
        _check_compile_step(t)
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1), got {t.ema_decay}")
    if cfg.model.output_bias_from_data and (
        cfg.model.likelihood != "bernoulli"
        or cfg.model.decoder.name != "mlp"
        or cfg.model.topdown is not None
    ):
        raise ConfigError(
            "model.output_bias_from_data sets the bias of an 'mlp' decoder's Bernoulli "
            f"logits from the training mean; this model has likelihood "
            f"{cfg.model.likelihood!r} and decoder {cfg.model.decoder.name!r}"
            f"{' (top-down)' if cfg.model.topdown is not None else ''}: remove it"
        )
    if cfg.model.prior.init_from_data and cfg.model.prior.name != "vamp":
        raise ConfigError(
            "model.prior.init_from_data initialises a VampPrior's pseudo-inputs; "
            f"model.prior.name is {cfg.model.prior.name!r}"
        )
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas must have two entries, got {list(t.betas)}")
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name must be a non-empty name without '/', got {cfg.run.name!r}")
    return cfg


def _check_compile_step(t: TrainConfig) -> None:
    """``train.compile_step``: refuse what the compiled step does not do, saying what to
    use instead (data-parallel runs are refused when the run starts: the config does not
    know the process count)."""
    if t.optimizer not in ("adam", "adam_normgrad", "adam_iwae", "adamax", "adamax_iaf"):
        raise ConfigError(
            "train.compile_step = true compiles the update of optimizer = 'adam', "
            "'adam_normgrad', 'adam_iwae', 'adamax' or 'adamax_iaf', got train.optimizer = "
            f"{t.optimizer!r}; for this optimiser use train.compile = true (the model's "
            "forward only) and set train.compile_step = false"
        )
    if t.compile:
        raise ConfigError(
            "train.compile_step = true compiles the model's forward as part of the whole "
            "step; set train.compile = false (or use train.compile alone: the model only)"
        )
    if t.amp:
        raise ConfigError(
            "train.compile_step = true with train.amp = true is not supported (bf16 "
            "autocast in the compiled step is untested); use train.compile = true with "
            "train.amp, or train.compile_step in float32 (train.amp = false)"
        )


def _check_without_validation(cfg: Config) -> None:
    """``data.val_size = 0`` (no validation split): refuse what needs one, naming both keys.

    Early stopping and the best checkpoint are decided on the validation bound; without a
    validation split they would silently never happen.
    """
    needs = [
        ("train.early_stopping", cfg.train.early_stopping, "stops on the validation bound"),
        ("train.divergence_nats", cfg.train.divergence_nats, "stops on the validation bound"),
        ("train.val_size", cfg.train.val_size, "subsamples the validation split"),
    ]
    for key, value, what in needs:
        if value is not None:
            raise ConfigError(
                f"{key} = {value} {what}, but data.val_size = 0 has no validation split; "
                f"leave {key} unset (none) or give data.val_size > 0"
            )
    if cfg.eval.checkpoint == "best":
        raise ConfigError(
            'eval.checkpoint = "best" needs a validation split, but data.val_size = 0 keeps '
            'no best.pt; use eval.checkpoint = "last" (or "auto") or give data.val_size > 0'
        )


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (numbers, booleans, lists, strings), else a bare string.

    Parsed with :mod:`tomllib`, never ``eval``.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (returns a new dict).

    ``none``/``null`` set a key to ``None``. Unknown keys are caught by
    :func:`from_dict` afterwards, with the full dotted name.
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set key must look like section.key, got {key!r}")
        value = None if text.strip().lower() in ("none", "null") else _parse_value(text.strip())
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a table")
        node[parts[-1]] = value
    return out


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file with :mod:`tomllib`; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def _layer_sizes(model: ModelConfig) -> list[int]:
    if model.topdown is not None:
        return model.topdown.latent_sizes(model.x_shape)
    return [model.latent_dim, *(layer.latent_dim for layer in model.upper_layers)]


def _free_bits_groups_fit(model: ModelConfig, size: int) -> bool:
    """Free-bits groups tile the latent vector (all layers' latents, bottom first) and,
    in a hierarchy, stay inside one layer each (or are the one group of everything)."""
    if size < 1 or model.total_latent_dim % size:
        return False
    return size == model.total_latent_dim or all(d % size == 0 for d in _layer_sizes(model))


def _check_topdown(cfg: Config) -> None:
    """``model.topdown``: the keys it replaces stay unset, its sizes fit the images, and
    the training options that act on a separate prior module are refused (its priors
    are the top-down blocks)."""
    m, td = cfg.model, cfg.model.topdown
    defaults = ModelConfig()
    for key in ("latent_dim", "encoder", "decoder", "prior", "upper_layers"):
        if getattr(m, key) != getattr(defaults, key):
            raise ConfigError(
                f"model.{key} is not used with model.topdown (the top-down model has its own "
                f"bottom-up pass, per-group priors and latent sizes: model.topdown.channels, "
                f".latent_channels, .layers_per_resolution); remove model.{key}"
            )
    for key, value in (
        ("channels", td.channels),
        ("latent_channels", td.latent_channels),
        ("layers_per_resolution", min(td.layers_per_resolution, default=0)),
    ):
        if value < 1:
            raise ConfigError(
                f"model.topdown.{key} must be >= 1 (and layers_per_resolution non-empty), "
                f"got {getattr(td, key)}"
            )
    if td.residual_scale <= 0:
        raise ConfigError(f"model.topdown.residual_scale must be > 0, got {td.residual_scale}")
    scale = 2 ** len(td.layers_per_resolution)
    if len(m.x_shape) != 3 or any(s % scale for s in m.x_shape[1:]):
        raise ConfigError(
            f"model.topdown.layers_per_resolution = {list(td.layers_per_resolution)} halves "
            f"the image size {len(td.layers_per_resolution)} times after the stride-2 input "
            f"conv: model.x_shape = {list(m.x_shape)} needs (C, H, W) with H and W "
            f"divisible by {scale}"
        )
    t = cfg.train
    if t.prior_lr_scale != 1.0 or t.prior_freeze_steps > 0:
        raise ConfigError(
            "train.prior_lr_scale / train.prior_freeze_steps act on a separate prior module; "
            "model.topdown has none (each group's prior is part of its top-down block)"
        )


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config, apply ``--set`` overrides, build and validate :class:`Config`."""
    data = {} if path is None else read_toml(path)
    return validate(from_dict(Config, apply_overrides(data, overrides)))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, checking every key and type.

    Raises:
        ConfigError: naming the offending key (``model.prior.nme``), the allowed keys
            or the expected type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config key(s) {keys}; allowed: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, key)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tables = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(tables) == 1:
            # An optional table (``[model.topdown]``): its own errors name the bad key.
            return from_dict(tables[0], value, key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if (key, value) in _RETIRED_VALUES:
            raise ConfigError(_RETIRED_VALUES[(key, value)])
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{key}: expected {tp.__name__}, got a boolean {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(
                f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj: Any) -> Any:
    """Nested dataclasses -> plain dicts/lists (tuples become lists), JSON/TOML-safe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
