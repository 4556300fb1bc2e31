"""Fit flow densities to 2-D toy data by maximum likelihood; write plots and a table.

Usage (the exact command behind ``results/toy2d/``)::

    python experiments/toy2d/run.py --config experiments/toy2d/config.toml --out results/toy2d \
        --threads 1

Every (flow, dataset) pair in the config is trained from the same seed on CPU (or
``--device cuda``), then scored on an independent test set drawn with another seed:
test log-likelihood in nats per point (mean and standard error). Outputs: ``results.json``
(every number plus config, command, commit and versions), ``results.md`` (the table),
``density.png`` (model densities on a grid next to the data) and ``samples.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from vaeflow.atomic import write_json_atomic, write_text_atomic
from vaeflow.flows import FlowDensity
from vaeflow.flows.registry import FLOWS, build_flow
from vaeflow.tools.toy2d import TOY_DATASETS, sample_toy, true_log_prob

TRAIN_KEYS = {
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "clip_norm",
    "seed",
    "n_test",
    "log_every",
}
FLOW_KEYS = {"name", "label", "num_layers", "hidden", "options", "train"}
TOP_KEYS = {"datasets", "train", "flows", "plot"}
PLOT_KEYS = {"lim", "grid", "n_samples"}


def load_config(path: Path) -> dict[str, Any]:
    """Read and validate the TOML config; unknown keys and names are errors naming them."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    _only(cfg, TOP_KEYS, "top level")
    _only(cfg["train"], TRAIN_KEYS, "[train]")
    _only(cfg.get("plot", {}), PLOT_KEYS, "[plot]")
    for ds in cfg["datasets"]:
        if ds not in TOY_DATASETS:
            raise ValueError(f"{path}: unknown dataset {ds!r}; choose from {sorted(TOY_DATASETS)}")
    for i, fl in enumerate(cfg["flows"]):
        _only(fl, FLOW_KEYS, f"[[flows]] #{i}")
        if fl["name"] not in FLOWS:
            raise ValueError(f"{path}: unknown flow {fl['name']!r}; choose from {sorted(FLOWS)}")
        if not FLOWS[fl["name"]].density:
            raise ValueError(f"{path}: flow {fl['name']!r} has no density direction to fit")
        _only(fl.get("train", {}), TRAIN_KEYS, f"[flows.train] of {fl['name']}")
    return cfg


def _only(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fit(
    flow_cfg: dict[str, Any], dataset: str, train: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Train one flow on one dataset; return its test log-likelihood and the model."""
    torch.manual_seed(train["seed"])
    flow = build_flow(
        flow_cfg["name"],
        2,
        flow_cfg["num_layers"],
        flow_cfg["hidden"],
        **flow_cfg.get("options", {}),
    )
    model = FlowDensity(flow).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train["steps"])
    data_train = sample_toy(dataset, train["steps"] * train["batch_size"], seed=train["seed"])
    data_train = data_train.to(device)
    t0 = time.perf_counter()
    model.train()
    last = float("nan")
    for step in range(train["steps"]):
        batch = data_train[step * train["batch_size"] : (step + 1) * train["batch_size"]]
        loss = -model.log_prob(batch).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{flow_cfg['name']} on {dataset}: non-finite loss at step {step}; "
                "lower the learning rate or the scale bound"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train["clip_norm"])
        opt.step()
        sched.step()
        last = loss.item()
        if train["log_every"] and (step + 1) % train["log_every"] == 0:
            print(
                f"  {flow_cfg['label']:>10s} {dataset:>15s} step {step + 1:5d} nll {last:.3f}",
                flush=True,
            )
    train_s = time.perf_counter() - t0
    model.eval()
    test = sample_toy(dataset, train["n_test"], seed=10_000 + train["seed"]).to(device)
    with torch.no_grad():
        lp = torch.cat([model.log_prob(chunk) for chunk in test.split(2048)]).double().cpu()
    ref = true_log_prob(dataset, test.double().cpu())
    return {
        "flow": flow_cfg["label"],
        "name": flow_cfg["name"],
        "dataset": dataset,
        "test_ll_nats": lp.mean().item(),
        "test_ll_stderr": (lp.std() / math.sqrt(lp.numel())).item(),
        "true_ll_nats": None if ref is None else ref.mean().item(),
        "final_train_nll_nats": last,
        "train_seconds": train_s,
        "params": sum(p.numel() for p in model.parameters()),
        "model": model,
    }


def plot(
    results: list[dict[str, Any]],
    datasets: list[str],
    labels: list[str],
    plot_cfg: dict[str, Any],
    out: Path,
    device: torch.device,
) -> None:
    """Density heat maps and sample scatter plots, one row per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim, n = plot_cfg.get("lim", 4.0), plot_cfg.get("grid", 200)
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).to(device)
    by_key = {(r["dataset"], r["flow"]): r for r in results}
    for kind in ("density", "samples"):
        fig, axes = plt.subplots(
            len(datasets),
            len(labels) + 1,
            figsize=(2.2 * (len(labels) + 1), 2.2 * len(datasets)),
            squeeze=False,
        )
        for i, ds in enumerate(datasets):
            data = sample_toy(ds, 20_000, seed=123)
            ax = axes[i, 0]
            ax.hist2d(
                data[:, 0].numpy(),
                data[:, 1].numpy(),
                bins=n // 2,
                range=[[-lim, lim], [-lim, lim]],
                cmap="viridis",
            )
            ax.set_title("data" if i == 0 else "")
            ax.set_ylabel(ds)
            for j, label in enumerate(labels):
                ax = axes[i, j + 1]
                r = by_key.get((ds, label))
                if r is not None:
                    model = r["model"]
                    with torch.no_grad():
                        if kind == "density":
                            lp = torch.cat([model.log_prob(c) for c in pts.split(4096)])
                            ax.imshow(
                                lp.exp().reshape(n, n).cpu().numpy(),
                                origin="lower",
                                extent=[-lim, lim, -lim, lim],
                                cmap="viridis",
                            )
                        else:
                            s = model.sample(plot_cfg.get("n_samples", 5000)).cpu()
                            ax.hist2d(
                                s[:, 0].numpy(),
                                s[:, 1].numpy(),
                                bins=n // 2,
                                range=[[-lim, lim], [-lim, lim]],
                                cmap="viridis",
                            )
                if i == 0:
                    ax.set_title(label)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=80)
        plt.close(fig)


