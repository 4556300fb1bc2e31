"""Speed, FLOP rate and memory of the k=5000 importance-sampled test NLL; print tables.

    python benchmarks/nll_eval.py --threads 1                  # IWAE-size MLP VAE, CPU
    python benchmarks/nll_eval.py --posterior iaf --prior realnvp --images 20
    python benchmarks/nll_eval.py --device cuda --images 200 --batch 20 100
    python benchmarks/nll_eval.py --modes eager compile        # also torch.compile'd chunks
    python benchmarks/nll_eval.py --small                      # smoke run

Table 1 (speed): for each (batch, chunk), seconds per image over ``--images`` binarised
MNIST-shaped inputs (``batch`` images at a time, ``chunk`` importance samples per pass),
the achieved matmul FLOP rate, and the rate of a *plain replay of the same matmuls* timed
in the same run -- the machine's practical limit for this work. FLOPs are counted by
intercepting every ``mm``/``addmm``/``bmm``/``baddbmm`` the evaluation dispatches (one
traced call per row; ``linear`` as dispatched under ``inference_mode`` is counted as its
matmul; ``mv``/``dot`` are not counted, and the models here use none), so the
count is exact for the model actually run. The replay multiplies preallocated random
tensors of exactly those shapes: no bias add, no allocation, operands reused (cache-warm
on a CPU for small shapes), so it is an optimistic upper bound. ``% of matmul`` =
achieved / replay. ``--modes compile`` adds rows for ``eval.compile`` (each chunk through
``torch.compile``; compilation happens in the untimed warm-up pass).

Table 2 (memory): peak memory for k = 1000, 5000, 50000 at chunk 1000 -- flat in k once
``k >= chunk``, because samples are processed ``chunk`` at a time with a running
log-sum-exp.

The model is untrained (timing does not depend on the weights). Never run as a test (a
smoke run is).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_header, markdown_table, peak_memory, time_fn  # noqa: E402

from vaeflow.config import ModelConfig, from_dict  # noqa: E402
from vaeflow.models.build import build_model  # noqa: E402

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


def make_model(
    posterior: str | None, prior: str | None, latent: int, hidden: int = 200
) -> torch.nn.Module:
    """The IWAE-size MLP VAE (784-200-200-latent), optionally with flows."""
    cfg = {
        "x_shape": [1, 28, 28],
        "latent_dim": latent,
        "encoder": {"name": "mlp", "options": {"hidden": [hidden, hidden]}},
        "decoder": {"name": "mlp", "options": {"hidden": [hidden, hidden]}},
        "posterior": {"flow": posterior, "num_layers": 4, "hidden": 200, "context_features": 64},
        "prior": {"name": "flow", "flow": prior} if prior else {"name": "standard_normal"},
    }
    return build_model(from_dict(ModelConfig, cfg))


class MatmulTrace(TorchDispatchMode):
    """Record ``(m, k, n, batch)`` of every matmul dispatched inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func is _aten.linear.default:
            # Under inference_mode (the evaluator's) linear reaches the dispatch mode
            # undecomposed: input (*, k) @ weight (n, k).T.
            a, w = args[0], args[1]
            self.shapes.append((a.numel() // a.shape[-1], a.shape[-1], w.shape[0], 1))
        elif func in _MATMULS:
            a, b = (
                (args[1], args[2])
                if func in (_aten.addmm.default, _aten.baddbmm.default)
                else args[:2]
            )
            if a.dim() == 2:
                self.shapes.append((a.shape[0], a.shape[1], b.shape[1], 1))
            else:
                self.shapes.append((a.shape[1], a.shape[2], b.shape[2], a.shape[0]))
        return out

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of the recorded matmuls."""
        return sum(2 * m * k * n * b for m, k, n, b in self.shapes)


def replay(shapes: list[tuple[int, int, int, int]], device: torch.device) -> Callable[[], None]:
    """A function doing exactly the recorded matmuls on preallocated random operands."""
    operands = {}
    for m, k, n, b in set(shapes):
        if b == 1:
            operands[(m, k, n, b)] = (
                torch.randn(m, k, device=device),
                torch.randn(k, n, device=device),
                torch.empty(m, n, device=device),
            )
        else:
            operands[(m, k, n, b)] = (
                torch.randn(b, m, k, device=device),
                torch.randn(b, k, n, device=device),
                torch.empty(b, m, n, device=device),
            )

    def run() -> None:
        for s in shapes:
            a, w, out = operands[s]
            torch.matmul(a, w, out=out)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 10])
    p.add_argument("--chunk", type=int, nargs="*", default=[500, 1000, 5000])
    p.add_argument("--repeats", type=int, default=3, help="timed passes over --images")
    p.add_argument("--posterior", default=None, help="posterior flow name (default: Gaussian)")
    p.add_argument("--prior", default=None, help="prior flow name (default: N(0, I))")
    p.add_argument("--latent", type=int, default=50)
    p.add_argument("--memory-ks", type=int, nargs="*", default=[1000, 5000, 50000])
    p.add_argument(
        "--modes",
        nargs="*",
        default=["eager"],
        choices=["eager", "compile"],
        help="eager and/or torch.compile'd chunks (eval.compile)",
    )
    p.add_argument("--small", action="store_true", help="tiny sizes (smoke run)")
    args = p.parse_args(argv)
    hidden = 200
    if args.small:
        args.images, args.k, args.batch, args.chunk = 2, 20, [1, 2], [10, 20]
        args.repeats, args.memory_ks, hidden = 1, [20, 40], 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = make_model(args.posterior, args.prior, args.latent, hidden).to(device).eval()
    x = torch.bernoulli(torch.full((args.images, 1, 28, 28), 0.13)).to(device)
    print(machine_header(device, torch.get_num_threads()))
    print(
        f"model: MLP VAE 784-{hidden}-{hidden}-{args.latent}, posterior "
        f"{args.posterior or 'gaussian'}, prior {args.prior or 'N(0,I)'}; k = {args.k}, "
        f"{args.images} images, median of {args.repeats} passes\n"
    )

    rows = []
    for batch in args.batch:
        for chunk in args.chunk:

            def evaluate(batch: int = batch, chunk: int = chunk, compile: bool = False) -> None:
                for i in range(0, args.images, batch):
                    model.log_likelihood(x[i : i + batch], k=args.k, chunk=chunk, compile=compile)

            # FLOPs and matmul shapes from an eager pass (a dispatch mode does not see
            # inside compiled graphs; the compiled evaluation does the same matmuls).
            trace = MatmulTrace()
            with trace:
                evaluate()
            t_mm = time_fn(
                replay(trace.shapes, device), repeats=args.repeats, warmup=1, device=device
            )
            limit = trace.flops / t_mm["median"] / 1e9
            for mode in args.modes:
                run = partial(evaluate, compile=mode == "compile")
                # Warm-up = one full pass: for "compile" that compiles every (B, n) shape.
                t = time_fn(run, repeats=args.repeats, warmup=1, device=device)
                achieved = trace.flops / t["median"] / 1e9
                mem = peak_memory(run, device)
                rows.append(
                    [
                        mode,
                        str(batch),
                        str(chunk),
                        f"{t['median'] / args.images:.5f}",
                        f"{t['min'] / args.images:.5f} / {t['max'] / args.images:.5f}",
                        f"{achieved:.1f}",
                        f"{limit:.1f}",
                        f"{100 * achieved / limit:.0f} %",
                        "n/a" if mem is None else f"{mem:.0f}",
                    ]
                )
                print(
                    f"  measured {mode}, batch {batch}, chunk {chunk}", file=sys.stderr, flush=True
                )
    print(f"### Speed (k = {args.k})\n")
    print(
        markdown_table(
            [
                "mode",
                "batch",
                "chunk",
                "s / image (median)",
                "min / max",
                "GFLOP/s achieved",
                "GFLOP/s same-matmul replay",
                "% of matmul",
                "peak MiB",
            ],
            rows,
        )
    )

    chunk = max(args.chunk) if args.small else 1000
    batch = min(args.batch)
    mem_rows = []
    for k in args.memory_ks:
        mem = peak_memory(lambda k=k: model.log_likelihood(x[:batch], k=k, chunk=chunk), device)
        mem_rows.append([str(k), str(chunk), str(batch), "n/a" if mem is None else f"{mem:.1f}"])
    print(f"\n### Memory vs k (chunk {chunk}, batch {batch})\n")
    print(markdown_table(["k", "chunk", "batch", "peak MiB"], mem_rows))


if __name__ == "__main__":
    main()
