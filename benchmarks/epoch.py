"""What a full reproduction costs: seconds per training epoch of each paper's model on its
own protocol, and the projected wall time of the paper's budget; print a markdown table.

    python benchmarks/epoch.py --threads 2                 # CPU, every experiment row
    python benchmarks/epoch.py --device cuda               # on a GPU
    python benchmarks/epoch.py --device cuda --compile-step --rows burda2016_iwae/vae_k1
                                   # the whole update as one compiled graph
                                   # (train.compile_step; CUDA graphs on a GPU)
    python benchmarks/epoch.py --rows burda2016_iwae/iwae_k50 flow_priors/gauss+vamp
    python benchmarks/epoch.py --small --repeats 2         # smoke run (tiny networks)
    python benchmarks/epoch.py --rows kingma2016_iaf_cifar10/diagonal --batch 4
                                   # a model too slow at its own batch: timed at batch 4,
                                   # scaled to the config's batch (marked in the table)

Rows are the paper rows themselves: each experiment's ``sweep.toml`` expanded by
:func:`vaeflow.tools.sweep.expand` (one seed), so the network, batch size, k, objective and
optimiser are the experiment's full-budget config. A step is the training loop's own
update (``benchmarks/train_step.py``'s :func:`make_step`, which calls
``vaeflow.run.train._update_step``) on random data of the right shape; the epoch is
``training examples / batch size`` such steps; the projected budget is ``train.steps`` of
the config (the paper's budget, or its cap where the paper stops early: then it is an
upper bound) times the median step time. Validation, checkpoints and the final k = 5000
evaluation are not included (``benchmarks/nll_eval.py`` measures the evaluation).

Absolute CPU numbers move up to 1.8x between these machines and with other load; read
them as orders of magnitude, and compare rows measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_header, markdown_table, time_fn  # noqa: E402
from train_step import make_step  # noqa: E402

from vaeflow.config import Config, load_config  # noqa: E402
from vaeflow.tools.sweep import expand  # noqa: E402

#: Experiments whose sweep rows are measured (file, and a row filter: None = every row).
EXPERIMENTS: dict[str, tuple[str, list[str] | None]] = {
    "burda2016_iwae": ("experiments/burda2016_iwae/sweep.toml", None),
    "burda2016_iwae_two_layer": ("experiments/burda2016_iwae/sweep_two_layer.toml", None),
    "rezende2015_planar": (
        "experiments/rezende2015_planar/sweep.toml",
        ["diag", "planar_k10", "planar_k80", "nice_k80"],
    ),
    "vandenberg2018_sylvester": ("experiments/vandenberg2018_sylvester/sweep.toml", None),
    "kingma2016_iaf_mnist": ("experiments/kingma2016_iaf/sweep_mnist.toml", None),
    "kingma2016_iaf_cifar10": ("experiments/kingma2016_iaf/sweep_cifar10.toml", None),
    "kingma2016_iaf_topdown_cifar10": (
        "experiments/kingma2016_iaf/sweep_topdown_cifar10.toml",
        None,
    ),
    "flow_priors": (
        "experiments/flow_priors/sweep.toml",
        ["gauss+standard", "gauss+vamp", "gauss+mog", "gauss+maf", "iaf+maf"],
    ),
}

#: Images in each dataset's training file (the validation split is taken from it).
TRAINING_FILE = {
    "mnist": 60000,
    "fashion_mnist": 60000,
    "binarized_mnist": 60000,
    "cifar10": 50000,
}
DEFAULT_VAL = {"mnist": 10000, "fashion_mnist": 10000, "binarized_mnist": 10000, "cifar10": 5000}

#: ``--small``: the same code paths on tiny networks (a smoke run, not a measurement).
SMALL = [
    "model.latent_dim=8",
    "model.posterior.hidden=8",
    "model.posterior.context_features=4",
    "model.prior.hidden=8",
    "model.prior.num_components=3",
    "data.batch_size=4",
    "train.k=2",
]
#: The same for the top-down model, whose sizes are its own keys (no latent_dim).
SMALL_TOPDOWN = [
    "model.topdown.channels=8",
    "model.topdown.latent_channels=2",
    "model.topdown.layers_per_resolution=[1]",
    "model.posterior.hidden=8",
    # = hidden: the authors' conv IAF (weight_norm = "iaf_code") adds the context as it is
    "model.posterior.context_features=8",
    "data.batch_size=4",
    "train.free_bits_group_size=1",
    "train.free_bits_batch_splits=1",
]


def small_overrides(base: Path, overrides: list[str]) -> list[str]:
    """:data:`SMALL` or, for a top-down model, :data:`SMALL_TOPDOWN`. A flow that reads the
    encoder features themselves (``context_projection = false``) keeps their width as its
    context width."""
    model = load_config(base, overrides).model
    small = SMALL_TOPDOWN if model.topdown is not None else SMALL
    if not model.posterior.context_projection:
        small = [o for o in small if not o.startswith("model.posterior.context_features=")]
    elif model.posterior.options.get("made") == "sylvester_code":
        # that MADE adds its (projected) context as it is: as wide as its hidden layers
        small = [
            "model.posterior.context_features=8" if o.startswith("model.posterior.context_") else o
            for o in small
        ]
    return small


def train_examples(cfg: Config) -> int:
    """Training-set size under the config's split (``data.val_size``)."""
    val = cfg.data.val_size if cfg.data.val_size is not None else DEFAULT_VAL[cfg.data.dataset]
    return TRAINING_FILE[cfg.data.dataset] - val


