"""Many runs in one process: ``N`` training runs of one shape as one batched computation.

:func:`train_stack` trains ``N`` configs that differ only in keys that change neither a
tensor shape nor the structure of the update (seeds, the learning-rate schedule, Adam's
constants, KL warm-up, clipping, EMA decay, validation, logging and checkpoint periods,
early stopping, evaluation settings: :data:`STACKABLE_KEYS`). Each run ends exactly as it
would alone: its own run directory, ``metrics.jsonl``, TensorBoard events, checkpoints,
``train_summary.json``; ``vaeflow eval`` and ``--resume`` (stacked or alone) work on it,
and its trajectory equals the solo run's to float rounding (``tests/test_stack.py``
checks parameters, optimiser state and metrics in float64).

How the runs stay independent:

* **Set-up and persistence are the solo run's.** Every run is built by
  :func:`vaeflow.run.train._setup_run` (model under its ``train.seed``, data batches,
  optimiser, schedule, EMA, logger, run directory; or all of it restored from
  ``last.pt``). Those objects remain the run's record: whenever a run has something to
  log, validate, draw or save, its row of the stack is copied back into them and the
  loop's own :func:`~vaeflow.run.train._periodic` and :func:`~vaeflow.run.train._finish`
  do the work, so checkpoints, logs, validation, early stopping and summaries are the
  solo code, not a copy of it.
* **The stack is only the compute format.** The runs' parameters are rows of one leaf
  tensor ``(N, P)`` (row ``r``: run ``r``'s parameters flattened in
  ``named_parameters`` order), viewed per tensor and fed to one copy of the model with
  :func:`torch.func.functional_call` under :func:`torch.func.vmap`: one forward and one
  backward serve all runs (batched matmuls instead of ``N`` small ones). Buffers are not
  stacked: the supported models' buffers are constants of the (shared) model config.
* **Randomness is an input.** The only random draw of a supported training step is the
  posterior noise ``(K, B, D)``. Each run owns a generator that starts from the global
  RNG state its set-up left (the stream a solo run draws from: ``train.seed``, or the
  checkpoint's), draws its noise outside ``vmap`` in the solo order, and the model takes
  it as an argument (``VAE.forward(x, k, noise)``). ``vmap(randomness="different")``
  would draw all runs from one stream. While a run's bookkeeping runs, its generator
  state is swapped into the global RNG, so its checkpoint's ``rng`` is its own stream and
  validation's forked RNG starts where the solo run's would.
* **Data order** comes from each run's own :class:`~vaeflow.data.TrainBatches`
  (``data.seed``) at its own step (runs need not be at the same step).
* **The update is per run.** Gradient norms, clipping (``clip_norm`` per run, never a
  global norm), the skip decision (non-finite loss or gradient, ``skip_grad_norm``),
  Adam with each run's learning rate (read from its own ``LambdaLR``), betas, eps,
  weight decay and step count, and the EMA with its own decay and warm-up count. Adam
  is elementwise, so the ``(N, P)`` update equals ``N`` solo updates (torch's fused
  kernel rounds in another order: equal to float tolerance, not bitwise). A skipped
  run's row (parameters, moments, EMA) is restored after the batched update.
* Runs **leave the stack** when they complete, stop early, reach ``stop_after_step`` or
  diverge; their rows are dropped and the others go on.

Scope: one-stochastic-layer MLP VAEs (``mlp`` encoder and decoder, Gaussian posterior or
the flows in :data:`STACKABLE_FLOWS`, priors in :data:`STACKABLE_PRIORS`, Bernoulli
likelihood), Adam, one process (no DDP), eager (no ``train.compile``). Anything else is a
:class:`~vaeflow.config.ConfigError` naming the key (:func:`check_stackable`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from ..config import Config, ConfigError, to_dict
from ..data import DataSplits, load_splits
from ..models.bounds import Terms, elbo, iwae
from .logger import Progress, flatten_config
from .train import (
    StepResult,
    TrainingDiverged,
    _beta,
    _finish,
    _periodic,
    _periodic_due,
    _Run,
    _setup_run,
)

__all__ = [
    "STACKABLE_KEYS",
    "STACKABLE_FLOWS",
    "STACKABLE_PRIORS",
    "check_stackable",
    "stack_key",
    "train_stack",
]

#: Config keys whose values may differ between the runs of one stack (everything else,
#: ``eval.*`` and ``run.*`` aside, must be equal: see :func:`stack_key`).
STACKABLE_KEYS: frozenset[str] = frozenset(
    {
        "data.seed",
        "data.eval_batch_size",
        "train.seed",
        "train.steps",
        "train.lr",
        "train.betas",
        "train.eps",
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
    }
)
_STACKABLE_SECTIONS = ("eval.", "run.")
#: Posterior flows whose stacked training is tested equal to solo training.
STACKABLE_FLOWS: frozenset[str | None] = frozenset({None, "iaf"})
#: Priors whose stacked training is tested equal to solo training.
STACKABLE_PRIORS: frozenset[str] = frozenset({"standard_normal"})


def check_stackable(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, if ``cfg`` cannot train in a stack."""
    m, t = cfg.model, cfg.train
    refusals = [
        (int(os.environ.get("WORLD_SIZE", "1")) > 1, "WORLD_SIZE", "data-parallel (torchrun)"),
        (t.compile, "train.compile", "true"),
        (t.amp, "train.amp", "true"),
        (t.channels_last, "train.channels_last", "true"),
        (t.optimizer != "adam", "train.optimizer", repr(t.optimizer)),
        (t.prior_lr_scale != 1.0, "train.prior_lr_scale", t.prior_lr_scale),
        (t.prior_freeze_steps != 0, "train.prior_freeze_steps", t.prior_freeze_steps),
        (m.encoder.name != "mlp", "model.encoder.name", repr(m.encoder.name)),
        (m.decoder.name != "mlp", "model.decoder.name", repr(m.decoder.name)),
        (bool(m.upper_layers), "model.upper_layers", "a hierarchy"),
        (m.topdown is not None, "model.topdown", "a top-down model"),
        (m.likelihood != "bernoulli", "model.likelihood", repr(m.likelihood)),
        (m.posterior.flow not in STACKABLE_FLOWS, "model.posterior.flow", repr(m.posterior.flow)),
        (m.prior.name not in STACKABLE_PRIORS, "model.prior.name", repr(m.prior.name)),
    ]
    for refused, key, value in refusals:
        if refused:
            raise ConfigError(
                f"{key} = {value} cannot be trained in a stack (vaeflow.run.stack supports "
                "one-stochastic-layer MLP VAEs with a Bernoulli likelihood, posterior flow "
                f"in {sorted(map(str, STACKABLE_FLOWS))}, prior in "
                f"{sorted(STACKABLE_PRIORS)}, Adam, one eager process); train it alone "
                "(vaeflow train, or vaeflow sweep without --stack)"
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


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    """Where each parameter lives in a run's flat row ``(P,)``: ``named_parameters`` order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> _Layout:
        names, shapes, offsets, n = [], [], [], 0
        for name, p in model.named_parameters():
            names.append(name)
            shapes.append(p.shape)
            offsets.append(n)
            n += p.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), n)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """``flat (*lead, P)`` as ``{name: (*lead, *shape)}`` views."""
        lead = flat.shape[:-1]
        return {
            name: flat[..., o : o + shape.numel()].view(*lead, *shape)
            for name, shape, o in zip(self.names, self.shapes, self.offsets, strict=True)
        }

    def row(self, tensors: Sequence[Tensor]) -> Tensor:
        """Tensors in layout order -> one flat row ``(P,)``."""
        return torch.cat([t.detach().reshape(-1) for t in tensors])


# ----------------------------------------------------------------------------- the stack


@dataclass
class _Member:
    """One run of the stack: its solo objects, its noise generator, its session counters."""

    run: _Run
    gen: torch.Generator
    steps_done: int = 0


class _Stack:
    """The stacked state of the runs still training: parameters, Adam moments, update
    counts, EMA; each ``(N, P)`` (or ``(N,)``), row ``r`` for ``members[r]``."""

    def __init__(self, members: list[_Member]) -> None:
        self.members = members
        model = members[0].run.model
        self.layout = _Layout.of(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # The module functional_call runs: parameters come from the stack; its likelihood
        # does not check data (a data-dependent branch vmap cannot take): step() checks
        # every run's batch once, as the evaluator checks data once per batch.
        self.template = copy.deepcopy(model)
        self.template.likelihood.validate = False
        rows = [self._rows_from_solo(m.run) for m in members]
        self.params = torch.stack([r[0] for r in rows]).requires_grad_()
        self.exp_avg = torch.stack([r[1] for r in rows])
        self.exp_avg_sq = torch.stack([r[2] for r in rows])
        self.updates = [r[3] for r in rows]
        self.shadow = None if members[0].run.ema is None else torch.stack([r[4] for r in rows])
        self._set_constants()
        self._loss = vmap(self._run_loss, in_dims=(0, 0, 0, 0))

    # -- between the stack and the solo objects

    def _rows_from_solo(self, run: _Run) -> tuple[Tensor, Tensor, Tensor, int, Tensor | None]:
        """A solo run's parameters, Adam moments and update count, EMA shadow as rows."""
        params = list(run.model.parameters())
        state = [run.opt.state.get(p, {}) for p in params]
        if any(state) and not all(state):
            raise ValueError("stacking needs Adam state for all parameters or none")
        zeros = torch.zeros(self.layout.size, dtype=self.dtype, device=self.device)
        m = self.layout.row([s["exp_avg"] for s in state]) if state[0] else zeros
        v = self.layout.row([s["exp_avg_sq"] for s in state]) if state[0] else zeros.clone()
        updates = int(state[0]["step"]) if state[0] else 0
        shadow = None
        if run.ema is not None:
            shadow = self.layout.row([run.ema.shadow[n] for n in self.layout.names])
        return self.layout.row(params), m, v, updates, shadow

    @torch.no_grad()
    def sync(self, i: int) -> None:
        """Copy row ``i`` back into its solo run: model, Adam state, EMA."""
        run = self.members[i].run
        for p, view in zip(
            run.model.parameters(), self.layout.views(self.params[i]).values(), strict=True
        ):
            p.copy_(view)
        sd = run.opt.state_dict()
        if self.updates[i] > 0:
            m, v = self.layout.views(self.exp_avg[i]), self.layout.views(self.exp_avg_sq[i])
            sd["state"] = {
                j: {
                    "step": torch.tensor(float(self.updates[i])),
                    "exp_avg": m[name].clone(),
                    "exp_avg_sq": v[name].clone(),
                }
                for j, name in enumerate(self.layout.names)
            }
        run.opt.load_state_dict(sd)  # casts "step" to what the (fused) kernel wants
        if run.ema is not None:
            assert self.shadow is not None
            for name, view in self.layout.views(self.shadow[i]).items():
                run.ema.shadow[name].copy_(view)
            run.ema.updates = self.updates[i]

    def drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (runs that left the stack are synced already)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.members = [self.members[i] for i in keep]
        self.params = self.params.detach()[idx].requires_grad_()
        self.exp_avg, self.exp_avg_sq = self.exp_avg[idx], self.exp_avg_sq[idx]
        self.updates = [self.updates[i] for i in keep]
        if self.shadow is not None:
            self.shadow = self.shadow[idx]
        self._set_constants()

    def _set_constants(self) -> None:
        """Per-run constants as ``(N, 1)`` columns: Adam's, clipping, skipping, EMA."""
        cfgs = [m.run.cfg.train for m in self.members]

        def column(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float64, device=self.device)[:, None]

        self.beta1 = column([t.betas[0] for t in cfgs])
        self.beta2 = column([t.betas[1] for t in cfgs])
        self.eps = column([t.eps for t in cfgs]).to(self.dtype)
        self.weight_decay = column([t.weight_decay for t in cfgs]).to(self.dtype)
        # No clip_norm clips at infinity, as the solo loop does (the factor is then 1).
        self.clip = column([math.inf if t.clip_norm is None else t.clip_norm for t in cfgs])
        self.clip = self.clip.to(self.dtype)[:, 0]
        self.ema_decay = [t.ema_decay for t in cfgs]
        self.any_weight_decay = any(t.weight_decay != 0 for t in cfgs)

    # -- the batched step

    def _run_loss(
        self, params: dict[str, Tensor], x: Tensor, noise: Tensor, beta: Tensor
    ) -> tuple[Tensor, ...]:
        """One run's loss and log-terms (vmapped over runs): the solo step's objective."""
        t = self.members[0].run.cfg.train
        terms = functional_call(self.template, params, (x,), {"k": t.k, "noise": noise})
        if t.objective == "iwae":
            objective = iwae(terms)
        else:
            objective = elbo(
                terms,
                beta=beta,
                free_bits=t.free_bits,
                num_dims=self.template.latent_dim,
                group_size=t.free_bits_group_size,
            )
        return -objective.mean(), terms.log_px_z, terms.log_pz, terms.log_qz, terms.flow_logdet

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
        self.params.grad = None
        loss, *terms = self._loss(self.layout.views(self.params), x, noise, beta)
        loss.sum().backward()  # the runs share no parameter: row r gets run r's gradient
        grad = self.params.grad
        with torch.no_grad():
            # clip_grad_norm_ per run: the norm before clipping is the one logged.
            norm = torch.linalg.vector_norm(grad, dim=1)
            grad.mul_(torch.clamp(self.clip / (norm + 1e-6), max=1.0)[:, None])
            losses, norms = loss.detach().tolist(), norm.tolist()
            reasons = [
                _skip_reason(lo, gn, r.cfg.train.skip_grad_norm)
                for lo, gn, r in zip(losses, norms, runs, strict=True)
            ]
            self._adam_and_ema([r is None for r in reasons], [r.opt for r in runs])
        self._last = (loss.detach(), [t.detach() for t in terms], norms, betas, reasons)
        return reasons

    def result(self, i: int) -> StepResult:
        """Row ``i``'s :class:`StepResult` of the last :meth:`step` (built only when a run
        logs: most steps need just the skip reason)."""
        loss, terms, norms, betas, reasons = self._last
        run_terms = Terms(terms[0][i], terms[1][i], terms[2][i], flow_logdet=terms[3][i])
        return StepResult(loss[i], run_terms, norms[i], betas[i], reasons[i])

    @torch.no_grad()
    def _adam_and_ema(self, applied: list[bool], opts: list[torch.optim.Optimizer]) -> None:
        """``torch.optim.Adam``'s update of every applied row (each with its own learning
        rate, constants and step count), then the EMA; skipped rows stay as they were."""
        skipped = [i for i, a in enumerate(applied) if not a]
        if len(skipped) == len(applied):
            return
        backup = None
        if skipped:
            idx = torch.tensor(skipped, dtype=torch.long, device=self.device)
            backup = [t[idx].clone() for t in self._row_tensors()]
        self.updates = [n + int(a) for n, a in zip(self.updates, applied, strict=True)]
        step = torch.tensor(
            [max(n, 1) for n in self.updates], dtype=torch.float64, device=self.device
        )[:, None]
        lr = torch.tensor(
            [opt.param_groups[0]["lr"] for opt in opts], dtype=torch.float64, device=self.device
        )[:, None]
        p, g = self.params, self.params.grad
        if self.any_weight_decay:
            g = g.add(p * self.weight_decay)
        # The arithmetic of torch.optim.Adam (amsgrad off), one (N, 1) column per constant.
        self.exp_avg.lerp_(g, (1 - self.beta1).to(self.dtype))
        self.exp_avg_sq.mul_(self.beta2.to(self.dtype)).addcmul_(
            g * (1 - self.beta2).to(self.dtype), g
        )
        step_size = (lr / (1 - self.beta1**step)).to(self.dtype)
        bias_correction2_sqrt = torch.sqrt(1 - self.beta2**step).to(self.dtype)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        p.sub_((self.exp_avg / denom).mul_(step_size))
        if self.shadow is not None:
            # EMA.update: d_n = min(decay, (1 + n) / (10 + n)), n = updates before this one.
            weight = [
                1.0 - min(decay, n / (9 + n))
                for decay, n in zip(self.ema_decay, self.updates, strict=True)
            ]
            w = torch.tensor(weight, dtype=self.dtype, device=self.device)[:, None]
            self.shadow.lerp_(p, w)
        if backup is not None:
            for t, saved in zip(self._row_tensors(), backup, strict=True):
                t.index_copy_(0, idx, saved)
            self.updates = [n - int(i in skipped) for i, n in enumerate(self.updates)]

    def _row_tensors(self) -> list[Tensor]:
        out = [self.params, self.exp_avg, self.exp_avg_sq]
        return out + ([self.shadow] if self.shadow is not None else [])


def _skip_reason(loss: float, grad_norm: float, skip_grad_norm: float | None) -> str | None:
    """The solo step's skip decision (``vaeflow.run.train._update_step``)."""
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
    members = []
    for i, (cfg, run_dir, flag) in enumerate(zip(cfgs, dirs, flags, strict=True)):
        run = _setup_run(cfg, run_dir, flag, splits)
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
            keep = []
            for i, (m, reason) in enumerate(zip(stack.members, reasons, strict=True)):
                try:
                    status = _after_step(stack, i, m, reason, stop_after_step)
                except TrainingDiverged as e:  # this run stops, as alone; the others go on
                    summaries[order[id(m)]] = {"status": "diverged", "error": str(e)}
                    m.run.logger.close()
                    continue
                if status is None:
                    keep.append(i)
                else:
                    leave(m, status)
            if len(keep) < len(stack.members):
                stack.drop(keep)
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
    run.state.step = step + 1
    m.steps_done += 1
    with warnings.catch_warnings():
        # The solo optimiser never steps here (the stack does it); torch warns about that.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        run.sched.step()
    if skip_reason is not None and run.state.consecutive_skips >= t.max_consecutive_skips:
        stack.sync(i)
        with _own_rng(m.gen):
            run.save("last.pt")
        raise TrainingDiverged(
            f"{run.state.consecutive_skips} consecutive updates skipped at step {step} "
            f"(last: {skip_reason}); the parameters before the failures are saved in "
            f"{run.ckpt_dir / 'last.pt'}. Lower train.lr, set train.clip_norm, add "
            "train.kl_warmup_steps, or raise train.max_consecutive_skips."
        )
    finished = run.state.step >= t.steps
    if _periodic_due(run):
        stack.sync(i)
        with _own_rng(m.gen):
            early = _periodic(run, stack.result(i))
        if early is not None:
            return early
    stopped = stop_after_step is not None and run.state.step >= stop_after_step
    if stopped or finished:
        stack.sync(i)
    if stopped:
        return f"stopped after step {run.state.step} (stop_after_step)"
    return "completed" if finished else None
