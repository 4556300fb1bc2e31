"""Command line: ``vaeflow train|eval|sample|sweep|report|carry|data`` (or ``python -m vaeflow``).

Thin by design: parse, build the config, call the library.

    vaeflow train experiments/quickstart/mnist_iaf.toml --set train.steps=500
    vaeflow train CONFIG --resume            # continue a killed run bit-exactly
    vaeflow train CONFIG --resume auto       # continue if there is a checkpoint, else start
    vaeflow eval runs/quickstart --k 5000    # test NLL, ELBO, bpd, active units
    vaeflow sample runs/quickstart --n 64
    vaeflow sweep SWEEP.toml --jobs 2        # a grid of runs, resumable; --dry-run lists it
    vaeflow sweep SWEEP.toml --stack 16      # seeds (lr, ...) of one shape: one batched run
    vaeflow sweep SWEEP.toml --executor submitit-slurm   # a Slurm job array (.[cluster] extra)
    vaeflow report runs/my_sweep -o results/my_sweep   # mean +- std tables and figures
    vaeflow data pack SRC_ROOT DST_ROOT      # CIFAR-10: torchvision layout -> npz layout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _resume_mode(args: argparse.Namespace) -> None:
    """Normalise ``--resume [auto]``: ``None``, ``"yes"`` or ``"auto"``.

    ``vaeflow train --resume CONFIG`` makes argparse take CONFIG as the value of
    ``--resume``; when no positional config was given, that value is the config.
    """
    from .config import ConfigError

    value = args.resume
    if value in (None, "yes", "auto"):
        pass
    elif args.config is None:
        args.config, args.resume = value, "yes"
    else:
        raise ConfigError(f"--resume takes no value other than 'auto' (got {value!r})")
    if args.config is None:
        raise ConfigError("a TOML config is required (see experiments/)")


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run.evaluate import evaluate_run
    from .run.train import train

    _resume_mode(args)

    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.data_root:
        overrides.append(f'data.root="{args.data_root}"')
    if args.name:
        overrides.append(f'run.name="{args.name}"')
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.root) / cfg.run.name
    print(f"run directory: {run_dir}", flush=True)
    resume = args.resume == "yes"
    if args.resume == "auto":
        # A requeued job runs the same command every time: continue when a checkpoint
        # exists, start when the job was killed before its first one.
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        print(
            "--resume auto: "
            + ("continuing from checkpoints/last.pt" if resume else "no checkpoint yet, starting"),
            flush=True,
        )
    summary = train(cfg, run_dir, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports and evaluates
    print(json.dumps(summary, indent=2), flush=True)
    if not args.no_eval:
        result = evaluate_run(run_dir, data_root=args.data_root, device=args.device or "auto")
        _print_summary(result)
    print(f"\nrun directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir.parent}")
    return 0


def _print_summary(summary: dict) -> None:
    print("\ntest results (summary.json):")
    for key, value in summary.items():
        if key.startswith("test/") and not isinstance(value, list):
            print(
                f"  {key:32s} {value:.4f}" if isinstance(value, float) else f"  {key:32s} {value}"
            )
    for note in summary.get("notes", []):
        print(f"  note: {note}")


def _eval(args: argparse.Namespace) -> int:
    from .run.evaluate import evaluate_run

    summary = evaluate_run(
        args.run_dir,
        k=args.k,
        chunk=args.chunk,
        n_test=args.n_test,
        checkpoint=args.checkpoint,
        use_ema=None if args.ema is None else args.ema == "on",
        device=args.device or "auto",
        data_root=args.data_root,
        compile=args.compile,
        reuse=not args.fresh,
    )
    _print_summary(summary)
    print(f"\nwrote {Path(args.run_dir) / 'summary.json'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .run.compare import paired_difference, paired_table

    if args.more:
        print(paired_table(args.run_a, [args.run_b, *args.more]))
        return 0
    d = paired_difference(args.run_a, args.run_b)
    print(f"A: {args.run_a}\nB: {args.run_b}")
    (n_a,), (n_b,) = d["scored_a"], d["scored_b"]
    if n_a != n_b or d["n"] != n_a:
        print(
            f"A scored {n_a} test images, B {n_b}: paired over the {d['n']} both scored "
            f"(their NLLs over those: A {d['nll_a_nats']:.3f}, B {d['nll_b_nats']:.3f} nats)"
        )
    print(f"NLL (k = {d['k_a']}): A {d['nll_a_own_nats']:.3f}, B {d['nll_b_own_nats']:.3f} nats")
    for name, key in (("NLL", "nll"), ("-ELBO", "neg_elbo")):
        se = d[f"{key}_diff_stderr_nats"]
        err = f" ± {se:.3f}" if se is not None else ""
        print(f"{name}(A) - {name}(B) = {d[f'{key}_diff_nats']:+.3f}{err} nats")
    print(
        f"(± the standard error of the per-image differences over the {d['n']} test images "
        "both scored: test-set sampling only, not seed-to-seed variation)"
    )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .run.evaluate import sample_run

    path = sample_run(
        args.run_dir,
        temperature=args.temperature,
        n=args.n,
        checkpoint=args.checkpoint,
        device=args.device or "auto",
        seed=args.seed,
    )
    print(f"wrote {path}")
    return 0


def _data_pack(args: argparse.Namespace) -> int:
    from .data import pack_cifar10

    for path in pack_cifar10(args.src, args.dst):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaeflow", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config")
    # nargs="?" so that `--resume CONFIG` (the flag before the path) still parses: argparse
    # hands the path to --resume, and _resume_mode gives it back (see there).
    t.add_argument("config", nargs="?", help="TOML config (see experiments/)")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        metavar="auto",
        help="continue from checkpoints/last.pt; '--resume auto' continues when it exists "
        "and starts the run otherwise (for jobs a cluster may requeue)",
    )
    t.add_argument("--run-dir", help="run directory (default: run.root/run.name)")
    t.add_argument("--name", help="run name (sets run.name)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="sets train.device")
    t.add_argument("--data-root", help="data root (default: $VAEFLOW_DATA, then ./data)")
    t.add_argument("--no-eval", action="store_true", help="skip the test evaluation at the end")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="test NLL / ELBO / bpd / active units of a run")
    e.add_argument("run_dir")
    e.add_argument("--k", type=int, help="importance samples (default: eval.k, 5000)")
    e.add_argument("--chunk", type=int, help="samples per pass (default: eval.chunk)")
    e.add_argument(
        "--n-test",
        type=int,
        help="a fixed random subset of N test examples (the same for every run)",
    )
    e.add_argument(
        "--checkpoint",
        choices=["best", "last", "auto"],
        help="best.pt (best validation bound) or last.pt (final model); default: the "
        "run's eval.checkpoint (auto: best, or last for a run with data.val_size = 0)",
    )
    e.add_argument("--ema", choices=["on", "off"], help="use EMA weights (default: eval.use_ema)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"])
    e.add_argument("--data-root")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    e.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile each chunk of importance samples (default: eval.compile)",
    )
    e.add_argument(
        "--fresh",
        action="store_true",
        help="score every test image again; by default an evaluation of more images than "
        "test_scores.pt holds (same checkpoint, k) scores only the images not in it",
    )
    e.set_defaults(func=_eval)

    c = sub.add_parser(
        "compare",
        help="paired NLL / -ELBO difference of two evaluated runs, image by image; with "
        "more runs, a markdown table of each against the first",
    )
    c.add_argument("run_a", help="the reference when more than two runs are given")
    c.add_argument("run_b")
    c.add_argument("more", nargs="*", help="further runs, each compared with run_a")
    c.set_defaults(func=_compare)

    s = sub.add_parser("sample", help="write a grid of prior samples")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument(
        "--checkpoint",
        choices=["best", "last", "auto"],
        help="default: the run's eval.checkpoint (as for eval)",
    )
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temperature", type=float, default=1.0, help="prior noise scale (e.g. 0.7)")
    s.set_defaults(func=_sample)

    from .tools.carry import add_carry_parser
    from .tools.report import add_report_parser
    from .tools.sweep import add_sweep_parser, add_train_stack_parser

    add_sweep_parser(sub)
    add_train_stack_parser(sub)
    add_report_parser(sub)
    add_carry_parser(sub)

    d = sub.add_parser("data", help="dataset utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    pk = dsub.add_parser("pack", help="CIFAR-10: torchvision's cifar-10-batches-py -> npz layout")
    pk.add_argument("src", help="root containing cifar-10-batches-py/")
    pk.add_argument("dst", help="root to write CIFAR10/cifar10_{train,test}.npz into")
    pk.set_defaults(func=_data_pack)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. Known user errors print one clear line."""
    from .config import ConfigError
    from .data import DatasetNotFoundError
    from .run.checkpoint import CheckpointError
    from .run.compare import ComparisonError
    from .run.train import TrainingDiverged

    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        # On small shared machines, intra-op threads fighting another process for the
        # same cores can be 100x slower than one thread (measured here); let users pin it.
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (
        ConfigError,
        CheckpointError,
        DatasetNotFoundError,
        TrainingDiverged,
        FileExistsError,
        FileNotFoundError,
        ComparisonError,
    ) as e:
        print(f"vaeflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
