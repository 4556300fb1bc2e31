"""Many runs in one process: ``N`` training runs of one shape as one batched computation.

:func:`train_stack` trains ``N`` configs that differ only in keys that change neither a
tensor shape nor the structure of the update (seeds, the learning-rate schedule, the
optimiser's constants, KL warm-up, clipping, EMA decay, validation, logging and checkpoint periods,
early stopping, evaluation settings: :data:`STACKABLE_KEYS`). Each run ends exactly as it
would alone: its own run directory, ``metrics.jsonl``, TensorBoard events, checkpoints,
``train_summary.json``; ``vaeflow eval`` and ``--resume`` (stacked or alone) work on it,
and its trajectory equals the solo run's to float rounding (``tests/test_stack.py``
checks parameters, optimiser state and metrics in float64).

How the runs stay independent:

* **Set-up and persistence are the solo run's.** Every run is built by
  :func:`vaeflow.run.train._setup_run` (model under its ``train.seed``, data batches,
  optimiser, schedule, EMA, logger, run directory; or all of it restored from
  ``last.pt``) and keeps those objects: its optimiser holds its state and its learning
  rate from its own ``LambdaLR``, its EMA averages its parameters, and the loop's own
  :func:`~vaeflow.run.train._periodic` and :func:`~vaeflow.run.train._finish` log,
  validate, checkpoint, stop early and summarise. The stack adds no copy of that code.
* **The forward, the backward and the update are batched.** Parameter ``name`` of all
  runs is one leaf ``(N, *shape)``, and each run's model parameters are views of its
  row (``p.data``), so nothing is copied between steps. One copy of the model runs
  under :func:`torch.func.vmap` with :func:`torch.func.functional_call` on the stacked
  leaves: one forward and one backward (batched matrix products) serve all runs; the
  runs share no parameter, so the gradient of the summed losses has run ``r``'s
  gradient in row ``r``. The leaves are laid out in memory as the backward produces
  their gradients (:func:`_gradient_orders`: vmap's linear backward gives weight
  gradients transposed, and autograd would copy each into a contiguous parameter's
  layout every step). The optimisers' update is one batched computation too
  (:mod:`vaeflow.run.stack_optim`: each run's optimiser state is views of stacked
  moments, its own hyperparameters broadcast per run; ``train.compile_step`` compiles
  it into one graph), for Adam, AdamNormGrad, Burda's Adam and Adamax; another
  optimiser (RMSprop) steps run by run on its rows. Buffers are not stacked: they must
  be constants equal in every run (:func:`check_model_stackable`). While a run's
  bookkeeping runs, its model and optimiser get tensors of their own
  (:meth:`_Stack.alone`): ``torch.save`` of a view would write the whole stack.
* **Randomness is an input.** The only random draw of a supported training step is the
  posterior noise ``(K, B, D)``. Each run owns a generator that starts from the global
  RNG state its set-up left (the stream a solo run draws from: ``train.seed``, or the
  checkpoint's), draws its noise outside ``vmap`` in the solo order, and the model takes
  it as an argument (``VAE.forward(x, k, noise)``); ``vmap(randomness="different")``
  would draw all runs from one stream. While a run's bookkeeping runs, its generator
  state is swapped into the global RNG, so its checkpoint's ``rng`` is its own stream and
  validation's forked RNG starts where the solo run's would.
* **Data order** comes from each run's own :class:`~vaeflow.data.TrainBatches`
  (``data.seed``) at its own step (runs need not be at the same step).
* **Per-run decisions.** Gradient norms and clipping are per run (``clip_norm`` of each
  run on its own norm, never a global one), computed batched; so is the skip decision
  (non-finite loss or gradient, ``skip_grad_norm``): a skipped run's optimiser and EMA
  do not step. The likelihood's data check (a data-dependent branch ``vmap`` cannot
  take) runs once per step on all runs' batches, outside ``vmap``.
* Runs **leave the stack** when they complete, stop early, reach ``stop_after_step`` or
  diverge; the others are restacked without them and go on.

Equality with a solo run is to float rounding, not bitwise: batched matrix products sum
in another order than single ones (float64: ~1e-16; ``tests/test_stack.py``).

Scope: any one-stochastic-layer VAE whose training step draws no random number but the
posterior noise ``(K, B, D)`` and whose buffers are constants equal in every run -- MLP
or convolutional encoders and decoders, every likelihood, Gaussian or flow posteriors
(IAF, planar, Sylvester, ...), N(0, I), mixture, VampPrior or flow priors -- in one
process (eager, or compiled by ``train.compile_step``). What cannot be stacked is a
:class:`~vaeflow.config.ConfigError` naming the key, before any run directory is
written: settings the stack does not implement (:func:`check_stackable`: a compiled
model, sync-free steps, bf16, channels-last, frozen or scaled prior learning rates,
hierarchies, DDP) and, from a trial step of the model
itself (:func:`check_model_stackable`), a model whose forward draws other random
numbers (its noise would come from one shared stream), changes a buffer, holds buffers
that differ between the runs (a seed-drawn permutation, say), or has an operation that
:func:`torch.func.vmap` cannot batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..config import Config, ConfigError, TrainConfig, to_dict
from ..data import DataSplits, load_splits
from ..models.bounds import Terms
from . import stack_optim
from .logger import Progress, flatten_config
from .schedule import _beta, _match_state_layout
from .step import StepResult, training_loss
from .train import (
    TrainingDiverged,
    _check_free_bits,
    _finish,
    _periodic,
    _periodic_due,
    _Run,
    _setup_run,
)

__all__ = [
    "STACKABLE_KEYS",
    "check_model_stackable",
    "check_stackable",
    "stack_key",
    "train_stack",
]

#: Config keys whose values may differ between the runs of one stack (everything else,
#: ``eval.*`` and ``run.*`` aside, must be equal: see :func:`stack_key`).
STACKABLE_KEYS: frozenset[str] = frozenset(
    {
        "data.seed",
        "data.batch_seed",
        "data.eval_batch_size",
        "train.seed",
        "train.steps",
        "train.lr",
        "train.betas",
        "train.eps",
        "train.initial_second_moment",
        "train.weight_decay",
        "train.lr_warmup_steps",
        "train.lr_schedule",
        "train.lr_decay",
        "train.lr_decay_every",
        "train.lr_milestones",
        "train.min_lr_ratio",
        "train.kl_warmup_steps",
        "train.kl_warmup_start",
        "train.clip_norm",
        "train.skip_grad_norm",
        "train.max_consecutive_skips",
        "train.ema_decay",
        "train.val_every",
        "train.val_k",
        "train.val_size",
        "train.early_stopping",
        "train.early_stopping_delay",
        "train.log_every",
        "train.image_every",
        "train.ckpt_every",
        # A tensor floor per run inside vmap (train.training_loss); 0 gives the plain KL.
        "train.free_bits",
    }
)
_STACKABLE_SECTIONS = ("eval.", "run.")


def check_stackable(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, if ``cfg`` asks for something a stack
    does not implement (the model itself is checked by :func:`check_model_stackable`)."""
    m, t = cfg.model, cfg.train
    refusals = [
        (int(os.environ.get("WORLD_SIZE", "1")) > 1, "WORLD_SIZE", "data-parallel (torchrun)"),
        (t.compile, "train.compile", "true"),
        (t.sync_free, "train.sync_free", "true"),
        (t.amp, "train.amp", "true"),
        (t.channels_last, "train.channels_last", "true"),
        (t.prior_lr_scale != 1.0, "train.prior_lr_scale", t.prior_lr_scale),
        (t.prior_freeze_steps != 0, "train.prior_freeze_steps", t.prior_freeze_steps),
        (bool(m.upper_layers), "model.upper_layers", "a hierarchy"),
        (m.topdown is not None, "model.topdown", "a top-down model"),
    ]
    for refused, key, value in refusals:
        if refused:
            raise ConfigError(
                f"{key} = {value} cannot be trained in a stack (vaeflow.run.stack trains "
                "one-stochastic-layer VAEs in one process, without a compiled model (its "
                "train.compile_step compiles the stack's own step), sync-free steps, bf16, "
                "channels-last or per-part learning rates); train "
                "it alone (vaeflow train, or vaeflow sweep without --stack)"
            )


