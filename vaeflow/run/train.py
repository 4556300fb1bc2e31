"""The training loop: config -> trained model, checkpoints, logs; resumable and robust.

:func:`train` runs a whole experiment: it builds data and model from the config,
optimises the (beta-weighted, free-bits) ELBO or the IWAE bound, validates with IWAE-k,
keeps ``last.pt``/``best.pt``, and writes TensorBoard + ``metrics.jsonl``. The model is
only ever used as ``model(x, k) -> Terms`` (docs/design.md). It is a short driver over
parts that can be read and tested alone: :func:`_setup_run` (model, data, optimiser,
resume), :func:`_wrap_for_speed` (DDP, ``torch.compile``), :func:`_update_step` (one
robust update; under ``train.compile_step`` :class:`_CompiledStep`, the same update
compiled whole) and :func:`_periodic` (log, validate, images, checkpoint, early stop).

Without a validation split (``data.val_size = 0``: a fixed budget on the whole training
file, as Burda et al. 2016 and the IAF code train) there are no validation passes and no
``best.pt``; only ``last.pt`` is kept, image grids reconstruct (fixed-seed binarised)
training examples, and the HParams metrics are the last training scalars.

Robust step (after vdvae): a non-finite loss, a non-finite gradient norm or a norm above
``skip_grad_norm`` skips the update; skips are counted and logged, and too many in a row
stop the run with a message and a usable checkpoint. Under ``train.sync_free`` the same
decision is a device tensor, applied without a host read (:func:`_apply_unless_skipped`),
and the counters live on the device (:class:`_DeviceSkips`) until the next periodic step.

Resume is bit-exact on CPU: data batches are a pure function of (seed, step)
(:class:`vaeflow.data.TrainBatches`), RNG states are checkpointed, and validation runs
under a forked RNG so its frequency never changes the training trajectory.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..atomic import remove_stale_temps, write_json_atomic
from ..config import Config, ConfigError, TrainConfig, to_dict
from ..data import (
    DataSplits,
    TrainBatches,
    eval_batches,
    load_splits,
    prepare_eval,
    test_subset,
    to_memory_format,
    to_unit_interval,
)
from ..layers import (
    IAFCodeConv2d,
    IAFCodeConvTranspose2d,
    IAFCodeLinear,
    fused_parameters,
    weight_norm_data_init,
)
from ..models.bounds import Terms, elbo, iwae
from ..models.build import build_model
from ..models.init import output_bias_from_data_
from ..models.vae import VAE, _data_validation_off
from .checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .evaluate import hparams_metric_tags
from .logger import (
    Progress,
    RunLogger,
    flatten_config,
    has_hparams_experiment,
    hparams_order,
)
from .optim import AdamNormGrad, IAFAdamax, IWAEAdam, init_state, update_unless
from .utils import resolve_device, set_tf32

__all__ = [
    "train",
    "TrainingDiverged",
    "EMA",
    "StepResult",
    "SKIP_REASONS",
    "validate_bounds",
]


class TrainingDiverged(RuntimeError):
    """Too many consecutive skipped updates (non-finite loss or exploding gradients), or a
    validation bound fallen more than ``train.divergence_nats`` below its best."""


@dataclass(frozen=True)
class _Dist:
    """Data-parallel context: ``world == 1`` without ``torchrun``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed(device_name: str) -> _Dist:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Backend: NCCL on CUDA, gloo on CPU (multi-node works the same way: ``torchrun``
    sets MASTER_ADDR/PORT, RANK and WORLD_SIZE).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return _Dist(rank, world, local)


