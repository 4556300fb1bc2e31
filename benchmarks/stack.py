"""Images per second of N stacked training runs against the same N runs one after another.

    python benchmarks/stack.py                       # Burda 1-layer model, N = 1, 4, 16
    python benchmarks/stack.py --model sylvester --steps 5   # the gated-conv VAE
    python benchmarks/stack.py --sizes 1 4 --steps 20 --small   # smoke run

The models (``--model``): ``burda``, the Burda et al. 2016 one-stochastic-layer VAE of
``experiments/burda2016_iwae/config.toml`` (MLP 784-200-200-50, tanh, Bernoulli, batch
20, Adam); ``sylvester``, the van den Berg et al. 2018 gated-conv VAE of
``experiments/vandenberg2018_sylvester/config.toml`` (its configured posterior, batch
100, Adamax). Both on random binary images of MNIST's shape (timing does not depend on
pixel values, so no dataset is needed). The N runs differ in ``train.seed``.

* **sequential**: each of the N runs is set up as ``vaeflow train`` sets it up
  (``train._setup_run``) and makes ``--steps`` iterations of the training loop's own
  step (``TrainBatches.batch`` + ``train._update_step`` + the state bookkeeping), one run
  after the other.
* **stacked**: the same N runs in one :class:`vaeflow.run.stack._Stack`, ``--steps``
  iterations of its step and the per-run bookkeeping (``stack._after_step``: schedule
  step, state, the periodic check). Its stacked parameters are laid out in memory as
  the batched backward produces their gradients (``stack._gradient_orders``).
* **stacked, contiguous parameters**: the same, with the stacked parameters contiguous
  (``_Stack(..., gradient_layout=False)``, the layout before that change): autograd then
  copies each transposed weight gradient into the parameter's layout every step.

Logging, validation and checkpoints are kept out of the timed steps (their periods are
set beyond ``--steps``) in both, as they are the same solo code in both. Set-up is not
timed. One thread (``--threads``), both measured in the same process, side by side: on
these shared machines only ratios from one run count. Each cell is the median of
``--repeats`` timings of ``--steps`` iterations (after one warm-up block).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_header, markdown_table  # noqa: E402

from vaeflow.config import Config, load_config  # noqa: E402
from vaeflow.data import DataSplits  # noqa: E402
from vaeflow.run.stack import _after_step, _Member, _Stack, check_model_stackable  # noqa: E402
from vaeflow.run.train import _beta, _Run, _setup_run, _update_step  # noqa: E402

MODELS: dict[str, tuple[Path, list[str]]] = {
    "burda": (
        ROOT / "experiments" / "burda2016_iwae" / "config.toml",
        ["model.encoder.options={hidden=[32]}", "model.decoder.options={hidden=[32]}"],
    ),
    "sylvester": (
        ROOT / "experiments" / "vandenberg2018_sylvester" / "config.toml",
        [
            "model.encoder.options={channels=[4,4],strides=[2,2],kernel_size=3,out_features=16}",
            "model.decoder.options={channels=[4,4,4],strides=[2,2],kernel_size=3}",
            "model.latent_dim=4",
            # the flow reads the encoder's 16 features (context_projection = false)
            "model.posterior.context_features=16",
            "data.batch_size=8",
        ],
    ),
}
"""Name -> (config, the ``--small`` overrides: the same code paths on tiny networks)."""

TITLES = {"burda": "Burda 1-layer VAE", "sylvester": "Sylvester gated-conv VAE"}


def _configs(
    n: int, small: bool, model: str = "burda", device: str = "cpu", compile_step: bool = False
) -> list[Config]:
    far = 10**9  # no logging, validation or checkpoint inside the timed steps
    common = [
        f"train.device={device}",
        f"train.steps={far}",
        f"train.log_every={far}",
        f"train.val_every={far}",
        f"train.ckpt_every={far}",
        f"train.compile_step={str(compile_step).lower()}",
        *(MODELS[model][1] if small else []),
    ]
    path = MODELS[model][0]
    return [load_config(path, [*common, f"train.seed={seed}"]) for seed in range(n)]


def _splits() -> DataSplits:
    g = torch.Generator().manual_seed(0)
    # Binary images in uint8 (0 / 255): what every binarisation accepts, "given" included.
    train = ((torch.rand(2000, 1, 28, 28, generator=g) > 0.5) * 255).to(torch.uint8)
    val = train[:400].clone()
    return DataSplits(train, val, val, (1, 28, 28), "binary", "random")


def _setup(cfgs: list[Config], root: Path, stacked: bool = True) -> list[_Member]:
    """The runs as ``train_stack`` sets them up (``stacked``; else as ``vaeflow train``
    does): each with the noise stream its set-up leaves in the global RNG."""
    splits = _splits()
    members = []
    for i, cfg in enumerate(cfgs):
        run = _setup_run(cfg, root / f"run{i}", False, splits, stacked=stacked)
        gen = torch.Generator()
        gen.set_state(torch.get_rng_state())
        members.append(_Member(run, gen))
    return members


def _sync() -> None:
    """Wait for queued CUDA work, so a timing covers the kernels and not only their launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_sequential(runs: list, steps: int) -> float:
    _sync()
    start = time.perf_counter()
    for run in runs:
        t = run.cfg.train
        for _ in range(steps):
            step = run.state.step
            result = _update_step(
                run.model, run.step_model, run.opt, run.sched, run.ema,
                run.batches.batch(step), t, beta=_beta(run.cfg, step), device=run.device,
            )  # fmt: skip
            run.state.record_update(result.skipped)
            run.means.add(result)  # the interval means, as the loop (and the stack) adds
            run.state.step = step + 1
    _sync()
    return time.perf_counter() - start


