"""Steps per second of the real training loop (``vaeflow.run.train.train``) per speed
setting, side by side; print a markdown table.

    python benchmarks/train_loop.py --steps 300 --repeats 2 --threads 1
    python benchmarks/train_loop.py --model sylvester_iaf --variants eager compiled_step
    python benchmarks/train_loop.py --small --steps 6 --log-every 2 --repeats 1   # smoke run

Unlike ``train_step.py`` (one update, timed alone), this runs the whole loop a user runs:
``train(cfg)`` with the config's own optimiser, KL warm-up and schedule, the data
pipeline (``TrainBatches``), skip accounting, logging to ``metrics.jsonl`` and TensorBoard,
and the final checkpoint -- on random binary images of the dataset's shape (timing does
not depend on pixel values; no dataset files needed), with validation, image grids and
the test evaluation off (``data.val_size = 0``, ``train.image_every = 0``, ``ckpt_every
= steps``; ``train()`` does not evaluate).

Per run two numbers: the loop's steady rate, steps per second between the logged steps
``--settle`` and ``--steps`` (``metrics.jsonl`` time stamps: the first steps, which
compile, are left out), and the whole call's wall time (set-up, compilation, final
checkpoint and summary included). The variants run in turns (each repeat runs every
variant once, in order), so that load from other processes falls on all of them alike;
the table gives the median over repeats and the ratio of each variant's median rate to the
first variant's. Never run as a test (a smoke run is).

Models (``--model``): ``sylvester`` is ``experiments/vandenberg2018_sylvester/config.toml``
as it is (the O-SNF row: gated-conv encoder and decoder, orthogonal Sylvester flow,
Adamax, batch 100); the others are ``train_step.py``'s networks (``sylvester_iaf``,
``quickstart``, ...).
"""

from __future__ import annotations

import argparse
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
from train_step import MODELS, SMALL  # noqa: E402

from vaeflow.config import DATA_BINARIZATIONS, load_config  # noqa: E402
from vaeflow.data import DataSplits  # noqa: E402
from vaeflow.run.logger import read_metrics  # noqa: E402
from vaeflow.run.train import train  # noqa: E402

#: Name -> config overrides of each speed setting.
VARIANTS: dict[str, list[str]] = {
    "eager": [],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
    "compiled_step": ["train.compile_step=true"],
    "compiled_step+channels_last": ["train.compile_step=true", "train.channels_last=true"],
}

LOOP_MODELS = {"sylvester": ("experiments/vandenberg2018_sylvester/config.toml", []), **MODELS}
LOOP_SMALL = {"sylvester": SMALL["sylvester_iaf"], **SMALL}


def random_splits(cfg, n_train: int) -> DataSplits:  # noqa: ANN001
    """Random images of the config's dataset: binary 0/255 for binary data, else 8-bit."""
    shape = tuple(cfg.model.x_shape)
    g = torch.Generator().manual_seed(0)
    binary = DATA_BINARIZATIONS[cfg.data.dataset] is not None
    if binary:
        x = (torch.rand(n_train, *shape, generator=g) < 0.13).to(torch.uint8) * 255
    else:
        x = torch.randint(0, 256, (n_train, *shape), generator=g, dtype=torch.uint8)
    empty = x[:0]
    kind = "binary" if binary else "8bit"
    return DataSplits(x, empty, x[:100], shape, kind, cfg.data.dataset, ["random images"])


def run_once(cfg, root: Path, settle: int) -> tuple[float, float]:  # noqa: ANN001
    """Train ``cfg`` in ``root``; return (steady steps/s, whole call seconds)."""
    splits = random_splits(cfg, max(20 * cfg.data.batch_size, 1000))
    t0 = time.perf_counter()
    train(cfg, root, splits=splits)
    wall = time.perf_counter() - t0
    logged = [(r["step"], r["time"]) for r in read_metrics(root) if "train/loss_nats" in r]
    window = [(s, t) for s, t in logged if s >= settle]
    (s0, t0_), (s1, t1) = window[0], window[-1]
    return (s1 - s0) / (t1 - t0_), wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sylvester", choices=list(LOOP_MODELS))
    p.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "compiled_step+channels_last"],
        choices=list(VARIANTS),
        help="speed settings, the first is the ratios' reference",
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--settle", type=int, default=50, help="first logged step of the steady window")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--small", action="store_true", help="tiny networks (smoke run)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path, overrides = LOOP_MODELS[args.model]
    loop = [
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.ckpt_every={args.steps}",
        f"train.val_every={args.steps}",
        "train.image_every=0",
        "train.early_stopping=none",
        "train.val_size=none",
        "data.val_size=0",
        f"train.device={args.device}",
    ]
    small = LOOP_SMALL[args.model] if args.small else []
    print(machine_header(torch.device(args.device), torch.get_num_threads()))
    print(
        f"model {args.model} ({path}), {args.steps} steps, steady window: logged steps "
        f"{args.settle}..{args.steps}, {args.repeats} repeat(s), variants in turns\n"
    )
    rates: dict[str, list[float]] = {v: [] for v in args.variants}
    walls: dict[str, list[float]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for v in args.variants:
                cfg = load_config(ROOT / path, [*overrides, *small, *loop, *VARIANTS[v]])
                rate, wall = run_once(cfg, Path(tmp) / f"{v}_{r}", args.settle)
                rates[v].append(rate)
                walls[v].append(wall)
                print(f"repeat {r} {v}: {rate:.3f} steps/s, {wall:.1f} s", flush=True)
    ref = statistics.median(rates[args.variants[0]])
    batch = load_config(ROOT / path, [*overrides, *small]).data.batch_size
    rows = []
    for v in args.variants:
        median = statistics.median(rates[v])
        rows.append(
            [
                v,
                " ".join(VARIANTS[v]) or "(config as is)",
                f"{median:.3f} ({', '.join(f'{x:.3f}' for x in rates[v])})",
                f"{median * batch:.0f}",
                f"{median / ref:.2f}x",
                ", ".join(f"{w:.0f}" for w in walls[v]),
            ]
        )
    headers = [
        "variant",
        "overrides",
        "steps/s, median (each run)",
        "images/s",
        f"vs {args.variants[0]}",
        "whole call s (each run)",
    ]
    print("\n" + markdown_table(headers, rows))


if __name__ == "__main__":
    main()
