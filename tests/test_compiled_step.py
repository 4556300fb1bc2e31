"""The compiled training step (train.compile_step, vaeflow.run.train._CompiledStep) against
the eager step it replaces: the same updates, no recompilation, skipped updates that change
nothing. A tiny model on random binary images; CPU (inductor's default mode). Each
compiled run pays a compilation (tens of seconds on the 2-core CPU), so the runs are
module fixtures shared by the tests that read them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from vaeflow.config import ConfigError, load_config
from vaeflow.models.build import build_model
from vaeflow.models.vae import _data_validation_off
from vaeflow.run.stack import check_stackable
from vaeflow.run.train import (
    EMA,
    SKIP_REASONS,
    _beta,
    _CompiledStep,
    _lr_lambdas,
    _optimizer,
    _prior_parameters,
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
    "train.device=cpu",
    "train.compile_step=true",
    "train.steps=12",
    # Learning rate and KL weight change at every step: warm-up, then cosine decay; KL
    # warm-up from 0.1 over all steps.
    "train.lr_warmup_steps=3",
    'train.lr_schedule="cosine"',
    "train.kl_warmup_steps=12",
    "train.kl_warmup_start=0.1",
    "train.ema_decay=0.9",
    "train.clip_norm=20.0",
    "train.skip_grad_norm=1e3",
]

_GATED = [
    'train.optimizer="adam_normgrad"',
    "model.encoder.options={hidden=[16],gated=true,activation='identity'}",
    "model.decoder.options={hidden=[16],gated=true,activation='identity'}",
]

VARIANTS = {
    "adam": [],
    # Adamax (the Sylvester-flow experiments' optimiser) with weight decay and a prior
    # learning at its own rate in a second param group, starting late (its first updates
    # at step 4: one more compilation).
    "adamax+delayed prior": [
        'train.optimizer="adamax"',
        "train.weight_decay=0.01",
        'model.prior.name="flow"',
        'model.prior.flow="realnvp"',
        "model.prior.num_layers=2",
        "model.prior.hidden=8",
        "train.prior_lr_scale=0.5",
        "train.prior_freeze_steps=4",
    ],
    "adam_normgrad": ['train.optimizer="adam_normgrad"', "train.weight_decay=0.01"],
    # The IWAE code's Adam (IWAEAdam: second moment started at initial_second_moment,
    # eps on sqrt(v) unbiased, each update from the previous step's moments), with the
    # settings of experiments/burda2016_iwae.
    "adam_iwae": [
        'train.optimizer="adam_iwae"',
        "train.betas=[0.99, 0.999]",
        "train.eps=5e-6",
        "train.initial_second_moment=0.0025",
    ],
    # Rezende & Mohamed's annealing as read: beta on log p(x|z) + log p(z), not on the KL.
    "joint warm-up": ['train.kl_warmup_target="joint"'],
    # A two-stochastic-layer hierarchy (Burda et al.'s bottom-up kind): q(z1|x) with the
    # IAF, q(z2|z1), p(z1|z2) -- the per-layer terms in the same one graph.
    "two-layer hierarchy": ['model.upper_layers=[{latent_dim=2,hidden=[8],activation="tanh"}]'],
    # The VampPrior-protocol rows (experiments/flow_priors, which trains with the compiled
    # step): gated MLPs and AdamNormGrad with each prior those rows use that no variant
    # above covers -- VampPrior (pseudo-inputs through the encoder), MoG, spline coupling.
    "gated+vamp": [
        *_GATED,
        'model.prior.name="vamp"',
        "model.prior.num_components=5",
    ],
    "gated+mog": [*_GATED, 'model.prior.name="mog"', "model.prior.num_components=3"],
    # ... with AdamNormGrad normalising the gated layers' and the head's halves apart
    "gated+mog, split normgrad": [
        *_GATED,
        "train.normgrad_split=true",
        'model.prior.name="mog"',
        "model.prior.num_components=3",
    ],
    "gated+nsf prior": [
        *_GATED,
        'model.prior.name="flow"',
        'model.prior.flow="nsf_coupling"',
        "model.prior.num_layers=2",
        "model.prior.hidden=8",
    ],
}

#: The batch of each step: random binary images, except a NaN pixel (a non-finite loss)
#: and images scaled by 200 (a finite loss whose gradient norm is above skip_grad_norm).
BATCHES = ["ok"] * 12
BATCHES[5], BATCHES[8] = "nan", "huge"
SKIP_CODES = [0] * 12
SKIP_CODES[5], SKIP_CODES[8] = 1, 3  # SKIP_REASONS: non-finite loss; norm > skip_grad_norm


def _batches() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=g)
    nan = x.clone()
    nan[2, 0, 5, 5] = float("nan")
    return {"ok": x, "nan": nan, "huge": x * 200}


def _adam_state(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict()["state"])


def _run(variant: str, compiled: bool) -> dict:
    """Train the tiny model through :data:`BATCHES` with the eager step (``_update_step``,
    which ignores ``train.compile_step``: the syncing step, bit-identical to the sync-free
    one for Adam) or the compiled one, from the same initial weights and random stream;
    record every step."""
    cfg = load_config(None, [*TINY, *VARIANTS[variant]])
    t = cfg.train
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambdas(cfg, model))
    ema = EMA(model, t.ema_decay)
    prior = _prior_parameters(model) if t.prior_freeze_steps else []
    if compiled:
        torch._dynamo.reset()  # a fresh cache: compilations counted from here
        counters.clear()
        step = _CompiledStep(model, opt, sched, ema, t, torch.device("cpu"), prior)
    batches = _batches()
    torch.manual_seed(1)
    out = {"seen": [], "model": [], "adam": [], "ema": [], "graphs": [], "frames": []}
    for i, kind in enumerate(BATCHES):
        frozen = i < t.prior_freeze_steps
        beta = _beta(cfg, i)
        x = batches[kind]
        if compiled:
            r = step(x, beta, frozen=frozen)
        else:  # without the data check (the compiled step has none): NaN batches pass
            with _data_validation_off(model.likelihood):
                r = _update_step(
                    model, model, opt, sched, ema, x, t, beta=beta, frozen=prior if frozen else ()
                )
        lr = float(sched.get_last_lr()[0])
        out["seen"].append((r.loss.item(), float(r.grad_norm), _skip_code(r), lr, beta))
        out["model"].append(copy.deepcopy(model.state_dict()))
        out["adam"].append(_adam_state(opt))
        out["ema"].append(copy.deepcopy(ema.state_dict()))
        out["graphs"].append(counters["stats"]["unique_graphs"])
        out["frames"].append(counters["frames"]["ok"])
    out["prior_ids"] = _prior_indices(opt, prior)
    return out


def _skip_code(result) -> int:
    """0 (applied) or 1 + the index of the reason in SKIP_REASONS, from either step."""
    if result.skip_code is not None:  # the compiled (sync-free) step's device code
        return int(result.skip_code)
    if result.skip_reason is None:
        return 0
    prefix = " ".join(result.skip_reason.split()[:2])  # "gradient norm 4.8e+03 > ..."
    return 1 + [r.startswith(prefix) for r in SKIP_REASONS].index(True)


def _prior_indices(opt: torch.optim.Optimizer, prior: list) -> set[int]:
    """The optimiser's indices (as in its state_dict) of the delayed prior's parameters."""
    ids = {id(p) for p in prior}
    params = [p for group in opt.param_groups for p in group["params"]]
    return {i for i, p in enumerate(params) if id(p) in ids}


@pytest.fixture(scope="module", params=list(VARIANTS))
def runs(request) -> tuple[str, dict, dict]:
    variant = request.param
    return variant, _run(variant, compiled=False), _run(variant, compiled=True)


def test_compiled_steps_equal_the_eager_steps(runs):
    """Losses, gradient norms, skip codes, learning rates, parameters, Adam state and EMA
    agree with the eager step after every step, to float rounding (the compiled graphs
    fuse and reorder float32 arithmetic; bit equality is not expected)."""
    variant, eager, compiled = runs
    assert [s[2] for s in eager["seen"]] == SKIP_CODES  # the sequence does what it says
    for i, (a, b) in enumerate(zip(eager["seen"], compiled["seen"], strict=True)):
        assert a[2:] == b[2:], (i, a, b)  # skip code, learning rate, beta: exactly
        if a[2] != 1:  # a non-finite loss is NaN in both
            torch.testing.assert_close(b[:2], a[:2], rtol=1e-4, atol=1e-4, msg=f"step {i}")
    buffers = _buffers(variant)
    for i in range(len(BATCHES)):
        msg = f"{variant}, after step {i}"
        torch.testing.assert_close(
            compiled["model"][i], eager["model"][i], rtol=1e-5, atol=1e-5, msg=msg
        )
        torch.testing.assert_close(compiled["ema"][i], eager["ema"][i], rtol=1e-5, atol=1e-5)
        # Adam's state: the eager step creates it at a parameter's first update, the
        # compiled one before the first step (zero moments, step 0).
        a, b = eager["adam"][i], compiled["adam"][i]
        assert set(a) <= set(b) and len(b) == len(compiled["model"][i]) - buffers
        torch.testing.assert_close({k: b[k] for k in a}, a, rtol=1e-5, atol=1e-5, msg=msg)
        for k in set(b) - set(a):  # not updated yet: only the delayed prior's
            assert k in compiled["prior_ids"] and float(b[k]["step"]) == 0, (msg, k)
            assert not any(v.any() for v in b[k].values()), (msg, k)  # zero moments
    # the delayed prior moved only from step 4 on, as in eager
    last = len(BATCHES) - 1
    assert all(float(compiled["adam"][last][k]["step"]) > 0 for k in compiled["adam"][last])


def _buffers(variant: str) -> int:
    """Non-parameter entries of the tiny model's state_dict (masks, orders, centring)."""
    cfg = load_config(None, [*TINY, *VARIANTS[variant]])
    model = build_model(cfg.model)
    return len(model.state_dict()) - len(list(model.parameters()))


