"""Speed, FLOP rate and memory of the k=5000 importance-sampled test NLL; print tables.

    python benchmarks/nll_eval.py --threads 1                  # IWAE-size MLP VAE, CPU
    python benchmarks/nll_eval.py --posterior iaf --prior realnvp --images 20
    python benchmarks/nll_eval.py --device cuda --images 200 --batch 20 100
    python benchmarks/nll_eval.py --modes eager compile        # also torch.compile'd chunks
    python benchmarks/nll_eval.py --model sylvester --images 2 --batch 1 --chunk 500 \
        --modes eager channels_last compile bf16               # a convolutional model
    python benchmarks/nll_eval.py --small                      # smoke run

``--model``: ``mlp`` (the IWAE-size MLP VAE, ``--posterior`` / ``--prior`` flows) or one
of the experiments' full-budget models, built from their configs: ``sylvester`` (van den
Berg et al.'s gated-conv VAE with O-SNF, ``experiments/vandenberg2018_sylvester``),
``iaf_mnist`` (Kingma et al.'s MNIST ResNet VAE with IAF), ``cifar10`` (their CIFAR-10
ResNet VAE with IAF and a discretised logistic mixture), ``topdown_cifar10`` (their
CIFAR-10 ResNet VAE with bidirectional inference and a conv IAF in every group;
``experiments/kingma2016_iaf``) and ``burda_two_layer`` (Burda et al.'s two-stochastic-layer
MLP, ``experiments/burda2016_iwae/two_layer.toml``).

Table 1 (speed): for each (batch, chunk), seconds per image over ``--images`` inputs
(``batch`` images at a time, ``chunk`` importance samples per pass), the achieved FLOP rate
of the model's matmuls and convolutions, and the rate of a *plain replay of the same ops*
timed in the same run -- the machine's practical limit for this work. FLOPs are counted by
intercepting every ``mm``/``addmm``/``bmm``/``baddbmm``/``linear`` (2 m k n) and every
``convolution`` (2 x output elements x input channels per group x kernel area; for a
transposed convolution, the input's elements x output channels per group x kernel area)
the evaluation dispatches, so the count is exact for the model actually run (``mv``/``dot``
are not counted; the models here use none). The replay runs exactly those ops on
preallocated random operands of the same shapes, strides and memory format: no bias, no
activation, no allocation of inputs, operands reused (cache-warm on a CPU for small
shapes), so it is an optimistic upper bound. ``% of replay`` = achieved / replay;
``conv share`` is the convolutions' part of the FLOPs.

Modes: ``eager``; ``compile`` (``eval.compile``: each chunk through ``torch.compile``,
compiled in the untimed warm-up pass); ``channels_last`` (NHWC weights and inputs, as
``train.channels_last`` makes ``vaeflow eval`` do); ``bf16`` (CPU/CUDA autocast to
bfloat16 -- the bound then differs from float32's: the column ``|diff| vs fp32`` gives
the mean absolute difference of the per-image estimate, here of an *untrained* model;
measure it on a trained one before trusting it). The replay is in float32 (bf16: in
bfloat16, its own limit).

Table 2 (memory): peak memory for k = 1000, 5000, 50000 at chunk 1000 -- flat in k once
``k >= chunk``, because samples are processed ``chunk`` at a time with a running
log-sum-exp.

The model is untrained (timing does not depend on the weights). Never run as a test (a
smoke run is).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_header, markdown_table, peak_memory, time_fn  # noqa: E402

from vaeflow.config import ModelConfig, from_dict, load_config  # noqa: E402
from vaeflow.models.build import build_model  # noqa: E402

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
_CONVOLUTIONS = {_aten.convolution.default, _aten._convolution.default}
# Under inference_mode (the evaluator's) these reach a dispatch mode undecomposed.
_CONV2D = {_aten.conv2d.default: False, _aten.conv_transpose2d.input: True}

# The experiments' models, built from their configs (the full-budget networks):
# name -> (config file, --set overrides).
_EXP = ROOT / "experiments"
_NICE = (
    'model.posterior.flow="nice"',
    "model.posterior.hidden=400",
    'model.posterior.options={num_hidden=1,activation="tanh",scaling=false,'
    'permutation="alternate"}',
)
EXPERIMENT_MODELS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "sylvester": (_EXP / "vandenberg2018_sylvester" / "config.toml", ()),
    "iaf_mnist": (_EXP / "kingma2016_iaf" / "mnist.toml", ()),
    "cifar10": (_EXP / "kingma2016_iaf" / "cifar10.toml", ()),
    "burda_two_layer": (_EXP / "burda2016_iwae" / "two_layer.toml", ()),
    "topdown_cifar10": (_EXP / "kingma2016_iaf" / "topdown_cifar10.toml", ()),
    # Rezende & Mohamed's rows: tiny per-layer work on 1000 x 40 samples a chunk,
    # launch-bound eager (whether their evaluation is compiled is decided from these).
    "rezende_planar_k40": (
        _EXP / "rezende2015_planar" / "config.toml",
        ("model.posterior.num_layers=40",),
    ),
    "rezende_planar_k80": (
        _EXP / "rezende2015_planar" / "config.toml",
        ("model.posterior.num_layers=80",),
    ),
    "rezende_nice_k80": (
        _EXP / "rezende2015_planar" / "config.toml",
        ("model.posterior.num_layers=80", *_NICE),
    ),
}


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


def make_experiment_model(name: str) -> tuple[torch.nn.Module, tuple[int, ...], bool]:
    """An experiment's model from its config: ``(model, x_shape, binary)`` (``binary``:
    Bernoulli data, else 8-bit images on the [0, 1] grid)."""
    path, overrides = EXPERIMENT_MODELS[name]
    cfg = load_config(path, overrides)
    model = build_model(cfg.model)
    return model, tuple(cfg.model.x_shape), cfg.model.likelihood == "bernoulli"


def load_trained(
    run_dir: str, images: int, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A trained run's model (its ``eval.checkpoint``) and ``images`` of its test images
    (a fixed random subset, as ``vaeflow eval --n-test`` draws it)."""
    from vaeflow.data import load_splits, prepare_eval, test_subset
    from vaeflow.run.evaluate import load_run

    cfg, model, _ = load_run(run_dir, device=str(device))
    splits = load_splits(cfg.data.dataset, cfg.data.root, val_size=cfg.data.val_size)
    x = prepare_eval(splits.test, splits.kind, cfg.data.binarization, cfg.data.seed, device)
    indices, _ = test_subset(len(x), images)
    return model, (x if indices is None else x[indices.to(device)])


