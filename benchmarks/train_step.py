"""Images per second of one full training step; print a markdown table.

    python benchmarks/train_step.py                          # CPU, every model, eager
    python benchmarks/train_step.py --threads 2 --compile    # add torch.compile rows
    python benchmarks/train_step.py --device cuda --compile  # + bf16 autocast rows
    python benchmarks/train_step.py --channels-last          # + NHWC rows (train.channels_last)
    python benchmarks/train_step.py --compile-step           # + train.compile_step rows
    python benchmarks/train_step.py --compile --compile-step --channels-last --interleave
    python benchmarks/train_step.py --small --repeats 2      # smoke run (tiny models)

A step is what :func:`vaeflow.run.train.train` does per iteration (its own
``_update_step``, so the benchmark cannot drift from the loop): draw the batch from
:class:`~vaeflow.data.TrainBatches` (index gather + dynamic binarisation on the device),
``model(x, k)``, the bound (ELBO with free bits, or IWAE), ``backward``, gradient-norm
clipping, the two host reads the loop makes (``loss.item()`` and the gradient norm, for
its finiteness checks), the optimiser update (the config's optimiser, betas and weight
decay), the EMA update when the config keeps one, and the learning-rate schedule step.
Logging, validation and checkpoints are not included. The data are random images of the
right shape and dtype (timing does not depend on pixel values), so no dataset is needed.
Models come from the experiment configs, so the rows are the networks the paper
experiments train:

- ``quickstart``: README command 1 (MLP VAE, IAF posterior, RealNVP prior), batch 100.
- ``sylvester_iaf``: van den Berg et al.'s gated-conv VAE with an IAF posterior
  (``experiments/vandenberg2018_sylvester``), batch 100.
- ``cifar10``: the CIFAR-10 ResNet VAE with IAF and a discretised logistic mixture,
  batch 64: ``experiments/kingma2016_iaf/cifar10.toml`` as it was when the tables in
  benchmarks/README.md were measured (SiLU, no weight norm, 10-component mixture); the
  overrides below pin that network, since the config now follows the paper (ELU, weight
  norm, per-channel logistic, batch 256).

Variants: eager vs ``torch.compile`` of the model (``--compile``, ``train.compile``) vs
the whole step compiled (``--compile-step``, ``train.compile_step``: the loop's own
``_CompiledStep``, which also makes no host read, and on CUDA runs as a CUDA graph), fp32
vs bf16 autocast (CUDA only, as in training), NCHW vs NHWC memory layout
(``--channels-last``, as ``train.channels_last``). Reports median / min / max seconds per
step over ``--repeats`` steps after ``--warmup`` steps, images per second from the
median, the speed-up (the model's eager median over this one), the first call (which
includes any compilation), and peak memory (CUDA: allocator peak; CPU: see
``_timing.peak_memory``). ``--interleave`` builds all variants of a model first and then
times them in turns, one step of each per round, so that load from other processes falls
on all of them alike (use it on a shared machine; ratios from one such run are
comparable, absolute times are not). Never run as a test (a smoke run is).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_header, markdown_table, peak_memory, time_fn  # noqa: E402

from vaeflow.config import Config, load_config  # noqa: E402
from vaeflow.data import TrainBatches, to_memory_format  # noqa: E402
from vaeflow.models.build import build_model  # noqa: E402
from vaeflow.run.train import (  # noqa: E402
    EMA,
    _CompiledStep,
    _lr_lambdas,
    _optimizer,
    _update_step,
)
from vaeflow.run.utils import set_tf32  # noqa: E402

MODELS: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("experiments/quickstart/mnist_iaf_flowprior.toml", []),
    "sylvester_iaf": (
        "experiments/vandenberg2018_sylvester/config.toml",
        ['model.posterior.flow="iaf"', "model.posterior.options={num_hidden=1}"],
    ),
    "cifar10": (
        "experiments/kingma2016_iaf/cifar10.toml",
        [
            "model.encoder.options={channels=128,num_blocks=2,num_downsamples=3,out_features=512}",
            "model.decoder.options={channels=128,num_blocks=2,num_upsamples=3}",
            "model.posterior.options={}",
            'model.likelihood="discretized_logistic_mixture"',
            "model.likelihood_options={num_mixtures=10}",
            "data.batch_size=64",
        ],
    ),
    # Burda et al.'s one-layer VAE (issue 14's GPU target: an epoch of batch 20 in <= 1 s).
    "burda_one_layer": ("experiments/burda2016_iwae/config.toml", []),
    # The hierarchies as their experiments configure them (issue 13's benchmarks).
    "burda_two_layer": ("experiments/burda2016_iwae/two_layer.toml", []),
    "topdown_cifar10": ("experiments/kingma2016_iaf/topdown_cifar10.toml", []),
    # Rezende & Mohamed's deepest planar row: 80 tiny layers, launch-bound.
    "rezende_planar_k80": (
        "experiments/rezende2015_planar/config.toml",
        ["model.posterior.num_layers=80"],
    ),
    # The flow-prior experiment's slowest row (issue 16): IAF posterior, MAF prior.
    "vampprior_iaf_maf": (
        "experiments/flow_priors/config.toml",
        ['model.posterior.flow="iaf"', 'model.prior.name="flow"', 'model.prior.flow="maf"'],
    ),
}
"""Name -> (config file, overrides): the benchmarked networks."""

SMALL = {
    "quickstart": [
        "model.encoder.options={hidden=[32]}",
        "model.decoder.options={hidden=[32]}",
        "model.latent_dim=4",
        "model.posterior.hidden=16",
        "model.posterior.context_features=8",
        "model.prior.hidden=16",
        "data.batch_size=8",
    ],
    "sylvester_iaf": [
        "model.encoder.options={channels=[4,4],strides=[2,2],kernel_size=3,out_features=16}",
        "model.decoder.options={channels=[4,4,4],strides=[2,2],kernel_size=3}",
        "model.latent_dim=4",
        "model.posterior.hidden=16",
        # the flow reads the encoder's 16 features (context_projection = false)
        "model.posterior.context_features=16",
        "data.batch_size=8",
    ],
    "cifar10": [
        "model.encoder.options={channels=8,num_blocks=1,num_downsamples=3,out_features=16}",
        "model.decoder.options={channels=8,num_blocks=1,num_upsamples=3}",
        "model.latent_dim=4",
        "model.posterior.hidden=16",
        "model.posterior.context_features=8",
        "model.likelihood_options={num_mixtures=2}",
        "data.batch_size=4",
    ],
    "burda_one_layer": ["model.latent_dim=4", "data.batch_size=4"],
    "burda_two_layer": ["model.latent_dim=4", "data.batch_size=4"],
    "topdown_cifar10": [
        "model.topdown.channels=8",
        "model.topdown.latent_channels=2",
        "model.topdown.layers_per_resolution=[1]",
        "model.posterior.hidden=8",
        "model.posterior.context_features=8",
        "train.free_bits_group_size=1",
        "data.batch_size=4",
        "train.free_bits_batch_splits=1",
    ],
    "rezende_planar_k80": [
        "model.encoder.options={hidden=[16]}",
        "model.decoder.options={hidden=[16]}",
        "model.latent_dim=4",
        "model.posterior.num_layers=4",
        "data.batch_size=8",
    ],
    "vampprior_iaf_maf": [
        "model.encoder.options={hidden=[16],gated=true,activation='identity'}",
        "model.decoder.options={hidden=[16],gated=true,activation='identity'}",
        "model.latent_dim=4",
        "model.posterior.hidden=16",
        "model.posterior.context_features=8",
        "model.prior.hidden=16",
        "data.batch_size=8",
    ],
}
"""Overrides of ``--small``: the same code paths on tiny networks (CI smoke run)."""


def make_step(
    cfg: Config,
    device: torch.device,
    compile_: bool,
    amp: bool,
    channels_last: bool = False,
    compile_step: bool = False,
) -> tuple[Callable[[], None], int, int]:
    """Build the model, optimiser and data of ``cfg``; return ``(step, batch, params)``.

    ``compile_``: ``torch.compile`` the model (``train.compile``); ``compile_step``: the
    whole update compiled (``train.compile_step``, the loop's ``_CompiledStep``)."""
    torch.manual_seed(0)
    set_tf32(cfg.train.tf32)  # as the loop does: strict float32 unless the config asks
    model = build_model(cfg.model).to(device)
    if channels_last:  # as the loop does for train.channels_last
        model = model.to(memory_format=torch.channels_last)
    model.train()
    t = cfg.train
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambdas(cfg, model))
    ema = EMA(model, t.ema_decay) if t.ema_decay is not None else None
    binary = cfg.model.likelihood == "bernoulli"
    n = max(4 * cfg.data.batch_size, 64)
    x_uint8 = torch.randint(0, 256, (n, *cfg.model.x_shape), dtype=torch.uint8)
    batches = TrainBatches(
        x_uint8,
        cfg.data.batch_size,
        seed=0,
        kind="binary" if binary else "8bit",
        device=device,
        drop_last=True,
    )
    step_model = torch.compile(model) if compile_ else model
    compiled = _CompiledStep(model, opt, sched, ema, t, device) if compile_step else None
    counter = [0]

    def step() -> None:
        # The training loop's own update (vaeflow.run.train._update_step): loss, backward,
        # clipping, the skip checks with their host reads, optimiser, EMA, schedule; or
        # the loop's compiled update (train.compile_step).
        x = to_memory_format(batches.batch(counter[0]), channels_last)
        counter[0] += 1
        if compiled is not None:
            compiled(x, 1.0)
        else:
            _update_step(model, step_model, opt, sched, ema, x, t, beta=1.0, amp=amp)

    params = sum(p.numel() for p in model.parameters())
    return step, cfg.data.batch_size, params