def test_compiled_step_compiles_once(runs):
    """After the first step no step compiles again, although learning rate and KL weight
    change at every step and two updates are skipped; the delayed prior's start (its
    gradients join the update) compiles the update once more."""
    variant, _, compiled = runs
    graphs, frames = compiled["graphs"], compiled["frames"]
    settled = 4 if variant == "adamax+delayed prior" else 0
    assert graphs[0] == 1  # forward, backward and update: one graph, no graph break
    assert graphs[settled:] == [graphs[settled]] * (len(BATCHES) - settled), graphs
    assert frames[settled:] == [frames[settled]] * (len(BATCHES) - settled), frames
    if settled:
        assert graphs[settled] == graphs[0] + 1, graphs


def test_compiled_skipped_updates_change_nothing(runs):
    """A non-finite loss and a gradient norm above skip_grad_norm leave parameters, Adam
    state (moments and step counts) and EMA (average and count) exactly as they were,
    in both steps; the schedule still advances."""
    _, eager, compiled = runs
    for run in (eager, compiled):
        for i, code in enumerate(SKIP_CODES):
            if code == 0:
                continue
            for part in ("model", "adam", "ema"):
                torch.testing.assert_close(
                    run[part][i], run[part][i - 1], rtol=0, atol=0, msg=f"{part}, step {i}"
                )
            assert run["seen"][i][3] != run["seen"][i - 1][3]  # the learning rate moved on
    applied = SKIP_CODES.count(0)
    assert compiled["ema"][-1]["updates"] == eager["ema"][-1]["updates"] == applied


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (['train.optimizer="rmsprop"'], r"train\.compile_step.*'rmsprop'.*train\.compile = true"),
        (["train.compile=true"], r"train\.compile_step.*set train\.compile = false"),
        (["train.amp=true"], r"train\.compile_step.*train\.amp.*train\.compile = true"),
    ],
)
def test_unsupported_combinations_are_config_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*TINY, *extra])


def test_compile_step_cannot_be_data_parallel(tmp_path, monkeypatch):
    """(A stack takes train.compile_step: it compiles its batched update, tests/test_stack.py.)"""
    from vaeflow.run.train import train

    check_stackable(load_config(None, TINY))  # no refusal
    monkeypatch.setattr(
        "vaeflow.run.train._init_distributed",
        lambda device: __import__("vaeflow.run.train", fromlist=["_Dist"])._Dist(0, 2, 0),
    )
    with pytest.raises(ConfigError, match=r"train\.compile_step.*torchrun started 2"):
        train(load_config(None, TINY), tmp_path / "ddp")
    assert not (tmp_path / "ddp").exists()  # refused before the run directory