@dataclass(frozen=True)
class Conv:
    """One dispatched convolution: what the replay needs to redo it."""

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    channels_last: bool
    dtype: torch.dtype

    @property
    def flops(self) -> int:
        """2 x multiply-adds: each output element (each input element when transposed)
        meets ``weight.shape[1] x kernel area`` weights."""
        per = self.weight_shape[1] * math.prod(self.weight_shape[2:])
        return 2 * per * math.prod(self.out_or_in_shape)

    @property
    def out_or_in_shape(self) -> tuple[int, ...]:
        if self.transposed:
            return self.input_shape
        n, _, *spatial = self.input_shape
        out = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(
                spatial,
                self.weight_shape[2:],
                self.stride,
                self.padding,
                self.dilation,
                strict=True,
            )
        ]
        return (n, self.weight_shape[0], *out)


def _conv2d_args(func, args: tuple, kwargs: dict) -> tuple:  # noqa: ANN001
    """``(stride, padding, dilation, transposed, output_padding, groups)`` of an undecomposed
    ``conv2d(input, weight, bias, stride, padding, dilation, groups)`` or
    ``conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
    dilation)``, defaults filled in."""
    transposed = _CONV2D[func]
    names = (
        ("stride", "padding", "output_padding", "groups", "dilation")
        if transposed
        else ("stride", "padding", "dilation", "groups")
    )
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
    given = dict(zip(names, args[3:], strict=False))  # trailing defaults may be left out
    given.update({k: v for k, v in kwargs.items() if k in defaults})
    v = {k: given.get(k, d) for k, d in defaults.items()}

    def pair(t: int | Sequence[int]) -> tuple[int, int]:
        return (t, t) if isinstance(t, int) else tuple(t)

    return (
        pair(v["stride"]),
        pair(v["padding"]),
        pair(v["dilation"]),
        transposed,
        pair(v["output_padding"]) if transposed else (0, 0),
        int(v["groups"]),
    )