def _template(models: Sequence[nn.Module]) -> nn.Module:
    """The one module ``functional_call`` runs for every run of a stack: a copy of run 0's
    model (buffers are equal in every run: :func:`check_model_stackable`) whose
    likelihood does not check data (a data-dependent branch vmap cannot take; the stack
    checks every run's batch once) and whose KL uses the prior's chain-rule conditionals
    if any run's does (free bits per group with a prior that does not factorise:
    ``train._check_free_bits``; for the other runs it is the same KL, summed)."""
    template = copy.deepcopy(models[0])
    template.likelihood.validate = False
    if hasattr(template, "kl_chain_rule"):
        template.kl_chain_rule = any(getattr(m, "kl_chain_rule", False) for m in models)
    return template


def _stacked_parameters(
    models: Sequence[Mapping[str, Tensor]], orders: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, Tensor]:
    """Each parameter of all runs as one leaf ``(N, *shape)`` (row ``r``: run ``r``'s),
    a frozen parameter staying frozen, as alone.

    ``orders[name]`` (from :func:`_gradient_orders`) lays the leaf out in memory with
    its dimensions in that order, outermost first: the layout in which the batched
    backward produces the gradient, so that autograd takes the gradient as it is instead
    of copying it into the parameter's layout (vmap's linear backward gives the weight
    gradients transposed; the copies were 19 % of the Burda-size stacked step at N = 16,
    5 % after).
    """
    out = {}
    for name, p in models[0].items():
        stacked = torch.stack([m[name].detach() for m in models])
        order = (orders or {}).get(name)
        if order is not None and order != tuple(range(stacked.dim())):
            laid = torch.empty(
                [stacked.shape[d] for d in order], dtype=stacked.dtype, device=stacked.device
            )
            stacked = laid.permute(_inverse(order)).copy_(stacked)
        out[name] = stacked.requires_grad_(p.requires_grad)
    return out