#: A variant: (label, compile the model, bf16 autocast, NHWC, compile the whole step).
Variant = tuple[str, bool, bool, bool, bool]


def variants_for(args: argparse.Namespace, device: torch.device) -> list[Variant]:
    """The rows the flags ask for, eager first (the ratios' reference)."""
    out: list[Variant] = [("eager", False, False, False, False)]
    if args.channels_last:
        out.append(("eager + channels_last", False, False, True, False))
    if args.compile:
        out.append(("compile", True, False, False, False))
    if args.compile_step:
        out.append(("compiled step", False, False, False, True))
        if args.channels_last:
            out.append(("compiled step + channels_last", False, False, True, True))
    if device.type == "cuda":
        out.append(("eager + bf16", False, True, False, False))
        if args.compile:
            out.append(("compile + bf16", True, True, False, False))
    return out


def _time_interleaved(
    steps: list[Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> tuple[list[float], list[dict[str, float]]]:
    """First-call seconds and median / min / max seconds per step of each of ``steps``,
    timed in rounds of one step each (so slow phases of a shared machine hit all alike)."""
    first = []
    for step in steps:
        t0 = time.perf_counter()
        step()  # compiles, for the compiled variants
        _sync(device)
        first.append(time.perf_counter() - t0)
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    stats = [{"median": statistics.median(t), "min": min(t), "max": max(t)} for t in times]
    return first, stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(name: str, label: str, batch: int, params: int, times: dict, first: float) -> list:
    return [
        name,
        label,
        str(batch),
        f"{params / 1e6:.2f}M",
        f"{times['median'] * 1e3:.1f} / {times['min'] * 1e3:.1f} / {times['max'] * 1e3:.1f}",
        f"{batch / times['median']:.0f}",
        "",  # speed-up over eager: filled in once the model's rows are known
        f"{first:.1f}",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument(
        "--compile-step",
        action="store_true",
        help="add rows with train.compile_step (the whole update compiled)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="add rows with train.channels_last (NHWC conv weights and batches)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time a model's variants in turns (one step each per round): for busy machines",
    )
    p.add_argument("--small", action="store_true", help="tiny networks (smoke run)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = variants_for(args, device)
    print(machine_header(device, torch.get_num_threads()))
    small = ", small networks" if args.small else ""
    order = ", variants interleaved (one step each per round)" if args.interleave else ""
    print(f"repeats {args.repeats} after {args.warmup} warm-up steps{small}{order}\n")
    rows = []
    for name in args.models:
        path, overrides = MODELS[name]
        cfg = load_config(ROOT / path, overrides + (SMALL[name] if args.small else []))
        model_rows: list[list[str]] = []
        medians: dict[str, float] = {}
        built = []
        for label, compile_, amp, nhwc, whole in variants:
            try:
                step, batch, params = make_step(cfg, device, compile_, amp, nhwc, whole)
                if args.interleave:
                    built.append((label, step, batch, params))
                    continue
                t0 = time.perf_counter()
                step()
                first = time.perf_counter() - t0
                times = time_fn(step, repeats=args.repeats, warmup=args.warmup, device=device)
                mem = peak_memory(step, device)
            except Exception as e:  # a failing variant (e.g. no compiler) must not hide the rest
                failed = f"failed: {type(e).__name__}: {e}"[:120]
                model_rows.append([name, label, "", "", failed, "", "", "", ""])
                continue
            row = _row(name, label, batch, params, times, first)
            model_rows.append([*row, "n/a" if mem is None else f"{mem:.0f}"])
            medians[label] = times["median"]
        if built:
            try:
                first, stats = _time_interleaved(
                    [b[1] for b in built], args.repeats, args.warmup, device
                )
            except Exception as e:
                failed = f"failed: {type(e).__name__}: {e}"[:120]
                stats, first = [], []
                model_rows += [[name, b[0], "", "", failed, "", "", "", ""] for b in built]
            for (label, _, batch, params), times, f in zip(built, stats, first, strict=False):
                model_rows.append([*_row(name, label, batch, params, times, f), "-"])
                medians[label] = times["median"]
        for r in model_rows:
            if "eager" in medians and r[1] in medians:
                r[6] = f"{medians['eager'] / medians[r[1]]:.2f}x"
        rows += model_rows
    headers = [
        "model",
        "variant",
        "batch",
        "params",
        "step ms (median / min / max)",
        "images/s",
        "speed-up",
        "first call s",
        "peak MiB",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
