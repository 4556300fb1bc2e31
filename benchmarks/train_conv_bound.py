"""How fast can a conv model's training step get on this machine? The step against a replay
of its own convolutions (forward and both backward products) and the machine's matmul
rate, all measured in one run; print markdown tables.

    python benchmarks/train_conv_bound.py --threads 1                 # Sylvester gated-conv VAE
    python benchmarks/train_conv_bound.py --model sylvester_iaf --channels-last
    python benchmarks/train_conv_bound.py --small --repeats 1 --warmup 0   # smoke run

Issue 14's CPU target asks the Sylvester gated-conv VAE's training loop to run 1.5x faster
than the eager NCHW loop. Compiling the whole step (``train.compile_step``) and NHWC gave
1.07x (benchmarks/README.md); this script says what bounds the rest:

1. **step**: one training step of ``train_step.py``'s model (the loop's own update:
   forward, backward, clipping, optimiser), eager.
2. **convolutions alone**: every convolution the step's forward dispatched (recorded with
   ``nll_eval.MatmulTrace``: shapes, strides, padding, transposition, memory format),
   replayed on random operands with the backward products the step computes: the
   gradient with respect to the weight always, with respect to the input for all but the
   first layer (the data needs none). FLOPs: 2 x multiply-adds per product (``Conv.flops``).
3. **matmul rate**: a square float32 matmul of ``--matmul-size`` (the machine's practical
   peak for dense float32 work on these threads).

The table gives the convolutions' share of the step, their rate, that rate against the
matmul rate, and the speed-up the step could reach if everything but the convolutions
took no time at all (step / convolutions): the ceiling for any change outside the
convolution kernels (compilation, fusion, layouts of the rest, host overhead). Each cell
is the median of ``--repeats`` timings, the three measurements taken in turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_header, markdown_table, time_fn  # noqa: E402
from nll_eval import Conv, MatmulTrace  # noqa: E402
from train_step import MODELS, SMALL, make_step  # noqa: E402

from vaeflow.config import Config, load_config  # noqa: E402
from vaeflow.models.build import build_model  # noqa: E402

_aten = torch.ops.aten


def record_convolutions(cfg: Config, channels_last: bool) -> list[Conv]:
    """The convolutions one training forward of ``cfg``'s model dispatches, in order."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    x = (torch.rand(cfg.data.batch_size, *cfg.model.x_shape) > 0.5).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with MatmulTrace() as trace:
        model(x, k=cfg.train.k)
    return trace.convs


def conv_replay(convs: list[Conv]) -> tuple[Callable[[], None], int]:
    """A function doing each recorded convolution's forward and the backward products a
    training step computes, on random operands; and those products' FLOPs."""
    cases, flops = [], 0
    for i, c in enumerate(convs):
        fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        x = torch.randn(c.input_shape, dtype=c.dtype).contiguous(memory_format=fmt)
        w = torch.randn(c.weight_shape, dtype=c.dtype).contiguous(memory_format=fmt)
        x.requires_grad_(i > 0)  # the first layer's input is the data
        w.requires_grad_(True)
        out = _aten.convolution(
            x, w, None, c.stride, c.padding, c.dilation, c.transposed, c.output_padding, c.groups
        )
        grad = torch.randn_like(out)
        cases.append((x, w, grad, c))
        flops += c.flops * (3 if i > 0 else 2)

    def run() -> None:
        for x, w, grad, c in cases:
            y = _aten.convolution(
                x, w, None, c.stride, c.padding, c.dilation, c.transposed, c.output_padding,
                c.groups,
            )  # fmt: skip
            torch.autograd.grad(y, [t for t in (x, w) if t.requires_grad], grad)

    return run, flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="sylvester_iaf")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="NHWC model and batches")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--small", action="store_true", help="tiny network (smoke run)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path, overrides = MODELS[args.model]
    cfg = load_config(
        ROOT / path, [*overrides, "train.device=cpu", *(SMALL[args.model] if args.small else [])]
    )
    device = torch.device("cpu")
    step, batch, params = make_step(cfg, device, False, False, args.channels_last)
    convs = record_convolutions(cfg, args.channels_last)
    if not convs:
        raise SystemExit(f"{args.model} dispatches no convolution: nothing to bound")
    replay, conv_flops = conv_replay(convs)
    n = 64 if args.small else args.matmul_size
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)

    def matmul() -> None:
        torch.mm(a, b, out=out)

    times: dict[str, list[float]] = {"step": [], "convs": [], "matmul": []}
    for _ in range(args.repeats):  # in turns: load from other processes hits all three
        for name, fn in (("step", step), ("convs", replay), ("matmul", matmul)):
            times[name].append(time_fn(fn, repeats=1, warmup=args.warmup)["median"])
    med = {k: statistics.median(v) for k, v in times.items()}
    conv_rate = conv_flops / med["convs"] / 1e9
    mm_rate = 2 * n**3 / med["matmul"] / 1e9

    print(machine_header(device, args.threads))
    layout = "NHWC" if args.channels_last else "NCHW"
    print(
        f"\n{args.model} ({params / 1e6:.2f}M parameters, batch {batch}, {layout}, "
        f"{len(convs)} convolutions per forward), median of {args.repeats}\n"
    )
    print(
        markdown_table(
            ["measure", "ms", "GFLOP", "GFLOP/s", "note"],
            [
                ["training step (eager)", f"{med['step'] * 1e3:.1f}", "", "", ""],
                [
                    "its convolutions alone (fwd + bwd)",
                    f"{med['convs'] * 1e3:.1f}",
                    f"{conv_flops / 1e9:.2f}",
                    f"{conv_rate:.1f}",
                    f"{med['convs'] / med['step']:.0%} of the step",
                ],
                [
                    f"float32 matmul {n}x{n}x{n}",
                    f"{med['matmul'] * 1e3:.1f}",
                    f"{2 * n**3 / 1e9:.2f}",
                    f"{mm_rate:.1f}",
                    f"convolutions at {conv_rate / mm_rate:.0%} of this rate",
                ],
            ],
        )
    )
    print(
        f"\nCeiling for any speed-up outside the convolution kernels (step / convolutions): "
        f"{med['step'] / med['convs']:.2f}x"
    )


if __name__ == "__main__":
    main()
