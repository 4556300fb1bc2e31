"""The training loop's update step on its own (vaeflow.run.train._update_step): no data
files, no run directory; a tiny model on random binary images."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from vaeflow.config import ConfigError, load_config
from vaeflow.models.build import build_model
from vaeflow.run.stack import check_stackable
from vaeflow.run.train import (
    EMA,
    SKIP_REASONS,
    _check_sync_free,
    _DeviceSkips,
    _lr_lambdas,
    _optimizer,
    _State,
    _update_step,
)

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


# ----------------------------------------------------------------------------- sync_free

#: (inject a non-finite loss, skip_grad_norm) per step: a skipped first step (no optimiser
#: state yet), applied steps, a non-finite loss and a gradient norm above the threshold.
_SEQUENCE = [
    (True, None),
    (False, None),
    (False, None),
    (True, None),
    (False, 1e-6),
    (False, None),
    (True, None),
    (False, None),
]


def _run_sequence(sync_free: bool, *extra: str):
    """The steps of ``_SEQUENCE`` from the same start, with the syncing or the sync-free
    step; returns the final model/optimiser/EMA state and each step's values."""
    cfg, model, opt, sched, ema, x = _setup(*extra, f"train.sync_free={str(sync_free).lower()}")
    torch.manual_seed(1)
    seen, states = [], []
    for nan, skip_norm in _SEQUENCE:
        t = dataclasses.replace(cfg.train, skip_grad_norm=skip_norm)
        step_model = _NaNLoss(model) if nan else model
        r = _update_step(model, step_model, opt, sched, ema, x, t, beta=0.7)
        seen.append((r.loss.item(), float(r.grad_norm), r.skipped, sched.last_epoch))
        states.append(_snapshot(model, opt, ema))
    return states, seen, ema.updates


@pytest.mark.parametrize(
    "extra",
    [(), ('train.optimizer="adam_normgrad"', "train.weight_decay=0.01", "train.clip_norm=0.5")],
    ids=["adam", "adam_normgrad+clip"],
)
def test_sync_free_steps_equal_the_syncing_steps_bit_for_bit(extra):
    state_a, seen_a, updates_a = _run_sequence(False, *extra)
    state_b, seen_b, updates_b = _run_sequence(True, *extra)
    skipped = [s[2] for s in seen_a]
    assert skipped == [True, False, False, True, True, False, True, False]
    assert str(seen_a) == str(seen_b)  # str: the non-finite losses compare equal too
    assert updates_a == updates_b == 4
    # After every step (the skipped first one leaves no optimiser state in either).
    for a, b in zip(state_a, state_b, strict=True):
        _assert_same(a, b)
    assert state_a[0][1]["state"] == {}


def test_the_masked_ema_equals_the_host_ema():
    """The sync-free EMA (device count, a weight masked by the skip flag) averages bit
    for bit as the host EMA over hundreds of updates, where a float32 weight would not."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    host, device = EMA(model, 0.999), EMA(model, 0.999)
    with torch.no_grad():
        for n in range(400):
            skip = n % 7 == 3
            model.weight.add_(torch.randn_like(model.weight))
            if not skip:
                host.update(model)
            device.update(model, torch.tensor(skip))
    assert host.updates == device.updates == 400 - 57
    torch.testing.assert_close(host.shadow, device.shadow, rtol=0, atol=0)


def test_sync_free_skip_codes_name_the_reason():
    cfg, model, opt, sched, ema, x = _setup("train.sync_free=true")
    assert not _update_step(model, model, opt, sched, ema, x, cfg.train, beta=1.0).skipped
    nan = _update_step(model, _NaNLoss(model), opt, sched, ema, x, cfg.train, beta=1.0)
    t = dataclasses.replace(cfg.train, skip_grad_norm=1e-6)
    big = _update_step(model, model, opt, sched, ema, x, t, beta=1.0)
    assert [SKIP_REASONS[int(r.skip_code) - 1] for r in (nan, big)] == [
        "non-finite loss",
        "gradient norm > train.skip_grad_norm",
    ]
    assert nan.skip_reason is None and isinstance(big.grad_norm, torch.Tensor)


_SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _count_syncs(monkeypatch) -> dict[str, int]:
    """Count the Python-level reads of a tensor's value on the host (each one a
    host-device synchronisation on a GPU)."""
    calls = dict.fromkeys(_SYNCS, 0)
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


@pytest.mark.parametrize("sync_free", [False, True])
def test_the_sync_free_step_reads_nothing_from_the_device(monkeypatch, sync_free):
    """Between log steps the sync-free update step, EMA and skip counting read no tensor
    on the host (after the first step, which creates the optimiser state); the syncing
    step reads the loss and the gradient norm every step (the counter works)."""
    flag = str(sync_free).lower()
    cfg, model, opt, sched, ema, x = _setup("train.skip_grad_norm=1e3", f"train.sync_free={flag}")
    _update_step(model, model, opt, sched, ema, x, cfg.train, beta=1.0)
    skips = _DeviceSkips(_State(), cfg.train.max_consecutive_skips, x.device)
    calls = _count_syncs(monkeypatch)
    for step in range(1, 5):
        t = dataclasses.replace(cfg.train, skip_grad_norm=1e-6 if step == 3 else 1e3)
        step_model = _NaNLoss(model) if step == 2 else model
        r = _update_step(model, step_model, opt, sched, ema, x, t, beta=1.0)
        if sync_free:
            skips.record(r.skip_code, step)
    monkeypatch.undo()
    if sync_free:
        assert sum(calls.values()) == 0, calls
        state = _State()
        assert skips.read(state) is None and (state.skipped, state.consecutive_skips) == (2, 0)
    else:
        assert calls["item"] >= 8


def test_device_skip_counters_report_a_failure_after_recovery():
    """The syncing loop stops at the step where the run of skips reaches the limit;
    the device counters remember that step even if updates were applied before the read."""
    skips = _DeviceSkips(_State(skipped=4, consecutive_skips=1), 3, torch.device("cpu"))
    for step, code in enumerate([2, 0, 1, 1, 1, 0, 3], start=10):
        skips.record(torch.tensor(code), step)
    state = _State()
    # runs: 1 + [step 10] = 2, applied, [12, 13, 14] reaches 3 at step 14, applied, [16]
    assert skips.read(state) == (14, 1)
    assert (state.skipped, state.consecutive_skips) == (4 + 5, 1)


def test_sync_free_refuses_optimisers_without_a_fused_found_inf(monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.sync_free.*train\.optimizer.*'adamax'"):
        load_config(None, [*TINY, "train.sync_free=true", 'train.optimizer="adamax"'])
    with pytest.raises(ConfigError, match=r"train\.sync_free"):
        check_stackable(load_config(None, [*TINY, "train.sync_free=true"]))
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"train\.sync_free = true needs the fused Adam"):
        _check_sync_free(torch.optim.Adam(model.parameters(), foreach=True))
    _check_sync_free(torch.optim.Adam(model.parameters(), fused=True))