def _inverse(order: Sequence[int]) -> tuple[int, ...]:
    """The permutation that undoes ``order``: ``t.permute(order).permute(_inverse(order))``
    is ``t``."""
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return tuple(inv)


def _dense_order(t: Tensor) -> tuple[int, ...] | None:
    """The order of ``t``'s dimensions in memory (outermost first) if ``t`` is a dense
    permutation of a contiguous tensor; ``None`` otherwise (overlapping or with gaps)."""
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d)))
    expected = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return order


def _gradient_orders(
    loss: Any, params: Mapping[str, Tensor], *inputs: Tensor
) -> dict[str, tuple[int, ...]]:
    """The memory order in which the stacked backward produces each parameter's gradient:
    one trial forward and backward of ``loss(params, *inputs)`` (vmapped; its first output
    is the per-run loss) on detached copies of ``params``, read by tensor hooks before
    autograd lays the gradient out like its parameter. Draws no random number."""
    trial = {
        name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in params.items()
    }
    orders: dict[str, tuple[int, ...]] = {}
    for name, p in trial.items():
        if p.requires_grad:

            def record(g: Tensor, name: str = name) -> None:
                order = _dense_order(g)
                if order is not None:
                    orders[name] = order

            p.register_hook(record)
    cuda = sorted({p.device.index or 0 for p in trial.values() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        loss(trial, *inputs)[0].sum().backward()
    return orders


def _run_loss(
    template: nn.Module,
    t: TrainConfig,
    floors_differ: bool,
    params: dict[str, Tensor],
    x: Tensor,
    noise: Tensor,
    beta: Tensor,
    free_bits: Tensor,
) -> tuple[Tensor, ...]:
    """One run's loss and log-terms (vmapped over runs): the solo step's objective, with
    the run's own KL weight and (where the runs' differ) free-bits floor."""
    terms = functional_call(template, params, (x,), {"k": t.k, "noise": noise})
    loss = training_loss(terms, t, beta, template.latent_dim, free_bits if floors_differ else None)
    return loss, terms.log_px_z, terms.log_pz, terms.log_qz, terms.flow_logdet


def check_model_stackable(cfgs: Sequence[Config]) -> None:
    """A trial of the stacked step on the models ``cfgs`` build (each under its own
    ``train.seed``, as a run builds it), before any run directory exists: the stack's own
    loss (:func:`_run_loss`, per-run free bits and KL weights) vmapped over two copies of
    each run's parameters and two images of ``model.x_shape`` (0 / 1 pixels: valid binary
    and 8-bit data; the values do not matter, no data is read), forward and backward, and
    its gradients against the same run's loss alone. Leaves the global random state as
    it found it.

    Raises:
        ConfigError: the models' buffers differ between runs (a buffer is not stacked:
            every run would use run 0's), the forward draws random numbers besides the
            posterior noise it is given or changes a buffer (both would be shared by all
            runs of the stack), vmap cannot batch an operation of the model, or a stacked
            gradient is not the run's own (a tensor the forward reads outside its
            parameters, say).
    """
    from ..models.build import build_model

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"this model cannot be trained in a stack: {why}; train it alone (vaeflow "
            "train, or vaeflow sweep without --stack)"
        )

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        models = []
        for cfg in cfgs:
            torch.manual_seed(cfg.train.seed)
            try:
                models.append(build_model(cfg.model))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"cannot build the model from [model]: {e}") from e
            _check_free_bits(cfg, models[-1])  # as a run's set-up: chain-rule KL or refusal
        first = dict(models[0].named_buffers())
        for i, model in enumerate(models[1:], start=1):
            for name, b in model.named_buffers():
                if b is not None and not torch.equal(b, first[name]):
                    raise refuse(
                        f"buffer {name!r} differs between run 0 and run {i} (drawn from the "
                        "seed?); a stack keeps one copy of the buffers"
                    )
        template = _template(models)
        n, t = len(models), cfgs[0].train
        floors = [c.train.free_bits for c in cfgs]
        dtype = next(template.parameters()).dtype
        x_shape = tuple(cfgs[0].model.x_shape)
        x = (torch.arange(2 * math.prod(x_shape)) % 2).to(dtype).reshape(2, *x_shape)
        params = _stacked_parameters([dict(m.named_parameters()) for m in models])
        noise = torch.randn(n, t.k, 2, template.latent_dim, dtype=dtype)
        beta = torch.ones(n, dtype=dtype)
        fb = torch.tensor(floors, dtype=dtype)
        differ = len(set(floors)) > 1
        buffers = {name: b.clone() for name, b in template.named_buffers() if b is not None}
        state = torch.get_rng_state()
        own_noise = refuse(
            "its training step draws random numbers besides the posterior noise (dropout, "
            "a stochastic estimator?), which would come from one stream for all runs"
        )
        loss = functools.partial(_run_loss, template, t, differ)
        try:
            stacked = vmap(loss)(params, x.expand(n, *x.shape), noise, beta, fb)[0]
            stacked.sum().backward()
        except Exception as e:  # noqa: BLE001 -- any failure of vmap means: not stackable
            if "random operation" in str(e):  # vmap's randomness="error" caught a draw
                raise own_noise from e
            raise refuse(f"vmap cannot batch its training step ({type(e).__name__}: {e})") from e
        if not torch.equal(torch.get_rng_state(), state):  # a draw vmap did not see
            raise own_noise
        for name, b in template.named_buffers():
            if b is not None and not torch.equal(b, buffers[name]):
                raise refuse(f"its training step changes buffer {name!r}")
        # Run 0 alone, as its solo step computes it: its model, its own floor and KL rule.
        alone = models[0]
        alone.likelihood.validate = False
        for p in alone.parameters():
            p.grad = None
        terms = alone(x, k=t.k, noise=noise[0])
        training_loss(terms, cfgs[0].train, 1.0, alone.latent_dim).backward()
        for name, q in alone.named_parameters():
            g_stack = params[name].grad
            # Float rounding of batched vs single products, relative to the tensor's scale.
            if (q.grad is None) != (g_stack is None) or (
                q.grad is not None
                and (g_stack[0] - q.grad).abs().max() > 1e-3 * q.grad.abs().max() + 1e-6
            ):
                raise refuse(
                    f"the stacked gradient of parameter {name!r} is not the run's own (does "
                    "the forward read a tensor outside the module's parameters?)"
                )


