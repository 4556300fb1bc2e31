"""One-shot CUDA check: device-agnostic flows, AMP/compile training, CUDA RNG resume, NLL speed.

    VAEFLOW_DATA=... python benchmarks/gpu_check.py --out OUT_DIR

Prints a report (and writes it to OUT_DIR/gpu_check.md). Not a test: CI has no GPU.
1. Every registered flow runs forward/inverse on CUDA tensors in float32 with outputs and
   log-dets on the GPU; round-trip error reported.
2. A short MNIST training run on CUDA: fp32, bf16 autocast, and (optionally) torch.compile;
   steps/s and final validation bounds per variant.
3. CUDA RNG state survives a checkpoint round trip.
4. k=5000 test NLL speed of the IWAE-size MLP VAE on the GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vaeflow.config import load_config
from vaeflow.flows.registry import FLOWS, build_flow
from vaeflow.run.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vaeflow.run.train import train

ROOT = Path(__file__).resolve().parents[1]


def check_flows(lines: list[str]) -> None:
    dev = torch.device("cuda")
    lines += [
        "## Flows on CUDA (float32, batch 64, D=8 / (2,8,8), 2 layers, context 4)",
        "",
        "| flow | forward | inverse | round trip |",
        "|---|---|---|---|",
    ]
    for name, spec in FLOWS.items():
        feats = 8 if spec.data == "vector" else (2, 8, 8)
        flow = build_flow(name, feats, num_layers=2, hidden=32, context_features=4).to(dev).eval()
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(64, *flow.event_shape, device=dev)
        u0 = torch.randn(64, *flow.out_event_shape, device=dev)
        ctx = torch.randn(64, 4, device=dev)
        cells, rt = [], "-"
        with torch.no_grad():
            for ok, fn, arg in ((spec.density, flow, x), (spec.sampling, flow.inverse, u0)):
                if not ok:
                    cells.append("-")
                    continue
                y, ld = fn(arg, ctx)
                assert y.is_cuda and ld.is_cuda and ld.shape == (64,), name
                cells.append("ok")
            if spec.density and spec.sampling:
                u, _ = flow(x, ctx)
                x2, _ = flow.inverse(u, ctx)
                rt = f"{(x2 - x).abs().max().item():.1e}"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {rt} |")
    lines.append("")


def check_training(lines: list[str], steps: int, compile_: bool) -> None:
    base = [
        "train.device=cuda",
        f"train.steps={steps}",
        f"train.val_every={steps}",
        f"train.ckpt_every={steps}",
        "train.log_every=100",
        "eval.k=1000",
    ]
    variants = [("fp32", []), ("bf16 autocast", ["train.amp=true"])]
    if compile_:
        variants.append(("bf16 + compile", ["train.amp=true", "train.compile=true"]))
    lines += [
        f"## Quickstart model on CUDA, {steps} steps",
        "",
        "| variant | steps/s | val ELBO nats | val IWAE-100 nats | skipped |",
        "|---|---|---|---|---|",
    ]
    for label, extra in variants:
        cfg = load_config(ROOT / "experiments/quickstart/mnist_iaf_flowprior.toml", base + extra)
        with tempfile.TemporaryDirectory() as d:
            s = train(cfg, Path(d) / "run")
        lines.append(
            f"| {label} | {s['steps_per_second']:.1f} | {s['val/elbo_nats']:.2f} | "
            f"{s['val/iwae_k100_nats']:.2f} | {s['skipped_steps']} |"
        )
    lines.append("")


def check_rng(lines: list[str]) -> None:
    torch.cuda.manual_seed_all(1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.pt"
        save_checkpoint(path, {"rng": rng_state()})
        a = torch.rand(3, device="cuda")
        set_rng_state(load_checkpoint(path, map_location="cuda")["rng"])
        b = torch.rand(3, device="cuda")
    lines += [f"## CUDA RNG checkpoint round trip: {'ok' if torch.equal(a, b) else 'FAILED'}", ""]


def check_nll(lines: list[str]) -> None:
    from nll_eval import make_model  # benchmarks/ is on sys.path when run as a script

    model = make_model(None, None, 50).cuda().eval()
    x = torch.bernoulli(torch.full((200, 1, 28, 28), 0.13, device="cuda"))
    lines += [
        "## k=5000 test NLL, IWAE-size MLP VAE (latent 50)",
        "",
        "| batch | chunk | s / image |",
        "|---|---|---|",
    ]
    for batch, chunk in ((20, 1000), (100, 1000), (100, 5000)):
        model.log_likelihood(x[:batch], k=chunk, chunk=chunk)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, 200, batch):
            model.log_likelihood(x[i : i + batch], k=5000, chunk=chunk)
        torch.cuda.synchronize()
        lines.append(f"| {batch} | {chunk} | {(time.perf_counter() - t0) / 200:.5f} |")
    lines.append("")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    lines = [f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    for fn in (check_flows, check_rng, check_nll):
        try:
            fn(lines)
        except Exception as e:  # report every section, even after a failure
            lines += [f"## {fn.__name__} FAILED: {type(e).__name__}: {e}", ""]
        print("\n".join(lines), flush=True)
    try:
        check_training(lines, args.steps, args.compile)
    except Exception as e:
        lines += [f"## check_training FAILED: {type(e).__name__}: {e}", ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