def _any(flag: bool, ctx: _Dist, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (skip decisions must agree across ranks)."""
    if not ctx.active:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class EMA:
    """Exponential moving average of a model's floating-point state (Polyak averaging).

    After update ``n`` the average is ``ema = d_n * ema + (1 - d_n) * current`` with
    ``d_n = min(decay, (1 + n) / (10 + n))``: the warm-up keeps the average from being
    dominated by the random initial weights early in training (a plain 0.999 average
    still holds 74 % of the initialisation after 300 steps).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self._updates = 0
        # The count on the device once an update was masked by a device flag
        # (train.sync_free): the host cannot know it without a read.
        self._count: Tensor | None = None
        self.shadow = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @property
    def updates(self) -> int:
        """Updates averaged in so far (under ``train.sync_free`` a host read of the device
        count)."""
        return int(self._count.item()) if self._count is not None else self._updates

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """Average the model's current weights in; with ``skip`` (a 0-d bool tensor on the
        device, ``train.sync_free``) only where it is false, without reading it."""
        live = model.state_dict()
        keys = list(self.shadow)
        if skip is None and self._count is None:
            d = min(self.decay, (1 + self._updates) / (10 + self._updates))
            if keys:  # one foreach call instead of a lerp_ per tensor (same arithmetic)
                torch._foreach_lerp_(
                    [self.shadow[k] for k in keys], [live[k].detach() for k in keys], 1.0 - d
                )
            self._updates += 1
            return
        self.count_on(skip.device if skip is not None else self._count.device)
        self.update_masked([live[k].detach() for k in keys], skip)

    def count_on(self, device: torch.device) -> Tensor:
        """The update count as a float64 device tensor (created from the host count on
        first use; from then on the count lives there)."""
        if self._count is None:
            self._count = torch.tensor(float(self._updates), dtype=torch.float64, device=device)
        return self._count

    def live_tensors(self, model: nn.Module) -> list[Tensor]:
        """The model's tensors that are averaged, in the order of :meth:`update_masked`:
        the parameters and buffers themselves (``state_dict(keep_vars=True)``)."""
        live = model.state_dict(keep_vars=True)
        return [live[k] for k in self.shadow]

    @torch.no_grad()
    def update_masked(self, live: list[Tensor], skip: Tensor | None) -> None:
        """Average ``live`` (one tensor per shadow entry, in order) in unless the 0-d bool
        ``skip`` is set, without reading it; :meth:`count_on` must have been called. Only
        tensor operations, so the compiled training step (``train.compile_step``) traces
        it."""
        assert self._count is not None, "call count_on(device) first"
        applied = torch.ones_like(self._count, dtype=torch.bool) if skip is None else ~skip
        # The host path's weight computed in float64 (Python's floats), so that it rounds
        # to the same float32; weight 0 leaves the average as it was (live weights finite).
        n = self._count
        d = torch.clamp((1 + n) / (10 + n), max=self.decay)
        weight = torch.where(applied, 1.0 - d, torch.zeros_like(d))
        if live:
            shadow = list(self.shadow.values())
            by_dtype = {v.dtype: weight.to(v.dtype) for v in shadow}
            # A list of 0-d weights: a tensor passed as the one weight is converted to a
            # Python scalar, a host read.
            torch._foreach_lerp_(shadow, live, [by_dtype[v.dtype] for v in shadow])
        self._count += applied

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.shadow = {k: v.to(device) for k, v in state["shadow"].items()}
        self._updates = int(state["updates"])
        self._count = None

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model``."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)


def _prior_split(cfg: Config) -> bool:
    """Whether the prior's parameters get a param group of their own (only then, so
    runs without these options keep the one-group optimiser state of older checkpoints)."""
    t = cfg.train
    return t.prior_lr_scale != 1.0 or t.prior_freeze_steps > 0


def _lr_lambdas(cfg: Config, model: nn.Module) -> list:
    """One schedule per param group: the model's, and the prior's when it has its own
    (the same schedule, zero while the prior is frozen; its scale is in its base lr)."""
    factor = _lr_lambda(cfg)
    if not _prior_split(cfg) or not _prior_parameters(model):
        return [factor]
    freeze = cfg.train.prior_freeze_steps

    def prior_factor(step: int) -> float:
        return 0.0 if step < freeze else factor(step)

    return [factor, prior_factor]


def _prior_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prior's own parameters (a VampPrior's encoder belongs to the model, not here)."""
    prior = getattr(model, "prior", None)
    if prior is None:
        return []
    shared = {
        id(p) for name, m in model.named_children() if name != "prior" for p in m.parameters()
    }
    return [p for p in prior.parameters() if id(p) not in shared]


def _lr_lambda(cfg: Config):
    t = cfg.train

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / t.lr_warmup_steps) if t.lr_warmup_steps > 0 else 1.0
        if t.lr_schedule == "cosine":
            progress = min(1.0, step / max(1, t.steps))
            decay = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        elif t.lr_schedule == "exponential":
            decay = t.lr_decay ** (step // t.lr_decay_every)
        elif t.lr_schedule == "multistep":
            decay = t.lr_decay ** bisect.bisect_right(t.lr_milestones, step)
        else:
            decay = 1.0
        return warm * decay

    return factor


def _optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser over the model's parameters: one param group, or two
    when the prior learns at its own rate or starts late (``_prior_split``)."""
    t = cfg.train
    kw = {"lr": t.lr, "betas": tuple(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
    params = list(model.parameters())
    fusable = _fusable(params)
    prior = _prior_parameters(model) if _prior_split(cfg) else []
    groups: list = params
    if prior:
        ids = {id(p) for p in prior}
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": rest}, {"params": prior, "lr": t.lr * t.prior_lr_scale}]
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            groups,
            lr=t.lr,
            alpha=t.alpha,
            eps=t.eps,
            weight_decay=t.weight_decay,
            momentum=t.momentum,
            foreach=True,
        )
    if t.optimizer == "adam_normgrad":
        splits = fused_parameters(model) if t.normgrad_split else None
        return AdamNormGrad(groups, fused=fusable, splits=splits, **kw)
    if t.optimizer == "adam_iwae":
        return IWAEAdam(
            groups,
            lr=t.lr,
            betas=tuple(t.betas),
            eps=t.eps,
            initial_second_moment=t.initial_second_moment,
        )
    if t.optimizer == "adam":
        # The fused kernel (CPU and CUDA): one pass over all parameters instead of ~10
        # small ops per tensor (the gain is measured in benchmarks/README.md). Same
        # update rule, different rounding. A
        # resumed run keeps its checkpoint's implementation (load_state_dict restores the
        # param groups' fused/foreach flags), so it continues bit-exactly.
        return torch.optim.Adam(groups, fused=fusable, **kw)
    if t.optimizer == "adamax_iaf":
        return IAFAdamax(groups, **kw)
    return torch.optim.Adamax(groups, foreach=True, **kw)  # Adamax has no fused kernel


def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    ``load_state_dict`` keeps the saved layout; after a resume that switched
    ``train.channels_last`` the conv weights are NHWC and their moments NCHW, and the fused
    kernel walks all of them linearly, pairing each weight with another element's moments.
    """
    for p, state in opt.state.items():
        for key, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[key] = torch.empty_like(p).copy_(v)  # empty_like keeps p's layout


def _fusable(params: list[torch.Tensor]) -> bool:
    return all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )


def _beta(cfg: Config, step: int) -> float:
    """KL weight of the step: ``min(1, kl_warmup_start + step / kl_warmup_steps)``."""
    w = cfg.train.kl_warmup_steps
    return 1.0 if w <= 0 else min(1.0, cfg.train.kl_warmup_start + step / w)


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=here,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import numpy
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "vaeflow": __import__("vaeflow").__version__,
    }


@dataclass
class _State:
    step: int = 0
    best: float = -math.inf
    best_step: int = -1
    bad_validations: int = 0
    skipped: int = 0
    consecutive_skips: int = 0
    # The training scalars' sums since the last log (:class:`_IntervalMeans`), copied to
    # the host when a checkpoint is written, so a resumed run logs the same means.
    interval_sums: list[float] | None = None

    def record_update(self, skipped: bool) -> None:
        """Count a skipped update, or reset the run of consecutive skips."""
        if skipped:
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0


class _IntervalMeans:
    """The training scalars averaged over each logging interval, summed on the device.

    A single logged step is one minibatch (noisy: batch 16 moves the ELBO by several
    nats); the mean over the ``log_every`` steps since the last log is what a learning
    curve should show. Each update adds its loss, ELBO, KL and reconstruction to device
    sums (no host read); :meth:`read` takes the means at a logging step and starts the
    next interval. A step whose scalars are not all finite (a skipped update) is left out
    of the means. Logged as ``train/mean_<name>_nats`` beside the step's own
    ``train/<name>_nats``.
    """

    NAMES = ("loss", "elbo", "kl", "recon")

    def __init__(self, device: torch.device, sums: Sequence[float] | None = None) -> None:
        # float64 sums: thousands of float32 additions would lose digits of the mean.
        start = list(sums) if sums else [0.0] * (len(self.NAMES) + 1)
        self.sums = torch.tensor(start, dtype=torch.float64, device=device)  # [..., count]

    @torch.no_grad()
    def add(self, result: StepResult) -> None:
        """Add one update's batch means (device ops only)."""
        terms = result.terms
        loss = result.loss.detach().reshape(())
        kl_, recon = terms.kl.mean(), terms.log_px_z.mean()
        # The ELBO's batch mean is recon - KL (both linear means): no third reduction.
        values = torch.stack([loss.to(kl_.dtype), recon - kl_, kl_, recon]).double()
        finite = torch.isfinite(values).all()
        self.sums[:-1] += torch.where(finite, values, 0.0)
        self.sums[-1] += finite

    def read(self) -> dict[str, float]:
        """The interval's means (one host read), and a fresh interval; ``{}`` when no
        finite step was added."""
        *sums, count = self.sums.tolist()
        self.sums.zero_()
        if count == 0:
            return {}
        return {f"train/mean_{n}_nats": v / count for n, v in zip(self.NAMES, sums, strict=True)}

    def host(self) -> list[float]:
        """The running sums and count, for a checkpoint (one host read)."""
        return self.sums.tolist()


class _DeviceSkips:
    """The skip counters of ``train.sync_free``: on the device, read only at periodic steps.

    Besides the total and the current run of consecutive skips it keeps what the syncing
    loop would have stopped on at once: the first step at which the run reached
    ``limit`` (``-1``: not yet) and that step's skip code (1 + an index into
    :data:`SKIP_REASONS`), even if updates were applied again before the read.
    """

    def __init__(self, state: _State, limit: int, device: torch.device) -> None:
        self.limit = limit
        values = [state.skipped, state.consecutive_skips, -1, 0]
        self.skipped, self.run, self.failed_at, self.failed_code = torch.tensor(
            values, dtype=torch.int64, device=device
        ).unbind()

    def record(self, code: Tensor, step: int) -> None:
        """Count the update of ``step`` whose skip code (0: applied) is ``code``."""
        skip = code != 0
        self.skipped = self.skipped + skip
        self.run = torch.where(skip, self.run + 1, 0)
        first = (self.run >= self.limit) & (self.failed_at < 0)
        self.failed_at = torch.where(first, step, self.failed_at)
        self.failed_code = torch.where(first, code, self.failed_code)

    def read(self, state: _State) -> tuple[int, int] | None:
        """Copy the counters into ``state`` (one host read); return ``(step, skip
        code)`` of the step at which the consecutive-skip limit was reached, else
        ``None``."""
        values = torch.stack([self.skipped, self.run, self.failed_at, self.failed_code]).tolist()
        state.skipped, state.consecutive_skips, failed_at, code = values
        return None if failed_at < 0 else (failed_at, code)


@torch.no_grad()
def validate_bounds(model: VAE, x: Tensor, k: int, batch_size: int) -> dict[str, float]:
    """ELBO and IWAE-k (nats per example) on preprocessed data ``x (N, *x_shape)``, and a
    hierarchy's single-sample KL per layer (``kl_layer1``, ... bottom first)."""
    model.eval()
    sums = {"elbo": 0.0, "iwae": 0.0, "kl": 0.0, "recon": 0.0}
    hierarchy = getattr(model, "num_layers", 1) > 1
    n = 0
    for xb in eval_batches(x, batch_size):
        ll = model.log_likelihood(xb, k=k, chunk=k)
        sums["elbo"] += ll.elbo.sum().item()
        sums["iwae"] += ll.log_px.sum().item()
        sums["kl"] += ll.kl.sum().item()
        sums["recon"] += ll.log_px_z.sum().item()
        if hierarchy:
            # The KL per layer (bottom first) from one more sample per example: the
            # chunked estimator keeps only per-example statistics, not the layers' terms.
            for i, layer_kl in enumerate(model(xb, k=1).layer_kl, start=1):
                sums[f"kl_layer{i}"] = sums.get(f"kl_layer{i}", 0.0) + layer_kl.sum().item()
        n += xb.shape[0]
    model.train()
    return {name: v / n for name, v in sums.items()}


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop_after_step: int | None = None,
    splits: DataSplits | None = None,
) -> dict[str, Any]:
    """Train the model described by ``cfg``; return the summary (also ``train_summary.json``).

    The driver: :func:`_setup_run` builds (or restores) everything the run holds,
    :func:`_update_step` makes one robust optimiser update, :func:`_periodic` logs,
    validates, draws image grids, checkpoints and decides early stopping, and
    :func:`_finish` writes the summary.

    Args:
        cfg: a validated :class:`~vaeflow.config.Config`.
        run_dir: run directory (default ``cfg.run.root / cfg.run.name``).
        resume: continue from ``run_dir/checkpoints/last.pt``.
        stop_after_step: stop (as if preempted) after this step, after any checkpoint
            due at it; for tests of resume and for time-boxed jobs.
        splits: preloaded data (tests); default loads ``cfg.data``.

    Returns:
        The summary dict: final/best validation bounds (``None`` without a validation
        split, which ``"validation"`` then says), steps, skipped updates, timing.
    """
    run = _setup_run(cfg, run_dir, resume, splits)
    cfg = run.cfg  # under DDP the loss's per-rank settings (see _setup_run)
    t = cfg.train
    t_start = time.perf_counter()
    steps_done = 0
    stopped = "completed"
    # A delayed prior: its parameters take no gradient (so no optimiser state either)
    # until train.prior_freeze_steps; it then starts as a fresh learner.
    prior_params = _prior_parameters(run.model) if t.prior_freeze_steps else []
    try:
        while run.state.step < t.steps:
            step = run.state.step
            x = to_memory_format(run.batches.batch(step), t.channels_last)
            if run.ctx.active:  # this rank's shard of the global batch
                x = x[run.ctx.rank :: run.ctx.world]
            if run.compiled is not None:  # train.compile_step
                result = run.compiled(x, _beta(cfg, step), frozen=step < t.prior_freeze_steps)
            else:
                result = _update_step(
                    run.model,
                    run.step_model,
                    run.opt,
                    run.sched,
                    run.ema,
                    x,
                    t,
                    beta=_beta(cfg, step),
                    ctx=run.ctx,
                    device=run.device,
                    amp=run.amp,
                    frozen=prior_params if step < t.prior_freeze_steps else (),
                )
            if run.skips is None:
                run.state.record_update(result.skipped)
            else:
                run.skips.record(result.skip_code, step)
            run.means.add(result)
            run.state.step = step + 1
            steps_done += 1
            if run.skips is None:
                if result.skipped and run.state.consecutive_skips >= t.max_consecutive_skips:
                    _stop_diverged(run, step, str(result.skip_reason))
            elif _periodic_due(run):
                _read_device_skips(run)  # before _periodic logs or saves the counters
            early = _periodic(run, result)
            if early is not None:
                stopped = early
                break
            if stop_after_step is not None and run.state.step >= stop_after_step:
                stopped = f"stopped after step {run.state.step} (stop_after_step)"
                break
        if run.skips is not None:  # the summary's count; a failure since the last read
            _read_device_skips(run)
    finally:
        run.progress.close()
    return _finish(run, stopped, time.perf_counter() - t_start, steps_done)