def stack_key(cfg: Config) -> str:
    """What must be equal for two configs to share a stack: the flattened config without
    :data:`STACKABLE_KEYS`, ``eval.*`` and ``run.*``, plus whether an EMA is kept."""
    flat = flatten_config(to_dict(cfg))
    kept = {
        k: v
        for k, v in flat.items()
        if k not in STACKABLE_KEYS and not k.startswith(_STACKABLE_SECTIONS)
    }
    kept["train.ema"] = cfg.train.ema_decay is not None
    return repr(sorted(kept.items()))


def _check_same_shape(cfgs: Sequence[Config]) -> None:
    """All configs stackable and equal outside :data:`STACKABLE_KEYS`; else name the key."""
    for cfg in cfgs:
        check_stackable(cfg)
    first = flatten_config(to_dict(cfgs[0]))
    for i, cfg in enumerate(cfgs[1:], start=1):
        if stack_key(cfg) == stack_key(cfgs[0]):
            continue
        flat = flatten_config(to_dict(cfg))
        keys = sorted(
            k
            for k in set(first) | set(flat)
            if first.get(k) != flat.get(k)
            and k not in STACKABLE_KEYS
            and not k.startswith(_STACKABLE_SECTIONS)
        ) or ["train.ema_decay (set in one run, none in the other)"]
        raise ConfigError(
            f"run {i} of the stack differs from run 0 in {', '.join(keys)}; runs of one "
            f"stack may differ only in {', '.join(sorted(STACKABLE_KEYS))}, eval.* and run.*"
        )


