"""Does *learning* a flow prior slow the start of training? A controlled probe.

    python experiments/flow_priors/prior_probe.py --threads 1     # ~3 minutes on one core

Trains the flow_priors MLP VAE (diagonal-Gaussian posterior) for 600 steps of batch 100 on
dynamically binarised MNIST, four ways from the same seed and batches: N(0, I) prior;
RealNVP prior learned at the model's learning rate (1e-3); the same RealNVP prior frozen
(it starts as the identity, so it *is* N(0, I) with the flow code path); and the RealNVP
prior learned at 1e-4. Prints the ELBO and KL (nats) on 500 validation images every 200
steps. No KL warm-up, gradient-norm clip 100, Adam. Used in results/flow_priors/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vaeflow.config import load_config
from vaeflow.data import TrainBatches, load_splits
from vaeflow.models.bounds import elbo
from vaeflow.models.build import build_model

CONFIG = Path(__file__).resolve().parent / "config.toml"


def run(splits, x_val, overrides: list[str], prior_lr: float | None, steps: int) -> list[tuple]:
    """Train ``steps`` steps; ``prior_lr=None`` freezes the prior. Returns (step, ELBO, KL)."""
    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    prior = list(model.prior.parameters())
    ids = {id(p) for p in prior}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if prior and prior_lr is not None:
        groups.append({"params": prior, "lr": prior_lr})
    opt = torch.optim.Adam(groups, lr=1e-3)
    batches = TrainBatches(splits.train, 100, seed=0, kind="binary")
    out = []
    for step in range(steps):
        loss = -elbo(model(batches.batch(step), k=1)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        if (step + 1) % 200 == 0:
            with torch.no_grad():
                t = model(x_val, k=1)
                kl = (t.log_qz - t.log_pz).mean().item()
                out.append((step + 1, round(elbo(t).mean().item(), 1), round(kl, 1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--data-root", default=None, help="default: $VAEFLOW_DATA")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_splits("mnist", args.data_root, 10000)
    gen = torch.Generator().manual_seed(0)
    x_val = torch.bernoulli(splits.val[:500].float() / 255, generator=gen)
    flow = ['model.prior.name="flow"', 'model.prior.flow="realnvp"']
    cases = [
        ("N(0, I) prior", ['model.prior.name="standard_normal"'], 1e-3),
        ("RealNVP prior, learned (lr 1e-3)", flow, 1e-3),
        ("RealNVP prior, frozen at init", flow, None),
        ("RealNVP prior, learned (lr 1e-4)", flow, 1e-4),
    ]
    print(
        "| prior | "
        + " | ".join(f"step {s} ELBO / KL" for s in range(200, args.steps + 1, 200))
        + " |"
    )
    print("|---|" + "---|" * (args.steps // 200))
    for label, overrides, lr in cases:
        cells = [f"{e} / {k}" for _, e, k in run(splits, x_val, overrides, lr, args.steps)]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