def _stop_diverged(run: _Run, step: int, reason: str, read_at: int | None = None) -> NoReturn:
    """Save ``last.pt`` and raise :class:`TrainingDiverged`: the consecutive-skip limit was
    reached at ``step`` (under ``train.sync_free`` seen at the read at ``read_at``)."""
    run.save("last.pt")
    limit = run.cfg.train.max_consecutive_skips
    seen = "" if read_at is None else f", read at step {read_at} (train.sync_free)"
    raise TrainingDiverged(
        f"{limit} consecutive updates skipped at step {step} (last: {reason}{seen}). The "
        f"parameters before the failures are saved in {run.ckpt_dir / 'last.pt'}. Lower "
        "train.lr, set train.clip_norm, add train.kl_warmup_steps, or raise "
        "train.max_consecutive_skips."
    )


def _stop_fallen(run: _Run) -> NoReturn:
    """Save ``last.pt`` and raise :class:`TrainingDiverged`: the validation bound fell more
    than ``train.divergence_nats`` below its best."""
    run.save("last.pt")
    state, t = run.state, run.cfg.train
    now = run.last_val["val/iwae"] if run.last_val else float("nan")
    raise TrainingDiverged(
        f"the validation bound fell to {now:.2f} nats at step {state.step}, more than "
        f"train.divergence_nats = {t.divergence_nats} below its best ({state.best:.2f} at "
        f"step {state.best_step}): the run diverged. best.pt keeps the best parameters, "
        f"{run.ckpt_dir / 'last.pt'} the last. Lower train.lr, set train.clip_norm or "
        "train.skip_grad_norm, or raise train.divergence_nats."
    )


def _read_device_skips(run: _Run) -> None:
    """Bring the device skip counters of ``train.sync_free`` into ``run.state``; stop the
    run if the consecutive-skip limit was reached since the last read."""
    assert run.skips is not None
    failed = run.skips.read(run.state)
    if failed is not None:
        step, code = failed
        _stop_diverged(run, step, SKIP_REASONS[code - 1], read_at=run.state.step)


# ----------------------------------------------------------------------------- set-up


@dataclass
class _Run:
    """Everything a training run holds between steps (built by :func:`_setup_run`).

    ``model`` is the plain :class:`VAE` (parameters, EMA, checkpoints, validation);
    ``step_model`` is what the update step calls: the same model, possibly wrapped in
    DDP and/or ``torch.compile`` (:func:`_wrap_for_speed`). ``compiled`` is the whole
    compiled update of ``train.compile_step`` (:class:`_CompiledStep`), which the loop
    then calls instead of :func:`_update_step`.
    """

    cfg: Config
    run_dir: Path
    ckpt_dir: Path
    ctx: _Dist
    device: torch.device
    amp: bool
    model: VAE
    step_model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    state: _State
    config_dict: dict[str, Any]
    batches: TrainBatches
    x_val: Tensor
    has_val: bool
    x_img: Tensor
    image_split: str
    logger: RunLogger
    progress: Progress
    last_val: dict[str, float]
    skips: _DeviceSkips | None = None  # train.sync_free: the skip counters on the device
    compiled: _CompiledStep | None = None  # train.compile_step: the whole update compiled
    x_test: Tensor | None = None  # train.test_every: the test-curve examples, else None
    means: _IntervalMeans | None = None  # the training scalars' means since the last log

    def save(self, name: str) -> None:
        """Write ``checkpoints/<name>`` (rank 0 only): everything a bit-exact resume needs."""
        if self.ctx.rank != 0:
            return
        if self.means is not None:
            self.state.interval_sums = self.means.host()
        save_checkpoint(
            self.ckpt_dir / name,
            {
                "model": self.model.state_dict(),
                "optimizer": _host_lrs(self.opt.state_dict()),
                "scheduler": _host_lrs(self.sched.state_dict()),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "step": self.state.step,
                "train_state": vars(self.state).copy(),
                "rng": rng_state(),
                "config": self.config_dict,
            },
        )