# ----------------------------------------------------------------------------- the stack


@dataclass
class _Member:
    """One run of the stack: its solo objects, its noise generator, its session counters."""

    run: _Run
    gen: torch.Generator
    steps_done: int = 0


class _Stack:
    """The runs still training, their parameters stacked: ``params[name]`` is a leaf
    ``(N, *shape)`` whose row ``r`` is ``members[r]``'s parameter ``name``.

    Each member's own model parameters are views of its rows (``p.data``), so its EMA,
    validation and checkpoints read the stack directly: the batched forward/backward
    fills ``params[name].grad``, and one batched update (:attr:`optimizer`, a
    :class:`~vaeflow.run.stack_optim.StackedOptimizer` whose moments each run's
    optimiser holds as views) moves every run's rows by its own learning rate, constants
    and step count; an optimiser it does not implement steps run by run on its rows.
    """

    def __init__(
        self, members: list[_Member], gradient_layout: bool = True, batched_update: bool = True
    ) -> None:
        """``gradient_layout=False`` keeps the stacked parameters contiguous (the layout
        before :func:`_gradient_orders`), ``batched_update=False`` steps each run's
        optimiser on its rows (before :mod:`~vaeflow.run.stack_optim`): the stack as it
        was, which ``benchmarks/stack.py`` times beside the current one."""
        self.batched_update = batched_update
        self._compile_loss = True  # until a compilation fails (_forward)
        model = members[0].run.model
        self.names = [name for name, _ in model.named_parameters()]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # The module functional_call runs: parameters come from the stack; its likelihood
        # does not check data (a data-dependent branch vmap cannot take): step() checks
        # every run's batch once, as the evaluator checks data once per batch.
        self.template = _template([m.run.model for m in members])
        self.members: list[_Member] = []
        self.params: dict[str, Tensor] = {}
        self.orders: dict[str, tuple[int, ...]] = {}
        self._bind(members)
        if not gradient_layout:
            return
        # Lay the stacked parameters out as their gradients come (see _stacked_parameters).
        cfg = members[0].run.cfg
        n, shape = len(members), (cfg.data.batch_size, *cfg.model.x_shape)
        x = torch.zeros((n, *shape), dtype=self.dtype, device=self.device)
        noise = torch.zeros(
            (n, cfg.train.k, shape[0], self.template.latent_dim),
            dtype=self.dtype,
            device=self.device,
        )
        beta = torch.ones(n, dtype=self.dtype, device=self.device)
        self.orders = _gradient_orders(self._loss, self.params, x, noise, beta, self.free_bits)
        if any(o != tuple(range(len(o))) for o in self.orders.values()):
            self._bind(members)

    @torch.no_grad()
    def _bind(self, members: list[_Member]) -> None:
        """Stack ``members``' parameters and make each model's parameters views of them."""
        self.members = members
        if not members:
            self.params = {}
            return
        models = [dict(m.run.model.named_parameters()) for m in members]
        self.params = _stacked_parameters(models, self.orders)
        for i, params in enumerate(models):
            for name, p in params.items():
                p.data = self.params[name].detach()[i]
        opts = [m.run.opt for m in members]
        if self.batched_update and stack_optim.supported(opts):  # one batched update
            compiled = members[0].run.cfg.train.compile_step  # the update as one graph
            self.optimizer: stack_optim.StackedOptimizer | None = stack_optim.StackedOptimizer(
                opts, models, self.params, compiled
            )
        else:  # each run's optimiser steps on its rows
            self.optimizer = None
            for opt in opts:
                # A fused kernel pairs elements by memory position: the moments must have
                # the layout the rows now have (a stack's rows need not be contiguous).
                _match_state_layout(opt)
        self.clip = torch.tensor(
            [
                math.inf if m.run.cfg.train.clip_norm is None else m.run.cfg.train.clip_norm
                for m in members
            ],
            dtype=self.dtype,
            device=self.device,
        )
        floors = [m.run.cfg.train.free_bits for m in members]
        # Equal floors keep the solo arithmetic exactly (the config's float, not a tensor).
        self.free_bits = torch.tensor(floors, dtype=self.dtype, device=self.device)
        run_loss = functools.partial(
            _run_loss, self.template, members[0].run.cfg.train, len(set(floors)) > 1
        )
        self._loss = vmap(run_loss)
        # train.compile_step: the batched forward and backward as compiled graphs too
        # (one compilation per set of runs; recompiled when runs leave).
        compile_step = members[0].run.cfg.train.compile_step and self._compile_loss
        self._compiled_loss = torch.compile(self._loss, dynamic=False) if compile_step else None

    def _forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """The vmapped loss of all runs: compiled under ``train.compile_step``, unless its
        compilation failed once (then eager from there on, with a warning; an error of the
        model itself is raised again by the eager call)."""
        if self._compiled_loss is not None:
            try:
                return self._compiled_loss(*inputs)
            except Exception as e:  # noqa: BLE001 -- dynamo/inductor failures of any kind
                warnings.warn(
                    f"train.compile_step: the stack's compiled forward failed ({type(e).__name__}:"
                    f" {str(e)[:300]}); the stack trains on with the eager forward and "
                    "backward (its update stays compiled)",
                    stacklevel=2,
                )
                self._compiled_loss, self._compile_loss = None, False
        return self._loss(*inputs)

    @contextlib.contextmanager
    def alone(self, i: int) -> Iterator[None]:
        """Member ``i``'s model on parameters of its own for the block (its bookkeeping):
        ``torch.save`` of a view would write the whole stack into its checkpoint."""
        params = list(self.members[i].run.model.named_parameters())
        for _, p in params:
            p.data = p.data.clone()
        optimizer = self.optimizer.alone(i) if self.optimizer else contextlib.nullcontext()
        try:
            with optimizer:
                yield
        finally:
            with torch.no_grad():
                for name, p in params:
                    row = self.params[name].detach()[i]
                    row.copy_(p.data)
                    p.data = row

    def drop(self, keep: list[int]) -> None:
        """Keep only members ``keep``; the others' models get parameters of their own."""
        for i, m in enumerate(self.members):
            if i not in keep:
                for p in m.run.model.parameters():
                    p.data = p.data.clone()
                if self.optimizer is not None:
                    self.optimizer.release(i)
        if self._compiled_loss is not None or (self.optimizer and self.optimizer.compiled):
            # Fewer runs: new shapes for every compiled graph. Start the compiler afresh
            # (~15 s on a 2-core CPU for the MLP), instead of piling up recompilations
            # of the same code until dynamo's recompile limit (8) silently runs it eagerly.
            torch._dynamo.reset()
        self._bind([self.members[i] for i in keep])

    def step(self) -> list[str | None]:
        """One update of every run in the stack; returns each run's skip reason (``None``:
        applied); :meth:`result` gives the full :class:`StepResult` when it is needed."""
        runs = [m.run for m in self.members]
        t = runs[0].cfg.train
        x = torch.stack([r.batches.batch(r.state.step) for r in runs])  # (N, B, *x_shape)
        runs[0].model._check_data(x.flatten(0, 1))  # the check the solo likelihood makes
        shape = (t.k, x.shape[1], self.template.latent_dim)
        noise = torch.stack(
            [
                torch.randn(shape, generator=m.gen, dtype=self.dtype, device=self.device)
                for m in self.members
            ]
        )
        betas = [_beta(r.cfg, r.state.step) for r in runs]
        beta = torch.tensor(betas, dtype=self.dtype, device=self.device)
        for p in self.params.values():
            p.grad = None
        loss, *terms = self._forward(self.params, x, noise, beta, self.free_bits)
        loss.sum().backward()  # the runs share no parameter: row r gets run r's gradient
        # A parameter the loss does not reach has no gradient, as alone (clipping skips
        # it, the optimiser leaves it); every other has (N, *shape), scalars (N,).
        grads = {name: p.grad for name, p in self.params.items()}
        with torch.no_grad():
            # clip_grad_norm_ per run: the norm of the per-tensor norms, before clipping.
            per_tensor = [  # over each row's own dimensions, without a copy of g
                torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())))
                if g.dim() > 1
                else g.abs()
                for g in grads.values()
                if g is not None
            ]
            norm = torch.linalg.vector_norm(torch.stack(per_tensor, dim=1), dim=1)
            coef = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
            for g in grads.values():
                if g is not None:
                    g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
            losses, norms = loss.detach().tolist(), norm.tolist()
        reasons = [
            _skip_reason(lo, gn, r.cfg.train.skip_grad_norm)
            for lo, gn, r in zip(losses, norms, runs, strict=True)
        ]
        if self.optimizer is not None:  # every run's update at once, skipped runs masked
            skipped = [r is not None for r in reasons]
            skip = torch.tensor(skipped, device=self.device) if any(skipped) else None
            self.optimizer.step(self.params, grads, skip)
        for i, (run, reason) in enumerate(zip(runs, reasons, strict=True)):
            if reason is None:  # the solo update on this run's rows
                if self.optimizer is None:
                    for name, p in run.model.named_parameters():
                        p.grad = None if grads[name] is None else grads[name][i]
                    run.opt.step()
                if run.ema is not None:
                    run.ema.update(run.model)
        self._last = (loss.detach(), [t.detach() for t in terms], norms, betas, reasons)
        return reasons

    def result(self, i: int) -> StepResult:
        """Row ``i``'s :class:`StepResult` of the last :meth:`step` (built only when a run
        logs: most steps need just the skip reason)."""
        loss, terms, norms, betas, reasons = self._last
        run_terms = Terms(terms[0][i], terms[1][i], terms[2][i], flow_logdet=terms[3][i])
        return StepResult(loss[i], run_terms, norms[i], betas[i], reasons[i])


