"""The training loop: config -> trained model, checkpoints, logs; resumable and robust.

:func:`train` runs a whole experiment: it builds data and model from the config,
optimises the (beta-weighted, free-bits) ELBO or the IWAE bound, validates with IWAE-k,
keeps ``last.pt``/``best.pt``, and writes TensorBoard + ``metrics.jsonl``. The model is
only ever used as ``model(x, k) -> Terms`` (docs/design.md). It is a short driver over
parts that can be read and tested alone: :func:`_setup_run` (model, data, optimiser,
resume), :func:`_wrap_for_speed` (DDP, ``torch.compile``), :func:`_update_step` (one
robust update, :mod:`vaeflow.run.step`; under ``train.compile_step`` :class:`_CompiledStep`,
the same update compiled whole, :mod:`vaeflow.run.compiled_step`) and :func:`_periodic`
(log, validate, images, checkpoint, early stop). The optimiser and its schedules come from
:mod:`vaeflow.run.schedule`, the weight average from :mod:`vaeflow.run.ema`, image grids
and posterior statistics from :mod:`vaeflow.run.visuals` and the data-parallel context
from :mod:`vaeflow.run.distributed`; this module holds the run's set-up and its loop.

Without a validation split (``data.val_size = 0``: a fixed budget on the whole training
file, as Burda et al. 2016 and the IAF code train) there are no validation passes and no
``best.pt``; only ``last.pt`` is kept, image grids reconstruct (fixed-seed binarised)
training examples, and the HParams metrics are the last training scalars.

Robust step (after vdvae): a non-finite loss, a non-finite gradient norm or a norm above
``skip_grad_norm`` skips the update; skips are counted and logged, and too many in a row
stop the run with a message and a usable checkpoint. Under ``train.sync_free`` the same
decision is a device tensor, applied without a host read
(:func:`vaeflow.run.step._apply_unless_skipped`), and the counters live on the device
(:class:`_DeviceSkips`) until the next periodic step.

Resume is bit-exact on CPU: data batches are a pure function of (seed, step)
(:class:`vaeflow.data.TrainBatches`), RNG states are checkpointed, and validation runs
under a forked RNG so its frequency never changes the training trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import time
import warnings
from collections.abc import Sequence
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
    weight_norm_data_init,
)
from ..models.bounds import elbo
from ..models.build import build_model
from ..models.init import output_bias_from_data_
from ..models.vae import VAE
from .checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .compiled_step import _CompiledStep, _host_lrs
from .distributed import _any, _Dist, _init_distributed
from .ema import EMA
from .evaluate import hparams_metric_tags
from .logger import (
    Progress,
    RunLogger,
    flatten_config,
    has_hparams_experiment,
    hparams_order,
)
from .schedule import (
    _beta,
    _check_same_optimizer,
    _lr_lambdas,
    _match_state_layout,
    _optimizer,
    _prior_parameters,
)
from .schedule import _lr_lambda as _lr_lambda
from .step import SKIP_REASONS, StepResult, _update_step
from .step import training_loss as training_loss
from .utils import resolve_device, set_tf32
from .visuals import MAX_LAYER_GRIDS as MAX_LAYER_GRIDS
from .visuals import _latent_statistics, _log_images, _side_pass
from .visuals import layers_to_show as layers_to_show

# The parts of a run moved to modules of their own (compiled_step, distributed, ema,
# schedule, step, visuals) stay importable from here, as tests, benchmarks and the stack
# import them; the ``x as x`` imports re-export those this module does not use itself.

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
