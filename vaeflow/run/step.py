"""One robust optimiser update (after vdvae, Child 2021): the training loss (the negated
beta-weighted, free-bits ELBO or the IWAE bound of Burda et al. 2016), backward, clipping,
and a skip of the update on a non-finite loss or gradient, or a gradient norm above
``train.skip_grad_norm``; under ``train.sync_free`` the same decision kept and applied on
the device, without a host read."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import TrainConfig
from ..models.bounds import Terms, elbo, iwae
from ..models.vae import VAE, _data_validation_off
from .distributed import _any, _Dist
from .ema import EMA

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
    ctx: _Dist = _Dist(),  # noqa: B008 (a frozen dataclass: immutable)
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