def _skip_reason(loss: float, grad_norm: float, skip_grad_norm: float | None) -> str | None:
    """The solo step's skip decision (``vaeflow.run.step._update_step``)."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if not math.isfinite(grad_norm):
        return "non-finite gradient"
    if skip_grad_norm is not None and grad_norm > skip_grad_norm:
        return f"gradient norm {grad_norm:.3g} > {skip_grad_norm}"
    return None


@contextlib.contextmanager
def _own_rng(gen: torch.Generator) -> Iterator[None]:
    """Let the global generator of ``gen``'s device draw ``gen``'s stream (a run's
    bookkeeping: validation forks it, checkpoints save it); keep what it drew."""
    saved = _global_rng_state(gen.device)
    _set_global_rng_state(gen.device, gen.get_state())
    try:
        yield
    finally:
        gen.set_state(_global_rng_state(gen.device))
        _set_global_rng_state(gen.device, saved)


def _global_rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_global_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


# ----------------------------------------------------------------------------- driver


def train_stack(
    cfgs: Sequence[Config],
    run_dirs: Sequence[str | Path] | None = None,
    resume: bool | Sequence[bool] = False,
    stop_after_step: int | None = None,
    splits: DataSplits | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfgs`` as one stack; each run as :func:`vaeflow.run.train.train` would.

    Args:
        cfgs: validated configs, equal outside :data:`STACKABLE_KEYS` (else
            :class:`ConfigError` naming the first differing key).
        run_dirs: one run directory per config (default ``run.root / run.name``).
        resume: continue every run (or, one flag per run, those runs) from ``last.pt``.
        stop_after_step: stop each run (as if preempted) after this step.
        splits: preloaded data (tests); default loads ``cfgs[0].data`` once for all.

    Returns:
        One summary per run, in order: what ``train`` returns (and writes as
        ``train_summary.json``), or for a run that diverged ``{"status": "diverged",
        "error": message}`` with ``last.pt`` saved and no summary file, as ``train`` leaves
        a run that raises :class:`TrainingDiverged`.
    """
    if not cfgs:
        raise ValueError("train_stack needs at least one config")
    _check_same_shape(cfgs)
    dirs = [Path(d) for d in (run_dirs or [Path(c.run.root) / c.run.name for c in cfgs])]
    if len(dirs) != len(cfgs) or len(set(map(str, dirs))) != len(dirs):
        raise ValueError("train_stack needs one distinct run directory per config")
    flags = [resume] * len(cfgs) if isinstance(resume, bool) else list(resume)
    if splits is None:
        d = cfgs[0].data
        splits = load_splits(d.dataset, d.root, val_size=d.val_size, download=True)
    if not all(flags):  # a resumed run passed the trial when it started
        check_model_stackable(cfgs)
    members = []
    for i, (cfg, run_dir, flag) in enumerate(zip(cfgs, dirs, flags, strict=True)):
        run = _setup_run(cfg, run_dir, flag, splits, stacked=True)
        if i > 0:  # one progress line for the stack, not N fighting over one terminal line
            run.progress = Progress(cfg.train.steps, enabled=False)
        # _setup_run leaves the global RNG where this run's training draws start.
        gen = torch.Generator(device=run.device)
        gen.set_state(_global_rng_state(run.device))
        members.append(_Member(run, gen))
    summaries: dict[int, dict[str, Any]] = {}
    order = {id(m): i for i, m in enumerate(members)}
    t_start = time.perf_counter()

    def leave(m: _Member, status: str) -> None:
        with _own_rng(m.gen):
            summaries[order[id(m)]] = _finish(
                m.run, status, time.perf_counter() - t_start, m.steps_done
            )

    stack: _Stack | None = None
    try:
        for m in [m for m in members if m.run.state.step >= m.run.cfg.train.steps]:
            leave(m, "completed")  # a resumed run that had already finished
        training = [m for m in members if order[id(m)] not in summaries]
        if training:
            stack = _Stack(training)
        while stack is not None and stack.members:
            reasons = stack.step()
            keep, leaving = [], []
            for i, (m, reason) in enumerate(zip(stack.members, reasons, strict=True)):
                try:
                    status = _after_step(stack, i, m, reason, stop_after_step)
                except TrainingDiverged as e:  # this run stops, as alone; the others go on
                    status = f"diverged: {e}"
                if status is None:
                    keep.append(i)
                else:
                    leaving.append((m, status))
            if leaving:
                stack.drop(keep)
            for m, status in leaving:
                if status.startswith("diverged: "):
                    # As train() leaves a diverged run: last.pt saved, no summary file.
                    summaries[order[id(m)]] = {"status": "diverged", "error": status[10:]}
                    m.run.logger.close()
                else:
                    leave(m, status)
    finally:
        for m in members:
            m.run.progress.close()
    return [summaries[i] for i in range(len(members))]