def write_tables(
    results: list[dict[str, Any]],
    datasets: list[str],
    labels: list[str],
    meta: dict[str, Any],
    out: Path,
) -> None:
    rows = [{k: v for k, v in r.items() if k != "model"} for r in results]
    write_json_atomic(out / "results.json", {"meta": meta, "results": rows})
    by_key = {(r["dataset"], r["flow"]): r for r in rows}
    lines = [
        "# Toy 2-D density estimation: test log-likelihood (nats per point, higher is better)",
        "",
        f"Reduced-budget CPU runs. Command: `{meta['command']}`  ",
        f"Commit: `{meta['commit']}`; torch {meta['torch']}; device {meta['device']}; "
        f"{meta['train']['steps']} steps x batch {meta['train']['batch_size']} (unless a flow "
        f"overrides it, see results.json); test set: {meta['train']['n_test']} fresh points "
        "per dataset. Mean +- standard error.",
        "",
        "| flow | " + " | ".join(datasets) + " | params | train s (total) |",
        "|---|" + "---|" * (len(datasets) + 2),
    ]
    for label in labels:
        cells, params, secs = [], 0, 0.0
        for ds in datasets:
            r = by_key.get((ds, label))
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{r['test_ll_nats']:.3f} +- {r['test_ll_stderr']:.3f}")
            params, secs = r["params"], secs + r["train_seconds"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {params} | {secs:.0f} |")
    true_cells = []
    for ds in datasets:
        vals = [
            r["true_ll_nats"] for r in rows if r["dataset"] == ds and r["true_ll_nats"] is not None
        ]
        true_cells.append(f"{vals[0]:.3f}" if vals else "n/a")
    lines.append("| *true density* | " + " | ".join(true_cells) + " | | |")
    lines += [
        "",
        "`true density` is the exact log-likelihood of the same test points where it "
        "has a closed form (see `vaeflow.tools.toy2d.true_log_prob`).",
    ]
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("config.toml"))
    parser.add_argument("--out", type=Path, default=Path("results/toy2d"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--steps", type=int, default=None, help="override train.steps (smoke runs)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="flow labels to run")
    parser.add_argument("--datasets", nargs="*", default=None, help="datasets to run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    commit = git_commit()  # at start: later commits must not relabel this run's code
    device = torch.device(args.device)
    datasets = args.datasets or cfg["datasets"]
    flows = [f for f in cfg["flows"] if args.only is None or f["label"] in args.only]
    labels = [f["label"] for f in flows]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "train": cfg["train"] if args.steps is None else {**cfg["train"], "steps": args.steps},
        "config": cfg,
    }
    results = []
    for ds in datasets:
        for fl in flows:
            train = {**cfg["train"], **fl.get("train", {})}
            if args.steps is not None:
                train["steps"] = args.steps
            r = fit(fl, ds, train, device)
            print(
                f"{fl['label']:>10s} {ds:>15s} test ll {r['test_ll_nats']:.3f} "
                f"+- {r['test_ll_stderr']:.3f} ({r['train_seconds']:.0f}s)",
                flush=True,
            )
            results.append(r)
            # Tables after every fit: a run killed part-way keeps the numbers it has.
            write_tables(results, datasets, labels, meta, args.out)
    plot(results, datasets, labels, cfg.get("plot", {}), args.out, device)
    print(f"wrote {args.out}/results.md, results.json, density.png, samples.png")
    return results


if __name__ == "__main__":
    main()
