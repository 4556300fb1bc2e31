"""One-shot CUDA check: device-agnostic flows, AMP/compile training, CUDA RNG resume, NLL
speed, the compiled step (CUDA graphs) against the eager step.

    VAEFLOW_DATA=... python benchmarks/gpu_check.py --out OUT_DIR

Prints a report (and writes it to OUT_DIR/gpu_check.md). Not a test: CI has no GPU.
1. Every registered flow runs forward/inverse on CUDA tensors in float32 with outputs and
   log-dets on the GPU; round-trip error reported.
2. A short MNIST training run on CUDA: fp32, bf16 autocast, and (optionally) torch.compile
   and train.compile_step; steps/s and final validation bounds per variant.
3. CUDA RNG state survives a checkpoint round trip.
4. k=5000 test NLL speed of the IWAE-size MLP VAE on the GPU.
5. train.compile_step on CUDA (``_CompiledStep``: one CUDA graph per step) against the eager
   step, from the same weights and seed, on the quickstart model with a changing learning
   rate and KL weight, EMA and two skipped updates: the largest parameter, EMA and loss
   differences after N steps (expected: float rounding, ~1e-5), whether inductor skipped
   the CUDA graph (and why), recompilations, and ms per step of both.
6. Precision of the bounds: a quickstart model trained briefly in float32, its per-image
   k = 100 bound and ELBO on 500 test images in strict float32, TF32 (``train.tf32``'s
   flags) and bf16 autocast (``train.amp``), same noise; the mean and mean absolute
   per-image differences from float32 against the stated tolerance
   (:data:`TOLERANCE_NATS`): whether each may be used where a bound is reported.
7. The stack (``vaeflow sweep --stack``) on CUDA: two runs stacked, eager and with
   ``train.compile_step``, against the same runs alone: parameter differences and time.
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
        variants.append(("fp32 + compile_step (CUDA graph)", ["train.compile_step=true"]))
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


#: What a precision may move a reported bound by, per test image: the mean absolute
#: difference from float32, and the mean difference (a bias), in nats.
TOLERANCE_NATS = {"mean_abs": 0.05, "mean": 0.02}


def check_precision(
    lines: list[str], steps: int = 500, device: str = "cuda", images: int = 500
) -> None:
    """Section 6: TF32 and bf16 against strict float32 on one trained model's bounds
    (``device="cpu"`` runs the same code where TF32 does nothing: the smoke test)."""
    from vaeflow.data import load_splits, prepare_eval
    from vaeflow.run.evaluate import load_run
    from vaeflow.run.utils import set_tf32

    base = [
        f"train.device={device}",
        f"train.steps={steps}",
        f"train.val_every={steps}",
        f"train.ckpt_every={steps}",
    ]
    cfg = load_config(ROOT / "experiments/quickstart/mnist_iaf_flowprior.toml", base)
    with tempfile.TemporaryDirectory() as d:
        train(cfg, Path(d) / "run")
        _, model, _ = load_run(Path(d) / "run", "last", True, device)
    model.eval()
    splits = load_splits(cfg.data.dataset, cfg.data.root, val_size=cfg.data.val_size)
    x = prepare_eval(
        splits.test[:images], splits.kind, cfg.data.binarization, cfg.data.seed, device
    )

    def scores(tf32: bool, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        set_tf32(tf32)
        torch.manual_seed(0)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
        with torch.no_grad(), autocast:
            out = [model.log_likelihood(xb, k=100, chunk=100) for xb in x.split(100)]
        set_tf32(False)
        return (
            torch.cat([o.log_px for o in out]).double(),
            torch.cat([o.elbo for o in out]).double(),
        )

    ref_px, ref_elbo = scores(False, False)
    lines += [
        f"## Precision of the bounds (quickstart model, {steps} steps, {images} test images, "
        f"k = 100): tolerance mean |diff| <= {TOLERANCE_NATS['mean_abs']}, "
        f"|mean diff| <= {TOLERANCE_NATS['mean']} nats",
        "",
        "| precision | bound: mean diff | bound: mean abs diff | ELBO: mean diff | "
        "ELBO: mean abs diff | within tolerance |",
        "|---|---|---|---|---|---|",
    ]
    for label, tf32, bf16 in (("TF32", True, False), ("bf16 autocast", False, True)):
        px, elbo = scores(tf32, bf16)
        diffs = [px - ref_px, elbo - ref_elbo]
        ok = all(
            d.abs().mean() <= TOLERANCE_NATS["mean_abs"]
            and d.mean().abs() <= TOLERANCE_NATS["mean"]
            for d in diffs
        )
        cells = [f"{d.mean().item():+.4f} | {d.abs().mean().item():.4f}" for d in diffs]
        lines.append(f"| {label} | {' | '.join(cells)} | {'yes' if ok else 'NO'} |")
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


def check_compiled_step(lines: list[str], steps: int = 60, device: str = "cuda") -> None:
    """The compiled step (CUDA graph) vs the eager step on CUDA: same start, same seed.
    (``device="cpu"`` runs the same comparison on the CPU, to try the script.)"""
    import copy
    import statistics

    from torch._dynamo.utils import counters

    from vaeflow.models.build import build_model
    from vaeflow.models.vae import _data_validation_off
    from vaeflow.run.train import (
        EMA,
        _beta,
        _CompiledStep,
        _lr_lambdas,
        _optimizer,
        _update_step,
    )

    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    overrides = [
        f"train.device={device}",
        f"train.steps={steps}",
        "train.lr_warmup_steps=10",
        'train.lr_schedule="cosine"',
        f"train.kl_warmup_steps={steps}",
        "train.ema_decay=0.99",
        "train.clip_norm=100.0",
        "train.skip_grad_norm=1e4",
        "train.compile_step=true",
    ]
    cfg = load_config(ROOT / "experiments/quickstart/mnist_iaf_flowprior.toml", overrides)
    t = cfg.train
    g = torch.Generator().manual_seed(3)
    x = torch.bernoulli(torch.full((cfg.data.batch_size, 1, 28, 28), 0.13), generator=g)
    nan, huge = x.clone(), x * 200
    nan[0, 0, 0, 0] = float("nan")
    batches = [(nan if i == 7 else huge if i == 13 else x).to(dev) for i in range(steps)]
    results = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = build_model(cfg.model).to(dev)
        opt = _optimizer(cfg, model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambdas(cfg, model))
        ema = EMA(model, t.ema_decay)
        torch._dynamo.reset()
        counters.clear()
        step = _CompiledStep(model, opt, sched, ema, t, dev) if mode == "compiled" else None
        torch.manual_seed(1)
        losses, times, skipped = [], [], []
        for i, xb in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            if step is not None:
                r = step(xb, _beta(cfg, i))
            else:
                with _data_validation_off(model.likelihood):
                    r = _update_step(model, model, opt, sched, ema, xb, t, beta=_beta(cfg, i))
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(r.loss.item())
            skipped.append(r.skipped)
        results[mode] = {
            "model": copy.deepcopy(model.state_dict()),
            "ema": copy.deepcopy(ema.state_dict()["shadow"]),
            "losses": losses,
            "skipped": [i for i, s in enumerate(skipped) if s],
            "ms": statistics.median(times[10:]) * 1e3,
            "first": times[0],
            "graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        }
    a, b = results["eager"], results["compiled"]

    def max_diff(x: dict, y: dict) -> float:
        return max((x[k].double() - y[k].double()).abs().max().item() for k in x)

    finite = [(p, q) for p, q in zip(a["losses"], b["losses"], strict=True) if p == p]
    loss_diff = max(abs(p - q) / max(1.0, abs(p)) for p, q in finite)
    lines += [
        f"## train.compile_step on {dev.type} vs the eager step ({steps} steps, quickstart "
        "model, batch of the config)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| max abs parameter difference | {max_diff(a['model'], b['model']):.2e} |",
        f"| max abs EMA difference | {max_diff(a['ema'], b['ema']):.2e} |",
        f"| max relative loss difference (finite steps) | {loss_diff:.2e} |",
        f"| skipped steps, eager / compiled (expected [7, 13]) | {a['skipped']} / "
        f"{b['skipped']} |",
        f"| graphs compiled (expected 1) | {b['graphs']} |",
        f"| CUDA graph skipped by inductor (expected 0) | {b['cudagraph_skips']} |",
        f"| eager ms/step (median after 10) | {a['ms']:.2f} |",
        f"| compiled step ms/step (median after 10) | {b['ms']:.2f} |",
        f"| compiled step first call s (compilation) | {b['first']:.1f} |",
        "",
    ]


def check_stack(
    lines: list[str],
    steps: int = 200,
    device: str = "cuda",
    variants: tuple[str, ...] = ("eager", "compiled"),
    small: bool = False,
) -> None:
    """Section 7: two Burda-size runs trained in a stack (``vaeflow.run.stack``) against
    the same runs trained alone on ``device``, eager and with ``train.compile_step``
    (the stack's compiled forward/backward and batched update): the largest parameter
    difference of each run's ``last.pt`` from its solo run's (expected: float32 rounding
    grown over the steps, ~1e-5), and seconds per step. Random binary images (no dataset
    needed); ``device="cpu"``, ``variants=("eager",)``, ``small=True``: the smoke test."""
    from vaeflow.data import DataSplits
    from vaeflow.run.stack import train_stack

    g = torch.Generator().manual_seed(0)
    images = ((torch.rand(2000, 1, 28, 28, generator=g) > 0.5) * 255).to(torch.uint8)
    splits = DataSplits(images, images[:200], images[:200], (1, 28, 28), "binary", "random")
    base = [
        f"train.device={device}",
        f"train.steps={steps}",
        f"train.val_every={steps}",
        f"train.ckpt_every={steps}",
        f"train.log_every={steps}",
        "train.image_every=0",
        "data.val_size=200",
    ]
    if small:
        base += ["model.encoder.options={hidden=[32]}", "model.decoder.options={hidden=[32]}"]
    per_run = (["train.seed=0"], ["train.seed=1", "train.lr=3e-4"])
    path = ROOT / "experiments/burda2016_iwae/config.toml"
    lines += [
        f"## the stack on {device} vs the same runs alone ({steps} steps, Burda 1-layer "
        "VAE, 2 runs)",
        "",
        "| stack | max abs parameter difference from solo | stacked s/step (2 runs) "
        "| solo s/step (one run) |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as d:
        for variant in variants:
            flag = [f"train.compile_step={str(variant == 'compiled').lower()}"]
            cfgs = [load_config(path, [*base, *flag, *extra]) for extra in per_run]
            t0 = time.perf_counter()
            solo = [
                train(c, Path(d) / f"{variant}_solo{i}", splits=splits) for i, c in enumerate(cfgs)
            ]
            solo_s = (time.perf_counter() - t0) / (2 * steps)
            t0 = time.perf_counter()
            train_stack(cfgs, [Path(d) / f"{variant}_st{i}" for i in range(2)], splits=splits)
            stack_s = (time.perf_counter() - t0) / steps
            diff = 0.0
            for i in range(2):
                a = load_checkpoint(Path(d) / f"{variant}_solo{i}" / "checkpoints" / "last.pt")
                b = load_checkpoint(Path(d) / f"{variant}_st{i}" / "checkpoints" / "last.pt")
                diff = max(
                    diff,
                    *((a["model"][k].double() - b["model"][k].double()).abs().max().item()
                      for k in a["model"]),
                )  # fmt: skip
            assert all(s["status"] == "completed" for s in solo)
            lines.append(
                f"| {variant} | {diff:.2e} | {stack_s:.4f} (incl. set-up, compilation) | "
                f"{solo_s:.4f} (incl. set-up, compilation) |"
            )
    lines.append("")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    lines = [f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    checks = (check_flows, check_rng, check_nll, check_compiled_step, check_precision, check_stack)
    for fn in checks:
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