def _after_step(
    stack: _Stack, i: int, m: _Member, skip_reason: str | None, stop_after_step: int | None
) -> str | None:
    """The solo loop's bookkeeping after an update of member ``i``: the status with which
    it leaves the stack, or ``None`` while it trains on.

    Raises:
        TrainingDiverged: too many consecutive skipped updates (``last.pt`` saved).
    """
    run, t = m.run, m.run.cfg.train
    step = run.state.step
    run.state.record_update(skip_reason is not None)
    run.means.add(stack.result(i))  # the interval means, as the solo loop adds them
    run.state.step = step + 1
    m.steps_done += 1
    with warnings.catch_warnings():
        # The solo optimiser never steps here (the stack does it); torch warns about that.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        run.sched.step()
    if skip_reason is not None and run.state.consecutive_skips >= t.max_consecutive_skips:
        with stack.alone(i), _own_rng(m.gen):
            run.save("last.pt")
        raise TrainingDiverged(
            f"{run.state.consecutive_skips} consecutive updates skipped at step {step} "
            f"(last: {skip_reason}); the parameters before the failures are saved in "
            f"{run.ckpt_dir / 'last.pt'}. Lower train.lr, set train.clip_norm, add "
            "train.kl_warmup_steps, or raise train.max_consecutive_skips."
        )
    finished = run.state.step >= t.steps
    if _periodic_due(run):
        with stack.alone(i), _own_rng(m.gen):
            early = _periodic(run, stack.result(i))
        if early is not None:
            return early
    stopped = stop_after_step is not None and run.state.step >= stop_after_step
    if stopped:
        return f"stopped after step {run.state.step} (stop_after_step)"
    return "completed" if finished else None