class MatmulTrace(TorchDispatchMode):
    """Record ``(m, k, n, batch)`` of every matmul and every :class:`Conv` dispatched
    inside the context (convolutions in :attr:`convs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int, int]] = []
        self.convs: list[Conv] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func in _CONVOLUTIONS or func in _CONV2D:
            x, w = args[0], args[1]
            if func in _CONVOLUTIONS:
                stride, padding, dilation, transposed, output_padding, groups = args[3:9]
            else:
                stride, padding, dilation, transposed, output_padding, groups = _conv2d_args(
                    func, args, kwargs or {}
                )
            self.convs.append(
                Conv(
                    tuple(x.shape),
                    tuple(w.shape),
                    tuple(stride),
                    tuple(padding),
                    tuple(dilation),
                    bool(transposed),
                    tuple(output_padding),
                    int(groups),
                    x.dim() == 4
                    and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous(),
                    x.dtype,
                )
            )
            return out
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
    def matmul_flops(self) -> int:
        """Multiply-adds x 2 of the recorded matmuls."""
        return sum(2 * m * k * n * b for m, k, n, b in self.shapes)

    @property
    def conv_flops(self) -> int:
        """Multiply-adds x 2 of the recorded convolutions."""
        return sum(c.flops for c in self.convs)

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of every recorded matmul and convolution."""
        return self.matmul_flops + self.conv_flops


def replay(
    trace: MatmulTrace, device: torch.device, dtype: torch.dtype = torch.float32
) -> Callable[[], None]:
    """A function doing exactly the recorded matmuls and convolutions on preallocated
    random operands (matmuls in ``dtype``; convolutions in the dtype they ran in)."""
    operands = {}
    for m, k, n, b in set(trace.shapes):
        lead = () if b == 1 else (b,)
        operands[(m, k, n, b)] = (
            torch.randn(*lead, m, k, device=device, dtype=dtype),
            torch.randn(*lead, k, n, device=device, dtype=dtype),
            torch.empty(*lead, m, n, device=device, dtype=dtype),
        )
    conv_operands = {}
    for c in set(trace.convs):
        fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        conv_operands[c] = (
            torch.randn(c.input_shape, device=device, dtype=c.dtype).contiguous(memory_format=fmt),
            torch.randn(c.weight_shape, device=device, dtype=c.dtype).contiguous(
                memory_format=fmt
            ),
        )

    def run() -> None:
        for s in trace.shapes:
            a, w, out = operands[s]
            torch.matmul(a, w, out=out)
        for c in trace.convs:
            x, w = conv_operands[c]
            _aten.convolution(
                x,
                w,
                None,
                c.stride,
                c.padding,
                c.dilation,
                c.transposed,
                c.output_padding,
                c.groups,
            )

    return run