def _time_stacked(stack: _Stack, steps: int) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        reasons = stack.step()
        for i, (m, reason) in enumerate(zip(stack.members, reasons, strict=True)):
            _after_step(stack, i, m, reason, None)
    _sync()
    return time.perf_counter() - start


def _time_compiled_solo(run: _Run, steps: int) -> float:
    """``steps`` iterations of one run's compiled step (``train.compile_step``), as the
    solo loop calls it."""
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        step = run.state.step
        result = run.compiled(run.batches.batch(step), _beta(run.cfg, step))
        run.skips.record(result.skip_code, step)  # on the device, as the solo loop
        run.means.add(result)
        run.state.step = step + 1
    _sync()
    return time.perf_counter() - start


#: The variants timed side by side (``--variants``): name -> what it is.
VARIANTS = {
    "sequential": "N runs one after another, the eager solo step",
    "sequential_compiled": "the solo step with train.compile_step (one run's rate x N: "
    "each run compiles its own graph)",
    "stacked_before": "the stack before this change: contiguous parameters, each run's "
    "optimiser stepping on its rows",
    "stacked": "the stack: parameters laid out as their gradients come, one batched update",
    "stacked_compiled": "the stack with train.compile_step: its batched update compiled",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="burda")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=100, help="iterations per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small", action="store_true", help="tiny hidden layers (smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="what to time (the first one is the reference of the ratio columns)",
    )  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_header(args.device, args.threads))
    for name in args.variants:
        print(f"- {name}: {VARIANTS[name]}")
    batch = _configs(1, args.small, args.model, args.device)[0].data.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            cfgs = _configs(n, args.small, args.model, args.device)
            compiled_cfgs = _configs(n, args.small, args.model, args.device, compile_step=True)
            check_model_stackable(cfgs)  # what `vaeflow sweep --stack` checks first
            root = Path(tmp) / f"n{n}"
            timers = {}
            opened = []
            for name in args.variants:
                if name == "sequential":
                    runs = [m.run for m in _setup(cfgs, root / name, stacked=False)]
                    timers[name] = functools.partial(_time_sequential, runs)
                    opened += runs
                elif name == "sequential_compiled":
                    run = _setup(compiled_cfgs[:1], root / name, stacked=False)[0].run
                    timers[name] = lambda steps, run=run, n=n: _time_compiled_solo(run, n * steps)
                    opened.append(run)
                else:
                    stack = _Stack(
                        _setup(compiled_cfgs if name == "stacked_compiled" else cfgs, root / name),
                        gradient_layout=name != "stacked_before",
                        batched_update=name != "stacked_before",
                    )
                    timers[name] = functools.partial(_time_stacked, stack)
                    opened += [m.run for m in stack.members]
            for timer in timers.values():  # warm-up (and compilation)
                timer(max(2, args.steps // 10))
            times: dict[str, list[float]] = {name: [] for name in timers}
            for _ in range(args.repeats):  # alternate, so load changes hit all alike
                for name, timer in timers.items():
                    times[name].append(timer(args.steps))
            images = n * args.steps * batch
            rates = {name: images / statistics.median(t) for name, t in times.items()}
            ref = rates[args.variants[0]]
            rows.append(
                [n, *(f"{r:,.0f}" for r in rates.values())]
                + [f"{r / ref:.2f}x" for r in list(rates.values())[1:]]
            )
            for run in opened:
                run.logger.close()
    print(
        f"\nimages/s of N runs ({TITLES[args.model]}, batch {batch}, {args.steps} steps per "
        f"timing, median of {args.repeats}, {args.device}, {args.threads} thread(s)); ratios "
        f"against {args.variants[0]}\n"
    )
    header = ["N", *args.variants, *(f"{v} / {args.variants[0]}" for v in args.variants[1:])]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
