"""The optimiser a run trains with and the schedules it follows, built from the config:
the configured optimiser and its param groups (the prior's own when it learns at its own
rate or starts late), the learning-rate schedule per group, the KL weight's warm-up, and
the checks that a resume keeps the same optimiser and its state's memory layout."""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from ..layers import fused_parameters
from .optim import AdamNormGrad, IAFAdamax, IWAEAdam


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