def rows_to_measure(selected: list[str] | None) -> list[tuple[str, Path, list[str]]]:
    """``(experiment/row, base config, overrides)`` for every measured paper row."""
    out = []
    for exp, (sweep, keep) in EXPERIMENTS.items():
        for point in expand(ROOT / sweep, validate=False):
            row = point.name.split("__seed=")[0]
            if keep is not None and row not in keep:
                continue
            name = f"{exp}/{row}"
            if selected and name not in selected:
                continue
            if any(name == o[0] for o in out):  # one seed per row
                continue
            overrides = [o for o in point.overrides if not o.startswith(("run.", "train.seed"))]
            out.append((name, point.base, overrides))
    return out


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} d"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rows", nargs="*", help="experiment/row names (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny networks (smoke run)")
    p.add_argument(
        "--compile-step",
        action="store_true",
        help="time the compiled update (train.compile_step; on a GPU "
        "one CUDA graph per step) instead of the eager one; rows whose config cannot "
        "compile it say why",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        help="time each step at this batch size and scale the time per image to the "
        "config's batch (for models whose own batch takes minutes per step on a CPU; "
        "linear scaling, so an estimate: marked 'scaled' in the table)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_header(device, torch.get_num_threads()))
    mode = "compiled update (train.compile_step)" if args.compile_step else "eager update"
    print(f"{mode}; median of {args.repeats} steps after {args.warmup} warm-up steps\n")
    table = []
    for name, base, overrides in rows_to_measure(args.rows):
        small = small_overrides(base, overrides) if args.small else []
        cfg = load_config(base, overrides + small)
        n = train_examples(cfg)
        batch = cfg.data.batch_size
        steps_per_epoch = n / batch
        step_flags = ["train.compile_step=true"] if args.compile_step else []
        if step_flags:
            cfg = load_config(base, overrides + small + step_flags)
        timed = cfg
        try:
            if args.batch and args.batch != batch:
                # Free-bits sub-batches must divide the batch; one sub-batch costs the same.
                timed = load_config(
                    base,
                    overrides
                    + small
                    + step_flags
                    + [f"data.batch_size={args.batch}", "train.free_bits_batch_splits=1"],
                )
            step, _, params = make_step(
                timed, device, compile_=False, amp=False, compile_step=args.compile_step
            )
            seconds = time_fn(step, repeats=args.repeats, warmup=args.warmup, device=device)
        except Exception as e:  # one failing row must not hide the rest
            table.append([name, "", "", "", f"failed: {type(e).__name__}: {e}"[:100], "", ""])
            continue
        s_step = seconds["median"] * batch / timed.data.batch_size
        scaled = f" (timed at {timed.data.batch_size}, scaled)" if timed is not cfg else ""
        table.append(
            [
                name,
                f"{batch}{scaled}",
                f"{cfg.train.k}",
                f"{params / 1e6:.2f}M",
                f"{s_step * 1e3:.1f}",
                f"{s_step * steps_per_epoch:.1f}",
                f"{cfg.train.steps / steps_per_epoch:.0f} ep: {_hours(s_step * cfg.train.steps)}",
            ]
        )
    headers = [
        "experiment/row",
        "batch",
        "k",
        "params",
        "ms/step",
        "s/epoch",
        "config budget: projected",
    ]
    print(markdown_table(headers, table))


if __name__ == "__main__":
    main()
