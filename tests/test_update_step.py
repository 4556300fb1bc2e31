"""The training loop's update step on its own (vaeflow.run.train._update_step): no data
files, no run directory; a tiny model on random binary images."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from vaeflow.config import load_config
from vaeflow.models.build import build_model
from vaeflow.run.train import EMA, _lr_lambdas, _optimizer, _update_step

TINY = [
    "model.latent_dim=4",
    "model.encoder.options={hidden=[16]}",
    "model.decoder.options={hidden=[16]}",
    'model.posterior.flow="iaf"',
    "model.posterior.num_layers=1",
    "model.posterior.hidden=8",
    "model.posterior.context_features=4",
    "train.ema_decay=0.9",
    "train.device=cpu",
]


class _NaNLoss(nn.Module):
    """Calls the model, then poisons the reconstruction term: a non-finite loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, k=1):
        terms = self.model(x, k=k)
        return type(terms)(terms.log_px_z * float("nan"), terms.log_pz, terms.log_qz)


def _setup(*extra: str):
    cfg = load_config(None, [*TINY, *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambdas(cfg, model))
    ema = EMA(model, cfg.train.ema_decay)
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3))
    return cfg, model, opt, sched, ema, x


def _snapshot(model, opt, ema):
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(ema.state_dict()),
    )


def _assert_same(a, b):
    for sa, sb in zip(a, b, strict=True):
        torch.testing.assert_close(sa, sb, rtol=0, atol=0)


def test_an_applied_update_moves_parameters_ema_and_schedule():
    cfg, model, opt, sched, ema, x = _setup()
    before = copy.deepcopy(model.state_dict())
    result = _update_step(model, model, opt, sched, ema, x, cfg.train, beta=1.0)
    assert not result.skipped and result.skip_reason is None
    assert torch.isfinite(result.loss) and result.grad_norm > 0
    assert result.terms.log_px_z.shape == (cfg.train.k, 8)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert ema.updates == 1 and sched.last_epoch == 1


@pytest.mark.parametrize(
    ("extra", "wrap", "reason"),
    [
        ((), _NaNLoss, "non-finite loss"),
        (("train.skip_grad_norm=1e-6",), None, "gradient norm"),
    ],
)
def test_a_skipped_update_leaves_parameters_optimizer_and_ema_unchanged(extra, wrap, reason):
    cfg, model, opt, sched, ema, x = _setup(*extra)
    # One real update first, so the optimiser and the EMA have state to protect
    # (with skip_grad_norm set, raise it for that one step).
    t_ok = dataclasses.replace(cfg.train, skip_grad_norm=None)
    assert not _update_step(model, model, opt, sched, ema, x, t_ok, beta=1.0).skipped
    before = _snapshot(model, opt, ema)
    step_model = wrap(model) if wrap is not None else model
    result = _update_step(model, step_model, opt, sched, ema, x, cfg.train, beta=0.5)
    assert result.skipped and result.skip_reason.startswith(reason)
    assert result.beta == 0.5
    _assert_same(before, _snapshot(model, opt, ema))
    assert sched.last_epoch == 2  # the schedule counts skipped steps too