def _setup_run(
    cfg: Config,
    run_dir: str | Path | None,
    resume: bool,
    splits: DataSplits | None,
    stacked: bool = False,
) -> _Run:
    """Build the model, data, optimiser and logger of a run, fresh or resumed.

    ``stacked``: the run trains in a stack (:mod:`vaeflow.run.stack`), whose own step
    replaces the run's: no compiled step (``train.compile_step`` compiles the stack's
    step instead; building the run's would turn its learning rates into device tensors
    and its EMA to masked updates) and host-side skip counting.

    The order is part of the behaviour: the model is built (under ``train.seed``, the
    same weights on every rank) before the run directory is touched, so a config error
    leaves nothing behind; the per-rank posterior-noise seed is set after everything
    that draws from the global RNG at build time, and a resume then replaces it with the
    checkpoint's RNG state.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run.root) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    ctx = _init_distributed(cfg.train.device)
    if cfg.train.compile_step and ctx.active:
        raise ConfigError(
            f"train.compile_step = true runs in one process, but torchrun started "
            f"{ctx.world}; for data-parallel runs use train.compile = true (the model's "
            "forward) with train.sync_free = true, and train.compile_step = false"
        )
    if not resume and (ckpt_dir / "last.pt").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run (checkpoints/last.pt); pass --resume to continue "
            "it, or choose another run.name / delete the directory"
        )
    if ctx.active:
        dist.barrier()  # every rank has checked for an existing run before rank 0 writes
    # Build the model before touching the run directory: a bad component name or option
    # is a config error, and must not leave an empty run behind.
    try:
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build the model from [model]: {e}") from e
    _check_free_bits(cfg, model)
    if ctx.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # A run killed inside an atomic write (preempted while saving last.pt) leaves its
        # temp file, as large as a checkpoint; nothing else would ever remove it.
        remove_stale_temps(run_dir, recursive=True)
    t = cfg.train
    device = resolve_device(t.device)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if ctx.active and cfg.data.batch_size % ctx.world:
        raise ValueError(
            f"data.batch_size = {cfg.data.batch_size} is the global batch and must be "
            f"divisible by the {ctx.world} processes"
        )
    run_cfg = cfg  # what the loop reads; config.json keeps cfg as written
    if ctx.active and t.free_bits_batch_splits > 1:
        # The S sub-batches are strided over the global batch (bounds._batch_mean), and
        # each rank holds the strided shard x[rank::world]: its own S / world strided
        # sub-batches are exactly its share of the global S, so DDP floors as one process.
        if t.free_bits_batch_splits % ctx.world:
            raise ConfigError(
                f"train.free_bits_batch_splits = {t.free_bits_batch_splits} sub-batches of "
                f"the global batch cannot be shared by {ctx.world} processes; use a multiple "
                f"of {ctx.world}"
            )
        t = dataclasses.replace(t, free_bits_batch_splits=t.free_bits_batch_splits // ctx.world)
        run_cfg = dataclasses.replace(cfg, train=t)
    amp = t.amp and device.type == "cuda"
    if t.amp and not amp:
        warnings.warn(
            "train.amp = true is ignored on CPU (bf16 autocast is CUDA-only)", stacklevel=3
        )
    if t.tf32 and device.type != "cuda":
        warnings.warn("train.tf32 = true is ignored on CPU (TF32 is CUDA-only)", stacklevel=3)
    set_tf32(t.tf32)  # never torch's default (cuDNN convolutions in TF32)

    if splits is None:
        splits = load_splits(
            cfg.data.dataset, cfg.data.root, val_size=cfg.data.val_size, download=True
        )
    batches = TrainBatches(
        splits.train,
        cfg.data.batch_size,
        cfg.data.seed if cfg.data.batch_seed is None else cfg.data.batch_seed,
        splits.kind,
        cfg.data.binarization,
        device,
        shuffle=cfg.data.shuffle,
    )
    x_val = prepare_eval(splits.val, splits.kind, cfg.data.binarization, cfg.data.seed, device)
    has_val = len(x_val) > 0  # data.val_size = 0: a fixed budget, nothing to validate on
    if t.val_size is not None:
        x_val = x_val[: t.val_size]
    # Reconstruction grids show validation examples, or without a validation split the
    # first training examples, binarised as evaluation data are (a fixed-seed draw).
    x_img = (
        x_val[:32]
        if has_val
        else prepare_eval(
            splits.train[:32], splits.kind, cfg.data.binarization, cfg.data.seed, device
        )
    )

    x_test = _test_curve_examples(cfg, splits, device) if t.test_every else None

    model = model.to(device)
    if t.channels_last:
        # Here, not in _wrap_for_speed: the optimiser state must follow the parameters'
        # layout, so the layout is set before the optimiser (and a resume) sees them.
        model = model.to(memory_format=torch.channels_last)
        x_val = to_memory_format(x_val, channels_last=True)
        x_img = to_memory_format(x_img, channels_last=True)
        if x_test is not None:
            x_test = to_memory_format(x_test, channels_last=True)
    # Independent posterior noise per rank (rank 0 keeps the single-process stream).
    torch.manual_seed(t.seed + 7919 * ctx.rank)
    if cfg.model.prior.init_from_data and not resume:
        _init_pseudo_inputs_from_data(model, splits.train, cfg.data.seed)
    if cfg.model.output_bias_from_data and not resume:
        _init_output_bias_from_data(model, splits.train)
    if not resume and needs_data_init(model):
        # The first batch (under DDP this rank's shard, as a training step sees it; rank
        # 0's result is what DDP broadcasts). The code initialises on one GPU's share.
        x_init = to_memory_format(batches.batch(0), t.channels_last)
        if ctx.active:
            x_init = x_init[ctx.rank :: ctx.world]
        _data_dependent_init(model, x_init, t.seed)
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambdas(cfg, model))
    ema = EMA(model, t.ema_decay) if t.ema_decay is not None else None
    config_dict = to_dict(cfg)
    if resume:
        _check_same_optimizer(run_dir, t.optimizer, t.normgrad_split)
        state = _restore(ckpt_dir / "last.pt", model, opt, sched, ema, device)
        if ctx.rank == 0:
            _record_resumed_config(run_dir, config_dict, state.step)
        if ctx.rank > 0:  # only rank 0's RNG is checkpointed: bit-exact resume is 1-process
            torch.manual_seed(t.seed + 7919 * ctx.rank + state.step)
    else:
        state = _State()
        if ctx.rank == 0:
            _record_new_run(run_dir, config_dict, device, splits, len(x_val))
    if t.sync_free and not t.compile_step:  # the compiled step needs no fused kernel
        _check_sync_free(opt)

    # Resume: drop records past the checkpoint (logged before the kill). Fresh start:
    # drop everything a killed, never-checkpointed earlier attempt left behind.
    logger = RunLogger(run_dir, rank=ctx.rank, purge_step=state.step + 1 if resume else 0)
    progress = Progress(t.steps, enabled=None if ctx.rank == 0 else False)
    step_model = _wrap_for_speed(model, cfg, ctx, device)
    model.train()
    compiled = None
    if t.compile_step and not stacked:  # after the resume: it holds the restored state's tensors
        frozen = _prior_parameters(model) if t.prior_freeze_steps else []
        compiled = _CompiledStep(model, opt, sched, ema, t, device, frozen)
    return _Run(
        cfg=run_cfg,
        run_dir=run_dir,
        ckpt_dir=ckpt_dir,
        ctx=ctx,
        device=device,
        amp=amp,
        model=model,
        step_model=step_model,
        opt=opt,
        sched=sched,
        ema=ema,
        state=state,
        config_dict=config_dict,
        batches=batches,
        x_val=x_val,
        has_val=has_val,
        x_img=x_img,
        image_split="val" if has_val else "train",
        logger=logger,
        progress=progress,
        last_val={},
        skips=(
            _DeviceSkips(state, t.max_consecutive_skips, device)
            if _sync_free(t) and not stacked
            else None
        ),
        compiled=compiled,
        x_test=x_test,
        means=_IntervalMeans(device, state.interval_sums),
    )


def _sync_free(t: TrainConfig) -> bool:
    """Whether the step keeps its skip decision on the device (``train.sync_free``, or
    ``train.compile_step``, which implies it)."""
    return t.sync_free or t.compile_step


def _check_sync_free(opt: torch.optim.Optimizer) -> None:
    """``train.sync_free`` skips updates through the fused Adam kernel's ``found_inf``;
    refuse an optimiser without it (non-float32/64 parameters, or a resumed checkpoint
    saved with another Adam implementation, which ``load_state_dict`` keeps)."""
    if not all(group.get("fused") for group in opt.param_groups):
        raise ConfigError(
            "train.sync_free = true needs the fused Adam kernel (train.optimizer = 'adam' or "
            "'adam_normgrad' with float32/float64 parameters on CPU or CUDA), but this "
            f"run's {type(opt).__name__} is not fused; set train.sync_free = false"
        )


def _restore(
    path: Path,
    model: VAE,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    ema: EMA | None,
    device: torch.device,
) -> _State:
    """Load ``last.pt`` into the freshly built run (model, optimiser, schedule, EMA and
    the global RNG state); return the train state it was saved with."""
    ckpt = load_checkpoint(path, map_location=device, required=("model", "optimizer", "step"))
    load_model_state(model, ckpt["model"], "checkpoint")
    saved_groups = len(ckpt["optimizer"].get("param_groups", []))
    if saved_groups != len(opt.param_groups):
        raise ConfigError(
            f"{path} was saved with {saved_groups} optimiser parameter group(s), this config "
            f"builds {len(opt.param_groups)}: the prior gets a group of its own exactly when "
            "train.prior_lr_scale != 1 or train.prior_freeze_steps > 0, and that cannot "
            "change on resume; resume with the run's own values (config.json)"
        )
    opt.load_state_dict(ckpt["optimizer"])
    _match_state_layout(opt)
    sched.load_state_dict(ckpt["scheduler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"], device)
    state = _State(**ckpt["train_state"])
    set_rng_state(ckpt["rng"])
    return state


def _record_new_run(
    run_dir: Path, config_dict: dict, device: torch.device, splits: DataSplits, n_val: int
) -> None:
    """``config.json`` and ``environment.json`` of a fresh run (docs/design.md §6)."""
    write_json_atomic(run_dir / "config.json", config_dict)
    write_json_atomic(
        run_dir / "environment.json",
        {
            "commit": _git_commit(),
            "versions": _versions(),
            "device": str(device),
            "splits": {"train": len(splits.train), "val": n_val, "test": len(splits.test)},
            "notes": list(splits.notes),
        },
    )


def _wrap_for_speed(model: nn.Module, cfg: Config, ctx: _Dist, device: torch.device) -> nn.Module:
    """The module the update step calls: ``model`` in DDP (several processes) and/or
    ``torch.compile`` (``train.compile``); ``model`` itself otherwise.

    The wrappers share ``model``'s parameters, so optimiser, EMA, checkpoints and
    validation keep using the plain model. The other speed settings live where they act:
    ``train.channels_last`` in :func:`_setup_run` (before the optimiser sees the
    parameters), bf16 autocast (``train.amp``, CUDA only) in :func:`_update_step`.
    """
    step_model: nn.Module = model
    if ctx.active:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        step_model = torch.compile(step_model)
    return step_model


# ----------------------------------------------------------------------------- one update


#: Why an update is skipped; under ``train.sync_free`` a step's skip code is 0 (applied)
#: or 1 + an index into this.
SKIP_REASONS = ("non-finite loss", "non-finite gradient", "gradient norm > train.skip_grad_norm")


@dataclass(frozen=True)
class StepResult:
    """What one update step did: its loss and terms (for logging), the gradient norm
    before clipping, the KL weight, and why the update was skipped (``None``: applied).

    Under ``train.sync_free`` nothing is read from the device: ``grad_norm`` is a tensor,
    ``skip_reason`` is ``None`` and ``skip_code`` says what the update did (0: applied,
    else 1 + an index into :data:`SKIP_REASONS`).
    """

    loss: Tensor
    terms: Terms
    grad_norm: float | Tensor
    beta: float
    skip_reason: str | None
    skip_code: Tensor | None = None

    @property
    def skipped(self) -> bool:
        """Whether the update was skipped (under ``train.sync_free`` a host read)."""
        if self.skip_code is not None:
            return bool(self.skip_code.item() != 0)
        return self.skip_reason is not None


def training_loss(
    terms: Terms,
    t: TrainConfig,
    beta: float | Tensor,
    latent_dim: int,
    free_bits: Tensor | None = None,
) -> Tensor:
    """The loss the optimiser minimises, a scalar: the batch mean of the negated IWAE bound
    (``train.objective = "iwae"``, Burda et al. 2016) or of the negated beta-weighted ELBO
    with free bits (``train.free_bits`` per group of ``train.free_bits_group_size``
    dimensions of the ``latent_dim``-dimensional latent), or with
    ``train.kl_warmup_target = "joint"`` of ``beta (log p(x|z) + log p(z)) - log q(z|x)``
    (averaged over samples and examples). Shared by the solo step and the stacked one
    (:mod:`vaeflow.run.stack`), which passes ``free_bits``, a 0-dim tensor (one per run,
    vmapped), where its runs' ``train.free_bits`` differ: a run whose floor is 0 gets the
    plain KL, as alone (a floor of 0 is not the plain KL: a group's estimate can be < 0)."""
    if t.objective == "iwae":
        return -iwae(terms).mean()
    if t.kl_warmup_target == "joint":  # beta (log p(x|z) + log p(z)) - log q(z|x)
        return -(beta * (terms.log_px_z + terms.log_pz) - terms.log_qz).mean()

    def objective(floor: float | Tensor) -> Tensor:
        return elbo(
            terms,
            beta=beta,
            free_bits=floor,
            num_dims=latent_dim,
            group_size=t.free_bits_group_size,
            batch_splits=t.free_bits_batch_splits,
        )

    if free_bits is None:
        return -objective(t.free_bits).mean()
    return -torch.where(free_bits > 0, objective(free_bits), objective(0.0)).mean()


def _update_step(
    model: VAE,
    step_model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    ema: EMA | None,
    x: Tensor,
    t: TrainConfig,
    *,
    beta: float,
    ctx: _Dist = _Dist(),
    device: torch.device | None = None,
    amp: bool = False,
    frozen: Sequence[Tensor] = (),
) -> StepResult:
    """One robust optimiser update on batch ``x``: loss, backward, clip, skip, EMA.

    ``frozen`` parameters have their gradients dropped before clipping, so the optimiser
    neither moves them nor builds up moments for them (Adam skips parameters without a
    gradient) — unlike a zero learning rate, whose moments would carry the frozen steps.

    The loss is the negated (beta-weighted, free-bits) ELBO or IWAE bound. A non-finite
    loss (on any rank), a non-finite gradient norm or a norm above ``t.skip_grad_norm``
    skips the update: parameters, optimiser state and EMA stay as they were. The
    schedule steps either way (it is indexed by step, skipped updates included).

    Under ``t.sync_free`` the same decision is made and applied on the device
    (:func:`_skip_code`, :func:`_apply_unless_skipped`); the result is bit-identical.
    ``t.compile_step`` is not looked at: the loop calls :class:`_CompiledStep` instead.
    """
    # The likelihood's check that x is data (e.g. in {0, 1}) reads a tensor on the host;
    # under sync_free it is off: training batches are binarised or quantised by the data
    # pipeline (vaeflow.data.TrainBatches), valid by construction.
    checks = _data_validation_off(model.likelihood) if t.sync_free else contextlib.nullcontext()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with checks, autocast:
        terms = step_model(x, k=t.k)
    loss = training_loss(terms, t, beta, model.latent_dim)
    opt.zero_grad(set_to_none=True)
    # Backward runs even for a non-finite loss so that every rank takes part in the
    # gradient all-reduce; the update is then skipped everywhere.
    loss.backward()
    for p in frozen:
        p.grad = None
    max_norm = t.clip_norm if t.clip_norm is not None else math.inf
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if t.sync_free:
        code = _skip_code(loss, norm, t.skip_grad_norm, ctx)
        _apply_unless_skipped(code != 0, opt, model, ema)
        _step_schedule(sched)
        return StepResult(loss, terms, norm, beta, None, code)
    grad_norm = norm.item()
    skip_reason = None
    if _any(not math.isfinite(loss.item()), ctx, device):
        skip_reason = "non-finite loss"
    elif not math.isfinite(grad_norm):
        skip_reason = "non-finite gradient"
    elif t.skip_grad_norm is not None and grad_norm > t.skip_grad_norm:
        skip_reason = f"gradient norm {grad_norm:.3g} > {t.skip_grad_norm}"
    if skip_reason is None:
        opt.step()
        if ema is not None:
            ema.update(model)
    _step_schedule(sched)
    return StepResult(loss, terms, grad_norm, beta, skip_reason)


def _step_schedule(sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Advance the learning-rate schedule (every step, skipped updates included)."""
    with warnings.catch_warnings():
        # torch warns when the very first optimiser step was skipped; intended here.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        sched.step()


def _skip_code(
    loss: Tensor, grad_norm: Tensor, skip_grad_norm: float | None, ctx: _Dist
) -> Tensor:
    """The syncing step's skip decision as a 0-d int64 device tensor: 0 (apply), else
    1 + the index of the first reason in :data:`SKIP_REASONS` that holds."""
    bad_loss = ~torch.isfinite(loss.detach())
    if ctx.active:  # as _any, without reading the flag: every rank skips together
        flag = bad_loss.to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad_loss = flag[0] > 0
    # The syncing step compares Python floats: the norm in float64, so that a threshold
    # that float32 cannot represent is compared the same way.
    norm = grad_norm.detach().double()
    too_large = norm > skip_grad_norm if skip_grad_norm is not None else torch.zeros_like(bad_loss)
    return torch.where(
        bad_loss,
        1,
        torch.where(~torch.isfinite(norm), 2, torch.where(too_large, 3, 0)),
    )


def _apply_unless_skipped(
    skip: Tensor, opt: torch.optim.Optimizer, model: nn.Module, ema: EMA | None
) -> None:
    """Take the optimiser step and the EMA update unless the device flag ``skip`` is set,
    without reading it.

    The fused Adam kernel takes ``found_inf`` (GradScaler's way in): when it is 1 the
    parameters and moments stay as they are and the step counts are incremented and
    decremented again. Adam creates its state at a parameter's first update, even a
    skipped one; so while a parameter with a gradient has no state yet (the first step,
    a delayed prior's first step) the flag is read, and a skip leaves the state absent as
    the syncing step does.
    """
    if _state_missing(opt) and bool(skip.item()):
        return
    opt.found_inf = skip.to(torch.float32)  # read by Adam.step (getattr) for the fused kernel
    try:
        opt.step()
    finally:
        del opt.found_inf
    if ema is not None:
        ema.update(model, skip)


def _state_missing(opt: torch.optim.Optimizer) -> bool:
    """Whether a parameter with a gradient has no optimiser state yet."""
    return any(
        p.grad is not None and not opt.state.get(p)
        for group in opt.param_groups
        for p in group["params"]
    )


# ----------------------------------------------------------------------------- compiled step


class _CompiledStep:
    """``train.compile_step``: one update -- forward, loss, backward, gradient norm and
    clipping, skip decision, Adam, EMA -- as one ``torch.compile``d function, then the
    schedule step. Called as ``step(x, beta, frozen)`` in place of :func:`_update_step`
    (the same arguments' meaning; the same :class:`StepResult` as under ``sync_free``).

    What lets it compile once and then only replay:

    - the learning rates are float64 0-d tensors in the param groups, on the device (the
      schedule fills them in place: ``LRScheduler`` does so for tensor learning rates),
      and the KL weight is a 0-d tensor filled before each call: values the graph reads,
      not constants it would be specialised on (and recompiled for at every step);
    - batches have one shape (``TrainBatches`` drops each epoch's ragged last batch; the
      function is compiled with ``dynamic=False``, so another shape would recompile);
    - nothing is read on the host: the skip decision is :func:`_skip_code`'s device
      tensor, applied by masking (:func:`~vaeflow.run.optim.update_unless`,
      :meth:`EMA.update_masked`); the gradients are clipped functionally;
    - the optimiser's state exists before the first call
      (:func:`~vaeflow.run.optim.init_state`: zero moments, step counts on the device),
      so the first step is like any other and a skipped first step needs no host read.
      A parameter not updated yet (the first steps, a delayed prior) holds zero state
      instead of none: the same updates, a slightly different checkpoint.

    One graph: the gradients come from ``torch.autograd.grad``, which dynamo traces
    under its ``trace_autograd_ops`` setting (set for these calls only), so the backward
    is in the same graph as the forward and the update (``loss.backward()`` would be a
    graph break, and ``.grad`` is not used: ``zero_grad`` is not needed either). On CUDA
    the graph is captured as a CUDA graph (inductor's ``triton.cudagraphs``, what
    ``mode="reduce-overhead"`` sets): a step is one graph replay plus the eager KL-weight
    fill and schedule step. The tensors the update writes (optimiser state, EMA average and
    count) and the rates it reads are marked static, so that the CUDA graph reads and
    writes them in place. The CUDA path has not been run on a GPU yet
    (``benchmarks/gpu_check.py`` compares it with the eager step). A torch without
    ``trace_autograd_ops`` breaks the graph at the gradient (two graphs; same results).

    Randomness: inductor's ``fallback_random`` draws the posterior noise from torch's
    generator as eager code does, so a compiled run takes the same steps as an eager run
    of the same seed, to float rounding, and resumes from the checkpoint's RNG state.

    Keep the object for the run: it holds the optimiser's and the EMA's tensors as they
    are when it is built (after any resume).
    """

    def __init__(
        self,
        model: VAE,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        ema: EMA | None,
        t: TrainConfig,
        device: torch.device,
        frozen: Sequence[Tensor] = (),
    ) -> None:
        if not isinstance(opt, torch.optim.Adam | torch.optim.Adamax | IWAEAdam):
            raise ConfigError(
                "train.compile_step needs train.optimizer = 'adam', 'adam_normgrad', "
                "'adam_iwae', 'adamax' or "
                f"'adamax_iaf', got {type(opt).__name__}"
            )
        self.model, self.opt, self.sched, self.ema, self.t = model, opt, sched, ema, t
        init_state(opt)
        for group in opt.param_groups:  # filled in place by the schedule from now on
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64, device=device)
        dtype = next(model.parameters()).dtype
        self._beta = torch.zeros((), dtype=dtype, device=device)
        frozen_ids = {id(p) for p in frozen}
        self._groups = [[p for p in g["params"] if p.requires_grad] for g in opt.param_groups]
        self._unfrozen = [[p for p in ps if id(p) not in frozen_ids] for ps in self._groups]
        self._ema_live: list[Tensor] = []
        static = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
        static += [g["lr"] for g in opt.param_groups] + [self._beta]
        if ema is not None:
            static += [*ema.shadow.values(), ema.count_on(device)]
            self._ema_live = ema.live_tensors(model)
        for v in static:  # a guard on each address: a replaced tensor recompiles
            torch._dynamo.mark_static_address(v, guard=True)
        self._cuda_graphs = device.type == "cuda"
        options = {"fallback_random": True}
        if self._cuda_graphs:
            options["triton.cudagraphs"] = True  # mode="reduce-overhead" (not both allowed)
        self._compiled = torch.compile(self._step, dynamic=False, options=options)
        config = torch._dynamo.config
        self._tracing = (
            config.patch(trace_autograd_ops=True)
            if hasattr(config, "trace_autograd_ops")
            else contextlib.nullcontext()
        )

    def __call__(self, x: Tensor, beta: float, frozen: bool = False) -> StepResult:
        """One update on the full batch ``x`` with KL weight ``beta``; ``frozen``: leave
        the delayed prior out (``step < train.prior_freeze_steps``)."""
        self._beta.fill_(beta)
        if self._cuda_graphs:  # the previous step's outputs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()
        with self._tracing:
            loss, terms, norm, code = self._compiled(x, frozen)
        _step_schedule(self.sched)
        return StepResult(loss, terms, norm, beta, None, code)

    def _step(self, x: Tensor, frozen: bool) -> tuple[Tensor, Terms, Tensor, Tensor]:
        # Training batches are valid by construction (as under sync_free): no data check.
        with _data_validation_off(self.model.likelihood):
            terms = self.model(x, k=self.t.k)
        loss = training_loss(terms, self.t, self._beta, self.model.latent_dim)
        groups = self._unfrozen if frozen else self._groups
        flat = torch.autograd.grad(loss, sum(groups, []), allow_unused=True)
        params, grads, i = [], [], 0
        for ps in groups:  # per param group; a parameter the loss does not use: no update
            pairs = [
                (p, g) for p, g in zip(ps, flat[i : i + len(ps)], strict=True) if g is not None
            ]
            params.append([p for p, _ in pairs])
            grads.append([g for _, g in pairs])
            i += len(ps)
        norm, code = self._update(loss.detach(), params, grads)
        # Detached: tensors still holding the consumed autograd graph would end the graph.
        return loss.detach(), _detached(terms), norm, code

    @torch.no_grad()
    def _update(
        self, loss: Tensor, params: list[list[Tensor]], grads: list[list[Tensor]]
    ) -> tuple[Tensor, Tensor]:
        # Under no_grad: with torch 2.14 a prototype that wrote the parameters through
        # .detach() aliases with grad mode on was miscompiled silently (a parameter
        # overwritten by a step count).
        # As clip_grad_norm_: the norm of the per-tensor norms, one clipping coefficient.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(sum(grads, []))))
        if self.t.clip_norm is not None:
            coef = torch.clamp(self.t.clip_norm / (norm + 1e-6), max=1.0)
            grads = [[g * coef for g in gs] for gs in grads]
        code = _skip_code(loss, norm, self.t.skip_grad_norm, _Dist())
        skip = code != 0
        update_unless(self.opt, params, grads, skip)
        if self.ema is not None:
            self.ema.update_masked(self._ema_live, skip)
        return norm, code


def _detached(terms: Terms) -> Terms:
    """``terms`` without their autograd history (for logging)."""

    def detach(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(t.detach() for t in v)
        return None if v is None else v.detach()

    return Terms(**{f.name: detach(getattr(terms, f.name)) for f in dataclasses.fields(terms)})


def _host_lrs(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser's or schedule's ``state_dict`` with its learning rates as Python floats
    (``train.compile_step`` holds them as device tensors): checkpoints look the same
    whichever step wrote them, and resume under either (one host read per rate, at
    checkpoints only)."""

    def plain(v: Any) -> Any:
        return float(v) if torch.is_tensor(v) else v

    state = dict(state)
    if "param_groups" in state:
        state["param_groups"] = [
            {k: plain(v) if k in ("lr", "initial_lr") else v for k, v in group.items()}
            for group in state["param_groups"]
        ]
    for key in ("base_lrs", "_last_lr"):
        if key in state:
            state[key] = [plain(v) for v in state[key]]
    return state


# ----------------------------------------------------------------------------- periodic


def _periodic(run: _Run, result: StepResult) -> str | None:
    """What happens after an update at ``run.state.step``, each on its own period: log
    the training scalars, validate (rank 0; keep ``best.pt``), draw image grids, write
    ``last.pt``. Returns the early-stopping status when the run should stop, else
    ``None`` (the decision agrees across ranks; only rank 0 validates)."""
    t, state, ctx = run.cfg.train, run.state, run.ctx
    if state.step % t.log_every == 0 or state.step == t.steps:
        _log_step(run, result)
    validate_now = state.step % t.val_every == 0 or state.step == t.steps
    fallen = False
    if run.has_val and validate_now and ctx.rank == 0:
        run.last_val = _validate(run.model, run.ema, run.x_val, run.cfg, run.logger, state)
        if t.divergence_nats is not None:
            fallen = state.best - run.last_val["val/iwae"] > t.divergence_nats
        if run.last_val["val/iwae"] > state.best:
            state.best, state.best_step, state.bad_validations = (
                run.last_val["val/iwae"],
                state.step,
                0,
            )
            run.save("best.pt")
        elif state.step > t.early_stopping_delay:
            state.bad_validations += 1
    if t.divergence_nats is not None and run.has_val and validate_now:
        if ctx.active:
            fallen = _any(fallen, ctx, run.device)  # only rank 0 validates
        if fallen:
            _stop_fallen(run)
    if run.x_test is not None and _test_curve_due(t, state.step) and ctx.rank == 0:
        _log_test_curve(run.model, run.ema, run.x_test, run.cfg, run.logger, state.step)
    if t.image_every and state.step % t.image_every == 0 and ctx.rank == 0:
        _log_images(run.model, run.ema, run.x_img, run.logger, state.step, run.image_split)
    if state.step % t.ckpt_every == 0 or state.step == t.steps:
        run.save("last.pt")
    stop_early = t.early_stopping is not None and state.bad_validations >= t.early_stopping
    if t.early_stopping is not None and ctx.active:
        stop_early = _any(stop_early, ctx, run.device)  # only rank 0 validates
    if stop_early:
        run.save("last.pt")
        return f"early stopping at step {state.step}"
    return None


def _periodic_due(run: _Run) -> bool:
    """Whether :func:`_periodic` has anything to do at ``run.state.step`` (its conditions,
    gathered: stacked training copies a run out of its stack only then)."""
    t, state = run.cfg.train, run.state
    return (
        state.step % t.log_every == 0
        or state.step == t.steps
        or (run.has_val and state.step % t.val_every == 0)
        or (run.x_test is not None and _test_curve_due(t, state.step))
        or bool(t.image_every and state.step % t.image_every == 0)
        or state.step % t.ckpt_every == 0
        or (t.early_stopping is not None and state.bad_validations >= t.early_stopping)
    )


def _log_step(run: _Run, result: StepResult) -> None:
    """The training scalars of the step just taken, and the progress line."""
    terms = result.terms
    with torch.no_grad():
        scalars = {
            "train/loss_nats": result.loss.item(),
            "train/elbo_nats": elbo(terms).mean().item(),
            "train/kl_nats": terms.kl.mean().item(),
            "train/recon_nats": terms.log_px_z.mean().item(),
            "train/grad_norm": float(result.grad_norm),
            "train/lr": float(run.sched.get_last_lr()[0]),  # a tensor under compile_step
            "train/beta": result.beta,
            "train/skipped_steps": float(run.state.skipped),
        }
        if terms.flow_logdet is not None:
            scalars["train/flow_logdet_nats"] = terms.flow_logdet.mean().item()
        # A hierarchical model's KL per stochastic layer, bottom first (they sum to kl).
        for i, layer_kl in enumerate(terms.layer_kl or (), start=1):
            scalars[f"train/kl_layer{i}_nats"] = layer_kl.mean().item()
    if run.means is not None:  # the means over the interval since the last log
        scalars.update(run.means.read())
    run.logger.log_scalars(scalars, run.state.step)
    run.progress.update(run.state.step, result.loss.item())


def _finish(run: _Run, stopped: str, elapsed: float, steps_done: int) -> dict[str, Any]:
    """Summarise the session; at the end of training (completed or stopped early) add
    the final image grids and the HParams row; write ``train_summary.json``."""
    t, state, ctx = run.cfg.train, run.state, run.ctx
    summary: dict[str, Any] = {
        "status": stopped,
        "step": state.step,
        "skipped_steps": state.skipped,
        "validation": (
            f"{len(run.x_val)} examples, best.pt = the best validation IWAE-{t.val_k} bound"
            if run.has_val
            else "none (data.val_size = 0): a fixed budget; no best.pt, evaluate last.pt"
        ),
        "best_val_iwae_nats": state.best if run.has_val else None,
        "best_step": state.best_step if run.has_val else None,
        "train_seconds_this_session": elapsed,
        "steps_per_second": steps_done / elapsed if elapsed > 0 else None,
        **run.last_val,
    }
    if (state.step >= t.steps or stopped.startswith("early")) and ctx.rank == 0:
        _log_images(run.model, run.ema, run.x_img, run.logger, state.step, run.image_split)
        # The HParams columns name curves the run logs (and the test metrics `vaeflow
        # eval` adds). A point of a sweep writes only its row: TensorBoard reads one
        # experiment (the columns) per log directory, and the sweep directory has it.
        run.logger.log_hparams(
            hparams_order(flatten_config(run.config_dict)),
            hparams_metric_tags(run.cfg),
            experiment=not has_hparams_experiment(run.run_dir.parent),
        )
    run.logger.close()
    if ctx.rank == 0:
        write_json_atomic(run.run_dir / "train_summary.json", summary)
    if ctx.active:
        dist.barrier()
    return summary


# ----------------------------------------------------------------------------- helpers


def _init_pseudo_inputs_from_data(model: VAE, x_train: Tensor, seed: int) -> None:
    """A VampPrior's pseudo-inputs start as ``K`` random training images (in [0, 1]) plus
    N(0, 0.01) noise, as the VampPrior code's ``use_training_data_init``. A generator of
    its own, so the training run's random stream is the same as without the option."""
    k = model.prior.num_components
    g = torch.Generator().manual_seed(seed + 104729)
    idx = torch.randperm(x_train.shape[0], generator=g)[:k]
    x = to_unit_interval(x_train[idx]).to(next(model.parameters()).device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 104729)
        model.prior.init_from(x)


def needs_data_init(model: nn.Module) -> bool:
    """Whether ``model`` has layers with the IAF code's data-dependent init
    (``weight_norm = "iaf_code"``)."""
    data_init_layers = (IAFCodeConv2d, IAFCodeConvTranspose2d, IAFCodeLinear)
    return any(isinstance(m, data_init_layers) for m in model.modules())


def _data_dependent_init(model: nn.Module, x: Tensor, seed: int) -> None:
    """``weight_norm = "iaf_code"``: one forward pass of the first training batch in the
    code's init mode (tf_train.py ``CVAE1(hps, "init", init_x)``): every such layer sets
    its gain and bias from the batch, and each group's base sample comes from its prior.
    Its own random stream, so the training run's is the same as without the option."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed + 15485863)
        was_training = model.training
        model.train()
        with torch.no_grad(), weight_norm_data_init():
            model(x, k=1)
        model.train(was_training)


def _init_output_bias_from_data(model: VAE, x_train: Tensor) -> None:
    """``model.output_bias_from_data``: the Bernoulli logits' bias starts at the logit of
    the training images' mean pixel (grey levels: the mean of the dynamically binarised
    bits; static data: the mean bit). Reads no random numbers."""
    mean = torch.zeros(x_train.shape[1:], dtype=torch.float64)
    for chunk in x_train.split(4096):  # in chunks: no float copy of the whole set
        mean += to_unit_interval(chunk, torch.float64).sum(0)
    try:
        output_bias_from_data_(model, mean / x_train.shape[0])
    except ValueError as e:
        raise ConfigError(f"model.output_bias_from_data: {e}") from None


def _check_free_bits(cfg: Config, model: VAE) -> None:
    """Free bits per group need a KL that splits over dimensions: arrange it, or say so
    before training.

    A prior that does not factorise (a mixture, the VampPrior) is split by the chain rule
    (``model.kl_chain_rule``: each group's KL against ``p(z_g | z_<g)``); a posterior whose
    log q does not split, or a flow prior (no tractable conditionals), is refused here --
    otherwise the run would switch objective silently (or fail at the first step).
    """
    t = cfg.train
    if t.free_bits <= 0 or t.free_bits_group_size == model.latent_dim:
        return
    if not model.kl_splits_over_dimensions and hasattr(model, "kl_chain_rule"):
        model.kl_chain_rule = True
    if not model.kl_splits_over_dimensions:
        raise ConfigError(
            f"train.free_bits = {t.free_bits} with train.free_bits_group_size = "
            f"{t.free_bits_group_size} needs a KL that splits over latent dimensions, but "
            f"posterior {cfg.model.posterior.flow or 'gaussian'!r} with prior "
            f"{cfg.model.prior.name!r} does not (coupling, Sylvester and planar flows do "
            "not split log q; a flow prior has no tractable conditionals p(z_g | z_<g) -- "
            "mixture and VampPrior priors do). Set "
            f"train.free_bits_group_size = {model.latent_dim} (one group: the total KL) "
            "or train.free_bits = 0"
        )


def _check_same_optimizer(run_dir: Path, optimizer: str, normgrad_split: bool = False) -> None:
    """Refuse to resume under another ``train.optimizer``: Adam, AdamNormGrad and IWAEAdam
    keep state under the same names, so a checkpoint would load into the other optimiser
    and continue silently with its moments read under other rules. Likewise another
    ``train.normgrad_split`` (not in the optimiser's state: it would pass unnoticed)."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    train_before = json.loads(path.read_text()).get("train", {})
    before = train_before.get("optimizer", "adam")
    if before != optimizer:
        raise ConfigError(
            f"{run_dir} was trained with train.optimizer = {before!r}; resuming it with "
            f"{optimizer!r} would read the first optimiser's state under the second's rules. "
            f"Resume with train.optimizer = {before!r}, or start a new run"
        )
    split_before = bool(train_before.get("normgrad_split", False))
    if split_before != normgrad_split:
        flag = str(split_before).lower()
        raise ConfigError(
            f"{run_dir} was trained with train.normgrad_split = {flag}; resuming it with "
            f"{str(normgrad_split).lower()} would change the update rule mid-run. Resume "
            f"with train.normgrad_split = {flag}, or start a new run"
        )


def _record_resumed_config(run_dir: Path, config_dict: dict, step: int) -> None:
    """Keep ``config.json`` equal to the config in force; keep the previous one beside it.

    Resuming with ``--set`` overrides (more steps, other eval settings) is allowed, but
    the run directory must say so.
    """
    path = run_dir / "config.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if old != config_dict:
        if old is not None:
            write_json_atomic(run_dir / f"config.before_resume_step{step}.json", old)
        write_json_atomic(path, config_dict)
        warnings.warn(
            f"resumed {run_dir} with a changed config; the previous one is kept as "
            f"config.before_resume_step{step}.json",
            stacklevel=4,  # the caller of train()
        )


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


def _validate(
    model: VAE,
    ema: EMA | None,
    x_val: Tensor,
    cfg: Config,
    logger: RunLogger,
    state: _State,
) -> dict[str, float]:
    with _side_pass(model, ema, x_val):
        v = validate_bounds(model, x_val, cfg.train.val_k, cfg.data.eval_batch_size)
        latents = _latent_statistics(model, x_val[:1000], cfg.data.eval_batch_size)
    k = cfg.train.val_k
    metrics = {
        "val/elbo_nats": v["elbo"],
        f"val/iwae_k{k}_nats": v["iwae"],
        "val/kl_nats": v["kl"],
        "val/recon_nats": v["recon"],
        "val/active_units": latents["active_units"],
        "val/flow_logdet_nats": latents["flow_logdet"].mean().item(),
    }
    # A hierarchy (bottom-up layers or top-down groups, bottom first): KL and active units
    # per layer, as summary.json's test/kl_layer<i>_nats and test/active_units_layer<i>.
    for i in range(1, len(latents["active_units_layers"]) + 1):
        metrics[f"val/kl_layer{i}_nats"] = v[f"kl_layer{i}"]
        metrics[f"val/active_units_layer{i}"] = latents["active_units_layers"][i - 1]
    logger.log_scalars(metrics, state.step)
    logger.log_histogram("val/posterior_mean", latents["mu"], state.step)
    logger.log_histogram("val/posterior_log_std", latents["log_std"], state.step)
    logger.log_histogram("val/flow_logdet", latents["flow_logdet"], state.step)
    return {**metrics, "val/iwae": v["iwae"]}


def _test_curve_examples(cfg: Config, splits: DataSplits, device: torch.device) -> Tensor:
    """The test examples of ``train.test_every``'s curve, preprocessed as evaluation
    preprocesses them: all, or the fixed random subset of ``train.test_size`` that
    ``vaeflow eval --n-test`` scores (a sorted test file's first N are not a sample)."""
    x = prepare_eval(splits.test, splits.kind, cfg.data.binarization, cfg.data.seed, device)
    if len(x) == 0:
        raise ConfigError(
            f"train.test_every = {cfg.train.test_every} draws a test-set learning curve, but "
            f"the {cfg.data.dataset!r} data has no test examples; set train.test_every = 0"
        )
    indices, _ = test_subset(len(x), cfg.train.test_size)
    return x if indices is None else x[indices.to(device)]


def _test_curve_due(t: TrainConfig, step: int) -> bool:
    return step % t.test_every == 0 or step == t.steps


def _log_test_curve(
    model: VAE, ema: EMA | None, x_test: Tensor, cfg: Config, logger: RunLogger, step: int
) -> None:
    """Log the test split's ELBO and IWAE-k bound (``train.test_every``): a learning curve
    only. Nothing reads it back -- ``best.pt``, early stopping and divergence look at the
    validation split alone -- and its draws come from a forked RNG, so training is the
    same with or without it."""
    k = cfg.train.test_k or cfg.train.val_k
    with _side_pass(model, ema, x_test):
        v = validate_bounds(model, x_test, k, cfg.data.eval_batch_size)
    logger.log_scalars(
        {"test_curve/elbo_nats": v["elbo"], f"test_curve/iwae_k{k}_nats": v["iwae"]}, step
    )


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