def _mode_context(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp", choices=["mlp", *EXPERIMENT_MODELS])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 10])
    p.add_argument("--chunk", type=int, nargs="*", default=[500, 1000, 5000])
    p.add_argument("--repeats", type=int, default=3, help="timed passes over --images")
    p.add_argument("--posterior", default=None, help="mlp: posterior flow (default: Gaussian)")
    p.add_argument("--prior", default=None, help="mlp: prior flow (default: N(0, I))")
    p.add_argument("--latent", type=int, default=50, help="mlp: latent size")
    p.add_argument("--memory-ks", type=int, nargs="*", default=[1000, 5000, 50000])
    p.add_argument(
        "--modes",
        nargs="*",
        default=["eager"],
        choices=["eager", "compile", "channels_last", "bf16"],
        help="eager, torch.compile'd chunks (eval.compile), NHWC, bfloat16 autocast",
    )
    p.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="a trained run instead of --model: its checkpoint (eval.checkpoint) scored on "
        "the first --images of a fixed random order of its test images (the bf16 "
        "tolerance must be measured on a trained model)",
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
    if args.run:
        model, x = load_trained(args.run, args.images, device)
        what = f"trained run {args.run}"
        x_shape = binary = None
    elif args.model == "mlp":
        model = make_model(args.posterior, args.prior, args.latent, hidden)
        x_shape, binary = (1, 28, 28), True
        what = (
            f"MLP VAE 784-{hidden}-{hidden}-{args.latent}, posterior "
            f"{args.posterior or 'gaussian'}, prior {args.prior or 'N(0,I)'}"
        )
    else:
        model, x_shape, binary = make_experiment_model(args.model)
        path, overrides = EXPERIMENT_MODELS[args.model]
        sets = "".join(f" --set {o}" for o in overrides)
        what = f"{args.model} ({path.relative_to(ROOT)}{sets})"
    model = model.to(device).eval()
    if args.run:
        pass
    elif binary:
        x = torch.bernoulli(torch.full((args.images, *x_shape), 0.13)).to(device)
    else:
        x = (torch.randint(0, 256, (args.images, *x_shape)) / 255.0).to(device)
    params = sum(q.numel() for q in model.parameters())
    print(machine_header(device, torch.get_num_threads()))
    print(
        f"model: {what}, {params / 1e6:.2f}M parameters; k = {args.k}, {args.images} "
        f"images, median of {args.repeats} passes\n"
    )

    def evaluate(batch: int, chunk: int, mode: str, seed: int | None = None) -> list[torch.Tensor]:
        nhwc = mode == "channels_last"
        m = model.to(memory_format=torch.channels_last) if nhwc else model
        xs = x.contiguous(memory_format=torch.channels_last) if nhwc and x.dim() == 4 else x
        if seed is not None:
            torch.manual_seed(seed)
        out = []
        with _mode_context(mode, device):
            for i in range(0, args.images, batch):
                ll = m.log_likelihood(
                    xs[i : i + batch], k=args.k, chunk=chunk, compile=mode == "compile"
                )
                out.append(ll.log_px)
        if nhwc:
            model.to(memory_format=torch.contiguous_format)
        return out

    rows = []
    for batch in args.batch:
        for chunk in args.chunk:
            reference = None
            for mode in args.modes:
                # FLOPs and op shapes from an eager pass in the mode's layout and dtype (a
                # dispatch mode does not see inside compiled graphs; the compiled evaluation
                # does the same matmuls and convolutions as the eager one).
                traced_as = "eager" if mode == "compile" else mode
                trace = MatmulTrace()
                with trace:
                    evaluate(batch, chunk, traced_as)
                dtype = torch.bfloat16 if mode == "bf16" else torch.float32
                t_op = time_fn(
                    replay(trace, device, dtype), repeats=args.repeats, warmup=1, device=device
                )
                limit = trace.flops / t_op["median"] / 1e9
                run = partial(evaluate, batch, chunk, mode)
                # Warm-up = one full pass: for "compile" that compiles every (B, n) shape.
                t = time_fn(run, repeats=args.repeats, warmup=1, device=device)
                achieved = trace.flops / t["median"] / 1e9
                mem = peak_memory(run, device)
                estimate = torch.cat(evaluate(batch, chunk, mode, seed=1)).double()
                if mode == "eager":
                    reference = estimate
                diff = (
                    "-"
                    if reference is None or mode == "eager"
                    else f"{(estimate - reference).abs().mean().item():.4f}"
                )
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
                        f"{100 * trace.conv_flops / max(1, trace.flops):.0f} %",
                        "n/a" if mem is None else f"{mem:.0f}",
                        diff,
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
                "GFLOP/s same-op replay",
                "% of replay",
                "conv share",
                "peak MiB",
                "|diff| vs fp32 (nats)",
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
